import CTLS
import IOFilterNBD
import IOFilterPosix

/// The client's TLS handshake with a pre-shared key, on GnuTLS: what an NBD client
/// starts with a server that requires TLS, and what a partner daemon speaks to a peer.
public struct NBDClientTLS: NBDClientHandshake {
    public let psk: PSKKey

    public init(_ psk: PSKKey) { self.psk = psk }

    /// The key of `username` (default: the file's first) from a psktool file's text.
    public init(pskFile text: String, username: String? = nil) throws(NBDError) {
        psk = try PSKKey(pskFile: text, username: username)
    }

    /// The TLS handshake as the client on `fd`; then the plaintext end of the session
    /// (the session keeps its own copy of `fd`).
    public func connect(_ fd: Int32, timeoutMilliseconds: Int32 = 10_000) throws(NBDError) -> Int32 {
        var error = [CChar](repeating: 0, count: 512)
        let plaintext = error.withUnsafeMutableBufferPointer { message in
            psk.key.withUnsafeBufferPointer { key in
                iof_tls_connect_psk(fd, psk.username, key.baseAddress, key.count, timeoutMilliseconds, message.baseAddress!, message.count)
            }
        }
        guard plaintext >= 0 else {
            throw NBDError(description: String(nulTerminated: error))
        }
        return plaintext
    }
}
