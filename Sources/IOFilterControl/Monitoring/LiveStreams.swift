import IOFilterPosix

/// The console's live streams that are open. A stream waits here between updates, so
/// that revoking its token or stopping the host ends it at once instead of at its next
/// update, and a host that is stopping never waits for a console to go away.
public final class LiveStreams: @unchecked Sendable {
    // @unchecked: everything under `lock`.
    private let lock = ConditionLock()
    /// Open streams: id to the token they were opened with (nil: a unix-socket caller).
    private var open: [Int: String?] = [:]
    private var ended: Set<Int> = []
    private var nextID = 0
    private var closing = false

    public init() {}

    /// Registers a stream; nil once the host is stopping.
    public func begin(tokenID: String?) -> Int? {
        lock.withLock {
            guard !closing else { return nil }
            nextID += 1
            open[nextID] = tokenID
            return nextID
        }
    }

    public func finish(_ id: Int) {
        lock.withLock {
            open[id] = nil
            ended.remove(id)
        }
    }

    /// Waits `seconds`; false if the stream must end now.
    public func wait(_ id: Int, seconds: Double) -> Bool {
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
            while !closing && !ended.contains(id) {
                let now = monotonicNanoseconds()
                guard now < deadline else { break }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return !closing && !ended.contains(id)
        }
    }

    /// Whether the stream must end (without waiting).
    public func isEnded(_ id: Int) -> Bool { lock.withLock { closing || ended.contains(id) } }

    /// Ends every stream opened with this token.
    public func end(tokenID: String) {
        lock.withLock {
            for (id, token) in open where token == tokenID { ended.insert(id) }
            lock.broadcast()
        }
    }

    /// Ends every stream and refuses new ones: the host is stopping.
    public func endAll() {
        lock.withLock {
            closing = true
            lock.broadcast()
        }
    }

    public var count: Int { lock.withLock { open.count } }
}
