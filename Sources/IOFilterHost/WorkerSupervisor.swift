import Foundation
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// Runs one VM's worker process and keeps it running.
///
/// The supervisor owns the listening sockets and hands them to each worker it starts,
/// so a restarted worker serves the same addresses and clients simply reconnect. A
/// worker that dies is logged with its cause and restarted with exponential backoff.
public final class WorkerSupervisor: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `lock`.
    public let configuration: WorkerConfiguration
    let listenFDs: [Int32]
    let workerPath: String
    let logger: Logger
    let readyTimeout: Double

    private let lock = ConditionLock()
    private var child: ChildProcess?
    /// The host's end of the current worker's control channel.
    private var controlFD: Int32 = -1
    /// One control request at a time.
    private let controlLock = ConditionLock()
    private var stopping = false
    private var restartCount = 0
    private var readyGeneration = 0

    /// A worker whose heartbeat is older than this is killed (and restarted): it is
    /// frozen or deadlocked, or a filter stopped the thread that beats. By default the
    /// watchdog's limit, at least 2 s; 0 turns the check off.
    public var heartbeatTimeout: Double
    /// The current worker's heartbeat page.
    private var heartbeat: Heartbeat?

    /// Told (on the supervising thread) each time the worker ends unasked, with what
    /// happened ("worker 123 killed by SIGSEGV (filters: …); restarting in 0.1s"), and
    /// each time a replacement serves: for the host's event log.
    public var onEvent: (@Sendable (_ kind: SupervisorEvent, _ message: String) -> Void)?

    public var minimumBackoff = 0.1
    public var maximumBackoff = 10.0
    /// A worker that ran this long resets the backoff.
    public var stableAfter = 30.0

    /// The worker's own cgroup, if the host can make one.
    private let cgroup: WorkerCgroup?

    /// Connects a filter instance to its plug-in's partner daemon, by plug-in name
    /// (the host's daemons); set before `start`. Without it filters get no channel.
    public var daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?

    /// - Parameter listenFDs: one listening socket per disk, in the order of
    ///   `configuration.disks`; the worker gets them as fds 3, 4, …
    public init(configuration: WorkerConfiguration, listenFDs: [Int32], workerPath: String = WorkerExecutable.path(),
                readyTimeout: Double = 60, logger: Logger) {
        var configuration = configuration
        var logger = logger
        logger[metadataKey: "vm"] = "\(configuration.vmName)"
        // Room for two threads per client of every disk besides the filters' own.
        let clients = (configuration.maxConnections ?? 16) * max(configuration.disks.count, 1)
        let limits = WorkerCgroupLimits(memory: configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit,
                                        tasks: WorkerCgroupLimits.defaultTasks + 2 * clients,
                                        cpuWeight: configuration.cpuWeight ?? WorkerCgroupLimits.defaultCPUWeight)
        switch WorkerCgroup.create(name: configuration.vmName, limits: limits) {
        case .success(let made):
            cgroup = made
            configuration.cgroupProcs = made.procsFiles
            configuration.cgroupSummary = "cgroup v\(made.version): memory \(limits.memory >> 20) MiB, \(limits.tasks) tasks, CPU weight \(limits.cpuWeight)"
        case .failure(let reason):
            cgroup = nil
            logger.warning("no cgroup for the worker (\(reason)): its memory is limited by RLIMIT_AS alone, its threads and CPU not at all")
        }
        for index in configuration.disks.indices { configuration.disks[index].listenFD = Int32(3 + index) }
        configuration.controlFD = Int32(3 + configuration.disks.count)
        configuration.heartbeatFD = Int32(4 + configuration.disks.count)
        configuration.brokerFD = Int32(5 + configuration.disks.count)
        self.configuration = configuration
        self.listenFDs = listenFDs
        self.workerPath = workerPath
        self.readyTimeout = readyTimeout
        heartbeatTimeout = configuration.watchdogSeconds > 0 ? max(configuration.watchdogSeconds, 2) : 0
        self.logger = logger
    }

    public var pid: pid_t? { lock.withLock { child?.pid } }
    public var restarts: Int { lock.withLock { restartCount } }

    /// Starts the worker and waits until it serves; throws if it dies first.
    ///
    /// The worker is spawned from the supervising thread, which lives as long as the
    /// worker is supervised: the kernel's parent-death signal follows the thread that
    /// spawned a process, so a worker spawned from a short-lived thread (an API
    /// request's) would be killed when that thread ends.
    public func start() throws {
        final class Outcome: @unchecked Sendable {
            // @unchecked: guarded by `lock`.
            let lock = ConditionLock()
            var result: Result<(ChildProcess, (ready: Bool, error: String?)), any Error>?
        }
        let outcome = Outcome()
        startThread(name: "supervise") { [self] in
            let launched = Result { try launch() }
            if case .success(let (process, ready)) = launched, ready.ready { lock.withLock { child = process } }
            outcome.lock.withLock {
                outcome.result = launched
                outcome.lock.broadcast()
            }
            if case .success(let (process, ready)) = launched, ready.ready { supervise(process) }
        }
        let launched = outcome.lock.withLock {
            while outcome.result == nil { outcome.lock.wait() }
            return outcome.result!
        }
        let (process, ready): (ChildProcess, (ready: Bool, error: String?))
        do {
            (process, ready) = try launched.get()
        } catch {
            cgroup?.remove()
            throw error
        }
        guard ready.ready else {
            defer { cgroup?.remove() }
            let status = process.wait(timeout: 5) ?? { process.signal(SIGKILL); return process.wait() ?? -1 }()
            let reason = ready.error.map { ": \($0)" } ?? ""
            throw SupervisorError(message: "the worker for \(configuration.vmName) \(ChildProcess.describe(status: status)) before it was ready\(reason)")
        }
    }

    /// Waits until a worker newer than `generation` is ready (tests, restarts).
    public func waitUntilReady(after generation: Int, timeout: Double) -> Bool {
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while readyGeneration <= generation {
                let now = monotonicNanoseconds()
                if now >= deadline || !lock.wait(nanoseconds: deadline - now) && readyGeneration <= generation { return false }
            }
            return true
        }
    }

    public var generation: Int { lock.withLock { readyGeneration } }

    /// Asks the worker to close its filters and disks, then kills it if it lingers.
    public func stop(timeout: Double = 20) {
        let process: ChildProcess? = lock.withLock {
            stopping = true
            lock.broadcast()
            return child
        }
        defer {
            // Wait for a control request in progress to end before closing its fd.
            controlLock.withLock {
                lock.withLock {
                    if controlFD >= 0 { close(controlFD) }
                    controlFD = -1
                }
            }
        }
        defer { cgroup?.remove() }
        guard let process else { return }
        process.signal(SIGTERM)
        if process.wait(timeout: timeout) == nil {
            logger.warning("worker \(process.pid) did not stop within \(timeout)s; killing it")
            process.signal(SIGKILL)
            _ = process.wait()
        }
    }

    private func launch() throws -> (ChildProcess, (ready: Bool, error: String?)) {
        let input = try JSONEncoder().encode(configuration)
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            throw SystemError("socketpair")
        }
        defer { close(pair[1]) }
        let beat = try Heartbeat()
        let broker = try TargetBroker.start(logger: logger, answer: brokerAnswer())
        defer { close(broker) }
        let handOver = listenFDs.enumerated().map { ($0.element, Int32(3 + $0.offset)) }
            + [(pair[1], configuration.controlFD!), (beat.fd, configuration.heartbeatFD!), (broker, configuration.brokerFD!)]
        let process: ChildProcess
        do {
            process = try ChildProcess(
                executable: workerPath, arguments: ["serve"], handOver: handOver, stdin: Array(input), stdout: .capture,
                environment: WorkerExecutable.environment(logLevel: configuration.logLevel))
        } catch {
            close(pair[0])
            throw error
        }
        if let cgroup, !cgroup.add(process.pid) {
            logger.warning("cannot move worker \(process.pid) into its cgroup: \(String(cString: strerror(errno)))")
        }
        let ready = WaitForLine(process: process)
        let outcome = ready.wait(timeout: readyTimeout)
        lock.withLock {
            heartbeat = beat
            if controlFD >= 0 { close(controlFD) }
            controlFD = pair[0]
            if outcome.ready {
                readyGeneration += 1
                lock.broadcast()
            }
        }
        if outcome.ready { logger.info("worker \(process.pid) is serving") }
        return (process, outcome)
    }

    /// The worker's broker opens the targets its policies name and connects its
    /// filters to the daemons of their own plug-ins.
    private func brokerAnswer() -> TargetBroker.Answer {
        let targets = TargetBroker.opening(configuration.namedTargets)
        let plugins = Set(configuration.disks.flatMap { $0.filters.map(\.manifest.name) })
        let daemons = daemonChannels
        return { spec in
            guard spec.hasPrefix(BrokerRequest.daemonChannelPrefix) else { return targets(spec) }
            let plugin = String(spec.dropFirst(BrokerRequest.daemonChannelPrefix.count))
            guard plugins.contains(plugin) else { return .failure(TargetBroker.Failure(EACCES, "no filter of this VM is \(plugin)")) }
            return daemons?(plugin) ?? .failure(TargetBroker.Failure(ECONNREFUSED, "\(plugin) has no daemon on this host"))
        }
    }

    /// Sends one request over the current worker's control channel and waits (at most
    /// `timeout` seconds) for its answer.
    public func control(_ request: WorkerControlRequest, timeout: Double = 10) throws -> WorkerControlResponse {
        try controlLock.withLock { () throws -> WorkerControlResponse in
            let fd = lock.withLock { controlFD }
            guard fd >= 0, let line = try? JSONEncoder().encode(request) else { throw SupervisorError(message: "the worker is not running") }
            do {
                try FileDescriptorIO.writeAll(fd, Array(line) + [UInt8(ascii: "\n")])
            } catch {
                throw SupervisorError(message: "the worker's control channel is closed (is it restarting?)")
            }
            var answer: [UInt8] = []
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while answer.last != UInt8(ascii: "\n") {
                let now = monotonicNanoseconds()
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard now < deadline, poll(&poller, 1, Int32((deadline - now) / 1_000_000) + 1) > 0 else {
                    // A late answer would be taken for the next request's: start afresh.
                    lock.withLock {
                        if controlFD == fd { shutdown(fd, Int32(SHUT_RDWR)) }
                    }
                    throw SupervisorError(message: "the worker did not answer within \(timeout)s")
                }
                var chunk = [UInt8](repeating: 0, count: 64 << 10)
                let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                guard count > 0 else { throw SupervisorError(message: "the worker closed its control channel") }
                answer += chunk[..<count]
            }
            guard let response = try? JSONDecoder().decode(WorkerControlResponse.self, from: Data(answer.dropLast())) else {
                throw SupervisorError(message: "the worker sent a malformed control answer")
            }
            return response
        }
    }

    private func supervise(_ first: ChildProcess) {
        var process = first
        var backoff = minimumBackoff
        while true {
            let startedAt = monotonicNanoseconds()
            let oomKillsBefore = cgroup?.oomKills ?? 0
            let status = waitWatchingHeartbeat(process)
            cgroup?.killAll()
            if lock.withLock({ stopping }) {
                logger.info("worker \(process.pid) stopped: \(ChildProcess.describe(status: status))")
                return
            }
            let filters = Set(configuration.disks.flatMap { $0.filters.map(\.manifest.name) }).sorted()
            let running = filters.isEmpty ? "" : " (filters: \(filters.joined(separator: ", ")))"
            if let cgroup, cgroup.oomKills > oomKillsBefore {
                let limit = "worker \(process.pid) reached its memory limit of \(cgroup.limits.memory >> 20) MiB\(running): the kernel killed it"
                logger.critical("\(limit)")
                onEvent?(.workerOutOfMemory, limit)
            }
            let exit = "worker \(process.pid) \(ChildProcess.describe(status: status))\(running); restarting in \(backoff)s"
            logger.error("\(exit)")
            onEvent?(.workerExited, exit)
            if Double(monotonicNanoseconds() - startedAt) / 1e9 > stableAfter { backoff = minimumBackoff }
            while true {
                let stopNow = lock.withLock { () -> Bool in
                    if !stopping { _ = lock.wait(nanoseconds: UInt64(backoff * 1e9)) }
                    return stopping
                }
                if stopNow { return }
                backoff = min(backoff * 2, maximumBackoff)
                do {
                    let (next, ready) = try launch()
                    lock.withLock {
                        child = next
                        restartCount += 1
                    }
                    process = next
                    if ready.ready {
                        onEvent?(.workerRestarted, "worker \(next.pid) serves again after \(restarts) restart(s)")
                    } else {
                        logger.error("restarted worker \(next.pid) did not become ready")
                        next.signal(SIGKILL)
                    }
                    break
                } catch {
                    logger.error("cannot restart the worker: \(error); retrying in \(backoff)s")
                }
            }
        }
    }
}

