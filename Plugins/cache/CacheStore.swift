import Glibc
import IOFilterSDK

/// The cache device: fixed-size slots in a data file and, per slot, a 32-byte entry in
/// `cache.meta` (block number, checksum, state, version).
///
/// A block is never rewritten in place: new contents go to a free slot and its entry is
/// written after the data, with a higher version. After a crash at any point, loading
/// keeps for each block the highest-version entry whose checksum matches its data, so a
/// torn update falls back to the previous contents and a stale block is never served.
final class CacheStore: @unchecked Sendable {
    // @unchecked: every mutable field is guarded by `lock`; slot data is read outside
    // it only while the slot is pinned, and pinned slots are never reused.
    enum SlotState: UInt32 { case empty = 0, clean = 1, dirty = 2 }

    struct Entry {
        var block: UInt64 = .max
        var checksum: UInt64 = 0
        var state: SlotState = .empty
        var version: UInt64 = 0
    }

    let blockSize: Int
    let slotCount: Int
    let dataFD: Int32
    let metaFD: Int32
    let lock = ConditionLock()
    private(set) var entries: [Entry]
    private var pins: [UInt16]
    private var referenced: [Bool]
    private(set) var index: [UInt64: Int32] = [:]
    private var hand = 0
    private var nextVersion: UInt64 = 1
    private(set) var dirtyCount = 0
    private(set) var evictions: UInt64 = 0
    private let metaHeaderSize = 64

    /// How a cache on file is laid out: its block size, its number of slots and the size
    /// of the disk it caches, as its metadata header says; nil when there is none.
    struct Layout: Equatable {
        var blockSize: Int
        var slotCount: Int
        var diskSize: UInt64

        /// Whether a cache laid out like this serves as one laid out as `wanted`: the
        /// same blocks and slots, for a disk that has at most grown since (every block
        /// it holds is still on the disk).
        func serves(_ wanted: Layout) -> Bool {
            blockSize == wanted.blockSize && slotCount == wanted.slotCount && diskSize <= wanted.diskSize
        }
    }

    static let metaMagic: UInt64 = 0x494F_4643_4143_4845  // "IOFCACHE"

