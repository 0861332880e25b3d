import Foundation
import IOFilterModel

/// What a signature names: a plug-in's identity as its descriptor declares it.
public struct SignedPlugin: Codable, Sendable, Equatable, CustomStringConvertible {
    public var name: String
    public var version: String
    public var category: String

    public init(name: String, version: String, category: String) {
        self.name = name
        self.version = version
        self.category = category
    }

    public init(_ manifest: PluginManifest) {
        self.init(name: manifest.name, version: manifest.version, category: manifest.category.rawValue)
    }

    public var description: String { "\(name) \(version) (\(category))" }
}

/// The SHA-256 and size of a plug-in file's bytes.
public struct PluginDigest: Sendable, Equatable {
    public let sha256: String
    public let size: Int64

    public init(sha256: String, size: Int64) {
        self.sha256 = sha256
        self.size = size
    }

    public init(file path: String) throws(TrustError) {
        guard let handle = FileHandle(forReadingAtPath: path) else { throw .unreadable(path) }
        defer { try? handle.close() }
        var hasher = SHA256Digest()
        var size: Int64 = 0
        while true {
            let chunk: Data
            do {
                guard let read = try handle.read(upToCount: 1 << 20), !read.isEmpty else { break }
                chunk = read
            } catch {
                throw .unreadable(path)
            }
            hasher.update(chunk)
            size += Int64(chunk.count)
        }
        self.init(sha256: hasher.finalize().hexString, size: size)
    }
}

/// A plug-in's detached signature file, PLUGIN.so.sig: the plug-in's identity and digest,
/// and one or more signatures over both (a partner's, and the project's countersignature).
/// Each signature covers the level it claims, so a level cannot be raised afterwards,
/// and the identity and digest, so it cannot be moved to another plug-in or version.
public struct SignatureFile: Codable, Sendable, Equatable {
    public static let currentFormat = "iofilter-plugin-signature/1"

    public struct Entry: Codable, Sendable, Equatable {
        public var keyId: String
        /// The signer's public key line (comment included), so that a signature can be
        /// checked, and its signer named, before anyone trusts the key.
        public var publicKey: String
        public var level: AcceptanceLevel
        public var signedAt: String
        /// Ed25519 over `message(level:)`, base64.
        public var signature: String
    }

    public var format: String
    public var plugin: SignedPlugin
    public var sha256: String
    public var size: Int64
    public var signatures: [Entry]

    public var digest: PluginDigest { PluginDigest(sha256: sha256, size: size) }

    func message(level: AcceptanceLevel) -> Data {
        Data("""
            \(format)
            name=\(plugin.name)
            version=\(plugin.version)
            category=\(plugin.category)
            size=\(size)
            sha256=\(sha256)
            level=\(level.rawValue)

            """.utf8)
    }

    /// Signs `plugin` with `key` at `level`. An existing file for the same bytes and
    /// plug-in keeps its other signatures (this one is a countersignature); one for
    /// anything else is replaced.
    public static func signing(
        _ plugin: SignedPlugin, digest: PluginDigest, key: PrivateSigningKey, level: AcceptanceLevel, adding existing: SignatureFile?
    ) throws(TrustError) -> SignatureFile {
        var file = SignatureFile(format: currentFormat, plugin: plugin, sha256: digest.sha256, size: digest.size, signatures: [])
        if let existing, existing.format == currentFormat, existing.plugin == plugin, existing.digest == digest {
            file.signatures = existing.signatures.filter { $0.keyId != key.publicKey.id }
        }
        let formatter = ISO8601DateFormatter()
        file.signatures.append(Entry(
            keyId: key.publicKey.id, publicKey: key.publicKey.line, level: level, signedAt: formatter.string(from: Date()),
            signature: try key.signature(for: file.message(level: level)).base64EncodedString()))
        return file
    }

    public init(format: String, plugin: SignedPlugin, sha256: String, size: Int64, signatures: [Entry]) {
        self.format = format
        self.plugin = plugin
        self.sha256 = sha256
        self.size = size
        self.signatures = signatures
    }

    public init(bytes: Data, source: String) throws(TrustError) {
        do {
            self = try JSONDecoder().decode(SignatureFile.self, from: bytes)
        } catch {
            throw .malformedSignature("\(source) is not a plug-in signature file (from `iofilter plugin sign`): \(error)")
        }
        guard format == Self.currentFormat else {
            throw .malformedSignature("\(source) has format '\(format)'; this host reads \(Self.currentFormat)")
        }
    }

