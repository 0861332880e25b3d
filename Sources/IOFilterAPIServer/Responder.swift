import Dispatch
import Foundation
import HTTPTypes
import Hummingbird
import IOFilterHTTP
import IOFilterPosix
import Logging
import NIOCore

/// Turns a Hummingbird request into the handler's request (with its peer) and back,
/// after the listener's own checks.
struct Responder: HTTPResponder {
    typealias Context = APIRequestContext

    let handler: APIServer.Handler
    let listener: APIServer.Listener
    let logger: Logger
    /// The `Host` values a TCP listener answers to; nil on a unix socket.
    let authorities: AuthorityCheck?

    init(handler: @escaping APIServer.Handler, listener: APIServer.Listener, logger: Logger) {
        self.handler = handler
        self.listener = listener
        self.logger = logger
        if case .tcp(let host, let port, let tls, let names) = listener {
            authorities = AuthorityCheck(host: host, port: port, secure: tls != nil, names: names)
        } else {
            authorities = nil
        }
    }

    func respond(to request: Request, context: APIRequestContext) async throws -> Response {
        let peer: HTTPPeer
        switch listener {
        case .unix:
            guard let credentials = await Self.peerCredentials(context.channel) else {
                return Self.error(403, "forbidden", "the API socket could not tell who is calling (no peer credentials)")
            }
            peer = credentials
        case .tcp(_, _, let tls, _):
            peer = .network(address: context.channel.remoteAddress.map(Self.describe) ?? "unknown", secure: tls != nil)
            if let refusal = authorities?.refusal(authority: request.head.authority, origin: request.headers[.origin]) {
                logger.warning("refused \(request.method) \(request.uri.path) from \(peer): \(refusal)")
                return Self.error(403, "cross-site", refusal)
            }
        }
        let target: (path: String, query: [String: String])
        switch IOFilterHTTP.HTTPRequest.parse(target: request.uri.string) {
        case .success(let parsed): target = parsed
        case .failure(let malformed): return Self.error(400, "bad-request", malformed.description)
        }
        var headers: [String: String] = [:]
        for field in request.headers { headers[field.name.canonicalName] = field.value }
        // Refused on its declared length, before any of it is read: a client that waits
        // for an answer before sending the rest gets one instead of a closed connection.
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > APIServer.maximumBodyBytes {
            return Self.tooLarge()
        }
        let body: ByteBuffer
        do {
            var request = request
            body = try await request.collectBody(upTo: APIServer.maximumBodyBytes)
        } catch {
            return Self.tooLarge()
        }
        // HEAD is GET without the body (RFC 9110 9.3.2); Hummingbird drops the body.
        let method = request.method == .head ? "GET" : request.method.rawValue
        let asked = IOFilterHTTP.HTTPRequest(
            method: method, path: target.path, query: target.query, headers: headers, body: Array(buffer: body), peer: peer)
        let handler = self.handler
        // The handler blocks (SQLite, starting workers, long transfers): never on an
        // event loop.
        let answer = await withCheckedContinuation { continuation in
            DispatchQueue.global().async { continuation.resume(returning: handler(asked)) }
        }
        return Self.response(answer)
    }

    static func response(_ answer: IOFilterHTTP.HTTPResponse) -> Response {
        var fields = HTTPFields()
        for (name, value) in answer.headers {
            guard let field = HTTPField.Name(name), field != .contentLength, field != .connection else { continue }
            fields.append(HTTPField(name: field, value: value))
        }
        if let produce = answer.stream {
            return Response(status: .init(code: answer.status), headers: fields, body: ResponseBody { writer in
                if !answer.body.isEmpty { try await writer.write(ByteBuffer(bytes: answer.body)) }
                // The producer blocks (it asks workers for their figures): its own thread,
                // handing chunks over a stream that ends when it returns or the client goes.
                let (chunks, continuation) = AsyncStream.makeStream(of: [UInt8].self, bufferingPolicy: .bufferingNewest(16))
                let gone = Guarded(false)
                continuation.onTermination = { _ in gone.withLock { $0 = true } }
                startThread(name: "api-stream") {
                    produce { chunk in
                        guard !gone.withLock({ $0 }) else { return false }
                        continuation.yield(chunk)
                        return true
                    }
                    continuation.finish()
                }
                do {
                    for await chunk in chunks { try await writer.write(ByteBuffer(bytes: chunk)) }
                } catch {
                    continuation.finish()
                    gone.withLock { $0 = true }
                }
                try await writer.finish(nil)
            })
        }
        return Response(
            status: .init(code: answer.status), headers: fields,
            body: .init(byteBuffer: ByteBuffer(bytes: answer.body)))
    }