extension WorkerSupervisor {
    /// Waits for the worker to exit, killing it if its heartbeat stops.
    private func waitWatchingHeartbeat(_ process: ChildProcess) -> Int32 {
        HeartbeatWatch.wait(for: process, beat: lock.withLock { heartbeat }, timeout: heartbeatTimeout, logger: logger, what: "worker") {
            lock.withLock { stopping }
        }
    }
}

/// What a supervisor reports to its host's event log.
public enum SupervisorEvent: String, Sendable {
    case workerExited = "worker-exited"
    case workerRestarted = "worker-restarted"
    case workerOutOfMemory = "worker-out-of-memory"
}

public struct SupervisorError: Error, CustomStringConvertible {
    public let message: String
    /// A maintenance worker's filter vetoed the event it delivered.
    public var vetoed = false
    public var description: String { message }
}

/// Reads the worker's stdout on a thread until READY (or an ERROR line, or EOF), then
/// keeps draining it so that a plug-in printing to stdout never blocks on a full pipe.
final class WaitForLine: @unchecked Sendable {
    // @unchecked: `state` and `error` are guarded by `lock`.
    private let lock = ConditionLock()
    private var state: Bool?
    private var error: String?

    init(process: ChildProcess, readyLine: String = "READY") {
        startThread(name: "worker-stdout") { [self] in
            var announced = false
            while let line = process.readLine() {
                if !announced && line == readyLine {
                    announced = true
                    finish(true)
                } else if !announced && line.hasPrefix("ERROR ") {
                    lock.withLock { error = String(line.dropFirst(6)) }
                }
            }
            if !announced { finish(false) }
        }
    }

