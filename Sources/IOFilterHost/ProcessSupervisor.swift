import Foundation
import IOFilterModel
import IOFilterPosix
import Logging

/// How a supervisor restarts the process it keeps running.
public struct RestartPolicy: Sendable {
    /// The first wait after an exit; it doubles with each exit in a row.
    public var minimumBackoff = 0.1
    /// The longest wait between two starts.
    public var maximumBackoff = 10.0
    /// A process that ran this long before it exited starts the backoff afresh.
    public var stableAfter = 30.0
    /// A process whose heartbeat is older than this is killed (frozen, deadlocked, or
    /// its threads stopped by a plug-in); 0 turns the check off.
    public var heartbeatTimeout = 10.0
    /// A process whose heartbeat says a request has been in flight longer than this
    /// (stuck in a filter, whose own watchdog a filter may have stopped) is killed; 0
    /// turns the check off.
    public var requestTimeout = 0.0
    /// How long a start may take before the process counts as failed.
    public var readyTimeout = 60.0

    public init() {}
}

/// One start that a supervisor's owner prepared: the launch, the heartbeat page it
/// hands over, and what to do once the attempt is decided.
public struct PreparedLaunch {
    public var launch: SandboxedLaunch
    public var heartbeat: Heartbeat?
    /// Called exactly once per attempt, on the supervising thread: with the process
    /// (nil if it could not be spawned) and whether it announced itself ready. Closes
    /// the child's ends of what was handed over and keeps the host's.
    public var finish: (_ process: ChildProcess?, _ ready: Bool) -> Void

    public init(launch: SandboxedLaunch, heartbeat: Heartbeat?, finish: @escaping (ChildProcess?, Bool) -> Void = { _, _ in }) {
        self.launch = launch
        self.heartbeat = heartbeat
        self.finish = finish
    }
}

/// What a supervisor reports to its host's event log: "worker-exited",
/// "daemon-restarted", "worker-out-of-memory", …
public struct SupervisorEvent: Sendable, Equatable {
    public enum Kind: String, Sendable {
        case exited, restarted
        case outOfMemory = "out-of-memory"
        /// Its memory crossed 80 % of its cgroup's limit (told once per crossing).
        case memoryHigh = "memory-high"
    }
    /// What is supervised: "worker", "daemon".
    public let role: String
    public let kind: Kind

    public var rawValue: String { "\(role)-\(kind.rawValue)" }
}

public struct SupervisorError: Error, CustomStringConvertible, Sendable {
    public let message: String
    /// A maintenance worker's filter vetoed the event it delivered.
    public var vetoed = false
    public var description: String { message }

    public init(message: String, vetoed: Bool = false) {
        self.message = message
        self.vetoed = vetoed
    }
}

/// The one supervised-process core: starts a sandboxed process from a prepared launch
/// on a thread of its own, watches its heartbeat and its cgroup, and restarts it with
/// backoff when it exits unasked, until `stop`. Workers and partner daemons supply
/// only what differs (their launch, their hand-over).
///
/// Every start happens on the supervising thread, which lives as long as the process
/// is supervised: the kernel's parent-death signal follows the thread that spawned a
/// process, so one spawned from a short-lived thread (an API request's) would be
/// killed when that thread ends.
public final class ProcessSupervisor: @unchecked Sendable {
    // @unchecked: mutable state is guarded by `lock`.
    public let role: String
    private let logger: Logger
    private let cgroup: WorkerCgroup?
    private let prepare: () throws -> PreparedLaunch
    /// Follows the pid in messages: whose it is (" of com.acme.replicate").
    private let owner: String
    /// Appended to an exit's message: what ran in it (" (filters: a, b)").
    private let detail: String
    /// How a failed first start names the process ("worker for vm1").
    private let subject: String

    private let lock = ConditionLock()
    private var policyValue: RestartPolicy
    private var child: ChildProcess?
    private var heartbeat: Heartbeat?
    private var stateValue = SupervisedState.starting
    private var restartCount = 0
    private var readyGeneration = 0
    private var lastErrorValue: String?
    /// When the process last ended unasked (monotonic nanoseconds).
    private var lastExitNanoseconds: UInt64?
    /// How long the last start took, from preparing it to the ready line (seconds).
    private var lastStartSecondsValue: Double?
    private var stopping = false
    private var eventHandler: (@Sendable (SupervisorEvent, String) -> Void)?
    /// The process to supervise first, which an earlier host started.
    private var adoption: (process: ChildProcess, heartbeat: Heartbeat?)?
    /// Where each process that serves is recorded, and what it was started from, for a
    /// later host to adopt it (nil: it dies with this host).
    private let record: (path: String, key: String)?

