import Foundation
import IOFilterAPI
import IOFilterModel
import Testing

/// Backup as the tools of KVM hosts do it, against a running VM: point-in-time
/// snapshots made by copy-before-write in the VM's worker, checkpoints whose changes
/// clients read as `qemu:dirty-bitmap:NAME` (libnbd, nbdinfo, QEMU's own NBD client),
/// full and incremental copies that add up to the snapshot byte for byte, revert, and
/// what a killed worker or host leaves: never a snapshot or a bitmap that is silently
/// wrong.
@Suite("backup: snapshots, changed-block tracking, incremental copies", .serialized)
struct BackupTests {
    let directory = Harness.temporaryDirectory("backup")
    static let python = "/usr/bin/python3"
    static let script = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/backup.py").path

    func eventually(_ seconds: Double = 30, _ condition: () throws -> Bool) rethrows -> Bool {
        try Harness.eventually(seconds, condition)
    }

    /// A VM `v` with disk `d` (`size`) behind the test plug-in, running.
    func runningVM(_ daemon: Daemon, size: String, behaviour: String? = nil) throws -> String {
        let plugin = try Harness.buildTestPlugin("backup", in: directory)
        try daemon.ok(["plugin", "install", plugin])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter" + (behaviour.map { ":behaviour=\($0)" } ?? "")])
        try daemon.ok(["disk", "create", "d", "--size", size, "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        return try #require(vm.uris["d"])
    }

    func backup(_ arguments: [String]) throws -> String {
        try Harness.check(Self.python, [Self.script] + arguments)
    }

    func dirtyExtents(_ uri: String, _ checkpoint: String) throws -> [[UInt64]] {
        try JSONDecoder().decode([[UInt64]].self, from: Data(backup(["dirty", uri, CheckpointInfo.metaContextPrefix + checkpoint]).utf8))
    }

    func disk(_ daemon: Daemon, _ name: String) throws -> DiskInfo { try daemon.json(["disk", "show", name]) }

    @Test func aSnapshotOfADiskBeingWrittenIsOneInstantAndReadableWhileItIsCopied() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "64M")
        // 8 MiB rewritten again and again in a shuffled order: a copy made while the writer
        // writes (what a snapshot was before) mixes passes; one instant does not.
        let stop = directory.appendingPathComponent("stop-writer").path
        let writer = Process()
        writer.executableURL = URL(fileURLWithPath: Self.python)
        writer.arguments = [Self.script, "writer", uri, "2048", "7", stop]
        let passes = Pipe()
        writer.standardOutput = passes
        try writer.run()
        usleep(1_500_000)
        // Slow background copy: the writer keeps overwriting blocks not yet copied.
        let snapshot: DiskInfo = try daemon.json(["disk", "snapshot", "d", "s", "--rate", "1M"])
        #expect(snapshot.readOnly && snapshot.snapshotOf == "d" && snapshot.copy?.state == .copying, "\(snapshot)")
        #expect(try daemon.refused(["disk", "delete", "s"]).contains("busy"))
        #expect(try daemon.refused(["disk", "snapshot", "s", "s2"]).contains("still being copied"))
        // Read while it is copied: through the VM's worker, preserved first where need be.
        let export = try daemon.ok(["disk", "export-nbd", "s"]).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(export.hasPrefix("nbd+unix:///s?socket="), "\(export)")
        let early = directory.appendingPathComponent("read-during-copy.img").path
        try Harness.check(Harness.tool("nbdcopy"), [export, early])
        usleep(500_000)
        _ = FileManager.default.createFile(atPath: stop, contents: nil)
        writer.waitUntilExit()
        #expect(writer.terminationStatus == 0)
        let written = Int(String(decoding: passes.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
        #expect(written >= 3, "the writer made \(written) passes")
        #expect(try eventually(60) { try disk(daemon, "s").copy == nil })
        let done = try disk(daemon, "s")
        #expect(done.activity == nil && FileManager.default.fileExists(atPath: done.path))
        let cut = try backup(["check-cut", done.path, "2048", "7"])
        #expect(cut.contains("one instant"), "\(cut)")
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", early, done.path])
        // The filters heard of it (they flush at the instant), and the event log says so.
        let log = try String(contentsOfFile: daemon.state.appendingPathComponent("disks/d.state/org.test.filter/events.log").path, encoding: .utf8)
        #expect(log.contains("snapshot"))
        let events = try daemon.ok(["events"])
        #expect(events.contains("disk-snapshot") && events.contains("snapshot-complete"), "\(events)")
        // Deleted, the VM's worker stops offering it, and goes on serving.
        let before: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(try Harness.check(Harness.tool("nbdinfo"), ["--list", "--json", uri]).contains("\"export-name\": \"s\""))
        try daemon.ok(["disk", "delete", "s"])
        #expect(!(try Harness.check(Harness.tool("nbdinfo"), ["--list", "--json", uri])).contains("\"export-name\": \"s\""))
        let after: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(after.pid == before.pid && after.restarts == 0, "the worker must not have restarted: \(after)")
    }

    @Test func anIncrementalBackupOfChangedBlocksAddsUpToTheSnapshot() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "128M")
        _ = try Harness.qemuIO(uri, ["write -P 0x11 0 16M", "write -P 0x12 64M 8M"])
        // A guest that keeps writing, and verifies what it wrote, through everything.
        let (fio, fioErrors) = try Harness.verifyingFio(uri, loops: 40, in: directory)
        let first: DiskInfo = try daemon.json(["disk", "snapshot", "d", "monday", "--checkpoint", "monday", "--wait"])
        #expect(first.copy == nil && first.checkpoints == [])
        let full = directory.appendingPathComponent("full.img").path
        let mondayURI = try daemon.ok(["disk", "export-nbd", "monday"]).trimmingCharacters(in: .whitespacesAndNewlines)
        try Harness.check(Harness.tool("nbdcopy"), [mondayURI, full])
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", full, first.path])

        // The day's changes: some known ones (beyond fio's 8 MiB), and the guest's.
        _ = try Harness.qemuIO(uri, ["write -P 0x21 9M 64k", "write -P 0x22 70M 192k", "write -z 100M 1M", "discard 64M 64k"])
        let checkpoints = try daemon.ok(["disk", "checkpoint", "list", "d"])
        #expect(checkpoints.contains("monday") && checkpoints.contains("tracking"), "\(checkpoints)")
        let second: DiskInfo = try daemon.json(["disk", "snapshot", "d", "tuesday", "--checkpoint", "tuesday", "--wait"])
        #expect(second.checkpoints == ["monday"], "the snapshot carries its source's checkpoints, frozen: \(second)")
        let tuesdayURI = try daemon.ok(["disk", "export-nbd", "tuesday"]).trimmingCharacters(in: .whitespacesAndNewlines)

        // libnbd, as backup tools use it: the changed extents of monday, up to tuesday.
        let extents = try dirtyExtents(tuesdayURI, "monday")
        let changes: [(offset: UInt64, length: UInt64)] = [(9 << 20, 64 << 10), (70 << 20, 192 << 10), (100 << 20, 1 << 20), (64 << 20, 64 << 10)]
        for change in changes {
            let covered = extents.contains { extent in extent[0] <= change.offset && change.offset + change.length <= extent[0] + extent[1] }
            #expect(covered, "[\(change.offset), +\(change.length)) not marked in \(extents)")
        }
        // nbdinfo and QEMU's NBD client (a bitmap-aware client no one here wrote) read the same.
        let map = try Harness.check(Harness.tool("nbdinfo"), ["--map=qemu:dirty-bitmap:monday", "--json", tuesdayURI])
        let nbdinfoDirty = try JSONDecoder().decode([MapEntry].self, from: Data(map.utf8)).filter { $0.type & 1 != 0 }
            .map { [$0.offset, $0.length] }
        #expect(Self.merged(nbdinfoDirty) == extents)
        let socket = try #require(tuesdayURI.split(separator: "=").last.map(String.init))
        let qemuMap = try Harness.check(Harness.tool("qemu-img"), [
            "map", "--output=json", "--image-opts",
            "driver=nbd,server.type=unix,server.path=\(socket),export=tuesday,x-dirty-bitmap=qemu:dirty-bitmap:monday",
        ])
        // x-dirty-bitmap reports the bitmap in place of allocation: dirty reads as "not data".
        let qemuDirty = try JSONDecoder().decode([QemuMapEntry].self, from: Data(qemuMap.utf8)).filter { !$0.data }.map { [$0.start, $0.length] }
        #expect(Self.merged(qemuDirty) == extents, "qemu-img map: \(qemuMap)")

        // The incremental: only the changed extents, onto a copy of the full backup.
        let incremental = directory.appendingPathComponent("incremental.img").path
        try FileManager.default.copyItem(atPath: full, toPath: incremental)
        let report = try JSONDecoder().decode(IncrementalReport.self,
                                              from: Data(backup(["incremental", tuesdayURI, "qemu:dirty-bitmap:monday", incremental]).utf8))
        #expect(report.bytes_read == extents.reduce(0) { $0 + $1[1] })
        #expect(report.bytes_read < 128 << 20, "an incremental reads less than the disk")
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", incremental, second.path])

        // The next day's changes are tuesday's alone.
        _ = try Harness.qemuIO(uri, ["write -P 0x31 120M 64k"])
        let since = try dirtyExtents(uri, "tuesday")
        #expect(since.contains { $0[0] <= 120 << 20 && 120 << 20 + 65536 <= $0[0] + $0[1] })
        #expect(!since.contains { $0[0] <= 70 << 20 && 70 << 20 < $0[0] + $0[1] }, "monday's changes are not tuesday's: \(since)")
        fio.waitUntilExit()
        #expect(fio.terminationStatus == 0, "fio verify: \(fioErrors.text())")
    }

