// Cache sample: a block cache on a local file (standing in for flash) in front of
// slower storage, such as a remote NBD export.
//
// Reads that hit are served from the cache file without going down. A miss reads the
// whole cache blocks below, keeps them, and completes the read. In write-through mode
// writes go down and the blocks they touch leave the cache. In write-back mode writes
// land in the cache (durable there at FLUSH/FUA) and a destage thread writes dirty
// blocks down in the background, and all of them at close and detach.
//
// Cache contents and metadata are checksummed and survive worker restarts: a warm cache
// stays warm, and no stale or torn block is ever returned.
import Glibc
import IOFilterSDK
import Synchronization

public final class CacheFilter: IOFilter {
    public static let metadata = FilterMetadata(
        name: "org.swift-iofilter.cache",
        vendor: "swift-iofilter",
        version: "1.0.0",
        description: "Block cache on a local file, write-through or write-back, persistent and checksummed",
        category: .cache,
        threadModel: .parallel,
        parameters: [
            Parameter("size", .size(default: "256M", range: 1 << 20...1 << 40), description: "bytes of cache"),
            Parameter("block-size", .size(default: "4K", range: 4096...1 << 20),
                      description: "cache block size (a power of two): a miss fetches whole blocks"),
            Parameter("mode", .choice(default: "write-through", values: ["write-through", "write-back"]),
                      description: "write-back keeps writes in the cache and destages them in the background"),
            Parameter("cache-file", .path(default: ""),
                      description: "the cache device or file (default: cache.data in the sidecar directory)"),
            Parameter("destage-interval-ms", .int(default: 500, range: 10...600_000),
                      description: "write-back: how often dirty blocks are written down"),
        ],
        operations: [ManagementOperation("status", "hit ratio and dirty bytes of every cached disk in this worker", function: cacheStatus)],
        observesCompletions: true, answersBlockStatus: true, handlesCacheHints: true)

    let disk: Disk
    let store: CacheStore
    let writeBack: Bool
    let blockSize: Int
    /// Read misses being filled, and writes on their way down: a fill keeps what it read
    /// only if no write overlapped it, so a cache never holds older bytes than the disk.
    private let inFlight = Mutex(InFlight())
    private let hits = Atomic<UInt64>(0)
    private let misses = Atomic<UInt64>(0)
    private let destagedBytes = Atomic<UInt64>(0)
    private let destager = BackgroundLoop(name: "cache-destage")

    public static func detach(_ disk: Disk) throws(FilterError) {
        // Detaching a write-back cache destages it first: open it, flush it, delete it.
        // No background destaging here: this thread destages everything itself, and a
        // background pass writing below would wait on the very lock `detach` runs under.
        let filter = try CacheFilter(disk: disk, destageInBackground: false)
        let error = filter.destageAll()
        filter.close()
        guard error == 0 else { throw FilterError(error, "cannot destage before detach: \(String(cString: strerror(error)))") }
        for file in ["cache.data", "cache.meta"] { unlink("\(disk.sidecarDirectory)/\(file)") }
    }

    public convenience init(disk: Disk) throws(FilterError) {
        try self.init(disk: disk, destageInBackground: true)
    }