    /// - Parameters:
    ///   - role: "worker", "daemon": names the process in logs and events.
    ///   - prepare: builds one start (called on the supervising thread before each).
    ///   - record: where to record each process that serves, with the key of what it
    ///     serves, for the next host to adopt it (see `ProcessRecord`).
    public init(role: String, owner: String = "", subject: String? = nil, policy: RestartPolicy, cgroup: WorkerCgroup?,
                detail: String = "", record: (path: String, key: String)? = nil, logger: Logger,
                prepare: @escaping () throws -> PreparedLaunch) {
        self.record = record
        self.role = role
        self.owner = owner
        self.subject = subject ?? role + owner
        self.policyValue = policy
        self.cgroup = cgroup
        self.detail = detail
        self.logger = logger
        self.prepare = prepare
    }

    public var policy: RestartPolicy {
        get { lock.withLock { policyValue } }
        set { lock.withLock { policyValue = newValue } }
    }

    /// Told (on the supervising thread) when the process ends unasked, when it serves
    /// again, and when the kernel killed it for memory.
    public var onEvent: (@Sendable (SupervisorEvent, String) -> Void)? {
        get { lock.withLock { eventHandler } }
        set { lock.withLock { eventHandler = newValue } }
    }

    public var pid: pid_t? { lock.withLock { stateValue == .running ? child?.pid : nil } }
    public var restarts: Int { lock.withLock { restartCount } }
    /// Seconds since the process last ended unasked, if it ever did.
    public var secondsSinceLastExit: Double? {
        lock.withLock { lastExitNanoseconds.map { Double(monotonicNanoseconds() - $0) / 1e9 } }
    }
    public var state: SupervisedState { lock.withLock { stateValue } }
    /// Seconds from preparing the last start that served to its ready line: the spawn,
    /// the process's own start and confinement, its plug-ins and disks opened.
    public var lastStartSeconds: Double? { lock.withLock { lastStartSecondsValue } }
    /// Why it last exited or could not start ("killed by SIGKILL").
    public var lastError: String? { lock.withLock { lastErrorValue } }
    /// How many times a process of this supervisor has announced itself ready.
    public var generation: Int { lock.withLock { readyGeneration } }

    /// Starts supervising and waits for the first start to be decided.
    ///
    /// - Parameter mustServe: true (a VM's worker): a first start that fails throws,
    ///   with why, and nothing is left running. False (a daemon): a failed first start
    ///   is retried with backoff like any exit, and `state`/`lastError` tell.
    public func start(mustServe: Bool) throws(SupervisorError) {
        let firstOutcome = Guarded<Result<Void, SupervisorError>?>(nil)
        let decided = ConditionLock()
        startThread(name: "supervise-\(role)") { [self] in
            supervise(mustServe: mustServe) { outcome in
                decided.withLock {
                    firstOutcome.withLock { $0 = outcome }
                    decided.broadcast()
                }
            }
        }
        let outcome = decided.withLock { () -> Result<Void, SupervisorError> in
            while firstOutcome.withLock({ $0 }) == nil { decided.wait() }
            return firstOutcome.withLock { $0! }
        }
        if case .failure(let error) = outcome {
            cgroup?.remove()
            throw error
        }
    }

    /// Whether each process that serves is recorded at once; false while it stands by
    /// (a live upgrade: its predecessor serves until the hand-over), until `tookOver`.
    public var recording: Bool {
        get { lock.withLock { recordingValue } }
        set { lock.withLock { recordingValue = newValue } }
    }
    private var recordingValue = true

    /// The process serves as the VM's (or plug-in's) own now: recorded for the next host.
    public func tookOver() {
        recording = true
        if let process = lock.withLock({ child }) { writeRecord(process) }
    }

    private func writeRecord(_ process: ChildProcess) {
        guard let record, let startTime = ChildProcess.startTime(of: process.pid) else { return }
        ProcessRecord(pid: process.pid, startTime: startTime, key: record.key).write(to: record.path)
    }

    /// Supervises a process an earlier host started (it serves already), as if it had
    /// started it: restarted like any other when it ends unasked.
    public func start(adopting process: ChildProcess, heartbeat: Heartbeat?) throws(SupervisorError) {
        lock.withLock { adoption = (process, heartbeat) }
        try start(mustServe: true)
    }

    /// Waits until a process newer than `generation` is ready (tests, restarts).
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

