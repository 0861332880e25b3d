import Foundation
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
        guard let line = try? JSONEncoder().encode(request),
              (try? FileDescriptorIO.writeAll(fd, Array(line) + [UInt8(ascii: "\n")])) != nil else { throw .closed }
        var reader = LineReader(fd: fd, maximumLine: Self.maximumLine)
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        switch reader.next(deadline: deadline) {
        case .line(let answer):
            guard let response = try? JSONDecoder().decode(WorkerControlResponse.self, from: Data(answer)) else { throw .malformedAnswer }
            return response
        case .timedOut: throw .timedOut(timeout)
        case .closed: throw .closed
        }
    }

    /// Answers requests until the other side closes (or a line cannot be written). A
    /// line that is no request is answered with an error, and the channel goes on.
    ///
    /// - Parameter maximumLine: a longer request closes the channel.
    public func serve(maximumLine: Int = ControlChannel.maximumLine, _ answer: (WorkerControlRequest) -> WorkerControlResponse) {
        var reader = LineReader(fd: fd, maximumLine: maximumLine)
        while case .line(let line) = reader.next(deadline: nil) {
            let response = (try? JSONDecoder().decode(WorkerControlRequest.self, from: Data(line))).map(answer)
                ?? WorkerControlResponse(error: "malformed control request")
            let data = (try? JSONEncoder().encode(response)) ?? Data("{}".utf8)
            guard (try? FileDescriptorIO.writeAll(fd, Array(data) + [UInt8(ascii: "\n")])) != nil else { return }
        }
    }
}

/// Reads newline-terminated lines from an fd, keeping what follows a line for the next.
struct LineReader {
    let fd: Int32
    let maximumLine: Int
    private var pending: [UInt8] = []

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
            let count = chunk.withUnsafeMutableBytes { (try? FileDescriptorIO.readSome(fd, into: $0.baseAddress!, count: $0.count)) ?? 0 }
            guard count > 0 else { return .closed }
            pending += chunk[..<count]
        }
    }
}
