import Foundation
import Testing

/// Paths and helpers shared by the integration tests: they run the real binaries
/// SwiftPM built next to the test bundle, build real plug-ins with `cc`, and drive
/// real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio).
enum Harness {
    static let repository: URL = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let binDirectory: URL = {
        let me = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var url = URL(fileURLWithPath: me)
        while url.path != "/" && !FileManager.default.fileExists(atPath: url.appendingPathComponent("iofilter").path) {
            url = url.deletingLastPathComponent()
        }
        return url
    }()

    static var iofilter: String { binDirectory.appendingPathComponent("iofilter").path }
    static var worker: String { binDirectory.appendingPathComponent("iofilter-worker").path }

    /// Everything the tests write lives below this folder, removed when the run ends.
    static let scratch: URL = {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("iofilter-tests-\(getpid())")
        atexit { try? FileManager.default.removeItem(at: Harness.scratch) }
        return url
    }()

    static func temporaryDirectory(_ name: String = "t") -> URL {
        let url = scratch
            .appendingPathComponent("\(name)-\(UUID().uuidString.prefix(8))")
        try! FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    /// Builds the test plug-in (Fixtures/testfilter.c) with compile-time knobs.
    /// Builds the hostile test plug-in; `header` is a directory holding the iofilter.h
    /// to build against (default: the current one in include/).
    static func buildTestPlugin(_ name: String, defines: [String] = [], header: String? = nil, in directory: URL) throws -> String {
        try compile(source: repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/testfilter.c").path,
                    output: directory.appendingPathComponent("\(name).so").path, defines: defines, header: header)
    }

    /// promtool (scripts/install-dependencies.sh --tests unpacks it from Debian's
    /// prometheus package when it is not on PATH).
    static let promtool: String? = ["/usr/local/libexec/iofilter-tests/promtool", "/usr/bin/promtool"]
        .first { FileManager.default.isExecutableFile(atPath: $0) }

    /// The header of ABI 1.0, as released: plug-ins built against it must keep loading.
    static let abi10Header = repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.0").path

    /// Builds the C pass-through sample with nothing but cc and the header.
    static func buildPassthrough(in directory: URL) throws -> String {
        try compile(source: repository.appendingPathComponent("Plugins/passthrough-c/passthrough.c").path,
                    output: directory.appendingPathComponent("passthrough-c.so").path, defines: [])
    }

    static func compile(source: String, output: String, defines: [String], header: String? = nil) throws -> String {
        let result = try run("/usr/bin/cc", ["-shared", "-fPIC", "-O1", "-w", "-I", header ?? repository.appendingPathComponent("include").path]
                                + defines.map { "-D\($0)" } + ["-o", output, source, "-lpthread"])
        guard result.status == 0 else { throw HarnessError("cc failed: \(result.stderr)") }
        return output
    }

    struct Output {
        let status: Int32
        let stdout: String
        let stderr: String
    }

    /// Runs a program to completion (killing it after `timeout`).
    @discardableResult
    static func run(_ executable: String, _ arguments: [String], timeout: Double = 120, environment: [String: String]? = nil) throws -> Output {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        // Tools that leave files in their working directory (fio's verify state) leave
        // them in the scratch space.
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
        process.currentDirectoryURL = scratch
        if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let outData = ReadAll(out.fileHandleForReading), errData = ReadAll(err.fileHandleForReading)
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(5_000) }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw HarnessError("\(executable) \(arguments.joined(separator: " ")) timed out after \(timeout)s")
        }
        process.waitUntilExit()
        return Output(status: process.terminationStatus, stdout: outData.text(), stderr: errData.text())
    }

    /// Runs a tool that must succeed; returns its stdout.
    @discardableResult
    static func check(_ executable: String, _ arguments: [String], timeout: Double = 300) throws -> String {
        let result = try run(executable, arguments, timeout: timeout)
        guard result.status == 0 else {
            throw HarnessError("\(executable) \(arguments.joined(separator: " ")) exited \(result.status): \(result.stderr) \(result.stdout)")
        }
        return result.stdout
    }

    static func tool(_ name: String) -> String {
        for directory in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/sbin"] where FileManager.default.isExecutableFile(atPath: "\(directory)/\(name)") {
            return "\(directory)/\(name)"
        }
        return name
    }

    /// An empty (sparse) raw image of `size` bytes.
    static func makeImage(_ path: String, size: Int) -> String {
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        truncate(path, off_t(size))
        return path
    }

    /// Runs qemu-io commands against an NBD URI; fails the test if qemu-io fails.
    static func qemuIO(_ uri: String, _ commands: [String]) throws -> String {
        try check(tool("qemu-io"), ["-f", "raw"] + commands.flatMap { ["-c", $0] } + [uri])
    }

    /// Whether `condition` holds within `seconds` (checked every 0.1 s).
    static func eventually(_ seconds: Double = 30, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return try condition()
    }

    /// Ends a helper process for sure and reaps it (SIGKILL: a child of the test runner
    /// may have inherited SIGTERM ignored).
    static func end(_ process: Process) {
        guard process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    /// `count` libnbd clients that negotiate with `uri` and stay connected until the
    /// returned process is ended (`end`; it has said "ready" by the time this returns).
    static func negotiatedClients(_ uri: String, count: Int) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", """
            import nbd, sys, time
            handles = []
            for _ in range(\(count)):
                h = nbd.NBD(); h.connect_uri(sys.argv[1]); handles.append(h)
            print("ready", flush=True)
            time.sleep(3600)
            """, uri]
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle.nullDevice
        try process.run()
        let line = String(decoding: out.fileHandleForReading.availableData, as: UTF8.self)
        guard line.hasPrefix("ready") else {
            end(process)
            throw HarnessError("\(count) libnbd client(s) could not connect to \(uri)")
        }
        return process
    }

    /// Starts fio's random writes in the background against `uri` (stopped by the caller).
    static func backgroundFio(_ uri: String, offset: String, size: String, seconds: Int) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool("fio"))
        process.arguments = ["--name=background", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--iodepth=8",
                             "--offset=\(offset)", "--size=\(size)", "--time_based", "--runtime=\(seconds)", "--output-format=terse"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        process.currentDirectoryURL = scratch
        try process.run()
        return process
    }

    /// fio's random writes with crc32c verification against `uri`, in the background:
    /// a client that fails if any byte it wrote comes back wrong. Its stderr is kept.
    static func verifyingFio(_ uri: String, loops: Int, in directory: URL) throws -> (process: Process, errors: ReadAll) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool("fio"))
        process.arguments = ["--name=verify", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k", "--size=8M",
                             "--iodepth=8", "--verify=crc32c", "--verify_fatal=1", "--loops=\(loops)", "--output-format=terse"]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        process.currentDirectoryURL = directory
        try process.run()
        return (process, ReadAll(errors.fileHandleForReading))
    }

    /// Writes `size` bytes of reproducible pseudo-random data.
    static func makeRandomFile(_ path: String, size: Int, seed: UInt64) {
        var state = seed | 1
        var bytes = [UInt8](repeating: 0, count: size)
        for index in stride(from: 0, to: size, by: 8) {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            withUnsafeBytes(of: state) { raw in
                for k in 0..<min(8, size - index) { bytes[index + k] = raw[k] }
            }
        }
        _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
    }

    static func sha(_ path: String) throws -> String {
        try check(tool("sha256sum"), [path]).split(separator: " ").first.map(String.init) ?? ""
    }

    /// The fields of a `/proc/…/stat` file after the name, so that index 0 is field 3
    /// (the state). The name may hold spaces and parentheses: it ends at the last ")".
    /// Nil if the process or thread is gone.
    static func statFields(_ path: String) -> [Substring]? {
        guard let stat = try? String(contentsOfFile: path, encoding: .utf8), let close = stat.lastIndex(of: ")") else { return nil }
        return stat[stat.index(after: close)...].split(separator: " ")
    }

    /// Whether `pid` has ended within `seconds` (a zombie counts: in a container nobody
    /// may reap an orphan).
    static func isGone(_ pid: pid_t, within seconds: Double = 5) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            guard let fields = statFields("/proc/\(pid)/stat"), fields.count > 1 else { return true }
            if fields[0] == "Z" { return true }
            usleep(50_000)
        } while Date() < deadline
        return false
    }

    /// A TCP socket listening on 127.0.0.1 at a port the kernel chose, and that port.
    static func loopbackListener() -> (fd: Int32, port: UInt16) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in(sin_family: sa_family_t(AF_INET), sin_port: 0, sin_addr: in_addr(s_addr: inet_addr("127.0.0.1")),
                                  sin_zero: (0, 0, 0, 0, 0, 0, 0, 0))
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        listen(fd, 8)
        return (fd, UInt16(bigEndian: address.sin_port))
    }

    /// A loopback port free a moment ago (for a server the test starts).
    static func freePort() -> UInt16 {
        let (fd, port) = loopbackListener()
        close(fd)
        return port
    }

    /// Child processes of `pid` (the worker under an `iofilter serve`).
    static func children(of pid: pid_t) -> [pid_t] {
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return [] }
        return entries.compactMap { entry -> pid_t? in
            guard let child = pid_t(entry), let fields = statFields("/proc/\(entry)/stat") else { return nil }
            return fields.count > 1 && pid_t(fields[1]) == pid ? child : nil
        }
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Drains a pipe on a background thread so the child never blocks on a full pipe.
final class ReadAll: @unchecked Sendable {
    private let lock = NSLock()
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            while true {
                let chunk = handle.availableData
                if chunk.isEmpty { break }
                lock.withLock { data.append(chunk) }
            }
            done.signal()
        }
    }

    /// All output once the writer has closed its end.
    func text() -> String {
        done.wait()
        return lock.withLock { String(decoding: data, as: UTF8.self) }
    }

    func snapshot() -> String { lock.withLock { String(decoding: data, as: UTF8.self) } }
}

/// An `iofilter serve` process: started, its URI read, stopped on request.
final class ServedDisk: @unchecked Sendable {
    let process = Process()
    let uri: String
    private let stderrReader: ReadAll

    /// - Parameters:
    ///   - executable: the `iofilter` to run (a copy, say, that another user can reach).
    ///   - user: run it as this uid (and gid), through setpriv: an unprivileged host.
    ///   - environment: added to this process's environment.
    init(_ arguments: [String], executable: String = Harness.iofilter, user: UInt32? = nil, timeout: Double = 60,
         environment: [String: String] = [:]) throws {
        if let user {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            process.arguments = ["--reuid", "\(user)", "--regid", "\(user)", "--clear-groups", executable, "serve"] + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = ["serve"] + arguments
        }
        process.environment = ProcessInfo.processInfo.environment.merging(["IOFILTER_LOG_LEVEL": "info"].merging(environment) { $1 }) { $1 }
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        stderrReader = ReadAll(err.fileHandleForReading)
        // The URI is the first line on stdout, printed once the worker serves.
        var line = Data()
        let handle = out.fileHandleForReading
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            var byte: UInt8 = 0
            let n = read(handle.fileDescriptor, &byte, 1)
            if n <= 0 { break }
            if byte == UInt8(ascii: "\n") { break }
            line.append(byte)
        }
        uri = String(decoding: line, as: UTF8.self)
        guard uri.hasPrefix("nbd") else {
            process.terminate()
            process.waitUntilExit()
            throw HarnessError("iofilter serve \(arguments.joined(separator: " ")) printed no URI: \(stderrReader.text())")
        }
    }

    var log: String { stderrReader.snapshot() }

    /// Waits until the log (read asynchronously) contains `text`.
    func waitForLog(_ text: String, timeout: Double = 10) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if log.contains(text) { return true }
            usleep(20_000)
        }
        return false
    }

    /// The worker process the supervisor started (and waits for); not a partner daemon,
    /// its other kind of child.
    var workerPID: pid_t? {
        Harness.children(of: process.processIdentifier).first { pid in
            let arguments = ((try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? "").split(separator: "\0")
            return arguments.dropFirst().first == "serve"
        }
    }
    /// The process that serves: the worker's child, init of its own pid namespace.
    var servingPID: pid_t? { workerPID.flatMap { Harness.children(of: $0).first } }

    /// Waits until a worker other than `old` runs and serves.
    func waitForNewWorker(replacing old: pid_t, timeout: Double = 30) throws -> pid_t {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let pid = workerPID, pid != old, log.contains("worker \(pid) is serving") { return pid }
            usleep(50_000)
        }
        throw HarnessError("no new worker after \(timeout)s; log:\n\(log)")
    }

    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        process.waitUntilExit()
    }

    deinit { stop() }
}
