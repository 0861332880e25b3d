import Foundation
import IOFilterModel
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
    private var stopping = false
    private var restartCount = 0
    private var readyGeneration = 0

    public var minimumBackoff = 0.1
    public var maximumBackoff = 10.0
    /// A worker that ran this long resets the backoff.
    public var stableAfter = 30.0

    /// - Parameter listenFDs: one listening socket per disk, in the order of
    ///   `configuration.disks`; the worker gets them as fds 3, 4, …
    public init(configuration: WorkerConfiguration, listenFDs: [Int32], workerPath: String = WorkerExecutable.path(),
                readyTimeout: Double = 60, logger: Logger) {
        var configuration = configuration
        for index in configuration.disks.indices { configuration.disks[index].listenFD = Int32(3 + index) }
        self.configuration = configuration
        self.listenFDs = listenFDs
        self.workerPath = workerPath
        self.readyTimeout = readyTimeout
        var logger = logger
        logger[metadataKey: "vm"] = "\(configuration.vmName)"
        self.logger = logger
    }

    public var pid: pid_t? { lock.withLock { child?.pid } }
    public var restarts: Int { lock.withLock { restartCount } }

    /// Starts the worker and waits until it serves; throws if it dies first.
    public func start() throws {
        let (process, ready) = try launch()
        guard ready else {
            let status = process.wait(timeout: 5) ?? { process.signal(SIGKILL); return process.wait() ?? -1 }()
            throw SupervisorError(message: "the worker for \(configuration.vmName) \(ChildProcess.describe(status: status)) before it was ready")
        }
        lock.withLock { child = process }
        startThread(name: "supervise") { [self] in supervise(process) }
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
        guard let process else { return }
        process.signal(SIGTERM)
        if process.wait(timeout: timeout) == nil {
            logger.warning("worker \(process.pid) did not stop within \(timeout)s; killing it")
            process.signal(SIGKILL)
            _ = process.wait()
        }
    }

    private func launch() throws -> (ChildProcess, Bool) {
        let input = try JSONEncoder().encode(configuration)
        let handOver = listenFDs.enumerated().map { ($0.element, Int32(3 + $0.offset)) }
        let process = try ChildProcess(
            executable: workerPath, arguments: ["serve"], handOver: handOver, stdin: Array(input), stdout: .capture,
            environment: WorkerExecutable.environment.merging(["IOFILTER_LOG_LEVEL": configuration.logLevel]) { $1 })
        let ready = WaitForLine(process: process)
        let sawReady = ready.wait(timeout: readyTimeout)
        if sawReady {
            lock.withLock {
                readyGeneration += 1
                lock.broadcast()
            }
            logger.info("worker \(process.pid) is serving")
        }
        return (process, sawReady)
    }

    private func supervise(_ first: ChildProcess) {
        var process = first
        var backoff = minimumBackoff
        while true {
            let startedAt = monotonicNanoseconds()
            let status = process.wait() ?? -1
            if lock.withLock({ stopping }) {
                logger.info("worker \(process.pid) stopped: \(ChildProcess.describe(status: status))")
                return
            }
            logger.error("worker \(process.pid) \(ChildProcess.describe(status: status)); restarting in \(backoff)s")
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
                    if !ready {
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

public struct SupervisorError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// Reads the worker's stdout on a thread until READY (or EOF), then keeps draining it
/// so that a plug-in printing to stdout never blocks on a full pipe.
private final class WaitForLine: @unchecked Sendable {
    // @unchecked: `state` is guarded by `lock`.
    private let lock = ConditionLock()
    private var state: Bool?

    init(process: ChildProcess) {
        startThread(name: "worker-stdout") { [self] in
            var announced = false
            while let line = process.readLine() {
                if !announced && line == "READY" {
                    announced = true
                    finish(true)
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

    func wait(timeout: Double) -> Bool {
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while state == nil {
                let now = monotonicNanoseconds()
                if now >= deadline { return false }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return state ?? false
        }
    }
}
