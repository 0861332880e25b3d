import IOFilterPosix

/// An NBD URI as in the NBD URI specification: `nbd+unix:///EXPORT?socket=PATH` or
/// `nbd://HOST[:PORT]/EXPORT`.
public enum NBDURI: Sendable, Equatable, CustomStringConvertible {
    case unix(socket: String, export: String)
    case tcp(host: String, port: UInt16, export: String)

    public static let defaultPort: UInt16 = 10809

    public var export: String {
        switch self {
        case .unix(_, let export), .tcp(_, _, let export): export
        }
    }

    public var description: String {
        switch self {
        case .unix(let socket, let export):
            "nbd+unix:///\(Self.escape(export))?socket=\(socket)"
        case .tcp(let host, let port, let export):
            "nbd://\(Sockets.authority(host: host, port: port))/\(Self.escape(export))"
        }
    }

    /// The URI a client gives for a server that requires TLS: nbds:// or nbds+unix://.
    public func description(tls: Bool) -> String {
        tls ? "nbds" + description.dropFirst(3) : description
    }

    /// A stream socket connected to the server (TCP with no delay), or throws.
    public func connect() throws(SystemError) -> Int32 {
        switch self {
        case .unix(let socket, _): try Sockets.connectUnix(path: socket)
        case .tcp(let host, let port, _): try Sockets.connectTCP(host: host, port: port)
        }
    }

    public init?(_ text: String) {
        if text.hasPrefix("nbd+unix://") {
            let rest = text.dropFirst("nbd+unix://".count)
            guard rest.first == "/", let question = rest.firstIndex(of: "?") else { return nil }
            let export = Self.unescape(String(rest[rest.index(after: rest.startIndex)..<question]))
            var socket: String?
            for pair in rest[rest.index(after: question)...].split(separator: "&") where pair.hasPrefix("socket=") {
                socket = Self.unescape(String(pair.dropFirst("socket=".count)))
            }
            guard let socket, !socket.isEmpty else { return nil }
            self = .unix(socket: socket, export: export)
        } else if text.hasPrefix("nbd://") {
            let rest = text.dropFirst("nbd://".count)
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            var authority = rest[..<slash]
            let export = slash == rest.endIndex ? "" : Self.unescape(String(rest[rest.index(after: slash)...]))
            var port = Self.defaultPort
            var host: Substring
            if authority.hasPrefix("[") {
                guard let close = authority.firstIndex(of: "]") else { return nil }
                host = authority[authority.index(after: authority.startIndex)..<close]
                authority = authority[authority.index(after: close)...]
                if authority.hasPrefix(":") {
                    guard let p = UInt16(authority.dropFirst()) else { return nil }
                    port = p
                }
            } else if let colon = authority.lastIndex(of: ":") {
                host = authority[..<colon]
                guard let p = UInt16(authority[authority.index(after: colon)...]) else { return nil }
                port = p
            } else {
                host = authority
            }
            guard !host.isEmpty else { return nil }
            self = .tcp(host: String(host), port: port, export: export)
        } else {
            return nil
        }
    }

    static func escape(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if byte < 0x80 && (c.isLetter || c.isNumber || "-._~".contains(c)) {
                out.append(c)
            } else {
                out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return out
    }

    static func unescape(_ text: String) -> String {
        var bytes: [UInt8] = []
        var iterator = Array(text.utf8).makeIterator()
        while let byte = iterator.next() {
            if byte == UInt8(ascii: "%"), let high = iterator.next(), let low = iterator.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            {
                bytes.append(value)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

extension String {
    fileprivate func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
