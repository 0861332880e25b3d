import Glibc
import IOFilterSDK
import Synchronization

/// The async journal: a ring of records in `journal.data`, shipped in order from its
/// head. `journal.state` persists the head; the tail is found again after a crash by
/// following records whose sequence numbers continue from the head's and whose headers
/// are whole: a kill in the middle of an append leaves a header half written, with the
/// next sequence number and an offset still holding the payload bytes of an older lap.
///
/// The ring is mapped shared: appending a record is a memcpy into the page cache (it
/// survives the process at once, and reaches the disk at the guest's flush through
/// msync), and the shipper sends payloads straight from the mapping.
///
/// Two heads: the shipper sends from `shipped`, and `head` (persisted) moves up to it
/// only once the replica has flushed what lies between. A replica acknowledges a write
/// before it is on its stable storage; were the records dropped then, a replica that
/// lost power would lack them while this side no longer had them.
final class Journal: @unchecked Sendable {
    // @unchecked: positions are written under `lock` (the heads by the shipper alone,
    // which may therefore read them without the lock); the ring is written only under
    // it (appends), and read from the heads by the shipper, where appends never write.
    struct Record {
        static let headerSize = 48
        /// Headers with a check word at byte 40 over all their fields: one that a crash
        /// cut short does not add up.
        static let magic: UInt32 = 0x494F_464B  // "IOFK"
        /// Headers written before the check word (release 1.x), still replayed after an
        /// upgrade; only their bounds can be checked.
        static let uncheckedMagic: UInt32 = 0x494F_464A  // "IOFJ"
        static let write: UInt32 = 1, zeroes: UInt32 = 2, wrap: UInt32 = 3
        var kind: UInt32
        var sequence: UInt64
        var offset: UInt64
        var length: UInt64
        var time: UInt64
        var size: UInt64 { UInt64(Record.headerSize) + (kind == Record.write ? (length + 7) & ~7 : 0) }
        var check: UInt64 { checkWord(UInt64(kind), sequence, offset, length, time) }
    }

    /// A header found where the walk expected the next record, with that record's
    /// sequence number, but not whole: the append a crash interrupted. Its write was
    /// never acknowledged (the disk write follows the append), so nothing is lost by
    /// leaving it out.
    private(set) var cutShort: Record?

    /// What a ring of another capacity still held when the journal was reopened at a new
    /// one (its journal-size changed): positions in it mean other places in the new ring,
    /// so those writes are resynced from the disk instead of replayed.
    private(set) var carriedOver: (previousCapacity: UInt64, bytes: UInt64)?

    let capacity: UInt64
    /// Records beyond it are not the filter's: a header that says so is not whole.
    private let diskSize: UInt64
    private let dataFD: Int32
    private let stateFD: Int32
    private let ring: UnsafeMutableRawPointer
    /// journal.state mapped: a magic word, then two slots of (head, head sequence, check
    /// word) written in turn with plain stores. A crash in the middle of one leaves the
    /// other whole, and the whole slot with the later sequence is the head.
    private let state: UnsafeMutablePointer<UInt64>
    private static let stateMagic: UInt64 = 0x494F_464A_5354_4132  // "IOFJSTA2"
    /// Release 1.x: (magic, head, head sequence), no slots.
    private static let singleSlotStateMagic: UInt64 = 0x494F_464A_5354_4154  // "IOFJSTAT"
    private var nextSlot = 1
    private let lock = ConditionLock()
    private var head: UInt64 = 0
    private var headSequence: UInt64 = 1
    /// Where the shipper sends from: records between `head` and here are on the replica
    /// but maybe not on its stable storage yet.
    private var shipped: UInt64 = 0
    private var shippedSequence: UInt64 = 1
    private var tail: UInt64 = 0
    private var nextSequence: UInt64 = 1