    /// - Parameter layout: the cache as it lies on file, instead of as the parameters
    ///   say: to write down what a cache of another size or block size held dirty.
    init(disk: Disk, destageInBackground: Bool, layout: CacheStore.Layout? = nil) throws(FilterError) {
        self.disk = disk
        blockSize = layout?.blockSize ?? Int(disk.parameter("block-size", default: 4096))
        let size = layout.map { $0.slotCount * $0.blockSize } ?? Int(disk.parameter("size", default: Int64(256 << 20)))
        guard blockSize & (blockSize - 1) == 0 else { throw FilterError(EINVAL, "block-size \(blockSize) is not a power of two") }
        writeBack = disk.parameter("mode") == "write-back"
        let metaPath = "\(disk.sidecarDirectory)/cache.meta"
        if layout == nil, let previous = CacheStore.layout(metaPath: metaPath),
           !previous.serves(CacheStore.Layout(blockSize: blockSize, slotCount: max(size / blockSize, 1), diskSize: disk.size)) {
            try Self.writeDown(disk, cacheLaidOutAs: previous)
        }
        let cacheFile = disk.parameter("cache-file").flatMap { $0.isEmpty ? nil : $0 }
        let dataPath = cacheFile ?? "\(disk.sidecarDirectory)/cache.data"
        // A cache file of the operator's choosing lies outside the sidecar directory,
        // where only the host can open it.
        let dataFD = try cacheFile.flatMap { path throws(FilterError) in try openTarget(path, disk: disk) }
        store = try CacheStore(dataPath: dataPath, openedData: dataFD, metaPath: metaPath, size: size,
                               blockSize: blockSize, diskSize: layout?.diskSize ?? disk.size)
        let warm = store.cachedBlocks
        let dirty = store.lock.withLock { store.dirtyCount }
        guard layout == nil else { return }
        disk.log(.info, "cache \(writeBack ? "write-back" : "write-through"), \(size) bytes in \(blockSize)-byte blocks; "
                 + "\(warm) blocks warm, \(dirty) dirty")
        if !writeBack && dirty > 0 {
            // Written back before, then switched to write-through: nothing else would
            // ever write these blocks down.
            let error = destageAll()
            guard error == 0 else {
                throw FilterError(error, "cannot write down the \(dirty) blocks this cache held dirty from write-back mode: "
                                  + String(cString: strerror(error)))
            }
            disk.log(.info, "wrote down the \(dirty) blocks held dirty from write-back mode")
        }
        if writeBack && destageInBackground {
            // On a thread of its own, in the background: a destage writes up to 256
            // blocks below one after another, which on the host's timer thread held up
            // every other filter's timers and competed with the data path. A strong
            // capture: `close` stops the loop (waiting for a running pass), which
            // releases it; a weak one would move the reference count to a side table
            // and slow every retain on the data path.
            let interval = UInt64(disk.parameter("destage-interval-ms", default: 500)) * 1_000_000
            destager.start(every: interval) { [self] in _ = destage(limit: 256) }
        }
        Self.registry.withLock { $0[ObjectIdentifier(self)] = self }
    }

    /// A cache on file laid out for another size or block size (or for a larger disk)
    /// is started anew; first, what it holds dirty (acknowledged writes the disk below lacks) is
    /// written down through the layout it was written in. If that fails, the filter does
    /// not open, and the cache stays as it was for a later try.
    private static func writeDown(_ disk: Disk, cacheLaidOutAs previous: CacheStore.Layout) throws(FilterError) {
        let old = try CacheFilter(disk: disk, destageInBackground: false, layout: previous)
        let dirty = old.store.lock.withLock { old.store.dirtyCount }
        let error = old.destageAll()
        old.close()
        guard error == 0 else {
            throw FilterError(error, "the cache holds \(dirty) dirty blocks of \(previous.blockSize) bytes, laid out for "
                              + "\(previous.slotCount * previous.blockSize) bytes; they could not be written down before the "
                              + "cache is laid out anew (\(String(cString: strerror(error)))), so it is kept as it was")
        }
        if dirty > 0 {
            disk.log(.info, "the cache was laid out for \(previous.slotCount * previous.blockSize) bytes in \(previous.blockSize)-byte "
                     + "blocks; its \(dirty) dirty blocks were written down before it is laid out anew")
        }
    }

    public func close() {
        Self.registry.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
        destager.stop()
        if writeBack {
            let error = destageAll()
            if error != 0 { disk.log(.warning, "dirty blocks stay in the cache (destage failed: \(String(cString: strerror(error))))") }
        }
        _ = store.sync()
        store.close()
    }

    // MARK: the data path

    public func start(_ request: Request) -> Disposition {
        switch request.operation {
        case .read: return read(request)
        case .write: return writeBack ? writeIntoCache(request) : passingDown(request, invalidateAndPass(request))
        case .trim, .writeZeroes: return passingDown(request, zeroRange(request))
        case .cache: return request.defer { await self.prefetch(request) }
        case .flush:
            if writeBack {
                let error = store.sync()
                if error != 0 { return .fail(error) }
            }
            return .pass
        default: return .pass
        }
    }

    public func done(_ request: Request) -> Disposition {
        if request.operation == .blockStatus {
            markDirtyBlocksAsData(request)
            return .pass
        }
        if request.privateWord != 0 {
            inFlight.withLock { _ = $0.writes.removeValue(forKey: request.id) }
        }
        return .pass
    }

