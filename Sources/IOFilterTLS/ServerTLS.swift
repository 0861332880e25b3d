import CTLS
import Glibc
import IOFilterNBD
import IOFilterPosix

/// TLS credentials for a server side, loaded once (before the process is confined, while
/// their files are still reachable): a PSK file, or X.509 certificates. A VM's TLS
/// terminator holds the NBD server's, never its worker; a partner daemon its own.
public final class NBDTLS: @unchecked Sendable {
    // @unchecked: the credentials are read-only after loading; GnuTLS shares them
    // between sessions on any thread.
    private let credentials: OpaquePointer
    public let description: String

    /// A psktool file: `username:hexkey` lines.
    public static func psk(file: String) throws(NBDError) -> NBDTLS {
        try load("PSK from \(file)") { iof_tls_load_psk(file, $0, $1) }
    }

    /// A directory holding ca-cert.pem, server-cert.pem and server-key.pem; with
    /// `verifyPeer`, clients must present a certificate the CA signed.
    public static func certificates(directory: String, verifyPeer: Bool) throws(NBDError) -> NBDTLS {
        try load("X.509 from \(directory)\(verifyPeer ? ", clients verified" : "")") {
            iof_tls_load_x509(directory, verifyPeer ? 1 : 0, $0, $1)
        }
    }

    private static func load(_ description: String, _ body: (UnsafeMutablePointer<CChar>, Int) -> OpaquePointer?) throws(NBDError) -> NBDTLS {
        var error = [CChar](repeating: 0, count: 512)
        guard let credentials = error.withUnsafeMutableBufferPointer({ body($0.baseAddress!, $0.count) }) else {
            throw NBDError(description: String(nulTerminated: error))
        }
        return NBDTLS(credentials: credentials, description: description)
    }

    private init(credentials: OpaquePointer, description: String) {
        self.credentials = credentials
        self.description = description
    }

    /// The TLS handshake on `fd`; then the plaintext end of the session (close it when
    /// done; `fd` stays the caller's). A partner daemon's sessions with its peers.
    public func accept(_ fd: Int32, timeoutMilliseconds: Int32) -> Result<Int32, NBDError> {
        var error = [CChar](repeating: 0, count: 512)
        let plaintext = error.withUnsafeMutableBufferPointer { iof_tls_accept(credentials, fd, timeoutMilliseconds, $0.baseAddress!, $0.count) }
        return plaintext >= 0 ? .success(plaintext) : .failure(NBDError(description: String(nulTerminated: error)))
    }

    /// The TLS handshake on `fd`, then the session's plaintext carried to and from
    /// `plain` until either side closes. `plain` is the session's from the call on (on
    /// failure it is closed, which its peer reads as the end); `fd` stays the caller's.
    public func accept(_ fd: Int32, into plain: Int32, timeoutMilliseconds: Int32) -> NBDError? {
        var error = [CChar](repeating: 0, count: 512)
        let rc = error.withUnsafeMutableBufferPointer { iof_tls_accept_into(credentials, fd, plain, timeoutMilliseconds, $0.baseAddress!, $0.count) }
        return rc == 0 ? nil : NBDError(description: String(nulTerminated: error))
    }
}
