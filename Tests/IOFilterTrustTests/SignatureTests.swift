import Foundation
import IOFilterModel
import IOFilterTrust
import Testing

/// Signatures over real bytes with real Ed25519 keys: what a host accepts, and why it
/// refuses the rest.
@Suite struct SignatureTests {
    let plugin = SignedPlugin(name: "com.acme.replicate", version: "1.2.0", category: "replication")
    let digest = PluginDigest(sha256: String(repeating: "ab", count: 32), size: 4096)
    let partner = PrivateSigningKey.generate(comment: "acme release key")
    let project = PrivateSigningKey.generate(comment: "swift-iofilter project")

    func trusted(_ key: PrivateSigningKey, _ level: AcceptanceLevel) -> TrustedKey {
        TrustedKey(publicKey: key.publicKey, level: level, addedAt: "")
    }

    @Test func unsignedIsCommunity() {
        let verdict = SignatureVerdict.check(nil, digest: digest, plugin: plugin, trusted: [])
        #expect(verdict.level == .community)
        #expect(verdict.refusal(required: .community) == nil)
        #expect(verdict.refusal(required: .partner)?.contains("unsigned") == true)
    }

    @Test func effectiveLevelIsTheLowerOfClaimAndEnrolment() throws {
        let file = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .certified, adding: nil)
        let verdict = SignatureVerdict.check(file, digest: digest, plugin: plugin, trusted: [trusted(partner, .partner)])
        #expect(verdict.problems.isEmpty)
        #expect(verdict.level == .partner)
        #expect(verdict.refusal(required: .partner) == nil)
        let refusal = try #require(verdict.refusal(required: .accepted))
        #expect(refusal.contains("enrolled for partner"))
    }

    @Test func unknownKeyCountsAsCommunity() throws {
        let file = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        let verdict = SignatureVerdict.check(file, digest: digest, plugin: plugin, trusted: [trusted(project, .certified)])
        #expect(verdict.level == .community)
        #expect(verdict.signers.first?.valid == true)
        #expect(verdict.refusal(required: .partner)?.contains("not trusted on this host") == true)
    }

    @Test func countersignatureRaisesTheLevel() throws {
        let signed = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        let countersigned = try SignatureFile.signing(plugin, digest: digest, key: project, level: .accepted, adding: signed)
        #expect(countersigned.signatures.count == 2)
        let keys = [trusted(partner, .partner), trusted(project, .certified)]
        #expect(SignatureVerdict.check(countersigned, digest: digest, plugin: plugin, trusted: keys).level == .accepted)
        // Signing anything else starts a new file.
        let other = SignedPlugin(name: plugin.name, version: "1.3.0", category: plugin.category)
        #expect(try SignatureFile.signing(other, digest: digest, key: project, level: .accepted, adding: signed).signatures.count == 1)
    }

    @Test func tamperedBytesAreRefusedAtEveryLevel() throws {
        let file = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        let changed = PluginDigest(sha256: String(repeating: "cd", count: 32), size: 4096)
        let verdict = SignatureVerdict.check(file, digest: changed, plugin: plugin, trusted: [trusted(partner, .partner)])
        #expect(verdict.level == .community)
        #expect(verdict.refusal(required: .community)?.contains("changed after it was signed") == true)
    }

    @Test func signatureCannotMoveToAnotherPlugin() throws {
        let file = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        let impostor = SignedPlugin(name: "com.evil.replicate", version: "1.2.0", category: "replication")
        let verdict = SignatureVerdict.check(file, digest: digest, plugin: impostor, trusted: [trusted(partner, .partner)])
        #expect(verdict.refusal(required: .community)?.contains("not for this plug-in") == true)
    }

    @Test func raisedClaimOrSwappedKeyDoesNotVerify() throws {
        var file = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        file.signatures[0].level = .certified
        let keys = [trusted(partner, .certified), trusted(project, .certified)]
        #expect(SignatureVerdict.check(file, digest: digest, plugin: plugin, trusted: keys).refusal(required: .community)?.contains("does not verify") == true)
        var swapped = try SignatureFile.signing(plugin, digest: digest, key: partner, level: .partner, adding: nil)
        swapped.signatures[0].publicKey = project.publicKey.line
        swapped.signatures[0].keyId = project.publicKey.id
        #expect(SignatureVerdict.check(swapped, digest: digest, plugin: plugin, trusted: keys).level == .community)
    }

    @Test func keyFilesRoundTripAndAreNeverOverwritten() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("iof-keys-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try partner.write(prefix: "\(directory)/acme")
        var status = stat()
        #expect(stat("\(directory)/acme.key", &status) == 0 && status.st_mode & 0o777 == 0o600)
        let reread = try PrivateSigningKey(file: "\(directory)/acme.key")
        #expect(reread.publicKey == partner.publicKey)
        #expect(try PublicSigningKey(file: "\(directory)/acme.pub") == partner.publicKey)
        #expect(throws: TrustError.self) { try project.write(prefix: "\(directory)/acme") }
        #expect(try PrivateSigningKey(file: "\(directory)/acme.key").publicKey == partner.publicKey)
        let bytes = try SignatureFile.signing(plugin, digest: digest, key: reread, level: .partner, adding: nil).bytes
        #expect(try SignatureFile(bytes: bytes, source: "test").signatures.count == 1)
        #expect(throws: TrustError.self) { try SignatureFile(bytes: Data("{}".utf8), source: "test") }
    }
}
