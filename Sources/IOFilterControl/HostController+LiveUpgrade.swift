import Foundation
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterPosix

/// Live changes of a running VM's chains — a newer plug-in, another policy, other
/// parameters — without a restart its clients would see: a new worker with the new
/// chains stands by (plug-ins loaded and checked), the old worker answers what its
/// clients sent, closes its filters and hands every client's socket and negotiated
/// state over, and the new worker opens the disks and goes on serving each client
/// where it was. If the new worker cannot take over, a worker with the old chains does.
extension HostController {
    public func upgradeFilters(_ name: String) throws(ControlError) -> LiveUpgradeReport {
        try exclusive { try applyLive(name) }
    }

    /// Caller holds the operation lock.
    func applyLive(_ name: String) throws(ControlError) -> LiveUpgradeReport {
        let row = try read { db in try vmRow(name, db) }
        guard let old = sessions.vm(name) else {
            throw .conflict("VM \(name) is not running; its disks get their policies' chains when it starts")
        }
        var disks: [DiskRow] = []
        var chains: [[PlannedFilter]] = []
        var changes: [String] = []
        for diskName in row.disks {
            let disk = try read { db in try diskRow(diskName, db) }
            try requireNotBusy(diskName)
            let desired = try desiredChain(disk)
            changes += Self.changes(of: disk.name, from: disk.attached, to: desired)
            disks.append(disk)
            chains.append(desired)
        }
        guard !changes.isEmpty else {
            return LiveUpgradeReport(vm: name, changes: [], clients: 0, stallMilliseconds: 0, pid: old.supervisor.pid)
        }
        if !snapshotCopies.running(in: old).isEmpty {
            throw .conflict("VM \(name) is copying a snapshot in its worker; change its filters once the copy is complete")
        }
        // The filters hear first (ABI 1.6), and any may refuse: then nothing changes.
        for (disk, chain) in zip(disks, chains) where !disk.attached.isEmpty {
            var versions: [String: String] = [:]
            for filter in disk.attached {
                versions[filter.manifest.name] = chain.first { $0.manifest.name == filter.manifest.name }?.manifest.version ?? ""
            }
            try ask(old, "VM \(name)'s worker", .event(disk: disk.name, event: .upgrade(versions: versions)))
        }
        for path in chains.flatMap({ $0.flatMap(\.filePaths) }) {
            try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        }
        let successor: VMSession
        do {
            successor = try launch(name: name, isVM: true, disks: zip(disks, chains).map { ($0, $1, false) }, socketDirectory: layout.vm(name),
                                   limits: row.limits, tls: row.tls, succeeding: old)
        } catch {
            throw .workerFailed("the worker with the new chain did not start: \(error.message); VM \(name) goes on with its old chain")
        }
        // From here the clients wait: the old worker stops reading their requests.
        let started = monotonicNanoseconds()
        let clients = handOverClients(of: old, vm: name)
        defer { clients.fds.forEach { close($0) } }
        // Filters the new chains no longer name leave the disk now that nothing runs in
        // them (a cache has destaged as it closed).
        for index in disks.indices {
            let wanted = Set(chains[index].map(\.manifest.name))
            if disks[index].attached.contains(where: { !wanted.contains($0.manifest.name) }) {
                do {
                    try applyReconcile(&disks[index], to: disks[index].attached.filter { wanted.contains($0.manifest.name) })
                } catch {
                    logger.warning("VM \(name): a filter could not be detached from \(disks[index].name): \(error)")
                }
            }
        }
        do {
            try adopt(clients, into: successor)
        } catch {
            successor.retire(timeout: 5)
            try rollBack(name, row: row, old: old, disks: disks, clients: clients, reason: error.message)
        }
        let stall = Double(monotonicNanoseconds() - started) / 1e6
        successor.supervisor.tookOver()
        old.retire(timeout: 5)
        sessions.replace(vm: name, with: successor)
        do {
            try store.write { db in
                for (disk, chain) in zip(disks, chains) {
                    var attached = disk
                    attached.attached = chain
                    attached.attachError = nil
                    try attached.update(db)
                }
            }
        } catch {
            throw Self.reported(error)
        }
        event("filters-changed-live", name, "\(changes.joined(separator: "; ")); \(clients.fds.count) client(s) handed over in \(String(format: "%.1f", stall)) ms")
        return LiveUpgradeReport(vm: name, changes: changes, clients: clients.fds.count, stallMilliseconds: stall, pid: successor.supervisor.pid)
    }

