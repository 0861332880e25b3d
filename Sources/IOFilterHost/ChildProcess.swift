import CSystemShims
import Glibc
import IOFilterPosix

/// A child started with posix_spawn (fork+exec, never a bare fork of this
/// multithreaded process), with chosen fds handed over at chosen numbers.
public final class ChildProcess: @unchecked Sendable {
    // @unchecked: `pid` and the pipe fds are fixed after spawn; `status` is guarded by `lock`.
    public let pid: pid_t
    /// The parent's end of the child's stdout, if captured.
    public let stdoutFD: Int32?
    /// Started inside the cgroup it was given (see `init`), so nobody need move it.
    public let bornInCgroup: Bool
    /// A process an earlier host started (see `init(adopting:startTime:)`): watched and
    /// signalled through this pidfd, since it is not our child.
    private let pidfd: Int32
    /// Our own child's pidfd, which polls readable once it has exited: a wait with a
    /// time-out sleeps in poll instead of polling waitpid (a thousand supervisors doing
    /// that every 20 ms kept an idle host busy). -1 if the kernel has no pidfds.
    private let exitWatch: Int32
    private let lock = ConditionLock()
    private var status: Int32?

    /// The status `wait` gives for an adopted process: how it ended is told to its
    /// parent (init, once the host that started it is gone), not to us.
    public static let adoptedExitStatus: Int32 = -2

    public enum Output { case inherit, capture, discard }

