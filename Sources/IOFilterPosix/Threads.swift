import CSystemShims
import Glibc

/// How a thread competes for the CPU.
public enum ThreadPriority: Sendable {
    /// The data path, and anything a request waits for.
    case normal
    /// Work nothing waits for right now (shipping a replication journal, say):
    /// SCHED_BATCH at nice 10, so on a busy machine it takes about a tenth of
    /// a CPU that a normal thread also wants, all of an idle one, and it never
    /// interrupts a normal thread when it wakes.
    case background
}

/// Starts a detached OS thread. The data path runs on plain threads with blocking
/// I/O: one per connection, so a request served from the page cache never hops.
public func startThread(name: String, priority: ThreadPriority = .normal, _ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        // @unchecked: handed from the creating thread to the new one exactly once.
        let body: @Sendable () -> Void
        let name: String
        let priority: ThreadPriority
        init(_ body: @escaping @Sendable () -> Void, name: String, priority: ThreadPriority) {
            self.body = body
            self.name = name
            self.priority = priority
        }
    }
    let box = Unmanaged.passRetained(Box(body, name: name, priority: priority)).toOpaque()
    var attributes = pthread_attr_t()
    pthread_attr_init(&attributes)
    pthread_attr_setdetachstate(&attributes, Int32(PTHREAD_CREATE_DETACHED))
    pthread_attr_setstacksize(&attributes, 1 << 20)
    var thread = pthread_t()
    let rc = pthread_create(&thread, &attributes, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        _ = iof_set_thread_name(String(box.name.prefix(15)))
        // A thread takes its creator's nice value; one started from a pool thread
        // (libdispatch sets its workers' priority by QoS) would otherwise run a host
        // started under `nice` at full priority, and so would the workers it spawns.
        _ = iof_inherit_process_nice()
        if box.priority == .background {
            // Nice alone lowers the thread's share, but a thread that wakes every
            // millisecond (a shipper between batches) may still preempt the data path
            // when it wakes; the kernel never lets a woken SCHED_BATCH thread do that.
            // Neither change needs privilege, threads started from this one inherit
            // both, and failing is harmless.
            _ = iof_set_thread_background(10)
        }
        box.body()
        return nil
    }, box)
    pthread_attr_destroy(&attributes)
    precondition(rc == 0, "pthread_create failed: \(rc)")
}

/// A mutex with a condition variable, for the few places that must wait for a state
/// change made by another thread (a free request slot, requests draining).
public final class ConditionLock: @unchecked Sendable {
    // @unchecked: the pthread objects are heap-allocated once and only used through
    // their own locking functions.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)

    public init() {
        pthread_mutex_init(mutex, nil)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(condition, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Waits (lock held) until signalled.
    public func wait() { pthread_cond_wait(condition, mutex) }

    /// Waits (lock held) until signalled or `nanoseconds` pass; false on time-out.
    public func wait(nanoseconds: UInt64) -> Bool {
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let total = UInt64(deadline.tv_nsec) + nanoseconds
        deadline.tv_sec += Int(total / 1_000_000_000)
        deadline.tv_nsec = Int(total % 1_000_000_000)
        return pthread_cond_timedwait(condition, mutex, &deadline) == 0
    }

    public func broadcast() { pthread_cond_broadcast(condition) }
    public func signal() { pthread_cond_signal(condition) }
}

/// Monotonic time in nanoseconds; the coarse clock is a few nanoseconds to read and
/// plenty for watchdogs and lag figures.
public func monotonicNanoseconds(coarse: Bool = false) -> UInt64 {
    var now = timespec()
    clock_gettime(coarse ? CLOCK_MONOTONIC_COARSE : CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// SIGINT and SIGTERM, taken synchronously: block them in every thread (call before
/// starting any), then wait for one on the main thread to shut down in order.
public struct TerminationSignals: Sendable {
    private let set: sigset_t

    /// Blocks SIGINT and SIGTERM in this thread and every thread started after, and
    /// ignores SIGPIPE (a vanished peer is an error to handle, not a reason to die).
    /// - Parameter others: more signals taken the same way (iofilterd's SIGQUIT).
    public static func block(also others: [Int32] = []) -> TerminationSignals {
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        for other in others { sigaddset(&set, other) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        signal(SIGPIPE, SIG_IGN)
        return TerminationSignals(set: set)
    }

    /// Waits for one of them; returns its number.
    public func wait() -> Int32 {
        var copy = set
        var received: Int32 = 0
        sigwait(&copy, &received)
        return received
    }
}

/// A value behind a pthread mutex. The engine's shared tables use this rather than the
/// standard library's Mutex, whose futex-based lock ThreadSanitizer cannot see (every
/// access under it showed as a race), so that the engine's tests run under TSan.
public final class Guarded<Value>: @unchecked Sendable {
    // @unchecked: `value` is only touched with `lock` held.
    private let lock = ConditionLock()
    private var value: Value

    public init(_ value: Value) { self.value = value }

    @inline(__always)
    public func withLock<T>(_ body: (inout Value) throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

/// A pipe that wakes a thread blocked in poll: it polls `readFD` beside its own fds,
/// and another thread calls `wake` (the byte stays unread, so every later poll returns
/// at once too: a wake-up is never lost, which is what a stop needs).
public final class WakePipe: Sendable {
    /// -1 if the pipe could not be made (then nothing wakes the poller: its owner
    /// falls back on shutting its sockets down).
    public let readFD: Int32
    private let writeFD: Int32

    public init() {
        var fds: [Int32] = [-1, -1]
        if iof_pipe_cloexec(&fds) != 0 { fds = [-1, -1] }
        readFD = fds[0]
        writeFD = fds[1]
    }

    deinit {
        if readFD >= 0 { close(readFD) }
        if writeFD >= 0 { close(writeFD) }
    }

    public func wake() {
        guard writeFD >= 0 else { return }
        var byte: UInt8 = 1
        _ = write(writeFD, &byte, 1)
    }
}
