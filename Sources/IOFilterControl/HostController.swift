import Foundation
import GRDB
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// The host runtime's brain: installed plug-ins, policies, disks and VMs, kept in
/// SQLite, and the workers that serve them. The HTTP API is a thin layer over it.
///
/// Every change goes through `exclusive`, one at a time, so that concurrent API calls
/// never interleave halfway through a change; reads go straight to the database and
/// to the session registry. The state and files live in its parts (Parts/); this
/// class orchestrates them.
public final class HostController: @unchecked Sendable {
    // @unchecked: the registries guard themselves; every change to
    // the database and the workers runs under `operationLock`.
    public let stateDirectory: String
    public let logLevel: String
    public var watchdogSeconds: Double = 30
    /// Each worker's memory limit (nil: the worker's default).
    public var workerMemoryLimit: UInt64?
    /// The longest wait before a crashed worker is restarted (the wait doubles from
    /// 0.1 s with each crash in a row).
    public var restartBackoffLimit: Double = 10
    /// Paths no worker may reach (the API's unix socket).
    public var hiddenFromWorkers: [String] = []
    /// Directories requests and policies may name files under (--allow-path), besides
    /// the state directory.
    public var allowedRoots: [String] = []
    /// Who gets which role on the unix socket.
    public var accessGroups = AccessGroups()
    /// Groups that may connect to the VMs' disk sockets, NBD and vhost-user-blk (the
    /// group libvirt's QEMU runs in), and reach nothing else of the state directory.
    public var guestGroups: [gid_t] = []
    /// The lowest level of plug-in this host installs; set by `adoptAcceptanceLevel`.
    public internal(set) var acceptanceLevel = AcceptanceLevel.hostDefault
    /// Where everything lives under `stateDirectory`.
    let layout: StateLayout
    let store: StateStore
    /// The installed plug-ins' files.
    let catalogue: PluginCatalogue
    /// The disks' images and sidecar state.
    let diskFiles: DiskFiles
    let logger: Logger
    private let operationLock = ConditionLock()
    /// What serves disks right now (VMs, offline sessions) and the disks transfers hold.
    let sessions = SessionRegistry()
    /// Partner daemons, by plug-in name.
    let daemons = DaemonRegistry()
    /// Point-in-time snapshots being copied, and the workers offering them.
    let snapshotCopies = SnapshotCopies()
    /// Workers and daemons an earlier host left serving, by `vm-NAME` or
    /// `daemon-PLUGIN`, until adopted or stopped (see HostController+Recovery).
    let leftovers = Guarded<[String: LeftoverProcess]>([:])
    /// The running VMs' figures, history and health, sampled once for every reader.
    private(set) var sampler: Sampler!
    /// Where events go besides the database.
    private(set) var alerts: AlertDispatcher!
    /// The console's live streams, ended at once on revocation and at shutdown.
    public let liveStreams = LiveStreams()
    /// Failed sign-ins per peer, so that a flood of them makes a few events, not thousands.
    let signInFailures = SignInFailures()

    /// - Parameter sampleInterval: seconds between history points (and health checks).
    public init(stateDirectory: String, logLevel: String = "info", sampleInterval: Double = 10, logger: Logger) throws {
        layout = StateLayout(root: stateDirectory)
        self.stateDirectory = layout.root
        self.logLevel = logLevel
        self.logger = logger
        try layout.create()
        store = try StateStore(path: layout.database)
        catalogue = PluginCatalogue(directory: layout.plugins)
        diskFiles = DiskFiles(layout: layout)
        sampler = Sampler(sessions: sessions, interval: sampleInterval, logger: logger) { [weak self] kind, subject, message, severity in
            self?.record(kind, subject, message, actor: nil, severity: severity)
        }
        alerts = AlertDispatcher(logger: logger) { [weak self] name, error in self?.deliveryFinished(name, error: error) }
        reloadAlerts()
    }

    /// Starts sampling the running VMs in the background (history and health events).
    public func startMonitoring() {
        sampler.start()
    }

    // MARK: running changes one at a time

    /// Runs one change of state. Database and worker errors become clear API errors.
    func exclusive<T>(_ body: () throws -> T) throws(ControlError) -> T {
        do {
            return try operationLock.withLock(body)
        } catch let error as ControlError {
            throw error
        } catch let error as DatabaseError {
            logger.error("database: \(error)")
            throw .internalError("the state database refused the change: \(error.message ?? "\(error)")")
        } catch {
            throw Self.reported(error)
        }
    }

    /// An error from below as the API reports it: a ControlError as it is, anything
    /// else as an internal error.
    static func reported(_ error: any Error) -> ControlError {
        (error as? ControlError) ?? .internalError("\(error)")
    }