    /// Stops the process: SIGTERM, SIGKILL after `timeout`, then empties and removes
    /// its cgroup. No restart follows.
    public func stop(timeout: Double) {
        let process: ChildProcess? = lock.withLock {
            stopping = true
            lock.broadcast()
            return child
        }
        if let process {
            process.signal(SIGTERM)
            if process.wait(timeout: timeout) == nil {
                logger.warning("\(role) \(process.pid) did not stop within \(timeout)s; killing it")
                process.signal(SIGKILL)
                _ = process.wait()
            }
        }
        cgroup?.killAll()
        cgroup?.remove()
        if let record, let process { ProcessRecord.remove(record.path, ifOf: process.pid) }
        lock.withLock { stateValue = .stopped }
    }

    private var isStopping: Bool { lock.withLock { stopping } }

    private func report(_ kind: SupervisorEvent.Kind, _ message: String) {
        lock.withLock { eventHandler }?(SupervisorEvent(role: role, kind: kind), message)
    }

    /// One start: spawned, moved into its cgroup, waited for. Returns the process (nil
    /// if it could not be spawned) and whether it is ready, or why not.
    private func attempt() -> (process: ChildProcess?, ready: Bool, error: String?) {
        if let adopted = lock.withLock({ () -> (process: ChildProcess, heartbeat: Heartbeat?)? in
            defer { adoption = nil }
            return adoption
        }) {
            lock.withLock {
                child = adopted.process
                heartbeat = adopted.heartbeat
                stateValue = .running
                readyGeneration += 1
                lock.broadcast()
            }
            logger.info("\(role) \(adopted.process.pid) adopted: it serves on, started by an earlier host")
            return (adopted.process, true, nil)
        }
        let began = monotonicNanoseconds()
        let prepared: PreparedLaunch
        do {
            prepared = try prepare()
        } catch {
            return (nil, false, "cannot prepare its start: \(error)")
        }
        let process: ChildProcess
        do {
            var launch = prepared.launch
            launch.cgroup = cgroup
            process = try launch.spawn()
        } catch {
            prepared.finish(nil, false)
            return (nil, false, "cannot start it: \(error)")
        }
        if let cgroup, cgroup.version == 2 {
            logger.debug("\(role) \(process.pid) \(process.bornInCgroup ? "was born in its cgroup (clone3)" : "joins its cgroup itself: the kernel would not start it there")")
        }
        // Known at once, so that a stop while it starts reaches it.
        lock.withLock {
            child = process
            heartbeat = prepared.heartbeat
        }
        let outcome = ReadyLine(process: process, line: prepared.launch.readyLine).wait(timeout: policy.readyTimeout)
        prepared.finish(process, outcome.ready)
        // Told before anyone waiting for the new generation wakes: whoever sees it serve
        // finds the event recorded.
        if outcome.ready && restarts > 0 {
            report(.restarted, "\(role) \(process.pid)\(owner) serves again after \(restarts) restart(s)")
        }
        let took = Double(monotonicNanoseconds() - began) / 1e9
        lock.withLock {
            if outcome.ready {
                stateValue = .running
                readyGeneration += 1
                lastStartSecondsValue = took
            } else {
                lastErrorValue = outcome.error ?? "it did not start"
            }
            lock.broadcast()
        }
        if outcome.ready {
            logger.info("\(role) \(process.pid) is serving, \(Int((took * 1000).rounded())) ms after its start")
            if lock.withLock({ recordingValue }) { writeRecord(process) }
        }
        return (process, outcome.ready, outcome.error)
    }

