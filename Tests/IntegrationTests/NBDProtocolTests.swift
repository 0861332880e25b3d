import Foundation
import IOFilterPosix
import Testing

/// Malformed NBD traffic straight onto the socket: the worker must answer with a clean
/// error or a disconnect, never crash, and never change the disk's bytes.
@Suite("NBD protocol robustness", .serialized)
struct NBDProtocolTests {
    let directory = Harness.temporaryDirectory("nbd")

    /// A raw client over a unix socket.
    final class RawClient {
        let fd: Int32

        init(socket path: String) throws {
            fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                let bytes = Array(path.utf8)
                raw.copyBytes(from: bytes)
                raw[bytes.count] = 0
            }
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard rc == 0 else { throw HarnessError("connect \(path): \(errno)") }
            var timeout = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        }

        deinit { close(fd) }

        func send(_ bytes: [UInt8]) {
            var sent = 0
            while sent < bytes.count {
                let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if n <= 0 { return }
                sent += n
            }
        }

        /// Reads exactly `count` bytes, or nil on EOF / time-out.
        func receive(_ count: Int) -> [UInt8]? {
            var bytes = [UInt8](repeating: 0, count: count)
            var got = 0
            while got < count {
                let n = bytes[got...].withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n <= 0 { return nil }
                got += n
            }
            return bytes
        }

        /// Fixed-newstyle negotiation with OPT_GO; returns the export size.
        func negotiate() throws -> UInt64 {
            guard let greeting = receive(18), greeting[0..<8] == ArraySlice(Array("NBDMAGIC".utf8)) else { throw HarnessError("no greeting") }
            send(be32(3))  // fixed newstyle, no zeroes
            send(be64(0x4948_4156_454F_5054) + be32(7) + be32(6) + be32(0) + be16(0))
            var size: UInt64 = 0
            while true {
                guard let header = receive(20) else { throw HarnessError("no option reply") }
                let type = u32(header, 12), length = Int(u32(header, 16))
                let data = length > 0 ? receive(length) ?? [] : []
                if type == 3, data.count >= 10, u16(data, 0) == 0 { size = u64(data, 2) }
                if type == 1 { return size }
                if type & 0x8000_0000 != 0 { throw HarnessError("GO refused: \(type)") }
            }
        }

        func request(type: UInt16, flags: UInt16 = 0, cookie: UInt64, offset: UInt64, length: UInt32, magic: UInt32 = 0x2560_9513) -> [UInt8] {
            be32(magic) + be16(flags) + be16(type) + be64(cookie) + be64(offset) + be32(length)
        }

        /// The error of the next simple reply with `cookie` (payload of reads skipped).
        func replyError(cookie: UInt64, readLength: Int = 0) -> UInt32? {
            guard let header = receive(16), u32(header, 0) == 0x6744_6698, u64(header, 8) == cookie else { return nil }
            let error = u32(header, 4)
            if error == 0 && readLength > 0 { _ = receive(readLength) }
            return error
        }