    @Test func checkpointsSurviveKillsAndSayWhenTheyCannotBeTrusted() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "32M")
        let made: CheckpointInfo = try daemon.json(["disk", "checkpoint", "create", "d", "c1", "--granularity", "128K"])
        #expect(made.granularity == 128 << 10 && made.changedBytes == 0 && made.consistent && made.metaContext == "qemu:dirty-bitmap:c1")
        _ = try Harness.qemuIO(uri, ["write -P 1 0 4k"])
        // The worker killed -9: what it marked is in the page cache, so in the file.
        let before: VMInfo = try daemon.json(["vm", "show", "v"])
        kill(try #require(before.pid), SIGKILL)
        #expect(try eventually { (try daemon.json(["vm", "show", "v"], as: VMInfo.self)).pid.map { $0 != before.pid } ?? false })
        _ = try Harness.qemuIO(uri, ["write -P 2 1M 4k"])
        // The host killed -9 and started again (it adopts the worker).
        daemon.kill(SIGKILL)
        try daemon.start()
        _ = try Harness.qemuIO(uri, ["write -P 3 2M 4k"])
        #expect(try dirtyExtents(uri, "c1") == [[0, 128 << 10], [1 << 20, 128 << 10], [2 << 20, 128 << 10]])
        // The plug-in reads the same through the ABI (1.5).
        let sidecar = daemon.state.appendingPathComponent("disks/d.state/org.test.filter")
        try "c1".write(to: sidecar.appendingPathComponent("tracking"), atomically: true, encoding: .utf8)
        let vm: VMInfo = try daemon.json(["vm", "show", "v"])
        let stats = try #require(vm.filters.first?.filters.first?.stats)
        #expect(stats["checkpoints"] == 1 && stats["changed_bytes"] == Double(3 * (128 << 10)), "\(stats)")

        // A machine that went down while the bitmap was in use: it may have missed
        // writes. Its header says a worker of another boot had it in use.
        try daemon.ok(["vm", "stop", "v"])
        let file = daemon.state.appendingPathComponent("disks/d.state/.checkpoints/c1.bitmap").path
        let handle = try #require(FileHandle(forUpdatingAtPath: file))
        try handle.seek(toOffset: 12)
        try handle.write(contentsOf: Data([1, 0, 0, 0]))
        try handle.seek(toOffset: 40)
        try handle.write(contentsOf: Data("00000000-dead-beef-0000-000000000000".utf8) + Data([0]))
        try handle.close()
        _ = try daemon.ok(["vm", "start", "v"])
        let listed: [CheckpointInfo] = try daemon.json(["disk", "checkpoint", "list", "d"])
        #expect(listed.count == 1 && !listed[0].consistent && listed[0].inconsistency?.contains("went down") == true, "\(listed)")
        #expect(try daemon.ok(["disk", "checkpoint", "list", "d"]).contains("inconsistent"))
        // Never offered again: a client asking gets a clear no, not a silently short map.
        let refused = try Harness.run(Harness.tool("nbdinfo"), ["--map=qemu:dirty-bitmap:c1", uri])
        #expect(refused.status != 0 && refused.stderr.contains("qemu:dirty-bitmap:c1"), "\(refused)")
        #expect(!(try Harness.check(Harness.tool("nbdinfo"), ["--list", "--content", uri])).contains("qemu:dirty-bitmap:c1"))
        #expect(try daemon.ok(["events", "--severity", "warning"]).contains("checkpoint-inconsistent"))
        try daemon.ok(["disk", "checkpoint", "delete", "d", "c1"])
        #expect(try daemon.ok(["disk", "checkpoint", "list", "d"]).split(separator: "\n").count == 1)
    }

    @Test func aCopyWhoseWorkerOrHostDiesIsRemovedNotLeftWrong() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "64M")
        _ = try Harness.qemuIO(uri, ["write -P 5 0 48M"])
        _ = try daemon.ok(["disk", "snapshot", "d", "s1", "--rate", "2M"])
        let vm: VMInfo = try daemon.json(["vm", "show", "v"])
        kill(try #require(vm.pid), SIGKILL)
        #expect(try eventually { try daemon.cli(["disk", "show", "s1"]).status != 0 })
        #expect(try daemon.ok(["events", "--severity", "error"]).contains("snapshot-failed"))
        let staging = daemon.state.appendingPathComponent("disks/d.state/.snapshots").path
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: staging)) ?? []).isEmpty)
        #expect(!FileManager.default.fileExists(atPath: daemon.state.appendingPathComponent("disks/s1.img").path))

        // The host killed -9 in the middle of a copy: the worker copies on, and the next
        // host takes the copy up (stopping the VM then finishes it at full speed).
        #expect(try eventually { try daemon.cli(["disk", "snapshot", "d", "s2", "--rate", "2M"]).status == 0 })
        daemon.kill(SIGKILL)
        try daemon.start()
        #expect(try disk(daemon, "s2").activity?.hasPrefix("copying") == true)
        try daemon.ok(["vm", "stop", "v"])
        #expect(try disk(daemon, "s2").activity == nil)
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", try disk(daemon, "s2").path,
                                                    daemon.state.appendingPathComponent("disks/d.img").path])
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: staging)) ?? []).isEmpty)
        // A worker the next host does not adopt (other settings) is stopped cleanly:
        // it finishes its copy first, and the snapshot is kept.
        try daemon.ok(["vm", "start", "v"])
        #expect(try eventually { try daemon.cli(["disk", "snapshot", "d", "s4", "--rate", "2M"]).status == 0 })
        daemon.kill(SIGKILL)
        try daemon.start(["--watchdog", "9"])
        #expect(try disk(daemon, "s4").activity == nil)
        try daemon.ok(["vm", "stop", "v"])
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", try disk(daemon, "s4").path,
                                                    daemon.state.appendingPathComponent("disks/d.img").path])
        // The host and the worker both killed mid-copy: the next start removes it.
        let running: VMInfo = try daemon.json(["vm", "start", "v"])
        #expect(try eventually { try daemon.cli(["disk", "snapshot", "d", "s5", "--rate", "2M"]).status == 0 })
        daemon.kill(SIGKILL)
        kill(try #require(running.pid), SIGKILL)
        try daemon.start()
        #expect(try daemon.cli(["disk", "show", "s5"]).status != 0)
        #expect(try daemon.ok(["events"]).contains("removed: the host stopped before its copy was complete"))
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: staging)) ?? []).isEmpty)
        // And a snapshot taken after that is complete and right.
        _ = try daemon.ok(["disk", "snapshot", "d", "s3", "--wait"])
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", try disk(daemon, "s3").path, uri])
    }

    /// Stopping the VM (or an offline session) while a slow copy runs: the worker's
    /// consumers are gone, so it finishes the copy at full speed before it stops, and the
    /// snapshot is kept, complete and right (an operator who snapshots and then shuts
    /// the VM down must not lose the snapshot).
    @Test func stoppingTheVMWhileACopyRunsKeepsTheSnapshot() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "64M")
        _ = try Harness.qemuIO(uri, ["write -P 7 0 40M"])
        let taken: DiskInfo = try daemon.json(["disk", "snapshot", "d", "s", "--rate", "1M"])
        #expect(taken.copy?.state == .copying)
        _ = try Harness.qemuIO(uri, ["write -P 8 0 40M"])
        try daemon.ok(["vm", "stop", "v"])
        let kept = try disk(daemon, "s")
        #expect(kept.copy == nil && kept.activity == nil, "\(kept)")
        _ = try Harness.qemuIO("file:" + kept.path, ["read -P 7 0 40M", "read -P 0 40M 24M"])
        #expect(try daemon.ok(["events"]).contains("snapshot-complete"))
        let staging = daemon.state.appendingPathComponent("disks/d.state/.snapshots").path
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: staging)) ?? []).isEmpty)

        // The same through an offline session's worker.
        let offline: OfflineSession = try daemon.json(["disk", "serve", "d", "--offline", "--detach"])
        _ = try daemon.json(["disk", "snapshot", "d", "t", "--rate", "1M"]) as DiskInfo
        _ = try Harness.qemuIO(offline.uri, ["write -P 9 0 40M"])
        try daemon.ok(["disk", "serve", "d", "--stop"])
        let second = try disk(daemon, "t")
        #expect(second.copy == nil, "\(second)")
        _ = try Harness.qemuIO("file:" + second.path, ["read -P 8 0 40M"])
    }

    @Test func revertTellsTheFiltersAndPutsTheSnapshotBack() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "16M")
        _ = try Harness.qemuIO(uri, ["write -P 0x41 0 4M"])
        let snapshot: DiskInfo = try daemon.json(["disk", "snapshot", "d", "good", "--wait"])
        try daemon.ok(["disk", "checkpoint", "create", "d", "after"])
        _ = try Harness.qemuIO(uri, ["write -P 0x66 1M 2M", "write -P 0x67 12M 1M"])
        #expect(try daemon.refused(["disk", "revert", "d", "good"]).contains("while VM v serves it"))
        try daemon.ok(["vm", "stop", "v"])
        #expect(try daemon.refused(["disk", "revert", "d", "nope"]).contains("no disk named nope"))
        try daemon.ok(["disk", "create", "other", "--size", "16M"])
        #expect(try daemon.refused(["disk", "revert", "d", "other"]).contains("not a snapshot of d"))
        let reverted = try daemon.ok(["disk", "revert", "d", "good"])
        #expect(reverted.contains("reverted d to good"), "\(reverted)")
        let sidecar = daemon.state.appendingPathComponent("disks/d.state/org.test.filter")
        #expect(try String(contentsOf: sidecar.appendingPathComponent("events.log"), encoding: .utf8).contains("revert good"))
        try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", snapshot.path, daemon.state.appendingPathComponent("disks/d.img").path])
        // The checkpoint records the revert as a change (never silently missing it).
        let after: [CheckpointInfo] = try daemon.json(["disk", "checkpoint", "list", "d"])
        #expect((after.first?.changedBytes ?? 0) >= 3 << 20, "\(after)")
    }

    @Test func aFilterMayVetoARevertAndNothingChanges() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "8M", behaviour: "veto-revert")
        _ = try Harness.qemuIO(uri, ["write -P 0x41 0 1M"])
        _ = try daemon.ok(["disk", "snapshot", "d", "good", "--wait"])
        _ = try Harness.qemuIO(uri, ["write -P 0x42 0 1M"])
        try daemon.ok(["vm", "stop", "v"])
        #expect(try daemon.refused(["disk", "revert", "d", "good"]).contains("vetoed the revert to good"))
        let served: VMInfo = try daemon.json(["vm", "start", "v"])
        _ = try Harness.qemuIO(try #require(served.uris["d"]), ["read -P 0x42 0 1M"])
    }

    /// ABI 1.5 is a minor bump: a plug-in built against the 1.4 header loads, serves,
    /// hears of snapshots, and never hears of a revert (an event its build cannot know:
    /// this one would log an unknown event as a grow).
    @Test func aPluginBuiltAgainstABI14TakesPartAndNeverHearsARevert() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let old = try Harness.buildTestPlugin("abi14", header: Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.4").path,
                                              in: directory)
        #expect(try Harness.check(Harness.iofilter, ["plugin", "info", old]).contains("built for ABI 1.4 (this host speaks 1.7)"))
        try daemon.ok(["plugin", "install", old])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "d", "--size", "8M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        let uri = try #require(vm.uris["d"])
        try daemon.ok(["disk", "checkpoint", "create", "d", "c"])
        _ = try Harness.qemuIO(uri, ["write -P 0x14 0 64k"])
        _ = try daemon.ok(["disk", "snapshot", "d", "s", "--wait"])
        #expect(try dirtyExtents(uri, "c") == [[0, 64 << 10]])
        let shown: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(shown.filters.first?.filters.first?.stats["checkpoints"] == nil, "a 1.4 build has no tracking to report")
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "revert", "d", "s"])
        let log = try String(contentsOf: daemon.state.appendingPathComponent("disks/d.state/org.test.filter/events.log"), encoding: .utf8)
        #expect(log == "snapshot\n", "\(log)")
    }

    @Test func badRequestsAreRefusedWithAClearReasonAndChangeNothing() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let uri = try runningVM(daemon, size: "16M")
        try daemon.ok(["disk", "checkpoint", "create", "d", "c1"])
        #expect(try daemon.refused(["disk", "checkpoint", "create", "d", "c1"]).contains("has a checkpoint c1 already"))
        #expect(try daemon.refused(["disk", "checkpoint", "create", "d", "c2", "--granularity", "3000"]).contains("power of two"))
        #expect(try daemon.refused(["disk", "checkpoint", "create", "d", "../x"]).contains("not valid"))
        #expect(try daemon.refused(["disk", "checkpoint", "delete", "d", "nope"]).contains("no checkpoint nope"))
        #expect(try daemon.refused(["disk", "snapshot", "d", "c-snap", "--checkpoint", "c1"]).contains("has a checkpoint c1 already"))
        #expect(try daemon.cli(["disk", "show", "c-snap"]).status != 0)
        _ = try daemon.ok(["disk", "snapshot", "d", "s", "--wait"])
        #expect(try daemon.refused(["disk", "snapshot", "d", "s"]).contains("a disk named s exists"))
        #expect(try daemon.refused(["disk", "checkpoint", "create", "s", "c"]).contains("read-only"))
        #expect(try daemon.refused(["disk", "snapshot", "d", "t", "--rate", "fast"]).contains("rate 'fast'"))
        // A client asking for a context no one offers: told no, its other contexts work.
        let unknown = try Harness.run(Harness.tool("nbdinfo"), ["--map=qemu:dirty-bitmap:nope", uri])
        #expect(unknown.status != 0 && unknown.stderr.contains("qemu:dirty-bitmap:nope"), "\(unknown)")
        #expect(try Harness.check(Harness.tool("nbdinfo"), ["--map", uri]).contains("data"))
        let list: [CheckpointInfo] = try daemon.json(["disk", "checkpoint", "list", "d"])
        #expect(list.map(\.name) == ["c1"])
        let disks: [DiskInfo] = try daemon.json(["disk", "list"])
        #expect(disks.map(\.name) == ["d", "s"])
        // A disk that grew has a part its checkpoints never covered: they say so.
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "grow", "d", "--size", "32M"])
        #expect(try daemon.ok(["events", "--severity", "warning"]).contains("checkpoint c1 does not cover the grown disk"))
        _ = try daemon.ok(["vm", "start", "v"])
        let grown: [CheckpointInfo] = try daemon.json(["disk", "checkpoint", "list", "d"])
        #expect(grown.first?.consistent == false && grown.first?.inconsistency?.contains("the disk is now 33554432") == true, "\(grown)")
    }

    static func merged(_ extents: [[UInt64]]) -> [[UInt64]] {
        var result: [[UInt64]] = []
        for extent in extents {
            if let last = result.last, last[0] + last[1] == extent[0] {
                result[result.count - 1][1] += extent[1]
            } else {
                result.append(extent)
            }
        }
        return result
    }

    struct MapEntry: Decodable {
        var offset: UInt64
        var length: UInt64
        var type: UInt32
    }

    struct QemuMapEntry: Decodable {
        var start: UInt64
        var length: UInt64
        var data: Bool
    }

    struct IncrementalReport: Decodable {
        var bytes_read: UInt64
        var extents: Int
    }
}