    private func supervise(mustServe: Bool, decided: @escaping (Result<Void, SupervisorError>) -> Void) {
        var backoff = policy.minimumBackoff
        var first = true
        while !isStopping {
            let startedAt = monotonicNanoseconds()
            let oomKillsBefore = cgroup?.oomKills ?? 0
            let (process, ready, error) = attempt()
            var why: String
            if let process {
                if !ready {
                    // A process that printed ERROR exits by itself; one that hangs does not.
                    if process.wait(timeout: mustServe && first ? 5 : 1) == nil { process.signal(SIGKILL) }
                }
                if first {
                    first = false
                    if ready {
                        decided(.success(()))
                    } else if mustServe {
                        let status = process.wait() ?? -1
                        decided(.failure(SupervisorError(message:
                            "the \(subject) \(ChildProcess.describe(status: status)) before it was ready\(error.map { ": \($0)" } ?? "")")))
                        return
                    } else {
                        decided(.success(()))
                    }
                }
                let status = isStopping ? (process.wait() ?? -1) : waitWatchingHeartbeat(process)
                why = ChildProcess.describe(status: status)
                if !ready { why = "did not become ready (\(error ?? "?")), \(why)" }
            } else {
                why = error ?? "could not start"
                if first {
                    first = false
                    if mustServe {
                        decided(.failure(SupervisorError(message: "the \(subject) could not start: \(why)")))
                        return
                    }
                    decided(.success(()))
                }
            }
            // Once stopping, `stop` empties and removes the group itself.
            if isStopping { return }
            cgroup?.killAll()
            let pid = process.map { String($0.pid) } ?? "?"
            if let cgroup, cgroup.oomKills > oomKillsBefore {
                let message = "\(role) \(pid)\(owner) reached its memory limit of \(cgroup.limits.memory >> 20) MiB\(detail): the kernel killed it"
                logger.critical("\(message)")
                report(.outOfMemory, message)
            }
            // Decided before the message, so that the wait it names is the one taken.
            if Double(monotonicNanoseconds() - startedAt) / 1e9 > policy.stableAfter { backoff = policy.minimumBackoff }
            let message = "\(role) \(pid)\(owner) \(why)\(detail); restarting in \(backoff)s"
            logger.error("\(message)")
            lock.withLock {
                stateValue = .restarting
                lastErrorValue = why
                restartCount += 1
                lastExitNanoseconds = monotonicNanoseconds()
                lock.broadcast()
            }
            report(.exited, message)
            let stopNow = lock.withLock { () -> Bool in
                if !stopping { _ = lock.wait(nanoseconds: UInt64(backoff * 1e9)) }
                return stopping
            }
            if stopNow { return }
            backoff = min(backoff * 2, policy.maximumBackoff)
            lock.withLock { stateValue = .starting }
        }
    }

    /// Waits for the process to exit, killing it if its heartbeat stops.
    private func waitWatchingHeartbeat(_ process: ChildProcess) -> Int32 {
        let timeout = policy.heartbeatTimeout
        guard timeout > 0, let beat = lock.withLock({ heartbeat }) else { return process.wait() ?? -1 }
        let limit = UInt64(timeout * 1e9)
        let check = min(max(timeout / 4, 0.1), 1)
        let requestLimit = UInt64(policy.requestTimeout * 1e9)
        var memoryWarned = false
        while true {
            if let status = process.wait(timeout: check) { return status }
            if let cgroup, let used = cgroup.memoryInUse, cgroup.limits.memory > 0 {
                let share = Double(used) / Double(cgroup.limits.memory)
                if share >= 0.8 && !memoryWarned {
                    memoryWarned = true
                    let message = "\(role) \(process.pid)\(owner) uses \(used >> 20) MiB, \(Int(share * 100)) % of its memory limit of \(cgroup.limits.memory >> 20) MiB\(detail)"
                    logger.warning("\(message)")
                    report(.memoryHigh, message)
                } else if share < 0.7 {
                    memoryWarned = false  // told again when it next crosses 80 %
                }
            }
            let last = beat.lastBeat, now = monotonicNanoseconds()
            let oldest = beat.oldestInFlight, coarseNow = monotonicNanoseconds(coarse: true)
            if requestLimit > 0, oldest > 0, coarseNow > oldest, coarseNow - oldest > requestLimit, !isStopping {
                logger.critical(
                    "\(role) \(process.pid) has had a request in flight for \((Double(coarseNow - oldest) / 1e8).rounded() / 10)s, past \(policy.requestTimeout)s, and its own watchdog did not end it (a plug-in stopped it?); killing it")
                process.signal(SIGKILL)
                return process.wait() ?? -1
            }
            guard last > 0, now > last, now - last > limit, !isStopping else { continue }
            logger.critical(
                "\(role) \(process.pid) has not beaten for \((Double(now - last) / 1e8).rounded() / 10)s (frozen, deadlocked, or its threads stopped by a plug-in); killing it")
            process.signal(SIGKILL)
            return process.wait() ?? -1
        }
    }
}

/// A worker's or a daemon's supervisor: what differs (its launch) around one core.
public protocol SupervisesAProcess: AnyObject {
    /// The supervised-process core it runs its launches on.
    var core: ProcessSupervisor! { get }
}

extension SupervisesAProcess {
    /// Told (on the supervising thread) each time the process ends unasked, with what
    /// happened ("worker 123 killed by SIGSEGV (filters: …); restarting in 0.1s"), each
    /// time a replacement serves, and when the kernel killed it for memory: for the
    /// host's event log.
    public var onEvent: (@Sendable (_ kind: SupervisorEvent, _ message: String) -> Void)? {
        get { core.onEvent }
        set { core.onEvent = newValue }
    }

    public var restartPolicy: RestartPolicy {
        get { core.policy }
        set { core.policy = newValue }
    }
}
