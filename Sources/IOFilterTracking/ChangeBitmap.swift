import CSystemShims
import Glibc
import IOFilterPosix

/// One checkpoint's record of which parts of a disk changed since it was made: one bit
/// per `granularity` bytes, in a file beside the disk, mapped shared so that a bit set
/// by a worker is in the page cache the moment it is set. A worker killed with -9
/// loses none; only the machine going down can lose bits that were not yet written
/// back, which is why a bitmap records the boot it is in use in (see `open`).
///
/// File layout (little-endian): a 4 KiB header, then the bits as 64-bit words.
///
///     0   "IOFCBT01"        magic
///     8   u32 version (1)   12  u32 flags (in use, inconsistent, frozen)
///     16  u64 granularity   24  u64 disk size
///     32  u64 created at (ns since the epoch)
///     40  boot id of the run that has it in use (37 bytes, NUL-terminated)
///     96  why it is inconsistent (256 bytes, NUL-terminated)
public final class ChangeBitmap: @unchecked Sendable {
    // @unchecked: the header is changed only by the owner (create/open/close, under the
    // caller's own order); bits are set with atomic OR from any thread.
    public let name: String
    public let path: String
    public let granularity: UInt64
    public let diskSize: UInt64
    public let createdAt: UInt64
    private let fd: Int32
    private let mapping: UnsafeMutableRawPointer
    private let mappedBytes: Int
    private let words: UnsafeMutablePointer<UInt64>
    private let wordCount: Int
    private let bitCount: UInt64
    private let writable: Bool
    /// log2(granularity): granularity is a power of two, so a shift finds a bit.
    private let shift: UInt64

    public static let headerBytes = 4096
    public static let defaultGranularity: UInt64 = 64 << 10
    static let magic: [UInt8] = Array("IOFCBT01".utf8)
    static let inUseFlag: UInt32 = 1
    static let inconsistentFlag: UInt32 = 2
    static let frozenFlag: UInt32 = 4

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case exists(String)
        case badGranularity(UInt64)
        case io(String)
        case malformed(String)