        /// True if the server closed the connection.
        func isClosed() -> Bool {
            var byte: UInt8 = 0
            return recv(fd, &byte, 1, 0) <= 0
        }
    }

    @Test func malformedRequestsGetErrorsOrADisconnectAndNeverTouchTheDisk() throws {
        let disk = directory.appendingPathComponent("fuzz.img").path
        Harness.makeRandomFile(disk, size: 4 << 20, seed: 7)
        let before = try Harness.sha(disk)
        let socketPath = directory.appendingPathComponent("fuzz.sock").path
        let test = try Harness.buildTestPlugin("tf", in: directory)
        let served = try ServedDisk([disk, "--readonly", "--socket", socketPath, "--filter", "\(test):behaviour=defer"])
        defer { served.stop() }
        let worker = try #require(served.workerPID)

        let client = try RawClient(socket: socketPath)
        let size = try client.negotiate()
        #expect(size == 4 << 20)
        let EINVAL: UInt32 = 22, EPERM: UInt32 = 1
        // Out of range, overflowing, oversized, unknown command, unknown flag, DF without
        // structured replies; a cache hint is fine on a read-only export; block status
        // without its metadata context is not; trim and write-zeroes are refused.
        let cases: [(UInt16, UInt16, UInt64, UInt32, UInt32)] = [
            (0, 0, size, 1, EINVAL), (0, 0, size - 10, 11, EINVAL), (0, 0, UInt64.max - 100, 4096, EINVAL),
            (0, 0, 0, 64 << 20, EINVAL), (42, 0, 0, 0, EINVAL), (0, 1 << 9, 0, 512, EINVAL), (0, 1 << 2, 0, 512, EINVAL),
            (5, 0, 0, 4096, 0), (7, 0, 0, 4096, EINVAL), (4, 0, 0, 4096, EPERM), (6, 0, 0, 4096, EPERM),
        ]
        for (index, (type, flags, offset, length, expected)) in cases.enumerated() {
            client.send(client.request(type: type, flags: flags, cookie: UInt64(index + 1), offset: offset, length: length))
            #expect(client.replyError(cookie: UInt64(index + 1)) == expected, "case \(index)")
        }
        // A write to the read-only export: the payload is consumed and EPERM returned.
        client.send(client.request(type: 1, cookie: 100, offset: 0, length: 8192) + [UInt8](repeating: 0xff, count: 8192))
        #expect(client.replyError(cookie: 100) == EPERM)
        // The connection still works after all of that.
        client.send(client.request(type: 0, cookie: 101, offset: 4096, length: 4096))
        #expect(client.replyError(cookie: 101, readLength: 4096) == 0)
        // Bad magic: the server hangs up.
        client.send(client.request(type: 0, cookie: 102, offset: 0, length: 512, magic: 0xdead_beef))
        #expect(client.isClosed())

        // Garbage, truncated headers, and option-phase nonsense, on fresh connections.
        var generator = SeededGenerator(seed: 99)
        for round in 0..<60 {
            let raw = try RawClient(socket: socketPath)
            if round % 3 == 0 {
                raw.send((0..<Int.random(in: 1...600, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) })
            } else {
                _ = try raw.negotiate()
                var request = raw.request(type: UInt16.random(in: 0...9, using: &generator), flags: UInt16.random(in: 0...31, using: &generator),
                                          cookie: 1, offset: UInt64.random(in: 0...(8 << 20), using: &generator),
                                          length: UInt32.random(in: 0...(1 << 16), using: &generator))
                if round % 3 == 1 { request = Array(request.prefix(Int.random(in: 1...27, using: &generator))) }
                raw.send(request + (0..<Int.random(in: 0...64, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) })
            }
        }
        // A write beyond the end on a writable export must not grow or change the file either.
        usleep(200_000)
        #expect(served.workerPID == worker, "the worker never crashed")
        #expect(!served.log.contains("restarting"))
        #expect(try Harness.sha(disk) == before)
        let check = try Harness.check(Harness.tool("qemu-io"), ["-f", "raw", "-r", "-c", "read 0 4096", served.uri])
        #expect(check.contains("read 4096/4096"))
    }

    @Test func writesBeyondTheEndAreRefusedWithENOSPC() throws {
        let disk = directory.appendingPathComponent("end.img").path
        Harness.makeRandomFile(disk, size: 1 << 20, seed: 3)
        let before = try Harness.sha(disk)
        let socketPath = directory.appendingPathComponent("end.sock").path
        let served = try ServedDisk([disk, "--socket", socketPath])
        defer { served.stop() }
        let client = try RawClient(socket: socketPath)
        _ = try client.negotiate()
        client.send(client.request(type: 1, cookie: 9, offset: (1 << 20) - 512, length: 1024) + [UInt8](repeating: 1, count: 1024))
        #expect(client.replyError(cookie: 9) == 28)
        client.send(client.request(type: 3, cookie: 10, offset: 0, length: 0))
        #expect(client.replyError(cookie: 10) == 0)
        #expect(try Harness.sha(disk) == before)
        #expect((try FileManager.default.attributesOfItem(atPath: disk)[.size] as? Int) == 1 << 20)
    }
}

func be16(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func be32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func be64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.bigEndian, Array.init) }
func u16(_ b: [UInt8], _ at: Int) -> UInt16 { b[at..<at + 2].reduce(0) { $0 << 8 | UInt16($1) } }
func u32(_ b: [UInt8], _ at: Int) -> UInt32 { b[at..<at + 4].reduce(0) { $0 << 8 | UInt32($1) } }
func u64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }

/// xorshift: reproducible fuzz input.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// Connecting out (an NBD backend, a replica through the broker) gives up at a deadline
/// when the peer never answers, instead of the kernel's minutes of SYN retries.
@Suite("connect deadline")
struct ConnectDeadlineTests {
    @Test func aTCPConnectToAPeerThatNeverAnswersGivesUpAtItsDeadline() throws {
        // A loopback listener that never accepts, its queue one deep: once the queue is
        // full the kernel drops further SYNs, as a vanished host would.
        let (listener, port) = Harness.loopbackListener()
        defer { close(listener) }
        listen(listener, 0)
        var queued: [Int32] = []
        defer { queued.forEach { close($0) } }
        var timedOut: (seconds: Double, error: SystemError)?
        for _ in 0..<8 where timedOut == nil {
            let started = Date()
            do {
                queued.append(try Sockets.connectTCP(host: "127.0.0.1", port: port, timeout: 0.5))
            } catch {
                timedOut = (Date().timeIntervalSince(started), error)
            }
        }
        let outcome = try #require(timedOut, "the listener's queue never filled")
        #expect(outcome.error.code == ETIMEDOUT, "\(outcome.error)")
        #expect(outcome.seconds >= 0.4 && outcome.seconds < 3, "gave up after \(outcome.seconds) s")
    }
}
