import Foundation
import Testing

/// The Swift samples (replication, cache) as a partner would ship them: built by
/// SwiftPM with the SDK, loaded in sandboxed workers, driven by real clients.
@Suite("sample plug-ins", .serialized)
struct SamplePluginTests {
    let directory = Harness.temporaryDirectory("samples")
    static var replication: String { Harness.binDirectory.appendingPathComponent("libiofilter-replication.so").path }
    static var cache: String { Harness.binDirectory.appendingPathComponent("libiofilter-cache.so").path }
    static var template: String { Harness.binDirectory.appendingPathComponent("libiofilter-template.so").path }

    func image(_ name: String, size: Int = 64 << 20) -> String {
        Harness.makeImage(directory.appendingPathComponent(name).path, size: size)
    }

    func fio(_ uri: String, _ extra: [String]) throws {
        try Harness.check(Harness.tool("fio"), ["--name=job", "--ioengine=nbd", "--uri=\(uri)", "--bs=4k", "--iodepth=16",
                                               "--output-format=terse"] + extra)
    }

    /// Polls until the two files are identical (the replica converges), or fails.
    func waitUntilIdentical(_ a: String, _ b: String, timeout: Double = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var last = ""
        while Date() < deadline {
            // -U: a replica served by qemu-nbd is locked; compare without taking locks.
            let result = try Harness.run(Harness.tool("qemu-img"), ["compare", "-U", "-f", "raw", "-F", "raw", a, b])
            if result.status == 0 { return }
            last = result.stdout + result.stderr
            usleep(250_000)
        }
        throw HarnessError("\(a) and \(b) never became identical: \(last)")
    }


    // MARK: SDK

