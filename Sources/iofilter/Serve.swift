import ArgumentParser
import Foundation
import IOFilterHost
import IOFilterLogging
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import IOFilterWire
import Logging

extension IOFilterCommand {
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "serve", abstract: "Serve one disk over NBD (and vhost-user-blk) through a filter chain in a sandboxed worker.",
            discussion: """
                Prints the NBD URI on stdout once the disk is being served, then runs until \
                interrupted. Filters are put in category order whatever the order given. \
                If the worker dies (a crashing filter, kill -9) it is restarted on the same \
                socket; clients reconnect.

                Examples:
                  iofilter serve disk.img --size 1G --filter passthrough-c.so
                  iofilter serve disk.img --filter cache.so:size=256M,mode=write-back --port 10809
                  iofilter serve nbd://127.0.0.1:10810/ --filter cache.so
                  iofilter serve disk.img --filter cache.so --vhost-user-blk /run/vm1-disk.sock

                With --vhost-user-blk a QEMU guest reaches the disk as a virtio disk:
                  qemu-system-x86_64 -object memory-backend-memfd,id=mem,size=1G,share=on \\
                    -machine q35,memory-backend=mem \\
                    -chardev socket,id=disk0,path=/run/vm1-disk.sock,reconnect=1 \\
                    -device vhost-user-blk-pci,chardev=disk0 ...
                """)

        @Argument(help: "A raw image file, or an NBD URI to use as the backend.")
        var disk: String

        @Option(help: ArgumentHelp("Create the file with this size if it does not exist (or grow it). Suffixes K, M, G, T.", valueName: "size"))
        var size: String?

        @Option(name: .customLong("filter"), help: ArgumentHelp("A plug-in and its parameters; a bare name is a sample's (passthrough-c, cache, replication, template).", valueName: "plugin.so[:key=value,...]"))
        var filters: [String] = []

        @Option(help: ArgumentHelp("Serve on this unix socket (default: a new one under $TMPDIR).", valueName: "path"))
        var socket: String?

        @Option(help: ArgumentHelp("Serve on this TCP port instead of a unix socket.", valueName: "port"))
        var port: UInt16?

        @Option(help: ArgumentHelp("The address to listen on with --port.", valueName: "address"))
        var bind: String = "127.0.0.1"

        @Option(name: .customLong("vhost-user-blk"), help: ArgumentHelp("Also serve the disk to a QEMU guest as vhost-user-blk on this unix socket (it must not exist, or be a socket nobody serves).", valueName: "path"))
        var vhostUserBlk: String?

        @Option(help: ArgumentHelp("Virtqueues the vhost-user-blk disk offers (QEMU's num-queues), 1 to 16.", valueName: "n"))
        var numQueues: Int = 1

        @Flag(help: "Refuse writes.")
        var readonly = false

        @Option(help: ArgumentHelp("Where filters keep their sidecar state (default: DISK.iofilter beside a file).", valueName: "dir"))
        var stateDir: String?

        @Option(help: ArgumentHelp("Kill the worker when a request sits this long in one filter.", valueName: "seconds"))
        var watchdog: Double = 30

        @Option(help: ArgumentHelp("The most memory the worker may map (default 8G); a filter gets allocation failures past it.", valueName: "size"))
        var memoryLimit: String?

        @Option(help: ArgumentHelp("Serve at most this many negotiated clients at once; more are turned away. Connections still negotiating are bounded apart (64, 16 per peer: the oldest make room).", valueName: "n"))
        var maxConnections: Int = 16

        @Option(help: ArgumentHelp("Drop a client that has not finished negotiating after this long.", valueName: "seconds"))
        var handshakeTimeout: Double = 5

        @OptionGroup var tlsOptions: TLSOptions

        @Flag(name: .customLong("no-sr"), help: "Offer no structured replies (and so no block status), like nbdkit --no-sr: simple replies only.")
        var noStructuredReplies = false

        @Option(help: ArgumentHelp("Where a filter's partner daemon accepts its peers on other hosts (if the plug-in declares IOF_DAEMON_LISTENS).", valueName: "host:port"))
        var daemonListen: String?

        @Option(help: ArgumentHelp("Peers of the daemon must start TLS with this pre-shared key (a psktool file).", valueName: "file"))
        var daemonTlsPsk: String?

        @Flag(help: "Print every filter's statistics to stderr when stopping (and with --stats-every, as it serves).")
        var stats = false

        @Option(help: ArgumentHelp("Also print the statistics every this many seconds.", valueName: "seconds"))
        var statsEvery: Double?

        @Option(help: ArgumentHelp("Log at this level and above: trace, debug, info, notice, warning, error, critical (default: $IOFILTER_LOG_LEVEL, else info).", valueName: "level"))
        var logLevel: String?

        func validate() throws {
            if socket != nil && port != nil { throw ValidationError("give --socket or --port, not both") }
            if let statsEvery, !(statsEvery >= 0.1) { throw ValidationError("--stats-every must be at least 0.1 seconds") }
            if let problem = StandardErrorLogging.problem(withLevel: logLevel) { throw ValidationError(problem) }
            if let size, ParameterSpec.parseSize(size) == nil { throw ValidationError("--size '\(size)' is not a size (like 512M or 1G)") }
            if watchdog < 0 { throw ValidationError("--watchdog must not be negative") }
            if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
            if !(1...16).contains(numQueues) { throw ValidationError("--num-queues must be from 1 to 16") }
            if let memoryLimit, WorkerConfiguration.memoryLimit(parsing: memoryLimit) == nil {
                throw ValidationError("--memory-limit '\(memoryLimit)' must be a size of at least 256M")
            }
            if !(handshakeTimeout > 0) { throw ValidationError("--handshake-timeout must be more than 0 seconds") }
            if let daemonListen, Sockets.hostPort(daemonListen) == nil { throw ValidationError("--daemon-listen '\(daemonListen)' is not HOST:PORT") }
        }

        var tls: TLSSettings? { tlsOptions.settings }

        func run() throws {
            StandardErrorLogging.bootstrap(level: logLevel)
            let logger = Logger(label: "iofilter.serve")
            let isURI = NBDURI(disk) != nil
            if disk.hasPrefix("nbd") && !isURI { fail("'\(disk)' is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)") }
            let diskPath = isURI ? disk : absolutePath(disk)
            if !isURI { prepareFile(diskPath) }

            var selections: [(path: String, parameters: [String: String])] = []
            for filter in filters {
                do {
                    selections.append(try Self.parseFilter(filter))
                } catch {
                    fail("\(error)")
                }
            }
            let planned: [PlannedFilter]
            // An unchanged plug-in validated before is not loaded again (see ValidatedManifests).
            switch PluginValidator(remembered: .ofCurrentUser()).validateChain(selections.map { (absolutePath($0.path), $0.parameters) }) {
            case .failure(let error): fail(error.description)
            case .success(let chain): planned = chain
            }

            let name = isURI ? "disk" : (diskPath.split(separator: "/").last.map(String.init) ?? "disk")
            var listener: VMSession.Listener
            do {
                if let port {
                    listener = try .tcp(disk: name, host: bind, port: port)
                } else {
                    listener = try .unix(disk: name, path: socket.map(absolutePath) ?? Self.defaultSocketPath(name: name))
                }
            } catch {
                fail("cannot listen: \(error)")
            }
            if let vhostUserBlk {
                do {
                    listener.vhostUser = try .listen(path: absolutePath(vhostUserBlk))
                } catch {
                    listener.close()
                    fail("\(error)")
                }
            }

            let stateDirectory = stateDir.map(absolutePath) ?? (isURI ? Self.defaultStateDirectory(for: disk) : diskPath + ".iofilter")
            var configuration = WorkerConfiguration(
                vmName: "serve-\(getpid())", stateDirectory: stateDirectory,
                disks: [DiskConfiguration(
                    name: name, backend: isURI ? .nbd(uri: disk) : .file(path: diskPath), readOnly: readonly,
                    filters: planned, listenFD: -1)],
                watchdogSeconds: watchdog,
                logLevel: StandardErrorLogging.level.rawValue)
            configuration.maxConnections = maxConnections
            if listener.vhostUser != nil { configuration.disks[0].vhostUserQueues = numQueues }
            // One identity per disk across runs (the VM name holds this run's pid).
            configuration.identity = WorkerIdentity(for: "serve \(isURI ? disk : diskPath)")
            configuration.handshakeSeconds = handshakeTimeout
            configuration.tls = tls
            if noStructuredReplies { configuration.structuredReplies = false }
            configuration.memoryLimit = memoryLimit.flatMap(WorkerConfiguration.memoryLimit(parsing:))
            try? FileManager.default.createDirectory(atPath: stateDirectory, withIntermediateDirectories: true)
            let signals = TerminationSignals.block()
            let daemons = startDaemons(for: planned, stateDirectory: stateDirectory, logger: logger)
            defer {
                daemons.values.forEach { $0.stop() }
                if !daemons.isEmpty { rmdir(Self.daemonSocketDirectory) }
            }
            // Where `iofilter plugin call … --serve` reaches this worker's live filters;
            // the worker itself is shown nothing there (as iofilterd hides its API socket).
            let controlPath = (listener.socketPath ?? Self.defaultSocketPath(name: name)) + ".control"
            configuration.hiddenPaths = [controlPath]
            let session = VMSession(configuration: configuration, listeners: [listener], logger: logger) { plugin in
                daemons[plugin]?.connectChannel() ?? .failure(TargetBroker.Failure(ECONNREFUSED, "\(plugin) has no daemon"))
            }
            let supervisor = session.supervisor
            let control = Self.serveControl(at: controlPath, supervisor: supervisor, logger: logger)
            defer {
                if control != nil { unlink(controlPath) }
            }
            do {
                try session.start()
            } catch {
                if control != nil { unlink(controlPath) }
                fail("\(error)")
            }
            // Written straight to fd 1 so it is out before we block, whatever stdout buffers.
            FileHandle.standardOutput.write(Data((session.uri(name)! + "\n").utf8))
            if let socket = listener.vhostUser?.path { logger.notice("a guest's vhost-user-blk front-end may connect to \(socket)") }
            if let statsEvery {
                startThread(name: "stats") {
                    while true {
                        usleep(useconds_t(statsEvery * 1e6))
                        Self.printStatistics(of: supervisor, at: "every \(statsEvery)s")
                    }
                }
            }
            _ = signals.wait()
            logger.info("stopping")
            if stats || statsEvery != nil { Self.printStatistics(of: supervisor, at: "at exit") }
            session.stop()
        }

        /// Short (unix socket paths are), and this run's alone.
        static var daemonSocketDirectory: String { "/tmp/iofilter-serve-\(getuid())-\(getpid())" }

        /// The partner daemons of the filters that declare one, as iofilterd would run
        /// them: sandboxed, restarted when they die. Replicas they keep are files in
        /// STATE/replicas.
        func startDaemons(for planned: [PlannedFilter], stateDirectory: String, logger: Logger) -> [String: DaemonSupervisor] {
            var daemons: [String: DaemonSupervisor] = [:]
            let sockets = Self.daemonSocketDirectory
            for filter in planned where filter.manifest.hasDaemon {
                let name = filter.manifest.name
                let peers = Set(filter.targets.filter { $0.hasPrefix(BrokerRequest.peerScheme) })
                if daemonListen != nil && !filter.manifest.daemonListens {
                    logger.warning("\(name) does not declare IOF_DAEMON_LISTENS: its daemon gets no peer listener")
                }
                do {
                    let daemon = try DaemonSupervisor(
                        plugin: filter.manifest, directory: stateDirectory + "/daemons/" + name, socketDirectory: sockets,
                        listen: filter.manifest.daemonListens ? daemonListen : nil, peerPSK: daemonTlsPsk.map(absolutePath),
                        logLevel: StandardErrorLogging.level.rawValue,
                        logger: logger,
                        answer: DaemonSupervisor.brokerAnswer(plugin: filter.manifest, peers: { peers },
                                                              replica: DaemonSupervisor.fileReplicas(in: stateDirectory + "/replicas")))
                    daemon.start()
                    if let address = daemon.listenAddress { logger.notice("the daemon of \(name) accepts peers on \(address)") }
                    daemons[name] = daemon
                } catch {
                    fail("\(error)")
                }
            }
            return daemons
        }

        /// Relays control requests to the worker from a unix socket only this user can
        /// reach (`iofilter plugin call --serve`).
        static func serveControl(at path: String, supervisor: WorkerSupervisor, logger: Logger) -> Int32? {
            unlink(path)
            guard let listener = try? Sockets.listenUnix(path: path) else {
                logger.warning("no control socket at \(path): `iofilter plugin call --serve` cannot reach this worker")
                return nil
            }
            chmod(path, 0o600)
            logger.notice("control socket \(path): `iofilter plugin call PLUGIN OP ... --serve \(path)` runs in this worker")
            startThread(name: "serve-control") {
                while true {
                    let client = Sockets.accept(listener)
                    if client < 0 { if errno == EINTR { continue } else { return } }
                    var timeout = timeval(tv_sec: 10, tv_usec: 0)
                    setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
                    ControlChannel(fd: client).serve(maximumLine: 1 << 20) { request in
                        do {
                            return try supervisor.control(request)
                        } catch {
                            return WorkerControlResponse(error: "\(error)")
                        }
                    }
                    close(client)
                }
            }
            return listener
        }

        /// One line per filter on stderr: "stats DISK PLUGIN key=value …", keys sorted.
        static func printStatistics(of supervisor: WorkerSupervisor, at moment: String) {
            guard let disks = try? supervisor.control(.stats).disks else {
                FileHandle.standardError.write(Data("stats (\(moment)): the worker did not answer\n".utf8))
                return
            }
            var lines: [String] = []
            for disk in disks {
                for filter in disk.filters {
                    let values = filter.stats.sorted { $0.key < $1.key }.map { key, value in
                        value == value.rounded() && abs(value) < 1e15 ? "\(key)=\(Int64(value))" : "\(key)=\(value)"
                    }
                    lines.append("stats (\(moment)) \(disk.disk) \(filter.plugin): \(values.isEmpty ? "(none)" : values.joined(separator: " "))")
                }
            }
            if lines.isEmpty { lines.append("stats (\(moment)): no filters") }
            FileHandle.standardError.write(Data((lines.joined(separator: "\n") + "\n").utf8))
        }

        private func prepareFile(_ path: String) {
            let wanted = size.flatMap(ParameterSpec.parseSize).map(UInt64.init)
            var info = stat()
            if stat(path, &info) != 0 {
                guard let wanted else { fail("\(path): no such file; give --size to create it") }
                guard !readonly else { fail("\(path): no such file (and --readonly cannot create it)") }
                let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
                guard fd >= 0, ftruncate(fd, off_t(wanted)) == 0 else { fail("cannot create \(path): \(String(cString: strerror(errno)))") }
                close(fd)
            } else if let wanted, (info.st_mode & S_IFMT) == S_IFREG, UInt64(info.st_size) != wanted {
                guard UInt64(info.st_size) < wanted else {
                    fail("\(path) is \(info.st_size) bytes, larger than --size \(wanted); shrinking would lose data")
                }
                guard truncate(path, off_t(wanted)) == 0 else { fail("cannot grow \(path): \(String(cString: strerror(errno)))") }
            }
        }

        /// "plugin.so:key=value,key=value" → (path, parameters). A bare name ("cache",
        /// "replication:target=r.img") is a sample plug-in's, as nbdkit's --filter=cache.
        static func parseFilter(_ text: String) throws -> (path: String, parameters: [String: String]) {
            let path: String, rest: Substring
            if let split = text.range(of: ".so:") {
                path = String(text[..<text.index(split.lowerBound, offsetBy: 3)])
                rest = text[split.upperBound...]
            } else if text.hasSuffix(".so") || text.split(separator: ":", maxSplits: 1).first?.contains("/") != false {
                return (text, [:])
            } else {
                // A sample's short name; its parameters may hold paths and URIs.
                let name = text.split(separator: ":", maxSplits: 1).first.map(String.init) ?? text
                path = "\(WorkerExecutable.samplesDirectory())/libiofilter-\(name).so"
                guard FileManager.default.fileExists(atPath: path) else {
                    throw ValidationError("--filter \(text): no sample plug-in '\(name)' (samples: \(sampleNames().joined(separator: ", ")); or give a .so path)")
                }
                rest = text.dropFirst(name.count + 1)
            }
            var parameters: [String: String] = [:]
            for pair in rest.split(separator: ",") {
                guard let equals = pair.firstIndex(of: "="), equals != pair.startIndex else {
                    throw ValidationError("--filter \(text): '\(pair)' is not key=value")
                }
                let key = String(pair[..<equals])
                guard parameters[key] == nil else { throw ValidationError("--filter \(text): '\(key)' is given twice") }
                parameters[key] = String(pair[pair.index(after: equals)...])
            }
            return (path, parameters)
        }

        /// The sample plug-ins' short names (libiofilter-NAME.so beside the worker).
        static func sampleNames() -> [String] {
            ((try? FileManager.default.contentsOfDirectory(atPath: WorkerExecutable.samplesDirectory())) ?? [])
                .filter { $0.hasPrefix("libiofilter-") && $0.hasSuffix(".so") }
                .map { String($0.dropFirst("libiofilter-".count).dropLast(3)) }.sorted()
        }

        static func defaultSocketPath(name: String) -> String {
            let directory = ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
            return "\(directory)/iofilter-\(getpid())-\(name.prefix(40)).sock"
        }

        static func defaultStateDirectory(for uri: String) -> String {
            let safe = uri.map { $0.isLetter || $0.isNumber ? $0 : "_" }
            return "/var/tmp/iofilter-serve/\(String(safe).suffix(80))"
        }
    }
}

func fail(_ message: String) -> Never {
    printError(message)
    Foundation.exit(1)
}