    static func layout(metaPath: String) -> Layout? {
        let fd = open(metaPath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        return layout(of: fd)
    }

    private static func layout(of fd: Int32) -> Layout? {
        var header = (UInt64(0), UInt64(0), UInt64(0), UInt64(0))
        var info = stat()
        // A header that does not describe the file it heads is no layout at all.
        guard pread(fd, &header, 32, 0) == 32, header.0 == metaMagic, fstat(fd, &info) == 0, info.st_size >= 64,
              header.1 >= 512, header.1 <= 1 << 30, header.1 & (header.1 - 1) == 0,
              header.2 > 0, header.2 <= (UInt64(info.st_size) - 64) / 32
        else { return nil }
        return Layout(blockSize: Int(header.1), slotCount: Int(header.2), diskSize: header.3)
    }

    /// - Parameter openedData: the cache file, when the host opened it (a cache-file outside
    ///   the sidecar directory); otherwise `dataPath` is opened here.
    init(dataPath: String, openedData: Int32? = nil, metaPath: String, size: Int, blockSize: Int, diskSize: UInt64) throws(FilterError) {
        self.blockSize = blockSize
        slotCount = max(size / blockSize, 1)
        dataFD = openedData ?? open(dataPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        metaFD = open(metaPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard dataFD >= 0, metaFD >= 0 else {
            throw FilterError(errno, "cannot open the cache (\(dataPath)): \(String(cString: strerror(errno)))")
        }
        entries = Array(repeating: Entry(), count: slotCount)
        pins = Array(repeating: 0, count: slotCount)
        referenced = Array(repeating: false, count: slotCount)
        var wanted = (Self.metaMagic, UInt64(blockSize), UInt64(slotCount), diskSize)
        if let onFile = Self.layout(of: metaFD), onFile.serves(Layout(blockSize: blockSize, slotCount: slotCount, diskSize: diskSize)) {
            try load()
            // A disk that grew keeps its cache; the header follows it.
            if onFile.diskSize != diskSize { _ = pwrite(metaFD, &wanted, 32, 0) }
        } else {
            // New, or laid out for other parameters: start empty. (The filter writes down
            // what such a cache held dirty before it comes here: see `CacheFilter`.)
            ftruncate(metaFD, 0)
            ftruncate(metaFD, off_t(metaHeaderSize + 32 * slotCount))
            var fresh = wanted
            _ = pwrite(metaFD, &fresh, 32, 0)
        }
        ftruncate(dataFD, off_t(slotCount * blockSize))
        // Allocated up front, so that filling the cache never meets a full file system
        // halfway (and its writes skip block allocation). Best effort: the file
        // system may not support it.
        _ = posix_fallocate(dataFD, 0, off_t(slotCount * blockSize))
    }

    /// Reads every entry, checks every valid slot's checksum, keeps the newest valid
    /// copy of each block.
    private func load() throws(FilterError) {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 32 * slotCount, alignment: 8)
        let block = UnsafeMutableRawPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer {
            raw.deallocate()
            block.deallocate()
        }
        guard FileIO.readAll(metaFD, into: raw, count: 32 * slotCount, offset: UInt64(metaHeaderSize)) == 0 else {
            throw FilterError(EIO, "cannot read cache metadata")
        }
        for slot in 0..<slotCount {
            let base = raw + 32 * slot
            let state = SlotState(rawValue: base.load(fromByteOffset: 16, as: UInt32.self)) ?? .empty
            guard state != .empty else { continue }
            let entry = Entry(block: base.load(as: UInt64.self), checksum: base.load(fromByteOffset: 8, as: UInt64.self),
                              state: state, version: base.load(fromByteOffset: 24, as: UInt64.self))
            nextVersion = max(nextVersion, entry.version + 1)
            guard FileIO.readAll(dataFD, into: block, count: blockSize, offset: UInt64(slot * blockSize)) == 0,
                  Self.checksum(block, count: blockSize) == entry.checksum
                    || Self.legacyChecksum(block, count: blockSize) == entry.checksum
            else { continue }
            if let other = index[entry.block] {
                guard entries[Int(other)].version < entry.version else { continue }
                forget(Int(other))
            }
            entries[slot] = entry
            index[entry.block] = Int32(slot)
            if entry.state == .dirty { dirtyCount += 1 }
        }
    }

    var cachedBlocks: Int { lock.withLock { index.count } }

    // MARK: lookups (lock held by caller where noted)

    /// (lock held) The slot holding `block`, pinned, or nil.
    func pinnedSlot(for block: UInt64) -> Int? {
        guard let slot = index[block] else { return nil }
        pins[Int(slot)] += 1
        referenced[Int(slot)] = true
        return Int(slot)
    }

    /// (lock held)
    func unpin(_ slot: Int) { pins[slot] -= 1 }

    /// (lock held) A slot to fill: an empty one, or the least recently used clean,
    /// unpinned one (CLOCK). Nil when every slot is dirty or in use.
    func allocate() -> Int? {
        for _ in 0..<(2 * slotCount) {
            let slot = hand
            hand = (hand + 1) % slotCount
            if pins[slot] > 0 || entries[slot].state == .dirty { continue }
            if entries[slot].state == .empty { return slot }
            if referenced[slot] {
                referenced[slot] = false
                continue
            }
            forget(slot)
            evictions += 1
            return slot
        }
        return nil
    }

    /// (lock held) Drops whatever `slot` holds from the index (its entry is rewritten
    /// when the slot is reused, or marked empty by `invalidate`).
    private func forget(_ slot: Int) {
        let entry = entries[slot]
        if entry.state != .empty, index[entry.block] == Int32(slot) { index[entry.block] = nil }
        if entry.state == .dirty { dirtyCount -= 1 }
        entries[slot] = Entry()
    }

    // MARK: writing blocks

    /// (lock held) Makes `slot` (already holding the block's bytes in the data file) the
    /// current copy of `block`, retiring any older copy.
    func publish(block: UInt64, slot: Int, checksum: UInt64, dirty: Bool) {
        if let old = index[block], Int(old) != slot {
            forget(Int(old))
            writeEntry(Int(old))
        }
        if entries[slot].state != .empty { forget(slot) }
        entries[slot] = Entry(block: block, checksum: checksum, state: dirty ? .dirty : .clean, version: nextVersion)
        nextVersion += 1
        index[block] = Int32(slot)
        referenced[slot] = true
        if dirty { dirtyCount += 1 }
        writeEntry(slot)
    }

    /// (lock held) Removes `block` from the cache, if present and not pinned by a reader
    /// (then it is only unlinked from the index; the reader finishes with old bytes).
    func invalidate(block: UInt64) {
        guard let slot = index[block] else { return }
        forget(Int(slot))
        writeEntry(Int(slot))
    }

    /// (lock held) A dirty block reached the disk: clean, unless rewritten meanwhile.
    func markClean(block: UInt64, version: UInt64) {
        guard let slot = index[block], entries[Int(slot)].version == version, entries[Int(slot)].state == .dirty else { return }
        entries[Int(slot)].state = .clean
        dirtyCount -= 1
        writeEntry(Int(slot))
    }

    /// (lock held) Dirty blocks with the versions they hold, for destaging.
    func dirtyBlocks(limit: Int) -> [(block: UInt64, slot: Int, version: UInt64)] {
        var result: [(UInt64, Int, UInt64)] = []
        for (slot, entry) in entries.enumerated() where entry.state == .dirty {
            result.append((entry.block, slot, entry.version))
            if result.count == limit { break }
        }
        return result
    }

    /// (lock held)
    func pin(_ slot: Int) { pins[slot] += 1 }

    private func writeEntry(_ slot: Int) {
        let entry = entries[slot]
        var raw = (entry.block, entry.checksum, UInt64(entry.state.rawValue), entry.version)
        _ = pwrite(metaFD, &raw, 32, off_t(metaHeaderSize + 32 * slot))
    }

    // MARK: data

    func readSlot(_ slot: Int, into buffer: UnsafeMutableRawPointer, offset: Int = 0, count: Int? = nil) -> Int32 {
        FileIO.readAll(dataFD, into: buffer, count: count ?? blockSize, offset: UInt64(slot * blockSize + offset))
    }

    func writeSlot(_ slot: Int, from buffer: UnsafeRawPointer) -> Int32 {
        FileIO.writeAll(dataFD, buffer, count: blockSize, offset: UInt64(slot * blockSize))
    }

    func sync() -> Int32 {
        if fdatasync(dataFD) != 0 { return errno }
        return fdatasync(metaFD) == 0 ? 0 : errno
    }

    func close() {
        Glibc.close(dataFD)
        Glibc.close(metaFD)
    }

    /// 64-bit multiply-xorshift over words, so any torn write changes it; four
    /// independent lanes over 32-byte strides, then folded. The one-lane form before it
    /// waited on every product: at about 1 µs per 4 KiB block, it was the largest cost
    /// of a write-back hit in the full sample chain.
    static func checksum(_ buffer: UnsafeRawPointer, count: Int) -> UInt64 {
        let prime: UInt64 = 0x0000_0100_0000_01b3
        @inline(__always) func mix(_ lane: UInt64, _ word: UInt64) -> UInt64 {
            let product = (lane ^ word) &* prime
            return product ^ (product >> 29)
        }
        var a: UInt64 = 0xcbf2_9ce4_8422_2325, b: UInt64 = 0x9e37_79b9_7f4a_7c15
        var c: UInt64 = 0xc2b2_ae3d_27d4_eb4f, d: UInt64 = 0x1656_67b1_9e37_79f9
        var index = 0
        while index + 32 <= count {
            a = mix(a, buffer.loadUnaligned(fromByteOffset: index, as: UInt64.self))
            b = mix(b, buffer.loadUnaligned(fromByteOffset: index + 8, as: UInt64.self))
            c = mix(c, buffer.loadUnaligned(fromByteOffset: index + 16, as: UInt64.self))
            d = mix(d, buffer.loadUnaligned(fromByteOffset: index + 24, as: UInt64.self))
            index += 32
        }
        while index < count {
            a = mix(a, UInt64(buffer.load(fromByteOffset: index, as: UInt8.self)))
            index += 1
        }
        var hash = mix(mix(mix(a, b), c), d)
        hash = mix(hash, UInt64(count))
        return hash
    }

    /// The checksum of caches written before the four-lane one: their entries still
    /// load (a dirty block must never be dropped for an upgrade).
    static func legacyChecksum(_ buffer: UnsafeRawPointer, count: Int) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        var index = 0
        while index + 8 <= count {
            hash = (hash ^ buffer.loadUnaligned(fromByteOffset: index, as: UInt64.self)) &* 0x0000_0100_0000_01b3
            hash ^= hash >> 29
            index += 8
        }
        while index < count {
            hash = (hash ^ UInt64(buffer.load(fromByteOffset: index, as: UInt8.self))) &* 0x0000_0100_0000_01b3
            index += 1
        }
        return hash
    }
}
