import CSystemShims
import Glibc

/// A page of memory a supervisor shares with its worker, in which the worker writes
/// the (monotonic, machine-wide) time at a steady beat. The supervisor judges liveness
/// from outside: a worker that stops beating — frozen, deadlocked, or whose filter
/// stopped the thread that beats — is killed, whatever the worker's own watchdog did.
public final class Heartbeat: @unchecked Sendable {
    // @unchecked: the page is written and read only through atomic operations.
    public let fd: Int32
    private let page: UnsafeMutablePointer<UInt64>

    /// A new page (the supervisor's side); `fd` is handed to the worker.
    public init() throws(SystemError) {
        let fd = iof_memfd("iofilter-heartbeat", 4096)
        guard fd >= 0 else { throw SystemError("memfd_create", code: -fd) }
        guard let page = Self.map(fd) else {
            let error = SystemError("mmap")
            close(fd)
            throw error
        }
        self.fd = fd
        self.page = page
    }

    /// The worker's side: maps the page it was handed.
    public init(inherited fd: Int32) throws(SystemError) {
        guard let page = Self.map(fd) else { throw SystemError("mmap") }
        self.fd = fd
        self.page = page
    }

    deinit {
        munmap(page, 4096)
        close(fd)
    }

    private static func map(_ fd: Int32) -> UnsafeMutablePointer<UInt64>? {
        let raw = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let raw, raw != MAP_FAILED else { return nil }
        return raw.assumingMemoryBound(to: UInt64.self)
    }

    public func beat() { iof_store_u64(page, monotonicNanoseconds()) }

    /// When the worker last beat (monotonic nanoseconds), or 0 if it never has.
    public var lastBeat: UInt64 { iof_load_u64(page) }

    /// When the oldest request in flight in the worker started its current stage
    /// (coarse monotonic nanoseconds), as of the last beat; 0: none.
    public var oldestInFlight: UInt64 { iof_load_u64(page + 1) }

    /// Beats every `interval` on a thread of its own, for the life of the process, and
    /// with each beat says when the oldest request in flight started (`oldestInFlight`).
    /// The same thread does both: a filter that stops it stops the beat, and one that
    /// stops any other thread (the worker's own watchdog) cannot hide a stuck request.
    public func startBeating(every interval: UInt64 = 250_000_000, oldestInFlight: (@Sendable () -> UInt64)? = nil) {
        beat()
        startThread(name: "heartbeat") { [self] in
            while true {
                if let oldestInFlight { iof_store_u64(page + 1, oldestInFlight()) }
                beat()
                usleep(useconds_t(interval / 1000))
            }
        }
    }
}
