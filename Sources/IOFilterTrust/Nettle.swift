import CNettle
import Foundation

/// Ed25519 (RFC 8032) over Nettle: the 32-byte seed is the private key, as OpenSSH,
/// BoringSSL and CryptoKit's `rawRepresentation` keep it, so keys and signatures made
/// by any of them verify here and the other way round.
enum Ed25519 {
    static let keySize = Int(ED25519_KEY_SIZE)
    static let signatureSize = Int(ED25519_SIGNATURE_SIZE)

    /// A new private key: 32 bytes from the kernel's random source.
    static func generateSeed() -> Data {
        var seed = [UInt8](repeating: 0, count: keySize)
        var filled = 0
        while filled < keySize {
            let count = seed.withUnsafeMutableBytes { getrandom($0.baseAddress! + filled, keySize - filled, 0) }
            if count > 0 { filled += count } else { precondition(errno == EINTR, "getrandom failed: \(errno)") }
        }
        return Data(seed)
    }

    static func publicKey(seed: Data) -> Data {
        precondition(seed.count == keySize)
        var key = [UInt8](repeating: 0, count: keySize)
        seed.withUnsafeBytes { nettle_ed25519_sha512_public_key(&key, $0.bindMemory(to: UInt8.self).baseAddress) }
        return Data(key)
    }

    static func sign(_ message: Data, seed: Data) -> Data {
        let key = [UInt8](publicKey(seed: seed))
        var signature = [UInt8](repeating: 0, count: signatureSize)
        seed.withUnsafeBytes { seedBytes in
            message.withUnsafeBytes { bytes in
                nettle_ed25519_sha512_sign(key, seedBytes.bindMemory(to: UInt8.self).baseAddress, bytes.count,
                                           bytes.bindMemory(to: UInt8.self).baseAddress, &signature)
            }
        }
        return Data(signature)
    }

    static func isValid(_ signature: Data, for message: Data, publicKey: Data) -> Bool {
        guard signature.count == signatureSize, publicKey.count == keySize else { return false }
        let key = [UInt8](publicKey), signed = [UInt8](signature)
        return message.withUnsafeBytes { bytes in
            nettle_ed25519_sha512_verify(key, bytes.count, bytes.bindMemory(to: UInt8.self).baseAddress, signed) == 1
        }
    }
}

/// SHA-256 over Nettle, fed in pieces.
public struct SHA256Digest {
    private var context = sha256_ctx()

    public init() { nettle_sha256_init(&context) }

    public mutating func update(_ data: Data) {
        data.withUnsafeBytes { nettle_sha256_update(&context, $0.count, $0.bindMemory(to: UInt8.self).baseAddress) }
    }

    /// The digest; the hasher starts afresh after it.
    public mutating func finalize() -> [UInt8] {
        var digest = [UInt8](repeating: 0, count: Int(SHA256_DIGEST_SIZE))
        nettle_sha256_digest(&context, digest.count, &digest)
        return digest
    }

    /// The digest of `data`, in lower-case hex.
    public static func hex(_ data: Data) -> String {
        var hasher = SHA256Digest()
        hasher.update(data)
        return hasher.finalize().hexString
    }
}

extension Sequence<UInt8> {
    var hexString: String { map { String(format: "%02x", $0) }.joined() }
}
