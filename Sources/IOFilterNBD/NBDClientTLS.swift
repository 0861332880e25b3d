import CTLS
import IOFilterPosix

/// What an NBD client needs to start TLS with a server that requires it: a pre-shared
/// key, as psktool writes it (`username:hexkey` lines).
public struct NBDClientTLS: Sendable {
    public let username: String
    public let key: [UInt8]

    /// The key of `username` (default: the file's first) from a psktool file's text.
    public init(pskFile text: String, username: String? = nil) throws(NBDError) {
        for line in text.split(whereSeparator: \.isNewline) where !line.hasPrefix("#") {
            let fields = line.split(separator: ":", maxSplits: 1)
            guard fields.count == 2, username == nil || fields[0] == username! else { continue }
            let hex = Array(fields[1].utf8)
            guard hex.count % 2 == 0, !hex.isEmpty else { continue }
            var key: [UInt8] = []
            for index in stride(from: 0, to: hex.count, by: 2) {
                guard let byte = UInt8(String(decoding: hex[index..<index + 2], as: UTF8.self), radix: 16) else {
                    throw NBDError(description: "the key of \(fields[0]) is not hexadecimal")
                }
                key.append(byte)
            }
            self.username = String(fields[0])
            self.key = key
            return
        }
        throw NBDError(description: username.map { "no key for \($0) in the PSK file" } ?? "the PSK file holds no username:hexkey line")
    }

    /// The TLS handshake as the client on `fd`; then the plaintext end of the session
    /// (the session keeps its own copy of `fd`).
    public func connect(_ fd: Int32, timeoutMilliseconds: Int32 = 10_000) throws(NBDError) -> Int32 {
        var error = [CChar](repeating: 0, count: 512)
        let plaintext = error.withUnsafeMutableBufferPointer { message in
            key.withUnsafeBufferPointer { key in
                iof_tls_connect_psk(fd, username, key.baseAddress, key.count, timeoutMilliseconds, message.baseAddress!, message.count)
            }
        }
        guard plaintext >= 0 else {
            throw NBDError(description: String(nulTerminated: error))
        }
        return plaintext
    }
}
