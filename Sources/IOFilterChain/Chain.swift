import CIOFilter
import Glibc
import IOFilterModel
import IOFilterPosix
import Logging
import Synchronization

/// One disk's filter chain: its filters in category order over its backend. Requests
/// enter through `ChainRequest`; the chain keeps the list of request objects so that the
/// watchdog can see where each one is.
public final class Chain: @unchecked Sendable {
    // @unchecked: `filters` and `backend` are fixed after init; `requests` is guarded
    // by `registryLock`.
    public let diskName: String
    public let filters: [FilterInstance]
    public let backend: any StorageBackend
    /// Its consumers' requests, per op, for the host's metrics.
    public let io = IOCounters()
    /// Holds consumers' requests back while filters handle a snapshot.
    public let quiesce = Quiesce()
    /// Checkpoints' bitmaps and snapshots' copies that consumers' changes go to.
    public let tracker = ChangeTracker()
    public let logger: Logger
    private let requestIDs = Atomic<UInt64>(0)
    private let registry = Guarded<[ObjectIdentifier: RequestWatch]>([:])

    public init(diskName: String, filters: [FilterInstance], backend: any StorageBackend, logger: Logger) {
        self.diskName = diskName
        self.filters = filters
        self.backend = backend
        self.logger = logger
        for (index, filter) in filters.enumerated() { filter.bind(to: self, position: index) }
    }

    func nextRequestID() -> UInt64 { requestIDs.wrappingAdd(1, ordering: .relaxed).newValue }

    func register(_ watch: RequestWatch) {
        registry.withLock { $0[ObjectIdentifier(watch)] = watch }
    }

    func unregister(_ watch: RequestWatch) {
        _ = registry.withLock { $0.removeValue(forKey: ObjectIdentifier(watch)) }
    }

    /// Request objects of this chain not yet retired (request slots of open
    /// connections, one-off requests in flight).
    var liveRequestCount: Int { registry.withLock { $0.count } }

    /// Issues I/O that enters the chain below filter `position` (`submit_below`).
    func submitBelow(
        position: Int, op: iof_op, flags: UInt32, offset: UInt64, length: UInt64,
        buffer: UnsafeMutableRawPointer?, completion: ChainRequest.Completion
    ) -> Int32 {
        guard length <= backend.size, offset <= backend.size - length else { return EINVAL }
        switch op {
        case IOF_OP_READ, IOF_OP_WRITE: guard buffer != nil else { return EINVAL }
        case IOF_OP_FLUSH, IOF_OP_TRIM, IOF_OP_WRITE_ZEROES, IOF_OP_CACHE: break
        default: return EINVAL  // block status: its answer would have no way back
        }
        let request = ChainRequest(chain: self, top: position + 1, completion: completion, oneOff: true)
        request.prepare(op: op, flags: flags, offset: offset, length: length, buffer: buffer)
        request.run()
        return 0
    }

    /// Runs one request through the whole chain, as a consumer's would, and waits for
    /// its answer: the host's own reads in the worker (preserving blocks for a snapshot,
    /// the snapshot's background copy). A block status leaves its answer in `extents`.
    func performAndWait(op: iof_op, offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer?,
                        extents: Extents? = nil) -> Int32 {
        final class Answer: @unchecked Sendable {
            // @unchecked: `error` and `done` are touched with `lock` held.
            let lock = ConditionLock()
            var error: Int32 = 0
            var done = false
        }
        let answer = Answer()
        let request = ChainRequest(chain: self, top: 0, completion: .swift { error in
            answer.lock.withLock {
                answer.error = error
                answer.done = true
                answer.lock.broadcast()
            }
        }, oneOff: true)
        request.prepare(op: op, flags: 0, offset: offset, length: length, buffer: buffer)
        request.run()
        let error = answer.lock.withLock {
            while !answer.done { answer.lock.wait() }
            return answer.error
        }
        if let extents, let found = request.extents {
            extents.removeAll()
            for index in 0..<found.count { extents.append(length: found.lengths[index], flags: found.flags[index], at: found.offsets[index]) }
        }
        return error
    }

    /// When the oldest request now in flight entered the stage it sits in (coarse
    /// monotonic nanoseconds), or nil if none is.
    public func oldestInFlight() -> UInt64? {
        registry.withLock { watches in
            watches.values.lazy.filter { $0.stage.load(ordering: .relaxed) >= 0 }.map { $0.since.load(ordering: .relaxed) }.min()
        }
    }

    /// A request that has sat in one stage longer than `limit`, with where it sits.
    public func stuckRequest(olderThan limit: UInt64, now: UInt64) -> (stage: String, request: String, seconds: Double)? {
        let watches = registry.withLock { Array($0.values) }
        for watch in watches {
            let stage = watch.stage.load(ordering: .relaxed)
            guard stage >= 0 else { continue }
            let since = watch.since.load(ordering: .relaxed)
            guard now > since, now - since > limit else { continue }
            let place = stage < filters.count ? "filter \(filters[stage].name)" : "backend \(backend.description)"
            let op = Self.opName(iof_op(rawValue: watch.op.load(ordering: .relaxed)))
            let what = "request \(watch.id.load(ordering: .relaxed)) (\(op) offset=\(watch.offset.load(ordering: .relaxed)) "
                + "length=\(watch.length.load(ordering: .relaxed)))"
            return (place, what, Double(now - since) / 1e9)
        }
        return nil
    }

    /// Closes every filter, consumer side first, so that a closing filter's own I/O
    /// (a cache destaging) still finds the layers below it open; then the backend.
    public func close() {
        for filter in filters { filter.close() }
        let synced = backend.close()
        if synced != 0 {
            logger.error("closing \(backend): writes may not be durable: \(String(cString: strerror(synced)))")
        }
        tracker.closeCleanly()
    }

    static func opName(_ op: iof_op) -> String {
        switch op {
        case IOF_OP_READ: "read"
        case IOF_OP_WRITE: "write"
        case IOF_OP_FLUSH: "flush"
        case IOF_OP_TRIM: "trim"
        case IOF_OP_WRITE_ZEROES: "write-zeroes"
        case IOF_OP_BLOCK_STATUS: "block-status"
        case IOF_OP_CACHE: "cache"
        default: "op \(op.rawValue)"
        }
    }
}

