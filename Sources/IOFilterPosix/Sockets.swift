import CSystemShims
import Glibc

/// Listening and connecting stream sockets, unix or TCP, blocking and close-on-exec.
public enum Sockets {
    /// "HOST:PORT" (a bracketed IPv6 address allowed) as its parts; nil if malformed.
    public static func hostPort(_ text: String) -> (host: String, port: UInt16)? {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else { return nil }
        var host = String(text[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    public static func listenUnix(path: String, backlog: Int32 = 128) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        unlink(path)
        var address = try unixAddress(path)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let error = SystemError("bind \(path)")
            close(fd)
            throw error
        }
        guard listen(fd, backlog) == 0 else {
            let error = SystemError("listen")
            close(fd)
            throw error
        }
        return fd
    }

    /// Listens on `host:port` (IPv4 or IPv6 literal, default loopback). Port 0 picks one.
    public static func listenTCP(host: String = "127.0.0.1", port: UInt16, backlog: Int32 = 128) throws(SystemError) -> Int32 {
        let (fd, _) = try tcpSocket(host: host, port: port) { fd, address, length throws(SystemError) in
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            guard bind(fd, address, length) == 0 else { throw SystemError("bind \(host):\(port)") }
            guard listen(fd, backlog) == 0 else { throw SystemError("listen") }
        }
        return fd
    }

    /// The next connection on a listening socket (close-on-exec), or -1 with errno.
    public static func accept(_ listener: Int32) -> Int32 { iof_accept_cloexec(listener) }

    /// A connected pair of unix sockets (stream, or SOCK_SEQPACKET for records), both
    /// close-on-exec.
    public static func pair(_ type: __socket_type = SOCK_STREAM) throws(SystemError) -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(type.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SystemError("socketpair")
        }
        return (fds[0], fds[1])
    }

    public static func connectUnix(path: String) throws(SystemError) -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        var address = try unixAddress(path)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let error = SystemError("connect \(path)")
            close(fd)
            throw error
        }
        return fd
    }

    /// A connected TCP socket, or ETIMEDOUT after `timeout` seconds: a peer that never
    /// answers (a host gone from the network) must not hold the caller for the
    /// kernel's minutes of SYN retries.
    public static func connectTCP(host: String, port: UInt16, timeout: Double = 10) throws(SystemError) -> Int32 {
        let (fd, _) = try tcpSocket(host: host, port: port) { fd, address, length throws(SystemError) in
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            if connect(fd, address, length) != 0 {
                guard errno == EINPROGRESS else { throw SystemError("connect \(host):\(port)") }
                let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
                var poller = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                while true {
                    let now = monotonicNanoseconds()
                    guard now < deadline else { throw SystemError("connect \(host):\(port)", code: ETIMEDOUT) }
                    let ready = poll(&poller, 1, Int32((deadline - now) / 1_000_000) + 1)
                    if ready > 0 { break }
                    if ready < 0 && errno != EINTR { throw SystemError("connect \(host):\(port)") }
                }
                var failure: Int32 = 0
                var size = socklen_t(MemoryLayout<Int32>.size)
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &failure, &size)
                guard failure == 0 else { throw SystemError("connect \(host):\(port)", code: failure) }
            }
            _ = fcntl(fd, F_SETFL, flags)
        }
        setNoDelay(fd)
        return fd
    }

    /// A host as it stands before a port in a URI, a Host header or an address an
    /// operator reads: an IPv6 literal in brackets (RFC 3986), anything else as it is.
    public static func bracketed(host: String) -> String {
        host.contains(":") ? "[\(host)]" : host
    }

    /// "host:port", with an IPv6 literal in brackets.
    public static func authority(host: String, port: some BinaryInteger) -> String {
        "\(bracketed(host: host)):\(port)"
    }

    /// The port a TCP socket is bound to.
    public static func localPort(_ fd: Int32) -> UInt16 {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        let family = storage.ss_family
        return withUnsafePointer(to: &storage) { pointer in
            if family == sa_family_t(AF_INET6) {
                return pointer.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return pointer.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
    }

    /// The path a listening unix socket is bound to, if `fd` is one (a socket handed
    /// back by a process is checked before it is trusted to be what it claims).
    public static func listeningUnixPath(_ fd: Int32) -> String? {
        var accepting: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &size) == 0, accepting != 0 else { return nil }
        var address = sockaddr_un()
        var length = socklen_t(MemoryLayout<sockaddr_un>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0, address.sun_family == sa_family_t(AF_UNIX) else { return nil }
        return withUnsafeBytes(of: address.sun_path) { bytes in
            String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        }
    }

    public static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    public static func isTCP(_ fd: Int32) -> Bool {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        return storage.ss_family == sa_family_t(AF_INET) || storage.ss_family == sa_family_t(AF_INET6)
    }

    private static func unixAddress(_ path: String) throws(SystemError) -> sockaddr_un {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw SystemError("socket path \(path)", code: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return address
    }

    private static func tcpSocket(
        host: String, port: UInt16,
        _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) throws(SystemError) -> Void
    ) throws(SystemError) -> (Int32, Int32) {
        var v4 = sockaddr_in()
        var v6 = sockaddr_in6()
        let family: Int32
        if inet_pton(AF_INET, host, &v4.sin_addr) == 1 {
            family = AF_INET
            v4.sin_family = sa_family_t(AF_INET)
            v4.sin_port = port.bigEndian
        } else if inet_pton(AF_INET6, host, &v6.sin6_addr) == 1 {
            family = AF_INET6
            v6.sin6_family = sa_family_t(AF_INET6)
            v6.sin6_port = port.bigEndian
        } else if host == "localhost" {
            return try tcpSocket(host: "127.0.0.1", port: port, body)
        } else {
            throw SystemError("address \(host) (give an IP address)", code: EINVAL)
        }
        let fd = socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw SystemError("socket") }
        do {
            if family == AF_INET {
                try withUnsafePointer(to: &v4) { (p) throws(SystemError) in
                    try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (s) throws(SystemError) in
                        try body(fd, s, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            } else {
                try withUnsafePointer(to: &v6) { (p) throws(SystemError) in
                    try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (s) throws(SystemError) in
                        try body(fd, s, socklen_t(MemoryLayout<sockaddr_in6>.size))
                    }
                }
            }
        } catch {
            close(fd)
            throw error
        }
        return (fd, family)
    }
}
