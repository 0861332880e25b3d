// TLS for partner plug-ins, on GnuTLS: keys for NBD targets that require TLS, and the
// handshakes between a partner daemon and its peers on other hosts. A module of its own
// so that a plug-in that speaks no TLS links no TLS library; import it beside
// IOFilterSDK where a filter or daemon does.
import Glibc
import IOFilterNBD
@_exported import IOFilterSDK
import IOFilterTLS

extension TargetTLS {
    /// `username`'s key (default: the file's first) from the psktool file `spec`.
    public init(pskFile spec: String, username: String? = nil, disk: Disk? = nil) throws(FilterError) {
        let text = try readTargetFile(spec, disk: disk)
        do {
            let client = try NBDClientTLS(pskFile: text, username: username)
            self.init(handshake: client, pskLine: client.psk.username + ":" + hexadecimal(client.psk.key))
        } catch {
            throw FilterError(EINVAL, "\(spec): \(error)")
        }
    }
}

/// TLS with a pre-shared key between a daemon and its peers on other hosts (GnuTLS).
/// Both calls hand back the plaintext end of the session: read and write it as the
/// connection, and close it to end the session.
public enum PeerTLS {
    /// The client's handshake on a connected `fd` (which the caller may close after),
    /// with a key as psktool writes it (`username:hexkey`).
    public static func connect(_ fd: Int32, pskLine: String, timeoutMilliseconds: Int32 = 10_000) throws(FilterError) -> Int32 {
        do {
            return try NBDClientTLS(pskFile: pskLine).connect(fd, timeoutMilliseconds: timeoutMilliseconds)
        } catch {
            throw FilterError(EPROTO, "TLS: \(error)")
        }
    }

    /// The server's side: credentials loaded once from a psktool file the daemon can
    /// read (in its own directory), then a handshake per peer.
    public final class Server: Sendable {
        private let credentials: NBDTLS

        public init(pskFile path: String) throws(FilterError) {
            do {
                credentials = try NBDTLS.psk(file: path)
            } catch {
                throw FilterError(EINVAL, "TLS: \(error)")
            }
        }

        /// The handshake on `fd` (which stays the caller's).
        public func accept(_ fd: Int32, timeoutMilliseconds: Int32 = 10_000) throws(FilterError) -> Int32 {
            switch credentials.accept(fd, timeoutMilliseconds: timeoutMilliseconds) {
            case .success(let plaintext): return plaintext
            case .failure(let failure): throw FilterError(EPROTO, "TLS: \(failure)")
            }
        }
    }
}
