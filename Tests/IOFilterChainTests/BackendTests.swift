@preconcurrency import CIOFilter
import Foundation
import Glibc
import IOFilterPosix
import Testing

@testable import IOFilterBackends
@testable import IOFilterChain

/// Backends take whatever a filter may legally ask of them — a range of any length
/// within the disk — without trapping, and carry it out.
@Suite("storage backends")
struct BackendTests {
    /// A submit_below from the top filter, waited for.
    func submitBelow(_ chain: TestChain, _ op: iof_op, offset: UInt64, length: UInt64,
                     buffer: UnsafeMutableRawPointer?, flags: UInt32 = 0) -> Int32? {
        let waiter = Completion()
        let arg = Unmanaged.passRetained(waiter).toOpaque()
        let rc = HostServices.table.pointee.submit_below!(
            chain.chain.filters[0].hostDisk, op, flags, offset, length, buffer,
            { arg, error in Unmanaged<Completion>.fromOpaque(arg!).takeRetainedValue().complete(error) }, arg)
        guard rc == 0 else {
            Unmanaged<Completion>.fromOpaque(arg).release()
            return rc
        }
        return waiter.wait(timeout: 120)
    }

    @Test("an NBD backend splits requests larger than one NBD request may be")
    func nbdBackendSplitsLargeRequests() throws {
        // nbdkit's memory plugin: a sparse 6 GiB disk. Started as a daemon (it forks once
        // its socket is listening) and stopped through its pid file.
        let socket = "/tmp/iofilter-backendtest-\(getpid()).sock", pidFile = socket + ".pid"
        #expect(system("nbdkit -U \(socket) -P \(pidFile) memory 6G") == 0)
        defer {
            if let text = try? String(contentsOfFile: pidFile, encoding: .utf8), let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)) {
                kill(pid, SIGTERM)
            }
            unlink(socket)
            unlink(pidFile)
        }
        let backend = try NBDBackend(uri: "nbd+unix:///?socket=\(socket)", logger: LogRecord().logger)
        let chain = try TestChain([ScriptedFilter("top"), ScriptedFilter("below")], storage: backend)

        // 40 MiB, more than the 32 MiB an NBD request may carry, written and read back.
        let length = 40 << 20
        let data = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        let back = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        defer {
            data.deallocate()
            back.deallocate()
        }
        for index in 0..<(length / 8) { data.storeBytes(of: UInt64(index) &* 0x9e37_79b9_7f4a_7c15, toByteOffset: index * 8, as: UInt64.self) }
        let offset: UInt64 = 5 << 30
        #expect(submitBelow(chain, IOF_OP_WRITE, offset: offset, length: UInt64(length), buffer: data) == 0)
        #expect(submitBelow(chain, IOF_OP_READ, offset: offset, length: UInt64(length), buffer: back) == 0)
        #expect(memcmp(data, back, length) == 0)
        // 5 GiB of zeroes: a length that does not fit NBD's 32-bit field.
        #expect(submitBelow(chain, IOF_OP_WRITE_ZEROES, offset: 0, length: 5 << 30, buffer: nil) == 0)
        memset(back, 0xff, 4096)
        #expect(submitBelow(chain, IOF_OP_READ, offset: (5 << 30) - 4096, length: 4096, buffer: back) == 0)
        #expect((0..<4096).allSatisfy { back.load(fromByteOffset: $0, as: UInt8.self) == 0 })
        // FUA on a split write still completes (each piece, then one flush).
        #expect(submitBelow(chain, IOF_OP_WRITE, offset: offset, length: UInt64(length), buffer: data, flags: UInt32(IOF_REQ_FUA)) == 0)
    }
}