    func read<T>(_ body: (Database) throws -> T) throws(ControlError) -> T {
        do {
            return try store.read(body)
        } catch let error as ControlError {
            throw error
        } catch {
            throw .internalError("cannot read the state database: \(error)")
        }
    }

    /// Records a refusal (or anything not done on the caller's behalf, or by no caller)
    /// as an event by `actor`, without marking the current API call as having recorded
    /// one. The severity is the kind's (see `Severity.of`) unless given.
    public func record(_ kind: String, _ subject: String, _ message: String, actor: String?, severity: Severity? = nil) {
        let event = store.record(kind, subject, message, actor: actor, severity: severity ?? .of(kind: kind))
        if event.severity >= .warning { logger.warning("\(kind) \(subject): \(message)") }
        alerts.dispatch(event)
    }

    /// Records an event, naming the API caller whose request made it, if one did.
    public func event(_ kind: String, _ subject: String, _ message: String) {
        let call = APICall.current
        call?.recordedEvent = true
        logger.info("\(kind) \(subject): \(message)\(call.map { " (by \($0.caller.name))" } ?? "")")
        alerts.dispatch(store.record(kind, subject, message, actor: call?.caller.name, severity: .of(kind: kind)))
    }

    /// The newest events, oldest first; only those at or above `severity` if given.
    public func events(limit: Int, severity: Severity? = nil) throws(ControlError) -> [Event] {
        try read { db in
            var query = EventRow.order(Column("id").desc)
            if let severity {
                query = query.filter(Severity.allCases.filter { $0 >= severity }.map(\.rawValue).contains(Column("severity")))
            }
            return try query.limit(max(1, min(limit, 1000))).fetchAll(db).reversed().map(\.event)
        }
    }

    public func hostInfo(apiSocket: String) -> HostInfo {
        HostInfo(version: Release.version, stateDirectory: stateDirectory, apiSocket: apiSocket, pid: getpid(),
                 runningVMs: sessions.runningVMs.keys.sorted(), acceptanceLevel: acceptanceLevel)
    }

    // MARK: starting and stopping the host

    /// Starts every VM that was running when the host last stopped.
    public func resume() {
        let names = (try? store.read { db in try VMRow.filter(Column("desiredState") == "running").fetchAll(db).map(\.name) }) ?? []
        for name in names {
            do {
                _ = try startVM(name, resuming: true)
            } catch {
                event("vm-start-failed", name, "could not restart after a host restart: \(error.message)")
            }
        }
    }

    /// Stops every worker gracefully (filters flush and close) and leaves each VM's
    /// desired state as it was, so the next start brings the same VMs back.
    public func shutdown() {
        defer { markCleanStop() }
        liveStreams.endAll()
        sampler.stop()
        abandonRunningCopies()
        operationLock.withLock {
            let workers = sessions.takeAll()
            // Workers stop in parallel: each may take a while to destage or drain.
            let group = DispatchGroup()
            for (name, worker) in workers {
                group.enter()
                startThread(name: "stop-worker") { [logger] in
                    logger.info("stopping \(name)")
                    worker.stop()
                    group.leave()
                }
            }
            group.wait()
        }
        stopDaemons()
        alerts.stop()
    }

    /// Ends this host and leaves every VM's worker and every partner daemon serving (a
    /// restart, an upgrade of the host): the next host on this state directory adopts
    /// them, and their clients see nothing. Offline and maintenance workers end with it.
    public func leave() {
        liveStreams.endAll()
        sampler.stop()
        operationLock.withLock {
            let vms = sessions.runningVMs.count, daemonCount = daemons.count
            record("host-left", "host", "iofilterd stopped and left \(vms) VM worker(s) and \(daemonCount) daemon(s) serving for the next start to adopt",
                   actor: nil)
            for (_, session) in sessions.takeOffline() { session.stop(timeout: 5) }
        }
        alerts.stop()
        markCleanStop()
    }

    // MARK: workers

    func workerConfiguration(
        name: String, directory: String, disks: [(row: DiskRow, filters: [PlannedFilter], readOnly: Bool)], task: WorkerTask = .serve,
        limits: VMLimits? = nil, tls: TLSSettings? = nil, vhostUserBlk: Bool = false
    ) -> WorkerConfiguration {
        var configuration = WorkerConfiguration(
            vmName: name, stateDirectory: directory,
            disks: disks.map {
                DiskConfiguration(name: $0.row.name, backend: .file(path: $0.row.path), readOnly: $0.readOnly || $0.row.readOnly,
                                  filters: $0.filters, listenFD: -1, stateDirectory: layout.diskState($0.row.name))
            },
            watchdogSeconds: watchdogSeconds, logLevel: logLevel, task: task)
        configuration.memoryLimit = limits?.memoryLimit ?? workerMemoryLimit ?? defaultWorkerMemoryLimit()
        configuration.maxConnections = limits?.maxConnections
        configuration.cpuWeight = limits?.cpuWeight
        configuration.hiddenPaths = hiddenFromWorkers
        configuration.tls = tls
        if vhostUserBlk {
            for index in configuration.disks.indices { configuration.disks[index].vhostUserQueues = 1 }
        }
        return configuration
    }

