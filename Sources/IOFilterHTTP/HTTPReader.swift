import Glibc
import IOFilterPosix

/// Reads HTTP/1.1 responses off a socket with a buffer of its own, so that a response's
/// head and body may arrive in any split.
struct HTTPReader {
    static let maximumHeaderBytes = 64 << 10
    static let maximumBodyBytes = 256 << 20

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
            if buffer.count - start > Self.maximumHeaderBytes { return (nil, true) }
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

    /// The body framed by Content-Length (the API's server always sends one).
    private mutating func body(headers: [String: String]) -> [UInt8]? {
        guard headers["transfer-encoding"] == nil else { return nil }
        guard let lengthText = headers["content-length"] else { return [] }
        guard let length = Int(lengthText), length >= 0, length <= Self.maximumBodyBytes else { return nil }
        return readBody(count: length)
    }

    /// Reads one response (client side).
    mutating func readResponse() -> HTTPResponse? {
        guard let head = readHead().lines, let statusLine = head.first else { return nil }
        let parts = statusLine.split(separator: " ", maxSplits: 2)
        guard parts.count >= 2, let status = Int(parts[1]), let headers = headers(head.dropFirst()) else { return nil }
        guard let body = body(headers: headers) else { return nil }
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
