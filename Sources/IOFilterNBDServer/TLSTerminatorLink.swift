import CSystemShims
import Glibc
import IOFilterNBD
import IOFilterPosix

/// The worker's side of its TLS terminator (`TLSTerminatorConfiguration`): each client
/// that asks for STARTTLS is passed there with one end of a new socket pair, and the
/// NBD code goes on with the other end. The handshake, the keys and the records are the
/// terminator's; nothing a plug-in can read in the worker decrypts a session.
public struct TLSTerminatorLink: NBDServerHandshake {
    /// The worker's end of the channel (a SOCK_SEQPACKET pair, one request per message).
    public let channel: Int32

    /// One request on the channel: this many bytes (the handshake's time limit in
    /// milliseconds, little-endian), carrying two fds: the client's socket, then the
    /// plaintext end the terminator owns from then on.
    public static let requestSize = 4

    public init(channel: Int32) { self.channel = channel }

    public func accept(_ fd: Int32, timeoutMilliseconds: Int32) -> Result<Int32, NBDError> {
        let pair: (Int32, Int32)
        do {
            pair = try Sockets.pair()
        } catch {
            return .failure(NBDError(description: "cannot start TLS: \(error)"))
        }
        // Room for whole 1 MiB replies, as the terminator gives its end: the NBD writer
        // and the terminator's pump trade fewer wake-ups.
        var room: Int32 = 4 << 20
        for option in [SO_SNDBUF, SO_RCVBUF] {
            _ = setsockopt(pair.0, SOL_SOCKET, option, &room, socklen_t(MemoryLayout<Int32>.size))
        }
        let timeout = UInt32(clamping: max(timeoutMilliseconds, 1))
        let request = (0..<Self.requestSize).map { UInt8(truncatingIfNeeded: timeout >> (8 * UInt32($0))) }
        let sent = request.withUnsafeBytes { bytes in
            [fd, pair.1].withUnsafeBufferPointer { iof_send_with_fds(channel, bytes.baseAddress, bytes.count, $0.baseAddress, 2) }
        }
        close(pair.1)  // the terminator's from here on
        guard sent == request.count else {
            close(pair.0)
            return .failure(NBDError(description: "the TLS terminator cannot be reached: \(String(cString: strerror(Int32(-sent))))"))
        }
        // A failed handshake closes the terminator's end: the NBD code reads the end.
        return .success(pair.0)
    }

    /// Calls `ended` (on a thread of its own) once the terminator has gone: no client
    /// could start TLS any more, and the worker should be started anew with a new one.
    public func watch(ended: @escaping @Sendable () -> Void) {
        let channel = channel
        startThread(name: "tls-terminator") {
            var polled = pollfd(fd: channel, events: Int16(POLLIN), revents: 0)
            while poll(&polled, 1, -1) < 0 && errno == EINTR {}
            ended()
        }
    }
}
