import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel
import IOFilterPosix

extension HostController {
    func diskRow(_ name: String, _ db: Database) throws -> DiskRow {
        guard let row = try DiskRow.fetchOne(db, key: name) else {
            throw ControlError.notFound("no disk named \(name) (see `iofilter disk list`)")
        }
        return row
    }

    func diskInfo(_ row: DiskRow, plugins: [PluginRow], policies: [PolicyRow]) -> DiskInfo {
        DiskInfo(
            name: row.name, path: row.path, sizeBytes: row.size, readOnly: row.readOnly, policy: row.policy, vm: row.vm,
            uri: server(of: row)?.worker.uri(row.name), attached: row.attached.map(\.entry),
            compliance: compliance(of: row, plugins: plugins, policies: policies), snapshotOf: row.snapshotOf,
            activity: sessions.activity(row.name), createdAt: row.createdAt, replicaOf: row.replicaOf, health: lastHealth(of: row.name, vm: row.vm),
            copy: row.copying == true ? snapshotCopies.copy(row.name)?.progress : nil, checkpoints: checkpoints(of: row.name).names())
    }

    public func listDisks() throws(ControlError) -> [DiskInfo] {
        try read { db in
            let (plugins, policies) = (try PluginRow.fetchAll(db), try PolicyRow.fetchAll(db))
            return try DiskRow.order(Column("name")).fetchAll(db).map { diskInfo($0, plugins: plugins, policies: policies) }
        }
    }

    public func showDisk(_ name: String) throws(ControlError) -> DiskInfo {
        try read { db in try diskInfo(diskRow(name, db), plugins: PluginRow.fetchAll(db), policies: PolicyRow.fetchAll(db)) }
    }

    /// Its compliance, with its health while it is served (sampled at most a second ago).
    public func diskCompliance(_ name: String) throws(ControlError) -> Compliance {
        let disk = try showDisk(name)
        var compliance = disk.compliance
        if let vm = disk.vm, sampler.sample(vm, maxAge: 0) != nil {
            compliance.health = lastHealth(of: name, vm: vm)
        }
        return compliance
    }

    static func parseSize(_ text: String) throws(ControlError) -> Int64 {
        guard let size = ParameterSpec.parseSize(text), size > 0 else {
            throw .badRequest("size '\(text)' is not a positive size (bytes, or with K, M, G or T)")
        }
        // Rounded up to whole sectors, as qemu-img does.
        guard size <= Int64.max - 511 else { throw .badRequest("size '\(text)' is too large") }
        return (size + 511) / 512 * 512
    }

    /// Refuses when a VM or offline session serves the disk.
    func requireIdle(_ row: DiskRow, for action: String) throws(ControlError) {
        try requireNotBusy(row.name)
        if let (what, worker) = server(of: row) {
            throw .conflict("cannot \(action) disk \(row.name) while \(what) serves it (\(worker.uri(row.name) ?? "")); stop it first")
        }
    }

