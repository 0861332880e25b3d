import Foundation
import IOFilterPosix
import Logging

/// What the worker executable is started to do (its first argument).
public enum WorkerMode: String, Sendable {
    /// Serve a VM's disks (or run a maintenance task on them): configuration on stdin.
    case serve
    /// Run a plug-in's partner daemon: configuration on stdin.
    case daemon
    /// Run a VM's clients' TLS sessions, out of its worker's reach: configuration on stdin.
    case tlsTerminator = "tls-terminator"
    /// Print a plug-in's manifest.
    case validate
    /// Call one of a plug-in's management operations.
    case call
}

/// The fds a sandboxed process is handed, and the number each has there: 3, 4, … in
/// the order they were handed. The one place those numbers are worked out; each
/// configuration records the number `hand` gave it.
public struct HandedOverFDs {
    public private(set) var pairs: [(source: Int32, number: Int32)] = []

    public init() {}

    /// Hands `fd` over; returns its number in the child.
    public mutating func hand(_ fd: Int32) -> Int32 {
        let number = Int32(3 + pairs.count)
        pairs.append((fd, number))
        return number
    }
}

/// One start of the worker executable: the single description every sandboxed process
/// of the host (a VM's worker, a maintenance worker, a partner daemon, the validator)
/// is started from. Each supplies only what differs: its mode, its configuration, the
/// fds it is handed.
public struct SandboxedLaunch {
    public var mode: WorkerMode
    public var arguments: [String] = []
    /// Written on the child's stdin (JSON), which is then closed.
    public var configuration: Data?
    public var fds = HandedOverFDs()
    /// IOFILTER_LOG_LEVEL for the child (nil: its default).
    public var logLevel: String?
    /// The line the child prints once it serves (or, for a maintenance task, is done).
    public var readyLine = "READY"
    /// The group the child runs in: born there on cgroup v2 (clone3); else it moves
    /// itself there as it starts, before it confines itself (its configuration names
    /// the group: see `CgroupMembership.join`).
    public var cgroup: WorkerCgroup?
    public var executable: String

    public init(mode: WorkerMode, arguments: [String] = [], executable: String = WorkerExecutable.path()) {
        self.mode = mode
        self.arguments = arguments
        self.executable = executable
    }

    /// Starts the child (in its group, where the kernel allows): its fds at their
    /// numbers, stdout captured.
    public func spawn() throws(SystemError) -> ChildProcess {
        var environment = WorkerExecutable.environment
        if let logLevel { environment["IOFILTER_LOG_LEVEL"] = logLevel }
        let child = try ChildProcess(
            executable: executable, arguments: [mode.rawValue] + arguments, handOver: fds.pairs.map { ($0.source, $0.number) },
            stdin: configuration.map(Array.init) ?? nil, stdout: .capture, environment: environment,
            cgroup: cgroup.flatMap { $0.version == 2 ? $0.directories.first : nil })
        return child
    }

    /// Runs the child to its end, at most `timeout` seconds (then it is killed), and
    /// returns its exit status (nil: killed for the time-out) and everything it printed.
    public func run(timeout: Double) throws(SystemError) -> (status: Int32?, output: [UInt8]) {
        let child = try spawn()
        // Read on another thread so that a child that fills the pipe cannot block us.
        let output = Guarded<[UInt8]?>(nil)
        let drained = ConditionLock()
        startThread(name: "child-output") {
            let bytes = child.readAllOutput()
            drained.withLock {
                output.withLock { $0 = bytes }
                drained.broadcast()
            }
        }
        let status = child.wait(timeout: timeout)
        if status == nil {
            child.signal(SIGKILL)
            _ = child.wait()
        }
        let bytes = drained.withLock { () -> [UInt8] in
            while output.withLock({ $0 }) == nil { drained.wait() }
            return output.withLock { $0! }
        }
        return (status, bytes)
    }
}

/// Reads a child's stdout on a thread until its ready line (or an ERROR line, or EOF),
/// then keeps draining it so that a plug-in printing to stdout never blocks on a full
/// pipe.
final class ReadyLine: @unchecked Sendable {
    // @unchecked: `state` and `error` are guarded by `lock`.
    private let lock = ConditionLock()
    private var state: Bool?
    private var error: String?

    init(process: ChildProcess, line readyLine: String) {
        startThread(name: "child-stdout") { [self] in
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

    /// Whether the child announced itself within `timeout`, and the ERROR it printed.
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
