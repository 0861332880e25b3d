import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterAPIRoutes
import IOFilterControl
import IOFilterHost
import IOFilterLogging
import IOFilterAPIServer
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging
import Metrics
import Prometheus

extension AcceptanceLevel: ExpressibleByArgument {}

/// The host runtime: keeps the host's plug-ins, policies, disks and VMs in SQLite under
/// its state directory, serves the JSON API (`iofilter` is its client) and runs each
/// VM's sandboxed worker. A restart brings back every VM that was running.
@main
struct IOFilterDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iofilterd",
        abstract: "The swift-iofilter host runtime.",
        discussion: """
            Serves a JSON HTTP API on a unix socket (STATE-DIR/api.sock by default; its \
            OpenAPI document is at /openapi.json) and, with --listen, on TCP. Manage it with \
            `iofilter` (plugin, capabilities, policy, disk, vm). SIGTERM or SIGINT stop it \
            gracefully: API requests finish, filters flush and destage, workers stop. The VMs \
            that were running start again with the daemon.

            SIGQUIT (the systemd unit's stop and restart), a crash or kill -9 end the daemon \
            alone: the VMs' workers and the partner daemons go on serving, and the next \
            iofilterd on the same state directory adopts them (their clients see nothing). \
            One that serves another configuration than the new daemon would start is \
            stopped cleanly and started anew.

            With --demo, on first use installs the sample plug-ins, creates the policy \
            'demo' (inspection sample, async replication to a replica file, write-back \
            cache), a disk 'demo-disk' and a VM 'demo'; then starts the VM and prints its \
            NBD URI and a qemu-img command to try it.
            """,
        version: Release.description)

    @Option(help: ArgumentHelp("Log at this level and above: trace, debug, info, notice, warning, error, critical (default: $IOFILTER_LOG_LEVEL, else info). Workers log at the same level.", valueName: "level"))
    var logLevel: String?

    @Option(help: ArgumentHelp("Where the host keeps its state (default: /var/lib/iofilter as root, else ~/.local/state/iofilter).", valueName: "dir"))
    var stateDir: String?

    @Option(help: ArgumentHelp("The API's unix socket (default: STATE-DIR/api.sock).", valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp(
        "Also serve the API on TCP, e.g. 127.0.0.1:8080. Every request needs a token (`iofilter token create`); any address but loopback needs --tls-cert and --tls-key.",
        valueName: "host:port"))
    var listen: String?

    @Option(help: ArgumentHelp("The TLS certificate chain (PEM) for --listen.", valueName: "file"))
    var tlsCert: String?

    @Option(help: ArgumentHelp("The TLS private key (PEM) for --listen.", valueName: "file"))
    var tlsKey: String?

    @Option(help: ArgumentHelp("A host name clients may call --listen by (besides its address); repeat for several. Requests naming any other Host are refused.", valueName: "name"))
    var serverName: [String] = []

    @Option(help: ArgumentHelp(
        "A directory under which requests and policies may name files (imports, exports, replica and cache files, NBD sockets), besides the state directory; repeat for several.",
        valueName: "dir"))
    var allowPath: [String] = []

    @Option(help: ArgumentHelp("Members of this group (name or number) are admins on the unix socket, like root; repeat for several.", valueName: "group"))
    var adminGroup: [String] = []

    @Option(help: ArgumentHelp("Members of this group may also start and stop VMs, take snapshots, export disks and call operations.", valueName: "group"))
    var operatorGroup: [String] = []

    @Option(help: ArgumentHelp("Members of this group may list and show (read-only).", valueName: "group"))
    var readOnlyGroup: [String] = []

    @Option(help: ArgumentHelp(
        "Members of this group may connect to the VMs' disk sockets (NBD and vhost-user-blk), and nothing else: the group QEMU runs in under libvirt (kvm on Debian), or a libvirt session user's; repeat for several.",
        valueName: "group"))
    var guestGroup: [String] = []

    @Option(help: ArgumentHelp(
        "Install only plug-ins at or above this level: \(AcceptanceLevel.choices). A level above an installed plug-in's is refused; lowering it is recorded as an event.",
        valueName: "level"))
    var acceptanceLevel: AcceptanceLevel = .hostDefault

    @Flag(help: "Do not start the VMs that were running when the host stopped (they stay marked running for the next start).")
    var noResume = false

    @Flag(help: "Set up (first time) and start the demo VM, and print its NBD URI.")
    var demo = false

    @Option(help: ArgumentHelp("Size of the demo disk when it is created.", valueName: "size"))
    var demoSize: String = "1G"

    @Option(help: ArgumentHelp("Seconds a request may sit in one filter before its worker is killed.", valueName: "seconds"))
    var watchdog: Double = 30

    @Option(help: ArgumentHelp("The most memory each VM's worker may use (default: three quarters of the host's memory shared by its VMs, from 256M to 8G; a worker past 80 % of its limit is a warning event).", valueName: "size"))
    var workerMemoryLimit: String?

    @Option(help: ArgumentHelp("The longest wait before restarting a worker that keeps crashing (it doubles from 0.1 s).", valueName: "seconds"))
    var restartBackoffMax: Double = 10

    @Option(help: ArgumentHelp(
        "Seconds between samples of the running VMs' figures and health: the history resolution (an hour of it is kept) and how soon a change of health is an event.",
        valueName: "seconds"))
    var sampleInterval: Double = 10

    func validate() throws {
        guard ParameterSpec.parseSize(demoSize) != nil else { throw ValidationError("--demo-size '\(demoSize)' is not a size") }
        if let problem = StandardErrorLogging.problem(withLevel: logLevel) { throw ValidationError(problem) }
        if let listen {
            guard let (host, _) = Sockets.hostPort(listen) else { throw ValidationError("--listen '\(listen)' is not HOST:PORT") }
            if (tlsCert == nil) != (tlsKey == nil) { throw ValidationError("--tls-cert and --tls-key go together") }
            if tlsCert == nil && !Self.isLoopback(host) {
                throw ValidationError("--listen \(listen) is not a loopback address: give --tls-cert and --tls-key, so that tokens and data never cross the network in clear")
            }
        } else if tlsCert != nil || tlsKey != nil {
            throw ValidationError("--tls-cert and --tls-key are for --listen")
        }
        for directory in allowPath {
            var isDirectory = ObjCBool(false)
            guard directory.hasPrefix("/"), FileManager.default.fileExists(atPath: directory, isDirectory: &isDirectory), isDirectory.boolValue else {
                throw ValidationError("--allow-path \(directory) must be an existing directory, given as an absolute path")
            }
        }
        for group in adminGroup + operatorGroup + readOnlyGroup + guestGroup where AccessGroups.gid(group) == nil {
            throw ValidationError("no group '\(group)' on this host")
        }
        if !(restartBackoffMax >= 0.1) { throw ValidationError("--restart-backoff-max must be at least 0.1 seconds") }
        if let workerMemoryLimit, WorkerConfiguration.memoryLimit(parsing: workerMemoryLimit) == nil {
            throw ValidationError("--worker-memory-limit '\(workerMemoryLimit)' must be a size of at least 256M")
        }
    }


    static func isLoopback(_ host: String) -> Bool { host.hasPrefix("127.") || host == "::1" || host == "localhost" }

    var accessGroups: AccessGroups {
        var groups = AccessGroups()
        groups.admin = adminGroup.compactMap(AccessGroups.gid)
        groups.operator = operatorGroup.compactMap(AccessGroups.gid)
        groups.readOnly = readOnlyGroup.compactMap(AccessGroups.gid)
        return groups
    }

    /// --guest-group, as group ids (checked by `validate`).
    var guestGroups: [gid_t] { guestGroup.compactMap(AccessGroups.gid) }

    func run() throws {
        StandardErrorLogging.bootstrap(level: logLevel)
        let logger = Logger(label: "iofilterd")
        let state = ((stateDir ?? HostDefaults.stateDirectory) as NSString).standardizingPath
        let absoluteState = state.hasPrefix("/") ? state : FileManager.default.currentDirectoryPath + "/" + state
        // Everything the host and its workers create (the database, disks, journals,
        // caches, sidecar directories) is private to the host's user: files 0600,
        // directories 0700. The state directory itself is closed to others even if it
        // existed before with a looser mode.
        umask(0o077)
        // A host holds some six fds per VM (its listeners, a worker's control, heartbeat
        // and broker): the usual soft limit of 1024 would stop it near 150 VMs. The hard
        // limit is what the operator allows.
        let openFiles = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        var files = rlimit()
        if getrlimit(openFiles, &files) == 0, files.rlim_cur < files.rlim_max {
            files.rlim_cur = files.rlim_max
            _ = setrlimit(openFiles, &files)
        }
        try FileManager.default.createDirectory(atPath: absoluteState, withIntermediateDirectories: true)
        guard chmod(absoluteState, 0o700) == 0 else {
            throw ValidationError("cannot make the state directory \(absoluteState) private: \(String(cString: strerror(errno)))")
        }
        let lock = try StateLock(directory: absoluteState)
        defer { withExtendedLifetime(lock) {} }

        let signals = TerminationSignals.block(also: [SIGQUIT])
        guard sampleInterval >= 0.2 && sampleInterval <= 3600 else { throw ValidationError("--sample-interval must be between 0.2 and 3600 seconds") }
        let controller = try HostController(stateDirectory: absoluteState, logLevel: StandardErrorLogging.level.rawValue,
                                            sampleInterval: sampleInterval, logger: logger)
        controller.watchdogSeconds = watchdog
        controller.workerMemoryLimit = workerMemoryLimit.flatMap(WorkerConfiguration.memoryLimit(parsing:))
        controller.restartBackoffLimit = restartBackoffMax
        do {
            try controller.adoptAcceptanceLevel(acceptanceLevel)
        } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
        controller.accessGroups = accessGroups
        controller.guestGroups = guestGroups
        controller.allowedRoots = allowPath
        let apiSocket = socket ?? HostDefaults.apiSocket(in: absoluteState)
        controller.hiddenFromWorkers = [apiSocket]
        // VMs come back before the API answers, so that the first client sees the
        // host as it was, not halfway through coming back.
        controller.recoverFromPreviousRun()
        // Daemons before VMs: their filters ask for channels as they open.
        controller.startDaemons()
        if !noResume { controller.resume() }
        // What the previous run left serving and nobody adopted stops; copies go on.
        controller.settleLeftovers()
        // The daemon's own metrics (swift-metrics) land in the registry GET /metrics emits.
        let registry = PrometheusCollectorRegistry()
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
        registry.makeGauge(descriptor: MetricNameDescriptor(namespace: "iofilterd", metricName: "start_time", unitName: "seconds",
                                                            helpText: "When this iofilterd started (Unix time)."))
            .set(Date().timeIntervalSince1970)
        registry.makeGauge(descriptor: MetricNameDescriptor(namespace: "iofilterd", metricName: "up", unitName: "", helpText: "1 while iofilterd serves its API."),
                           labels: [("version", Release.version)]).set(1.0)
        let router = APIRouter(controller: controller, apiSocket: apiSocket, registry: registry, logger: logger)
        let server = APIServer(logger: logger) { router.handle($0) }
        var listeners = [APIServer.Listener.unix(path: apiSocket, mode: 0o600, group: nil)]
        if let listen, let (host, port) = Sockets.hostPort(listen) {
            listeners.append(.tcp(host: host, port: Int(port), tls: tlsCert.map { APIServer.TLSFiles(certificateChain: $0, privateKey: tlsKey!) },
                                  names: serverName))
        }
        do {
            try server.start(listeners)
            try admitGroups(to: apiSocket, stateDirectory: absoluteState, logger: logger)
        } catch {
            logger.critical("cannot serve the API: \(error)")
            server.stop(timeout: 1)
            controller.shutdown()
            throw ExitCode(1)
        }
        for listener in listeners { logger.info("API on \(listener) (OpenAPI document at /openapi.json)") }
        controller.startMonitoring()

        if demo {
            do {
                try Demo(controller: controller, apiSocket: apiSocket, size: demoSize, logger: logger).run()
            } catch {
                logger.critical("the demo could not start: \(error)")
                server.stop(timeout: 1)
                controller.shutdown()
                throw ExitCode(1)
            }
        }
        FileHandle.standardError.write(Data("iofilterd: ready; state in \(absoluteState); try `iofilter vm list --socket \(apiSocket)`\n".utf8))

        let received = signals.wait()
        // Open consoles end now: a live stream is never an unfinished request to wait for.
        controller.liveStreams.endAll()
        if received == SIGQUIT {
            logger.info("SIGQUIT: finishing API requests, then leaving the VMs' workers and the daemons serving for the next start")
            server.stop(timeout: 30)
            controller.leave()
        } else {
            logger.info("signal \(received): finishing API requests, then stopping the workers")
            server.stop(timeout: 30)
            controller.shutdown()
        }
        unlink(apiSocket)
        logger.info("stopped")
    }

    /// The unix socket is the owner's alone unless groups were given roles: then each
    /// such group may connect (read and write the socket) and pass through the socket's
    /// directory, and nobody else may. What a member may do is the role's business.
    /// Guest groups pass through the state directory too, on their way to the VMs'
    /// disk sockets (the host grants the rest as it makes them).
    func admitGroups(to socket: String, stateDirectory: String, logger: Logger) throws {
        let roleGroups = accessGroups.all
        let directory = (socket as NSString).deletingLastPathComponent
        let passing = guestGroups + (directory == stateDirectory ? roleGroups : [])
        do {
            if !roleGroups.isEmpty { try AccessControlList.grant(socket, owner: 0o6, groups: roleGroups, permissions: 0o6) }
            if !passing.isEmpty { try AccessControlList.grant(stateDirectory, owner: 0o7, groups: passing, permissions: 0o1) }
        } catch {
            throw ValidationError("cannot let the role and guest groups reach \(socket) (does the file system take POSIX ACLs?): \(error)")
        }
    }
}

/// Holds an exclusive lock on the state directory, so that two daemons never manage
/// the same state.
final class StateLock {
    let fd: Int32

    init(directory: String) throws {
        let path = "\(directory)/iofilterd.lock"
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw ValidationError("cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw ValidationError("another iofilterd is using \(directory)")
        }
        ftruncate(fd, 0)
        let pid = "\(getpid())\n"
        _ = pid.withCString { write(fd, $0, strlen($0)) }
    }

    deinit { close(fd) }
}
