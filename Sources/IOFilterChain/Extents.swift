import CIOFilter

/// The answer to a block-status request as it travels up the chain: extents contiguous
/// from the request's offset, each with IOF_EXTENT_* flags. Made once per request slot,
/// the first time the slot carries a block-status request.
public final class Extents {
    /// Past this many, the layers below answer only a prefix of the range (NBD allows it).
    static let maximum = 1024

    public private(set) var offsets: [UInt64] = []
    public private(set) var lengths: [UInt64] = []
    public private(set) var flags: [UInt32] = []

    init() {
        offsets.reserveCapacity(Self.maximum + 2)
        lengths.reserveCapacity(Self.maximum + 2)
        flags.reserveCapacity(Self.maximum + 2)
    }

    public var count: Int { offsets.count }
    public var isFull: Bool { offsets.count >= Self.maximum }
    /// Where the covered range ends.
    public var end: UInt64 { offsets.last.map { $0 + lengths[lengths.count - 1] } ?? 0 }

    public func removeAll() {
        offsets.removeAll(keepingCapacity: true)
        lengths.removeAll(keepingCapacity: true)
        flags.removeAll(keepingCapacity: true)
    }

    /// Appends the next extent (it must start where the last ended), merging it into the
    /// last one when their flags agree.
    public func append(length: UInt64, flags extentFlags: UInt32, at offset: UInt64) {
        guard length > 0 else { return }
        if let last = flags.last, last == extentFlags, end == offset {
            lengths[lengths.count - 1] += length
            return
        }
        offsets.append(offset)
        lengths.append(length)
        flags.append(extentFlags)
    }

    /// Gives [offset, offset+length) the flags `newFlags`, clipped to what is covered.
    func set(offset: UInt64, length: UInt64, flags newFlags: UInt32) {
        guard let first = offsets.first, length > 0 else { return }
        let start = max(offset, first), stop = min(offset &+ length, end)
        guard start < stop else { return }
        let (oldOffsets, oldLengths, oldFlags) = (offsets, lengths, flags)
        removeAll()
        for index in oldOffsets.indices {
            let from = oldOffsets[index], to = from + oldLengths[index], kind = oldFlags[index]
            if from < start { append(length: min(to, start) - from, flags: kind, at: from) }
            if from < stop && to > start && from <= start { append(length: stop - start, flags: newFlags, at: start) }
            if to > stop { append(length: to - max(from, stop), flags: kind, at: max(from, stop)) }
        }
    }
}
