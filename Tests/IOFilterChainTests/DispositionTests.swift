@preconcurrency import CIOFilter
import Glibc
import IOFilterPosix
import Synchronization
import Testing

@testable import IOFilterChain

/// How a filter hands back its decision in these tests.
enum Delivery: CaseIterable, CustomStringConvertible {
    /// returned from the callback
    case direct
    /// IOF_DEFER, then resume() from another thread after the callback returned
    case deferredLater
    /// IOF_DEFER, with resume() already called (from this thread) before returning
    case deferredEarly
    /// IOF_DEFER, resume() from another thread at once: races the callback's return
    case deferredRacing
    /// IOF_DEFER after defer_call (ABI 1.7): the host calls back, and the call resumes
    case deferredCall

    var description: String {
        switch self {
        case .direct: "direct"
        case .deferredLater: "deferred, resumed later"
        case .deferredEarly: "deferred, resumed before returning"
        case .deferredRacing: "deferred, resumed racing the return"
        case .deferredCall: "deferred with defer_call"
        }
    }

    func deliver(_ request: UnsafeMutablePointer<iof_request>, _ disposition: iof_disposition, error: Int32 = 0) -> iof_disposition {
        switch self {
        case .direct:
            if disposition == IOF_FAIL { request.pointee.error = error }
            return disposition
        case .deferredLater:
            nonisolated(unsafe) let request = request
            Background.run {
                usleep(2000)
                hostResume(request, disposition, error)
            }
            return IOF_DEFER
        case .deferredEarly:
            hostResume(request, disposition, error)
            return IOF_DEFER
        case .deferredRacing:
            nonisolated(unsafe) let request = request
            Background.run { hostResume(request, disposition, error) }
            return IOF_DEFER
        case .deferredCall:
            return hostDeferCall(request, disposition, error) == 0 ? IOF_DEFER : IOF_FAIL
        }
    }
}

/// Serialized: `DeferredCallLog` is one log for the process, and a test that counts the
/// deferred calls it made (and the threads they ran on) must not see another test's.
/// In parallel, CI once saw 2,005 calls on two threads where 2,000 ran on one.
@Suite("chain engine: dispositions", .serialized)
struct DispositionTests {
    @Test("every disposition at every position, returned or deferred", arguments: Delivery.allCases)
    func everyDispositionAtEveryPosition(delivery: Delivery) throws {
        let outcomes: [(iof_disposition, Int32)] = [(IOF_COMPLETE, 0), (IOF_FAIL, ENOSPC)]
        for position in 0..<3 {
            for (disposition, error) in outcomes {
                let filters = (0..<3).map { ScriptedFilter("f\($0)") }
                for (index, filter) in filters.enumerated() {
                    filter.onStart = { request in
                        delivery.deliver(request, index == position ? disposition : IOF_PASS, error: error)
                    }
                    filter.onDone = { request in delivery.deliver(request, IOF_PASS) }
                }
                let chain = try TestChain(filters)
                let result = chain.send(IOF_OP_READ)
                #expect(result == error, "\(disposition) at \(position): result \(String(describing: result))")
                #expect(chain.backend.requestsSeen == 0, "the disk saw a request filter \(position) finished")
                for (index, filter) in filters.enumerated() {
                    #expect(filter.calls("start") == (index <= position ? 1 : 0), "start of f\(index)")
                    // Only the filters that passed it (those above the one that decided) see the result.
                    #expect(filter.calls("done") == (index < position ? 1 : 0), "done of f\(index)")
                }
            }
        }
    }

    @Test("a request every filter passes reaches the disk and comes back up nearest-disk first", arguments: Delivery.allCases)
    func passedRequestsGoDownAndUpInOrder(delivery: Delivery) throws {
        let order = Guarded<[Int]>([])
        let filters = (0..<5).map { ScriptedFilter("f\($0)") }
        for (index, filter) in filters.enumerated() {
            filter.onStart = { request in delivery.deliver(request, IOF_PASS) }
            filter.onDone = { request in
                order.withLock { $0.append(index) }
                return delivery.deliver(request, IOF_PASS)
            }
        }
        let chain = try TestChain(filters, asynchronousBackend: delivery != .direct)
        let data = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { data.deallocate() }
        memset(data, 0x5a, 4096)
        #expect(chain.send(IOF_OP_WRITE, offset: 8192, buffer: data) == 0)
        memset(data, 0, 4096)
        #expect(chain.send(IOF_OP_READ, offset: 8192, buffer: data) == 0)
        #expect(data.load(fromByteOffset: 4095, as: UInt8.self) == 0x5a)
        #expect(order.withLock { $0 } == [4, 3, 2, 1, 0, 4, 3, 2, 1, 0])
        #expect(chain.backend.requestsSeen == 2)
    }

