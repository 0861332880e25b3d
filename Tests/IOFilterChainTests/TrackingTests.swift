@preconcurrency import CIOFilter
import Glibc
import IOFilterPosix
import IOFilterTracking
import Synchronization
import Testing

@testable import IOFilterChain

/// Changed-block tracking's bitmaps on real files, and a point-in-time copy taken while
/// writers race it, in process (these run under ThreadSanitizer too).
@Suite("tracking and point-in-time copies")
struct TrackingTests {
    static func scratch(_ name: String) -> String {
        let path = "/tmp/iofilter-tracking-\(getpid())-\(name)-\(UInt32.random(in: 0...UInt32.max))"
        mkdir(path, 0o700)
        return path
    }

    static func runs(_ bitmap: ChangeBitmap, _ offset: UInt64 = 0, _ length: UInt64? = nil) -> [[UInt64]] {
        var result: [[UInt64]] = []
        var position = offset
        bitmap.runs(offset: offset, length: length ?? bitmap.diskSize) { length, changed in
            result.append([position, length, changed ? 1 : 0])
            position += length
            return true
        }
        return result
    }

    @Test func aBitmapMarksGranulesAndKeepsThemInItsFile() throws {
        let directory = CheckpointDirectory(diskState: Self.scratch("bits"))
        let size: UInt64 = 10 << 20 + 4096  // a last granule that is cut short
        let bitmap = try directory.create("c1", granularity: 64 << 10, diskSize: size)
        #expect(Self.runs(bitmap) == [[0, size, 0]] && bitmap.changedBytes == 0)
        bitmap.mark(offset: 100, length: 1)  // granule 0
        bitmap.mark(offset: (4 << 20) - 1, length: 2)  // the end of granule 63, the start of 64
        bitmap.mark(offset: size - 1, length: 1)  // the short last granule
        bitmap.mark(offset: size, length: 4096)  // past the end: nothing
        let granule: UInt64 = 64 << 10
        let middle: UInt64 = 4 << 20
        let expected: [[UInt64]] = [
            [0, granule, 1], [granule, middle - 2 * granule, 0], [middle - granule, 2 * granule, 1],
            [middle + granule, size - 4096 - middle - granule, 0], [size - 4096, 4096, 1],
        ]
        #expect(Self.runs(bitmap) == expected)
        #expect(bitmap.changedBytes == 3 * (64 << 10) + 4096)
        // Runs start where asked and are clipped to the range.
        #expect(Self.runs(bitmap, 32 << 10, 64 << 10) == [[32 << 10, 32 << 10, 1], [64 << 10, 32 << 10, 0]])
        // Long runs cross whole words.
        bitmap.mark(offset: 0, length: 8 << 20)
        #expect(Self.runs(bitmap, 0, 9 << 20) == [[0, 8 << 20, 1], [8 << 20, 1 << 20, 0]])
        bitmap.closeCleanly()

        let again = try ChangeBitmap.open(path: directory.file("c1"), name: "c1", use: .track)
        #expect(again.granularity == 64 << 10 && again.diskSize == size && again.inconsistency == nil)
        #expect(Self.runs(again, 0, 9 << 20) == [[0, 8 << 20, 1], [8 << 20, 1 << 20, 0]])
        // A second checkpoint and the order they are listed in.
        _ = try directory.create("c0", granularity: 4096, diskSize: size)
        #expect(directory.names() == ["c1", "c0"])
        #expect(throws: ChangeBitmap.Failure.exists("c0")) { try directory.create("c0", granularity: 4096, diskSize: size) }
        #expect(throws: ChangeBitmap.Failure.badGranularity(3000)) { try directory.create("c2", granularity: 3000, diskSize: size) }
        // A frozen copy holds the bits of the moment and cannot be marked.
        let frozen = try CheckpointDirectory(diskState: Self.scratch("frozen")).create("c1", granularity: 64 << 10, diskSize: size,
                                                                                       frozen: true, copying: again)
        again.mark(offset: 9 << 20, length: 1)
        #expect(frozen.isFrozen && !frozen.canMark && frozen.changedBytes == (8 << 20) + 4096)
    }

