import CIOFilter
import CSystemShims
import Glibc
import IOFilterPosix
import IOFilterTracking
import Logging
import Synchronization

/// A snapshot of a disk as its consumers saw it at one instant, made by copy-before-
/// write while they go on writing: from the instant on, a consumer's write first
/// preserves the blocks it overwrites (reads them through the chain, as a consumer
/// would, into the snapshot's file); a background copier fills in the rest; a reader of
/// the snapshot preserves what it reads the same way. A block is copied exactly once,
/// by whoever claims it first, and never after the disk changed it.
///
/// Each 4 KiB granule is pending, being copied, or preserved; the states are bytes
/// changed only by compare-and-swap (pending → copying → preserved), so a writer, the
/// copier and a reader agree without a lock. A writer that finds a granule being copied
/// waits for it (rare: the copier and the writer met on the same 4 KiB).
public final class PointInTimeCopy: @unchecked Sendable {
    // @unchecked: `states` is touched only through the atomic shims; the rest is fixed
    // after init or guarded.
    /// The snapshot's name (the new disk's).
    public let name: String
    public let chain: Chain
    public let size: UInt64
    /// The snapshot's data file: sparse and all zero at the start, so blocks that read
    /// as zero are never written.
    let target: Int32
    /// The source's checkpoints frozen at the instant: what changed since each of them
    /// up to the snapshot (its export offers them).
    public let frozenBitmaps: [ChangeBitmap]
    /// The background copier's pace (bytes per second, nil: as fast as it goes).
    let bytesPerSecond: UInt64?
    let logger: Logger

    static let granuleShift: UInt64 = 12
    static let granuleSize: UInt64 = 1 << granuleShift
    let granules: Int
    private let states: UnsafeMutablePointer<UInt8>
    private static let pending: UInt8 = 0
    private static let copying: UInt8 = 1
    private static let preserved: UInt8 = 2
    private let preservedCount = Atomic<Int>(0)
    private let waiters = ConditionLock()
    private let outcome = Guarded<Status>(.copying)
    /// Set once the copy failed: writers stop preserving at once.
    private let gaveUp = Atomic<Bool>(false)
    private let startedAt = monotonicNanoseconds()
    private let finishedAt = Atomic<UInt64>(0)
    /// Bytes the copier or a writer actually wrote (data, not zeroes).
    private let writtenBytes = Atomic<UInt64>(0)
    /// Bytes the background copy read through the chain (what its pace counts).
    private let copierReadBytes = Atomic<UInt64>(0)
    /// Set when the worker stops: no consumer writes any more, so the copy neither
    /// yields nor keeps the asked pace.
    private let hurried = Atomic<Bool>(false)

    public enum Status: Sendable, Equatable {
        case copying
        case complete
        case failed(String)
    }

    public init(name: String, chain: Chain, target: Int32, frozenBitmaps: [ChangeBitmap], bytesPerSecond: UInt64?, logger: Logger) {
        self.name = name
        self.chain = chain
        self.size = chain.backend.size
        self.target = target
        self.frozenBitmaps = frozenBitmaps
        self.bytesPerSecond = bytesPerSecond
        self.logger = logger
        granules = Int((size + Self.granuleSize - 1) >> Self.granuleShift)
        states = .allocate(capacity: max(granules, 1))
        states.initialize(repeating: Self.pending, count: max(granules, 1))
    }

    deinit {
        states.deallocate()
        Glibc.close(target)
    }

    public var status: Status { outcome.withLock { $0 } }

    /// How far the copy is: preserved bytes of `size`, seconds so far (or in all).
    public var progress: (preserved: UInt64, written: UInt64, seconds: Double) {
        let end = finishedAt.load(ordering: .relaxed)
        let preserved = min(UInt64(preservedCount.load(ordering: .relaxed)) << Self.granuleShift, size)
        return (preserved, writtenBytes.load(ordering: .relaxed), Double((end == 0 ? monotonicNanoseconds() : end) - startedAt) / 1e9)
    }

    // MARK: preserving

    /// Makes sure every granule of [offset, offset+length) holds the instant's bytes in
    /// the snapshot before the caller goes on (a write to the disk, a read of the
    /// snapshot). Runs of granules this thread claimed are copied before it ever waits
    /// for another's, so two threads never wait for each other. (Copying whole 16 or
    /// 64 KiB blocks around a guest's 4 KiB writes was measured: no faster here, since
    /// writing fresh blocks of the snapshot's file costs per byte.) After a failure there
    /// is nothing left to preserve. Returns the bytes this call read (the background
    /// copy's pace counts its own).
    @discardableResult
    func preserve(offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer? = nil) -> UInt64 {
        guard length > 0, offset < size, !gaveUp.load(ordering: .acquiring) else { return 0 }
        var read: UInt64 = 0
        let last = Int(min(offset + length - 1, size - 1) >> Self.granuleShift)
        var runStart: Int?
        var granule = Int(offset >> Self.granuleShift)
        while granule <= last {
            if claim(granule) {
                if runStart == nil { runStart = granule }
                granule += 1
                continue
            }
            if let start = runStart {
                read += copy(start..<granule, buffer: buffer)
                runStart = nil
            }
            if iof_load_u8(states + granule) == Self.copying { waitWhileCopying(granule) }
            // Preserved now, or pending again because the copy failed.
            if iof_load_u8(states + granule) != Self.preserved { return read }
            granule += 1
        }
        if let start = runStart { read += copy(start..<granule, buffer: buffer) }
        return read
    }

