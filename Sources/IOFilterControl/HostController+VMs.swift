import Foundation
import GRDB
import IOFilterAPI
import IOFilterHost
import IOFilterModel

extension HostController {
    func vmRow(_ name: String, _ db: Database) throws -> VMRow {
        guard let row = try VMRow.fetchOne(db, key: name) else {
            throw ControlError.notFound("no VM named \(name) (see `iofilter vm list`)")
        }
        return row
    }

    /// A VM as the API shows it. With statistics, its worker is sampled `maxAge` seconds
    /// ago at most (the sampler answers concurrent readers from one question); without,
    /// the last sample's health and rates come along for free.
    func vmInfo(_ row: VMRow, withStatistics: Bool, maxAge: Double = 0) -> VMInfo {
        let worker = sessions.vm(row.name)
        let sample = withStatistics ? sampler.sample(row.name, maxAge: maxAge) : sampler.latest(row.name)
        var uris: [String: String] = [:]
        for disk in row.disks { uris[disk] = worker?.uri(disk) }
        var info = VMInfo(
            name: row.name, disks: row.disks, state: worker == nil ? .stopped : .running, pid: worker?.supervisor.pid,
            restarts: worker?.supervisor.restarts ?? 0, uris: uris, filters: withStatistics ? sample?.statistics ?? [] : [],
            startedAt: worker == nil ? nil : row.startedAt, createdAt: row.createdAt, limits: row.limits, tls: row.tls)
        if row.vhostUserBlk == true {
            info.vhostUserSockets = Dictionary(uniqueKeysWithValues: row.disks.map { ($0, layout.vhostUserSocket(vm: row.name, disk: $0)) })
        }
        if worker != nil {
            info.health = sample?.health
            info.rates = sample?.rates
        }
        return info
    }

    public func listVMs() throws(ControlError) -> [VMInfo] {
        let rows: [VMRow]
        do {
            rows = try store.allVMRows()
        } catch {
            throw .internalError("cannot read the state database: \(error)")
        }
        return rows.map { vmInfo($0, withStatistics: false) }
    }

    /// One VM, with each filter's live statistics while it runs: fresh for a caller who
    /// asks once, at most `maxAge` seconds old for one that asks every second (the
    /// console's live stream), so that any number of those cost the worker one question.
    public func showVM(_ name: String, maxAge: Double = 0) throws(ControlError) -> VMInfo {
        vmInfo(try read { db in try vmRow(name, db) }, withStatistics: true, maxAge: maxAge)
    }

    public func createVM(_ request: VMCreateRequest) throws(ControlError) -> VMInfo {
        try Names.check(request.name, kind: "VM")
        guard !request.disks.isEmpty else { throw .badRequest("a VM needs at least one disk") }
        guard Set(request.disks).count == request.disks.count else { throw .badRequest("a disk is named twice") }
        if let problem = request.limits?.problem { throw .badRequest(problem) }
        if let tls = request.tls {
            if let problem = tls.problem { throw .badRequest("tls: \(problem)") }
            if let file = tls.pskFile { try allowedPaths.check(file, "the TLS PSK file") }
            if let directory = tls.certificatesDirectory { try allowedPaths.check(directory, "the TLS certificates directory") }
        }
        try exclusive {
            try store.write { db in
                if try VMRow.exists(db, key: request.name) { throw ControlError.conflict("a VM named \(request.name) exists") }
                for name in request.disks {
                    let disk = try diskRow(name, db)
                    if let owner = disk.vm { throw ControlError.conflict("disk \(name) already belongs to VM \(owner)") }
                    if sessions.isServedOffline(name) {
                        throw ControlError.conflict("disk \(name) is served by an offline session; stop it first")
                    }
                }
                try VMRow(name: request.name, disks: request.disks, desiredState: "stopped", startedAt: nil, createdAt: StateStore.now(),
                          memoryLimit: request.limits?.memoryLimit.map(Int64.init), maxConnections: request.limits?.maxConnections,
                          cpuWeight: request.limits?.cpuWeight, tls: request.tls, vhostUserBlk: request.vhostUserBlk == true ? true : nil)
                    .insert(db)
                for name in request.disks {
                    var disk = try diskRow(name, db)
                    disk.vm = request.name
                    try disk.update(db)
                }
            }
            event("vm-created", request.name, "disks \(request.disks.joined(separator: ", "))\(request.vhostUserBlk == true ? ", over NBD and vhost-user-blk" : "")")
        }
        return try showVM(request.name)
    }

