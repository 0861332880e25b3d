/// What a partner daemon's process is told at start (JSON on its stdin): the plug-in
/// whose `daemon_main` it runs, where it keeps state, and which fds it was handed.
public struct DaemonConfiguration: Codable, Sendable, Equatable {
    public var plugin: PluginManifest
    /// Its own directory, kept across restarts: the daemon's current directory and the
    /// only place it may write.
    public var stateDirectory: String
    /// What `host->param(NULL, key)` answers in the daemon: "listen" (the address the
    /// operator allowed it to accept peers on) and the operator's daemon settings.
    public var settings: [String: String]
    /// The listening unix socket the filters' channels arrive on (daemon_main's listen_fd).
    public var channelFD: Int32
    /// The listening TCP socket for peers on other hosts, if allowed.
    public var peerFD: Int32?
    /// The host's broker: outgoing peer connections and replica disks.
    public var brokerFD: Int32?
    /// The supervisor's heartbeat page.
    public var heartbeatFD: Int32?
    public var sandbox: Bool
    public var logLevel: String
    public var identity: WorkerIdentity?
    public var hiddenPaths: [String]?
    public var cgroupProcs: [String]?
    public var memoryLimit: UInt64?
    /// The fd number of a listening socket a later host reattaches through (see
    /// `WorkerConfiguration.controlListenFD`): a daemon with one outlives its host.
    public var controlListenFD: Int32?

    /// What the daemon runs, without its fd numbers and cgroup (see
    /// `WorkerConfiguration.withoutHandedOverFDs`).
    public var withoutHandedOverFDs: DaemonConfiguration {
        var plain = self
        plain.channelFD = -1
        plain.peerFD = nil
        plain.brokerFD = nil
        plain.heartbeatFD = nil
        plain.controlListenFD = nil
        plain.cgroupProcs = nil
        return plain
    }

    public init(plugin: PluginManifest, stateDirectory: String, settings: [String: String] = [:], channelFD: Int32 = 3,
                sandbox: Bool = true, logLevel: String = "info") {
        self.plugin = plugin
        self.stateDirectory = stateDirectory
        self.settings = settings
        self.channelFD = channelFD
        self.sandbox = sandbox
        self.logLevel = logLevel
    }
}

/// Where a supervised process (a worker, a partner daemon) stands.
public enum SupervisedState: String, Codable, Sendable {
    /// Starting, or started again after an exit.
    case starting
    case running
    /// Exited or crashed; waiting out its backoff before the next start.
    case restarting
    case stopped
}

/// Where a partner daemon stands, as the host reports it (`iofilter plugin show`).
public struct DaemonStatus: Codable, Sendable, Equatable {
    public typealias State = SupervisedState
    public var state: State
    public var pid: Int32?
    public var restarts: Int
    /// Why it last exited, or could not start ("killed by SIGKILL").
    public var lastError: String?
    /// Where it accepts peers on other hosts, if the operator allowed it.
    public var listen: String?

    public init(state: State, pid: Int32? = nil, restarts: Int = 0, lastError: String? = nil, listen: String? = nil) {
        self.state = state
        self.pid = pid
        self.restarts = restarts
        self.lastError = lastError
        self.listen = listen
    }
}

/// What a sandboxed process asks the host's broker for, as one record: a target a
/// policy named (a file or an NBD URI, as given), or one of these.
public enum BrokerRequest {
    /// A channel to the partner daemon of the plug-in named after the prefix.
    public static let daemonChannelPrefix = "daemon-channel:"
    /// A replica disk for a daemon: "replica:SIZE:NAME".
    public static let replicaPrefix = "replica:"
    /// A peer daemon on another host: "iofilter://HOST:PORT/…".
    public static let peerScheme = "iofilter://"
}
