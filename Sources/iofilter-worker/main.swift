// iofilter-worker — the sandboxed process that loads plug-ins.
//
//   iofilter-worker serve                   serve a VM's disks; configuration as JSON on
//                                           stdin, listening sockets as fds 3, 4, …;
//                                           prints READY on stdout once serving
//   iofilter-worker daemon                  run a plug-in's partner daemon; configuration
//                                           as JSON on stdin, its channel listener as fd 3
//   iofilter-worker validate PLUGIN.so      print the plug-in's manifest as JSON
//   iofilter-worker call PLUGIN.so OP ARG…  call a management operation, print the result
//
// It is started by the host (never by hand) and confines itself before any plug-in
// code runs: whatever a plug-in does, only this process suffers.
import FoundationEssentials
import Glibc
import IOFilterChain
import IOFilterWorkerRuntime
import IOFilterLogging
import IOFilterModel
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPluginLoader
import IOFilterPosix
import IOFilterSandbox
import IOFilterWire
import Logging

let arguments = Array(CommandLine.arguments.dropFirst())
let mode = arguments.first ?? ""
StandardErrorLogging.bootstrap()
var logger = Logger(label: "iofilter.worker")

/// One line to the host on stdout (READY, ERROR …, DONE, or a JSON answer).
func say(_ line: String) {
    try? FileDescriptorIO.writeAll(STDOUT_FILENO, Array((line + "\n").utf8))
}

/// Ends a worker that could not open its disks or plug-ins; the host reads the ERROR
/// line to tell its caller why.
@MainActor func cannotStart(_ error: any Error) -> Never {
    logger.critical("cannot start: \(error)")
    say("ERROR \(error)")
    exit(72)
}