    /// A VM worker's memory limit when neither the VM nor --worker-memory-limit sets
    /// one: its share of the host's memory among the VMs defined.
    func defaultWorkerMemoryLimit() -> UInt64 {
        let hostMemory = UInt64(max(sysconf(Int32(_SC_PHYS_PAGES)), 0)) * UInt64(max(sysconf(Int32(_SC_PAGESIZE)), 0))
        let vms = (try? store.read { db in try VMRow.fetchCount(db) }) ?? 1
        return WorkerConfiguration.defaultMemoryLimit(hostMemory: hostMemory, vms: vms)
    }

    /// Starts a supervised worker serving `disks`, one unix socket each in
    /// `socketDirectory`. A VM's worker works in its VM directory, any other in a
    /// directory of its own.
    func launch(name: String, isVM: Bool = false, disks: [(row: DiskRow, filters: [PlannedFilter], readOnly: Bool)], socketDirectory: String,
                limits: VMLimits? = nil, tls: TLSSettings? = nil, vhostUserBlk: Bool = false, succeeding predecessor: VMSession? = nil)
        throws(ControlError) -> VMSession
    {
        if let predecessor {
            // A live upgrade: the same listeners, a worker that stands by for the clients.
            let session = makeSession(name: name, isVM: isVM, disks: disks, listeners: predecessor.listeners,
                                      continuity: predecessor.continuity, limits: limits, tls: tls,
                                      vhostUserBlk: predecessor.listeners.contains { $0.vhostUser != nil })
            do {
                try session.startStandby()
            } catch {
                throw .workerFailed("\(error)")
            }
            return session
        }
        do {
            try FileManager.default.createDirectory(atPath: socketDirectory, withIntermediateDirectories: true)
        } catch {
            throw .internalError("cannot create \(socketDirectory): \(error)")
        }
        var listeners: [VMSession.Listener] = []
        for disk in disks {
            let path = "\(socketDirectory)/\(disk.row.name).sock"
            do {
                listeners.append(try .unix(disk: disk.row.name, path: path))
            } catch {
                listeners.forEach { $0.close() }
                if error.code == ENAMETOOLONG {
                    throw .conflict("the socket path \(path) is longer than a unix socket allows; use a shorter --state-dir")
                }
                throw .internalError("cannot listen on \(path): \(error)")
            }
            if vhostUserBlk {
                do {
                    listeners[listeners.count - 1].vhostUser = try .listen(path: layout.vhostUserSocket(vm: name, disk: disk.row.name))
                } catch {
                    listeners.forEach { $0.close() }
                    throw .conflict("\(error)")
                }
            }
        }
        reportCheckpointsLostWithTheMachine(disks.map(\.row.name))
        if isVM, !guestGroups.isEmpty {
            do {
                try admitGuests(to: listeners, in: socketDirectory)
            } catch {
                listeners.forEach { $0.close() }
                throw .internalError("cannot let the guest groups reach \(socketDirectory) (does the file system take POSIX ACLs?): \(error)")
            }
        }
        var continuity: VMSession.Continuity?
        if isVM {
            do {
                continuity = try .listen(controlSocket: layout.controlSocket("vm-\(name)"), recordPath: layout.record("vm-\(name)"))
            } catch {
                listeners.forEach { $0.close() }
                throw .internalError("cannot listen on \(layout.controlSocket("vm-\(name)")): \(error)")
            }
        }
        let session = makeSession(name: name, isVM: isVM, disks: disks, listeners: listeners, continuity: continuity, limits: limits, tls: tls,
                                  vhostUserBlk: vhostUserBlk)
        do {
            try session.start()
        } catch {
            throw .workerFailed("\(error)")
        }
        return session
    }

    /// Lets the guest groups pass through vms/ and the VM's directory and connect to its
    /// disk sockets (ACL entries: the files keep their owner and mode).
    private func admitGuests(to listeners: [VMSession.Listener], in socketDirectory: String) throws(SystemError) {
        for directory in ["\(layout.root)/vms", socketDirectory] {
            try AccessControlList.grant(directory, owner: 0o7, groups: guestGroups, permissions: 0o1)
        }
        for path in listeners.flatMap({ [$0.socketPath, $0.vhostUser?.path].compactMap { $0 } }) {
            try AccessControlList.grant(path, owner: 0o6, groups: guestGroups, permissions: 0o6)
        }
    }

