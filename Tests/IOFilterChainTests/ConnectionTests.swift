@preconcurrency import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPosix
import Synchronization
import Testing

@testable import IOFilterChain

/// A bare NBD client over a unix socket that does exactly what a test says: send
/// requests without reading replies, send garbage, hang up mid-request.
struct RawClient {
    let fd: Int32

    init(socket path: String) throws {
        fd = try Sockets.connectUnix(path: path)
        var greeting = [UInt8](repeating: 0, count: 18)
        #expect(try FileDescriptorIO.readExactly(fd, into: &greeting, count: 18))
        // Fixed newstyle, no zeroes; NBD_OPT_EXPORT_NAME "" (the default export).
        var hello: [UInt8] = [0, 0, 0, 3]
        hello += bigEndian(UInt64(0x4948_4156_454F_5054)) + bigEndian(UInt32(1)) + bigEndian(UInt32(0))
        try FileDescriptorIO.writeAll(fd, hello)
        var export = [UInt8](repeating: 0, count: 10)
        #expect(try FileDescriptorIO.readExactly(fd, into: &export, count: 10))
    }

    static func request(_ type: UInt16, cookie: UInt64, offset: UInt64 = 0, length: UInt32 = 0, magic: UInt32 = 0x2560_9513) -> [UInt8] {
        bigEndian(magic) + bigEndian(UInt16(0)) + bigEndian(type) + bigEndian(cookie) + bigEndian(offset) + bigEndian(length)
    }

    func send(_ bytes: [UInt8]) throws { try FileDescriptorIO.writeAll(fd, bytes) }

    /// Reads one simple reply: its cookie and error, skipping `dataBytes` of read data.
    func reply(dataBytes: Int) throws -> (cookie: UInt64, error: UInt32)? {
        var header = [UInt8](repeating: 0, count: 16)
        guard try FileDescriptorIO.readExactly(fd, into: &header, count: 16) else { return nil }
        let error = header[4..<8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let cookie = header[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        if error == 0 && dataBytes > 0 {
            var data = [UInt8](repeating: 0, count: dataBytes)
            guard try FileDescriptorIO.readExactly(fd, into: &data, count: dataBytes) else { return nil }
        }
        return (cookie, error)
    }

    /// Connects without negotiating.
    init(connectingOnly path: String) throws {
        fd = try Sockets.connectUnix(path: path)
    }

    /// True once the server has closed its end.
    func atEOF() -> Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }

    func close() { Glibc.close(fd) }
}

final class Weak: @unchecked Sendable {
    weak var object: ChainRequest?
    init(_ object: ChainRequest) { self.object = object }
}

func bigEndian<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}

/// A chain served by a real NBDServer on a unix socket in a scratch directory.
final class ServedChain: @unchecked Sendable {
    let test: TestChain
    let server: NBDServer
    let socketPath: String
    let listenFD: Int32

    init(_ test: TestChain, limits: NBDServerLimits = NBDServerLimits()) throws {
        self.test = test
        socketPath = "/tmp/iofilter-chaintests-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock"
        listenFD = try Sockets.listenUnix(path: socketPath)
        server = NBDServer(catalog: ChainCatalog(disk: ChainExport(name: "disk", chain: test.chain, readOnly: false)),
                           limits: limits, logger: test.log.logger)
        server.serve(listenFD: listenFD)
    }

    func stop() {
        server.stop(timeout: 10)
        close(listenFD)
        unlink(socketPath)
    }

    /// Waits until every request object of the chain has been retired.
    func requestsFreed(timeout: Double = 5) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        while monotonicNanoseconds() < deadline {
            if test.chain.liveRequestCount == 0 { return true }
            usleep(10_000)
        }
        return false
    }
}

/// One thread that completes every deferred request, the way an NBD backend's reply
/// reader completes requests for all connections of a disk.
final class SingleCompleter: @unchecked Sendable {
    private let lock = ConditionLock()
    private var work: [UInt] = []

    init() {
        startThread(name: "test-completer") { [self] in
            while true {
                lock.lock()
                while work.isEmpty { lock.wait() }
                let next = work.removeFirst()
                lock.unlock()
                hostResume(UnsafeMutablePointer<iof_request>(bitPattern: next), IOF_PASS)
            }
        }
    }

