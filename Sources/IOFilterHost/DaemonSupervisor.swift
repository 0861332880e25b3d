import Foundation
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// Runs one plug-in's partner daemon (its `daemon_main`) in a sandboxed process and
/// keeps it running: restarted with backoff when it exits, crashes or stops beating,
/// until `stop`.
///
/// The host owns the daemon's listening sockets, so that they outlive its restarts:
/// the unix socket its filters' channels arrive on (in a directory no sandboxed
/// process sees; the host connects each channel and hands it to the worker through its
/// broker), and, where the operator allowed it, a TCP socket for peers on other hosts.
public final class DaemonSupervisor: SupervisesAProcess, @unchecked Sendable {
    // @unchecked: fixed after init (`core` is set once, at its end).
    public let plugin: PluginManifest
    public let channelPath: String
    /// "HOST:PORT" where it accepts peers, if allowed (with the port the kernel chose
    /// for port 0).
    public let listenAddress: String?
    private let configuration: DaemonConfiguration
    private let peerPSK: String?
    static let peerPSKName = "peer-tls.psk"
    private let channelListener: Int32
    private let peerListener: Int32?
    private let answer: TargetBroker.Answer
    private let workerPath: String
    private let logger: Logger
    /// Set once, at the end of init (its launch closure needs `self`).
    public private(set) var core: ProcessSupervisor!

