import CVhostUser
import Glibc
import Synchronization

/// A disk offered over vhost-user-blk. The device checks every request (its type, its
/// range within the disk, its data against the guest's memory) before `submit`.
public protocol VirtioBlkExport: AnyObject, Sendable {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    var canDiscard: Bool { get }
    var canWriteZeroes: Bool { get }
    /// Called once per request slot: per-request state the export reuses.
    func makeRequestContext(for request: VirtioBlkRequest) -> AnyObject?
    /// Called once per slot when its connection ends, after its last request finished.
    func releaseRequestContext(_ context: AnyObject)
    /// Carries out the request and calls `request.complete(error:)` exactly once, before
    /// returning or later from any thread.
    func submit(_ request: VirtioBlkRequest)
}

/// One request from the guest, in a slot reused for every request that has the same
/// descriptor head: its data is copied between the guest's memory and `buffer` (a
/// filter may change the bytes it is given; the guest's own buffers stay the guest's).
public final class VirtioBlkRequest: @unchecked Sendable {
    // @unchecked: one owner at a time, the queue's thread until `submit`, the export
    // until `complete`, then the completing thread.
    public enum Command: Sendable, Equatable {
        case read, write, flush, discard
        case writeZeroes(mayUnmap: Bool)
    }
    public internal(set) var command: Command = .read
    public internal(set) var offset: UInt64 = 0
    public internal(set) var length: UInt32 = 0
    /// The request's bytes: what a write carries, where a read's bytes go.
    public private(set) var buffer: UnsafeMutableRawPointer
    public internal(set) var exportContext: AnyObject?

    /// The device's view: where the data and status go in the guest.
    let raw: UnsafeMutablePointer<iof_vu_request>
    private var capacity: Int
    unowned(unsafe) let queue: VirtioQueue

    init(queue: VirtioQueue) {
        self.queue = queue
        raw = .allocate(capacity: 1)
        capacity = 4096
        buffer = Self.allocateBuffer(capacity)
    }

    deinit {
        raw.deallocate()
        free(buffer)
    }

    /// Page-aligned, so that a backend opened with O_DIRECT takes it as it is.
    private static func allocateBuffer(_ bytes: Int) -> UnsafeMutableRawPointer {
        var memory: UnsafeMutableRawPointer?
        guard posix_memalign(&memory, 4096, bytes) == 0, let memory else { fatalError("out of memory for a \(bytes)-byte request") }
        return memory
    }

    func reserve(_ bytes: Int) {
        guard bytes > capacity else { return }
        free(buffer)
        capacity = max(bytes, capacity * 2)
        buffer = Self.allocateBuffer(capacity)
    }

    /// The guest's data into `buffer` (a write's).
    func gather() {
        var at = buffer
        withUnsafeSegments { segment in
            at.copyMemory(from: segment.base, byteCount: Int(segment.length))
            at += Int(segment.length)
        }
    }

    /// `buffer` into the guest's data segments (a read's).
    func scatter() {
        var at = UnsafeRawPointer(buffer)
        withUnsafeSegments { segment in
            UnsafeMutableRawPointer(segment.base).copyMemory(from: at, byteCount: Int(segment.length))
            at += Int(segment.length)
        }
    }

    private func withUnsafeSegments(_ body: (iof_vu_segment) -> Void) {
        let count = Int(raw.pointee.segment_count)
        withUnsafePointer(to: &raw.pointee.segments) { tuple in
            tuple.withMemoryRebound(to: iof_vu_segment.self, capacity: count) { segments in
                for index in 0..<count where segments[index].length > 0 { body(segments[index]) }
            }
        }
    }

    /// Answers the guest: the data of a successful read, then the status.
    public func complete(error: Int32) {
        queue.finish(self, error: error)
    }
}
