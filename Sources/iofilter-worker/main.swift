// iofilter-worker — the sandboxed process that loads plug-ins.
//
//   iofilter-worker serve                   serve a VM's disks; configuration as JSON on
//                                           stdin, listening sockets as fds 3, 4, …;
//                                           prints READY on stdout once serving
//   iofilter-worker validate PLUGIN.so      print the plug-in's manifest as JSON
//   iofilter-worker call PLUGIN.so OP ARG…  call a management operation, print the result
//
// It is started by the host (never by hand) and confines itself before any plug-in
// code runs: whatever a plug-in does, only this process suffers.
import Foundation
import IOFilterChain
import IOFilterLogging
import IOFilterModel
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPluginLoader
import IOFilterPosix
import IOFilterSandbox
import Logging

let arguments = Array(CommandLine.arguments.dropFirst())
let mode = arguments.first ?? ""
StandardErrorLogging.bootstrap()
var logger = Logger(label: "iofilter.worker")

func emit(_ value: some Encodable) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    let data = (try? encoder.encode(value)) ?? Data("{}".utf8)
    FileHandle.standardOutput.write(data + Data("\n".utf8))
}

struct Failure: Encodable {
    let error: String
    let detail: ValidationError?
    init(_ error: ValidationError) {
        self.error = error.description
        self.detail = error
    }
    init(message: String) {
        self.error = message
        self.detail = nil
    }
}
struct CallResult: Encodable { let type: String; let value: String }

@MainActor func confine(readExecute: [String], readWrite: [String], keepFDsBelow: Int32, pinned: [Int32] = [],
                         memoryLimit: UInt64? = nil, hidden: [String] = []) {
    var sandbox = Sandbox()
    sandbox.hiddenPaths = hidden
    sandbox.pinnedFDs = pinned
    sandbox.addressSpaceLimit = memoryLimit
    sandbox.readExecutePaths = readExecute
    sandbox.readWritePaths = readWrite
    sandbox.keepFDsBelow = keepFDsBelow
    do {
        _ = try sandbox.apply(logger: logger)
    } catch {
        logger.critical("\(error)")
        exit(70)
    }
}

