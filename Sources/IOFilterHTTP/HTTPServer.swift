import CSystemShims
import Foundation
import Glibc
import IOFilterPosix
import Logging

/// A small HTTP/1.1 server for a local JSON API: a thread per connection, keep-alive,
/// bodies framed by Content-Length. It knows nothing of what the requests mean; a
/// handler turns each request into a response.
public final class HTTPServer: @unchecked Sendable {
    // @unchecked: `listeners`, `connections` and `closed` are guarded by `lock`.
    public typealias Handler = @Sendable (HTTPRequest) -> HTTPResponse

    public static let maximumHeaderBytes = 64 << 10
    public static let maximumBodyBytes = 16 << 20
    public static let maximumConnections = 128

    let handler: Handler
    let logger: Logger
    private let lock = ConditionLock()
    private var listeners: [Int32] = []
    private var connections: Set<Int32> = []
    private var busy = 0
    private var closed = false

    public init(logger: Logger, handler: @escaping Handler) {
        self.handler = handler
        self.logger = logger
    }

    /// Accepts connections on `listenFD` on a thread of its own until `stop`.
    public func serve(listenFD: Int32) {
        lock.withLock { listeners.append(listenFD) }
        startThread(name: "http-accept") { [self] in
            while true {
                let fd = iof_accept_cloexec(listenFD)
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    if lock.withLock({ closed }) { return }
                    if errno == EMFILE || errno == ENFILE { usleep(50_000); continue }
                    logger.error("accept on the API socket failed: \(String(cString: strerror(errno)))")
                    return
                }
                let admitted = lock.withLock { () -> Bool in
                    guard !closed, connections.count < Self.maximumConnections else { return false }
                    connections.insert(fd)
                    return true
                }
                guard admitted else {
                    close(fd)
                    continue
                }
                var timeout = timeval(tv_sec: 120, tv_usec: 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                startThread(name: "http-conn") { [self] in
                    serveConnection(fd)
                    lock.withLock {
                        connections.remove(fd)
                        lock.broadcast()
                    }
                    close(fd)
                }
            }
        }
    }

    /// Stops accepting, lets requests being handled finish (up to `timeout` seconds),
    /// then closes every connection.
    public func stop(timeout: Double = 30) {
        let open: [Int32] = lock.withLock {
            closed = true
            for fd in listeners { shutdown(fd, Int32(SHUT_RDWR)) }
            // Idle keep-alive connections wake from their read and end.
            for fd in connections { shutdown(fd, Int32(SHUT_RD)) }
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while busy > 0 {
                let now = monotonicNanoseconds()
                if now >= deadline { break }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return Array(connections)
        }
        for fd in open { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func serveConnection(_ fd: Int32) {
        var reader = HTTPReader(fd: fd)
        while true {
            let request: HTTPRequest
            switch reader.readRequest() {
            case .request(let parsed): request = parsed
            case .closed: return
            case .malformed(let status, let message):
                send(fd, Self.plainError(status: status, message: message), keepAlive: false)
                return
            }
            let keepAlive = request.headers["connection"]?.lowercased() != "close"
            let admitted = lock.withLock { () -> Bool in
                guard !closed else { return false }
                busy += 1
                return true
            }
            guard admitted else {
                send(fd, Self.plainError(status: 503, message: "the server is shutting down"), keepAlive: false)
                return
            }
            // HEAD is GET without the body (RFC 9110 9.3.2).
            var asked = request
            if request.method == "HEAD" { asked.method = "GET" }
            let response = handler(asked)
            let stillOpen = lock.withLock { () -> Bool in
                busy -= 1
                lock.broadcast()
                return !closed
            }
            guard send(fd, response, keepAlive: keepAlive && stillOpen, headOnly: request.method == "HEAD"), keepAlive && stillOpen
            else { return }
        }
    }

    /// The error shape of the API above, for requests that never reach it.
    static func plainError(status: Int, message: String) -> HTTPResponse {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let body = (try? encoder.encode(["error": "bad-request", "message": message])) ?? Data()
        return HTTPResponse(status: status, headers: [("Content-Type", "application/json")], body: Array(body))
    }

    @discardableResult
    private func send(_ fd: Int32, _ response: HTTPResponse, keepAlive: Bool, headOnly: Bool = false) -> Bool {
        var head = "HTTP/1.1 \(response.status) \(HTTPResponse.reason(response.status))\r\n"
        for (name, value) in response.headers where name.lowercased() != "content-length" && name.lowercased() != "connection" {
            head += "\(name): \(value)\r\n"
        }
        head += "Content-Length: \(response.body.count)\r\n"
        head += keepAlive ? "\r\n" : "Connection: close\r\n\r\n"
        do {
            try FileDescriptorIO.writeAll(fd, Array(head.utf8) + (headOnly ? [] : response.body))
            return true
        } catch {
            return false
        }
    }
}