    /// Opens the journal at `capacity`. One laid out for another capacity is read at its
    /// own first: the ranges it still holds are marked dirty in `regions` (persisted
    /// before the records are dropped, so a crash in between loses neither), and the new
    /// ring starts empty, numbering on from the old one (so that no record left in it
    /// from before continues the sequence).
    static func open(directory: String, capacity: UInt64, diskSize: UInt64,
                     carryingOverInto regions: RegionMap) throws(FilterError) -> Journal {
        var info = stat()
        let previous = stat("\(directory)/journal.data", &info) == 0 ? UInt64(info.st_size) & ~7 : 0
        guard previous >= UInt64(Record.headerSize), previous != capacity & ~7 else {
            return try Journal(directory: directory, capacity: capacity, diskSize: diskSize)
        }
        let old = try Journal(directory: directory, capacity: previous, diskSize: diskSize)
        let carried = (previousCapacity: previous, bytes: old.pendingBytes)
        for range in old.pendingRanges() { regions.mark(offset: range.offset, length: range.length) }
        regions.sync()
        old.startEmpty(at: 0)
        old.close()
        let journal = try Journal(directory: directory, capacity: capacity, diskSize: diskSize)
        journal.carriedOver = carried
        return journal
    }

    private init(directory: String, capacity: UInt64, diskSize: UInt64) throws(FilterError) {
        self.capacity = capacity & ~7
        self.diskSize = diskSize
        dataFD = Glibc.open("\(directory)/journal.data", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        stateFD = Glibc.open("\(directory)/journal.state", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard dataFD >= 0, stateFD >= 0 else { throw FilterError(errno, "cannot open the journal in \(directory): \(String(cString: strerror(errno)))") }
        guard ftruncate(dataFD, off_t(self.capacity)) == 0 else {
            throw FilterError(errno, "cannot size the journal (\(self.capacity) bytes): \(String(cString: strerror(errno)))")
        }
        // Allocated up front: a full file system then fails the open with a clear
        // error, instead of a SIGBUS at some later write into a hole of the mapping.
        let allocated = posix_fallocate(dataFD, 0, off_t(self.capacity))
        guard allocated == 0 || allocated == EOPNOTSUPP || allocated == EINVAL else {
            throw FilterError(allocated, "cannot allocate the journal (\(self.capacity) bytes): \(String(cString: strerror(allocated)))")
        }
        // Populated up front: otherwise the first write into each page of the ring
        // faults it in (a large folio read and zeroed) on the guest's data path.
        guard let mapping = mmap(nil, Int(self.capacity), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, dataFD, 0),
              mapping != MAP_FAILED
        else { throw FilterError(errno, "cannot map the journal (\(self.capacity) bytes): \(String(cString: strerror(errno)))") }
        ring = mapping
        guard ftruncate(stateFD, 4096) == 0,
              let stateMapping = mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, stateFD, 0), stateMapping != MAP_FAILED
        else { throw FilterError(errno, "cannot map the journal state: \(String(cString: strerror(errno)))") }
        state = stateMapping.bindMemory(to: UInt64.self, capacity: 7)
        readHead()
        (shipped, shippedSequence) = (head, headSequence)
        recoverTail()
    }

    private func readHead() {
        if state[0] == Self.singleSlotStateMagic, state[2] > 0 {
            // The first persist writes slot 1, which these words do not overlap.
            head = state[1]
            headSequence = state[2]
            return
        }
        guard state[0] == Self.stateMagic else { return }
        for slot in 0..<2 {
            let words = state + 1 + 3 * slot
            guard words[1] > 0, words[2] == checkWord(words[0], words[1]), words[1] >= headSequence else { continue }
            head = words[0]
            headSequence = words[1]
            nextSlot = 1 - slot
        }
    }


    /// The ranges of the records still to ship. After a crash, some of them may never
    /// have reached the disk (the worker died between journal and disk), so the filter
    /// resyncs those ranges from the disk once the journal is replayed.
    func pendingRanges() -> [(offset: UInt64, length: UInt64)] {
        lock.withLock {
            var ranges: [(UInt64, UInt64)] = []
            walk(until: tail) { record, _, _, _ in
                ranges.append((record.offset, record.length))
                return true
            }
            return ranges
        }
    }

    /// Follows whole records from the head to find where appends stopped.
    private func recoverTail() {
        let (position, sequence) = walk(until: head + capacity) { _, _, _, _ in true }
        tail = position
        nextSequence = sequence
        let offset = position % capacity
        if capacity - offset >= UInt64(Record.headerSize), let record = readHeader(at: offset),
           record.sequence == sequence, !isWhole(record, at: offset) {
            cutShort = record
        }
    }

    /// Visits the records from the head (or `start`), in order, while their sequence numbers continue
    /// and `visit` returns true, stepping over wrap markers and the ring's end. `visit`
    /// gets the record, its payload in the ring, and the position and sequence just past
    /// it. Returns where the walk stopped.
    @discardableResult
    private func walk(
        from start: (position: UInt64, sequence: UInt64)? = nil, until limit: UInt64,
        _ visit: (Record, UnsafeRawPointer, UInt64, UInt64) -> Bool
    ) -> (position: UInt64, sequence: UInt64) {
        var (position, sequence) = start ?? (head, headSequence)
        while position < limit {
            let offset = position % capacity
            if capacity - offset < UInt64(Record.headerSize) {
                position += capacity - offset
                continue
            }
            guard let record = readHeader(at: offset), record.sequence == sequence, isWhole(record, at: offset) else { break }
            if record.kind == Record.wrap {
                position += capacity - offset
                sequence += 1
                continue
            }
            guard visit(record, UnsafeRawPointer(ring + Int(offset) + Record.headerSize), position + record.size, sequence + 1) else { break }
            position += record.size
            sequence += 1
        }
        return (position, sequence)
    }

    private func readHeader(at offset: UInt64) -> Record? {
        let header = UnsafeRawPointer(ring + Int(offset))
        let magic = header.load(as: UInt32.self)
        guard magic == Record.magic || magic == Record.uncheckedMagic else { return nil }
        return Record(kind: header.load(fromByteOffset: 4, as: UInt32.self), sequence: header.load(fromByteOffset: 8, as: UInt64.self),
                      offset: header.load(fromByteOffset: 16, as: UInt64.self), length: header.load(fromByteOffset: 24, as: UInt64.self),
                      time: header.load(fromByteOffset: 32, as: UInt64.self))
    }

    /// Whether the header at `offset` was written to the end: its check word adds up
    /// (release 1.x headers have none), it is of a known kind, it names a range of the
    /// disk, and its payload fits before the ring's end (appends never split one).
    private func isWhole(_ record: Record, at offset: UInt64) -> Bool {
        let header = UnsafeRawPointer(ring + Int(offset))
        if header.load(as: UInt32.self) == Record.magic, header.load(fromByteOffset: 40, as: UInt64.self) != record.check { return false }
        switch record.kind {
        case Record.wrap: return true
        case Record.write, Record.zeroes:
            return record.offset <= diskSize && record.length <= diskSize - record.offset
                && (record.kind == Record.zeroes || record.size <= capacity - offset)
        default: return false
        }
    }

    private func writeHeader(_ record: Record, at offset: UInt64) {
        let header = ring + Int(offset)
        header.storeBytes(of: Record.magic, as: UInt32.self)
        header.storeBytes(of: record.kind, toByteOffset: 4, as: UInt32.self)
        header.storeBytes(of: record.sequence, toByteOffset: 8, as: UInt64.self)
        header.storeBytes(of: record.offset, toByteOffset: 16, as: UInt64.self)
        header.storeBytes(of: record.length, toByteOffset: 24, as: UInt64.self)
        header.storeBytes(of: record.time, toByteOffset: 32, as: UInt64.self)
        header.storeBytes(of: record.check, toByteOffset: 40, as: UInt64.self)
    }

    /// Appends a write (payload) or zeroing (nil) — or, when the journal is full or the
    /// region map is already in charge, marks the range dirty there instead. Returns
    /// whether the write was journalled.
    @discardableResult
    func record(offset: UInt64, length: Int, payload: UnsafeRawPointer?, orMarkIn regions: RegionMap) -> Bool {
        lock.withLock {
            var record = Record(kind: payload == nil ? Record.zeroes : Record.write, sequence: 0, offset: offset,
                                length: UInt64(length), time: wallClockNanoseconds())
            let position = tail % capacity
            let skip = capacity - position < record.size ? capacity - position : 0
            guard !regions.isOverflowing, (tail - head) + skip + record.size <= capacity else {
                regions.beginWrite(offset: offset, length: UInt64(length))
                return false
            }
            if skip > 0 {
                if skip >= UInt64(Record.headerSize) {
                    writeHeader(Record(kind: Record.wrap, sequence: nextSequence, offset: 0, length: 0, time: 0), at: position)
                    nextSequence += 1
                }
                tail += skip
            }
            record.sequence = nextSequence
            nextSequence += 1
            let at = tail % capacity
            // Payload first: the header is the commit, so a record cut short by a crash
            // is never found again.
            if let payload { memcpy(ring + Int(at) + Record.headerSize, payload, length) }
            writeHeader(record, at: at)
            tail += record.size
            return true
        }
    }

    /// A run of records from where shipping stands, with payloads in place in the ring
    /// (appends never touch them until `makeDurable` moves the head past them). The run stops before
    /// a record overlapping an earlier one in it, so that the run may be sent to the
    /// replica all at once, in any completion order.
    struct Batch {
        var records: [(record: Record, payload: UnsafeRawPointer)] = []
        var end: UInt64 = 0
        var endSequence: UInt64 = 0
        var bytes: UInt64 { records.reduce(0) { $0 + $1.record.length } }
    }

    /// Called by the shipper only. The lock is held just to read the ends: only the
    /// shipper moves the heads, and appends never touch the records between head and
    /// tail, so the walk itself runs beside the guest's appends instead of holding
    /// them up.
    func peek(max count: Int) -> Batch? {
        // The start under the lock too: a failed replica rewinds it from another thread.
        let (limit, start) = lock.withLock { (tail, (shipped, shippedSequence)) }
        var batch = Batch()
        batch.records.reserveCapacity(count)
        walk(from: start, until: limit) { record, payload, end, endSequence in
            let range = record.offset..<(record.offset + max(record.length, 1))
            guard batch.records.count < count, !batch.records.contains(where: {
                ($0.record.offset..<($0.record.offset + max($0.record.length, 1))).overlaps(range)
            }) else { return false }
            batch.records.append((record, payload))
            batch.end = end
            batch.endSequence = endSequence
            return true
        }
        return batch.records.isEmpty ? nil : batch
    }

    /// Drops every record still to ship, once their ranges are marked dirty elsewhere:
    /// sync mode ships nothing from the journal, so what async mode left there would
    /// otherwise wait forever (and hold the state at degraded).
    func dropPending() { startEmpty(at: nil) }

    /// Drops every record: the head moves to `position` (the tail when nil) and takes
    /// the next sequence number, which no record in the ring has yet.
    private func startEmpty(at position: UInt64?) {
        lock.withLock {
            head = position ?? tail
            headSequence = nextSequence
            tail = head
            (shipped, shippedSequence) = (head, headSequence)
            persistHead()
        }
    }

    /// A batch reached the replica: the next one follows it. Nothing is dropped yet.
    func advance(past batch: Batch) {
        lock.withLock { (shipped, shippedSequence) = (batch.end, batch.endSequence) }
    }

    /// Where shipping stands: pass it to `makeDurable` once the replica has flushed.
    var shippedMark: (position: UInt64, sequence: UInt64) { lock.withLock { (shipped, shippedSequence) } }

    /// Bytes on the replica that it has not been asked to flush yet.
    var unflushedBytes: UInt64 { lock.withLock { shipped - head } }

    /// The replica flushed everything shipped up to `mark`: drop those records and
    /// persist the new head.
    func makeDurable(upTo mark: (position: UInt64, sequence: UInt64)) {
        lock.withLock {
            guard mark.position > head else { return }
            (head, headSequence) = mark
            persistHead()
        }
    }

    /// The replica went away: what it acknowledged without a flush may be gone with
    /// it, so shipping starts again from the persisted head.
    func rewindToDurable() {
        lock.withLock { (shipped, shippedSequence) = (head, headSequence) }
    }

    private func persistHead() {
        let words = state + 1 + 3 * nextSlot
        words[0] = head
        words[1] = headSequence
        words[2] = checkWord(head, headSequence)
        state[0] = Self.stateMagic
        nextSlot = 1 - nextSlot
    }

    var pendingBytes: UInt64 { lock.withLock { tail - head } }

    /// Seconds since the oldest record still to ship was written (0 when empty).
    var oldestPendingAge: Double {
        lock.withLock {
            guard head < tail, let record = readHeader(at: head % capacity), record.kind != Record.wrap else { return 0 }
            return Double(wallClockNanoseconds() &- record.time) / 1e9
        }
    }

    /// Flips the region map back to journalling once nothing is pending anywhere.
    func resumeJournallingIfClean(_ regions: RegionMap) -> Bool {
        lock.withLock { head == tail && regions.leaveOverflowIfClean() }
    }

    func sync() {
        msync(ring, Int(capacity), MS_SYNC)
        msync(state, 4096, MS_SYNC)
    }

    func close() {
        lock.withLock { persistHead() }
        munmap(ring, Int(capacity))
        munmap(state, 4096)
        Glibc.close(dataFD)
        Glibc.close(stateFD)
    }
}

/// A word that adds up only over the very words it was computed from (a 64-bit mix in the
/// manner of FNV-1a, word by word): a header or head slot that a crash cut short fails it.
/// Fixed arity rather than variadic: it runs on every journalled write.
func checkWord(_ a: UInt64, _ b: UInt64, _ c: UInt64 = 0, _ d: UInt64 = 0, _ e: UInt64 = 0) -> UInt64 {
    func mix(_ hash: UInt64, _ word: UInt64) -> UInt64 {
        let product = (hash ^ word) &* 0x0000_0100_0000_01B3
        return product ^ (product >> 29)
    }
    return mix(mix(mix(mix(mix(0xCBF2_9CE4_8422_2325, a), b), c), d), e)
}

func wallClockNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}

