import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPosix
import IOFilterVhostUser
import Logging
import Synchronization

/// One request's trip through a chain: down through each filter's `start`, to the
/// backend, and back up through `done`. The object and its C `iof_request` are reused
/// for every request of one NBD request slot, so the hot path allocates nothing.
///
/// The host is the judge of every request: each decision a filter makes is checked
/// (a valid disposition, a resume exactly once for a request that waits for one, the
/// request's op, flags, range and buffer unchanged) before the trip goes on, and a
/// filter that breaks a rule fails that request with EIO and is named in the log.
public final class ChainRequest: @unchecked Sendable {
    // @unchecked: a request is driven by one thread at a time. Hand-offs between
    // threads (a deferral resumed elsewhere, a backend completing on its own thread)
    // go through `decision` (acquire/release) or the backend's own synchronisation.
    unowned(unsafe) public let chain: Chain
    /// The request as the ABI has it; a backend reads it and fills its buffer.
    public let io: UnsafeMutablePointer<iof_request>
    /// One pointer-sized slot per filter, `request_private` in the ABI.
    let privates: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    /// The first filter this request meets: 0 for a consumer's request, k+1 for I/O
    /// that filter k submits below itself.
    let top: Int
    /// The filter whose callback runs or last ran; stored before the callback, so a
    /// resume from another thread always continues from the right place.
    @exclusivity(unchecked) private var position = 0
    @exclusivity(unchecked) private var goingUp = false

    /// What the request looked like when it entered the chain: no filter may change it.
    @exclusivity(unchecked) private var expected = Shape()

    /// Where the request stands with respect to a filter's decision, with the decision
    /// a resume delivered packed beside it, so that every transition is one atomic step:
    ///
    ///     idle ──engine calls start/done──▶ inCallback ──returns IOF_DEFER──▶ parked
    ///       ▲                                  │                                │
    ///       │            resume during the call▼                    resume (CAS)│
    ///       └──engine picks the decision up── resumedEarly         idle ◀───────┘
    ///
    /// A resume in any other state (idle: never deferred or already resumed;
    /// resumedEarly: resumed twice) is logged and ignored.
    private let decision = Atomic<UInt64>(Phase.idle)
    private enum Phase {
        static let idle: UInt64 = 0
        static let inCallback: UInt64 = 1
        static let parked: UInt64 = 2
        static let resumedEarly: UInt64 = 3
        static let mask: UInt64 = 0xff

        static func resumed(_ disposition: iof_disposition, _ error: Int32) -> UInt64 {
            resumedEarly | UInt64(disposition.rawValue & 0xff) << 8 | UInt64(UInt32(bitPattern: error)) << 32
        }
        static func disposition(_ word: UInt64) -> iof_disposition { iof_disposition(rawValue: UInt32((word >> 8) & 0xff)) }
        static func error(_ word: UInt64) -> Int32 { Int32(bitPattern: UInt32(truncatingIfNeeded: word >> 32)) }
    }
    /// Set by the thread that won a resume of a parked request, read by the same thread
    /// (or the one it hands the request to through the thread's pending list).
    @exclusivity(unchecked) private var resumedDisposition = IOF_PASS

    /// When a consumer's request entered the chain (for its latency).
    @exclusivity(unchecked) private var startedAt: UInt64 = 0

    /// A block-status request's answer; made the first time this slot carries one.
    /// Where a backend puts what a block-status request found.
    @exclusivity(unchecked) public private(set) var extents: Extents?

    /// What the watchdog sees of this request. A separate object, so that the watchdog
    /// never holds a reference to a request another thread may be freeing.
    let watch = RequestWatch()

    enum Completion {
        case nbd(NBDRequest)
        case virtio(VirtioBlkRequest)
        case callback(iof_io_callback, UnsafeMutableRawPointer?)
        case swift(@Sendable (Int32) -> Void)
    }
    private let completion: Completion
    /// A one-off request (submit_below, a test's request) retires itself when its trip
    /// ends; a request slot is retired by its owner when the connection ends.
    private let retiresWhenFinished: Bool