    /// 413, and the connection closes after it: the rest of the body is not read.
    static func tooLarge() -> Response {
        var response = error(413, "too-large", "the body is larger than \(APIServer.maximumBodyBytes) bytes, the most this API takes")
        response.headers[.connection] = "close"
        return response
    }

    static func error(_ status: Int, _ code: String, _ message: String) -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let body = (try? encoder.encode(["error": code, "message": message])) ?? Data()
        return response(IOFilterHTTP.HTTPResponse(status: status, headers: [("Content-Type", "application/json")], body: Array(body)))
    }

    /// The unix peer's credentials, as the kernel recorded them at connect.
    static func peerCredentials(_ channel: any Channel) async -> HTTPPeer? {
        guard let provider = channel as? any SocketOptionProvider else { return nil }
        guard let credentials: UnixCredentials = try? await provider.unsafeGetSocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_PEERCRED)).get() else {
            return nil
        }
        return .local(uid: credentials.uid, gid: credentials.gid, pid: credentials.pid)
    }

    static func describe(_ address: SocketAddress) -> String {
        switch address {
        case .v4, .v6: "\(address.ipAddress ?? "?"):\(address.port ?? 0)"
        case .unixDomainSocket: "unix"
        }
    }
}

/// `struct ucred` (pid, uid, gid), which Glibc declares only under _GNU_SOURCE.
struct UnixCredentials: Sendable {
    var pid: Int32 = 0
    var uid: UInt32 = 0
    var gid: UInt32 = 0
}

/// Who may call a TCP listener by what name. A browser page from another origin can make
/// requests to a loopback port, and a DNS name an attacker controls can be made to
/// resolve to it (DNS rebinding); refusing requests whose Host is not this listener's,
/// and whose Origin is not this listener, stops both.
struct AuthorityCheck: Sendable {
    let allowed: Set<String>
    /// Any IP literal with the listener's port (a wildcard listener: rebinding needs a name).
    let anyAddressOnPort: Int?
    let scheme: String

    init(host: String, port: Int, secure: Bool, names: [String]) {
        scheme = secure ? "https" : "http"
        var hosts = Set(names.map { $0.lowercased() })
        let wildcard = host == "0.0.0.0" || host == "::" || host.isEmpty
        if wildcard {
            anyAddressOnPort = port
        } else {
            anyAddressOnPort = nil
            hosts.insert(Sockets.bracketed(host: host.lowercased()))
        }
        if host.hasPrefix("127.") || host == "::1" || host.lowercased() == "localhost" {
            hosts.formUnion(["localhost", "127.0.0.1", "[::1]"])
        }
        allowed = Set(hosts.map { "\($0):\(port)" })
    }

    func accepts(_ authority: String) -> Bool {
        let authority = authority.lowercased()
        if allowed.contains(authority) { return true }
        guard let port = anyAddressOnPort, let colon = authority.lastIndex(of: ":"), Int(authority[authority.index(after: colon)...]) == port
        else { return false }
        let host = authority[..<colon]
        return IPv4Address(String(host)) || (host.hasPrefix("[") && host.hasSuffix("]"))
    }

    func refusal(authority: String?, origin: String?) -> String? {
        guard let authority, accepts(authority) else {
            return "Host '\(authority ?? "")' is not a name this listener answers to (\(allowed.sorted().joined(separator: ", "))"
                + (anyAddressOnPort != nil ? ", or an IP address" : "") + "); give iofilterd --server-name NAME to add one"
        }
        if let origin {
            guard origin.lowercased().hasPrefix(scheme + "://"), accepts(String(origin.dropFirst(scheme.count + 3))) else {
                return "cross-site request refused: Origin '\(origin)' is not this listener"
            }
        }
        return nil
    }
}

private func IPv4Address(_ text: String) -> Bool {
    let parts = text.split(separator: ".", omittingEmptySubsequences: false)
    return parts.count == 4 && parts.allSatisfy { UInt8($0) != nil }
}