    /// - Parameters:
    ///   - handOver: (fd in this process, fd number in the child); ≥ 3.
    ///   - stdin: bytes written to the child's stdin, which is then closed.
    ///   - cgroup: a cgroup v2 group's directory the child is born in (clone3), where the
    ///     kernel allows; `bornInCgroup` says whether it was.
    public init(
        executable: String, arguments: [String], handOver: [(Int32, Int32)] = [], stdin: [UInt8]? = nil,
        stdout: Output = .capture, environment: [String: String] = [:], cgroup: String? = nil
    ) throws(SystemError) {
        var stdinPipe: [Int32] = [-1, -1]
        var stdoutPipe: [Int32] = [-1, -1]
        var temporaries: [Int32] = []
        defer { temporaries.forEach { close($0) } }
        // What the child's fds become: (source, number); source -1 is /dev/null.
        var placed: [(Int32, Int32)] = []
        if stdin != nil {
            guard iof_pipe_cloexec(&stdinPipe) == 0 else { throw SystemError("pipe") }
            placed.append((stdinPipe[0], 0))
        } else {
            placed.append((-1, 0))
        }
        switch stdout {
        case .capture:
            guard iof_pipe_cloexec(&stdoutPipe) == 0 else { throw SystemError("pipe") }
            placed.append((stdoutPipe[1], 1))
        case .discard:
            placed.append((-1, 1))
        case .inherit:
            break
        }
        // Copy each handed-over fd above any target number first, so that dup2 onto
        // its target never clobbers another source (and always clears close-on-exec).
        // Just above, not at a fixed high number: growing the fd table of a process
        // with threads waits for an RCU grace period, 10 to 20 ms of every start.
        let aboveTargets = (handOver.map(\.1).max() ?? 2) + 1
        for (source, target) in handOver {
            let copy = fcntl(source, F_DUPFD_CLOEXEC, aboveTargets)
            guard copy >= 0 else { throw SystemError("dup fd \(source)") }
            temporaries.append(copy)
            placed.append((copy, target))
        }

        var environmentLines = Self.currentEnvironment()
        for (key, value) in environment { environmentLines[key] = value }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environmentLines.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var child: pid_t = -1
        if let cgroup {
            // Any failure falls back on posix_spawn: a kernel before 5.7, a group the
            // kernel will not start a process in, or an exec that fails again there and
            // is reported from there.
            let group = open(cgroup, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            if group >= 0 {
                child = iof_spawn_into_cgroup(executable, argv, envp, placed.map(\.0), placed.map(\.1), Int32(placed.count), group)
                close(group)
            }
        }
        bornInCgroup = child > 0
        let rc = child > 0 ? 0 : Self.posixSpawn(executable, argv: argv, envp: envp, placed: placed, &child)
        // The child's ends are the child's alone now (a write to a dead child's stdin fails).
        if stdinPipe[0] >= 0 { close(stdinPipe[0]) }
        if stdoutPipe[1] >= 0 { close(stdoutPipe[1]) }
        guard rc == 0 else {
            if stdinPipe[1] >= 0 { close(stdinPipe[1]) }
            if stdoutPipe[0] >= 0 { close(stdoutPipe[0]) }
            throw SystemError("spawn \(executable)", code: rc)
        }
        pid = child
        pidfd = -1
        // Not reaped yet, so `child` is still this very process.
        exitWatch = max(iof_pidfd_open(child), -1)
        stdoutFD = stdoutPipe[0] >= 0 ? stdoutPipe[0] : nil
        if let stdin {
            // The child reads its input before doing anything else; a child that dies
            // first just makes this write fail.
            try? FileDescriptorIO.writeAll(stdinPipe[1], stdin)
            close(stdinPipe[1])
        }
    }

    /// A process an earlier host started and left running: `pid`, if it still is the
    /// process that started at `startTime` (clock ticks after boot, as /proc says), so
    /// that a pid reused since never counts as it.
    public init(adopting pid: pid_t, startTime: UInt64) throws(SystemError) {
        let fd = iof_pidfd_open(pid)
        guard fd >= 0 else { throw SystemError("pidfd_open \(pid)", code: -fd) }
        // Checked after the pidfd pins the process: it cannot be replaced in between.
        guard Self.startTime(of: pid) == startTime else {
            close(fd)
            throw SystemError("process \(pid) is another than the one recorded", code: ESRCH)
        }
        self.pid = pid
        pidfd = fd
        exitWatch = -1
        stdoutFD = nil
        bornInCgroup = false
    }

    /// posix_spawn with each (source, number) placed (source -1: /dev/null), default
    /// handling of the signals a host changes, and nothing blocked; 0 or an errno.
    private static func posixSpawn(_ executable: String, argv: [UnsafeMutablePointer<CChar>?], envp: [UnsafeMutablePointer<CChar>?],
                                   placed: [(Int32, Int32)], _ child: inout pid_t) -> Int32 {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGCHLD, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        for (source, number) in placed {
            if source < 0 {
                posix_spawn_file_actions_addopen(&actions, number, "/dev/null", number == 0 ? O_RDONLY : O_WRONLY, 0)
            } else {
                posix_spawn_file_actions_adddup2(&actions, source, number)
            }
        }
        return posix_spawn(&child, executable, &actions, &attributes, argv, envp)
    }

    deinit {
        if let stdoutFD { close(stdoutFD) }
        if pidfd >= 0 { close(pidfd) }
        if exitWatch >= 0 { close(exitWatch) }
    }

    /// When `pid` started, in clock ticks after boot (field 22 of /proc/PID/stat), or
    /// nil if there is no such process.
    public static func startTime(of pid: pid_t) -> UInt64? {
        ProcessStat(pid)?.startTime
    }

    /// Waits for the child to exit, at most `timeout` seconds (nil: forever). Returns
    /// the wait status, or nil on time-out.
    public func wait(timeout: Double? = nil) -> Int32? {
        if let status = lock.withLock({ self.status }) { return status }
        if pidfd >= 0 { return waitAdopted(timeout: timeout) }
        let deadline = timeout.map { monotonicNanoseconds() + UInt64($0 * 1e9) }
        var delay: useconds_t = 1000
        while true {
            var raw: Int32 = 0
            let rc = waitpid(pid, &raw, deadline == nil ? 0 : WNOHANG)
            if rc == pid {
                lock.withLock { status = raw }
                return raw
            }
            if rc < 0 && errno != EINTR { return lock.withLock { status } ?? -1 }
            if let deadline {
                let now = monotonicNanoseconds()
                if now >= deadline { return nil }
                if exitWatch >= 0 {
                    var polled = pollfd(fd: exitWatch, events: Int16(POLLIN), revents: 0)
                    _ = poll(&polled, 1, Int32(min((deadline - now + 999_999) / 1_000_000, UInt64(Int32.max))))
                } else {
                    usleep(delay)
                    delay = min(delay * 2, 20_000)
                }
            }
        }
    }

    private func waitAdopted(timeout: Double?) -> Int32? {
        var polled = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
        let deadline = timeout.map { monotonicNanoseconds() + UInt64($0 * 1e9) }
        while true {
            let now = monotonicNanoseconds()
            if let deadline, now >= deadline { return nil }
            // Whole milliseconds, rounded up: a poll of 0 would spin until the deadline.
            let left = deadline.map { Int32(min(($0 - now + 999_999) / 1_000_000, UInt64(Int32.max))) } ?? -1
            let rc = poll(&polled, 1, left)
            if rc > 0 {
                lock.withLock { status = Self.adoptedExitStatus }
                return Self.adoptedExitStatus
            }
            if rc < 0 && errno != EINTR { return lock.withLock { status } ?? Self.adoptedExitStatus }
        }
    }

    public func signal(_ signal: Int32) {
        guard lock.withLock({ status }) == nil else { return }
        if pidfd >= 0 { _ = iof_pidfd_send_signal(pidfd, signal) } else { kill(pid, signal) }
    }

    /// Reads captured stdout to EOF.
    public func readAllOutput() -> [UInt8] {
        guard let fd = stdoutFD else { return [] }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, 65536) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return bytes
    }