    /// - Parameters:
    ///   - directory: the daemon's own state directory (kept across restarts).
    ///   - socketDirectory: where the host keeps the channel socket; no sandboxed
    ///     process may see it.
    ///   - listen: "HOST:PORT" for peers, if the operator allows it and the plug-in
    ///     declares IOF_DAEMON_LISTENS.
    ///   - answer: what its broker opens for it (peer daemons, replica disks).
    ///   - peerPSK: a psktool file peers must start TLS with; copied into the daemon's
    ///     directory at each start (it cannot reach the original), named by its
    ///     "tls-psk" setting.
    ///   - continuity: for a daemon that outlives this host: where a later host
    ///     reaches it, and where the daemon that serves is recorded.
    ///   - leftover: the daemon an earlier host left serving: reattached to, and
    ///     adopted by `start` if it runs what this one would (stopped cleanly if not).
    public init(plugin: PluginManifest, directory: String, socketDirectory: String, listen: String?, peerPSK: String? = nil,
                settings: [String: String] = [:],
                logLevel: String, hiddenPaths: [String] = [], sandbox: Bool = true, workerPath: String = WorkerExecutable.path(),
                continuity: (controlSocket: String, recordPath: String)? = nil, adopting leftover: LeftoverProcess? = nil,
                logger: Logger, answer: @escaping TargetBroker.Answer) throws(SupervisorError) {
        self.plugin = plugin
        var logger = logger
        logger[metadataKey: "plugin"] = "\(plugin.name)"
        self.logger = logger
        self.answer = answer
        self.workerPath = workerPath
        self.leftover = leftover
        channelPath = socketDirectory + "/" + Self.socketName(plugin.name)
        try? FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o700])
        if let leftover, let continuity {
            reattachment = Self.reattach(leftover, name: plugin.name, socket: continuity.controlSocket, channelPath: channelPath,
                                         peers: listen != nil, answer: answer, logger: logger)
        } else {
            reattachment = nil
        }
        var peer: Int32?
        if let reattachment {
            channelListener = reattachment.listeners[0]
            peer = reattachment.listeners.dropFirst().first
        } else {
            unlink(channelPath)
            do {
                channelListener = try Sockets.listenUnix(path: channelPath)
            } catch {
                throw SupervisorError(message: "cannot listen for \(plugin.name)'s daemon channels at \(channelPath): \(error)")
            }
        }
        if let listen, reattachment == nil {
            guard let (host, port) = Sockets.hostPort(listen) else {
                close(channelListener)
                throw SupervisorError(message: "'\(listen)' is not HOST:PORT")
            }
            do {
                peer = try Sockets.listenTCP(host: host, port: port)
            } catch {
                close(channelListener)
                throw SupervisorError(message: "cannot listen for \(plugin.name)'s peers on \(listen): \(error)")
            }
        }
        peerListener = peer
        // With the port the kernel chose for port 0 (or that the adopted daemon has).
        let address = peer.map { fd in
            let host = listen.flatMap(Sockets.hostPort)?.host ?? "127.0.0.1"
            return Sockets.authority(host: host, port: Sockets.localPort(fd))
        }
        listenAddress = address
        var settings = settings
        if let address { settings["listen"] = address }
        if peerPSK != nil { settings["tls-psk"] = Self.peerPSKName }
        self.peerPSK = peerPSK
        var configuration = DaemonConfiguration(plugin: plugin, stateDirectory: directory, settings: settings, sandbox: sandbox,
                                                logLevel: logLevel)
        configuration.hiddenPaths = hiddenPaths + [socketDirectory]
        configuration.identity = WorkerIdentity(for: "daemon:" + plugin.name)
        let limits = WorkerCgroupLimits(memory: WorkerConfiguration.defaultMemoryLimit, tasks: WorkerCgroupLimits.defaultTasks,
                                        cpuWeight: WorkerCgroupLimits.defaultCPUWeight)
        // A group of its own per supervisor: the one it replaces (an upgrade) may still
        // be emptying its group while this one starts.
        let instance = Self.instances.withLock { count -> Int in
            count += 1
            return count
        }
        var cgroup: WorkerCgroup?
        switch reattachment.flatMap({ WorkerCgroup.of(pid: $0.process.pid, limits: limits) }).map({ .success($0) })
            ?? WorkerCgroup.create(name: "daemon-\(Self.socketName(plugin.name))-\(instance)", limits: limits) {
        case .success(let made):
            cgroup = made
            configuration.cgroupProcs = made.procsFiles
        case .failure(let reason):
            logger.warning("no cgroup for the daemon (\(reason)): RLIMIT_AS limits its memory")
        }
        self.configuration = configuration
        if let reattachment {
            controlListener = reattachment.controlListener
        } else if let continuity {
            unlink(continuity.controlSocket)
            controlListener = try? Sockets.listenUnix(path: continuity.controlSocket)
            if controlListener == nil { logger.warning("cannot listen at \(continuity.controlSocket): the daemon dies with this host") }
        } else {
            controlListener = nil
        }
        self.continuity = continuity
        adopts = reattachment != nil && leftover?.record.key == configuration.adoptionKey
        var policy = RestartPolicy()
        policy.readyTimeout = 30
        core = ProcessSupervisor(role: "daemon", owner: " of \(plugin.name)", policy: policy, cgroup: cgroup,
                                 record: continuity.map { ($0.recordPath, configuration.adoptionKey) }, logger: logger) {
            [unowned self] in try prepareLaunch()
        }
    }

    private let leftover: LeftoverProcess?
    private let reattachment: Reattachment?
    /// The leftover daemon runs what this one would: `start` adopts it.
    private let adopts: Bool
    private let controlListener: Int32?
    private let continuity: (controlSocket: String, recordPath: String)?

    /// Reattaches to the daemon an earlier host left serving and checks the sockets it
    /// hands back; nil (and the daemon stopped cleanly) if that fails.
    private static func reattach(_ leftover: LeftoverProcess, name: String, socket: String, channelPath: String, peers: Bool,
                                 answer: @escaping TargetBroker.Answer, logger: Logger) -> Reattachment? {
        do throws(SupervisorError) {
            let broker: Int32
            do {
                broker = try TargetBroker.start(logger: logger, answer: answer)
            } catch {
                throw SupervisorError(message: "cannot start its broker: \(error)")
            }
            defer { close(broker) }
            let reattachment = try leftover.reattach(socket: socket, name: name, listeners: peers ? 2 : 1, broker: broker)
            close(reattachment.control)  // a daemon takes no requests but reattach
            guard Sockets.listeningUnixPath(reattachment.listeners[0]) == channelPath, !peers || Sockets.isTCP(reattachment.listeners[1]) else {
                (reattachment.listeners + [reattachment.controlListener]).forEach { close($0) }
                throw SupervisorError(message: "the sockets it handed back are not its listeners")
            }
            return reattachment
        } catch {
            logger.warning("cannot adopt daemon \(leftover.record.pid) left by the previous host (\(error)): stopping it cleanly")
            leftover.stop(timeout: 5, logger: logger)
            return nil
        }
    }

    private static let instances = Guarded(0)

    /// A file name for a plug-in's name (reverse-DNS names are safe already; anything
    /// else is folded).
    static func socketName(_ name: String) -> String {
        String(name.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_" ? $0 : "_" })
    }

    public var status: DaemonStatus {
        DaemonStatus(state: core.state, pid: core.pid, restarts: core.restarts, lastError: core.lastError, listen: listenAddress)
    }

    /// Starts supervising; returns once the first daemon serves or has failed (then it
    /// is retried with backoff, and `status` says why).
    public func start() {
        if let leftover, let reattachment {
            if adopts {
                try? core.start(adopting: reattachment.process, heartbeat: reattachment.heartbeat)
                return
            }
            // Another version or other settings: the new daemon gets its sockets.
            logger.notice("the daemon \(leftover.record.pid) left by the previous host runs other settings: stopping it cleanly")
            leftover.stop(timeout: 5, logger: logger)
        }
        // A daemon's first start never throws: it is retried like any exit.
        try? core.start(mustServe: false)
    }

    /// Whether `start` adopted a daemon an earlier host left serving.
    public var adopted: Bool { adopts }

    /// A new connection to the daemon for one filter instance, or why there is none.
    public func connectChannel() -> Result<Int32, TargetBroker.Failure> {
        guard core.state == .running else {
            return .failure(TargetBroker.Failure(ECONNREFUSED, "the daemon of \(plugin.name) is not running"))
        }
        do {
            return .success(try Sockets.connectUnix(path: channelPath))
        } catch {
            return .failure(TargetBroker.Failure(error.code == 0 ? ECONNREFUSED : error.code, "cannot reach the daemon of \(plugin.name): \(error)"))
        }
    }

    /// Stops the daemon (SIGTERM, then SIGKILL after `timeout`) and closes its sockets.
    public func stop(timeout: Double = 5) {
        core.stop(timeout: timeout)
        close(channelListener)
        if let peerListener { close(peerListener) }
        unlink(channelPath)
        if let controlListener { close(controlListener) }
        if let continuity { unlink(continuity.controlSocket) }
    }

    /// Puts the peers' key where the confined daemon can read it: its own directory,
    /// owned by its identity, 0600.
    private func stagePeerKey() throws {
        guard let peerPSK else { return }
        try FileManager.default.createDirectory(atPath: configuration.stateDirectory, withIntermediateDirectories: true)
        let copy = configuration.stateDirectory + "/" + Self.peerPSKName
        unlink(copy)
        guard let key = FileManager.default.contents(atPath: peerPSK),
              FileManager.default.createFile(atPath: copy, contents: key, attributes: [.posixPermissions: 0o600]) else {
            throw SupervisorError(message: "cannot copy the peers' TLS key \(peerPSK) for the daemon")
        }
        if geteuid() == 0, let identity = configuration.identity { _ = chown(copy, identity.uid, identity.gid) }
    }

    /// A daemon's start: its channel listener, its peer listener if allowed, a broker
    /// and its heartbeat, handed over in that order.
    private func prepareLaunch() throws -> PreparedLaunch {
        try stagePeerKey()
        var configuration = configuration
        var launch = SandboxedLaunch(mode: .daemon, executable: workerPath)
        launch.logLevel = configuration.logLevel
        let beat = try Heartbeat()
        let broker = try TargetBroker.start(logger: logger, answer: answer)
        configuration.channelFD = launch.fds.hand(channelListener)
        configuration.peerFD = peerListener.map { launch.fds.hand($0) }
        configuration.brokerFD = launch.fds.hand(broker)
        configuration.heartbeatFD = launch.fds.hand(beat.fd)
        configuration.controlListenFD = controlListener.map { launch.fds.hand($0) }
        do {
            launch.configuration = try JSONEncoder().encode(configuration)
        } catch {
            close(broker)
            throw error
        }
        return PreparedLaunch(launch: launch, heartbeat: beat) { _, _ in close(broker) }
    }
}