    private func finish(_ ready: Bool) {
        lock.withLock {
            state = ready
            lock.broadcast()
        }
    }

    func wait(timeout: Double) -> (ready: Bool, error: String?) {
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while state == nil {
                let now = monotonicNanoseconds()
                if now >= deadline { return (false, error ?? "no answer within \(timeout)s") }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return (state ?? false, error)
        }
    }
}

/// Runs a short-lived worker for a maintenance task (attach or detach filters on disks
/// no VM is using) and waits for it to finish.
public enum MaintenanceWorker {
    public static func run(_ configuration: WorkerConfiguration, timeout: Double = 300, logger: Logger) throws(SupervisorError) {
        precondition(configuration.task != .serve)
        var configuration = configuration
        configuration.controlFD = nil
        configuration.heartbeatFD = nil
        configuration.brokerFD = 3
        for index in configuration.disks.indices { configuration.disks[index].listenFD = -1 }
        guard let input = try? JSONEncoder().encode(configuration) else { throw SupervisorError(message: "cannot encode the configuration") }
        let process: ChildProcess
        do {
            let broker = try TargetBroker.start(allowed: configuration.namedTargets, logger: logger)
            defer { close(broker) }
            process = try ChildProcess(
                executable: WorkerExecutable.path(), arguments: ["serve"], handOver: [(broker, 3)], stdin: Array(input),
                stdout: .capture, environment: WorkerExecutable.environment(logLevel: configuration.logLevel))
        } catch {
            throw SupervisorError(message: "cannot start a worker: \(error)")
        }
        let outcome = WaitForLine(process: process, readyLine: "DONE").wait(timeout: timeout)
        guard let status = process.wait(timeout: outcome.ready ? 30 : 1) else {
            process.signal(SIGKILL)
            _ = process.wait()
            throw SupervisorError(message: "the worker did not finish within \(timeout)s")
        }
        guard outcome.ready, ChildProcess.exitCode(status: status) == 0 else {
            throw SupervisorError(message: outcome.error ?? "the worker \(ChildProcess.describe(status: status))",
                                  vetoed: ChildProcess.exitCode(status: status) == WorkerTask.vetoedExitStatus)
        }
    }
}
