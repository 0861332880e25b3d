import CIOFilter

/// A view of one request in flight. It is only valid until the request finishes
/// (`start` returns anything but `.deferred`, or `resume` is called): keep no copy
/// beyond that. It is `Sendable` so that a deferred request can be resumed from any
/// thread or task.
public struct Request: @unchecked Sendable {
    // @unchecked: a pointer into the host's request; the ABI hands ownership to the
    // filter between `start` returning `.deferred` and `resume`.
    let raw: UnsafeMutablePointer<iof_request>
    let slot: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    let storedWord: UnsafeMutableRawPointer?

    public enum Operation: Sendable {
        case read, write, flush, trim, writeZeroes
        /// What the range holds (ABI 1.2; only for filters whose metadata sets
        /// `answersBlockStatus`): see `extents` and `setExtent`.
        case blockStatus
        /// A prefetch hint (ABI 1.2; only with `handlesCacheHints`).
        case cache
        case unknown
    }

    public var operation: Operation {
        switch raw.pointee.op {
        case IOF_OP_READ: .read
        case IOF_OP_WRITE: .write
        case IOF_OP_FLUSH: .flush
        case IOF_OP_TRIM: .trim
        case IOF_OP_WRITE_ZEROES: .writeZeroes
        case IOF_OP_BLOCK_STATUS: .blockStatus
        case IOF_OP_CACHE: .cache
        default: .unknown
        }
    }

    /// One answer of a block-status request.
    public struct Extent: Sendable, Equatable {
        public var offset: UInt64
        public var length: UInt64
        /// Not allocated below.
        public var isHole: Bool
        /// Reads as zeroes.
        public var isZero: Bool
    }

    /// Block status, in `done`: what the layers below answered (contiguous from
    /// `offset`; possibly only a prefix of the range). Empty on a host older than 1.2.
    public var extents: [Extent] {
        guard let services = Host.servicesSince(minor: 2), let count = services.pointee.extent_count,
              let extent = services.pointee.extent else { return [] }
        return (0..<count(raw)).compactMap { index in
            var offset: UInt64 = 0, length: UInt64 = 0, flags: UInt32 = 0
            guard extent(raw, index, &offset, &length, &flags) == 0 else { return nil }
            return Extent(offset: offset, length: length, isHole: flags & UInt32(IOF_EXTENT_HOLE) != 0,
                          isZero: flags & UInt32(IOF_EXTENT_ZERO) != 0)
        }
    }

    /// Block status: makes [offset, offset+length) one extent (by default: data, which
    /// is what a cache says of what it holds).
    public func setExtent(offset: UInt64, length: UInt64, isHole: Bool = false, isZero: Bool = false) {
        guard let services = Host.servicesSince(minor: 2), let set = services.pointee.set_extent else { return }
        _ = set(raw, offset, length, (isHole ? UInt32(IOF_EXTENT_HOLE) : 0) | (isZero ? UInt32(IOF_EXTENT_ZERO) : 0))
    }

    /// Write-zeroes that must fail (ENOTSUP) rather than write zeroes slowly.
    public var isFastZero: Bool { raw.pointee.flags & UInt32(IOF_REQ_FAST_ZERO) != 0 }

    public var offset: UInt64 { raw.pointee.offset }
    public var length: Int { Int(raw.pointee.length) }
    /// Write, trim or write-zeroes that must be durable before it completes.
    public var isFUA: Bool { raw.pointee.flags & UInt32(IOF_REQ_FUA) != 0 }
    /// Write-zeroes that must allocate.
    public var noHole: Bool { raw.pointee.flags & UInt32(IOF_REQ_NO_HOLE) != 0 }
    /// Unique among the disk's requests in flight.
    public var id: UInt64 { raw.pointee.id }

    /// The payload: for a read, fill it (then `.complete`) or inspect it in `done`; for
    /// a write, the data (a filter may change the bytes, e.g. to encrypt them). No copy.
    public var buffer: UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(start: raw.pointee.buffer, count: raw.pointee.buffer == nil ? 0 : length)
    }

    /// The result on the way up: 0 or an errno.
    public var error: Int32 {
        get { raw.pointee.error }
        nonmutating set { raw.pointee.error = newValue }
    }

    /// A word of per-request state that belongs to this filter from `start` to `done`
    /// (set it in `start`; read it in `done`).
    public var privateWord: UInt {
        get { UInt(bitPattern: slot?.pointee ?? storedWord) }
        nonmutating set { slot?.pointee = UnsafeMutableRawPointer(bitPattern: newValue) }
    }

    /// Delivers a decision that `start` or `done` deferred. Exactly once, from any thread.
    public func resume(_ disposition: Disposition) {
        let (value, errno) = disposition.abi
        Host.services.pointee.resume(raw, value == IOF_DEFER ? IOF_FAIL : value, errno)
    }

    /// Decides asynchronously: runs `decision` as a task and resumes with its result.
    /// Return what this returns (`.deferred`) from `start` or `done`.
    public func `defer`(_ decision: @escaping @Sendable () async -> Disposition) -> Disposition {
        let request = self
        Task { request.resume(await decision()) }
        return .deferred
    }
}

extension Disposition {
    var abi: (iof_disposition, Int32) {
        switch self {
        case .pass: (IOF_PASS, 0)
        case .complete: (IOF_COMPLETE, 0)
        case .fail(let errno): (IOF_FAIL, errno > 0 ? errno : 5)
        case .deferred: (IOF_DEFER, 0)
        }
    }
}