extension DaemonSupervisor {
    /// What a daemon's broker answers:
    /// - `iofilter://HOST:PORT/…`: a TCP connection to that peer, if `peers()` (the
    ///   targets the policies using the plug-in name, at the time of asking) has it;
    /// - `replica:SIZE:NAME`: what `replica` opens, for a replication plug-in only (a
    ///   replica is a disk of the host: no other kind of plug-in makes one).
    /// Anything else is refused with EACCES.
    public static func brokerAnswer(
        plugin: PluginManifest, peers: @escaping @Sendable () -> Set<String>,
        replica: @escaping @Sendable (_ name: String, _ size: UInt64) -> Result<Int32, TargetBroker.Failure>
    ) -> TargetBroker.Answer {
        let name = plugin.name
        let keepsReplicas = plugin.category == .replication
        return { spec in
            if spec.hasPrefix(BrokerRequest.replicaPrefix) {
                guard keepsReplicas else {
                    return .failure(TargetBroker.Failure(EPERM, "\(name) is not a replication plug-in: it keeps no replica disks"))
                }
                let rest = spec.dropFirst(BrokerRequest.replicaPrefix.count)
                guard let colon = rest.firstIndex(of: ":"), let size = UInt64(rest[..<colon]) else {
                    return .failure(TargetBroker.Failure(EINVAL, "malformed replica request"))
                }
                return replica(String(rest[rest.index(after: colon)...]), size)
            }
            if spec.hasPrefix(BrokerRequest.peerScheme) {
                guard peers().contains(spec) else {
                    return .failure(TargetBroker.Failure(EACCES, "no policy using \(name) names \(spec)"))
                }
                guard let uri = NBDURI("nbd://" + spec.dropFirst(BrokerRequest.peerScheme.count)) else {
                    return .failure(TargetBroker.Failure(EINVAL, "'\(spec)' is not iofilter://HOST:PORT/DISK"))
                }
                do throws(SystemError) {
                    return .success(try uri.connect())
                } catch {
                    return .failure(TargetBroker.Failure(error.code == 0 ? EIO : error.code, "cannot connect to \(spec): \(error)"))
                }
            }
            return .failure(TargetBroker.Failure(EACCES, "\(spec) is not a peer any policy using \(name) names"))
        }
    }

    /// A replica kept as a plain file `directory/NAME.img` (what `iofilter serve`
    /// offers a daemon in development; iofilterd keeps managed disks instead).
    public static func fileReplicas(in directory: String) -> @Sendable (String, UInt64) -> Result<Int32, TargetBroker.Failure> {
        { name, size in
            guard ResourceName.isValid(name) else { return .failure(TargetBroker.Failure(EINVAL, "'\(name)' is not a valid disk name")) }
            try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            let path = directory + "/" + name + ".img"
            let opened = TargetBroker.open(path)
            if case .success(let fd) = opened {
                var info = stat()
                if fstat(fd, &info) == 0, UInt64(info.st_size) < size { ftruncate(fd, off_t(size)) }
            }
            return opened
        }
    }
}
