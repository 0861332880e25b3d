import Foundation
import IOFilterHost
import IOFilterModel
import IOFilterPosix
import Logging
import Testing

/// The supervised-process core as iofilterd and `iofilter serve` use it (a VMSession):
/// a real worker killed with SIGKILL, restarted on the same socket with the backoff its
/// restart policy says, and the wait each exit names is the one taken.
@Suite("supervisor")
struct SupervisorTests {
    @Test func killedWorkersComeBackWithTheBackoffTheirEventsName() throws {
        let directory = Harness.temporaryDirectory("supervisor")
        let disk = directory.appendingPathComponent("d.img").path
        #expect(FileManager.default.createFile(atPath: disk, contents: nil) && truncate(disk, 16 << 20) == 0)
        let configuration = WorkerConfiguration(
            vmName: "supervised-\(getpid())", stateDirectory: directory.appendingPathComponent("state").path,
            disks: [DiskConfiguration(name: "d", backend: .file(path: disk), readOnly: false, filters: [], listenFD: -1)],
            logLevel: "warning")
        let socket = directory.appendingPathComponent("d.sock").path
        let events = Guarded<[String]>([])
        let session = VMSession(
            configuration: configuration, listeners: [try .unix(disk: "d", path: socket)], logger: Logger(label: "test.supervisor"),
            daemonChannels: nil
        ) { kind, message in events.withLock { $0.append("\(kind.rawValue): \(message)") } }
        // Long enough that no start on a loaded machine counts as stable by accident.
        session.supervisor.restartPolicy.stableAfter = 10
        try session.start()
        defer { session.stop() }
        let uri = try #require(session.uri("d"))
        _ = try Harness.qemuIO(uri, ["write -P 7 0 64k"])

        /// Kills the serving worker and waits for its successor; returns the exit's event.
        func killAndAwaitSuccessor() throws -> String {
            let generation = session.supervisor.generation
            let pid = try #require(session.supervisor.pid)
            kill(pid, SIGKILL)
            #expect(session.supervisor.waitUntilReady(after: generation, timeout: 30))
            #expect(session.supervisor.pid != pid)
            return events.withLock { $0.last { $0.hasPrefix("worker-exited") } } ?? "no worker-exited event: \(events.withLock { $0 })"
        }

        let first = try killAndAwaitSuccessor()
        #expect(first.contains("killed by SIGKILL") && first.hasSuffix("restarting in 0.1s"), "\(first)")
        let second = try killAndAwaitSuccessor()
        #expect(second.hasSuffix("restarting in 0.2s"), "\(second)")
        // A worker that ran longer than `stableAfter` starts the backoff afresh, and the
        // event says so (it used to name the doubled wait it did not take).
        sleep(11)
        let third = try killAndAwaitSuccessor()
        #expect(third.hasSuffix("restarting in 0.1s"), "\(third)")
        #expect(session.supervisor.restarts == 3)
        #expect(events.withLock { $0.filter { $0.hasPrefix("worker-restarted") }.count } == 3)
        // The same socket serves what was written before the kills.
        #expect(try Harness.qemuIO(uri, ["read -P 7 0 64k"]).contains("read 65536/65536"))
    }
}