    func later(_ request: UnsafeMutablePointer<iof_request>) -> iof_disposition {
        lock.withLock {
            work.append(UInt(bitPattern: request))
            lock.signal()
        }
        return IOF_DEFER
    }
}

@Suite("NBD connections over the chain")
struct ConnectionTests {
    @Test("a client that stops reading its replies does not stall another client of the same disk")
    func slowClientDoesNotStallOthers() throws {
        let completer = SingleCompleter()
        let filter = ScriptedFilter("remote")
        filter.onStart = { request in completer.later(request) }
        let served = try ServedChain(TestChain([filter], size: 1 << 20))
        let slow = try RawClient(socket: served.socketPath)
        let fast = try RawClient(socket: served.socketPath)
        // 1000 reads of 256 KiB, none of whose replies is ever read: the socket fills.
        var requests: [UInt8] = []
        for cookie in 0..<1000 { requests += RawClient.request(0, cookie: UInt64(cookie), length: 256 << 10) }
        try slow.send(requests)
        usleep(200_000)
        // The other client's reads complete on the same thread and must keep flowing.
        let answered = Atomic<Int>(0)
        startThread(name: "test-fast") {
            for cookie in 0..<50 {
                guard (try? fast.send(RawClient.request(0, cookie: UInt64(cookie), length: 4096))) != nil,
                      let reply = try? fast.reply(dataBytes: 4096), reply.cookie == UInt64(cookie), reply.error == 0
                else { return }
                answered.add(1, ordering: .relaxed)
            }
        }
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while answered.load(ordering: .relaxed) < 50 && monotonicNanoseconds() < deadline { usleep(10_000) }
        #expect(answered.load(ordering: .relaxed) == 50)
        slow.close()
        fast.close()
        served.stop()
        #expect(served.requestsFreed())
    }

    @Test("replies already batched are sent before the connection goes",
          arguments: ["bad magic", "disconnect"])
    func batchedRepliesSurviveTheEnd(ending: String) throws {
        let served = try ServedChain(TestChain([ScriptedFilter("pass")]))
        let client = try RawClient(socket: served.socketPath)
        var bytes: [UInt8] = []
        for cookie in 1...8 { bytes += RawClient.request(0, cookie: UInt64(cookie), offset: UInt64(cookie) * 4096, length: 4096) }
        bytes += ending == "disconnect" ? RawClient.request(2, cookie: 99) : RawClient.request(0, cookie: 99, magic: 0xbad0_bad0)
        try client.send(bytes)  // one write: the server finds all of it in one read
        var cookies: [UInt64] = []
        while let reply = try client.reply(dataBytes: 4096) {
            #expect(reply.error == 0)
            cookies.append(reply.cookie)
        }
        #expect(cookies.sorted() == Array(1...8))
        client.close()
        served.stop()
        #expect(served.requestsFreed())
    }

    @Test("a client that hangs up in the middle of a write leaves no request behind")
    func truncatedWriteFreesEverything() throws {
        let filter = ScriptedFilter("slow")
        let seen = Guarded<[Weak]>([])
        filter.onStart = { request in
            // Remember the engine's objects weakly: they must be freed, not just retired.
            if let object = LiveRequests.shared.lookup(request) { seen.withLock { $0.append(Weak(object)) } }
            return Delivery.deferredLater.deliver(request, IOF_PASS)
        }
        let served = try ServedChain(TestChain([filter]))
        let client = try RawClient(socket: served.socketPath)
        var bytes: [UInt8] = []
        for cookie in 1...16 { bytes += RawClient.request(0, cookie: UInt64(cookie), length: 4096) }
        bytes += RawClient.request(1, cookie: 100, length: 65536) + [UInt8](repeating: 7, count: 100)
        try client.send(bytes)
        usleep(20_000)
        client.close()
        #expect(served.requestsFreed(), "every request object of the connection was retired")
        served.stop()
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while seen.withLock({ $0.contains { $0.object != nil } }) && monotonicNanoseconds() < deadline { usleep(10_000) }
        #expect(seen.withLock { $0.count } == 16)
        #expect(seen.withLock { $0.allSatisfy { $0.object == nil } }, "no request object outlived its connection")
        #expect(served.test.backend.seen.withLock { $0.allSatisfy { $0.op != IOF_OP_WRITE } }, "the torn write never reached the disk")
    }