    /// The old worker's clients, their sockets and negotiated states; none if it died
    /// (its clients saw their connection end) or could not say.
    private func handOverClients(of old: VMSession, vm: String) -> (states: [String], fds: [Int32]) {
        do {
            let (answer, fds) = try old.supervisor.control(.handOver, sending: [], timeout: 60)
            guard answer.error == nil, let states = answer.handedOver, states.count == fds.count else {
                fds.forEach { close($0) }
                logger.warning("VM \(vm): its old worker handed over no clients: \(answer.error ?? "its answer did not match its sockets")")
                return ([], [])
            }
            return (states, fds)
        } catch {
            logger.warning("VM \(vm): its old worker did not hand its clients over (\(error)); they lost their connections")
            return ([], [])
        }
    }

    private func adopt(_ clients: (states: [String], fds: [Int32]), into session: VMSession) throws(ControlError) {
        let answer: WorkerControlResponse
        do {
            let (response, extra) = try session.supervisor.control(.adopt(connections: clients.states), sending: clients.fds, timeout: 60)
            extra.forEach { close($0) }
            answer = response
        } catch {
            throw .workerFailed("\(error)")
        }
        if let error = answer.error { throw .workerFailed(error) }
    }

    /// The new worker could not take over: one with the chains the disks have (the old
    /// ones, less filters detached meanwhile) takes the clients; the change is refused.
    private func rollBack(_ name: String, row: VMRow, old: VMSession, disks: [DiskRow], clients: (states: [String], fds: [Int32]),
                          reason: String) throws(ControlError) -> Never {
        let fallback: VMSession
        do {
            fallback = try launch(name: name, isVM: true, disks: disks.map { ($0, $0.attached, false) }, socketDirectory: layout.vm(name),
                                  limits: row.limits, tls: row.tls, succeeding: old)
            try adopt(clients, into: fallback)
        } catch {
            _ = sessions.removeVM(name)
            old.stop(timeout: 5)
            event("filters-change-failed", name, "\(reason); no worker with the old chain could take over either (\(error.message)): VM stopped")
            throw .workerFailed("the new worker could not take over (\(reason)), nor one with the old chain (\(error.message)); VM \(name) is stopped")
        }
        fallback.supervisor.tookOver()
        old.retire(timeout: 5)
        sessions.replace(vm: name, with: fallback)
        event("filters-change-failed", name, "\(reason); a worker with the old chain took the \(clients.fds.count) client(s) over")
        throw .workerFailed("the new worker could not take over: \(reason); VM \(name) goes on with its old chain")
    }

    /// What differs between two chains of a disk, for the operator.
    static func changes(of disk: String, from attached: [PlannedFilter], to desired: [PlannedFilter]) -> [String] {
        var changes: [String] = []
        for filter in desired {
            if let before = attached.first(where: { $0.manifest.name == filter.manifest.name }) {
                if before.manifest.version != filter.manifest.version {
                    changes.append("\(disk): \(filter.manifest.name) \(before.manifest.version) → \(filter.manifest.version)")
                } else if before.parameters != filter.parameters {
                    changes.append("\(disk): \(filter.manifest.name) parameters changed")
                }
            } else {
                changes.append("\(disk): \(filter.manifest.name) \(filter.manifest.version) attached")
            }
        }
        for filter in attached where !desired.contains(where: { $0.manifest.name == filter.manifest.name }) {
            changes.append("\(disk): \(filter.manifest.name) detached")
        }
        return changes
    }
}