/// One byte per region of the disk, persisted in `regions.map` (mapped shared, after a
/// header naming the region size): 1 means the replica may lack that region's current
/// contents. A map written for another region size or disk size is distrusted: every
/// region is resynced. While any region is dirty the journal is
/// bypassed ("overflowing"), so that a region resync never races an older journal record.
final class RegionMap: @unchecked Sendable {
    // @unchecked: all state is guarded by `lock`.
    let regionSize: UInt64
    let count: Int
    let diskSize: UInt64
    private let fd: Int32
    private let lock = ConditionLock()
    private let mapping: UnsafeMutableRawPointer
    private let bytes: UnsafeMutablePointer<UInt8>
    private var generations: [UInt32]
    /// Writes marked here that have not reached the disk yet, per region: such a region
    /// stays dirty even if a resync copies it meanwhile (it may have read the old bytes).
    private var writesInFlight: [UInt16]
    private static let headerSize = 24
    private static let magic: UInt64 = 0x494F_4652_4547_4E31  // "IOFREGN1"
    private var dirty = 0
    private var overflowing = false
    private var dirtySince: UInt64 = 0
    private var cursor = 0

    init(directory: String, diskSize: UInt64, regionSize: UInt64) throws(FilterError) {
        self.regionSize = regionSize
        self.diskSize = diskSize
        count = Int((diskSize + regionSize - 1) / regionSize)
        fd = open("\(directory)/regions.map", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FilterError(errno, "cannot open the region map in \(directory)") }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw FilterError(code, "cannot stat the region map in \(directory)")
        }
        let size = Self.headerSize + count
        let existed = info.st_size > 0
        guard ftruncate(fd, off_t(size)) == 0,
              // Populated now rather than faulted in page by page on the data path.
              let mapped = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0), mapped != MAP_FAILED
        else { throw FilterError(errno, "cannot map the region map: \(String(cString: strerror(errno)))") }
        mapping = mapped
        bytes = (mapped + Self.headerSize).bindMemory(to: UInt8.self, capacity: count)
        generations = [UInt32](repeating: 0, count: count)
        writesInFlight = [UInt16](repeating: 0, count: count)
        let header = mapped.bindMemory(to: UInt64.self, capacity: 3)
        if header[0] != Self.magic || header[1] != regionSize || header[2] != diskSize {
            // New, or written for another layout: nothing in it can be trusted.
            memset(bytes, existed ? 1 : 0, count)
            header[1] = regionSize
            header[2] = diskSize
            header[0] = Self.magic
        }
        for region in 0..<count where bytes[region] != 0 { dirty += 1 }
        overflowing = dirty > 0
        dirtySince = dirty > 0 ? wallClockNanoseconds() : 0
    }

    var isOverflowing: Bool { lock.withLock { overflowing } }
    var dirtyCount: Int { lock.withLock { dirty } }
    var oldestDirtyAge: Double { lock.withLock { dirty > 0 ? Double(wallClockNanoseconds() &- dirtySince) / 1e9 : 0 } }

    func mark(offset: UInt64, length: UInt64) {
        lock.withLock { markLocked(offset: offset, length: length) }
    }

    /// (lock held)
    private func markLocked(offset: UInt64, length: UInt64) {
        guard offset < diskSize else { return }
        let first = Int(offset / regionSize)
        let last = Int((offset + max(length, 1) - 1) / regionSize)
        overflowing = true
        for region in first...min(last, count - 1) {
            generations[region] &+= 1
            if bytes[region] == 0 {
                bytes[region] = 1
                if dirty == 0 { dirtySince = wallClockNanoseconds() }
                dirty += 1
            }
        }
    }

    func markAll() {
        mark(offset: 0, length: diskSize)
    }

    /// A write that the map tracks instead of the journal (or replica) is on its way to
    /// the disk: mark its regions dirty and keep them so until `endWrite`.
    func beginWrite(offset: UInt64, length: UInt64) {
        // One critical section: a resync must never see the mark without the count, or it
        // could copy the old bytes and call the region clean before this write lands.
        lock.withLock {
            markLocked(offset: offset, length: length)
            for region in regions(offset: offset, length: length) { writesInFlight[region] &+= 1 }
        }
    }

    /// The write reached the disk (or failed): a resync from now on reads its bytes.
    func endWrite(offset: UInt64, length: UInt64) {
        lock.withLock {
            for region in regions(offset: offset, length: length) {
                writesInFlight[region] &-= 1
                generations[region] &+= 1  // a copy that started before this is stale
            }
        }
    }

    private func regions(offset: UInt64, length: UInt64) -> ClosedRange<Int> {
        let first = Int(min(offset / regionSize, UInt64(count - 1)))
        let last = Int(min((offset + max(length, 1) - 1) / regionSize, UInt64(count - 1)))
        return first...last
    }

    /// A run of contiguous dirty regions, with the generation each had when handed out.
    struct Run {
        var first: Int
        var generations: [UInt32]
    }

    /// The next run of dirty regions after the last one handed out, at most `maxRegions`
    /// long: an initial sync copies large runs, a resync after scattered writes copies
    /// only the regions they touched.
    func nextDirtyRun(maxRegions: Int) -> Run? {
        lock.withLock {
            guard dirty > 0 else { return nil }
            for step in 0..<count {
                let region = (cursor + step) % count
                guard bytes[region] != 0 else { continue }
                var run = Run(first: region, generations: [])
                var next = region
                while next < count && bytes[next] != 0 && run.generations.count < maxRegions {
                    run.generations.append(generations[next])
                    next += 1
                }
                cursor = next
                return run
            }
            return nil
        }
    }

    /// The run was copied; each region is clean unless a write touched it meanwhile.
    func shipped(_ run: Run) {
        lock.withLock {
            for (index, generation) in run.generations.enumerated() {
                let region = run.first + index
                guard generations[region] == generation, writesInFlight[region] == 0, bytes[region] != 0 else { continue }
                bytes[region] = 0
                dirty -= 1
            }
        }
    }

    func leaveOverflowIfClean() -> Bool {
        lock.withLock {
            if dirty == 0 { overflowing = false }
            return !overflowing
        }
    }

    func sync() { msync(mapping, Self.headerSize + count, MS_SYNC) }

    func close() {
        munmap(mapping, Self.headerSize + count)
        Glibc.close(fd)
    }
}