        public var description: String {
            switch self {
            case .exists(let name): "checkpoint \(name) exists"
            case .badGranularity(let value):
                "granularity \(value) is not a power of two between 4 KiB and 64 MiB"
            case .io(let message): message
            case .malformed(let message): message
            }
        }
    }

    /// How a bitmap is opened: to mark changes in (a worker serving the disk), or to
    /// read (the host listing checkpoints, a snapshot's frozen copy).
    public enum Use { case track, read }

    private init(name: String, path: String, fd: Int32, mapping: UnsafeMutableRawPointer, mappedBytes: Int, writable: Bool) {
        self.name = name
        self.path = path
        self.fd = fd
        self.mapping = mapping
        self.mappedBytes = mappedBytes
        self.writable = writable
        granularity = mapping.loadUnaligned(fromByteOffset: 16, as: UInt64.self)
        diskSize = mapping.loadUnaligned(fromByteOffset: 24, as: UInt64.self)
        createdAt = mapping.loadUnaligned(fromByteOffset: 32, as: UInt64.self)
        bitCount = (diskSize + granularity - 1) / granularity
        wordCount = Int((bitCount + 63) / 64)
        words = (mapping + Self.headerBytes).bindMemory(to: UInt64.self, capacity: max(wordCount, 1))
        shift = UInt64(granularity.trailingZeroBitCount)
    }

    deinit {
        munmap(mapping, mappedBytes)
        Glibc.close(fd)
    }

    public static func isValidGranularity(_ value: UInt64) -> Bool {
        value.nonzeroBitCount == 1 && value >= 4096 && value <= 64 << 20
    }

    static func fileBytes(diskSize: UInt64, granularity: UInt64) -> Int {
        let bits = (diskSize + granularity - 1) / granularity
        return headerBytes + Int((bits + 63) / 64) * 8
    }

    /// Makes a new, clean bitmap file (O_EXCL: an existing one is an error) and maps it.
    /// A frozen one records no more changes (a snapshot's copy of its source's bitmap).
    public static func create(path: String, name: String, granularity: UInt64, diskSize: UInt64, frozen: Bool = false,
                              copying source: ChangeBitmap? = nil) throws(Failure) -> ChangeBitmap {
        guard isValidGranularity(granularity) else { throw .badGranularity(granularity) }
        let fd = Glibc.open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else {
            if errno == EEXIST { throw .exists(name) }
            throw .io("cannot create \(path): \(String(cString: strerror(errno)))")
        }
        let bytes = fileBytes(diskSize: diskSize, granularity: granularity)
        var header = [UInt8](repeating: 0, count: headerBytes)
        header.replaceSubrange(0..<8, with: magic)
        header.storeLE(UInt32(1), at: 8)
        header.storeLE(frozen ? frozenFlag : 0, at: 12)
        header.storeLE(granularity, at: 16)
        header.storeLE(diskSize, at: 24)
        header.storeLE(wallClockNanoseconds(), at: 32)
        guard ftruncate(fd, off_t(bytes)) == 0,
              FileDescriptorIO.pwriteAll(fd, header, count: header.count, offset: 0) == 0 else {
            let message = String(cString: strerror(errno))
            Glibc.close(fd)
            unlink(path)
            throw .io("cannot write \(path): \(message)")
        }
        let bitmap: ChangeBitmap
        do {
            bitmap = try map(fd: fd, path: path, name: name, bytes: bytes, writable: true)
        } catch {
            unlink(path)
            throw error
        }
        if let source {
            // A snapshot's frozen copy: the source's bits at this instant (its caller
            // holds the disk's writes back), and its consistency.
            memcpy(bitmap.words, source.words, min(bitmap.wordCount, source.wordCount) * 8)
            if let reason = source.inconsistency { bitmap.markInconsistent(reason) }
        }
        guard bitmap.sync() == 0, fsync(fd) == 0 else {
            unlink(path)
            throw .io("cannot sync \(path): \(String(cString: strerror(errno)))")
        }
        return bitmap
    }

    /// Opens an existing bitmap. To `.track` in it: if a run of this machine's current
    /// boot had it in use, that run ended without closing it (a worker killed), and
    /// every bit it set is in the page cache; if a run of another boot had it in use,
    /// the machine went down and bits may be lost: it is marked inconsistent for good.
    public static func open(path: String, name: String, use: Use) throws(Failure) -> ChangeBitmap {
        let writable = use == .track
        let fd = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw .io("cannot open \(path): \(String(cString: strerror(errno)))") }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size >= headerBytes else {
            Glibc.close(fd)
            throw .malformed("\(path) is no change bitmap (too short)")
        }
        let bitmap = try map(fd: fd, path: path, name: name, bytes: Int(info.st_size), writable: writable)
        guard isValidGranularity(bitmap.granularity),
              Int(info.st_size) >= fileBytes(diskSize: bitmap.diskSize, granularity: bitmap.granularity) else {
            throw .malformed("\(path) has a header that does not fit its size")
        }
        if writable && !bitmap.isFrozen {
            let boot = currentBootID()
            if bitmap.flags & inUseFlag != 0, let owner = bitmap.bootID, owner != boot {
                bitmap.markInconsistent("the machine went down while a worker tracked changes (boot \(owner.prefix(8)))")
            }
            bitmap.setBootID(boot)
            bitmap.flags |= inUseFlag
            _ = bitmap.sync()
        }
        return bitmap
    }

    private static func map(fd: Int32, path: String, name: String, bytes: Int, writable: Bool) throws(Failure) -> ChangeBitmap {
        let protection = writable ? PROT_READ | PROT_WRITE : PROT_READ
        guard let mapping = mmap(nil, bytes, protection, MAP_SHARED, fd, 0), mapping != MAP_FAILED else {
            let message = String(cString: strerror(errno))
            Glibc.close(fd)
            throw .io("cannot map \(path): \(message)")
        }
        guard Array(UnsafeRawBufferPointer(start: mapping, count: 8)) == magic else {
            munmap(mapping, bytes)
            Glibc.close(fd)
            throw .malformed("\(path) is no change bitmap (bad magic)")
        }
        return ChangeBitmap(name: name, path: path, fd: fd, mapping: mapping, mappedBytes: bytes, writable: writable)
    }

    // MARK: the header

    private var flags: UInt32 {
        get { mapping.loadUnaligned(fromByteOffset: 12, as: UInt32.self) }
        set { mapping.storeBytes(of: newValue, toByteOffset: 12, as: UInt32.self) }
    }

    public var isFrozen: Bool { flags & Self.frozenFlag != 0 }

    /// Whether changes may be marked in it: opened to track, and not a frozen copy.
    public var canMark: Bool { writable && !isFrozen }

    /// Why the bitmap may have missed changes, or nil while it is trustworthy.
    public var inconsistency: String? {
        guard flags & Self.inconsistentFlag != 0 else { return nil }
        let text = Self.string(at: mapping + 96, capacity: 256)
        return text.isEmpty ? "it may have missed changes" : text
    }

    /// A worker of another boot of this machine had it in use and never closed it: the
    /// next worker to track in it finds it inconsistent (see `open`).
    public var lostWithTheMachine: Bool {
        guard flags & Self.inUseFlag != 0, inconsistency == nil, let owner = bootID else { return false }
        return owner != Self.currentBootID()
    }

    private var bootID: String? {
        let text = Self.string(at: mapping + 40, capacity: 37)
        return text.isEmpty ? nil : text
    }

    private func setBootID(_ boot: String) {
        Self.storeString(boot, at: mapping + 40, capacity: 37)
    }

    /// From now on the bitmap says it cannot be trusted: clients are not offered it.
    public func markInconsistent(_ reason: String) {
        guard writable else { return }
        Self.storeString(reason, at: mapping + 96, capacity: 256)
        flags |= Self.inconsistentFlag
    }

    // MARK: bits

    /// Records that [offset, offset+length) changed. Called on every write, so it sets
    /// only words that lack a bit (no cache line bouncing between connection threads
    /// that write the same region).
    @inline(__always)
    public func mark(offset: UInt64, length: UInt64) {
        guard length > 0, offset < diskSize else { return }
        let first = offset >> shift
        let last = min((offset + length - 1) >> shift, bitCount - 1)
        var bit = first
        while bit <= last {
            let word = Int(bit >> 6)
            let from = bit & 63
            let to = min(63, from + (last - bit))
            let mask = to == 63 ? ~UInt64(0) << from : ((UInt64(1) << (to - from + 1)) - 1) << from
            if words[word] & mask != mask { iof_or_u64(words + word, mask) }
            bit += to - from + 1
        }
    }

    /// Marks the whole disk changed (its contents were replaced: a revert).
    public func markAll() { mark(offset: 0, length: diskSize) }

    @inline(__always)
    func isDirty(bit: UInt64) -> Bool { words[Int(bit >> 6)] & (UInt64(1) << (bit & 63)) != 0 }

    /// Calls `emit` with runs of [offset, offset+length), clipped to the disk, each
    /// changed or not, contiguous from `offset`; stops when `emit` returns false.
    public func runs(offset: UInt64, length: UInt64, _ emit: (_ length: UInt64, _ changed: Bool) -> Bool) {
        let stop = min(offset + length, diskSize)
        var position = offset
        while position < stop {
            let bit = position >> shift
            let changed = isDirty(bit: bit)
            var next = bit + 1
            // Whole words at a time across long runs.
            while next < bitCount {
                if next & 63 == 0 {
                    let word = words[Int(next >> 6)]
                    if word == (changed ? ~UInt64(0) : 0) && next + 64 <= bitCount {
                        next += 64
                        continue
                    }
                }
                if isDirty(bit: next) != changed { break }
                next += 1
            }
            let runEnd = min(next << shift, stop)
            if !emit(runEnd - position, changed) { return }
            position = runEnd
        }
    }

    /// Bytes marked changed (whole granules; the last one clipped to the disk).
    public var changedBytes: UInt64 {
        var bits: UInt64 = 0
        for index in 0..<wordCount { bits += UInt64(words[index].nonzeroBitCount) }
        var bytes = bits * granularity
        if bitCount > 0 && isDirty(bit: bitCount - 1) { bytes -= bitCount * granularity - diskSize }
        return bytes
    }

    /// Writes the mapping back to the file: 0 or an errno.
    @discardableResult
    public func sync() -> Int32 {
        guard writable else { return 0 }
        return msync(mapping, mappedBytes, MS_SYNC) == 0 ? 0 : errno
    }

    /// A clean stop of the run that tracked in it: written back, no longer in use.
    public func closeCleanly() {
        guard writable, !isFrozen else { return }
        _ = sync()
        flags &= ~Self.inUseFlag
        _ = sync()
    }

    // MARK: helpers

    static func string(at pointer: UnsafeMutableRawPointer, capacity: Int) -> String {
        let bytes = UnsafeRawBufferPointer(start: pointer, count: capacity)
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    static func storeString(_ text: String, at pointer: UnsafeMutableRawPointer, capacity: Int) {
        let bytes = Array(text.utf8.prefix(capacity - 1))
        memset(pointer, 0, capacity)
        _ = bytes.withUnsafeBytes { memcpy(pointer, $0.baseAddress!, bytes.count) }
    }

    /// This boot of the machine (changes at every boot).
    static func currentBootID() -> String {
        FileDescriptorIO.readFile("/proc/sys/kernel/random/boot_id").map { String($0.filter { !$0.isWhitespace }) } ?? "unknown"
    }

    static func wallClockNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
    }
}

extension [UInt8] {
    mutating func storeLE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        withUnsafeMutableBytes { $0.storeBytes(of: value.littleEndian, toByteOffset: offset, as: T.self) }
    }
}