    @Test("done may fail a request the disk completed; filters above learn the error")
    func doneMayFail() throws {
        let filters = (0..<3).map { ScriptedFilter("f\($0)") }
        let seenAbove = Guarded<Int32>(-1)
        filters[2].onDone = { request in
            request.pointee.error = EROFS
            return IOF_FAIL
        }
        filters[0].onDone = { request in
            seenAbove.withLock { $0 = request.pointee.error }
            return IOF_PASS
        }
        let chain = try TestChain(filters)
        #expect(chain.send(IOF_OP_WRITE) == EROFS)
        #expect(seenAbove.withLock { $0 } == EROFS)
        // A failure without an errno becomes EIO.
        filters[2].onDone = { _ in IOF_FAIL }
        #expect(chain.send(IOF_OP_WRITE) == EIO)
    }

    @Test("a deferred done resumed from another thread goes on from its own filter, many times over")
    func deferredDoneAscendsFromItsOwnPosition() throws {
        let filters = (0..<4).map { ScriptedFilter("f\($0)") }
        filters[2].onDone = { request in Delivery.deferredRacing.deliver(request, IOF_PASS) }
        let chain = try TestChain(filters)
        for _ in 0..<2000 {
            #expect(chain.send(IOF_OP_READ) == 0)
        }
        // Each filter's done ran exactly once per request: none skipped, none repeated.
        for filter in filters { #expect(filter.calls("done") == 2000, "\(filter.name)") }
        let order = filters.map { filter in filter.events.withLock { $0.filter { $0.hasPrefix("done") } } }
        #expect(order[0] == order[3])
    }

    @Test("defer_call from a callback runs on the thread that ran the chain, after the callback returned; from a thread of the filter's, on an executor")
    func deferredCallsStayOnTheChainsThread() throws {
        let filters = (0..<5).map { ScriptedFilter("f\($0)") }
        let deferring: (UnsafeMutablePointer<iof_request>) -> iof_disposition = { request in
            DeferredCallLog.insideCallback.withLock { $0 = true }
            defer { DeferredCallLog.insideCallback.withLock { $0 = false } }
            return hostDeferCall(request, IOF_PASS) == 0 ? IOF_DEFER : IOF_FAIL
        }
        for filter in filters {
            filter.onStart = deferring
            filter.onDone = deferring
        }
        let chain = try TestChain(filters)
        DeferredCallLog.reset()
        for _ in 0..<200 {
            #expect(chain.send(IOF_OP_READ) == 0)
        }
        // `send` starts each request on this thread: every call ran here, ten per
        // request, none inside a callback.
        let here = pthread_self()
        let ranOn = DeferredCallLog.threads.withLock { $0 }
        #expect(ranOn.count == 2000)
        #expect(Set(ranOn) == [here])
        #expect(DeferredCallLog.ranInsideCallback.withLock { $0 } == 0)
        for filter in filters { #expect(filter.calls("start") == 200 && filter.calls("done") == 200, "\(filter.name)") }

        // Deferred from a thread of the filter's own, the call goes to an executor,
        // which then runs the request's later calls too: one hop for the chain. The
        // foreign thread defers only once `start` returned, so the request is parked:
        // a resume that races the callback's return is carried on by the returning
        // thread instead, which is right but not what this checks.
        let parked = Guarded<UnsafeMutablePointer<iof_request>?>(nil)
        filters[0].onStart = { request in
            parked.withLock { $0 = request }
            return IOF_DEFER
        }
        DeferredCallLog.reset()
        let waiter = Completion()
        chain.start(IOF_OP_READ, waiter: waiter)
        nonisolated(unsafe) let request = try #require(parked.withLock { $0 })
        Background.run { _ = hostDeferCall(request, IOF_PASS) }
        #expect(waiter.wait(timeout: 10) == 0)
        let threads = DeferredCallLog.threads.withLock { $0 }
        #expect(threads.count == 10 && !threads.contains(here))
        #expect(Set(threads).count == 1)
    }

    @Test("submit_below enters the chain below its filter, only within the disk")
    func submitBelow() throws {
        let filters = (0..<3).map { ScriptedFilter("f\($0)") }
        let chain = try TestChain(filters)
        let disk = chain.chain.filters[1].hostDisk
        let submit = HostServices.table.pointee.submit_below!
        let waiter = Completion()
        let arg = Unmanaged.passRetained(waiter).toOpaque()
        let callback: iof_io_callback = { arg, error in
            Unmanaged<Completion>.fromOpaque(arg!).takeRetainedValue().complete(error)
        }
        #expect(submit(disk, IOF_OP_WRITE, 0, 4096, 4096, Scratch.page, callback, arg) == 0)
        #expect(waiter.wait(timeout: 5) == 0)
        #expect(filters[0].calls("start") == 0 && filters[1].calls("start") == 0 && filters[2].calls("start") == 1)
        // Outside the disk, a length past 4 GiB, a read without a buffer, an unknown op: refused.
        #expect(submit(disk, IOF_OP_WRITE, 0, (1 << 20) - 4095, 4096, Scratch.page, callback, nil) == EINVAL)
        #expect(submit(disk, IOF_OP_WRITE_ZEROES, 0, 0, 1 << 33, nil, callback, nil) == EINVAL)
        #expect(submit(disk, IOF_OP_READ, 0, 0, 4096, nil, callback, nil) == EINVAL)
        #expect(submit(disk, iof_op(rawValue: 99), 0, 0, 4096, Scratch.page, callback, nil) == EINVAL)
        #expect(chain.backend.requestsSeen == 1)
    }
}