    /// Block status: the disk below answers for what it holds, except where this cache
    /// holds newer bytes (write-back's dirty blocks), which are data whatever lies below.
    private func markDirtyBlocksAsData(_ request: Request) {
        guard writeBack else { return }
        let first = request.offset / UInt64(blockSize), end = (request.offset + UInt64(request.length) + UInt64(blockSize) - 1) / UInt64(blockSize)
        let dirty = store.lock.withLock {
            store.index.compactMap { block, slot in
                block >= first && block < end && store.entries[Int(slot)].state == .dirty ? block : nil
            }
        }.sorted()
        // One call per run of adjacent dirty blocks: each call rewrites the extent list.
        var index = 0
        while index < dirty.count {
            var last = index
            while last + 1 < dirty.count && dirty[last + 1] == dirty[last] + 1 { last += 1 }
            request.setExtent(offset: dirty[index] * UInt64(blockSize), length: UInt64(last - index + 1) * UInt64(blockSize))
            index = last + 1
        }
    }

    /// Registers a write-like request that goes down, until its `done`.
    private func passingDown(_ request: Request, _ disposition: Disposition) -> Disposition {
        guard disposition == .pass else { return disposition }
        let range = blocks(of: request)
        inFlight.withLock { state in
            state.writes[request.id] = range
            for fill in state.fills.values where fill.blocks.overlaps(range) { fill.tainted = true }
        }
        request.privateWord = 1
        return .pass
    }

    private func blocks(of request: Request) -> ClosedRange<UInt64> {
        let first = request.offset / UInt64(blockSize)
        let last = (request.offset + UInt64(max(request.length, 1)) - 1) / UInt64(blockSize)
        return first...last
    }

    /// Serves a read from the cache if every block it touches is there.
    private func read(_ request: Request) -> Disposition {
        let range = blocks(of: request)
        // The pinned slots live on the stack: a hit allocates nothing.
        return withUnsafeTemporaryAllocation(of: Int.self, capacity: range.count) { slots in
            var pinned = 0
            let allCached: Bool = store.lock.withLock {
                for block in range {
                    guard let slot = store.pinnedSlot(for: block) else {
                        for index in 0..<pinned { store.unpin(slots[index]) }
                        return false
                    }
                    slots[pinned] = slot
                    pinned += 1
                }
                return true
            }
            guard allCached else {
                misses.add(1, ordering: .relaxed)
                return request.defer { await self.fillAndRead(request, blocks: range) }
            }
            defer { store.lock.withLock { for slot in slots { store.unpin(slot) } } }
            var error: Int32 = 0
            var done = 0
            for (index, block) in range.enumerated() {
                let blockStart = block * UInt64(blockSize)
                let from = Int(max(request.offset, blockStart) - blockStart)
                let count = min(blockSize - from, request.length - done)
                let rc = store.readSlot(slots[index], into: request.buffer.baseAddress! + done, offset: from, count: count)
                if rc != 0 { error = rc }
                done += count
            }
            if error != 0 { return .fail(error) }
            hits.add(1, ordering: .relaxed)
            return .complete
        }
    }

    /// NBD_CMD_CACHE: fetch the range's blocks the cache lacks, in 8 MiB steps, up to half
    /// the cache (a hint larger than that would only evict what it just fetched).
    private func prefetch(_ request: Request) async -> Disposition {
        let range = blocks(of: request)
        let step = max(1, (8 << 20) / blockSize), most = max(1, store.slotCount / 2)
        var block = range.lowerBound
        while block <= range.upperBound && block - range.lowerBound < UInt64(most) {
            let last = min(range.upperBound, block + UInt64(step) - 1)
            let missing = store.lock.withLock { (block...last).contains { store.index[$0] == nil } }
            if missing, case .fail(let error) = await fill(block...last, into: nil) { return .fail(error) }
            block = last + 1
        }
        return .complete
    }

    /// A miss: read the whole blocks below, keep them, then answer from them.
    private func fillAndRead(_ request: Request, blocks range: ClosedRange<UInt64>) async -> Disposition {
        await fill(range, into: request)
    }

