/// A client's side of TLS on a connected socket: the handshake, then the plaintext end
/// of the session. The NBD client asks for it after NBD_OPT_STARTTLS; IOFilterTLS has
/// GnuTLS's, so that this module (and whatever links it without TLS) needs no TLS
/// library.
public protocol NBDClientHandshake: Sendable {
    func connect(_ fd: Int32, timeoutMilliseconds: Int32) throws(NBDError) -> Int32
}

/// A server's side of TLS: the NBD server asks for it once it has acknowledged a
/// client's STARTTLS, and serves the rest of the connection on the plaintext fd it
/// returns (the caller still closes `fd`). A VM's worker has `TLSTerminatorLink`, which
/// has another process run the session: the keys never enter the worker.
public protocol NBDServerHandshake: Sendable {
    func accept(_ fd: Int32, timeoutMilliseconds: Int32) -> Result<Int32, NBDError>
}

/// A pre-shared key as psktool writes it: `username:hexkey` lines.
public struct PSKKey: Sendable, Equatable {
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
}
