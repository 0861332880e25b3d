import Foundation
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import IOFilterWire
import Logging

/// Runs one VM's worker process and keeps it running (a `ProcessSupervisor` with a
/// worker's launch).
///
/// The supervisor owns the listening sockets and hands them to each worker it starts,
/// so a restarted worker serves the same addresses and clients simply reconnect. A
/// worker that dies is logged with its cause and restarted with exponential backoff.
public final class WorkerSupervisor: SupervisesAProcess, @unchecked Sendable {
    // @unchecked: `controlFD` is guarded by `lock`; `core` is set once in init.
    public let configuration: WorkerConfiguration
    /// Set once, at the end of init (its launch closure needs `self`).
    public private(set) var core: ProcessSupervisor!
    private let lock = ConditionLock()
    /// The host's end of the current worker's control channel.
    private var controlFD: Int32 = -1
    /// One control request at a time.
    private let controlLock = ConditionLock()
    /// Set while the worker stands by to take over another's clients: every start
    /// (a restart too) waits for `adopt` rather than opening the disks, until the host
    /// says the take-over is done.
    private let standingBy = Guarded(false)
    private let daemonChannelsBox = Guarded<(@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?>(nil)

    /// Connects a filter instance to its plug-in's partner daemon, by plug-in name
    /// (the host's daemons); set before `start`. Without it filters get no channel.
    public var daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)? {
        get { daemonChannelsBox.withLock { $0 } }
        set { daemonChannelsBox.withLock { $0 = newValue } }
    }

    /// - Parameters:
    ///   - listenFDs: one listening socket per disk, in the order of
    ///     `configuration.disks`.
    ///   - vhostUserFDs: per disk, in the same order, its vhost-user-blk listening
    ///     socket if it has one (empty: none has).
    ///   - outlivingHost: a worker that outlives this host: the listening socket a later
    ///     host reaches it through, and where each worker that serves is recorded (see
    ///     `ProcessRecord`). Nil: it dies with this host.
    ///   - adopting: the worker is one an earlier host left serving, whose cgroup it
    ///     keeps (see `start(adopting:)`).
    public init(configuration: WorkerConfiguration, listenFDs: [Int32], vhostUserFDs: [Int32?] = [], workerPath: String = WorkerExecutable.path(),
                readyTimeout: Double = 60, outlivingHost: (controlListener: Int32, recordPath: String)? = nil,
                adopting: pid_t? = nil, logger: Logger) {
        var configuration = configuration
        var logger = logger
        logger[metadataKey: "vm"] = "\(configuration.vmName)"
        let limits = WorkerCgroupLimits(for: configuration)
        var cgroup: WorkerCgroup?
        switch adopting.flatMap({ WorkerCgroup.of(pid: $0, limits: limits) }).map({ .success($0) })
            ?? WorkerCgroup.create(name: configuration.vmName, limits: limits) {
        case .success(let made):
            cgroup = made
            configuration.cgroupProcs = made.procsFiles
            configuration.cgroupSummary = made.summary
        case .failure(let reason):
            logger.warning("no cgroup for the worker (\(reason)): its memory is limited by RLIMIT_AS alone, its threads and CPU not at all")
        }
        self.configuration = configuration
        self.cgroup = cgroup
        var policy = RestartPolicy()
        policy.readyTimeout = readyTimeout
        // By default the watchdog's limit, at least 2 s; 0 turns the check off.
        policy.heartbeatTimeout = configuration.watchdogSeconds > 0 ? max(configuration.watchdogSeconds, 2) : 0
        // The worker's own watchdog ends a stuck request first, with its name; this is for
        // a worker whose watchdog a plug-in stopped.
        policy.requestTimeout = configuration.watchdogSeconds > 0 ? configuration.watchdogSeconds + max(2, configuration.watchdogSeconds / 2) : 0
        let filters = Set(configuration.disks.flatMap { $0.filters.map(\.manifest.name) }).sorted()
        let detail = filters.isEmpty ? "" : " (filters: \(filters.joined(separator: ", ")))"
        self.controlListener = outlivingHost?.controlListener
        core = ProcessSupervisor(role: "worker", subject: "worker for \(configuration.vmName)", policy: policy, cgroup: cgroup,
                                 detail: detail, record: outlivingHost.map { ($0.recordPath, configuration.adoptionKey) },
                                 logger: logger) { [unowned self] in
            try prepareLaunch(listenFDs: listenFDs, vhostUserFDs: vhostUserFDs, workerPath: workerPath, logger: logger)
        }
    }