    /// Reads whole blocks below and keeps them; then answers `request` (a read) from them.
    /// Blocks already cached (dirty ones in write-back mode) win over what the disk returned.
    private func fill(_ range: ClosedRange<UInt64>, into request: Request?) async -> Disposition {
        let fill = Fill(blocks: range)
        inFlight.withLock { state in
            state.fills[ObjectIdentifier(fill)] = fill
            if state.writes.values.contains(where: { $0.overlaps(range) }) { fill.tainted = true }
        }
        defer { inFlight.withLock { _ = $0.fills.removeValue(forKey: ObjectIdentifier(fill)) } }
        let length = range.count * blockSize
        let staging = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        defer { staging.deallocate() }
        let fetchLength = Int(min(UInt64(length), disk.size - range.lowerBound * UInt64(blockSize)))
        let error = await disk.submitBelow(.read, offset: range.lowerBound * UInt64(blockSize), length: fetchLength, buffer: staging)
        if error != 0 { return .fail(error) }
        if fetchLength < length { memset(staging + fetchLength, 0, length - fetchLength) }
        let keep = inFlight.withLock { state in
            !fill.tainted && !state.writes.values.contains(where: { $0.overlaps(range) })
        }
        store.lock.withLock {
            for (index, block) in range.enumerated() {
                let bytes = staging + index * blockSize
                if let slot = store.pinnedSlot(for: block) {
                    _ = store.readSlot(slot, into: bytes)
                    store.unpin(slot)
                } else if keep, let slot = store.allocate() {
                    // A write that overlapped this fill taints it: its bytes may be old.
                    if store.writeSlot(slot, from: bytes) == 0 {
                        store.publish(block: block, slot: slot, checksum: CacheStore.checksum(bytes, count: blockSize), dirty: false)
                    }
                }
            }
        }
        if let request {
            let from = Int(request.offset - range.lowerBound * UInt64(blockSize))
            memcpy(request.buffer.baseAddress!, staging + from, request.length)
        }
        return .complete
    }

    private func taintFills(_ range: ClosedRange<UInt64>) {
        inFlight.withLock { state in
            for fill in state.fills.values where fill.blocks.overlaps(range) { fill.tainted = true }
        }
    }

    /// Write-through: the blocks a write touches leave the cache; the write goes down.
    private func invalidateAndPass(_ request: Request) -> Disposition {
        let range = blocks(of: request)
        taintFills(range)
        store.lock.withLock { for block in range { store.invalidate(block: block) } }
        return .pass
    }

    /// Write-back: the write becomes new dirty copies of its blocks. A block only
    /// partly written that is not cached is read from below first.
    private func writeIntoCache(_ request: Request) -> Disposition {
        let range = blocks(of: request)
        taintFills(range)
        let needsFetch: Bool = store.lock.withLock {
            range.contains { block in
                let start = block * UInt64(blockSize)
                let whole = request.offset <= start && request.offset + UInt64(request.length) >= start + UInt64(blockSize)
                return !whole && store.pinnedSlot(for: block).map { store.unpin($0); return false } ?? true
            }
        }
        if needsFetch {
            return request.defer { await self.mergeWrite(request, blocks: range) }
        }
        let staging = UnsafeMutableRawPointer.allocate(byteCount: range.count * blockSize, alignment: 4096)
        defer { staging.deallocate() }
        switch storeWrite(request, blocks: range, staging: staging) {
        case .stored(let disposition): return disposition
        case .noRoom: return passingDown(request, .pass)
        case .needsFetch: return request.defer { await self.mergeWrite(request, blocks: range) }
        }
    }

    private func mergeWrite(_ request: Request, blocks range: ClosedRange<UInt64>) async -> Disposition {
        let length = range.count * blockSize
        let staging = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        defer { staging.deallocate() }
        let start = range.lowerBound * UInt64(blockSize)
        let fetchLength = Int(min(UInt64(length), disk.size - start))
        let error = await disk.submitBelow(.read, offset: start, length: fetchLength, buffer: staging)
        if error != 0 { return .fail(error) }
        if fetchLength < length { memset(staging + fetchLength, 0, length - fetchLength) }
        switch storeWrite(request, blocks: range, staging: staging, prefilled: true) {
        case .stored(let disposition): return disposition
        case .noRoom, .needsFetch:
            // Write it through ourselves: this request already decided not to go down.
            let error = await disk.submitBelow(.write, offset: request.offset, length: request.length,
                                               buffer: request.buffer.baseAddress, fua: request.isFUA)
            return error == 0 ? .complete : .fail(error)
        }
    }