    public var bytes: Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(self)) ?? Data()
    }
}

/// A key a host trusts, and the highest level it may sign at.
public struct TrustedKey: Codable, Sendable, Equatable {
    public var keyId: String
    public var publicKey: String
    public var level: AcceptanceLevel
    public var addedAt: String

    public init(publicKey: PublicSigningKey, level: AcceptanceLevel, addedAt: String) {
        keyId = publicKey.id
        self.publicKey = publicKey.line
        self.level = level
        self.addedAt = addedAt
    }
}

/// What a plug-in's signatures are worth to a host that trusts `trusted`.
public struct SignatureVerdict: Sendable, Codable, Equatable {
    public struct Signer: Sendable, Codable, Equatable {
        public var keyId: String
        public var comment: String
        public var claimed: AcceptanceLevel
        /// The level the host enrolled the key for; nil when it does not trust the key.
        public var enrolled: AcceptanceLevel?
        /// The lower of claimed and enrolled; community for an unknown key.
        public var effective: AcceptanceLevel
        public var valid: Bool
    }

    /// The highest effective level of any valid signature; community when unsigned.
    public var level: AcceptanceLevel
    public var signers: [Signer]
    /// Why the signatures cannot be believed at all (tampering, another plug-in's
    /// signature, a forged entry). A plug-in with problems is refused at every level.
    public var problems: [String]

    public var isSigned: Bool { !signers.isEmpty }

    public static func check(_ file: SignatureFile?, digest: PluginDigest, plugin: SignedPlugin, trusted: [TrustedKey]) -> SignatureVerdict {
        guard let file else { return SignatureVerdict(level: .community, signers: [], problems: []) }
        var problems: [String] = []
        if file.plugin != plugin {
            problems.append("its signature is for \(file.plugin), not for this plug-in, \(plugin)")
        }
        if file.digest != digest {
            problems.append("its bytes do not match its signature (sha256 \(digest.sha256.prefix(16))…, signed \(file.sha256.prefix(16))…): "
                            + "the file changed after it was signed; rebuild and sign it again, or reinstall the signed file")
        }
        var signers: [Signer] = []
        for entry in file.signatures {
            let key = try? PublicSigningKey(line: entry.publicKey)
            let valid = key.map { key in
                key.id == entry.keyId && Data(base64Encoded: entry.signature).map { key.isValidSignature($0, for: file.message(level: entry.level)) } == true
            } ?? false
            if !valid { problems.append("the signature by key \(entry.keyId) does not verify (forged, or altered after signing)") }
            // The whole key is compared, not just its short id.
            let enrolled = key.flatMap { key in trusted.first { (try? PublicSigningKey(line: $0.publicKey))?.raw == key.raw }?.level }
            signers.append(Signer(
                keyId: entry.keyId, comment: key?.comment ?? "", claimed: entry.level, enrolled: enrolled,
                effective: valid ? min(entry.level, enrolled ?? .community) : .community, valid: valid))
        }
        if file.signatures.isEmpty { problems.append("its signature file holds no signature") }
        let level = problems.isEmpty ? signers.map(\.effective).max() ?? .community : .community
        return SignatureVerdict(level: level, signers: signers, problems: problems)
    }

    /// Why a host at `required` must refuse the plug-in, or nil if it may install it.
    public func refusal(required: AcceptanceLevel) -> String? {
        if !problems.isEmpty { return problems.joined(separator: "; ") }
        guard level < required else { return nil }
        if signers.isEmpty {
            return "it is unsigned (community level) and this host accepts \(required) and above: sign it with "
                + "`iofilter plugin sign PLUGIN.so --key KEY.key` and enrol KEY.pub on this host (`iofilter trust add KEY.pub --level \(required)`), "
                + "or run iofilterd with --acceptance-level community"
        }
        let described = signers.map { signer in
            let name = signer.comment.isEmpty ? signer.keyId : "\(signer.keyId) (\(signer.comment))"
            guard let enrolled = signer.enrolled else { return "key \(name) is not trusted on this host" }
            return "key \(name) signs at \(signer.claimed) and is enrolled for \(enrolled), so it counts as \(signer.effective)"
        }
        return "its signatures make it \(level) and this host accepts \(required) and above: " + described.joined(separator: "; ")
            + (signers.contains { $0.enrolled == nil } ? "; enrol a signer's key with `iofilter trust add KEY.pub --level LEVEL`" : "")
    }
}