    @Test func swiftPluginsValidateAsOneChainWithTheCSample() throws {
        let passthrough = Harness.binDirectory.appendingPathComponent("libiofilter-passthrough-c.so").path
        let result = try Harness.run(Harness.iofilter, ["plugin", "validate", "--json", Self.cache, Self.replication, passthrough])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("\"chain\":[{\"category\":\"inspection\",\"name\":\"org.swift-iofilter.passthrough-c\"},"
                                       + "{\"category\":\"replication\",\"name\":\"org.swift-iofilter.replication\"},"
                                       + "{\"category\":\"cache\",\"name\":\"org.swift-iofilter.cache\"}]"))
        let template = try Harness.run(Harness.iofilter, ["plugin", "validate", Self.template])
        #expect(template.status == 0)
        let status = try Harness.check(Harness.iofilter, ["plugin", "call", Self.replication, "status"])
        #expect(status == "no replicated disks are open in this process\n")
    }

    /// A plug-in links what it uses: the sandbox's libraries (libseccomp) and the host's
    /// (libffi, SQLite) belong to the worker and the host, never to a plug-in, and only a
    /// plug-in that speaks TLS (the replication sample, through IOFilterSDKTLS) links
    /// GnuTLS.
    @Test func samplePluginsLinkOnlyWhatTheyUse() throws {
        for (plugin, speaksTLS) in [(Self.cache, false), (Self.template, false), (Self.replication, true)] {
            let dynamic = try Harness.check("/usr/bin/readelf", ["-d", plugin])
            let needed = dynamic.split(separator: "\n").filter { $0.contains("(NEEDED)") }
            #expect(!needed.isEmpty, "\(plugin): \(dynamic)")
            for library in ["libseccomp", "libffi", "libsqlite3", "libhogweed"] {
                #expect(!needed.contains { $0.contains(library) }, "\(plugin) links \(library): \(needed)")
            }
            #expect(needed.contains { $0.contains("libgnutls") } == speaksTLS, "\(plugin): \(needed)")
        }
    }

    @Test func theTemplateRunsUnderFioVerify() throws {
        let disk = image("template.img", size: 16 << 20)
        let served = try ServedDisk([disk, "--filter", "\(Self.template):log-every=1000"])
        defer { served.stop() }
        try fio(served.uri, ["--rw=randwrite", "--size=8M", "--verify=crc32c", "--verify_fatal=1"])
        #expect(served.waitForLog("1000 requests so far"))
    }

    // MARK: replication

    @Test(arguments: ["async", "sync"])
    func replicatesToAFileUnderFio(mode: String) throws {
        let source = image("repl-\(mode).img")
        let replica = directory.appendingPathComponent("replica-\(mode).img").path
        let served = try ServedDisk([source, "--filter", "\(Self.replication):target=\(replica),mode=\(mode)"])
        defer { served.stop() }
        try fio(served.uri, ["--rw=randwrite", "--size=32M", "--verify=crc32c", "--verify_fatal=1"])
        _ = try Harness.qemuIO(served.uri, ["flush"])
        try waitUntilIdentical(source, replica)
        #expect(served.waitForLog("is in sync"))
        // Async shipping yields the CPU to the guest's data path; in sync mode the
        // guest waits for the replica, so nothing of it runs at lower priority.
        let worker = try #require(served.servingPID)
        let shipper = Self.scheduling(of: worker, thread: "replication")
        #expect(shipper.map(\.nice) == [mode == "async" ? 10 : 0])
        #expect(shipper.map(\.policy) == [mode == "async" ? 3 : 0], "SCHED_BATCH (3) in async mode, SCHED_OTHER (0) in sync")
        #expect(Self.scheduling(of: worker, thread: "iofilter-worker").map(\.nice) == [0], "only the shipper's own thread yields")
        if mode == "sync" {
            // In sync mode a completed write is on the replica already: no waiting.
            _ = try Harness.qemuIO(served.uri, ["write -P 0x5d 5M 128k"])
            let replicaBytes = try Harness.qemuIO(replica, ["read -P 0x5d 5M 128k"])
            #expect(replicaBytes.contains("read 131072/131072"))
        }
    }

    /// The nice value and scheduling policy of a process's threads named `thread`
    /// (fields 19 and 41 of their stat).
    static func scheduling(of pid: pid_t, thread: String) -> [(nice: Int, policy: Int)] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        return tasks.compactMap { task in
            guard let comm = try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8),
                  comm.trimmingCharacters(in: .whitespacesAndNewlines) == thread,
                  let fields = Harness.statFields("/proc/\(pid)/task/\(task)/stat"),
                  fields.count > 38, let nice = Int(fields[16]), let policy = Int(fields[38])
            else { return nil }
            return (nice, policy)
        }
    }

    /// The worker has no network and no path to the socket: the host's broker connects
    /// for it, over a unix socket or TCP.
    @Test(arguments: ["unix", "tcp"])
    func replicatesToAnNBDTargetAndSurvivesItsAbsence(transport: String) throws {
        let source = image("repl-nbd-\(transport).img", size: 32 << 20)
        let replica = image("replica-nbd-\(transport).img", size: 32 << 20)
        let socket = directory.appendingPathComponent("replica.sock").path
        let port = Harness.freePort()
        let target = transport == "unix" ? "nbd+unix:///?socket=\(socket)" : "nbd://127.0.0.1:\(port)/"
        // The target is not there yet: the guest's writes must not fail.
        let served = try ServedDisk([source, "--filter", "\(Self.replication):target=\(target),mode=async"])
        defer { served.stop() }
        _ = try Harness.qemuIO(served.uri, ["write -P 0x42 0 1M", "flush"])
        #expect(served.waitForLog("replica unreachable"))
        // Then the replica appears (qemu-nbd), and the filter catches up.
        let qemuNBD = Process()
        qemuNBD.executableURL = URL(fileURLWithPath: Harness.tool("qemu-nbd"))
        qemuNBD.arguments = ["-f", "raw", "-t", "--cache=writeback", replica]
            + (transport == "unix" ? ["-k", socket] : ["-b", "127.0.0.1", "-p", "\(port)"])
        qemuNBD.standardOutput = FileHandle.nullDevice
        qemuNBD.standardError = FileHandle.nullDevice
        try qemuNBD.run()
        defer {
            kill(qemuNBD.processIdentifier, SIGKILL)
            qemuNBD.waitUntilExit()
        }
        try fio(served.uri, ["--rw=randwrite", "--size=16M", "--verify=crc32c", "--verify_fatal=1"])
        _ = try Harness.qemuIO(served.uri, ["flush"])
        try waitUntilIdentical(source, replica)
    }

    /// A replica acknowledges a write before its stable storage has it: the journal
    /// keeps what it shipped until the replica has flushed it. Here the replica (nbdkit,
    /// its flushes failing while a file exists) takes the writes but cannot flush them:
    /// the filter says so, keeps them through kill -9, and ships them again once the
    /// replica can flush. Before, the records went at the write's acknowledgement, and
    /// the replica was called in sync without ever being asked to flush.
    @Test func theJournalKeepsWhatTheReplicaHasNotFlushed() throws {
        let source = image("repl-unflushed.img", size: 8 << 20)
        let replica = image("replica-unflushed.img", size: 8 << 20)
        let socket = directory.appendingPathComponent("unflushed.sock").path
        let failFlushes = directory.appendingPathComponent("fail-flushes").path
        let nbdkit = Process()
        nbdkit.executableURL = URL(fileURLWithPath: Harness.tool("nbdkit"))
        // nbdkit's eval plug-in: the replica file through dd, and a flush that fails
        // while `failFlushes` exists (the error filter injects no flush errors).
        nbdkit.arguments = ["-f", "-U", socket, "eval", "get_size=echo \(8 << 20)", "can_write=exit 0", "can_flush=exit 0",
                            "pread=dd if=\(replica) iflag=skip_bytes,count_bytes skip=$4 count=$3 status=none",
                            "pwrite=dd of=\(replica) oflag=seek_bytes seek=$4 conv=notrunc status=none",
                            "flush=if [ -e \(failFlushes) ]; then echo 'EIO flushes fail here' >&2; exit 1; fi"]
        nbdkit.standardError = FileHandle.nullDevice
        try nbdkit.run()
        defer {
            kill(nbdkit.processIdentifier, SIGKILL)
            nbdkit.waitUntilExit()
        }
        let served = try ServedDisk([source, "--state-dir", directory.appendingPathComponent("state-unflushed").path,
                                     "--filter", "\(Self.replication):target=nbd+unix:///?socket=\(socket),journal-size=1M"])
        defer { served.stop() }
        #expect(served.waitForLog("is in sync", timeout: 30), "\(served.log)")

        #expect(FileManager.default.createFile(atPath: failFlushes, contents: nil))
        _ = try Harness.qemuIO(served.uri, ["write -P 0x5c 1M 64k", "flush"])
        #expect(served.waitForLog("failed (flush: Input/output error)"), "\(served.log)")
        // Through a crash, the write is still the journal's to ship.
        let worker = try #require(served.workerPID)
        kill(worker, SIGKILL)
        _ = try served.waitForNewWorker(replacing: worker)
        #expect(served.waitForLog("to ship: 65584 journal bytes to replay"), "\(served.log)")

        try FileManager.default.removeItem(atPath: failFlushes)
        try waitUntilIdentical(source, replica, timeout: 30)
        #expect(served.waitForLog("is in sync", timeout: 30))
    }

    @Test func aReplicaConvergesAfterKillDashNineMidWorkload() throws {
        let source = image("repl-kill.img")
        let replica = directory.appendingPathComponent("replica-kill.img").path
        let served = try ServedDisk([source, "--filter", "\(Self.replication):target=\(replica),journal-size=8M"])
        defer { served.stop() }
        let worker = try #require(served.workerPID)
        let load = try Harness.backgroundFio(served.uri, offset: "0", size: "48M", seconds: 20)
        usleep(1_500_000)
        kill(worker, SIGKILL)
        _ = try served.waitForNewWorker(replacing: worker)
        load.terminate()
        load.waitUntilExit()
        try fio(served.uri, ["--rw=randwrite", "--offset=48M", "--size=8M", "--verify=crc32c", "--verify_fatal=1"])
        _ = try Harness.qemuIO(served.uri, ["flush"])
        try waitUntilIdentical(source, replica, timeout: 90)
        #expect(served.waitForLog("to ship:"), "the restarted filter resumed from its journal and region map")
    }

    /// A disk replicated to a file, `parameters` added to the filter's, whose first run
    /// shipped 64 KiB of 0x21 and stopped; then, if asked, a write of 4 KiB of 0x6e at
    /// 4 KiB reached the disk alone (its journal record is the test's to write).
    struct ReplicatedDisk {
        let source: String
        let replica: String
        let state: URL
        var sidecar: URL { state.appendingPathComponent("\(URL(fileURLWithPath: source).lastPathComponent)/org.swift-iofilter.replication") }

        func arguments(_ parameters: String) -> [String] {
            [source, "--state-dir", state.path, "--filter", "\(SamplePluginTests.replication):target=\(replica),\(parameters)"]
        }
    }

    func replicatedDisk(_ name: String, firstRun parameters: String, thenAWriteOnTheDiskAlone: Bool) throws -> ReplicatedDisk {
        let disk = ReplicatedDisk(source: image("\(name).img", size: 8 << 20), replica: directory.appendingPathComponent("replica-\(name).img").path,
                                  state: directory.appendingPathComponent("state-\(name)"))
        do {
            let served = try ServedDisk(disk.arguments(parameters))
            defer { served.stop() }
            _ = try Harness.qemuIO(served.uri, ["write -P 0x21 0 64k", "flush"])
            try waitUntilIdentical(disk.source, disk.replica)
        }
        if thenAWriteOnTheDiskAlone {
            _ = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "write -P 0x6e 4k 4k", disk.source])
        }
        return disk
    }

    /// What a crash leaves in the journal at its head, and whether the filter replays it.
    enum JournalHead: String, CaseIterable, CustomStringConvertible {
        /// A kill in the middle of an append: the next sequence number and a length
        /// written, the rest still an older lap's bytes, the check word not adding up.
        case cutShort = "a header cut short"
        /// The same in a journal of release 1.x (no check word): an offset far beyond the
        /// disk, from an older payload, is what gives it away.
        case cutShortRelease1 = "a release 1.x header cut short"
        /// A whole record of release 1.x, with a head persisted in the 1.x layout: an
        /// upgrade replays it.
        case wholeRelease1 = "a whole release 1.x record"
        var description: String { rawValue }
    }

    /// Before the check word, a worker killed mid-append came back to a record naming a
    /// range far beyond the disk, and crashed at every start from then on.
    @Test(arguments: JournalHead.allCases)
    func aJournalRecordCutShortByACrashIsLeftOut(head: JournalHead) throws {
        // A torn record's write never reached the disk; a whole one's did.
        let disk = try replicatedDisk("repl-journal-\(JournalHead.allCases.firstIndex(of: head)!)", firstRun: "journal-size=1M",
                                      thenAWriteOnTheDiskAlone: head == .wholeRelease1)
        // The crash, written by hand: a journal whose only record is the one at its head.
        let release1 = head != .cutShort
        try Self.writeJournal(in: disk.sidecar, capacity: 1 << 20, magic: release1 ? 0x494F_464A : 0x494F_464B,
                              offset: head == .cutShortRelease1 ? 0x5A5A_5A5A_5A5A_5A5A : 4096,
                              release1Head: head == .wholeRelease1 ? 0 : nil)

        let served = try ServedDisk(disk.arguments("journal-size=1M"))
        defer { served.stop() }
        _ = try Harness.qemuIO(served.uri, ["write -P 0x3c 1M 64k", "flush"])
        try waitUntilIdentical(disk.source, disk.replica)
        if head == .wholeRelease1 {
            #expect(served.waitForLog("to ship: 4144 journal bytes to replay"), "\(served.log)")
            #expect(!served.log.contains("cut short"))
        } else {
            #expect(served.waitForLog("the journal's last record (sequence 1) was cut short by a crash"), "\(served.log)")
            #expect(!served.log.contains("to ship:"), "nothing of the torn record is replayed")
        }
    }

    /// A journal whose only record is a 4 KiB write at `position` of a ring of `capacity`
    /// bytes, with sequence number 1 and the check word an older payload's bytes; and
    /// with `release1Head`, a head persisted there in the 1.x layout.
    static func writeJournal(in sidecar: URL, capacity: Int, position: Int = 0, magic: UInt32, offset: UInt64,
                             release1Head: Int?) throws {
        var ring = Data(count: capacity)
        func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in data: inout Data) {
            withUnsafeBytes(of: value.littleEndian) { data.replaceSubrange(offset..<(offset + MemoryLayout<T>.size), with: $0) }
        }
        put(magic, at: position, in: &ring)  // "IOFJ" (1.x) or "IOFK"
        put(UInt32(1), at: position + 4, in: &ring)  // a write
        put(UInt64(1), at: position + 8, in: &ring)  // the sequence the head expects
        put(offset, at: position + 16, in: &ring)
        put(UInt64(4096), at: position + 24, in: &ring)
        put(UInt64(0x5A5A_5A5A_5A5A_5A5A), at: position + 40, in: &ring)
        ring.replaceSubrange((position + 48)..<(position + 48 + 4096), with: Data(repeating: 0x21, count: 4096))
        try ring.write(to: sidecar.appendingPathComponent("journal.data"))
        var headState = Data(count: 4096)
        if let release1Head {
            put(UInt64(0x494F_464A_5354_4154), at: 0, in: &headState)  // "IOFJSTAT"
            put(UInt64(release1Head), at: 8, in: &headState)
            put(UInt64(1), at: 16, in: &headState)
        }
        try headState.write(to: sidecar.appendingPathComponent("journal.state"))
    }

    /// Sync mode ships nothing from the journal: what async mode left there is copied
    /// from the disk instead. Before, it stayed there, and the replica never reported
    /// itself in sync (its lag, the records' age, soon past rpo-seconds: degraded).
    @Test func aJournalLeftByAsyncModeIsCopiedWhenTheReplicaTurnsSynchronous() throws {
        let disk = try replicatedDisk("repl-to-sync", firstRun: "journal-size=1M,mode=async", thenAWriteOnTheDiskAlone: true)
        try Self.writeJournal(in: disk.sidecar, capacity: 1 << 20, magic: 0x494F_464A, offset: 4096, release1Head: 0)
        let served = try ServedDisk(disk.arguments("journal-size=1M,mode=sync"))
        defer { served.stop() }
        #expect(served.waitForLog("to ship: 4144 journal bytes to replay"), "\(served.log)")
        #expect(served.waitForLog("is in sync"), "\(served.log)")
        try waitUntilIdentical(disk.source, disk.replica, timeout: 20)
    }

    /// A new journal-size lays the ring out anew: what the old ring still held to ship
    /// is resynced from the disk. Before, a shrunk ring cut it off and the replica
    /// never got those writes.
    @Test func aJournalResizedWithWritesStillToShipLosesNoneOfThem() throws {
        let disk = try replicatedDisk("repl-resized", firstRun: "journal-size=2M", thenAWriteOnTheDiskAlone: true)
        // The write's record was still in the ring, 1.5 MiB in, when the worker went away.
        try Self.writeJournal(in: disk.sidecar, capacity: 2 << 20, position: 3 << 19, magic: 0x494F_464A, offset: 4096,
                              release1Head: 3 << 19)
        let served = try ServedDisk(disk.arguments("journal-size=1M"))
        defer { served.stop() }
        #expect(served.waitForLog("the journal was 2097152 bytes and is 1048576 now; its 4144 bytes still to ship are resynced"),
                "\(served.log)")
        try waitUntilIdentical(disk.source, disk.replica, timeout: 20)
    }

    // MARK: cache

    @Test(arguments: ["write-through", "write-back"])
    func cacheKeepsFlushedDataThroughKillDashNine(mode: String) throws {
        let disk = image("cache-\(mode).img")
        let served = try ServedDisk([disk, "--filter", "\(Self.cache):mode=\(mode),size=8M,destage-interval-ms=60000"])
        let worker = try #require(served.workerPID)
        // Acknowledged and flushed: patterns, read once so that they are cached.
        for index in 0..<4 {
            _ = try Harness.qemuIO(served.uri, ["write -P \(0x30 + index) \(index)M 1M", "flush", "read -P \(0x30 + index) \(index)M 1M"])
        }
        let load = try Harness.backgroundFio(served.uri, offset: "16M", size: "32M", seconds: 20)
        usleep(800_000)
        kill(worker, SIGKILL)
        _ = try served.waitForNewWorker(replacing: worker)
        load.terminate()
        load.waitUntilExit()
        #expect(served.waitForLog("blocks warm"))
        for index in 0..<4 {
            #expect(try Harness.qemuIO(served.uri, ["read -P \(0x30 + index) \(index)M 1M"]).contains("read 1048576/1048576"))
        }
        // Overwrites after the restart are never shadowed by stale cached blocks.
        _ = try Harness.qemuIO(served.uri, ["write -P 0x77 1M 64k", "flush"])
        #expect(try Harness.qemuIO(served.uri, ["read -P 0x77 1M 64k"]).contains("read 65536/65536"))
        try fio(served.uri, ["--rw=randrw", "--offset=8M", "--size=8M", "--verify=crc32c", "--verify_fatal=1"])
        served.stop()
        // A graceful stop destages: the file itself now holds everything.
        #expect(try Harness.qemuIO(disk, ["read -P 0x77 1M 64k"]).contains("read 65536/65536"))
        #expect(try Harness.qemuIO(disk, ["read -P 0x33 3M 1M"]).contains("read 1048576/1048576"))
    }

    @Test func aWriteBackCacheDestagesInTheBackground() throws {
        let disk = image("destage.img", size: 16 << 20)
        let served = try ServedDisk([disk, "--filter", "\(Self.cache):mode=write-back,size=8M,destage-interval-ms=100"])
        defer { served.stop() }
        _ = try Harness.qemuIO(served.uri, ["write -P 0x3e 1M 256k", "flush"])
        // While the disk is still served, the bytes reach the disk below within a few
        // intervals.
        let deadline = Date().addingTimeInterval(10)
        var below = ""
        repeat {
            usleep(100_000)
            below = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "read -P 0x3e 1M 256k", disk]).stdout
        } while Date() < deadline && (below.contains("Pattern verification failed") || !below.contains("read 262144/262144"))
        #expect(below.contains("read 262144/262144") && !below.contains("Pattern verification failed"))
        // On a thread of its own, in the background (SCHED_BATCH, nice 10).
        let worker = try #require(served.servingPID)
        let destager = Self.scheduling(of: worker, thread: "cache-destage")
        #expect(destager.map(\.policy) == [3])
        #expect(destager.map(\.nice) == [10])
    }

    @Test func serveStatsShowWhatTheFiltersCountedWhileServingAndAtExit() throws {
        let disk = image("stats.img", size: 8 << 20)
        // "cache": a sample by its short name, as nbdkit's --filter=cache.
        let served = try ServedDisk([disk, "--filter", "cache:size=4M", "--stats", "--stats-every", "0.5"])
        _ = try Harness.qemuIO(served.uri, ["read 0 1M", "read 0 1M", "read 0 1M"])
        #expect(served.waitForLog("stats (every 0.5s) stats.img org.swift-iofilter.cache:"))
        // The live filter answers a management call through the serve's control socket;
        // a fresh worker (no --serve) has no disk open.
        let control = try #require(served.uri.components(separatedBy: "socket=").last) + ".control"
        let live = try Harness.run(Harness.iofilter, ["plugin", "call", Self.cache, "status", "--serve", control])
        #expect(live.status == 0 && live.stdout.contains("stats.img: write-through") && live.stdout.contains("1048576 cached bytes"),
                "\(live.stdout) \(live.stderr)")
        #expect(try Harness.run(Harness.iofilter, ["plugin", "call", Self.cache, "status"]).stdout.contains("no cached disks"))
        served.stop()
        usleep(300_000)  // the log is read as it comes
        let last = served.log.split(separator: "\n").last { $0.contains("stats (at exit) stats.img org.swift-iofilter.cache:") }
            .map(String.init) ?? ""
        // Three reads of one range: one miss, then hits, and the range stays cached.
        #expect(last.contains("misses=1") && last.contains("hits=2") && last.contains("cached_bytes=1048576"), "\(served.log)")
        let unknown = try Harness.run(Harness.iofilter, ["serve", disk, "--filter", "nosuch"])
        #expect(unknown.status == 1 && unknown.stderr.contains("no sample plug-in 'nosuch' (samples: cache, passthrough-c, replication, template"))
    }

    /// Serves a disk of `size` bytes through the cache with `parameters` (no destaging
    /// in the background), its sidecar holding the first release's cache
    /// (Fixtures/cache-1.0.0): 18 dirty blocks of a 1 MiB cache in 4 KiB blocks, made on
    /// a 4 MiB disk. Returns the disk's path.
    func serveTheFirstReleasesCache(on name: String, size: Int, _ parameters: String) throws -> (String, ServedDisk) {
        let disk = image(name, size: size)
        let state = directory.appendingPathComponent("state-\(name)")
        let sidecar = state.appendingPathComponent("\(name)/org.swift-iofilter.cache")
        try FileManager.default.createDirectory(at: sidecar, withIntermediateDirectories: true)
        let fixture = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/cache-1.0.0")
        for file in ["cache.data", "cache.meta"] {
            try FileManager.default.copyItem(at: fixture.appendingPathComponent(file), to: sidecar.appendingPathComponent(file))
        }
        let served = try ServedDisk([disk, "--state-dir", state.path,
                                     "--filter", "\(Self.cache):\(parameters),destage-interval-ms=600000"])
        return (disk, served)
    }

    /// The checksum changed since (Fixtures/cache-1.0.0, made on a 4 MiB disk): an upgrade
    /// must drop no acknowledged write the cache alone holds. Nor must the disk growing
    /// (to 8 MiB) while the cache held them.
    @Test(arguments: [4 << 20, 8 << 20])
    func aWriteBackCacheWrittenByTheFirstReleaseKeepsItsDirtyBlocks(diskSize: Int) throws {
        let (disk, served) = try serveTheFirstReleasesCache(on: "upgrade-\(diskSize >> 20)M.img", size: diskSize,
                                                            "size=1M,mode=write-back")
        defer { served.stop() }
        #expect(served.waitForLog("18 blocks warm, 18 dirty"))
        let read = try Harness.qemuIO(served.uri, ["read -P 0x6b 4k 64k", "read -P 0x2c 1M 8k", "read -P 0 0 4k"])
        #expect(read.contains("read 65536/65536 bytes at offset 4096"))
        #expect(read.contains("read 8192/8192 bytes at offset 1048576"))
        #expect(!read.contains("Pattern verification failed"))
        // Nothing of it was on the disk below: the cache held it alone.
        let below = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-r", "-U", "-c", "read -P 0 0 4M", disk])
        #expect(below.stdout.contains("read 4194304/4194304"))
    }

    /// Acknowledged writes a cache held alone survive a change of its size, block size
    /// or mode: before, a cache laid out anew started empty and they were gone; a cache
    /// switched to write-through kept them and never wrote them down.
    @Test(arguments: ["size=2M,mode=write-back", "size=1M,block-size=8192,mode=write-back", "size=1M,mode=write-through"])
    func dirtyBlocksOutliveAChangeOfTheCachesParameters(parameters: String) throws {
        let (disk, served) = try serveTheFirstReleasesCache(
            on: "reshaped-\(String(parameters.map { $0.isLetter || $0.isNumber ? $0 : "-" })).img", size: 4 << 20, parameters)
        defer { served.stop() }
        #expect(served.waitForLog(parameters.contains("write-through") ? "wrote down the 18 blocks held dirty"
                                                                        : "its 18 dirty blocks were written down"), "\(served.log)")
        let read = try Harness.qemuIO(served.uri, ["read -P 0x6b 4k 64k", "read -P 0x2c 1M 8k"])
        #expect(read.contains("read 65536/65536 bytes at offset 4096") && read.contains("read 8192/8192 bytes at offset 1048576"))
        #expect(!read.contains("Pattern verification failed"), "\(read)")
        // On the disk below now, not in the cache alone.
        let below = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-r", "-U", "-c", "read -P 0x6b 4k 64k",
                                                              "-c", "read -P 0x2c 1M 8k", disk])
        #expect(!below.stdout.contains("Pattern verification failed") && below.stdout.contains("read 8192/8192"), "\(below.stdout)")
    }

    @Test func offlineAccessToAWriteBackDiskReturnsTheCachedWrites() throws {
        let disk = image("offline.img", size: 16 << 20)
        let filter = "\(Self.cache):mode=write-back,size=8M,destage-interval-ms=100"
        // No destage before the kill, however slow the machine is to deliver it.
        let served = try ServedDisk([disk, "--filter", "\(Self.cache):mode=write-back,size=8M,destage-interval-ms=600000"])
        _ = try Harness.qemuIO(served.uri, ["write -P 0x6b 2M 512k", "flush"])
        // The host dies with the worker: nothing is destaged.
        let worker = try #require(served.workerPID)
        kill(served.process.processIdentifier, SIGKILL)
        kill(worker, SIGKILL)
        served.process.waitUntilExit()
        #expect(try Data(contentsOf: URL(fileURLWithPath: disk))[(2 << 20)..<((2 << 20) + 4096)].allSatisfy { $0 == 0 },
                "the data is only in the cache")
        // Offline copy goes through the same chain, so it sees the new data.
        let offline = try ServedDisk([disk, "--filter", filter, "--readonly"])
        defer { offline.stop() }
        let copy = directory.appendingPathComponent("copy.img").path
        try Harness.check(Harness.tool("nbdcopy"), [offline.uri, copy])
        #expect(try Harness.qemuIO(copy, ["read -P 0x6b 2M 512k"]).contains("read 524288/524288"))
    }

    @Test func theFullSampleChainKeepsDataAndReplica() throws {
        let source = image("chain.img", size: 32 << 20)
        let replica = directory.appendingPathComponent("chain-replica.img").path
        let passthrough = Harness.binDirectory.appendingPathComponent("libiofilter-passthrough-c.so").path
        let served = try ServedDisk([source, "--filter", "\(Self.cache):mode=write-back,size=16M",
                                     "--filter", "\(Self.replication):target=\(replica)", "--filter", passthrough])
        try fio(served.uri, ["--rw=randrw", "--size=16M", "--verify=crc32c", "--verify_fatal=1"])
        _ = try Harness.qemuIO(served.uri, ["flush"])
        // Replication sits above the write-back cache: the replica matches what the
        // guest sees, while the file catches up only as the cache destages.
        try waitUntilIdentical(served.uri, replica)
        served.stop()  // destages the cache and lets the replica drain
        try waitUntilIdentical(source, replica, timeout: 5)
    }
}
