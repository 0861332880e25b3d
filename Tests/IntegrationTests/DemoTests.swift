import Foundation
import Testing

/// The README's main job: `iofilterd --demo` prints an NBD URI that qemu-img can read,
/// served through the sample chain in a sandboxed worker.
@Suite("demo")
struct DemoTests {
    @Test func bothProgramsTellTheirVersionAndThePluginABI() throws {
        for program in ["iofilter", "iofilterd"] {
            let result = try Harness.run(Harness.binDirectory.appendingPathComponent(program).path, ["--version"])
            #expect(result.status == 0)
            #expect(result.stdout.hasPrefix("0.") && result.stdout.contains("(plug-in ABI 1.7)"), "\(program): \(result.stdout)")
        }
    }

    @Test func logLevelReachesTheHostAndItsWorkers() throws {
        let directory = Harness.temporaryDirectory("loglevel")
        let disk = Harness.makeImage(directory.appendingPathComponent("quiet.img").path, size: 1 << 20)
        let quiet = try ServedDisk([disk, "--log-level", "warning", "--socket", directory.appendingPathComponent("q.sock").path])
        #expect(try Harness.qemuIO(quiet.uri, ["read 0 4096"]).contains("read 4096/4096"))
        usleep(300_000)  // the log is read as it comes
        #expect(!quiet.log.contains(" info ") && !quiet.log.contains(" notice "), "warning and above only: \(quiet.log)")
        quiet.stop()
        let chatty = try ServedDisk([disk, "--log-level", "info", "--socket", directory.appendingPathComponent("c.sock").path])
        defer { chatty.stop() }
        #expect(chatty.waitForLog("is serving") && chatty.waitForLog("notice iofilter.worker"), "\(chatty.log)")
        let wrong = try Harness.run(Harness.iofilter, ["serve", disk, "--log-level", "loud"])
        #expect(wrong.status != 0 && wrong.stderr.contains("none of trace, debug, info"))
    }

    /// Starts `iofilterd --demo` and reads the URI it prints; stop the process when done.
    static func startDemo(_ executable: String, state: URL, size: String) throws -> (Process, ReadAll, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = ["--demo", "--state-dir", state.path, "--demo-size", size]
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let errors = ReadAll(err.fileHandleForReading)
        var line = Data()
        var byte: UInt8 = 0
        while read(out.fileHandleForReading.fileDescriptor, &byte, 1) == 1 && byte != UInt8(ascii: "\n") { line.append(byte) }
        return (process, errors, String(decoding: line, as: UTF8.self))
    }

    @Test func theDemoServesItsDiskThroughTheSampleChain() throws {
        let state = Harness.temporaryDirectory("demo")
        let (process, errors, uri) = try Self.startDemo(Harness.binDirectory.appendingPathComponent("iofilterd").path, state: state, size: "64M")
        defer {
            process.terminate()
            process.waitUntilExit()
        }
        #expect(uri.hasPrefix("nbd+unix:///demo-disk?socket="), "no URI; log: \(errors.snapshot())")
        let info = try Harness.check(Harness.tool("qemu-img"), ["info", "--output=json", uri])
        #expect(info.contains("\"virtual-size\": 67108864"))
        #expect(try Harness.qemuIO(uri, ["write -P 0xab 0 1M", "flush", "read -P 0xab 0 1M"]).contains("read 1048576/1048576"))
        let log = errors.snapshot()
        #expect(log.contains("org.swift-iofilter.passthrough-c -> org.swift-iofilter.replication -> org.swift-iofilter.cache"))

        // The demo is ordinary state: a policy, a disk and a VM the CLI can inspect.
        let socket = state.appendingPathComponent("api.sock").path
        #expect(try Harness.check(Harness.iofilter, ["disk", "compliance", "demo-disk", "--socket", socket]) == "compliant\n")
        let show = try Harness.check(Harness.iofilter, ["vm", "show", "demo", "--socket", socket])
        #expect(show.contains("demo  running, worker pid"))
        #expect(show.contains("org.swift-iofilter.passthrough-c 1.0.0 [inspection]: failures=0"))
        #expect(show.contains("write_requests=") && !show.contains("write_requests=0 "), "\(show)")
        #expect(try Harness.check(Harness.iofilter, ["policy", "show", "demo", "--socket", socket]).contains("target={state}/replicas/{disk}.replica.img"))
    }
}
