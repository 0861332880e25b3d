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
public final class DaemonSupervisor: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `lock`.
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
    private let cgroup: WorkerCgroup?

    private let lock = ConditionLock()
    private var child: ChildProcess?
    private var state = DaemonStatus.State.starting
    private var restartCount = 0
    private var lastError: String?
    private var stopping = false
    private var heartbeat: Heartbeat?

    public var minimumBackoff = 0.2
    public var maximumBackoff = 10.0
    /// A daemon that ran this long resets the backoff.
    public var stableAfter = 30.0
    public var heartbeatTimeout = 10.0

    /// Told (on the supervising thread) when the daemon ends unasked and when it serves
    /// again: for the host's event log.
    public var onEvent: (@Sendable (_ kind: DaemonEvent, _ message: String) -> Void)?

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
    public init(plugin: PluginManifest, directory: String, socketDirectory: String, listen: String?, peerPSK: String? = nil,
                settings: [String: String] = [:],
                logLevel: String, hiddenPaths: [String] = [], sandbox: Bool = true, workerPath: String = WorkerExecutable.path(),
                logger: Logger, answer: @escaping TargetBroker.Answer) throws(SupervisorError) {
        self.plugin = plugin
        var logger = logger
        logger[metadataKey: "plugin"] = "\(plugin.name)"
        self.logger = logger
        self.answer = answer
        self.workerPath = workerPath
        channelPath = socketDirectory + "/" + Self.socketName(plugin.name)
        try? FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o700])
        unlink(channelPath)
        do {
            channelListener = try Sockets.listenUnix(path: channelPath)
        } catch {
            throw SupervisorError(message: "cannot listen for \(plugin.name)'s daemon channels at \(channelPath): \(error)")
        }
        var peer: Int32?
        var address: String?
        if let listen {
            guard let (host, port) = Sockets.hostPort(listen) else {
                close(channelListener)
                throw SupervisorError(message: "'\(listen)' is not HOST:PORT")
            }
            do {
                let fd = try Sockets.listenTCP(host: host, port: port)
                peer = fd
                address = "\(host.contains(":") ? "[\(host)]" : host):\(Sockets.localPort(fd))"
            } catch {
                close(channelListener)
                throw SupervisorError(message: "cannot listen for \(plugin.name)'s peers on \(listen): \(error)")
            }
        }
        peerListener = peer
        listenAddress = address
        var settings = settings
        if let address { settings["listen"] = address }
        if peerPSK != nil { settings["tls-psk"] = Self.peerPSKName }
        self.peerPSK = peerPSK
        var configuration = DaemonConfiguration(plugin: plugin, stateDirectory: directory, settings: settings, sandbox: sandbox,
                                                logLevel: logLevel)
        configuration.peerFD = peer == nil ? nil : 4
        configuration.brokerFD = peer == nil ? 4 : 5
        configuration.heartbeatFD = configuration.brokerFD! + 1
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
        switch WorkerCgroup.create(name: "daemon-\(Self.socketName(plugin.name))-\(instance)", limits: limits) {
        case .success(let made):
            cgroup = made
            configuration.cgroupProcs = made.procsFiles
        case .failure(let reason):
            cgroup = nil
            logger.warning("no cgroup for the daemon (\(reason)): RLIMIT_AS limits its memory")
        }
        self.configuration = configuration
    }

    private static let instances = Guarded(0)

    /// A file name for a plug-in's name (reverse-DNS names are safe already; anything
    /// else is folded).
    static func socketName(_ name: String) -> String {
        String(name.map { $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == "_" ? $0 : "_" })
    }

    public var status: DaemonStatus {
        lock.withLock {
            DaemonStatus(state: state, pid: state == .running ? child?.pid : nil, restarts: restartCount, lastError: lastError,
                         listen: listenAddress)
        }
    }

    /// Starts supervising; returns once the first daemon serves or has failed (then it
    /// is retried with backoff, and `status` says why).
    public func start(timeout: Double = 30) {
        startThread(name: "daemon-supervise") { [self] in supervise() }
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while state == .starting && restartCount == 0 && lastError == nil && !stopping {
                let now = monotonicNanoseconds()
                if now >= deadline { return }
                _ = lock.wait(nanoseconds: deadline - now)
            }
        }
    }

    /// A new connection to the daemon for one filter instance, or why there is none.
    public func connectChannel() -> Result<Int32, TargetBroker.Failure> {
        guard lock.withLock({ state == .running }) else {
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
        let process: ChildProcess? = lock.withLock {
            stopping = true
            lock.broadcast()
            return child
        }
        if let process {
            process.signal(SIGTERM)
            if process.wait(timeout: timeout) == nil {
                logger.warning("daemon \(process.pid) did not stop within \(timeout)s; killing it")
                process.signal(SIGKILL)
                _ = process.wait()
            }
        }
        cgroup?.killAll()
        cgroup?.remove()
        lock.withLock { state = .stopped }
        close(channelListener)
        if let peerListener { close(peerListener) }
        unlink(channelPath)
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

    private func launch() throws -> (ChildProcess, (ready: Bool, error: String?)) {
        try stagePeerKey()
        let input = try JSONEncoder().encode(configuration)
        let beat = try Heartbeat()
        let broker = try TargetBroker.start(logger: logger, answer: answer)
        defer { close(broker) }
        var handOver = [(channelListener, configuration.channelFD)]
        if let peerListener, let fd = configuration.peerFD { handOver.append((peerListener, fd)) }
        handOver += [(broker, configuration.brokerFD!), (beat.fd, configuration.heartbeatFD!)]
        let process = try ChildProcess(
            executable: workerPath, arguments: ["daemon"], handOver: handOver, stdin: Array(input), stdout: .capture,
            environment: WorkerExecutable.environment(logLevel: configuration.logLevel))
        // Known at once, so that a stop while it starts reaches it.
        lock.withLock { child = process }
        if let cgroup, !cgroup.add(process.pid) {
            logger.warning("cannot move daemon \(process.pid) into its cgroup: \(String(cString: strerror(errno)))")
        }
        let outcome = WaitForLine(process: process).wait(timeout: 30)
        lock.withLock {
            heartbeat = beat
            if outcome.ready {
                state = .running
            } else {
                lastError = outcome.error ?? "it did not start"
            }
            lock.broadcast()
        }
        return (process, outcome)
    }

    private func supervise() {
        var backoff = minimumBackoff
        while !lock.withLock({ stopping }) {
            let startedAt = monotonicNanoseconds()
            var status: Int32 = -1
            var pid: pid_t = 0
            do {
                let (process, ready) = try launch()
                pid = process.pid
                if ready.ready {
                    logger.info("daemon \(process.pid) is running")
                    if restarts > 0 { onEvent?(.daemonRestarted, "daemon \(process.pid) of \(plugin.name) runs again after \(restarts) restart(s)") }
                } else {
                    process.signal(SIGKILL)
                }
                if lock.withLock({ stopping }) { process.signal(SIGKILL) }
                status = lock.withLock({ stopping }) ? (process.wait() ?? -1)
                    : HeartbeatWatch.wait(for: process, beat: currentHeartbeat(), timeout: heartbeatTimeout, logger: logger, what: "daemon") { [self] in
                        lock.withLock { stopping }
                    }
            } catch {
                lock.withLock { lastError = "cannot start: \(error)" }
            }
            // Once stopping, `stop` empties and removes the group itself.
            if lock.withLock({ stopping }) { return }
            cgroup?.killAll()
            let why = pid == 0 ? (lock.withLock { lastError } ?? "it did not start") : ChildProcess.describe(status: status)
            let message = "daemon \(pid) of \(plugin.name) \(why); restarting in \(backoff)s"
            logger.error("\(message)")
            lock.withLock {
                state = .restarting
                lastError = why
                restartCount += 1
                lock.broadcast()
            }
            onEvent?(.daemonExited, message)
            if Double(monotonicNanoseconds() - startedAt) / 1e9 > stableAfter { backoff = minimumBackoff }
            let stopNow = lock.withLock { () -> Bool in
                if !stopping { _ = lock.wait(nanoseconds: UInt64(backoff * 1e9)) }
                return stopping
            }
            if stopNow { return }
            backoff = min(backoff * 2, maximumBackoff)
            lock.withLock { state = .starting }
        }
    }

    private var restarts: Int { lock.withLock { restartCount } }
    private func currentHeartbeat() -> Heartbeat? { lock.withLock { heartbeat } }
}

/// What a daemon supervisor reports to its host's event log.
public enum DaemonEvent: String, Sendable {
    case daemonExited = "daemon-exited"
    case daemonRestarted = "daemon-restarted"
}

/// Waits for a sandboxed process to exit, killing it if its heartbeat stops: frozen,
/// deadlocked, or its threads stopped by a plug-in.
enum HeartbeatWatch {
    static func wait(for process: ChildProcess, beat: Heartbeat?, timeout: Double, logger: Logger, what: String,
                     stopping: () -> Bool) -> Int32 {
        guard timeout > 0, let beat else { return process.wait() ?? -1 }
        let limit = UInt64(timeout * 1e9)
        let check = min(max(timeout / 4, 0.1), 1)
        while true {
            if let status = process.wait(timeout: check) { return status }
            let last = beat.lastBeat, now = monotonicNanoseconds()
            guard last > 0, now > last, now - last > limit, !stopping() else { continue }
            logger.critical(
                "\(what) \(process.pid) has not beaten for \((Double(now - last) / 1e8).rounded() / 10)s (frozen, deadlocked, or its threads stopped by a plug-in); killing it")
            process.signal(SIGKILL)
            return process.wait() ?? -1
        }
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