    init(chain: Chain, top: Int, completion: Completion, oneOff: Bool = false) {
        self.chain = chain
        self.top = top
        self.completion = completion
        self.retiresWhenFinished = oneOff
        io = .allocate(capacity: 1)
        io.initialize(to: iof_request())
        io.pointee.struct_size = UInt32(MemoryLayout<iof_request>.size)
        privates = .allocate(capacity: max(chain.filters.count, 1))
        privates.initialize(repeating: nil, count: max(chain.filters.count, 1))
        io.pointee.host_private = UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque())
        chain.register(watch)
        LiveRequests.shared.insert(self)
    }

    deinit {
        // Touches nothing of the chain: a thread that held on to the request (a
        // completion on its way out) may drop the last reference after the chain is gone.
        io.deallocate()
        privates.deallocate()
    }

    /// Ends the request object's life as far as the chain and the host services are
    /// concerned: the watchdog stops looking at it, and a later `resume` of its pointer
    /// is refused instead of touching freed memory. Called once, while the chain exists.
    public func retire() {
        chain.unregister(watch)
        LiveRequests.shared.remove(self)
    }

    func prepare(op: iof_op, flags: UInt32, offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer?) {
        if op == IOF_OP_BLOCK_STATUS {
            if extents == nil { extents = Extents() }
            extents!.removeAll()
        }
        expected = Shape(op: op, flags: flags, offset: offset, length: length, buffer: buffer)
        expected.write(into: io)
        io.pointee.error = 0
        io.pointee.id = chain.nextRequestID()
        watch.describe(id: io.pointee.id, op: op, offset: offset, length: length)
        switch completion {
        case .nbd, .virtio: startedAt = monotonicNanoseconds()
        default: break
        }
    }

    // MARK: the trip

    /// A consumer's request (an NBD client's, a guest's) enters the chain: the chain
    /// cannot quiesce until it is answered, and what it will modify is tracked first.
    func startConsumerRequest(op: iof_op, flags: UInt32, offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer?) {
        chain.quiesce.enter()  // left when the request is answered (finish)
        if op == IOF_OP_WRITE || op == IOF_OP_TRIM || op == IOF_OP_WRITE_ZEROES {
            chain.tracker.willModify(offset: offset, length: length)
        }
        prepare(op: op, flags: flags, offset: offset, length: length, buffer: buffer)
        run()
    }

    /// The end of `startConsumerRequest`: counted, and done with the chain (the answer is
    /// the connection's or the queue's business now).
    private func leaveAsConsumerRequest(error: Int32) {
        chain.io.record(io.pointee.op, bytes: io.pointee.length, error: error, nanoseconds: monotonicNanoseconds() &- startedAt)
        chain.quiesce.leave()
    }

    func run() {
        position = top
        goingUp = false
        EngineThread.run { descend() }
    }

    private func enter(_ stageIndex: Int) {
        watch.since.store(monotonicNanoseconds(coarse: true), ordering: .relaxed)
        watch.stage.store(stageIndex, ordering: .relaxed)
    }

    private func descend() {
        let filters = chain.filters
        let op = io.pointee.op
        while position < filters.count {
            // ABI 1.2 ops pass by the filters that did not declare them.
            if !filters[position].sees(op) {
                position += 1
                continue
            }
            enter(position)
            privates[position] = nil
            decision.store(Phase.inCallback, ordering: .relaxed)
            let returned = filters[position].start(io, privates + position)
            guard let disposition = settle(returned) else { return }
            if !afterStart(disposition) { return }
        }
        enter(filters.count)
        // Every filter left the request as it came; the range was checked on entry
        // (by the NBD server or submit_below). Checked again here, where it is cheap,
        // because this is the last step before the disk.
        guard io.pointee.length <= chain.backend.size, io.pointee.offset <= chain.backend.size - io.pointee.length else {
            io.pointee.error = EINVAL
            return ascend(from: filters.count - 1)
        }
        chain.backend.submit(self)
    }

    /// Applies `start`'s decision at `position`; true to keep descending.
    private func afterStart(_ disposition: iof_disposition) -> Bool {
        if !unchanged() {
            ascend(from: position - 1)
            return false
        }
        switch disposition {
        case IOF_PASS:
            position += 1
            return true
        case IOF_COMPLETE:
            io.pointee.error = 0
            // A filter that answers block status itself starts from "all data".
            if let extents, extents.count == 0 { extents.append(length: io.pointee.length, flags: 0, at: io.pointee.offset) }
        case IOF_FAIL:
            if io.pointee.error <= 0 { io.pointee.error = EIO }
        default:
            chain.filters[position].logInvalidDisposition(disposition, request: io, in: "start")
            io.pointee.error = EIO
        }
        ascend(from: position - 1)
        return false
    }

    /// Applies `done`'s decision at `position` (already the filter that decided).
    private func afterDone(_ disposition: iof_disposition) {
        guard unchanged() else { return }
        switch disposition {
        case IOF_PASS:
            break
        case IOF_FAIL:
            if io.pointee.error <= 0 { io.pointee.error = EIO }
        default:
            chain.filters[position].logInvalidDisposition(disposition, request: io, in: "done")
            io.pointee.error = EIO
        }
    }

    /// The backend finished (any thread).
    /// A backend's answer, exactly once per request: 0 or an errno.
    public func backendDidComplete(error: Int32) {
        io.pointee.error = error
        EngineThread.run { ascend(from: chain.filters.count - 1) }
    }

    private func ascend(from index: Int) {
        goingUp = true
        let filters = chain.filters
        let op = io.pointee.op
        var current = index
        while current >= top {
            let filter = filters[current]
            if !filter.sees(op) {
                // What a cache holds or an encryption filter transforms is not what lies
                // below it: a filter that does not answer block status turns it into data.
                if op == IOF_OP_BLOCK_STATUS, filter.hidesExtents, let extents {
                    extents.set(offset: io.pointee.offset, length: io.pointee.length, flags: 0)
                }
            } else if filter.hasDone {
                enter(current)
                position = current
                decision.store(Phase.inCallback, ordering: .relaxed)
                let returned = filter.done(io, privates[current])
                guard let disposition = settle(returned) else { return }
                afterDone(disposition)
            }
            current -= 1
        }
        finish()
    }

    private func finish() {
        watch.stage.store(-1, ordering: .relaxed)
        let error = io.pointee.error
        if retiresWhenFinished { retire() }
        switch completion {
        case .nbd(let request):
            if error == 0, io.pointee.op == IOF_OP_BLOCK_STATUS, let extents {
                for index in 0..<extents.count where !request.appendExtent(length: UInt32(extents.lengths[index]), flags: extents.flags[index]) {
                    break
                }
            }
            leaveAsConsumerRequest(error: error)
            request.complete(error: error)
        case .virtio(let request):
            leaveAsConsumerRequest(error: error)
            request.complete(error: error)
        case .callback(let callback, let arg): callback(arg, error)
        case .swift(let body): body(error)
        }
    }

    /// True if the filter at `position` left op, flags, range and buffer alone. If it
    /// did not, they are put back (so that what reaches the consumer and the disk is
    /// the request as issued), the request fails with EIO, and the filter is named in
    /// the log.
    private func unchanged() -> Bool {
        let now = Shape(io.pointee)
        guard now != expected else { return true }
        chain.filters[position].logger.error(
            "changed request \(io.pointee.id) (\(expected) became \(now)); a filter may change only the bytes: failing it with EIO")
        expected.write(into: io)
        io.pointee.error = EIO
        return false
    }

    // MARK: deferral

    /// After a callback returned: the decision to act on now, or nil if the request now
    /// waits for `resume`.
    private func settle(_ returned: iof_disposition) -> iof_disposition? {
        if returned == IOF_DEFER {
            let (exchanged, found) = decision.compareExchange(
                expected: Phase.inCallback, desired: Phase.parked, ordering: .acquiringAndReleasing)
            if exchanged { return nil }
            // resume() came while the callback ran.
            decision.store(Phase.idle, ordering: .relaxed)
            if Phase.error(found) > 0 { io.pointee.error = Phase.error(found) }
            return Phase.disposition(found)
        }
        let (exchanged, _) = decision.compareExchange(
            expected: Phase.inCallback, desired: Phase.idle, ordering: .acquiringAndReleasing)
        if !exchanged {
            decision.store(Phase.idle, ordering: .relaxed)
            chain.filters[position].logger.error(
                "resumed request \(io.pointee.id) from a callback that did not defer it; the resume is ignored")
        }
        return returned
    }

    /// `host->resume`, from any thread: checks the call, then carries the request on.
    static func resume(_ io: UnsafeMutablePointer<iof_request>?, _ disposition: iof_disposition, error: Int32) {
        guard let io, let request = LiveRequests.shared.lookup(io) else {
            HostServices.pluginLogger.error(
                "resume of \(io.map { "\($0)" } ?? "a NULL request"), which is no request in flight in this worker; ignored")
            return
        }
        EngineThread.run { request.resume(disposition, error: error) }
    }

    func resume(_ disposition: iof_disposition, error: Int32) {
        let decided: iof_disposition
        var code = error
        switch disposition {
        case IOF_PASS, IOF_COMPLETE:
            decided = disposition
        case IOF_FAIL:
            decided = IOF_FAIL
            if code <= 0 { code = EIO }
        default:
            blamedLogger.error(
                "resumed request \(watch.id.load(ordering: .relaxed)) with invalid disposition \(disposition.rawValue); failing it with EIO")
            decided = IOF_FAIL
            code = EIO
        }
        var word = decision.load(ordering: .acquiring)
        while true {
            switch word & Phase.mask {
            case Phase.inCallback:
                // The engine is still inside the callback and picks the decision up on return.
                let (exchanged, found) = decision.compareExchange(
                    expected: word, desired: Phase.resumed(decided, code), ordering: .acquiringAndReleasing)
                if exchanged { return }
                word = found
            case Phase.parked:
                let (exchanged, found) = decision.compareExchange(
                    expected: word, desired: Phase.idle, ordering: .acquiringAndReleasing)
                if !exchanged {
                    word = found
                    continue
                }
                // This thread owns the request now.
                if decided == IOF_FAIL { io.pointee.error = code }
                resumedDisposition = decided
                if !PendingResumes.deferIfInsideSerializedCallback(self) { carryOn() }
                return
            default:
                blamedLogger.error(
                    "resumed request \(watch.id.load(ordering: .relaxed)), which is not waiting for a decision (resumed twice, or never deferred); ignored")
                return
            }
        }
    }

    /// The logger of the filter the request is at, as far as another thread can tell
    /// (the watchdog's atomics): for misuse reported from a resuming thread.
    private var blamedLogger: Logger {
        let stage = watch.stage.load(ordering: .relaxed)
        return stage >= 0 && stage < chain.filters.count ? chain.filters[stage].logger : HostServices.pluginLogger
    }

    /// Continues the trip after a resume of a parked request.
    func carryOn() {
        if goingUp {
            afterDone(resumedDisposition)
            ascend(from: position - 1)
        } else if afterStart(resumedDisposition) {
            descend()
        }
    }
}