    public func deleteVM(_ name: String) throws(ControlError) -> VMInfo {
        let info = try showVM(name)
        try exclusive {
            if sessions.isRunning(name) { throw ControlError.conflict("VM \(name) is running; stop it first") }
            try store.write { db in
                let row = try vmRow(name, db)
                for disk in row.disks {
                    guard var diskRow = try DiskRow.fetchOne(db, key: disk) else { continue }
                    diskRow.vm = nil
                    try diskRow.update(db)
                }
                _ = try VMRow.deleteOne(db, key: name)
            }
            try? FileManager.default.removeItem(atPath: layout.vm(name))
            sampler.forget(name)
            event("vm-deleted", name, "its disks are kept")
        }
        return info
    }

    /// Starts the VM's worker: applies each disk's policy first (filters a policy no
    /// longer names are detached; new ones attach as the worker opens the disk), then
    /// serves every disk on its own unix socket.
    public func startVM(_ name: String, resuming: Bool = false) throws(ControlError) -> VMInfo {
        try exclusive {
            let row = try store.read { db in try vmRow(name, db) }
            if sessions.isRunning(name) {
                throw ControlError.conflict("VM \(name) is already running")
            }
            if let adopted = adoptLeftoverWorker(of: row) {
                sessions.add(vm: name, adopted)
                event("vm-adopted", name, "worker \(adopted.supervisor.pid.map(String.init) ?? "?") serves on: the previous host left it serving")
                return
            }
            var disks: [DiskRow] = []
            var chains: [[PlannedFilter]] = []
            for diskName in row.disks {
                var disk = try store.read { db in try diskRow(diskName, db) }
                if sessions.isServedOffline(diskName) {
                    throw ControlError.conflict("disk \(diskName) is served by an offline session; stop it first")
                }
                try requireNotBusy(diskName)
                let desired = try desiredChain(disk)
                let wanted = Set(desired.map(\.manifest.name))
                let removed = disk.attached.filter { !wanted.contains($0.manifest.name) }
                if !removed.isEmpty {
                    try applyReconcile(&disk, to: disk.attached.filter { wanted.contains($0.manifest.name) })
                }
                for path in desired.flatMap(\.filePaths) {
                    try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
                }
                disks.append(disk)
                chains.append(desired)
            }
            let worker: VMSession
            do {
                worker = try launch(name: name, isVM: true, disks: zip(disks, chains).map { ($0, $1, false) }, socketDirectory: layout.vm(name),
                                    limits: row.limits, tls: row.tls, vhostUserBlk: row.vhostUserBlk == true)
            } catch {
                for var disk in disks {
                    disk.attachError = "VM \(name) could not start: \(error)"
                    let saved = disk
                    _ = try? store.write { db in try saved.update(db) }
                }
                throw error
            }
            sessions.add(vm: name, worker)
            try store.write { db in
                var updated = row
                updated.desiredState = "running"
                updated.startedAt = StateStore.timestamp(worker.startedAt)
                try updated.update(db)
                for (disk, chain) in zip(disks, chains) {
                    var attached = disk
                    attached.attached = chain
                    attached.attachError = nil
                    try attached.update(db)
                }
            }
            event(resuming ? "vm-resumed" : "vm-started", name, "worker \(worker.supervisor.pid.map(String.init) ?? "?")")
        }
        return try showVM(name)
    }

    /// Stops the VM's worker: its filters flush, destage and close first.
    /// Snapshot copies its worker was making are finished first and kept.
    public func stopVM(_ name: String) throws(ControlError) -> VMInfo {
        let copies = try exclusive {
            var row = try store.read { db in try vmRow(name, db) }
            guard let worker = sessions.removeVM(name) else {
                throw ControlError.conflict("VM \(name) is not running")
            }
            let copies = stopFinishingCopies(worker)
            row.desiredState = "stopped"
            let saved = row
            try store.write { db in try saved.update(db) }
            event("vm-stopped", name, "")
            return copies
        }
        awaitSettled(copies)
        return try showVM(name)
    }
}