    enum StoreOutcome {
        case stored(Disposition)
        case noRoom
        case needsFetch
    }

    /// Lays the write over each block's current bytes (cached copy, or what was fetched)
    /// and publishes new dirty copies; falls back to writing through when the cache has
    /// no clean slot left.
    private func storeWrite(_ request: Request, blocks range: ClosedRange<UInt64>, staging: UnsafeMutableRawPointer,
                            prefilled: Bool = false) -> StoreOutcome {
        enum Locked { case stored, noRoom, needsFetch }
        let outcome: Locked = store.lock.withLock {
            var slots: [Int] = []
            for _ in range {
                guard let slot = store.allocate() else { break }
                store.pin(slot)
                slots.append(slot)
            }
            defer { for slot in slots { store.unpin(slot) } }
            guard slots.count == range.count else { return .noRoom }
            for (index, block) in range.enumerated() {
                let bytes = staging + index * blockSize
                if let current = store.pinnedSlot(for: block) {
                    _ = store.readSlot(current, into: bytes)
                    store.unpin(current)
                } else if !prefilled {
                    let start = block * UInt64(blockSize)
                    let whole = request.offset <= start && request.offset + UInt64(request.length) >= start + UInt64(blockSize)
                    // Evicted since it was checked: its other bytes must come from below.
                    guard whole else { return .needsFetch }
                }
            }
            let from = Int(request.offset - range.lowerBound * UInt64(blockSize))
            memcpy(staging + from, request.buffer.baseAddress!, request.length)
            for (index, block) in range.enumerated() {
                let bytes = staging + index * blockSize
                guard store.writeSlot(slots[index], from: bytes) == 0 else { return .noRoom }
                store.publish(block: block, slot: slots[index], checksum: CacheStore.checksum(bytes, count: blockSize), dirty: true)
            }
            return .stored
        }
        switch outcome {
        case .needsFetch:
            return .needsFetch
        case .noRoom:
            // No clean slot left: this write goes down; cached copies of its blocks get its bytes.
            applyToCachedCopies(request, blocks: range)
            return .noRoom
        case .stored:
            if request.isFUA {
                let error = store.sync()
                if error != 0 { return .stored(.fail(error)) }
            }
            return .stored(.complete)
        }
    }

    /// Keeps cached copies coherent with a write or zeroing that goes down.
    private func applyToCachedCopies(_ request: Request, blocks range: ClosedRange<UInt64>, zeroes: Bool = false) {
        let bytes = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { bytes.deallocate() }
        store.lock.withLock {
            for block in range {
                guard let current = store.pinnedSlot(for: block) else { continue }
                let blockStart = block * UInt64(blockSize)
                let from = max(request.offset, blockStart)
                let to = min(request.offset + UInt64(request.length), blockStart + UInt64(blockSize))
                let wasDirty = store.entries[current].state == .dirty
                _ = store.readSlot(current, into: bytes)
                store.unpin(current)
                if zeroes {
                    memset(bytes + Int(from - blockStart), 0, Int(to - from))
                } else {
                    memcpy(bytes + Int(from - blockStart), request.buffer.baseAddress! + Int(from - request.offset), Int(to - from))
                }
                if let slot = store.allocate(), store.writeSlot(slot, from: bytes) == 0 {
                    store.publish(block: block, slot: slot, checksum: CacheStore.checksum(bytes, count: blockSize), dirty: wasDirty)
                } else {
                    store.invalidate(block: block)  // only reachable for clean blocks: dirty ones are never evicted
                }
            }
        }
    }

    /// Trim and write-zeroes go down; cached blocks wholly inside the range leave the
    /// cache, partly covered ones get the zeroes too.
    private func zeroRange(_ request: Request) -> Disposition {
        let range = blocks(of: request)
        taintFills(range)
        var partial: [UInt64] = []
        store.lock.withLock {
            for block in range {
                let start = block * UInt64(blockSize)
                if request.offset <= start && request.offset + UInt64(request.length) >= start + UInt64(blockSize) {
                    store.invalidate(block: block)
                } else {
                    partial.append(block)
                }
            }
        }
        if let first = partial.first, let last = partial.last {
            applyToCachedCopies(request, blocks: first...last, zeroes: true)
        }
        return .pass
    }

