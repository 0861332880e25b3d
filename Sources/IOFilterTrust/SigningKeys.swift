import Foundation

/// An Ed25519 public key as it travels: one line, `iofilter-ed25519 BASE64 COMMENT`,
/// in PREFIX.pub files, in trust stores and inside signatures.
public struct PublicSigningKey: Sendable, Hashable, Codable {
    public static let scheme = "iofilter-ed25519"

    /// The 32 bytes of the key.
    public let raw: Data
    /// Who the key belongs to ("acme-storage release key"); not covered by anything.
    public var comment: String

    public init(raw: Data, comment: String) throws(TrustError) {
        guard raw.count == Ed25519.keySize else {
            throw .malformedKey("an Ed25519 public key is 32 bytes, got \(raw.count)")
        }
        self.raw = raw
        self.comment = comment
    }

    /// Parses the line of a PREFIX.pub file.
    public init(line: String) throws(TrustError) {
        let fields = line.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ", maxSplits: 2)
        guard fields.count >= 2, fields[0] == Self.scheme, let raw = Data(base64Encoded: String(fields[1])) else {
            throw .malformedKey("not an \(Self.scheme) public key (a .pub file from `iofilter plugin keygen`)")
        }
        try self.init(raw: raw, comment: fields.count > 2 ? String(fields[2]) : "")
    }

    public init(file path: String) throws(TrustError) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw .unreadable(path) }
        do {
            try self.init(line: text)
        } catch {
            throw .malformedKey("\(path): \(error.message)")
        }
    }

    /// A short, stable name for the key: the first 8 bytes of its SHA-256, in hex.
    public var id: String { String(SHA256Digest.hex(raw).prefix(16)) }

    public var line: String { "\(Self.scheme) \(raw.base64EncodedString())\(comment.isEmpty ? "" : " " + comment)" }

    func isValidSignature(_ signature: Data, for message: Data) -> Bool {
        Ed25519.isValid(signature, for: message, publicKey: raw)
    }
}

/// An Ed25519 private key in a PREFIX.key file (mode 0600): `iofilter-ed25519-secret
/// BASE64-SEED COMMENT`.
public struct PrivateSigningKey: Sendable {
    static let scheme = "iofilter-ed25519-secret"

    /// The 32-byte Ed25519 seed.
    let seed: Data
    public let comment: String

    public static func generate(comment: String) -> PrivateSigningKey {
        PrivateSigningKey(seed: Ed25519.generateSeed(), comment: comment)
    }

    public init(file path: String) throws(TrustError) {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw .unreadable(path) }
        let fields = text.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: " ", maxSplits: 2)
        guard fields.count >= 2, fields[0] == Self.scheme, let seed = Data(base64Encoded: String(fields[1])),
              seed.count == Ed25519.keySize
        else { throw .malformedKey("\(path) is not an \(Self.scheme) key (a .key file from `iofilter plugin keygen`)") }
        self.init(seed: seed, comment: fields.count > 2 ? String(fields[2]) : "")
    }

    init(seed: Data, comment: String) {
        self.seed = seed
        self.comment = comment
    }

    public var publicKey: PublicSigningKey {
        // Nettle always derives 32 bytes from a 32-byte seed.
        try! PublicSigningKey(raw: Ed25519.publicKey(seed: seed), comment: comment)
    }

    func signature(for message: Data) throws(TrustError) -> Data {
        Ed25519.sign(message, seed: seed)
    }

    /// Writes PREFIX.key (0600, never over an existing file) and PREFIX.pub.
    public func write(prefix: String) throws(TrustError) {
        let secret = "\(Self.scheme) \(seed.base64EncodedString())\(comment.isEmpty ? "" : " " + comment)\n"
        let privatePath = prefix + ".key"
        let fd = open(privatePath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0o600)
        guard fd >= 0 else {
            throw .unwritable(privatePath, errno == EEXIST ? "it exists; keys are never overwritten" : String(cString: strerror(errno)))
        }
        let written = secret.withCString { Glibc.write(fd, $0, strlen($0)) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == secret.utf8.count, synced else {
            unlink(privatePath)
            throw .unwritable(privatePath, "short write")
        }
        do {
            try Data((publicKey.line + "\n").utf8).write(to: URL(fileURLWithPath: prefix + ".pub"))
        } catch {
            throw .unwritable(prefix + ".pub", "\(error)")
        }
    }
}

public enum TrustError: Error, CustomStringConvertible, Sendable {
    case malformedKey(String)
    case malformedSignature(String)
    case unreadable(String)
    case unwritable(String, String)
    case signingFailed(String)

    public var message: String {
        switch self {
        case .malformedKey(let text), .malformedSignature(let text), .signingFailed(let text): text
        case .unreadable(let path): "cannot read \(path)"
        case .unwritable(let path, let why): "cannot write \(path): \(why)"
        }
    }

    public var description: String { message }
}
