import CIOFilter
import CSandboxShims
import CSystemShims
import FoundationEssentials
import Glibc
import IOFilterBackends
import IOFilterChain
import IOFilterModel
import IOFilterNBD
import IOFilterPluginLoader
import IOFilterPosix
import IOFilterTracking
import Logging

/// Builds, opens and watches the chains of one worker.
public final class WorkerRuntime: @unchecked Sendable {
    // @unchecked: `chains` is filled during `openDisks` on the main thread before any
    // other thread reads it, and never changed afterwards.
    public let configuration: WorkerConfiguration
    let logger: Logger
    public private(set) var plugins: [String: LoadedPlugin] = [:]
    public private(set) var chains: [Chain] = []
    /// The chains as other threads may read them while `openDisks` runs (the heartbeat).
    private let published = Guarded<[Chain]>([])

    /// When the oldest request in flight on any disk entered the stage it sits in (0:
    /// none): what the heartbeat carries to the supervisor, which kills a worker whose
    /// request is stuck whatever the filters did to this process's own watchdog.
    public func oldestInFlight() -> UInt64 {
        published.withLock { $0 }.compactMap { $0.oldestInFlight() }.min() ?? 0
    }
    /// What each disk's NBD server offers: the disk, and the snapshots made of it.
    public private(set) var catalogs: [ChainCatalog] = []
    /// What `openBackends` opened, one per disk, until `openDisks` builds on it.
    private var opened: [OpenedBackend] = []
    private let shutDown = Guarded(false)
    private enum OpenedBackend {
        case file(FileBackend)
        case nbd(NBDURI, fd: Int32)
    }

    public init(configuration: WorkerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        HostServices.configureTargets(configuration.brokerFD.map { .broker(fd: $0) } ?? .direct,
                                      named: configuration.namedTargets)
    }

    /// Loads each plug-in the disks name, once, and calls its `load`.
    public func loadPlugins() throws {
        for disk in configuration.disks {
            for filter in disk.filters where plugins[filter.manifest.path] == nil {
                let plugin = LoadedPlugin(library: try PluginLibrary(path: filter.manifest.path))
                try plugin.load()
                plugins[filter.manifest.path] = plugin
            }
        }
    }

    /// Opens each disk's file, or connects to its NBD server: what the worker can no
    /// longer do itself once it is confined (no path to the disk, no network).
    public func openBackends() throws {
        for disk in configuration.disks {
            switch disk.backend {
            case .file(let path):
                opened.append(.file(try FileBackend(path: path, readOnly: disk.readOnly)))
            case .nbd(let text):
                let uri = try NBDBackend.parse(text)
                do {
                    opened.append(.nbd(uri, fd: try uri.connect()))
                } catch {
                    throw ChainError.backend("cannot connect to \(text): \(error)")
                }
            }
        }
    }