    // MARK: destaging

    /// Writes up to `limit` dirty blocks down, flushes below, then records them clean.
    @discardableResult
    func destage(limit: Int) -> Int32 {
        let batch: [(block: UInt64, slot: Int, version: UInt64)] = store.lock.withLock {
            let dirty = store.dirtyBlocks(limit: limit)
            for entry in dirty { store.pin(entry.slot) }
            return dirty
        }
        guard !batch.isEmpty else { return 0 }
        defer { store.lock.withLock { for entry in batch { store.unpin(entry.slot) } } }
        let bytes = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { bytes.deallocate() }
        for entry in batch {
            let offset = entry.block * UInt64(blockSize)
            // A block past the end of a disk that shrank has nowhere to go.
            guard offset < disk.size else { continue }
            guard store.readSlot(entry.slot, into: bytes) == 0 else { return EIO }
            let length = Int(min(UInt64(blockSize), disk.size - offset))
            let error = waitForCompletion { disk.submitBelow(.write, offset: offset, length: length, buffer: bytes, completion: $0) }
            if error != 0 { return error }
        }
        let error = waitForCompletion { disk.submitBelow(.flush, offset: 0, length: 0, buffer: nil, completion: $0) }
        if error != 0 { return error }
        store.lock.withLock { for entry in batch { store.markClean(block: entry.block, version: entry.version) } }
        destagedBytes.add(UInt64(batch.count * blockSize), ordering: .relaxed)
        return 0
    }

    func destageAll() -> Int32 {
        while store.lock.withLock({ store.dirtyCount }) > 0 {
            let error = destage(limit: 1024)
            if error != 0 { return error }
        }
        return 0
    }

    // MARK: operators

    public func stats() -> [(String, Double)] {
        let hits = Double(self.hits.load(ordering: .relaxed)), misses = Double(self.misses.load(ordering: .relaxed))
        let (dirty, cached, evictions) = store.lock.withLock { (store.dirtyCount, store.index.count, store.evictions) }
        return [
            ("hits", hits), ("misses", misses), ("hit_ratio", hits + misses > 0 ? hits / (hits + misses) : 0),
            ("dirty_bytes", Double(dirty * blockSize)), ("cached_bytes", Double(cached * blockSize)),
            ("evictions", Double(evictions)), ("destaged_bytes", Double(destagedBytes.load(ordering: .relaxed))),
        ]
    }

    var statusLine: String {
        let figures = Dictionary(uniqueKeysWithValues: stats())
        return "\(disk.vmName)/\(disk.name): \(writeBack ? "write-back" : "write-through"), hit ratio "
            + "\(Int((figures["hit_ratio"] ?? 0) * 100))%, \(Int(figures["dirty_bytes"] ?? 0)) dirty bytes, "
            + "\(Int(figures["cached_bytes"] ?? 0)) cached bytes"
    }

    /// The disks open in this process, for `status`; strong references dropped at
    /// `close` (a weak one would put every retain and release on the slow path).
    static let registry = Mutex<[ObjectIdentifier: CacheFilter]>([:])
}

struct InFlight {
    var fills: [ObjectIdentifier: Fill] = [:]
    var writes: [UInt64: ClosedRange<UInt64>] = [:]
}

/// A read miss in progress; a write overlapping it taints it so its (possibly older)
/// bytes are not kept.
final class Fill: @unchecked Sendable {
    // @unchecked: `tainted` is set under the filter's `fills` mutex and read after.
    let blocks: ClosedRange<UInt64>
    var tainted = false
    init(blocks: ClosedRange<UInt64>) { self.blocks = blocks }
}

@_cdecl("iofilter_cache_status")
func cacheStatus() -> UnsafePointer<CChar>? {
    let lines = CacheFilter.registry.withLock { $0.values.map(\.statusLine) }
    return ManagementResult.string(lines.isEmpty ? "no cached disks are open in this process" : lines.sorted().joined(separator: "\n"))
}

@_cdecl("iof_plugin_entry")
public func iofPluginEntry() -> UnsafeRawPointer { exportFilter(CacheFilter.self) }
