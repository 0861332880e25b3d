/// An HTTP/1.1 request as the server received it (or the client will send it).
public struct HTTPRequest: Sendable {
    public var method: String
    /// The path without the query, percent-decoded.
    public var path: String
    public var query: [String: String]
    /// Header names in lower case.
    public var headers: [String: String]
    public var body: [UInt8]
    /// Who sent it, as the server's transport knows (nil on the client's side).
    public var peer: HTTPPeer?

    public init(method: String, path: String, query: [String: String] = [:], headers: [String: String] = [:], body: [UInt8] = [],
                peer: HTTPPeer? = nil) {
        self.peer = peer
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
    }

    /// Splits a request target ("/disks/a%20b?limit=5") into its percent-decoded path
    /// and query; the error says which part is malformed.
    public static func parse(target: some StringProtocol) -> Result<(path: String, query: [String: String]), MalformedTarget> {
        let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts[0].hasPrefix("/"), let path = percentDecode(parts[0]) else {
            return .failure(MalformedTarget(description: "malformed percent-escape in the path"))
        }
        var query: [String: String] = [:]
        if parts.count == 2 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard let key = percentDecode(kv[0], plusIsSpace: true),
                      let value = percentDecode(kv.count == 2 ? kv[1] : "", plusIsSpace: true) else {
                    return .failure(MalformedTarget(description: "malformed percent-escape in the query"))
                }
                query[key] = value
            }
        }
        return .success((path, query))
    }

    public struct MalformedTarget: Error, CustomStringConvertible {
        public let description: String
    }

    /// The request target as sent on the wire: the path and query, percent-encoded.
    public var target: String {
        let encodedPath = path.split(separator: "/", omittingEmptySubsequences: false).map { percentEncode(String($0)) }.joined(separator: "/")
        guard !query.isEmpty else { return encodedPath }
        return encodedPath + "?" + query.sorted { $0.key < $1.key }.map { "\(percentEncode($0.key))=\(percentEncode($0.value))" }.joined(separator: "&")
    }
}

/// Where a request came from.
public enum HTTPPeer: Sendable, Equatable {
    /// A process on this host, over the unix socket, by its kernel-checked credentials.
    case local(uid: UInt32, gid: UInt32, pid: Int32)
    /// A TCP client, by its address; `secure` when the connection is TLS.
    case network(address: String, secure: Bool)
}

/// An HTTP/1.1 response.
public struct HTTPResponse: Sendable {
    public var status: Int
    public var headers: [(String, String)]
    public var body: [UInt8]
    /// A body sent as it is made (server-sent events): after `body`, the server runs
    /// this on a thread of its own and sends each chunk it hands to `send`, until it
    /// returns or `send` returns false (the client went away).
    public var stream: (@Sendable (_ send: @Sendable ([UInt8]) -> Bool) -> Void)?

    public init(status: Int, headers: [(String, String)] = [], body: [UInt8] = []) {
        self.status = status
        self.headers = headers
        self.body = body
    }

    public func header(_ name: String) -> String? {
        headers.first { $0.0.lowercased() == name.lowercased() }?.1
    }

    public static func reason(_ status: Int) -> String {
        switch status {
        case 200: "OK"
        case 201: "Created"
        case 202: "Accepted"
        case 204: "No Content"
        case 400: "Bad Request"
        case 401: "Unauthorized"
        case 403: "Forbidden"
        case 404: "Not Found"
        case 405: "Method Not Allowed"
        case 409: "Conflict"
        case 413: "Content Too Large"
        case 415: "Unsupported Media Type"
        case 422: "Unprocessable Content"
        case 431: "Request Header Fields Too Large"
        case 500: "Internal Server Error"
        case 503: "Service Unavailable"
        default: "Status \(status)"
        }
    }
}

private let unreserved = Set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~".utf8)

func percentEncode(_ text: String) -> String {
    var out = ""
    for byte in text.utf8 {
        if unreserved.contains(byte) {
            out.unicodeScalars.append(Unicode.Scalar(byte))
        } else {
            out += "%" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
        }
    }
    return out
}

/// Decodes %XX escapes (and, in queries, '+' as space); nil when an escape is malformed
/// or the result is not UTF-8.
func percentDecode<S: StringProtocol>(_ text: S, plusIsSpace: Bool = false) -> String? {
    var bytes: [UInt8] = []
    var iterator = Array(text.utf8).makeIterator()
    while let byte = iterator.next() {
        switch byte {
        case UInt8(ascii: "%"):
            guard let high = iterator.next(), let low = iterator.next(),
                  let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(value)
        case UInt8(ascii: "+") where plusIsSpace:
            bytes.append(UInt8(ascii: " "))
        default:
            bytes.append(byte)
        }
    }
    return String(validating: bytes, as: UTF8.self)
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