    @inline(__always)
    private func claim(_ granule: Int) -> Bool { iof_cas_u8(states + granule, Self.pending, Self.copying) != 0 }

    private func waitWhileCopying(_ granule: Int) {
        waiters.withLock {
            while iof_load_u8(states + granule) == Self.copying { waiters.wait() }
        }
    }

    /// Copies claimed granules: read through the chain, written to the snapshot unless
    /// they read as zero. On failure the snapshot fails (the disk's consumers go on).
    /// `given` (at least `step` bytes) serves a claim no longer than a step.
    private func copy(_ claimed: Range<Int>, buffer given: UnsafeMutableRawPointer?) -> UInt64 {
        let offset = UInt64(claimed.lowerBound) << Self.granuleShift
        let length = Int(min(UInt64(claimed.upperBound) << Self.granuleShift, size) - offset)
        let owned = given == nil || length > Int(Self.step) ? UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096) : nil
        defer { owned?.deallocate() }
        let buffer = owned ?? given!
        var error = chain.performAndWait(op: IOF_OP_READ, offset: offset, length: UInt64(length), buffer: buffer)
        if error == 0 && !Self.isZero(buffer, length) {
            error = FileDescriptorIO.pwriteAll(target, buffer, count: length, offset: offset)
            if error == 0 { writtenBytes.add(UInt64(length), ordering: .relaxed) }
        }
        if error != 0 {
            fail("preserving \(length) bytes at \(offset) failed: \(String(cString: strerror(error)))")
        }
        mark(claimed, as: error == 0 ? Self.preserved : Self.pending)
        return UInt64(length)
    }

    private func mark(_ claimed: Range<Int>, as state: UInt8) {
        for granule in claimed { iof_store_u8(states + granule, state) }
        if state == Self.preserved { preservedCount.add(claimed.count, ordering: .relaxed) }
        waiters.withLock { waiters.broadcast() }
    }

    /// Gives up: consumers stop preserving, the snapshot's readers get EIO, and the host
    /// removes it.
    public func fail(_ reason: String) {
        let first = outcome.withLock { status -> Bool in
            guard status == .copying else { return false }
            status = .failed(reason)
            return true
        }
        guard first else { return }
        gaveUp.store(true, ordering: .releasing)
        logger.error("snapshot \(name) of disk \(chain.diskName) failed: \(reason)")
        chain.tracker.stopPreserving(self)
        finishedAt.store(monotonicNanoseconds(), ordering: .relaxed)
        waiters.withLock { waiters.broadcast() }
    }

    // MARK: the background copy

    /// Copies what no writer has preserved yet, in 1 MiB steps at background priority,
    /// skipping what reads as zero (block status through the chain).
    public func startCopying() {
        startThread(name: "snapshot-copy", priority: .background) { [self] in
            copyEverything()
        }
    }

    /// Block status is asked for this much at a time (holes are settled without reads)…
    static let survey: UInt64 = 64 << 20
    /// …and data is copied in pieces of this size, in one buffer the copier keeps.
    static let step: UInt64 = 1 << 20

    private func copyEverything() {
        let extents = Extents()
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: Int(Self.step), alignment: 4096)
        defer { buffer.deallocate() }
        var position: UInt64 = 0
        while position < size {
            guard status == .copying else { return }
            let length = min(Self.survey, size - position)
            let error = chain.performAndWait(op: IOF_OP_BLOCK_STATUS, offset: position, length: length, buffer: nil, extents: extents)
            var covered: UInt64 = 0
            if error == 0 {
                for index in 0..<extents.count {
                    let from = extents.offsets[index], extentLength = min(extents.lengths[index], position + length - from)
                    if extents.flags[index] & UInt32(IOF_EXTENT_ZERO) != 0 {
                        settleZero(from, extentLength)
                    } else {
                        copyData(from, extentLength, buffer)
                    }
                    covered = from + extentLength - position
                }
            }
            // What block status did not cover (the layers below answered a prefix, or
            // could not say) is copied as data.
            if covered < length {
                if error != 0 || covered == 0 {
                    copyData(position + covered, min(length - covered, Self.step), buffer)
                    covered += min(length - covered, Self.step)
                }
            }
            position += max(covered, 1)
        }
        finish()
    }

    /// Copies a data range in steps, at the asked pace. While consumers write, the copy
    /// yields: after each step it rests `yieldFactor` times as long as the step took, so
    /// it takes at most a share of a CPU, the page cache's bandwidth and the disk that
    /// the guest is using (an idle disk is copied at full speed).
    private func copyData(_ offset: UInt64, _ length: UInt64, _ buffer: UnsafeMutableRawPointer) {
        var done: UInt64 = 0
        var changes = chain.tracker.changes.load(ordering: .relaxed)
        while done < length && !gaveUp.load(ordering: .relaxed) {
            let piece = min(Self.step, length - done)
            let started = monotonicNanoseconds()
            copierReadBytes.add(preserve(offset: offset + done, length: piece, buffer: buffer), ordering: .relaxed)
            done += piece
            if hurried.load(ordering: .relaxed) { continue }
            let now = chain.tracker.changes.load(ordering: .relaxed)
            if now != changes {
                changes = now
                usleep(useconds_t(min((monotonicNanoseconds() - started) * Self.yieldFactor, 100_000_000) / 1000))
            }
            pace()
        }
    }

    static let yieldFactor: UInt64 = 5

    /// Granules of a range that reads as zero need no copy: the snapshot's file is zero
    /// there already. A granule only partly inside is copied as data.
    private func settleZero(_ offset: UInt64, _ length: UInt64) {
        let first = Int((offset + Self.granuleSize - 1) >> Self.granuleShift)
        let end = offset + length >= size ? granules : Int((offset + length) >> Self.granuleShift)
        if UInt64(first) << Self.granuleShift > offset { preserve(offset: offset, length: min(length, (UInt64(first) << Self.granuleShift) - offset)) }
        var settled = 0
        if first < end {
            for granule in first..<end where iof_cas_u8(states + granule, Self.pending, Self.preserved) != 0 { settled += 1 }
        }
        preservedCount.add(settled, ordering: .relaxed)
        let tail = UInt64(max(end, first)) << Self.granuleShift
        if tail < offset + length { preserve(offset: tail, length: offset + length - tail) }
    }

    /// Keeps the data the copier read so far (zeroes skipped cost nothing; what writers
    /// and readers preserved is not its doing) at the asked pace.
    private func pace() {
        guard let bytesPerSecond, bytesPerSecond > 0 else { return }
        let due = startedAt + UInt64(Double(copierReadBytes.load(ordering: .relaxed)) / Double(bytesPerSecond) * 1e9)
        let now = monotonicNanoseconds()
        if due > now { usleep(useconds_t(min(due - now, 1_000_000_000) / 1000)) }
    }

    /// Lets the copy run at full speed from now on and waits until it ends (complete or
    /// failed) or `seconds` pass; the status it ended with. A worker that stops calls
    /// this once its consumers are gone, so that stopping a VM does not lose a snapshot.
    public func hurryAndWait(seconds: Double) -> Status {
        hurried.store(true, ordering: .relaxed)
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        return waiters.withLock {
            while status == .copying {
                let now = monotonicNanoseconds()
                if now >= deadline { break }
                _ = waiters.wait(nanoseconds: min(deadline - now, 100_000_000))
            }
            return status
        }
    }

    private func finish() {
        guard status == .copying else { return }
        // Every granule is preserved now; no writer has anything left to do.
        if fsync(target) != 0 { return fail("cannot sync the snapshot: \(String(cString: strerror(errno)))") }
        chain.tracker.stopPreserving(self)
        finishedAt.store(monotonicNanoseconds(), ordering: .relaxed)
        outcome.withLock { if $0 == .copying { $0 = .complete } }
        waiters.withLock { waiters.broadcast() }
        let (_, written, seconds) = progress
        logger.info("snapshot \(name) of disk \(chain.diskName) complete: \(written >> 20) MiB of data in \((seconds * 10).rounded() / 10)s")
    }

    // MARK: reading the snapshot

    /// Reads the snapshot: the instant's bytes, preserved first if need be.
    func read(into buffer: UnsafeMutableRawPointer, offset: UInt64, length: Int) -> Int32 {
        if case .failed = status { return EIO }
        preserve(offset: offset, length: UInt64(length))
        if case .failed = status { return EIO }
        return FileDescriptorIO.preadAll(target, into: buffer, count: length, offset: offset)
    }

    /// Whether every granule of the range is in the snapshot's file already.
    func isPreserved(offset: UInt64, length: UInt64) -> Bool {
        let first = Int(offset >> Self.granuleShift)
        let last = Int(min(offset + length - 1, size - 1) >> Self.granuleShift)
        return (first...last).allSatisfy { iof_load_u8(states + $0) == Self.preserved }
    }

    var targetFD: Int32 { target }

    static func isZero(_ buffer: UnsafeRawPointer, _ count: Int) -> Bool {
        var index = 0
        while index + 8 <= count {
            if buffer.loadUnaligned(fromByteOffset: index, as: UInt64.self) != 0 { return false }
            index += 8
        }
        while index < count {
            if buffer.load(fromByteOffset: index, as: UInt8.self) != 0 { return false }
            index += 1
        }
        return true
    }
}