extension ChainRequest: NBDClientCompletion {
    public func nbdRequestDidComplete(error: Int32) { backendDidComplete(error: error) }
}

/// The parts of a request a filter must leave alone.
private struct Shape: Equatable, CustomStringConvertible {
    var op = IOF_OP_READ
    var flags: UInt32 = 0
    var offset: UInt64 = 0
    var length: UInt64 = 0
    var buffer: UnsafeMutableRawPointer? = nil

    init() {}
    init(op: iof_op, flags: UInt32, offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer?) {
        self.op = op
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buffer = buffer
    }
    init(_ io: iof_request) {
        self.init(op: io.op, flags: io.flags, offset: io.offset, length: io.length, buffer: io.buffer)
    }

    func write(into io: UnsafeMutablePointer<iof_request>) {
        io.pointee.op = op
        io.pointee.flags = flags
        io.pointee.offset = offset
        io.pointee.length = length
        io.pointee.buffer = buffer
    }

    var description: String {
        "\(Chain.opName(op)) flags=\(flags) offset=\(offset) length=\(length) buffer=\(buffer.map { "\($0)" } ?? "nil")"
    }
}

/// Every request object that may be resumed, so that `host->resume` accepts only a
/// pointer the host handed out and still owns, whatever a plug-in passes or has
/// written into `host_private`. Holding the object here also keeps it alive until it
/// is retired, so a resume never races its deallocation.
final class LiveRequests: Sendable {
    static let shared = LiveRequests()
    private final class Shard: Sendable {
        let map = Guarded<[UInt: Unmanaged<ChainRequest>]>([:])
    }
    private static let shardCount = 16
    private let shards: [Shard] = (0..<LiveRequests.shardCount).map { _ in Shard() }

