import CSystemShims
import FoundationEssentials
import Glibc
import IOFilterModel
import IOFilterPosix

/// The control protocol between the host and a serving worker, in one place: one JSON
/// object per line each way, one request at a time. The supervisor speaks it over the
/// socket pair it hands each worker; `iofilter serve` relays it from its control socket
/// (`iofilter plugin call --serve`).
public struct ControlChannel: Sendable {
    public let fd: Int32

    public init(fd: Int32) { self.fd = fd }

    public enum Failure: Error, CustomStringConvertible, Equatable {
        case closed
        case timedOut(Double)
        case malformedAnswer

        public var description: String {
            switch self {
            case .closed: "the worker's control channel is closed (is it restarting?)"
            case .timedOut(let seconds): "the worker did not answer within \(seconds)s"
            case .malformedAnswer: "the worker sent a malformed control answer"
            }
        }
    }

    /// The longest line either side accepts by default (statistics of many disks).
    public static let maximumLine = 16 << 20

    /// Sends one request and waits at most `timeout` seconds for its answer. After a
    /// time-out the caller must not reuse the channel: a late answer would be taken for
    /// the next request's.
    public func exchange(_ request: WorkerControlRequest, timeout: Double) throws(Failure) -> WorkerControlResponse {
        let (response, fds) = try exchange(request, sending: [], timeout: timeout)
        fds.forEach { close($0) }
        return response
    }

    /// The same with file descriptors each way (SCM_RIGHTS): `fds` go with the request
    /// (the caller keeps its own copies), and what the answer carried comes back, the
    /// caller's to close.
    public func exchange(_ request: WorkerControlRequest, sending fds: [Int32], timeout: Double)
        throws(Failure) -> (WorkerControlResponse, [Int32])
    {
        guard let line = try? JSONEncoder().encode(request), Self.send(fd, Array(line) + [UInt8(ascii: "\n")], fds: fds) else { throw .closed }
        var reader = LineReader(fd: fd, maximumLine: Self.maximumLine)
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        switch reader.next(deadline: deadline) {
        case .line(let answer):
            guard let response = try? JSONDecoder().decode(WorkerControlResponse.self, from: Data(answer)) else {
                reader.receivedFDs.forEach { close($0) }
                throw .malformedAnswer
            }
            return (response, reader.receivedFDs)
        case .timedOut:
            reader.receivedFDs.forEach { close($0) }
            throw .timedOut(timeout)
        case .closed:
            reader.receivedFDs.forEach { close($0) }
            throw .closed
        }
    }

    /// Answers requests until the other side closes (or a line cannot be written). A
    /// line that is no request is answered with an error, and the channel goes on.
    ///
    /// - Parameter maximumLine: a longer request closes the channel.
    public func serve(maximumLine: Int = ControlChannel.maximumLine, _ answer: (WorkerControlRequest) -> WorkerControlResponse) {
        serve(maximumLine: maximumLine) { (request: WorkerControlRequest, fds: [Int32]) -> (WorkerControlResponse, [Int32]) in
            fds.forEach { close($0) }
            return (answer(request), [])
        }
    }

    /// The same with file descriptors each way: `answer` gets those the request carried
    /// (its own to close) and returns those to send with its answer, which are closed
    /// once sent.
    public func serve(maximumLine: Int = ControlChannel.maximumLine, _ answer: (WorkerControlRequest, [Int32]) -> (WorkerControlResponse, [Int32])) {
        var reader = LineReader(fd: fd, maximumLine: maximumLine)
        while answerNext(&reader, answer) {}
    }

    /// Reads one request and writes its answer; false once the channel is closed.
    private func answerNext(_ reader: inout LineReader, _ answer: (WorkerControlRequest, [Int32]) -> (WorkerControlResponse, [Int32])) -> Bool {
        guard case .line(let line) = reader.next(deadline: nil) else {
            reader.receivedFDs.forEach { close($0) }
            reader.receivedFDs = []
            return false
        }
        let received = reader.receivedFDs
        reader.receivedFDs = []
        let (response, sending) = (try? JSONDecoder().decode(WorkerControlRequest.self, from: Data(line))).map { answer($0, received) }
            ?? { received.forEach { close($0) }; return (WorkerControlResponse(error: "malformed control request"), []) }()
        let data = (try? JSONEncoder().encode(response)) ?? Data("{}".utf8)
        let sent = Self.send(fd, Array(data) + [UInt8(ascii: "\n")], fds: sending)
        sending.forEach { close($0) }
        return sent
    }

    /// Answers one request (with file descriptors each way, as `serve`); false if the
    /// channel closed first.
    @discardableResult
    public func answerOne(maximumLine: Int = ControlChannel.maximumLine, _ answer: (WorkerControlRequest, [Int32]) -> (WorkerControlResponse, [Int32])) -> Bool {
        var reader = LineReader(fd: fd, maximumLine: maximumLine)
        return answerNext(&reader, answer)
    }

    /// Writes a line, with `fds` attached to its first bytes (a few hundred per byte
    /// at most, as the kernel allows).
    static func send(_ fd: Int32, _ bytes: [UInt8], fds: [Int32]) -> Bool {
        var done = 0
        var pending = fds[...]
        while !pending.isEmpty {
            let group = Array(pending.prefix(Int(IOF_MAX_FDS_PER_SEND)))
            // One byte per group, so that every group has bytes to ride on.
            guard done < bytes.count else { return false }
            let sent = bytes.withUnsafeBytes { iof_send_with_fds(fd, $0.baseAddress! + done, 1, group, Int32(group.count)) }
            guard sent == 1 else { return false }
            done += 1
            pending = pending.dropFirst(group.count)
        }
        return bytes.withUnsafeBytes { (try? FileDescriptorIO.writeAll(fd, $0.baseAddress! + done, count: bytes.count - done)) != nil }
    }
}

/// Reads newline-terminated lines from an fd, keeping what follows a line for the next.
struct LineReader {
    let fd: Int32
    let maximumLine: Int
    private var pending: [UInt8] = []
    /// File descriptors that came with the bytes read so far.
    var receivedFDs: [Int32] = []

    init(fd: Int32, maximumLine: Int) {
        self.fd = fd
        self.maximumLine = maximumLine
    }

    enum Next { case line([UInt8]), timedOut, closed }

    mutating func next(deadline: UInt64?) -> Next {
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            if let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = Array(pending[..<newline])
                pending.removeSubrange(...newline)
                return .line(line)
            }
            guard pending.count < maximumLine else { return .closed }
            if let deadline {
                let now = monotonicNanoseconds()
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard now < deadline else { return .timedOut }
                let ready = poll(&poller, 1, Int32((deadline - now) / 1_000_000) + 1)
                if ready < 0 && errno == EINTR { continue }
                guard ready > 0 else { return .timedOut }
            }
            var fds = [Int32](repeating: -1, count: Int(IOF_MAX_FDS_PER_SEND))
            var fdCount: Int32 = 0
            var truncated: Int32 = 0
            let count = chunk.withUnsafeMutableBytes {
                iof_receive_with_fds(fd, $0.baseAddress!, $0.count, &fds, Int32(fds.count), &fdCount, &truncated)
            }
            receivedFDs += fds.prefix(Int(fdCount))
            guard count > 0 else { return .closed }
            pending += chunk[..<count]
        }
    }
}
