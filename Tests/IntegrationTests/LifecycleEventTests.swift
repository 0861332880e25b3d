import Foundation
import IOFilterAPI
import Testing

/// Snapshot, clone and grow reach a disk's filters through `event`: from the VM's running
/// worker, or a maintenance worker when no VM runs; a filter's veto stops the operation
/// and changes nothing.
@Suite("disk lifecycle events")
struct LifecycleEventTests {
    /// What the test filter logged for `disk` (it appends one line per event to
    /// events.log in its sidecar directory).
    static func events(_ daemon: Daemon, disk: String) -> [String] {
        let root = daemon.state.appendingPathComponent("disks/\(disk).state").path
        guard let files = FileManager.default.enumerator(atPath: root) else { return [] }
        for case let file as String in files where file.hasSuffix("events.log") {
            let text = (try? String(contentsOfFile: "\(root)/\(file)", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").map(String.init)
        }
        return []
    }

    @Test func filtersHearOfSnapshotsClonesAndGrowthAndMayVeto() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let directory = Harness.temporaryDirectory("events")
        try daemon.ok(["plugin", "install", try Harness.buildTestPlugin("events", in: directory)])
        try daemon.ok(["policy", "create", "watched", "--filter", "org.test.filter:behaviour=pass"])
        try daemon.ok(["disk", "create", "d", "--size", "16M", "--policy", "watched"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        let uri = try #require(vm.uris["d"])

        // Online: a snapshot while a verifying writer runs (the disk is quiesced while
        // the filters hear of it, then carries on), and a clone.
        let (writer, errors) = try Harness.verifyingFio(uri, loops: 3, in: directory)
        usleep(300_000)
        try daemon.ok(["disk", "snapshot", "d", "s1"])
        writer.waitUntilExit()
        #expect(writer.terminationStatus == 0, "the writer failed around the snapshot: \(errors.text())")
        try daemon.ok(["disk", "clone", "d", "c1"])
        #expect(Self.events(daemon, disk: "d") == ["snapshot", "clone c1"])

        // Offline: growth reaches the filters instead of detaching and attaching them
        // (the sidecar, and the log in it, survive).
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "grow", "d", "--size", "32M"])
        #expect(Self.events(daemon, disk: "d") == ["snapshot", "clone c1", "grow 33554432"])
        let grown: DiskInfo = try daemon.json(["disk", "show", "d"])
        #expect(grown.sizeBytes == 32 << 20 && grown.compliance.status == .compliant)

        // Vetoes: nothing changes, and the message names the filter and its errno.
        try daemon.ok(["policy", "create", "stubborn", "--filter", "org.test.filter:behaviour=veto-snapshot"])
        try daemon.ok(["disk", "create", "e", "--size", "16M", "--policy", "stubborn"])
        try daemon.ok(["vm", "create", "w", "--disk", "e"])
        try daemon.ok(["vm", "start", "w"])
        let vetoed = try daemon.refused(["disk", "snapshot", "e", "s2"])
        #expect(vetoed.contains("org.test.filter vetoed the snapshot of disk e") && vetoed.contains("errno 16"), "\(vetoed)")
        #expect(try daemon.cli(["disk", "show", "s2"]).status != 0)
        try daemon.ok(["policy", "create", "full", "--filter", "org.test.filter:behaviour=veto-grow"])
        try daemon.ok(["disk", "create", "f", "--size", "16M", "--policy", "full"])
        let refusedGrow = try daemon.refused(["disk", "grow", "f", "--size", "64M"])
        #expect(refusedGrow.contains("vetoed the grow to 67108864 bytes of disk f") && refusedGrow.contains("errno 28"), "\(refusedGrow)")
        let unchanged: DiskInfo = try daemon.json(["disk", "show", "f"])
        #expect(unchanged.sizeBytes == 16 << 20)
        let events = try daemon.json(["events", "--limit", "200"], as: [Event].self)
        #expect(events.contains { $0.kind == "disk-event" && $0.subject == "d" && $0.message.contains("snapshot delivered to org.test.filter") })
        #expect(!events.contains { $0.kind == "disk-snapshot" && $0.message.contains("s2") })
    }
}