    /// The listening socket later hosts reach the worker through (nil: it dies with
    /// this host).
    private let controlListener: Int32?
    /// The worker's group, which its TLS terminator shares.
    private let cgroup: WorkerCgroup?

    /// Supervises the worker an earlier host left serving, reattached (its cgroup was
    /// found at init, by `adopting`): as if this host had started it.
    public func start(adopting reattachment: Reattachment) throws(SupervisorError) {
        lock.withLock { controlFD = reattachment.control }
        try core.start(adopting: reattachment.process, heartbeat: reattachment.heartbeat)
    }

    /// A broker for a worker of `configuration` (see `brokerAnswer`): the worker's end.
    public static func startBroker(for configuration: WorkerConfiguration, logger: Logger,
                                   daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?)
        throws(SystemError) -> Int32
    {
        try TargetBroker.start(logger: logger, answer: brokerAnswer(configuration, daemonChannels: daemonChannels))
    }

    public var pid: pid_t? { core.pid }
    public var restarts: Int { core.restarts }
    /// Seconds from preparing the worker's last start to its READY line.
    public var lastStartSeconds: Double? { core.lastStartSeconds }
    public var secondsSinceLastExit: Double? { core.secondsSinceLastExit }
    public var generation: Int { core.generation }

    /// Starts the worker and waits until it serves; throws if it dies first.
    /// `standby`: it waits to be handed another worker's clients (see
    /// `WorkerConfiguration.standby`) until `tookOver`.
    public func start(standby: Bool = false) throws(SupervisorError) {
        standingBy.withLock { $0 = standby }
        core.recording = !standby
        try core.start(mustServe: true)
    }

    /// The take-over is done: later starts (after a crash) serve at once, and the next
    /// host adopts this worker, not its predecessor.
    public func tookOver() {
        standingBy.withLock { $0 = false }
        core.tookOver()
    }

    /// Waits until a worker newer than `generation` is ready (tests, restarts).
    public func waitUntilReady(after generation: Int, timeout: Double) -> Bool {
        core.waitUntilReady(after: generation, timeout: timeout)
    }

    /// Asks the worker to close its filters and disks, then kills it if it lingers.
    public func stop(timeout: Double = 20) {
        core.stop(timeout: timeout)
        // Wait for a control request in progress to end before closing its fd.
        controlLock.withLock {
            lock.withLock {
                if controlFD >= 0 { close(controlFD) }
                controlFD = -1
            }
        }
    }

    /// A serving worker's start: its listeners, a control channel, its heartbeat, a
    /// broker and, with TLS, the channel to its TLS terminator, handed over in that order.
    private func prepareLaunch(listenFDs: [Int32], vhostUserFDs: [Int32?], workerPath: String, logger: Logger) throws -> PreparedLaunch {
        var configuration = configuration
        configuration.standby = standingBy.withLock { $0 } ? true : nil
        var launch = SandboxedLaunch(mode: .serve, executable: workerPath)
        launch.logLevel = configuration.logLevel
        var opened: [Int32] = []
        do {
            let control = try Sockets.pair()
            opened += [control.0, control.1]
            let beat = try Heartbeat()
            let broker = try Self.startBroker(for: configuration, logger: logger, daemonChannels: daemonChannels)
            opened.append(broker)
            var terminatorChannel: Int32?
            if let settings = configuration.tls {
                let channel = try Sockets.pair(SOCK_SEQPACKET)
                opened += [channel.0, channel.1]
                try startTLSTerminator(settings, channel: channel.1, workerPath: workerPath, logger: logger)
                close(channel.1)  // the terminator's alone: it ends when the worker's end closes
                opened.removeLast()
                terminatorChannel = channel.0
            }
            for (index, fd) in listenFDs.enumerated() { configuration.disks[index].listenFD = launch.fds.hand(fd) }
            for (index, fd) in vhostUserFDs.enumerated() { configuration.disks[index].vhostUserListenFD = fd.map { launch.fds.hand($0) } }
            configuration.controlFD = launch.fds.hand(control.1)
            configuration.heartbeatFD = launch.fds.hand(beat.fd)
            configuration.brokerFD = launch.fds.hand(broker)
            configuration.controlListenFD = controlListener.map { launch.fds.hand($0) }
            configuration.tlsTerminatorFD = terminatorChannel.map { launch.fds.hand($0) }
            launch.configuration = try JSONEncoder().encode(configuration)
            return PreparedLaunch(launch: launch, heartbeat: beat) { [self] process, _ in
                close(control.1)
                close(broker)
                terminatorChannel.map { _ = close($0) }
                guard process != nil else {
                    close(control.0)
                    return
                }
                lock.withLock {
                    if controlFD >= 0 { close(controlFD) }
                    controlFD = control.0
                }
            }
        } catch {
            // Nothing of a start that could not be prepared stays open.
            opened.forEach { close($0) }
            throw error
        }
    }

