import IOFilterNBDServer
import IOFilterPosix
import IOFilterTracking
import Synchronization

/// What a disk's consumers change, seen where they enter the chain (so that what a
/// cache holds dirty counts as changed): the checkpoints' bitmaps it marks, and the
/// point-in-time copies whose blocks must be preserved before they are overwritten.
///
/// A consumer's write, trim or write-zeroes calls `willModify` after it entered the
/// disk's quiesce and before it enters the chain, so a snapshot taken while the disk is
/// quiesced sees every write either entirely before its instant or entirely after.
public final class ChangeTracker: Sendable {
    private struct State {
        var bitmaps: [ChangeBitmap] = []
        /// Bitmaps offered to clients but never marked (a read-only disk's, a
        /// snapshot's frozen ones).
        var fixed: [ChangeBitmap] = []
        var copies: [PointInTimeCopy] = []
    }
    private let state = Guarded(State())
    /// Nothing tracked and nothing to preserve: the data path skips the lock.
    private let idle = Atomic<Bool>(true)
    /// Consumers' changes seen while something was tracked (a copy yields to them).
    let changes = Atomic<UInt64>(0)

    public init() {}

    /// Before a consumer's request that changes [offset, offset+length) enters the chain.
    /// Preserving blocks for a snapshot may read through the chain and wait.
    @inline(__always)
    func willModify(offset: UInt64, length: UInt64) {
        if idle.load(ordering: .acquiring) { return }
        changes.add(1, ordering: .relaxed)
        let (bitmaps, copies) = state.withLock { ($0.bitmaps, $0.copies) }
        for bitmap in bitmaps { bitmap.mark(offset: offset, length: length) }
        for copy in copies { copy.preserve(offset: offset, length: length) }
    }

    /// The checkpoints' bitmaps this disk marks, oldest first.
    public var bitmaps: [ChangeBitmap] { state.withLock { $0.bitmaps } }

    /// Every bitmap of the disk, marked or not, oldest first.
    public var allBitmaps: [ChangeBitmap] { state.withLock { ($0.bitmaps + $0.fixed).sorted { $0.createdAt < $1.createdAt } } }

    public func bitmap(named name: String) -> ChangeBitmap? {
        state.withLock { $0.bitmaps.first { $0.name == name } ?? $0.fixed.first { $0.name == name } }
    }

    /// Marks the disk's changes in `bitmap` from now on (or only offers it, if it
    /// cannot be marked).
    public func track(_ bitmap: ChangeBitmap) {
        update { bitmap.canMark ? $0.bitmaps.append(bitmap) : $0.fixed.append(bitmap) }
    }

    /// Lets go of a checkpoint's bitmap (it is being deleted).
    @discardableResult
    public func stopTracking(_ name: String) -> ChangeBitmap? {
        update { state in
            if let index = state.bitmaps.firstIndex(where: { $0.name == name }) { return state.bitmaps.remove(at: index) }
            if let index = state.fixed.firstIndex(where: { $0.name == name }) { return state.fixed.remove(at: index) }
            return nil
        }
    }

    /// Point-in-time copies of this disk still being made, or made by this worker.
    public var copies: [PointInTimeCopy] { state.withLock { $0.copies } }

    public func preserve(for copy: PointInTimeCopy) {
        update { $0.copies.append(copy) }
    }

    /// No more preserving for this copy (it is complete, or it failed).
    func stopPreserving(_ copy: PointInTimeCopy) {
        update { $0.copies.removeAll { $0 === copy } }
    }

    private func update<T>(_ body: (inout State) -> T) -> T {
        state.withLock { state in
            let result = body(&state)
            idle.store(state.bitmaps.isEmpty && state.copies.isEmpty, ordering: .releasing)
            return result
        }
    }

    /// A clean stop: every bitmap written back and marked no longer in use.
    public func closeCleanly() {
        for bitmap in bitmaps { bitmap.closeCleanly() }
    }
}

/// A checkpoint's bitmap as an NBD metadata context: `qemu:dirty-bitmap:NAME`, whose
/// flag 1 means "changed since the checkpoint" (QEMU's NBD_STATE_DIRTY).
public final class BitmapContext: NBDMetadataContext {
    public let bitmap: ChangeBitmap

    public init(_ bitmap: ChangeBitmap) { self.bitmap = bitmap }

    public static let dirty: UInt32 = 1

    public func describe(offset: UInt64, length: UInt32, _ append: (UInt32, UInt32) -> Bool) {
        bitmap.runs(offset: offset, length: UInt64(length)) { runLength, changed in
            append(UInt32(runLength), changed ? Self.dirty : 0)
        }
    }
}