    /// Opens each disk's backend and filters; a filter meeting a disk for the first
    /// time (no sidecar directory yet) is attached first. With `attachOnly`, filters
    /// are attached but not opened (the host adds filters to a disk no VM uses).
    public func openDisks(attachOnly: Bool = false) throws -> [ChainExport] {
        var exports: [ChainExport] = []
        if opened.isEmpty { try openBackends() }
        for (disk, backendToOpen) in zip(configuration.disks, opened) {
            var diskLogger = logger
            diskLogger[metadataKey: "disk"] = "\(disk.name)"
            let backend: any StorageBackend
            switch backendToOpen {
            case .file(let file): backend = file
            case .nbd(let uri, let fd): backend = try NBDBackend(uri: uri, connected: fd, logger: diskLogger)
            }
            var filters: [FilterInstance] = []
            var fresh: [Bool] = []
            for planned in disk.filters {
                let sidecar = "\(Self.sidecarRoot(disk, in: configuration))/\(planned.manifest.name)"
                fresh.append(!Self.isDirectory(sidecar))
                try Self.makeDirectories(sidecar)
                filters.append(FilterInstance(
                    plugin: plugins[planned.manifest.path]!, parameters: planned.parameters, diskName: disk.name,
                    vmName: configuration.vmName, size: backend.size, readOnly: disk.readOnly || backend.readOnly,
                    sidecarDirectory: sidecar, logger: diskLogger))
            }
            let chain = Chain(diskName: disk.name, filters: filters, backend: backend, logger: diskLogger)
            // Changes are tracked from the first request on, including the ones filters
            // make while they open (a cache replaying its journal is not a consumer's).
            let (bitmaps, failures) = CheckpointDirectory(diskState: Self.sidecarRoot(disk, in: configuration))
                .openAll(use: disk.readOnly || backend.readOnly ? .read : .track)
            for bitmap in bitmaps {
                if bitmap.diskSize != backend.size && bitmap.inconsistency == nil {
                    // Grown since (or replaced): the bitmap has no bits for the new part.
                    bitmap.markInconsistent("it was made for \(bitmap.diskSize) bytes and the disk is now \(backend.size)")
                }
                chain.tracker.track(bitmap)
                if let reason = bitmap.inconsistency { diskLogger.warning("checkpoint \(bitmap.name) is inconsistent: \(reason)") }
            }
            for failure in failures { diskLogger.error("checkpoint left out: \(failure)") }
            // Nearest the disk first: a filter may issue I/O below itself (submit_below)
            // from the moment it is open, so everything below it must be open already.
            for (filter, isNew) in zip(filters, fresh).reversed() {
                if isNew {
                    do {
                        try filter.attach()
                    } catch {
                        // No sidecar directory means "not attached": the next open
                        // runs attach again instead of opening a half-made filter.
                        try? FileManager.default.removeItem(atPath: filter.sidecarDirectory)
                        throw error
                    }
                }
                if !attachOnly { try filter.open() }
            }
            chains.append(chain)
            published.withLock { $0.append(chain) }
            let export = ChainExport(name: disk.name, chain: chain, readOnly: disk.readOnly)
            exports.append(export)
            catalogs.append(ChainCatalog(disk: export))
            diskLogger.info("serving \(backend) through \(filters.isEmpty ? "no filters" : filters.map(\.name).joined(separator: " -> "))")
        }
        return exports
    }

    /// Kills this process if any request has sat in one filter (or the backend) longer
    /// than the watchdog allows, naming the filter, the disk and the request.
    public func startWatchdog() {
        let limit = UInt64(configuration.watchdogSeconds * 1e9)
        guard limit > 0 else { return }
        let chains = self.chains
        let logger = self.logger
        startThread(name: "watchdog") {
            while true {
                usleep(useconds_t(min(max(limit / 4000, 50_000), 500_000)))
                let now = monotonicNanoseconds(coarse: true)
                for chain in chains {
                    if let stuck = chain.stuckRequest(olderThan: limit, now: now) {
                        logger.critical(
                            "watchdog: \(stuck.request) stuck in \(stuck.stage) on disk \(chain.diskName) for \((stuck.seconds * 10).rounded() / 10)s; killing the worker")
                        iof_kill_self()
                    }
                }
            }
        }
    }

    /// Closes and detaches the named plug-ins' filters on every disk, consumer side
    /// first, while everything below them is still open (a write-back cache destages
    /// through it), then deletes their sidecar directories.
    public func detach(plugins names: Set<String>) throws {
        for (chain, disk) in zip(chains, configuration.disks) {
            for filter in chain.filters where names.contains(filter.name) {
                filter.close()
                try filter.detach()
                let sidecar = "\(Self.sidecarRoot(disk, in: configuration))/\(filter.name)"
                try? FileManager.default.removeItem(atPath: sidecar)
                logger.info("detached \(filter.name) from disk \(chain.diskName)")
            }
        }
    }