func emit(_ value: some Encodable) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    say((try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}")
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

/// Confines this process (see `Sandbox`); a worker that cannot be confined does not run.
@MainActor func confine(_ configure: (inout Sandbox) -> Void) {
    var sandbox = Sandbox()
    configure(&sandbox)
    do {
        _ = try sandbox.apply(logger: logger)
    } catch {
        logger.critical("\(error)")
        say("ERROR \(error)")
        exit(70)
    }
}

/// Validating or calling a plug-in runs its code: the same confinement as serving,
/// with nothing to read or write but the plug-in itself.
@MainActor func confineForOneCall(plugin path: String) {
    confine {
        $0.readExecutePaths = [path]
        $0.identity = identity(WorkerIdentity(for: "validator"))
        $0.denySockets = true
    }
}

func identity(_ identity: WorkerIdentity) -> (uid: UInt32, gid: UInt32) { (identity.uid, identity.gid) }

/// The path with links and `..` resolved (when it exists): the worker's private root
/// shows each file at its real path, and nothing of the way to it.
func absolute(_ path: String) -> String {
    if let resolved = realpath(path, nil) {
        defer { free(resolved) }
        return String(cString: resolved)
    }
    return path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

/// The configuration the host wrote on standard input; a process without one does not run.
@MainActor func readConfiguration<T: Decodable>(_ type: T.Type, for mode: String) -> T {
    let input = (try? FileDescriptorIO.readToEnd(STDIN_FILENO)) ?? []
    guard let configuration = try? JSONDecoder().decode(T.self, from: Data(input)) else {
        logger.critical("\(mode): no valid configuration on standard input")
        exit(64)
    }
    return configuration
}

/// Waits until the host has moved this process into its cgroup (it must be there
/// before it makes its pid namespace); false if there is none or it never came.
@MainActor func joinedCgroup(_ files: [String]?, what: String) -> Bool {
    guard let files else { return false }
    let joined = CgroupMembership.wait(until: files, contain: getpid(), seconds: 5)
    if !joined { logger.warning("the host did not move this \(what) into its cgroup: limits fall back on RLIMIT_AS") }
    return joined
}

/// Answers the host's control requests until the host closes the channel.
func serveControl(fd: Int32, runtime: WorkerRuntime) {
    startThread(name: "control") {
        ControlChannel(fd: fd).serve { request in
            var response = WorkerControlResponse()
            switch request {
            case .stats:
                response.disks = runtime.statistics()
            case .call(let plugin, let operation, let arguments):
                do {
                    response.result = try runtime.call(plugin: plugin, operation: operation, arguments: arguments)
                } catch {
                    response.error = "\(error)"
                }
            case .event(let disk, let event):
                do {
                    try runtime.deliver(event, disk: disk)
                } catch {
                    response.error = "\(error)"
                }
            }
            return response
        }
    }
}

switch mode {
case "validate" where arguments.count == 2:
    let path = absolute(arguments[1])
    confineForOneCall(plugin: path)
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
    confineForOneCall(plugin: path)
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
    var configuration = readConfiguration(WorkerConfiguration.self, for: "serve")
    logger = Logger(label: "iofilter.worker")
    logger[metadataKey: "vm"] = "\(configuration.vmName)"
    let signals = TerminationSignals.block()

    configuration.stateDirectory = absolute(configuration.stateDirectory)
    var ownDirectories = [configuration.stateDirectory]
    for index in configuration.disks.indices {
        for filter in configuration.disks[index].filters.indices {
            configuration.disks[index].filters[filter].manifest.path = absolute(configuration.disks[index].filters[filter].manifest.path)
        }
        if let directory = configuration.disks[index].stateDirectory {
            configuration.disks[index].stateDirectory = absolute(directory)
            ownDirectories.append(absolute(directory))
        }
    }
    for directory in ownDirectories {
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }
    let handedOver = configuration.disks.map(\.listenFD) + [configuration.controlFD, configuration.heartbeatFD, configuration.brokerFD].compactMap { $0 }
    if configuration.sandbox { Sandbox.closeInheritedFDs(keepingBelow: max(handedOver.max() ?? 2, 2) + 1) }
    let runtime = WorkerRuntime(configuration: configuration, logger: logger)
    do {
        // Disks first: once confined, the worker has no path to them and no network.
        try runtime.openBackends()
    } catch {
        cannotStart(error)
    }
    // TLS credentials too: their files are not in the confined view.
    var tls: NBDTLS?
    if let settings = configuration.tls {
        do {
            if let file = settings.pskFile {
                tls = try .psk(file: file)
            } else if let directory = settings.certificatesDirectory {
                tls = try .certificates(directory: directory, verifyPeer: settings.verifyPeer)
            }
        } catch {
            cannotStart(error)
        }
    }
    // The cgroup that limits this worker and everything it will ever be (its pid
    // namespace's init included): the supervisor moves it there while it starts, and
    // it must be there before it makes its pid namespace.
    let inCgroup = joinedCgroup(configuration.cgroupProcs, what: "worker")
    if configuration.sandbox {
        let memoryLimit = configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit
        confine {
            $0.readWritePaths = ownDirectories
            $0.readExecutePaths = configuration.disks.flatMap { $0.filters.map(\.manifest.path) }
            $0.keepFDsBelow = nil  // closed above, before the disks were opened
            $0.pinnedFDs = configuration.disks.map(\.listenFD).filter { $0 >= 0 }
            // The cgroup limits memory as the kernel accounts it; an address-space limit
            // would only refuse a filter's large but harmless reservations.
            $0.addressSpaceLimit = inCgroup ? nil : memoryLimit
            $0.hiddenPaths = configuration.hiddenPaths ?? []
            $0.identity = identity(configuration.identity ?? WorkerIdentity(for: configuration.vmName))
            $0.ownPidNamespace = true
            // Targets come through the host's broker; without one (a host that
            // predates it) the filters open their own.
            $0.denySockets = configuration.brokerFD != nil
        }
        if inCgroup, let summary = configuration.cgroupSummary {
            logger.notice("this worker is limited by its \(summary)")
        } else {
            logger.notice("no cgroup for this worker: its memory is limited by RLIMIT_AS to \(memoryLimit >> 20) MiB")
        }
    }
    guard chdir(configuration.stateDirectory) == 0 else {
        logger.critical("cannot enter state directory \(configuration.stateDirectory): \(String(cString: strerror(errno)))")
        exit(71)
    }
    let exports: [ChainExport]
    do {
        try runtime.loadPlugins()
        exports = try runtime.openDisks(attachOnly: configuration.task == .attach)
    } catch {
        cannotStart(error)
    }
    switch configuration.task {
    case .serve:
        break
    case .attach, .detach, .event:
        // A maintenance run: the filters are attached by now; detach what was asked, or
        // deliver the event.
        var status: Int32 = 0
        if case .detach(let plugins) = configuration.task {
            do {
                try runtime.detach(plugins: Set(plugins))
            } catch {
                logger.error("cannot detach: \(error)")
                say("ERROR \(error)")
                status = 73
            }
        }
        if case .event(let event) = configuration.task {
            do {
                try runtime.deliver(event, disk: nil)
            } catch {
                say("ERROR \(error)")
                if case .vetoed = error { status = WorkerTask.vetoedExitStatus } else { status = 73 }
            }
        }
        runtime.shutdown()
        if status == 0 { say("DONE") }
        exit(status)
    }
    var servers: [NBDServer] = []
    for (disk, export) in zip(configuration.disks, exports) {
        var limits = NBDServerLimits()
        if let maxConnections = configuration.maxConnections { limits.maxConnections = maxConnections }
        if let handshakeSeconds = configuration.handshakeSeconds { limits.handshakeSeconds = handshakeSeconds }
        if let structuredReplies = configuration.structuredReplies { limits.structuredReplies = structuredReplies }
        let server = NBDServer(catalog: ChainCatalog(exports: [export]), limits: limits, tls: tls, logger: logger)
        server.serve(listenFD: disk.listenFD)
        servers.append(server)
    }
    if let controlFD = configuration.controlFD { serveControl(fd: controlFD, runtime: runtime) }
    runtime.startWatchdog()
    // The supervisor's watch, which a filter cannot switch off from in here: if this
    // beat stops (the process frozen, deadlocked, its threads stopped), it kills us.
    let heartbeat = configuration.heartbeatFD.flatMap { try? Heartbeat(inherited: $0) }
    heartbeat?.startBeating()
    say("READY")
    let received = signals.wait()
    // In order: no new clients, every connection answers what it accepted and ends,
    // and only then are filters closed (never while a request runs in one of them).
    logger.info("signal \(received): finishing requests, then closing filters and disks")
    for server in servers { server.stop() }
    runtime.shutdown()
    withExtendedLifetime(heartbeat) {}
    exit(0)

case "daemon" where arguments.count == 1:
    var configuration = readConfiguration(DaemonConfiguration.self, for: "daemon")
    logger = Logger(label: "iofilter.daemon")
    logger[metadataKey: "plugin"] = "\(configuration.plugin.name)"
    let signals = TerminationSignals.block()
    configuration.stateDirectory = absolute(configuration.stateDirectory)
    configuration.plugin.path = absolute(configuration.plugin.path)
    try? FileManager.default.createDirectory(atPath: configuration.stateDirectory, withIntermediateDirectories: true)
    let listeners = [configuration.channelFD] + [configuration.peerFD].compactMap { $0 }
    let handedOver = listeners + [configuration.brokerFD, configuration.heartbeatFD].compactMap { $0 }
    if configuration.sandbox { Sandbox.closeInheritedFDs(keepingBelow: max(handedOver.max() ?? 2, 2) + 1) }
    let inCgroup = joinedCgroup(configuration.cgroupProcs, what: "daemon")
    if configuration.sandbox {
        // A worker's confinement: its own directory, its plug-in, the sockets it was
        // handed; no network but those and what the host's broker opens for it.
        confine {
            $0.readWritePaths = [configuration.stateDirectory]
            $0.readExecutePaths = [configuration.plugin.path]
            $0.keepFDsBelow = nil
            $0.pinnedFDs = listeners
            $0.addressSpaceLimit = inCgroup ? nil : configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit
            $0.hiddenPaths = configuration.hiddenPaths ?? []
            $0.identity = identity(configuration.identity ?? WorkerIdentity(for: "daemon:" + configuration.plugin.name))
            $0.ownPidNamespace = true
            $0.denySockets = configuration.brokerFD != nil
        }
    }
    guard chdir(configuration.stateDirectory) == 0 else {
        logger.critical("cannot enter state directory \(configuration.stateDirectory): \(String(cString: strerror(errno)))")
        exit(71)
    }
    let plugin: LoadedPlugin
    do {
        plugin = try DaemonRuntime.load(configuration)
    } catch {
        cannotStart(error)
    }
    let heartbeat = configuration.heartbeatFD.flatMap { try? Heartbeat(inherited: $0) }
    heartbeat?.startBeating()
    let daemonLogger = logger
    startThread(name: "signals") {
        let received = signals.wait()
        daemonLogger.info("signal \(received): stopping the daemon")
        exit(0)
    }
    say("READY")
    let status = DaemonRuntime.run(plugin, channelFD: configuration.channelFD)
    logger.notice("daemon_main returned \(status)")
    withExtendedLifetime(heartbeat) {}
    exit(status == 0 ? 0 : 1)

default:
    try? FileDescriptorIO.writeAll(STDERR_FILENO, Array("usage: iofilter-worker serve | daemon | validate PLUGIN.so | call PLUGIN.so OP [ARG...]\n(started by iofilter and iofilterd; not meant to be run by hand)\n".utf8))
    exit(64)
}
