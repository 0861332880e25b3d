import IOFilterHost
import IOFilterPosix

/// What serves disks right now: each running VM's session, each offline session, and
/// the disks a long transfer holds. Its one lock guards nothing else, and nothing is
/// done under it but looking up and changing these tables.
final class SessionRegistry: @unchecked Sendable {
    // @unchecked: every table is guarded by `lock`.
    private let lock = ConditionLock()
    /// Running VMs, by name.
    private var vms: [String: VMSession] = [:]
    /// Offline sessions, by disk name.
    private var offline: [String: VMSession] = [:]
    /// Disks a long transfer is using (and names a snapshot or clone is being made
    /// under), with what it is doing.
    private var busy: [String: String] = [:]

    // MARK: VMs

    func vm(_ name: String) -> VMSession? { lock.withLock { vms[name] } }
    func isRunning(_ name: String) -> Bool { lock.withLock { vms[name] != nil } }
    var runningVMs: [String: VMSession] { lock.withLock { vms } }
    func add(vm name: String, _ session: VMSession) { lock.withLock { vms[name] = session } }
    func removeVM(_ name: String) -> VMSession? { lock.withLock { vms.removeValue(forKey: name) } }
    /// A worker that took over the VM's clients (a live upgrade) replaces its session.
    func replace(vm name: String, with session: VMSession) { lock.withLock { vms[name] = session } }

    // MARK: offline sessions

    func isServedOffline(_ disk: String) -> Bool { lock.withLock { offline[disk] != nil } }
    func add(offline disk: String, _ session: VMSession) { lock.withLock { offline[disk] = session } }
    func removeOffline(_ disk: String) -> VMSession? { lock.withLock { offline.removeValue(forKey: disk) } }

    /// The VM or offline session serving `disk` (of VM `vm`) right now, if any.
    func server(of disk: String, vm: String?) -> (what: String, session: VMSession)? {
        lock.withLock {
            if let vm, let session = vms[vm] { return ("VM \(vm)", session) }
            if let session = offline[disk] { return ("offline session", session) }
            return nil
        }
    }

    /// Every session, named, and the registry left empty (the host is stopping).
    func takeAll() -> [(name: String, session: VMSession)] {
        lock.withLock {
            defer {
                vms = [:]
                offline = [:]
            }
            return vms.map { ($0.key, $0.value) } + offline.map { ("offline \($0.key)", $0.value) }
        }
    }

    /// The offline sessions, and none left (the host leaves its VMs serving).
    func takeOffline() -> [(disk: String, session: VMSession)] {
        lock.withLock {
            defer { offline = [:] }
            return offline.map { ($0.key, $0.value) }
        }
    }

    // MARK: disks a transfer holds

    func activity(_ disk: String) -> String? { lock.withLock { busy[disk] } }

    /// Marks every disk busy with `activity`, or none: returns a disk that was busy
    /// already and what with.
    func markBusy(_ disks: [String], doing activity: String) -> (disk: String, activity: String)? {
        lock.withLock {
            for disk in disks { if let other = busy[disk] { return (disk, other) } }
            for disk in disks { busy[disk] = activity }
            return nil
        }
    }

    func setActivity(_ disks: [String], _ activity: String) { lock.withLock { for disk in disks { busy[disk] = activity } } }
    func unmarkBusy(_ disks: [String]) { lock.withLock { for disk in disks { busy[disk] = nil } } }
}

/// The partner daemons this host runs, by plug-in name.
final class DaemonRegistry: @unchecked Sendable {
    // @unchecked: `daemons` is guarded by `lock`.
    private let lock = ConditionLock()
    private var daemons: [String: DaemonSupervisor] = [:]

    func daemon(_ plugin: String) -> DaemonSupervisor? { lock.withLock { daemons[plugin] } }
    func runs(_ plugin: String) -> Bool { lock.withLock { daemons[plugin] != nil } }
    func add(_ plugin: String, _ daemon: DaemonSupervisor) { lock.withLock { daemons[plugin] = daemon } }
    func remove(_ plugin: String) -> DaemonSupervisor? { lock.withLock { daemons.removeValue(forKey: plugin) } }
    var count: Int { lock.withLock { daemons.count } }

    /// Every daemon, and the registry left empty (the host is stopping).
    func takeAll() -> [DaemonSupervisor] {
        lock.withLock {
            defer { daemons = [:] }
            return Array(daemons.values)
        }
    }
}
