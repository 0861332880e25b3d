import CSystemShims
import Glibc
import IOFilterPosix
import Logging

/// Opening a filter's own block target — a file (a replica, a cache device) or an NBD
/// URI (a remote export) — for a process that may not open anything itself.
///
/// A sandboxed worker has no path to the host's files and no network. The host runs a
/// broker on one end of a SOCK_SEQPACKET pair: the worker sends a target as one
/// record, the broker checks it is one the VM's policies named, opens it, and answers
/// with one record — an errno (0) and a message — carrying the fd as SCM_RIGHTS.
public enum TargetBroker {
    public struct Failure: Error, CustomStringConvertible {
        public let code: Int32
        public let message: String
        public init(_ code: Int32, _ message: String) {
            self.code = code
            self.message = message
        }
        public var description: String { message }
    }

    static let maxRecord = 8192

    /// Opens `spec` in this process: a file read-write (created 0600 if missing; a
    /// regular file or a block device), or a stream socket connected to the NBD server
    /// an NBD URI names (before the NBD handshake).
    public static func open(_ spec: String) -> Result<Int32, Failure> {
        if spec.contains("://") {
            guard let uri = NBDURI(spec) else { return .failure(Failure(EINVAL, "'\(spec)' is not an NBD URI")) }
            do {
                return .success(try uri.connect())
            } catch {
                return .failure(Failure(error.code == 0 ? EIO : error.code, "cannot connect to \(spec): \(error)"))
            }
        }
        let fd = Glibc.open(spec, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, 0o600)
        guard fd >= 0 else {
            let code = errno
            return .failure(Failure(code, "cannot open \(spec): \(String(cString: strerror(code)))"))
        }
        var info = stat()
        let kind = fstat(fd, &info) == 0 ? info.st_mode & S_IFMT : 0
        guard kind == S_IFREG || kind == S_IFBLK else {
            close(fd)
            return .failure(Failure(EINVAL, "\(spec) is neither a regular file nor a block device"))
        }
        return .success(fd)
    }

    /// The worker's side: asks the broker on `socket` for `spec`. Callers serialize.
    public static func request(_ spec: String, over socket: Int32) -> Result<Int32, Failure> {
        let bytes = Array(spec.utf8)
        guard bytes.count < maxRecord else { return .failure(Failure(ENAMETOOLONG, "target name too long")) }
        let sent = bytes.withUnsafeBytes { iof_send_with_fd(socket, $0.baseAddress, $0.count, -1) }
        guard sent == bytes.count else { return .failure(Failure(EIO, "the host's target broker is gone")) }
        var answer = [UInt8](repeating: 0, count: maxRecord)
        var fd: Int32 = -1
        let received = answer.withUnsafeMutableBytes { iof_receive_with_fd(socket, $0.baseAddress, $0.count, &fd) }
        guard received >= 4 else {
            if fd >= 0 { close(fd) }
            return .failure(Failure(EIO, "the host's target broker did not answer"))
        }
        let code = answer.withUnsafeBytes { Int32(littleEndian: $0.loadUnaligned(as: Int32.self)) }
        if code == 0, fd >= 0 { return .success(fd) }
        if fd >= 0 { close(fd) }
        return .failure(Failure(code == 0 ? EIO : code, String(decoding: answer[4..<received], as: UTF8.self)))
    }

    /// What the host answers one request with: an fd to hand over, or why not.
    public typealias Answer = @Sendable (_ spec: String) -> Result<Int32, Failure>

    /// The answer of a worker's broker: only `allowed` targets are opened; anything
    /// else is refused with EACCES.
    public static func opening(_ allowed: Set<String>) -> Answer {
        { spec in
            allowed.contains(spec) ? open(spec) : .failure(Failure(EACCES, "\(spec) is not a target any policy of this VM names"))
        }
    }

    /// The host's side: answers requests on `socket` on a thread of its own until the
    /// worker's end closes (it exited), then closes `socket`. Refusals are logged.
    static func serve(on socket: Int32, logger: Logger, answer: @escaping Answer) {
        startThread(name: "target-broker") {
            defer { close(socket) }
            var record = [UInt8](repeating: 0, count: maxRecord)
            while true {
                var ignored: Int32 = -1
                let received = record.withUnsafeMutableBytes { iof_receive_with_fd(socket, $0.baseAddress, $0.count, &ignored) }
                if ignored >= 0 { close(ignored) }
                guard received > 0 else { return }
                let spec = String(decoding: record[0..<received], as: UTF8.self)
                var reply: [UInt8]
                var fd: Int32 = -1
                switch answer(spec) {
                case .success(let opened):
                    fd = opened
                    reply = withUnsafeBytes(of: Int32(0).littleEndian, Array.init)
                    logger.debug("opened \(spec) for the sandboxed process")
                case .failure(let failure):
                    reply = withUnsafeBytes(of: failure.code.littleEndian, Array.init) + Array(failure.message.utf8.prefix(maxRecord - 4))
                    logger.warning("refused \(spec): \(failure.message)")
                }
                let sent = reply.withUnsafeBytes { iof_send_with_fd(socket, $0.baseAddress, $0.count, fd) }
                if fd >= 0 { close(fd) }
                if sent < 0 { return }
            }
        }
    }

    /// Starts a broker for one sandboxed process: returns its end of a SOCK_SEQPACKET
    /// pair (close-on-exec; hand it over, then close it here) and serves the other end.
    public static func start(allowed: Set<String>, logger: Logger) throws(SystemError) -> Int32 {
        try start(logger: logger, answer: opening(allowed))
    }

    public static func start(logger: Logger, answer: @escaping Answer) throws(SystemError) -> Int32 {
        let (served, handed) = try Sockets.pair(SOCK_SEQPACKET)
        serve(on: served, logger: logger, answer: answer)
        return handed
    }
}