func absolute(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

/// Answers the host's control requests, one JSON line each way, until the host closes
/// the channel.
func serveControl(fd: Int32, runtime: WorkerRuntime) {
    startThread(name: "control") {
        let input = FileHandle(fileDescriptor: fd, closeOnDealloc: false)
        var pending = Data()
        while true {
            guard let newline = pending.firstIndex(of: UInt8(ascii: "\n")) else {
                let chunk = input.availableData
                if chunk.isEmpty { return }
                pending += chunk
                continue
            }
            let line = pending[pending.startIndex..<newline]
            pending = Data(pending[(newline + 1)...])
            var response = WorkerControlResponse()
            switch try? JSONDecoder().decode(WorkerControlRequest.self, from: line) {
            case .stats:
                response.disks = runtime.statistics()
            case .call(let plugin, let operation, let arguments):
                do {
                    response.result = try runtime.call(plugin: plugin, operation: operation, arguments: arguments)
                } catch {
                    response.error = "\(error)"
                }
            case nil:
                response.error = "malformed control request"
            }
            let data = (try? JSONEncoder().encode(response)) ?? Data("{}".utf8)
            guard (try? FileDescriptorIO.writeAll(fd, Array(data) + [UInt8(ascii: "\n")])) != nil else { return }
        }
    }
}

switch mode {
case "validate" where arguments.count == 2:
    let path = absolute(arguments[1])
    confine(readExecute: [path], readWrite: [], keepFDsBelow: 3)
    do {
        let library = try PluginLibrary(path: path)
        emit(library.manifest)
        exit(0)
    } catch {
        emit(Failure(error))
        exit(2)
    }

case "call" where arguments.count >= 3:
    let path = absolute(arguments[1])
    confine(readExecute: [path], readWrite: [], keepFDsBelow: 3)
    do {
        let plugin = LoadedPlugin(library: try PluginLibrary(path: path))
        try plugin.load()
        let operation = plugin.library.manifest.operation(named: arguments[2])
        let value = try plugin.library.callManagementOperation(arguments[2], arguments: Array(arguments.dropFirst(3)))
        emit(CallResult(type: operation?.returnType.rawValue ?? "void", value: value.description))
        exit(0)
    } catch let error as ValidationError {
        emit(Failure(error))
        exit(2)
    } catch {
        emit(Failure(message: "\(error)"))
        exit(2)
    }

case "serve" where arguments.count == 1:
    let input = FileHandle.standardInput.readDataToEndOfFile()
    guard let configuration = try? JSONDecoder().decode(WorkerConfiguration.self, from: input) else {
        logger.critical("serve: no valid configuration on standard input")
        exit(64)
    }
    logger = Logger(label: "iofilter.worker")
    logger[metadataKey: "vm"] = "\(configuration.vmName)"
    let signals = TerminationSignals.block()

    let inheritedFDs = configuration.disks.map(\.listenFD) + (configuration.controlFD.map { [$0] } ?? [])
        + (configuration.heartbeatFD.map { [$0] } ?? [])
    if configuration.sandbox {
        var readWrite = [configuration.stateDirectory]
        var readExecute: [String] = []
        for disk in configuration.disks {
            if case .file(let path) = disk.backend { readWrite.append(path) }
            if let directory = disk.stateDirectory {
                try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
                readWrite.append(directory)
            }
            readExecute += disk.filters.map(\.manifest.path)
            for path in disk.filters.flatMap(\.filePaths) {
                // A file that does not exist yet can only be granted through its directory.
                readWrite.append(FileManager.default.fileExists(atPath: path) ? path : (path as NSString).deletingLastPathComponent)
            }
        }
        try? FileManager.default.createDirectory(atPath: configuration.stateDirectory, withIntermediateDirectories: true)
        confine(readExecute: readExecute, readWrite: readWrite, keepFDsBelow: max(inheritedFDs.max() ?? 2, 2) + 1,
                pinned: configuration.disks.map(\.listenFD).filter { $0 >= 0 },
                memoryLimit: configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit,
                hidden: configuration.hiddenPaths ?? [])
        // No cgroup limits yet (they need cgroup v2 controllers the host can delegate):
        // the rlimit is the fallback, and the log says so.
        logger.notice("no cgroup for this worker: its memory is limited by RLIMIT_AS to \((configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit) >> 20) MiB")
    }
    guard chdir(configuration.stateDirectory) == 0 else {
        logger.critical("cannot enter state directory \(configuration.stateDirectory): \(String(cString: strerror(errno)))")
        exit(71)
    }
    let runtime = WorkerRuntime(configuration: configuration, logger: logger)
    let exports: [ChainExport]
    do {
        try runtime.loadPlugins()
        exports = try runtime.openDisks(attachOnly: configuration.task == .attach)
    } catch {
        logger.critical("cannot start: \(error)")
        // The host reads this line to tell its caller why.
        FileHandle.standardOutput.write(Data("ERROR \(error)\n".utf8))
        exit(72)
    }
    switch configuration.task {
    case .serve:
        break
    case .attach, .detach:
        // A maintenance run: the filters are attached by now; detach what was asked.
        var status: Int32 = 0
        if case .detach(let plugins) = configuration.task {
            do {
                try runtime.detach(plugins: Set(plugins))
            } catch {
                logger.error("cannot detach: \(error)")
                FileHandle.standardOutput.write(Data("ERROR \(error)\n".utf8))
                status = 73
            }
        }
        runtime.shutdown()
        if status == 0 { FileHandle.standardOutput.write(Data("DONE\n".utf8)) }
        exit(status)
    }
    var servers: [NBDServer] = []
    for (disk, export) in zip(configuration.disks, exports) {
        var limits = NBDServerLimits()
        if let maxConnections = configuration.maxConnections { limits.maxConnections = maxConnections }
        if let handshakeSeconds = configuration.handshakeSeconds { limits.handshakeSeconds = handshakeSeconds }
        let server = NBDServer(catalog: ChainCatalog(exports: [export]), limits: limits, logger: logger)
        server.serve(listenFD: disk.listenFD)
        servers.append(server)
    }
    if let controlFD = configuration.controlFD { serveControl(fd: controlFD, runtime: runtime) }
    runtime.startWatchdog()
    // The supervisor's watch, which a filter cannot switch off from in here: if this
    // beat stops (the process frozen, deadlocked, its threads stopped), it kills us.
    let heartbeat = configuration.heartbeatFD.flatMap { try? Heartbeat(inherited: $0) }
    heartbeat?.startBeating()
    FileHandle.standardOutput.write(Data("READY\n".utf8))
    let received = signals.wait()
    // In order: no new clients, every connection answers what it accepted and ends,
    // and only then are filters closed (never while a request runs in one of them).
    logger.info("signal \(received): finishing requests, then closing filters and disks")
    for server in servers { server.stop() }
    runtime.shutdown()
    withExtendedLifetime(heartbeat) {}
    exit(0)

default:
    FileHandle.standardError.write(Data("usage: iofilter-worker serve | validate PLUGIN.so | call PLUGIN.so OP [ARG...]\n(started by iofilter and iofilterd; not meant to be run by hand)\n".utf8))
    exit(64)
}