    /// Reads one line from captured stdout, or nil at EOF.
    public func readLine() -> String? {
        guard let fd = stdoutFD else { return nil }
        var bytes: [UInt8] = []
        var byte: UInt8 = 0
        while true {
            let n = read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self) }
            if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
            bytes.append(byte)
        }
    }

    static func currentEnvironment() -> [String: String] {
        var result: [String: String] = [:]
        var pointer = environ
        while let entry = pointer.pointee {
            let line = String(cString: entry)
            if let equals = line.firstIndex(of: "=") {
                result[String(line[..<equals])] = String(line[line.index(after: equals)...])
            }
            pointer += 1
        }
        return result
    }

    /// "killed by SIGSEGV", "exited with status 2".
    public static func describe(status: Int32) -> String {
        if status == adoptedExitStatus { return "ended (how, only its parent knows: an earlier iofilterd started it)" }
        let signal = status & 0x7f
        if signal == 0 { return "exited with status \((status >> 8) & 0xff)" }
        let name = signalNames[signal] ?? "signal \(signal)"
        return "killed by \(name)" + (status & 0x80 != 0 ? " (core dumped)" : "")
    }

    public static func exitCode(status: Int32) -> Int32? {
        status & 0x7f == 0 ? (status >> 8) & 0xff : nil
    }

    static let signalNames: [Int32: String] = [
        SIGSEGV: "SIGSEGV", SIGABRT: "SIGABRT", SIGKILL: "SIGKILL", SIGBUS: "SIGBUS", SIGILL: "SIGILL",
        SIGFPE: "SIGFPE", SIGTERM: "SIGTERM", SIGSYS: "SIGSYS", SIGTRAP: "SIGTRAP", SIGINT: "SIGINT",
    ]
}

/// Finds the iofilter-worker executable: $IOFILTER_WORKER, else beside this program (a
/// build directory), else in ../libexec/iofilter (an installed prefix).
public enum WorkerExecutable {
    /// Added to every worker's environment. The Swift runtime's crash backtracer would
    /// try to exec a helper, which the sandbox refuses: the host reports crashes itself.
    public static let environment = ["SWIFT_BACKTRACE": "enable=no"]

    public static func path() -> String {
        if let explicit = getenv("IOFILTER_WORKER") { return String(cString: explicit) }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/exe", &buffer, Int(PATH_MAX))
        let me = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : CommandLine.arguments[0]
        let directory = me.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let installed = directory + "/../libexec/iofilter/iofilter-worker"
        if access(directory + "/iofilter-worker", X_OK) != 0, access(installed, X_OK) == 0 { return installed }
        return directory + "/iofilter-worker"
    }

    /// Where the sample plug-ins are: beside the worker (a build directory), else in
    /// PREFIX/lib/iofilter/plugins (an installed prefix).
    public static func samplesDirectory() -> String {
        let directory = path().split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        let installed = directory + "/../../lib/iofilter/plugins"
        if access(directory + "/libiofilter-cache.so", F_OK) != 0, access(installed, F_OK) == 0 { return installed }
        return directory
    }
}
