import Foundation
import IOFilterModel
@testable import IOFilterTrust
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

    /// RFC 8032, section 7.1, test 1: the signing keys are plain Ed25519, so keys and
    /// signatures made before the host moved to Nettle (or by any other Ed25519 tool)
    /// still verify.
    @Test func rfc8032TestVector() throws {
        func bytes(_ hex: String) -> Data {
            Data(stride(from: 0, to: hex.count, by: 2).map { UInt8(hex.dropFirst($0).prefix(2), radix: 16)! })
        }
        let seed = bytes("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
        let expectedPublic = bytes("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
        let expectedSignature = bytes(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b")
        let key = PrivateSigningKey(seed: seed, comment: "rfc8032")
        #expect(key.publicKey.raw == expectedPublic)
        #expect(try key.signature(for: Data()) == expectedSignature)
        #expect(key.publicKey.isValidSignature(expectedSignature, for: Data()))
        var forged = expectedSignature
        forged[0] ^= 1
        #expect(!key.publicKey.isValidSignature(forged, for: Data()))
        #expect(!key.publicKey.isValidSignature(expectedSignature, for: Data([0])))
        // SHA-256 of "abc" (FIPS 180-2), the digest plug-in signatures and key ids use.
        #expect(SHA256Digest.hex(Data("abc".utf8)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
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