    @Test("stop answers accepted requests before it returns, so filters close with none in flight")
    func stopIsOrderly() throws {
        let filter = ScriptedFilter("slow")
        filter.onStart = { request in
            nonisolated(unsafe) let request = request
            Background.run {
                usleep(300_000)
                hostResume(request, IOF_PASS)
            }
            return IOF_DEFER
        }
        let served = try ServedChain(TestChain([filter]))
        let client = try RawClient(socket: served.socketPath)
        try client.send(RawClient.request(0, cookie: 7, length: 4096))
        usleep(50_000)
        let started = monotonicNanoseconds()
        served.stop()
        #expect(monotonicNanoseconds() - started >= 200_000_000, "stop waited for the request in the filter")
        #expect(filter.calls("done") == 1)
        let reply = try client.reply(dataBytes: 4096)
        #expect(reply?.cookie == 7 && reply?.error == 0)
        #expect(client.atEOF())
        client.close()
        // New clients are no longer accepted: the socket still exists, nobody serves it.
        #expect(served.requestsFreed())
    }

    @Test("a client that does not finish negotiating in time is dropped, however it trickles")
    func slowHandshakeIsDropped() throws {
        let served = try ServedChain(TestChain([ScriptedFilter("pass")]), limits: NBDServerLimits(handshakeSeconds: 0.5))
        let silent = try RawClient(connectingOnly: served.socketPath)
        let trickler = try RawClient(connectingOnly: served.socketPath)
        let started = monotonicNanoseconds()
        var greeting = [UInt8](repeating: 0, count: 18)
        #expect(try FileDescriptorIO.readExactly(trickler.fd, into: &greeting, count: 18))
        // One byte of the client flags every 200 ms: each read makes progress, the whole never ends.
        var dropped = false
        for _ in 0..<20 {
            var byte: UInt8 = 0
            if send(trickler.fd, &byte, 1, Int32(MSG_NOSIGNAL)) < 0 { dropped = true; break }
            var ready = pollfd(fd: trickler.fd, events: Int16(POLLIN), revents: 0)
            if poll(&ready, 1, 200) > 0 && trickler.atEOF() { dropped = true; break }
        }
        #expect(dropped, "the trickling client was dropped")
        #expect(try FileDescriptorIO.readExactly(silent.fd, into: &greeting, count: 18))
        #expect(silent.atEOF(), "the silent client was dropped")
        let seconds = Double(monotonicNanoseconds() - started) / 1e9
        #expect(seconds < 3, "dropped after \(seconds) s")
        // A client that negotiates promptly is served as before.
        let prompt = try RawClient(socket: served.socketPath)
        try prompt.send(RawClient.request(0, cookie: 1, length: 4096))
        #expect(try prompt.reply(dataBytes: 4096)?.error == 0)
        for client in [silent, trickler, prompt] { client.close() }
        served.stop()
    }

    @Test("connections are capped; a client over the cap gets a clean end, and a freed place is taken again")
    func connectionsAreCapped() throws {
        let served = try ServedChain(TestChain([ScriptedFilter("pass")]), limits: NBDServerLimits(maxConnections: 2))
        let first = try RawClient(socket: served.socketPath)
        let second = try RawClient(socket: served.socketPath)
        let third = try RawClient(connectingOnly: served.socketPath)
        #expect(third.atEOF(), "the third client was turned away")
        #expect(served.test.log.contains("clients are served, the most allowed"))
        // The first two still work.
        for client in [first, second] {
            try client.send(RawClient.request(0, cookie: 5, length: 4096))
            #expect(try client.reply(dataBytes: 4096)?.cookie == 5)
        }
        first.close()
        var admitted: RawClient?
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while admitted == nil && monotonicNanoseconds() < deadline {
            usleep(20_000)
            let candidate = try RawClient(connectingOnly: served.socketPath)
            var ready = pollfd(fd: candidate.fd, events: Int16(POLLIN), revents: 0)
            var peek: UInt8 = 0
            if poll(&ready, 1, 500) > 0 && recv(candidate.fd, &peek, 1, Int32(MSG_PEEK)) == 1 {
                admitted = candidate
            } else {
                candidate.close()
            }
        }
        #expect(admitted != nil, "a new client took the freed place")
        for client in [second, third] { client.close() }
        admitted?.close()
        served.stop()
    }
}