    /// Starts the process that runs the worker's TLS sessions and alone holds the keys
    /// (see `TLSTerminatorConfiguration`), on its end of their channel, in the worker's
    /// group, and waits until it has loaded them. It needs no supervising: it ends when
    /// the worker's end of the channel closes, and each start of a worker has its own.
    private func startTLSTerminator(_ settings: TLSSettings, channel: Int32, workerPath: String, logger: Logger) throws {
        var launch = SandboxedLaunch(mode: .tlsTerminator, executable: workerPath)
        launch.logLevel = configuration.logLevel
        launch.cgroup = cgroup
        var terminator = TLSTerminatorConfiguration(
            vmName: configuration.vmName, tls: settings, channelFD: launch.fds.hand(channel), sandbox: configuration.sandbox,
            outlivesSupervisor: controlListener != nil)
        terminator.cgroupProcs = cgroup?.procsFiles
        launch.configuration = try JSONEncoder().encode(terminator)
        let process = try launch.spawn()
        let answer = ReadyLine(process: process, line: launch.readyLine).wait(timeout: 10)
        guard answer.ready else {
            process.signal(SIGKILL)
            _ = process.wait()
            throw SupervisorError(message: "the TLS terminator could not start: \(answer.error ?? "it ended")")
        }
        startThread(name: "tls-terminator-wait") {
            let status = process.wait()
            logger.debug("the TLS terminator \(process.pid) ended (status \(status.map(String.init) ?? "unknown"))")
        }
    }

    /// The worker's broker opens the targets its policies name and connects its
    /// filters to the daemons of their own plug-ins.
    private static func brokerAnswer(_ configuration: WorkerConfiguration,
                                     daemonChannels daemons: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?)
        -> TargetBroker.Answer
    {
        let targets = TargetBroker.opening(configuration.namedTargets)
        let plugins = Set(configuration.disks.flatMap { $0.filters.map(\.manifest.name) })
        return { spec in
            guard spec.hasPrefix(BrokerRequest.daemonChannelPrefix) else { return targets(spec) }
            let plugin = String(spec.dropFirst(BrokerRequest.daemonChannelPrefix.count))
            guard plugins.contains(plugin) else { return .failure(TargetBroker.Failure(EACCES, "no filter of this VM is \(plugin)")) }
            return daemons?(plugin) ?? .failure(TargetBroker.Failure(ECONNREFUSED, "\(plugin) has no daemon on this host"))
        }
    }

    /// Sends one request over the current worker's control channel and waits (at most
    /// `timeout` seconds) for its answer.
    public func control(_ request: WorkerControlRequest, timeout: Double = 10) throws(SupervisorError) -> WorkerControlResponse {
        let (response, fds) = try control(request, sending: [], timeout: timeout)
        fds.forEach { close($0) }
        return response
    }

    /// The same with file descriptors each way (a hand-over of clients): `fds` are
    /// sent (the caller keeps its copies), and those the answer carried are returned,
    /// the caller's to close.
    public func control(_ request: WorkerControlRequest, sending fds: [Int32], timeout: Double)
        throws(SupervisorError) -> (WorkerControlResponse, [Int32])
    {
        let answer = controlLock.withLock { () -> Result<(WorkerControlResponse, [Int32]), SupervisorError> in
            let fd = lock.withLock { controlFD }
            guard fd >= 0 else { return .failure(SupervisorError(message: "the worker is not running")) }
            do throws(ControlChannel.Failure) {
                return .success(try ControlChannel(fd: fd).exchange(request, sending: fds, timeout: timeout))
            } catch {
                if case .timedOut = error {
                    // A late answer would be taken for the next request's: start afresh.
                    lock.withLock {
                        if controlFD == fd { shutdown(fd, Int32(SHUT_RDWR)) }
                    }
                }
                return .failure(SupervisorError(message: "\(error)"))
            }
        }
        return try answer.get()
    }
}

