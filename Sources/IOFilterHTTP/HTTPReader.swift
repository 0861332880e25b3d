import Glibc
import IOFilterPosix

/// Reads HTTP/1.1 messages off a socket with a buffer of its own, so that pipelined
/// requests and a response's head and body may arrive in any split.
struct HTTPReader {
    enum Outcome {
        case request(HTTPRequest)
        case closed
        case malformed(status: Int, message: String)
    }

    let fd: Int32
    private var buffer: [UInt8] = []
    private var start = 0

    init(fd: Int32) { self.fd = fd }

    /// Reads more bytes; false at end of stream or on an error (time-outs included).
    private mutating func fill() -> Bool {
        if start > 0 {
            buffer.removeSubrange(0..<start)
            start = 0
        }
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return false }
        buffer += chunk[..<count]
        return true
    }

    /// The head (start line and header lines), without the blank line; nil at end of
    /// stream, or `tooLarge` when it exceeds the limit.
    private mutating func readHead() -> (lines: [String]?, tooLarge: Bool) {
        // How far past `start` the blank line has been looked for (`fill` may move
        // the buffer, so this is relative).
        var scanned = 0
        while true {
            if buffer.count - start - scanned >= 4 {
                for index in (start + scanned)...(buffer.count - 4)
                where buffer[index] == 13 && buffer[index + 1] == 10 && buffer[index + 2] == 13 && buffer[index + 3] == 10 {
                    let text = String(decoding: buffer[start..<index], as: UTF8.self)
                    start = index + 4
                    return (text.split(separator: "\r\n", omittingEmptySubsequences: false).map(String.init), false)
                }
                scanned = buffer.count - start - 3
            }
            if buffer.count - start > HTTPServer.maximumHeaderBytes { return (nil, true) }
            guard fill() else { return (nil, false) }
        }
    }

    private mutating func readBody(count: Int) -> [UInt8]? {
        while buffer.count - start < count {
            guard fill() else { return nil }
        }
        let body = Array(buffer[start..<(start + count)])
        start += count
        return body
    }

    private mutating func headers(_ lines: ArraySlice<String>) -> [String: String]? {
        var headers: [String: String] = [:]
        for line in lines {
            guard let colon = line.firstIndex(of: ":") else { return nil }
            let name = line[..<colon].lowercased()
            guard !name.isEmpty, !name.contains(" ") else { return nil }
            let value = line[line.index(after: colon)...].trimmingCharacters(in: " \t")
            headers[name] = headers[name].map { "\($0), \(value)" } ?? value
        }
        return headers
    }

    /// The body, or why there is none.
    private mutating func body(headers: [String: String]) -> (body: [UInt8]?, failure: Outcome?) {
        if headers["transfer-encoding"] != nil {
            return (nil, .malformed(status: 400, message: "chunked bodies are not accepted; send Content-Length"))
        }
        guard let lengthText = headers["content-length"] else { return ([], nil) }
        guard let length = Int(lengthText), length >= 0 else {
            return (nil, .malformed(status: 400, message: "Content-Length '\(lengthText)' is not a number"))
        }
        guard length <= HTTPServer.maximumBodyBytes else {
            return (nil, .malformed(status: 413, message: "the body is larger than \(HTTPServer.maximumBodyBytes) bytes"))
        }
        guard let body = readBody(count: length) else { return (nil, .closed) }
        return (body, nil)
    }

    mutating func readRequest() -> Outcome {
        let (head, tooLarge) = readHead()
        if tooLarge { return .malformed(status: 431, message: "the request head is larger than \(HTTPServer.maximumHeaderBytes) bytes") }
        guard let head, let requestLine = head.first else { return .closed }
        let parts = requestLine.split(separator: " ", omittingEmptySubsequences: false)
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1."), !parts[0].isEmpty, parts[1].hasPrefix("/") else {
            return .malformed(status: 400, message: "malformed request line")
        }
        guard let headers = headers(head.dropFirst()) else { return .malformed(status: 400, message: "malformed header line") }
        let target = parts[1]
        let rawPath = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        guard let path = percentDecode(rawPath[0]) else { return .malformed(status: 400, message: "malformed percent-escape in the path") }
        var query: [String: String] = [:]
        if rawPath.count == 2 {
            for pair in rawPath[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                guard let key = percentDecode(kv[0], plusIsSpace: true),
                      let value = percentDecode(kv.count == 2 ? kv[1] : "", plusIsSpace: true) else {
                    return .malformed(status: 400, message: "malformed percent-escape in the query")
                }
                query[key] = value
            }
        }
        let (body, failure) = body(headers: headers)
        guard let body else { return failure ?? .closed }
        return .request(HTTPRequest(method: String(parts[0]), path: path, query: query, headers: headers, body: body))
    }

    /// Reads one response (client side).
    mutating func readResponse() -> HTTPResponse? {
        guard let head = readHead().lines, let statusLine = head.first else { return nil }
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, let status = Int(parts[1]), let headers = headers(head.dropFirst()) else { return nil }
        guard let body = body(headers: headers).body else { return nil }
        return HTTPResponse(status: status, headers: headers.map { ($0.key, $0.value) }, body: body)
    }
}

extension StringProtocol {
    func trimmingCharacters(in set: String) -> String {
        var view = Substring(self)
        while let first = view.first, set.contains(first) { view = view.dropFirst() }
        while let last = view.last, set.contains(last) { view = view.dropLast() }
        return String(view)
    }
}