    private func shard(_ key: UInt) -> Shard { shards[Int((key >> 6) & UInt(Self.shardCount - 1))] }

    func insert(_ request: ChainRequest) {
        let key = UInt(bitPattern: request.io)
        shard(key).map.withLock { $0[key] = Unmanaged.passRetained(request) }
    }

    func remove(_ request: ChainRequest) {
        let key = UInt(bitPattern: request.io)
        shard(key).map.withLock { $0.removeValue(forKey: key) }?.release()
    }

    func lookup(_ io: UnsafeMutablePointer<iof_request>) -> ChainRequest? {
        let key = UInt(bitPattern: io)
        return shard(key).map.withLock { $0[key]?.takeUnretainedValue() }
    }

}

/// Where a request is and what it is, in atomics the watchdog can read from its own
/// thread at any time.
final class RequestWatch: Sendable {
    /// A filter index, the filter count for the backend, or -1 when idle.
    let stage = Atomic<Int>(-1)
    let since = Atomic<UInt64>(0)
    let id = Atomic<UInt64>(0)
    let op = Atomic<UInt32>(0)
    let offset = Atomic<UInt64>(0)
    let length = Atomic<UInt64>(0)

    func describe(id: UInt64, op: iof_op, offset: UInt64, length: UInt64) {
        self.id.store(id, ordering: .relaxed)
        self.op.store(op.rawValue, ordering: .relaxed)
        self.offset.store(offset, ordering: .relaxed)
        self.length.store(length, ordering: .relaxed)
    }
}
