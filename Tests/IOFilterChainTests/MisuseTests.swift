@preconcurrency import CIOFilter
import Glibc
import IOFilterPosix
import Synchronization
import Testing

@testable import IOFilterChain

/// A partner's bug must cost at most the request it touched: never a second reply, a
/// crash of the worker, or bytes outside the request reaching the disk.
@Suite("chain engine: misuse by filters")
struct MisuseTests {
    @Test("a second resume is logged against the filter and ignored")
    func secondResumeIsIgnored() throws {
        let filter = ScriptedFilter("twice")
        let parked = Guarded<UInt>(0)
        filter.onStart = { request in
            parked.withLock { $0 = UInt(bitPattern: request) }
            return IOF_DEFER
        }
        let chain = try TestChain([filter])
        let waiter = Completion()
        chain.start(IOF_OP_READ, waiter: waiter)
        let request = try #require(UnsafeMutablePointer<iof_request>(bitPattern: parked.withLock { $0 }))
        hostResume(request, IOF_PASS)
        #expect(waiter.wait(timeout: 5) == 0)
        hostResume(request, IOF_FAIL, EIO)
        hostResume(request, IOF_PASS)
        usleep(50_000)
        #expect(waiter.completions == 1)
        #expect(chain.backend.requestsSeen == 1)
    }

