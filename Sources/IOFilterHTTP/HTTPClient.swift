import Glibc
import IOFilterPosix

/// A blocking HTTP/1.1 client for one server address, over a unix socket or TCP.
/// One request at a time on one kept-alive connection.
public final class HTTPClient {
    public enum Address: Sendable, CustomStringConvertible {
        case unix(path: String)
        case tcp(host: String, port: UInt16)

        public var description: String {
            switch self {
            case .unix(let path): "unix:\(path)"
            case .tcp(let host, let port): "\(host):\(port)"
            }
        }
    }

    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public let address: Address
    private var fd: Int32 = -1
    private var reader: HTTPReader?

    public init(address: Address) { self.address = address }

    /// The Host a TCP listener expects (its address); "localhost" on a unix socket.
    var authority: String {
        switch address {
        case .unix: "localhost"
        case .tcp(let host, let port): Sockets.authority(host: host, port: port)
        }
    }

    deinit { disconnect() }

    public func disconnect() {
        if fd >= 0 { close(fd) }
        fd = -1
        reader = nil
    }

    private func connect() throws(Failure) {
        do {
            switch address {
            case .unix(let path): fd = try Sockets.connectUnix(path: path)
            case .tcp(let host, let port): fd = try Sockets.connectTCP(host: host, port: port)
            }
        } catch {
            throw Failure(description: "cannot connect to iofilterd at \(address): \(error)")
        }
        reader = HTTPReader(fd: fd)
    }

    /// Sends `request` and returns the response. A kept-alive connection the server
    /// closed in the meantime is reopened once.
    public func send(_ request: HTTPRequest) throws(Failure) -> HTTPResponse {
        var head = "\(request.method) \(request.target) HTTP/1.1\r\nHost: \(authority)\r\n"
        for (name, value) in request.headers { head += "\(name): \(value)\r\n" }
        head += "Content-Length: \(request.body.count)\r\n\r\n"
        let bytes = Array(head.utf8) + request.body
        for attempt in 0..<2 {
            let reused = fd >= 0
            if !reused { try connect() }
            do {
                try FileDescriptorIO.writeAll(fd, bytes)
            } catch {
                disconnect()
                if reused && attempt == 0 { continue }
                throw Failure(description: "cannot send to iofilterd at \(address): \(error)")
            }
            if let response = reader?.readResponse() {
                if response.header("connection")?.lowercased() == "close" { disconnect() }
                return response
            }
            disconnect()
            if !reused || attempt == 1 { break }
        }
        throw Failure(description: "iofilterd at \(address) closed the connection without answering")
    }
}