    /// Attaches and detaches filters until the disk's chain is `desired`. The disk must
    /// be idle. `row` always ends up describing what is really attached, even when a
    /// step fails halfway.
    func reconcile(_ row: inout DiskRow, to desired: [PlannedFilter]) throws(ControlError) {
        let wanted = Set(desired.map(\.manifest.name))
        let removed = row.attached.map(\.manifest.name).filter { !wanted.contains($0) }
        if !removed.isEmpty {
            try maintain(row, filters: row.attached, task: .detach(plugins: removed))
            row.attached.removeAll { removed.contains($0.manifest.name) }
            event("filters-detached", row.name, removed.joined(separator: ", "))
        }
        let have = Set(row.attached.map(\.manifest.name))
        let added = desired.filter { !have.contains($0.manifest.name) }
        if !added.isEmpty {
            for path in desired.flatMap(\.filePaths) {
                try? FileManager.default.createDirectory(atPath: (path as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
            }
            try maintain(row, filters: desired, task: .attach)
            event("filters-attached", row.name, added.map { "\($0.manifest.name) \($0.manifest.version)" }.joined(separator: ", "))
        }
        row.attached = desired
        row.attachError = nil
    }

    /// The chain the disk's policy asks for now (empty without a policy).
    func desiredChain(_ row: DiskRow) throws(ControlError) -> [PlannedFilter] {
        guard let name = row.policy else { return [] }
        return try read { db in try plan(policyRow(name, db).policy, disk: row.name, plugins: PluginRow.fetchAll(db)) }
    }

    /// Applies the disk's policy now and saves the outcome, failed or not.
    func applyPolicy(_ row: inout DiskRow) throws(ControlError) {
        try applyReconcile(&row, to: desiredChain(row))
    }

    func newDiskRow(_ name: String, size: Int64, readOnly: Bool = false, snapshotOf: String? = nil) throws -> DiskRow {
        try Names.check(name, kind: "disk")
        try requireNotBusy(name)
        if try store.read({ db in try DiskRow.exists(db, key: name) }) {
            throw ControlError.conflict("a disk named \(name) exists")
        }
        let path = layout.disk(name)
        if FileManager.default.fileExists(atPath: path) {
            throw ControlError.conflict("\(path) exists but no disk record names it; move it away or import it under another name")
        }
        return DiskRow(name: name, path: path, size: size, readOnly: readOnly, policy: nil, attached: [], attachError: nil,
                       snapshotOf: snapshotOf, vm: nil, createdAt: StateStore.now())
    }

    /// Inserts a new disk whose file `fill` creates, then applies `policy`; any failure
    /// removes the file and the record again.
    func addDisk(_ row: DiskRow, policy: String?, fill: () throws -> Void) throws {
        if let policy { _ = try showPolicy(policy) }
        do {
            try fill()
            try store.write { db in try row.insert(db) }
            var added = row
            added.policy = policy
            if policy != nil { try applyPolicy(&added) }
        } catch {
            diskFiles.remove(row.name, path: row.path)
            _ = try? store.write { db in try DiskRow.deleteOne(db, key: row.name) }
            throw error
        }
    }

    public func createDisk(_ request: DiskCreateRequest) throws(ControlError) -> DiskInfo {
        let size = try Self.parseSize(request.size)
        try exclusive {
            let row = try newDiskRow(request.name, size: size)
            try addDisk(row, policy: request.policy) { try diskFiles.createSparse(row.path, size: size) }
            event("disk-created", row.name, "\(size) bytes\(request.policy.map { ", policy \($0)" } ?? "")")
        }
        return try showDisk(request.name)
    }

    /// Copies a raw image in as a new disk (holes stay holes), then applies the policy.
    public func importDisk(_ request: DiskImportRequest) throws(ControlError) -> DiskInfo {
        try allowedPaths.check(request.source, "the import source")
        var info = stat()
        guard stat(request.source, &info) == 0 else { throw .notFound("\(request.source): \(String(cString: strerror(errno)))") }
        guard (info.st_mode & S_IFMT) == S_IFREG else { throw .conflict("\(request.source) is not a regular file") }
        let size = Int64(info.st_size)
        guard size > 0, size % 512 == 0 else { throw .conflict("\(request.source) is \(size) bytes: not a raw disk image (a multiple of 512)") }
        try exclusive {
            let row = try newDiskRow(request.name, size: size)
            try addDisk(row, policy: request.policy) { try SparseCopy.copy(from: request.source, to: row.path, size: size) }
            event("disk-imported", row.name, "from \(request.source), \(size) bytes")
        }
        return try showDisk(request.name)
    }

    public func deleteDisk(_ name: String) throws(ControlError) -> DiskInfo {
        let info = try showDisk(name)
        try exclusive {
            var row = try store.read { db in try diskRow(name, db) }
            if let vm = row.vm { throw ControlError.conflict("disk \(name) belongs to VM \(vm); delete the VM first") }
            // A daemon may be writing it for another host right now: its stream would go
            // on into the deleted file. Promoted, it is refused and the disk is ours.
            if let keeper = row.replicaOf, daemons.runs(keeper) {
                throw ControlError.conflict("disk \(name) is a replica the daemon of \(keeper) keeps for another host; "
                                            + "`iofilter disk promote \(name)` first (its stream is refused from then on), then delete it")
            }
            try requireIdle(row, for: "delete")
            // Files its filters wrote for the host (a replica a policy put in the state
            // directory) go with it; what lies elsewhere is the operator's to remove.
            let ownFiles = Set(row.attached.flatMap(\.filePaths)).filter { diskFiles.isInsideStateDirectory($0) }.sorted()
            if !row.attached.isEmpty {
                // Let the filters clean up what they keep elsewhere; the data goes anyway.
                do {
                    try reconcile(&row, to: [])
                } catch {
                    logger.warning("disk \(name): detaching its filters before deletion failed: \(error)")
                }
            }
            _ = try store.write { db in try DiskRow.deleteOne(db, key: name) }
            diskFiles.remove(name, path: row.path)
            // A snapshot its source's VM worker still offers: no longer.
            if let copy = snapshotCopies.remove(name), copy.workerLives {
                _ = try? copy.session.supervisor.control(.releaseSnapshot(name: name), timeout: 10)
            }
            let removed = ownFiles.filter { unlink($0) == 0 }
            event("disk-deleted", name, removed.isEmpty ? "" : "with \(removed.joined(separator: ", "))")
        }
        return info
    }

    /// Grows an idle disk. Its filters are detached first and attached again after, so
    /// each starts over on the new size (a cache destages and starts cold; replication
    /// resyncs the whole disk).
    public func growDisk(_ name: String, _ request: DiskGrowRequest) throws(ControlError) -> DiskInfo {
        let size = try Self.parseSize(request.size)
        try exclusive {
            var row = try store.read { db in try diskRow(name, db) }
            try requireIdle(row, for: "grow")
            if row.readOnly { throw ControlError.conflict("disk \(name) is a read-only snapshot") }
            guard size > row.size else {
                throw ControlError.conflict("disk \(name) is \(row.size) bytes; it can only grow (shrinking would lose data)")
            }
            // The filters hear of it first (a write-back cache keeps its blocks, replication
            // its replica); any of them may veto, and then nothing changes.
            try deliver(.grow(newSize: UInt64(size)), to: row)
            guard truncate(row.path, off_t(size)) == 0 else {
                throw ControlError.conflict("cannot grow \(row.path): \(String(cString: strerror(errno)))")
            }
            row.size = size
            try store.write { db in try row.update(db) }
            event("disk-grown", name, "to \(size) bytes")
            for checkpoint in checkpoints(of: name).names() {
                event("checkpoint-inconsistent", name, "checkpoint \(checkpoint) does not cover the grown disk; delete it and take a full backup")
            }
        }
        return try showDisk(name)
    }

    /// `reconcile`, saving the outcome whether it worked or not: `row` ends up saying
    /// what is really attached, and why the last step failed if it did.
    func applyReconcile(_ row: inout DiskRow, to desired: [PlannedFilter]) throws(ControlError) {
        var outcome: ControlError?
        do {
            try reconcile(&row, to: desired)
        } catch {
            row.attachError = error.message
            outcome = error
        }
        let saved = row
        do {
            try store.write { db in try saved.update(db) }
        } catch {
            throw .internalError("cannot save disk \(row.name): \(error)")
        }
        if let outcome { throw outcome }
    }

    public func assignPolicy(_ name: String, _ request: DiskPolicyRequest) throws(ControlError) -> DiskInfo {
        try exclusive {
            var row = try store.read { db in try diskRow(name, db) }
            if let policy = request.policy { _ = try store.read { db in try policyRow(policy, db) } }
            if row.readOnly && request.policy != nil { throw ControlError.conflict("disk \(name) is a read-only snapshot; clone it to filter it") }
            if sessions.isServedOffline(name) {
                throw ControlError.conflict("disk \(name) is served by an offline session; stop it first")
            }
            try requireNotBusy(name)
            let previous = row
            row.policy = request.policy
            if let vm = row.vm, sessions.isRunning(vm) {
                // Applies at once: a new worker takes the VM's clients over.
                try store.write { db in try row.update(db) }
                do {
                    let report = try applyLive(vm)
                    event("policy-assigned", name, "\(request.policy ?? "none"); live in VM \(vm) (\(report.clients) client(s) taken over in \(String(format: "%.1f", report.stallMilliseconds)) ms)")
                } catch {
                    try store.write { db in try previous.update(db) }
                    throw error
                }
                return
            }
            do {
                try applyPolicy(&row)
            } catch {
                // Keep the old assignment; `attached` already says what really is.
                var reverted = row
                reverted.policy = previous.policy
                try? store.write { db in try reverted.update(db) }
                throw error
            }
            event("policy-assigned", name, request.policy ?? "none")
        }
        return try showDisk(name)
    }

    // MARK: offline access

    /// Runs `body` with a URI that serves the disk through its chain: its running VM's
    /// (reads only), its offline session's, or a temporary offline worker's.
    func withSource<T>(_ row: DiskRow, _ body: (String, String) throws -> T) throws -> T {
        if let (what, worker) = server(of: row), let uri = worker.uri(row.name) {
            return try body(uri, what)
        }
        let worker = try launch(name: "offline-\(row.name)", disks: [(row, row.attached, false)],
                                socketDirectory: layout.transferSockets)
        defer { worker.stop() }
        return try body(worker.uri(row.name)!, "offline worker")
    }

    /// Writes the disk, as its consumer sees it through its filters, to a new raw file.
    public func exportDisk(_ name: String, _ request: DiskExportRequest) throws(ControlError) -> TransferReport {
        try allowedPaths.check(request.path, "the export destination")
        var parent = ObjCBool(false)
        guard FileManager.default.fileExists(atPath: (request.path as NSString).deletingLastPathComponent, isDirectory: &parent), parent.boolValue else {
            throw .notFound("the directory of \(request.path) does not exist; exports create no directories")
        }
        guard !FileManager.default.fileExists(atPath: request.path) else { throw .conflict("\(request.path) exists; exports never overwrite") }
        let row = try read { db in try diskRow(name, db) }
        let started = monotonicNanoseconds()
        let (bytes, through) = try whileBusy([name], doing: "exporting to \(request.path)") { progress in
            try withSource(row) { uri, what in
                (try DiskTransfer.copy(from: uri, to: .newFile(path: request.path), logger: logger, progress: progress), what)
            }
        }
        event("disk-exported", name, "to \(request.path) through \(through)")
        return TransferReport(bytes: bytes, seconds: Double(monotonicNanoseconds() - started) / 1e9, through: through)
    }

    /// Copies one disk onto another: read through the source's chain, written through
    /// the target's.
    public func copyDisk(_ name: String, _ request: DiskCopyRequest, recording: Bool = true) throws(ControlError) -> TransferReport {
        let (source, target) = try read { db in (try diskRow(name, db), try diskRow(request.target, db)) }
        guard source.name != target.name else { throw .conflict("a disk cannot be copied onto itself") }
        if target.readOnly { throw .conflict("disk \(target.name) is a read-only snapshot") }
        guard target.size >= source.size else {
            throw .conflict("disk \(target.name) (\(target.size) bytes) is smaller than \(name) (\(source.size) bytes); grow it first")
        }
        let started = monotonicNanoseconds()
        try exclusive { try requireIdle(target, for: "copy onto") }
        let (bytes, through) = try whileBusy([name, target.name], doing: "copying \(name) onto \(target.name)") { progress in
            let writer = try launch(name: "offline-\(target.name)", disks: [(target, target.attached, false)],
                                    socketDirectory: layout.transferSockets)
            defer { writer.stop() }
            return try withSource(source) { uri, what in
                (try DiskTransfer.copy(from: uri, to: .nbd(uri: writer.uri(target.name)!), logger: logger, progress: progress), what)
            }
        }
        if recording { event("disk-copied", name, "onto \(target.name) through \(through)") }
        return TransferReport(bytes: bytes, seconds: Double(monotonicNanoseconds() - started) / 1e9, through: through)
    }

    /// A new disk with this disk's contents as its consumer sees them now: a read-only
    /// snapshot, or a clone with a policy of its own. The copy runs outside the change
    /// lock, with the source and the new name marked busy.
    func derive(_ name: String, _ request: DiskDeriveRequest, snapshot: Bool) throws(ControlError) -> DiskInfo {
        if snapshot && request.policy != nil { throw .badRequest("a snapshot is read-only and takes no policy; clone it instead") }
        if let policy = request.policy { _ = try showPolicy(policy) }
        let names = [name, request.name]
        let activity = "\(snapshot ? "snapshot" : "clone") \(name) as \(request.name)"
        let (source, row) = try exclusive {
            let source = try store.read { db in try diskRow(name, db) }
            let row = try newDiskRow(request.name, size: source.size, readOnly: snapshot, snapshotOf: snapshot ? name : nil)
            try markBusy(names, doing: activity)
            return (source, row)
        }
        defer { unmarkBusy(names) }
        // The filters hear of it before the copy (a snapshot quiesces the disk while they
        // flush); a veto leaves everything as it was.
        try deliver(snapshot ? .snapshot : .clone(target: request.name), to: source)
        do {
            _ = try withSource(source) { uri, _ in try DiskTransfer.copy(from: uri, to: .newFile(path: row.path), logger: logger) }
        } catch {
            unlink(row.path)
            throw Self.reported(error)
        }
        try exclusive {
            // The file is in place; recording it (and attaching the clone's policy)
            // removes it again if that fails.
            try addDisk(row, policy: request.policy) {}
            event(snapshot ? "disk-snapshot" : "disk-cloned", name, "as \(request.name)")
        }
        return try showDisk(request.name)
    }

    /// Delivers a lifecycle event to the disk's filters: through its VM's running worker,
    /// or a maintenance worker that opens the chain for it. A veto is a conflict naming
    /// the filter and its errno.
    func deliver(_ lifecycle: DiskLifecycleEvent, to disk: DiskRow) throws(ControlError) {
        guard !disk.attached.isEmpty else { return }
        if let vm = disk.vm, let worker = sessions.vm(vm) {
            let response: WorkerControlResponse
            do {
                response = try worker.supervisor.control(.event(disk: disk.name, event: lifecycle), timeout: 60)
            } catch {
                throw .workerFailed("VM \(vm) could not deliver the \(lifecycle) of disk \(disk.name): \(error)")
            }
            if let error = response.error { throw .conflict(error) }
        } else {
            try maintain(disk, filters: disk.attached, task: .event(lifecycle))
        }
        event("disk-event", disk.name, "\(lifecycle) delivered to " + disk.attached.map(\.manifest.name).joined(separator: ", "))
    }

    public func snapshotDisk(_ name: String, _ request: DiskDeriveRequest) throws(ControlError) -> DiskInfo {
        try takeSnapshot(name, request)
    }

    public func cloneDisk(_ name: String, _ request: DiskDeriveRequest) throws(ControlError) -> DiskInfo {
        try derive(name, request, snapshot: false)
    }

    /// Serves a disk no VM is running through its chain until `stopOffline`.
    public func serveOffline(_ name: String, _ request: OfflineServeRequest) throws(ControlError) -> OfflineSession {
        try exclusive {
            let row = try store.read { db in try diskRow(name, db) }
            try requireIdle(row, for: "serve")
            let worker = try launch(name: "offline-\(name)", disks: [(row, row.attached, request.readOnly)],
                                    socketDirectory: layout.offlineSockets)
            sessions.add(offline: name, worker)
            event("offline-serve", name, worker.uri(name) ?? "")
            return OfflineSession(disk: name, uri: worker.uri(name)!, readOnly: request.readOnly || row.readOnly, pid: worker.supervisor.pid)
        }
    }

    public func stopOffline(_ name: String) throws(ControlError) -> OfflineSession {
        let (session, copies) = try exclusive {
            _ = try store.read { db in try diskRow(name, db) }
            guard let worker = sessions.removeOffline(name) else {
                throw ControlError.notFound("disk \(name) has no offline session")
            }
            let session = OfflineSession(disk: name, uri: worker.uri(name) ?? "", readOnly: false, pid: worker.supervisor.pid)
            let copies = stopFinishingCopies(worker)
            event("offline-stopped", name, "")
            return (session, copies)
        }
        awaitSettled(copies)
        return session
    }
}

/// Copies a raw image, leaving all-zero blocks as holes.
enum SparseCopy {
    static func copy(from source: String, to destination: String, size: Int64) throws {
        let input = open(source, O_RDONLY | O_CLOEXEC)
        guard input >= 0 else { throw ControlError.badRequest("cannot open \(source): \(String(cString: strerror(errno)))") }
        defer { close(input) }
        let output = open(destination, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard output >= 0 else { throw ControlError.internalError("cannot create \(destination): \(String(cString: strerror(errno)))") }
        defer { close(output) }
        guard ftruncate(output, off_t(size)) == 0 else {
            throw ControlError.conflict("cannot size \(destination): \(String(cString: strerror(errno)))")
        }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var offset: Int64 = 0
        while offset < size {
            let length = Int(min(Int64(chunk), size - offset))
            var error = FileDescriptorIO.preadAll(input, into: buffer, count: length, offset: UInt64(offset))
            guard error == 0 else { throw ControlError.conflict("reading \(source) failed: \(String(cString: strerror(error)))") }
            if !DiskTransfer.isZero(buffer, length) {
                error = FileDescriptorIO.pwriteAll(output, buffer, count: length, offset: UInt64(offset))
                guard error == 0 else { throw ControlError.conflict("writing \(destination) failed: \(String(cString: strerror(error)))") }
            }
            offset += Int64(length)
        }
        guard fsync(output) == 0 else { throw ControlError.conflict("cannot sync \(destination): \(String(cString: strerror(errno)))") }
    }
}
