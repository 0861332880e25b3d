import Glibc
internal import CSystemShims
internal import IOFilterPosix

// What a filter needs to do work of its own — a lock, threads, a background loop, a
// clock, positional file I/O — as the SDK's own small API. The host's modules that
// implement them stay internal: a plug-in builds against this SDK and the C header only.

/// A mutex with a condition variable: guard state a filter shares between the data
/// path and its own threads, and wait for a change another thread makes.
public final class ConditionLock: @unchecked Sendable {
    // @unchecked: a wrapper over a lock that is itself thread-safe.
    private let base = IOFilterPosix.ConditionLock()

    public init() {}

    @inline(__always) public func lock() { base.lock() }
    @inline(__always) public func unlock() { base.unlock() }

    @inline(__always)
    public func withLock<T>(_ body: () throws -> T) rethrows -> T { try base.withLock(body) }

    /// Waits for `signal` or `broadcast`; call with the lock held.
    public func wait() { base.wait() }
    /// Waits at most `nanoseconds`; false if the time ran out. Call with the lock held.
    @discardableResult public func wait(nanoseconds: UInt64) -> Bool { base.wait(nanoseconds: nanoseconds) }
    public func broadcast() { base.broadcast() }
    public func signal() { base.signal() }
}

/// How a thread a filter starts competes for the CPU.
public enum ThreadPriority: Sendable {
    /// Work a request waits for (sync replication to a replica, say).
    case normal
    /// Work nothing waits for right now (shipping a journal, destaging a cache):
    /// SCHED_BATCH at nice 10, so that it never preempts the data path when it wakes.
    case background
}

/// Starts a detached thread of the filter's own.
public func startThread(name: String, priority: ThreadPriority = .normal, _ body: @escaping @Sendable () -> Void) {
    IOFilterPosix.startThread(name: name, priority: priority == .background ? .background : .normal, body)
}

/// Moves the calling thread to background priority (see `ThreadPriority.background`),
/// with the threads it starts from now on: for work that found out only after it
/// started that nobody waits for it (a daemon's connection serving an async stream).
/// There is no way back up.
public func moveThisThreadToBackground() {
    _ = iof_set_thread_background(10)
}

/// A monotonic clock in nanoseconds, for deadlines and rates.
public func monotonicNanoseconds() -> UInt64 { IOFilterPosix.monotonicNanoseconds() }

/// Positional reads and writes of whole ranges on a file the filter opened itself (a
/// cache device, a journal), retrying short transfers and EINTR.
public enum FileIO {
    /// Reads `count` bytes at `offset`: 0, or an errno (EIO for a file that ends early).
    public static func readAll(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64) -> Int32 {
        FileDescriptorIO.preadAll(fd, into: buffer, count: count, offset: offset)
    }

    /// Writes `count` bytes at `offset`: 0, or an errno.
    public static func writeAll(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int, offset: UInt64) -> Int32 {
        FileDescriptorIO.pwriteAll(fd, buffer, count: count, offset: offset)
    }

    /// Makes a range read as zeroes, keeping the file's size: a hole where the file
    /// system can punch one, zeroes written otherwise. 0, or an errno.
    public static func zero(_ fd: Int32, offset: UInt64, length: UInt64) -> Int32 {
        if iof_fallocate(fd, IOF_FALLOC_PUNCH_HOLE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length)) == 0 { return 0 }
        let chunk = 1 << 20
        let zeroes = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0, count: chunk)
        var done: UInt64 = 0
        while done < length {
            let count = Int(min(UInt64(chunk), length - done))
            let error = FileDescriptorIO.pwriteAll(fd, zeroes, count: count, offset: offset + done)
            if error != 0 { return error }
            done += UInt64(count)
        }
        return 0
    }

    /// An identity of the file behind `fd` that a new file at the same path never has:
    /// a replica keeper tells its sender with it that the disk was made anew and needs
    /// copying in full. A random one kept in the file's extended attribute
    /// user.iofilter.id, made the first time; where that cannot be read or made (a
    /// daemon's uid may not read the attributes of a disk its host keeps private), the
    /// device, inode and birth time: an inode number alone is reused by the next file
    /// made on the device, so a replica deleted and made again looked like the old one.
    public static func identity(of fd: Int32) -> String {
        let name = "user.iofilter.id"
        for _ in 0..<2 {
            var stored = [UInt8](repeating: 0, count: 64)
            let count = iof_fgetxattr(fd, name, &stored, stored.count)
            if count > 0 { return String(decoding: stored[..<count], as: UTF8.self) }
            guard errno == ENODATA else { break }
            var generator = SystemRandomNumberGenerator()
            let fresh = Array(hexadecimal((0..<16).map { _ in generator.next() as UInt8 }).utf8)
            // Another opener may have made one first (EEXIST): read theirs.
            if iof_fsetxattr_create(fd, name, fresh, fresh.count) == 0 { return String(decoding: fresh, as: UTF8.self) }
            guard errno == EEXIST else { break }
        }
        var info = stat()
        fstat(fd, &info)
        var seconds: Int64 = 0
        var nanoseconds: UInt32 = 0
        let born = iof_birth_time(fd, &seconds, &nanoseconds) == 0 ? "-born\(seconds).\(nanoseconds)" : ""
        return "dev\(info.st_dev)-ino\(info.st_ino)\(born)"
    }

    /// Accepts a connection on `listener` (close-on-exec): the fd, or -1 with errno set.
    public static func accept(_ listener: Int32) -> Int32 { Sockets.accept(listener) }
}

/// Runs `work` every so often on a background thread until `stop` (a cache's destager,
/// a journal's flusher). `poke` runs a pass now instead of at the next interval.
public final class BackgroundLoop: @unchecked Sendable {
    // @unchecked: `stopping`, `running` and `poked` are guarded by `lock`.
    private let name: String
    private let priority: ThreadPriority
    private let lock = ConditionLock()
    private var stopping = false
    private var running = false
    private var poked = false

    public init(name: String, priority: ThreadPriority = .background) {
        self.name = name
        self.priority = priority
    }

    public func start(every nanoseconds: UInt64, _ work: @escaping @Sendable () -> Void) {
        // Running from here on: a `stop` that comes before the thread does still waits.
        lock.withLock { running = true }
        startThread(name: name, priority: priority) { [self] in
            while lock.withLock({ () -> Bool in
                if !stopping && !poked { lock.wait(nanoseconds: nanoseconds) }
                poked = false
                return !stopping
            }) {
                work()
            }
            lock.withLock {
                running = false
                lock.broadcast()
            }
        }
    }

    /// Asks for a pass as soon as the current one (if any) ends.
    public func poke() {
        lock.withLock {
            poked = true
            lock.broadcast()
        }
    }

    /// Stops the loop and waits for a pass in progress; does nothing if never started.
    public func stop() {
        lock.withLock {
            stopping = true
            lock.broadcast()
            while running { lock.wait() }
        }
    }
}

/// Lowercase hexadecimal, two digits a byte.
package func hexadecimal(_ bytes: some Sequence<UInt8>) -> String {
    let digits = Array("0123456789abcdef")
    return String(bytes.flatMap { [digits[Int($0 >> 4)], digits[Int($0 & 15)]] })
}