    @Test func aBitmapLeftInUseByAnotherBootOfTheMachineIsInconsistent() throws {
        let directory = CheckpointDirectory(diskState: Self.scratch("boot"))
        let path = directory.file("c")
        do {
            let bitmap = try directory.create("c", granularity: 4096, diskSize: 1 << 20)
            bitmap.mark(offset: 0, length: 1)
        }
        // Opened to track and never closed (a worker killed): same boot, still trusted.
        do { _ = try ChangeBitmap.open(path: path, name: "c", use: .track) }
        let reopened = try ChangeBitmap.open(path: path, name: "c", use: .track)
        #expect(reopened.inconsistency == nil && reopened.changedBytes == 4096)
        // Now as if another boot had it in use.
        let fd = open(path, O_RDWR)
        var boot = Array("11111111-2222-3333-4444-555555555555".utf8) + [0]
        #expect(pwrite(fd, &boot, boot.count, 40) == boot.count)
        close(fd)
        let reader = try ChangeBitmap.open(path: path, name: "c", use: .read)
        #expect(reader.lostWithTheMachine)
        let tracker = try ChangeBitmap.open(path: path, name: "c", use: .track)
        #expect(tracker.inconsistency?.contains("machine went down") == true)
        tracker.closeCleanly()
        #expect(try ChangeBitmap.open(path: path, name: "c", use: .read).inconsistency != nil, "inconsistent for good")
        // Not a bitmap at all.
        let junk = directory.path + "/junk.bitmap"
        FILE.write(junk, String(repeating: "x", count: 8192))
        #expect(throws: ChangeBitmap.Failure.malformed("\(junk) is no change bitmap (bad magic)")) {
            try ChangeBitmap.open(path: junk, name: "junk", use: .read)
        }
    }

    /// Writers hammer the disk while a copy preserves the instant: the snapshot's file
    /// ends up exactly the disk as it was, and reads of the snapshot meanwhile see it too.
    @Test func aPointInTimeCopyHoldsTheInstantWhileWritersRace() throws {
        let size: UInt64 = 8 << 20
        let test = try TestChain([], size: size)
        for index in 0..<Int(size / 8) { test.backend.bytes.storeBytes(of: UInt64(index), toByteOffset: index * 8, as: UInt64.self) }
        nonisolated(unsafe) let instant = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { instant.deallocate() }
        memcpy(instant, test.backend.bytes, Int(size))
        let targetPath = Self.scratch("copy") + "/data.img"
        let target = open(targetPath, O_RDWR | O_CREAT | O_EXCL, 0o600)
        #expect(ftruncate(target, off_t(size)) == 0)
        let copy = PointInTimeCopy(name: "s", chain: test.chain, target: target, frozenBitmaps: [], bytesPerSecond: 16 << 20,
                                   logger: test.log.logger)
        test.chain.tracker.preserve(for: copy)
        copy.startCopying()

        let stop = Atomic<Bool>(false)
        let writes = Atomic<Int>(0)
        let mismatches = Atomic<Int>(0)
        let group = ThreadGroup()
        // Four writers, each in a quarter of its own (the memory disk is not a file
        // system: overlapping writes would race in it), at odd offsets and lengths.
        for writer in 0..<4 {
            group.start { [test] in
                var random = SystemRandomNumberGenerator()
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: 96 << 10, alignment: 4096)
                defer { buffer.deallocate() }
                memset(buffer, Int32(0xA0 + writer), 96 << 10)
                let quarter = size / 4
                while !stop.load(ordering: .relaxed) {
                    let length = UInt64.random(in: 1...(96 << 10), using: &random)
                    let offset = UInt64(writer) * quarter + UInt64.random(in: 0...(quarter - length), using: &random)
                    test.chain.tracker.willModify(offset: offset, length: length)
                    #expect(test.send(IOF_OP_WRITE, offset: offset, length: length, buffer: buffer) == 0)
                    writes.add(1, ordering: .relaxed)
                }
            }
        }
        // A reader of the snapshot: always the instant.
        group.start {
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: 64 << 10, alignment: 4096)
            defer { buffer.deallocate() }
            while !stop.load(ordering: .relaxed) {
                let length = Int.random(in: 1...(64 << 10))
                let offset = UInt64.random(in: 0...(size - UInt64(length)))
                if copy.read(into: buffer, offset: offset, length: length) != 0 || memcmp(buffer, instant + Int(offset), length) != 0 {
                    mismatches.add(1, ordering: .relaxed)
                }
            }
        }
        let deadline = monotonicNanoseconds() + 60_000_000_000
        while copy.status == .copying && monotonicNanoseconds() < deadline { usleep(10_000) }
        stop.store(true, ordering: .relaxed)
        group.wait()
        #expect(copy.status == .complete)
        #expect(writes.load(ordering: .relaxed) > 100 && mismatches.load(ordering: .relaxed) == 0)
        let copied = UnsafeMutableRawPointer.allocate(byteCount: Int(size), alignment: 4096)
        defer { copied.deallocate() }
        #expect(FileDescriptorIO.preadAll(copy.targetFD, into: copied, count: Int(size), offset: 0) == 0)
        #expect(memcmp(copied, instant, Int(size)) == 0, "the snapshot is the disk at its instant")
        #expect(memcmp(test.backend.bytes, instant, Int(size)) != 0, "the writers did change the disk")
        #expect(test.chain.tracker.copies.isEmpty, "a complete copy preserves nothing more")
    }
}

/// Threads a test starts and waits for.
final class ThreadGroup: @unchecked Sendable {
    private let lock = ConditionLock()
    private var running = 0

    func start(_ body: @escaping @Sendable () -> Void) {
        lock.withLock { running += 1 }
        startThread(name: "test") { [self] in
            body()
            lock.withLock {
                running -= 1
                lock.broadcast()
            }
        }
    }

    func wait() { lock.withLock { while running > 0 { lock.wait() } } }
}

enum FILE {
    static func write(_ path: String, _ text: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        _ = text.utf8CString.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, text.utf8.count) }
        close(fd)
    }
}
