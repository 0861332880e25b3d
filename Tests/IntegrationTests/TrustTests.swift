import Foundation
import IOFilterAPI
import Testing

/// Signed plug-ins against a real iofilterd at its default acceptance level (partner):
/// keys made, plug-ins signed and verified by the real CLI, and every way a signature
/// can fail to earn its place refused with a message that says what to do.
@Suite("trust")
struct TrustTests {
    /// A copy of a sample build in `directory`, so that its .sig lands there.
    static func copySample(_ name: String, to directory: URL) throws -> String {
        let path = directory.appendingPathComponent("lib\(name).so").path
        try FileManager.default.copyItem(atPath: Daemon.samplePlugin(name), toPath: path)
        return path
    }

    @Test func signedPluginsInstallAtTheirLevelAndTheRestAreRefused() throws {
        let directory = Harness.temporaryDirectory("trust")
        let daemon = try Daemon(acceptanceLevel: "partner")
        defer { daemon.stop() }
        let host = try JSONDecoder().decode(HostInfo.self, from: Data(try daemon.http("GET", "/host").body))
        #expect(host.acceptanceLevel == .partner)
        let partner = directory.appendingPathComponent("acme").path
        #expect(try Harness.check(Harness.iofilter, ["plugin", "keygen", "--out", partner, "--comment", "ACME release key"]).contains("0600"))
        var status = stat()
        #expect(stat(partner + ".key", &status) == 0 && status.st_mode & 0o777 == 0o600)
        let again = try Harness.run(Harness.iofilter, ["plugin", "keygen", "--out", partner])
        #expect(again.status != 0 && again.stderr.contains("never overwritten"))

        // Unsigned, at a partner host.
        let passthrough = try Self.copySample("iofilter-passthrough-c", to: directory)
        let unsigned = try daemon.refused(["plugin", "install", passthrough])
        #expect(unsigned.contains("unsigned") && unsigned.contains("iofilter trust add"), "\(unsigned)")

        // Signed by a key the host does not know yet.
        #expect(try Harness.check(Harness.iofilter, ["plugin", "sign", passthrough, "--key", partner + ".key"]).contains("wrote \(passthrough).sig"))
        let unknown = try daemon.refused(["plugin", "install", passthrough])
        #expect(unknown.contains("not trusted on this host"), "\(unknown)")
        let verified = try Harness.check(Harness.iofilter, ["plugin", "verify", passthrough, "--trust", partner + ".pub"])
        #expect(verified.contains("valid, trusted") && verified.contains("effective level: partner"), "\(verified)")

        // Enrolled: it installs, at partner, naming its signer.
        #expect(try daemon.ok(["trust", "add", partner + ".pub", "--level", "partner"]).contains("up to partner"))
        #expect(try daemon.ok(["plugin", "install", passthrough]).contains("at acceptance level partner"))
        let installed = try daemon.json(["plugin", "show", "org.swift-iofilter.passthrough-c"], as: [PluginInfo].self)
        #expect(installed.first?.acceptanceLevel == .partner && installed.first?.signers.first?.comment == "ACME release key")

        // Changed after signing: refused, and `verify` says so too.
        let cache = try Self.copySample("iofilter-cache", to: directory)
        try Harness.check(Harness.iofilter, ["plugin", "sign", cache, "--key", partner + ".key"])
        let handle = try #require(FileHandle(forWritingAtPath: cache))
        handle.seekToEndOfFile()
        handle.write(Data([0]))
        try handle.close()
        let tampered = try daemon.refused(["plugin", "install", cache])
        #expect(tampered.contains("changed after it was signed"), "\(tampered)")
        let verifyTampered = try Harness.run(Harness.iofilter, ["plugin", "verify", cache, "--trust", partner + ".pub"])
        #expect(verifyTampered.status != 0 && verifyTampered.stderr.contains("changed after it was signed"))

        // Another plug-in's signature beside it: refused.
        let replication = try Self.copySample("iofilter-replication", to: directory)
        try FileManager.default.copyItem(atPath: passthrough + ".sig", toPath: replication + ".sig")
        let moved = try daemon.refused(["plugin", "install", replication])
        #expect(moved.contains("not for this plug-in"), "\(moved)")

        // A key enrolled for partner cannot sign above it; a countersignature by a key
        // enrolled higher raises the plug-in.
        try FileManager.default.removeItem(atPath: replication + ".sig")
        try Harness.check(Harness.iofilter, ["plugin", "sign", replication, "--key", partner + ".key", "--level", "certified"])
        #expect(try daemon.ok(["plugin", "install", replication]).contains("at acceptance level partner"))
        let project = directory.appendingPathComponent("project").path
        try Harness.check(Harness.iofilter, ["plugin", "keygen", "--out", project, "--comment", "project key"])
        let cleanCache = directory.appendingPathComponent("clean").path
        try FileManager.default.createDirectory(atPath: cleanCache, withIntermediateDirectories: true)
        let accepted = try Self.copySample("iofilter-cache", to: URL(fileURLWithPath: cleanCache))
        try Harness.check(Harness.iofilter, ["plugin", "sign", accepted, "--key", partner + ".key"])
        #expect(try Harness.check(Harness.iofilter, ["plugin", "sign", accepted, "--key", project + ".key", "--level", "accepted"])
            .contains("1 other signature(s) kept"))
        try daemon.ok(["trust", "add", project + ".pub", "--level", "certified"])
        #expect(try daemon.ok(["plugin", "install", accepted]).contains("at acceptance level accepted"))

        let keys = try daemon.json(["trust", "list"], as: [TrustedKeyInfo].self)
        #expect(keys.count == 2 && keys.first { $0.level == .partner }?.signed.count == 3)

        // A host cannot be raised above what it runs; lowering it is an event.
        daemon.stop()
        let raised = try Harness.run(Harness.binDirectory.appendingPathComponent("iofilterd").path,
                                     ["--state-dir", daemon.state.path, "--acceptance-level", "accepted"], timeout: 60)
        #expect(raised.status != 0 && raised.stderr.contains("installed plug-in(s) below it")
            && raised.stderr.contains("org.swift-iofilter.passthrough-c"), "\(raised.stderr)")
        try daemon.start(["--acceptance-level", "community"])
        let removedKey = try #require(keys.first { $0.level == .certified }?.keyId)
        #expect(try daemon.ok(["trust", "remove", removedKey]).contains("still installed, signed by it: org.swift-iofilter.cache"))
        let events = try daemon.json(["events", "--limit", "100"], as: [Event].self)
        let kinds = events.map(\.kind)
        for kind in ["plugin-refused", "trust-key-added", "plugin-installed", "acceptance-level-lowered", "trust-key-removed"] {
            #expect(kinds.contains(kind), "no \(kind) event in \(kinds)")
        }
        #expect(events.contains { $0.kind == "plugin-installed" && $0.message.contains("signed by") && $0.message.contains("ACME release key") })
    }
}
