import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterPosix
import Synchronization

/// One request's trip through a chain: down through each filter's `start`, to the
/// backend, and back up through `done`. The object and its C `iof_request` are reused
/// for every request of one NBD request slot, so the hot path allocates nothing.
public final class ChainRequest: @unchecked Sendable {
    // @unchecked: a request is driven by one thread at a time. Hand-offs between
    // threads (a deferral resumed elsewhere, a backend completing on its own thread)
    // go through `deferState` or the backend's own synchronisation.
    unowned(unsafe) let chain: Chain
    let io: UnsafeMutablePointer<iof_request>
    /// One pointer-sized slot per filter, `request_private` in the ABI.
    let privates: UnsafeMutablePointer<UnsafeMutableRawPointer?>
    /// The first filter this request meets: 0 for a consumer's request, k+1 for I/O
    /// that filter k submits below itself.
    let top: Int
    @exclusivity(unchecked) private var position = 0
    @exclusivity(unchecked) private var goingUp = false

    /// running → parked (the engine returned) or → resumedEarly (resume came first).
    private let deferState = Atomic<UInt8>(0)
    private static let running: UInt8 = 0
    private static let parked: UInt8 = 1
    private static let resumedEarly: UInt8 = 2
    private var resumedDisposition = IOF_PASS
    private var resumedError: Int32 = 0

    /// What the watchdog sees of this request. A separate object, so that the watchdog
    /// never holds a reference to a request another thread may be freeing.
    let watch = RequestWatch()

    enum Completion {
        case nbd(NBDRequest)
        case callback(iof_io_callback, UnsafeMutableRawPointer?)
        case swift(@Sendable (Int32) -> Void)
    }
    private let completion: Completion
    /// A one-off request (submit_below) keeps itself alive until its trip ends.
    var retainedUntilFinished: Unmanaged<ChainRequest>?

    init(chain: Chain, top: Int, completion: Completion) {
        self.chain = chain
        self.top = top
        self.completion = completion
        io = .allocate(capacity: 1)
        io.initialize(to: iof_request())
        io.pointee.struct_size = UInt32(MemoryLayout<iof_request>.size)
        privates = .allocate(capacity: max(chain.filters.count, 1))
        privates.initialize(repeating: nil, count: max(chain.filters.count, 1))
        io.pointee.host_private = UnsafeRawPointer(Unmanaged.passUnretained(self).toOpaque())
        chain.register(watch)
    }

    deinit {
        chain.unregister(watch)
        io.deallocate()
        privates.deallocate()
    }

    static func from(_ io: UnsafeMutablePointer<iof_request>) -> ChainRequest {
        Unmanaged<ChainRequest>.fromOpaque(io.pointee.host_private!).takeUnretainedValue()
    }

    func prepare(op: iof_op, flags: UInt32, offset: UInt64, length: UInt64, buffer: UnsafeMutableRawPointer?) {
        io.pointee.op = op
        io.pointee.flags = flags
        io.pointee.offset = offset
        io.pointee.length = length
        io.pointee.buffer = buffer
        io.pointee.error = 0
        io.pointee.id = chain.nextRequestID()
        watch.describe(id: io.pointee.id, op: op, offset: offset, length: length)
    }

    // MARK: the trip

    func run() {
        position = top
        goingUp = false
        descend()
    }

    private func enter(_ stageIndex: Int) {
        watch.since.store(monotonicNanoseconds(coarse: true), ordering: .relaxed)
        watch.stage.store(stageIndex, ordering: .relaxed)
    }

    private func descend() {
        let filters = chain.filters
        while position < filters.count {
            enter(position)
            privates[position] = nil
            deferState.store(Self.running, ordering: .relaxed)
            var disposition = filters[position].start(io, privates + position)
            if disposition == IOF_DEFER {
                guard let resumed = park() else { return }
                disposition = resumed
            }
            if !afterStart(disposition) { return }
        }
        enter(filters.count)
        chain.backend.submit(self)
    }

    /// Applies `start`'s decision at `position`; true to keep descending.
    private func afterStart(_ disposition: iof_disposition) -> Bool {
        switch disposition {
        case IOF_PASS:
            position += 1
            return true
        case IOF_COMPLETE:
            io.pointee.error = 0
        case IOF_FAIL:
            if io.pointee.error <= 0 { io.pointee.error = EIO }
        default:
            chain.filters[position].logInvalidDisposition(disposition, request: io)
            io.pointee.error = EIO
        }
        ascend(from: position - 1)
        return false
    }

    /// The backend finished (any thread).
    func backendDidComplete(error: Int32) {
        io.pointee.error = error
        ascend(from: chain.filters.count - 1)
    }

    private func ascend(from index: Int) {
        goingUp = true
        let filters = chain.filters
        var current = index
        while current >= top {
            let filter = filters[current]
            if filter.hasDone {
                enter(current)
                deferState.store(Self.running, ordering: .relaxed)
                var disposition = filter.done(io, privates[current])
                if disposition == IOF_DEFER {
                    guard let resumed = park() else {
                        position = current
                        return
                    }
                    disposition = resumed
                }
                if disposition == IOF_FAIL && io.pointee.error <= 0 { io.pointee.error = EIO }
            }
            current -= 1
        }
        finish()
    }

    private func finish() {
        watch.stage.store(-1, ordering: .relaxed)
        let error = io.pointee.error
        let keeper = retainedUntilFinished
        retainedUntilFinished = nil
        switch completion {
        case .nbd(let request): request.complete(error: error)
        case .callback(let callback, let arg): callback(arg, error)
        case .swift(let body): body(error)
        }
        keeper?.release()
    }

    // MARK: deferral

    /// After a callback returned IOF_DEFER: nil if the request now waits for `resume`,
    /// or the disposition `resume` already delivered while the callback ran.
    private func park() -> iof_disposition? {
        if deferState.compareExchange(expected: Self.running, desired: Self.parked, ordering: .acquiringAndReleasing).exchanged {
            return nil
        }
        io.pointee.error = resumedError
        return resumedDisposition
    }

    /// `host->resume`, from any thread.
    func resume(_ disposition: iof_disposition, error: Int32) {
        let decided = disposition == IOF_DEFER ? IOF_FAIL : disposition
        resumedDisposition = decided
        resumedError = decided == IOF_FAIL && error <= 0 ? EIO : error
        if deferState.compareExchange(expected: Self.running, desired: Self.resumedEarly, ordering: .acquiringAndReleasing).exchanged {
            return  // the engine is still inside the callback and picks it up on return
        }
        io.pointee.error = resumedError
        if goingUp {
            if decided == IOF_FAIL && io.pointee.error <= 0 { io.pointee.error = EIO }
            ascend(from: position - 1)
        } else if afterStart(decided) {
            descend()
        }
    }
}

extension ChainRequest: NBDClientCompletion {
    public func nbdRequestDidComplete(error: Int32) { backendDidComplete(error: error) }
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
