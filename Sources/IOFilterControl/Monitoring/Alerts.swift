import Foundation
import IOFilterAPI
import IOFilterHost
import IOFilterPosix
import Logging

extension Severity {
    /// The severity of an event kind, in one table: what an operator must look at is a
    /// warning or worse, whoever records it.
    static func of(kind: String) -> Severity {
        switch kind {
        case "worker-out-of-memory", "daemon-out-of-memory", "vm-start-failed", "daemon-failed", "filter-failed", "worker-unresponsive",
             "snapshot-failed":
            .error
        case "worker-exited", "daemon-exited", "filter-degraded", "rpo-exceeded", "access-denied", "sign-in-failed", "plugin-refused",
             "acceptance-level-lowered", "host-recovered", "alert-failed", "checkpoint-inconsistent",
             "worker-memory-high", "daemon-memory-high", "worker-not-adopted":
            .warning
        default:
            .info
        }
    }
}

/// Delivers events at or above each subscription's severity, one at a time on a
/// thread of its own, so that a slow webhook or command never holds up what recorded
/// the event. A delivery that fails is logged and remembered on the subscription (not
/// recorded as an event, which would be delivered again); the queue is bounded and
/// drops the oldest when a receiver cannot keep up.
final class AlertDispatcher: @unchecked Sendable {
    // @unchecked: `queue`, `subscriptions` and `stopping` under `lock`.
    struct Delivery: Sendable {
        let subscription: AlertSubscription
        let event: Event
    }

    static let timeout = 10.0
    static let queueLimit = 1000

    private let lock = ConditionLock()
    private var subscriptions: [AlertSubscription] = []
    private var queue: [Delivery] = []
    private var running = false
    private var stopping = false
    private let logger: Logger
    /// Called after each delivery with its outcome (nil: delivered).
    private let outcome: @Sendable (String, String?) -> Void

    init(logger: Logger, outcome: @escaping @Sendable (String, String?) -> Void) {
        self.logger = logger
        self.outcome = outcome
    }

    func use(_ subscriptions: [AlertSubscription]) {
        lock.withLock { self.subscriptions = subscriptions }
    }

    /// Queues the event for every subscription that wants it.
    func dispatch(_ event: Event) {
        lock.withLock {
            let wanted = subscriptions.filter { event.severity >= $0.minimumSeverity }
            guard !wanted.isEmpty, !stopping else { return }
            queue += wanted.map { Delivery(subscription: $0, event: event) }
            if queue.count > Self.queueLimit {
                logger.warning("alerts: \(queue.count - Self.queueLimit) delivery(ies) dropped: the receivers do not keep up")
                queue.removeFirst(queue.count - Self.queueLimit)
            }
            if !running {
                running = true
                startThread(name: "alerts") { [self] in drain() }
            }
            lock.broadcast()
        }
    }

    private func drain() {
        while let delivery = lock.withLock({ queue.isEmpty || stopping ? nil : queue.removeFirst() }) {
            let error = Self.deliver(delivery.event, to: delivery.subscription)
            if let error { logger.warning("alert \(delivery.subscription.name): \(delivery.event.kind) not delivered: \(error)") }
            outcome(delivery.subscription.name, error)
        }
        lock.withLock {
            running = false
            lock.broadcast()
        }
    }

    /// Lets queued deliveries finish for up to `timeout` seconds, then drops the rest.
    func stop(timeout: Double = 5) {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        lock.withLock {
            while running && monotonicNanoseconds() < deadline { _ = lock.wait(nanoseconds: deadline - monotonicNanoseconds()) }
            stopping = true
            queue.removeAll()
        }
    }

    /// Sends one event; returns why it failed, or nil.
    static func deliver(_ event: Event, to subscription: AlertSubscription) -> String? {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let body = Array((try? encoder.encode(event)) ?? Data())
        if let webhook = subscription.webhook { return post(body, to: webhook) }
        if let command = subscription.command { return run(command, body, event) }
        return "the subscription has neither a webhook nor a command"
    }

    /// An http:// URL as host, port and path, or why not.
    static func parseWebhook(_ url: String) -> Result<(host: String, port: UInt16, path: String), AlertURLError> {
        guard url.hasPrefix("http://") else {
            return .failure(AlertURLError(description: "webhook \(url): only http:// URLs are posted to directly; for https use a command "
                                          + "subscription (for example --command 'curl -sS --fail -H content-type:application/json -d @- URL')"))
        }
        let rest = url.dropFirst(7)
        let authority = rest.prefix { $0 != "/" }
        let path = rest.dropFirst(authority.count)
        let hostPort: (host: String, port: UInt16)?
        if authority.contains(":") {
            hostPort = Sockets.hostPort(String(authority))
        } else {
            hostPort = authority.isEmpty ? nil : (String(authority), 80)
        }
        guard let hostPort else { return .failure(AlertURLError(description: "webhook \(url): no host (http://HOST[:PORT]/PATH)")) }
        return .success((hostPort.host, hostPort.port, path.isEmpty ? "/" : String(path)))
    }

    struct AlertURLError: Error, CustomStringConvertible {
        let description: String
    }

    private static func post(_ body: [UInt8], to url: String) -> String? {
        let target: (host: String, port: UInt16, path: String)
        switch parseWebhook(url) {
        case .success(let parsed): target = parsed
        case .failure(let error): return error.description
        }
        let fd: Int32
        do {
            fd = try Sockets.connectTCP(host: target.host, port: target.port, timeout: timeout)
        } catch {
            return "cannot connect to \(target.host):\(target.port): \(error)"
        }
        defer { close(fd) }
        var limit = timeval(tv_sec: Int(timeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        let authority = Sockets.authority(host: target.host, port: target.port)
        let head = "POST \(target.path) HTTP/1.1\r\nHost: \(authority)\r\nContent-Type: application/json\r\nUser-Agent: iofilterd\r\n"
            + "Content-Length: \(body.count)\r\nConnection: close\r\n\r\n"
        do {
            try FileDescriptorIO.writeAll(fd, Array(head.utf8) + body)
        } catch {
            return "cannot send to \(url): \(error)"
        }
        var answer: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 512)
        while !answer.contains(UInt8(ascii: "\n")) && answer.count < 4096 {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            answer += chunk.prefix(n)
        }
        let statusLine = String(decoding: answer.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }, as: UTF8.self)
        let parts = statusLine.split(separator: " ")
        guard parts.count >= 2, let status = Int(parts[1]) else {
            return "\(url) gave no HTTP answer within \(Int(timeout))s"
        }
        return (200..<300).contains(status) ? nil : "\(url) answered \(statusLine.dropFirst(parts[0].count + 1))"
    }

    private static func run(_ command: String, _ body: [UInt8], _ event: Event) -> String? {
        let child: ChildProcess
        do {
            child = try ChildProcess(executable: "/bin/sh", arguments: ["-c", command], stdin: body + [UInt8(ascii: "\n")], stdout: .discard,
                                     environment: ["IOFILTER_EVENT_KIND": event.kind, "IOFILTER_EVENT_SEVERITY": event.severity.rawValue,
                                                   "IOFILTER_EVENT_SUBJECT": event.subject, "IOFILTER_EVENT_MESSAGE": event.message,
                                                   "IOFILTER_EVENT_TIME": event.time])
        } catch {
            return "cannot run the command: \(error)"
        }
        guard let status = child.wait(timeout: timeout) else {
            child.signal(SIGKILL)
            _ = child.wait()
            return "the command ran past \(Int(timeout))s and was killed"
        }
        return ChildProcess.exitCode(status: status) == 0 ? nil : "the command \(ChildProcess.describe(status: status))"
    }
}