    @Test("resumes racing from many threads: exactly one wins, every request completes once")
    func racingResumes() throws {
        let filter = ScriptedFilter("racer")
        filter.onStart = { request in
            nonisolated(unsafe) let request = request
            for _ in 0..<3 { Background.run { hostResume(request, IOF_PASS) } }
            return IOF_DEFER
        }
        let chain = try TestChain([filter])
        var waiters: [Completion] = []
        for _ in 0..<200 {
            let waiter = Completion()
            waiters.append(waiter)
            chain.start(IOF_OP_READ, waiter: waiter)
        }
        for waiter in waiters { #expect(waiter.wait(timeout: 10) == 0) }
        usleep(100_000)  // let the losing resumes arrive
        #expect(waiters.allSatisfy { $0.completions == 1 })
        #expect(chain.backend.requestsSeen == 200)
    }

    @Test("a resume of a request the filter did not defer is ignored")
    func resumeWithoutDefer() throws {
        let filter = ScriptedFilter("eager")
        filter.onStart = { request in
            hostResume(request, IOF_FAIL, EIO)  // and then passes it anyway
            return IOF_PASS
        }
        let chain = try TestChain([filter])
        let waiter = Completion()
        chain.start(IOF_OP_READ, waiter: waiter)
        #expect(waiter.wait(timeout: 5) == 0)
        #expect(waiter.completions == 1)
        #expect(chain.log.contains("did not defer"))
    }

    @Test("NULL and foreign request pointers are refused, not dereferenced")
    func foreignPointers() throws {
        let filter = ScriptedFilter("forger")
        let chain = try TestChain([filter])
        hostResume(nil, IOF_PASS)
        // A request the host never issued, whose host_private points at nothing.
        var forged = iof_request()
        forged.host_private = UnsafeRawPointer(bitPattern: 0xdead_beef)
        hostResume(&forged, IOF_PASS)
        // A real request whose host_private the filter scribbled over still resumes
        // correctly: the host finds its requests by their own address.
        filter.onStart = { request in
            request.pointee.host_private = UnsafeRawPointer(bitPattern: 0x1234)
            return Delivery.deferredLater.deliver(request, IOF_PASS)
        }
        #expect(chain.send(IOF_OP_READ) == 0)
    }

    @Test("an invalid disposition fails the request with EIO", arguments: [Delivery.direct, .deferredLater, .deferredEarly])
    func invalidDisposition(delivery: Delivery) throws {
        let filter = ScriptedFilter("confused")
        filter.onStart = { request in delivery.deliver(request, iof_disposition(rawValue: 7)) }
        let chain = try TestChain([filter])
        #expect(chain.send(IOF_OP_WRITE) == EIO)
        #expect(chain.backend.requestsSeen == 0)
        #expect(chain.log.contains("invalid disposition"))
    }

    @Test("a filter that changes op, flags, offset, length or buffer fails the request; the disk never sees it",
          arguments: ["op", "flags", "offset", "length", "buffer"])
    func changedRequestIsFailed(field: String) throws {
        let other = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { other.deallocate() }
        nonisolated(unsafe) let elsewhere = other
        func tamper(_ request: UnsafeMutablePointer<iof_request>) {
            switch field {
            case "op": request.pointee.op = IOF_OP_WRITE
            case "flags": request.pointee.flags |= UInt32(IOF_REQ_FUA)
            case "offset": request.pointee.offset += 4096
            case "length": request.pointee.length *= 64
            default: request.pointee.buffer = elsewhere
            }
        }
        // In start, directly and after a deferral: the disk sees nothing.
        for delivery in [Delivery.direct, .deferredLater] {
            let top = ScriptedFilter("top"), tamperer = ScriptedFilter("tamperer")
            let seenAbove = Guarded<String>("")
            tamperer.onStart = { request in
                tamper(request)
                return delivery.deliver(request, IOF_PASS)
            }
            top.onDone = { request in
                // The filter above sees the request as it issued it, with the failure.
                let io = request.pointee
                seenAbove.withLock { $0 = "\(io.op.rawValue) \(io.flags) \(io.offset) \(io.length) \(io.error)" }
                return IOF_PASS
            }
            let chain = try TestChain([top, tamperer])
            #expect(chain.send(IOF_OP_READ, offset: 4096, length: 4096) == EIO, "\(field), \(delivery)")
            #expect(chain.backend.requestsSeen == 0, "\(field), \(delivery)")
            #expect(seenAbove.withLock { $0 } == "\(IOF_OP_READ.rawValue) 0 4096 4096 \(EIO)", "\(field), \(delivery)")
            #expect(chain.log.contains("[org.test.tamperer] changed request"), "\(field), \(delivery)")
        }
        // In done: the consumer gets EIO rather than a reply for another request.
        let tamperer = ScriptedFilter("late-tamperer")
        tamperer.onDone = { request in
            tamper(request)
            return IOF_PASS
        }
        let chain = try TestChain([tamperer])
        #expect(chain.send(IOF_OP_READ, offset: 4096, length: 4096) == EIO, "\(field) in done")
    }

    @Test("a serialized filter that resumes another request from inside its callback does not deadlock",
          arguments: [IOF_THREADS_SERIALIZE_PER_DISK, IOF_THREADS_SERIALIZE_ALL])
    func serializedResumeFromInsideACallback(model: iof_thread_model) throws {
        let filter = ScriptedFilter("serial-\(model.rawValue)", threadModel: model)
        let parked = Guarded<UInt>(0)
        filter.onStart = { request in
            if let earlier = UnsafeMutablePointer<iof_request>(bitPattern: parked.withLock({ value -> UInt in
                defer { value = 0 }
                return value
            })) {
                // The earlier request's trip leads through this filter's done.
                hostResume(earlier, IOF_PASS)
                return IOF_PASS
            }
            parked.withLock { $0 = UInt(bitPattern: request) }
            return IOF_DEFER
        }
        let chain = try TestChain([filter])
        let first = Completion(), second = Completion()
        // On a thread of its own, so that a deadlock fails the test instead of hanging it.
        startThread(name: "test-serial") {
            chain.start(IOF_OP_READ, waiter: first)
            chain.start(IOF_OP_READ, waiter: second)
        }
        #expect(first.wait(timeout: 5) == 0, "the resumed request finished")
        #expect(second.wait(timeout: 5) == 0, "the resuming request finished")
        #expect(filter.calls("done") == 2)
    }
}