    /// Tells every filter of `disk` (all disks when nil), consumer side first, of a
    /// lifecycle event. A snapshot is delivered with the disk quiesced: no consumer's
    /// request in flight while the filters flush, and `whileQuiesced` runs after they
    /// all agreed, before requests flow again (the snapshot's instant). The first filter
    /// that returns an errno vetoes it: the error names the filter, and the filters
    /// after it never hear. A plug-in built for an ABI older than the event never hears.
    public func deliver(_ event: DiskLifecycleEvent, disk: String?, snapshotName: String? = nil,
                        whileQuiesced: ((Chain) throws(ChainError) -> Void)? = nil) throws(ChainError) {
        let chosen = chains.filter { disk == nil || $0.diskName == disk }
        if let disk, chosen.isEmpty { throw .backend("this worker has no disk \(disk)") }
        for chain in chosen {
            var abi = iof_disk_event()
            abi.struct_size = UInt32(MemoryLayout<iof_disk_event>.size)
            let target = strdup(event.targetName ?? snapshotName ?? "")
            defer { free(target) }
            var sinceMinor = 0
            switch event {
            case .snapshot: abi.type = IOF_EVENT_SNAPSHOT
            case .clone: abi.type = IOF_EVENT_CLONE
            case .grow(let size): abi.type = IOF_EVENT_GROW; abi.new_size = size
            case .revert: abi.type = IOF_EVENT_REVERT; sinceMinor = 5
            case .upgrade: abi.type = IOF_EVENT_UPGRADE; sinceMinor = 6
            }
            abi.target_name = UnsafePointer(target)
            let quiesced = event == .snapshot
            if quiesced, !chain.quiesce.pause(seconds: 30) {
                chain.quiesce.resume()
                throw .backend("disk \(chain.diskName): requests still in flight after 30 s; no snapshot")
            }
            defer { if quiesced { chain.quiesce.resume() } }
            for filter in chain.filters where filter.plugin.library.manifest.abiMinor >= sinceMinor {
                var versions: (from: UnsafeMutablePointer<CChar>?, to: UnsafeMutablePointer<CChar>?) = (nil, nil)
                defer {
                    free(versions.from)
                    free(versions.to)
                }
                if case .upgrade(let changes) = event {
                    let manifest = filter.plugin.library.manifest
                    let to = changes[manifest.name] ?? manifest.version
                    versions = (strdup(manifest.version), to.isEmpty ? nil : strdup(to))
                    abi.from_version = UnsafePointer(versions.from)
                    abi.to_version = UnsafePointer(versions.to)
                }
                let error = filter.event(abi)
                if error != 0 {
                    filter.logger.warning("vetoed the \(event) of disk \(chain.diskName): \(String(cString: strerror(error)))")
                    throw .vetoed("\(filter.name) vetoed the \(event) of disk \(chain.diskName): \(String(cString: strerror(error))) (errno \(error))")
                }
            }
            try whileQuiesced?(chain)
            logger.info("disk \(chain.diskName): \(event) delivered to \(chain.filters.count) filter(s)")
        }
    }

    /// Every filter's statistics, per disk.
    public func statistics() -> [DiskStatistics] {
        chains.map { chain in
            DiskStatistics(disk: chain.diskName, filters: chain.filters.map { filter in
                let manifest = filter.plugin.library.manifest
                return FilterStatistics(
                    plugin: manifest.name, version: manifest.version, category: manifest.category,
                    stats: Dictionary(filter.stats(), uniquingKeysWith: { _, last in last }),
                    health: filter.health().map { HealthReport(status: $0.status, reason: $0.reason) })
            }, io: chain.io.snapshot())
        }
    }

    /// Runs a management operation of a loaded plug-in, by name.
    public func call(plugin name: String, operation: String, arguments: [String]) throws -> ManagementResult {
        guard let plugin = plugins.values.first(where: { $0.library.manifest.name == name }) else {
            throw ChainError.backend("plug-in \(name) is not loaded by this worker")
        }
        let value = try plugin.library.callManagementOperation(operation, arguments: arguments)
        return ManagementResult(type: plugin.library.manifest.operation(named: operation)?.returnType.rawValue ?? "void",
                                value: value.description)
    }

    /// Closes every chain and unloads the plug-ins (graceful stop). Snapshots still
    /// being copied fail (the host removes them).
    /// Ends the worker's work once its consumers are gone: snapshot copies still running
    /// finish at full speed (the host waits for them when it stops a VM, and finds them
    /// recorded complete), then the filters and disks close.
    public func shutdown() {
        // Once: a worker that handed its clients over is shut down already when the
        // host's SIGTERM comes.
        guard shutDown.withLock({ done in defer { done = true }; return !done }) else { return }
        finishSnapshotCopies()
        for chain in chains { chain.close() }
        for plugin in plugins.values { plugin.unload() }
    }

    public static func sidecarRoot(_ disk: DiskConfiguration, in configuration: WorkerConfiguration) -> String {
        disk.stateDirectory ?? "\(configuration.stateDirectory)/\(disk.name)"
    }

    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    static func makeDirectories(_ path: String) throws(ChainError) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o700) != 0 && errno != EEXIST {
                throw .backend("cannot create \(prefix): \(String(cString: strerror(errno)))")
            }
        }
    }
}