    private func makeSession(name: String, isVM: Bool, disks: [(row: DiskRow, filters: [PlannedFilter], readOnly: Bool)],
                             listeners: [VMSession.Listener], continuity: VMSession.Continuity?, limits: VMLimits?,
                             tls: TLSSettings?, vhostUserBlk: Bool) -> VMSession {
        let configuration = workerConfiguration(name: name, directory: isVM ? layout.vm(name) : layout.helper(name), disks: disks, limits: limits,
                                                tls: tls, vhostUserBlk: vhostUserBlk)
        let hooks = sessionHooks(name)
        return VMSession(configuration: configuration, listeners: listeners, continuity: continuity, backoffLimit: restartBackoffLimit,
                         logger: hooks.logger, daemonChannels: hooks.daemonChannels, onEvent: hooks.onEvent)
    }

    /// What every session of `name` is wired to: its logger, its filters' way to their
    /// daemons, and the host's event log.
    func sessionHooks(_ name: String) -> (logger: Logger, daemonChannels: @Sendable (String) -> Result<Int32, TargetBroker.Failure>,
                                          onEvent: @Sendable (SupervisorEvent, String) -> Void) {
        var supervisorLogger = logger
        supervisorLogger[metadataKey: "worker"] = "\(name)"
        return (supervisorLogger,
                { [weak self] plugin in self?.daemonChannel(plugin) ?? .failure(TargetBroker.Failure(ESHUTDOWN, "the host is stopping")) },
                { [weak self] kind, message in self?.event(kind.rawValue, name, message) })
    }

    /// Runs a short-lived worker that attaches or detaches filters on disks no VM uses.
    func maintain(_ disk: DiskRow, filters: [PlannedFilter], task: WorkerTask) throws(ControlError) {
        let name = "maintain-\(disk.name)"
        var configuration = workerConfiguration(name: name, directory: layout.helper(name), disks: [(disk, filters, false)], task: task)
        // The disk's state is handed to whoever confines a worker on it. A disk a VM owns
        // stays its VM's: a detach in the middle of a live change must not take the
        // state from the VM's worker that stands by to open it.
        if let vm = disk.vm { configuration.identity = WorkerIdentity(for: vm) }
        do {
            try MaintenanceWorker.run(configuration, logger: logger)
        } catch {
            // A filter's veto is an answer, not a failure.
            if error.vetoed { throw .conflict(error.message) }
            throw .workerFailed("disk \(disk.name): \(error.message)")
        }
    }

    /// Marks disks busy for a long transfer and runs it without holding the change
    /// lock, so other changes go on meanwhile; anything that would open or change these
    /// disks is refused until it ends. The marks are taken under the change lock, so a
    /// VM start either finished before (and the transfer reads through its worker) or
    /// sees them.
    func whileBusy<T>(_ disks: [String], doing activity: String, _ body: () throws -> T) throws(ControlError) -> T {
        try whileBusy(disks, doing: activity) { (_: (UInt64, UInt64) -> Void) in try body() }
    }

    /// The same, for a transfer that reports how far it is: the disks' activity (what
    /// `disk show` and the API give) says "ACTIVITY: 37%" as it goes.
    func whileBusy<T>(_ disks: [String], doing activity: String,
                      _ body: (_ progress: (UInt64, UInt64) -> Void) throws -> T) throws(ControlError) -> T {
        try exclusive { try markBusy(disks, doing: activity) }
        defer { unmarkBusy(disks) }
        var shown = -1
        let progress = { [self] (done: UInt64, total: UInt64) in
            let percent = total == 0 ? 100 : Int(done * 100 / total)
            guard percent != shown else { return }
            shown = percent
            sessions.setActivity(disks, "\(activity): \(percent)%")
        }
        do {
            return try body(progress)
        } catch {
            throw Self.reported(error)
        }
    }

    /// Call under the change lock.
    func markBusy(_ disks: [String], doing activity: String) throws(ControlError) {
        if let (disk, other) = sessions.markBusy(disks, doing: activity) { throw .conflict("disk \(disk) is busy (\(other)); try again when that ends") }
    }

    func unmarkBusy(_ disks: [String]) {
        sessions.unmarkBusy(disks)
    }

    func requireNotBusy(_ disk: String) throws(ControlError) {
        if let activity = sessions.activity(disk) {
            throw .conflict("disk \(disk) is busy (\(activity)); try again when that ends")
        }
    }

    /// The VM or offline session serving `disk` right now, if any.
    func server(of disk: DiskRow) -> (what: String, worker: VMSession)? {
        sessions.server(of: disk.name, vm: disk.vm).map { ($0.what, $0.session) }
    }
}

extension ValidationError {
    var controlError: ControlError { .invalid(description) }
}
