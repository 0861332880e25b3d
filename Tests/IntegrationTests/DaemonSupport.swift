import Foundation
import IOFilterAPI
import IOFilterHTTP
import Testing

/// A real iofilterd on a state directory of its own, driven through the real `iofilter`
/// CLI (and, where a test checks the wire, through raw HTTP on its socket).
final class Daemon: @unchecked Sendable {
    let state: URL
    let extraArguments: [String]
    private(set) var process: Process?
    private var errors: ReadAll?
    var socket: String { state.appendingPathComponent("api.sock").path }

    /// Test daemons install the unsigned builds of the samples and test plug-ins, so
    /// they run at community level unless a test asks for another; they may name files
    /// anywhere in the tests' scratch space unless a test says where.
    /// Runs iofilterd through this (`ip netns exec NS`, which execs it: the process is
    /// iofilterd's own).
    let launcher: [String]

    init(state: URL = Harness.temporaryDirectory("daemon"), arguments: [String] = [], acceptanceLevel: String = "community",
         allowedPaths: [String] = [Harness.scratch.path], launcher: [String] = []) throws {
        self.state = state
        self.launcher = launcher
        self.extraArguments = ["--acceptance-level", acceptanceLevel] + allowedPaths.flatMap { ["--allow-path", $0] } + arguments
        try start()
    }

    /// A test that ends with the host killed leaves its VMs' workers serving (they
    /// outlive their host, for the next one to adopt): nothing of it may outlive the test.
    deinit {
        stop()
        // A host that crashed says so in its own log, which a test sees only the end of.
        if log.contains(" crashed:") {
            let kept = state.deletingLastPathComponent().appendingPathComponent("crashed-iofilterd-\(UUID().uuidString).log").path
            try? log.write(toFile: kept, atomically: true, encoding: .utf8)
            print("iofilterd on \(state.path) crashed; its whole log: \(kept)")
        }
        Self.killWorkers(of: state)
    }

    /// Kills every worker and daemon process an iofilterd on `state` started: those it
    /// recorded for its successor, and any other with its working directory there.
    static func killWorkers(of state: URL) {
        let records = state.appendingPathComponent("run/workers")
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: records.path)) ?? [] where entry.hasSuffix(".record") {
            if let data = FileManager.default.contents(atPath: records.appendingPathComponent(entry).path),
               let record = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let pid = record["pid"] as? Int {
                Glibc.kill(pid_t(pid), SIGKILL)
            }
        }
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry),
                  let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"),
                  executable.hasSuffix("iofilter-worker"),
                  let directory = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"),
                  directory.hasPrefix(state.path) else { continue }
            Glibc.kill(pid, SIGKILL)
        }
    }

    /// Starts iofilterd and waits until its API answers.
    func start(_ more: [String] = []) throws {
        let process = Process()
        let iofilterd = Harness.binDirectory.appendingPathComponent("iofilterd")
        process.executableURL = launcher.first.map { URL(fileURLWithPath: $0) } ?? iofilterd
        process.arguments = launcher.dropFirst() + (launcher.isEmpty ? [] : [iofilterd.path]) + ["--state-dir", state.path] + extraArguments + more
        let err = Pipe()
        process.standardOutput = FileHandle.nullDevice
        process.standardError = err
        try process.run()
        self.process = process
        errors = ReadAll(err.fileHandleForReading)
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            if process.isRunning == false { throw HarnessError("iofilterd exited: \(log)") }
            if FileManager.default.fileExists(atPath: socket), (try? cli(["vm", "list"]).status) == 0 { return }
            usleep(50_000)
        }
        throw HarnessError("iofilterd did not answer within 60s: \(log)")
    }

    var log: String { errors?.snapshot() ?? "" }

    /// SIGQUIT: iofilterd ends and leaves its VMs' workers and daemons serving.
    func leave() { kill(SIGQUIT) }

    /// SIGTERM: the graceful stop.
    func stop() {
        guard let process, process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
        self.process = nil
    }

    func kill(_ signal: Int32) {
        guard let process, process.isRunning else { return }
        Glibc.kill(process.processIdentifier, signal)
        process.waitUntilExit()
        self.process = nil
    }

    /// Runs `iofilter ARGS --socket …`.
    @discardableResult
    func cli(_ arguments: [String], timeout: Double = 120) throws -> Harness.Output {
        try Harness.run(Harness.iofilter, arguments + ["--socket", socket], timeout: timeout)
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    /// `allowing` lists other exit statuses that are answers, not failures (`iofilter
    /// health` exits 2 when something is degraded).
    @discardableResult
    func ok(_ arguments: [String], allowing: [Int32] = []) throws -> String {
        let result = try cli(arguments)
        guard result.status == 0 || allowing.contains(result.status) else {
            throw HarnessError("iofilter \(arguments.joined(separator: " ")) exited \(result.status): \(result.stderr)\ndaemon log:\n\(log.suffix(3000))")
        }
        return result.stdout
    }

    /// Runs a CLI command that must fail; returns its `error:` line.
    func refused(_ arguments: [String]) throws -> String {
        let result = try cli(arguments)
        guard result.status != 0 else { throw HarnessError("iofilter \(arguments.joined(separator: " ")) succeeded: \(result.stdout)") }
        return result.stderr
    }

    /// A CLI command's --json answer, decoded.
    func json<T: Decodable>(_ arguments: [String], as type: T.Type = T.self, allowing: [Int32] = []) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(try ok(arguments + ["--json"], allowing: allowing).utf8))
    }

    /// Raw HTTP on the API socket.
    /// Raw HTTP on the API socket; `target` may carry a query ("/vms/v/history?seconds=60").
    func http(_ method: String, _ target: String, body: String? = nil) throws -> HTTPResponse {
        guard case .success(let (path, query)) = HTTPRequest.parse(target: target) else { throw HarnessError("bad target \(target)") }
        let client = HTTPClient(address: .unix(path: socket))
        return try client.send(HTTPRequest(method: method, path: path, query: query, headers: body == nil ? [:] : ["Content-Type": "application/json"],
                                           body: Array((body ?? "").utf8)))
    }

    static func samplePlugin(_ name: String) -> String {
        Harness.binDirectory.appendingPathComponent("lib\(name).so").path
    }
}
