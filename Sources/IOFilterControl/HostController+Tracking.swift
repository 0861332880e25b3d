import Foundation
import GRDB
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterPosix
import IOFilterTracking

/// Backup: checkpoints (changed-block tracking), point-in-time snapshots copied by
/// copy-before-write in the worker that serves the disk, their NBD exports, and revert.
extension HostController {
    func checkpoints(of disk: String) -> CheckpointDirectory { CheckpointDirectory(diskState: layout.diskState(disk)) }

    // MARK: checkpoints

    public func listCheckpoints(_ disk: String) throws(ControlError) -> [CheckpointInfo] {
        _ = try read { db in try diskRow(disk, db) }
        let (bitmaps, failures) = checkpoints(of: disk).openAll(use: .read)
        for failure in failures { logger.warning("disk \(disk): checkpoint unreadable: \(failure)") }
        return bitmaps.map { CheckpointDirectory.describe($0, disk: disk, createdAt: Self.isoTime(nanoseconds: $0.createdAt)) }
    }

    public func createCheckpoint(_ disk: String, _ request: CheckpointCreateRequest) throws(ControlError) -> CheckpointInfo {
        let granularity = try Self.granularity(request.granularity)
        try Names.check(request.name, kind: "checkpoint")
        try exclusive {
            let row = try store.read { db in try diskRow(disk, db) }
            try requireNotBusy(disk)
            if row.readOnly { throw ControlError.conflict("disk \(disk) is read-only: it has no changes to track") }
            if checkpoints(of: disk).exists(request.name) { throw ControlError.conflict("disk \(disk) has a checkpoint \(request.name) already") }
            if let (what, worker) = server(of: row) {
                // The worker tracks from its next request on.
                try ask(worker, what, .checkpoint(disk: disk, change: .create(name: request.name, granularity: granularity)))
            } else {
                do {
                    _ = try checkpoints(of: disk).create(request.name, granularity: granularity, diskSize: UInt64(row.size))
                } catch {
                    throw ControlError.conflict("\(error)")
                }
            }
            event("checkpoint-created", disk, "\(request.name) (granularity \(granularity >> 10) KiB)")
        }
        return try checkpointInfo(disk, request.name)
    }

    public func deleteCheckpoint(_ disk: String, _ name: String) throws(ControlError) -> CheckpointInfo {
        let info = try checkpointInfo(disk, name)
        try exclusive {
            let row = try store.read { db in try diskRow(disk, db) }
            try requireNotBusy(disk)
            if let (what, worker) = server(of: row) {
                try ask(worker, what, .checkpoint(disk: disk, change: .delete(name: name)))
            } else {
                do {
                    try checkpoints(of: disk).remove(name)
                } catch {
                    throw ControlError.conflict("\(error)")
                }
            }
            event("checkpoint-deleted", disk, name)
        }
        return info
    }

    /// Before a worker opens these disks: checkpoints a worker of an earlier boot of the
    /// machine had in use may have missed writes that reached the disk; the worker will
    /// mark them inconsistent, and the operator hears of it now.
    func reportCheckpointsLostWithTheMachine(_ disks: [String]) {
        for disk in disks {
            for bitmap in checkpoints(of: disk).openAll(use: .read).bitmaps where bitmap.lostWithTheMachine {
                event("checkpoint-inconsistent", disk,
                      "checkpoint \(bitmap.name) may have missed changes (the machine went down while it was tracked); delete it and take a full backup")
            }
        }
    }

    func checkpointInfo(_ disk: String, _ name: String) throws(ControlError) -> CheckpointInfo {
        guard let info = try listCheckpoints(disk).first(where: { $0.name == name }) else {
            throw .notFound("disk \(disk) has no checkpoint \(name) (see `iofilter disk checkpoint list \(disk)`)")
        }
        return info
    }

    static func granularity(_ text: String?) throws(ControlError) -> UInt64 {
        guard let text else { return ChangeBitmap.defaultGranularity }
        guard let value = ParameterSpec.parseSize(text), value > 0, ChangeBitmap.isValidGranularity(UInt64(value)) else {
            throw .badRequest("granularity '\(text)' is not a power of two from 4K to 64M")
        }
        return UInt64(value)
    }

    /// A control request to a disk's worker; its refusal is a conflict.
    @discardableResult
    func ask(_ worker: VMSession, _ what: String, _ request: WorkerControlRequest, timeout: Double = 60) throws(ControlError) -> WorkerControlResponse {
        let response: WorkerControlResponse
        do {
            response = try worker.supervisor.control(request, timeout: timeout)
        } catch {
            throw .workerFailed("\(what) did not answer: \(error)")
        }
        if let error = response.error { throw .conflict(error) }
        return response
    }

    static func isoTime(nanoseconds: UInt64) -> String {
        ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: Double(nanoseconds) / 1e9))
    }

    // MARK: point-in-time snapshots

    /// Takes a point-in-time snapshot: the worker serving the disk (its VM's, or one
    /// started for this) quiesces it, lets the filters flush, and from that instant
    /// preserves every block before it is overwritten while it copies the rest in the
    /// background. The snapshot is a disk at once (read it with `nbdExport`); it is
    /// marked copying until the copy is complete, and removed if the copy fails. While
    /// the disk's VM runs the answer comes at the instant (unless `wait`); a disk no VM
    /// runs is copied before the answer.
    func takeSnapshot(_ name: String, _ request: DiskDeriveRequest) throws(ControlError) -> DiskInfo {
        if request.policy != nil { throw .badRequest("a snapshot is read-only and takes no policy; clone it instead") }
        let granularity = try Self.granularity(request.granularity)
        var rate: UInt64?
        if let text = request.rate {
            guard let value = ParameterSpec.parseSize(text), value > 0 else { throw .badRequest("rate '\(text)' is not a positive size per second") }
            rate = UInt64(value)
        }
        if let checkpoint = request.checkpoint { try Names.check(checkpoint, kind: "checkpoint") }
        let snapshot = request.name
        let (source, row, worker, what, ownsWorker) = try exclusive {
            let source = try store.read { db in try diskRow(name, db) }
            if source.copying == true {
                throw ControlError.conflict("disk \(name) is a snapshot still being copied; snapshot it once its copy is complete")
            }
            if let checkpoint = request.checkpoint, checkpoints(of: name).exists(checkpoint) {
                throw ControlError.conflict("disk \(name) has a checkpoint \(checkpoint) already")
            }
            var row = try newDiskRow(snapshot, size: source.size, readOnly: true, snapshotOf: name)
            row.copying = true
            if let (what, worker) = server(of: source) {
                try markBusy([snapshot], doing: "snapshot of \(name) being taken")
                return (source, row, worker, what, false)
            }
            try markBusy([snapshot, name], doing: "snapshot of \(name) being taken")
            do {
                let worker = try launch(name: "snapshot-\(snapshot)", disks: [(source, source.attached, false)], socketDirectory: layout.transferSockets)
                return (source, row, worker, "its snapshot worker", true)
            } catch {
                unmarkBusy([snapshot, name])
                throw error
            }
        }
        func giveUp() {
            if ownsWorker {
                worker.stop()
                unmarkBusy([name])
            }
            unmarkBusy([snapshot])
        }
        let progress: SnapshotProgress
        let generation = worker.supervisor.generation
        do {
            let options = SnapshotOptions(checkpoint: request.checkpoint, granularity: granularity, bytesPerSecond: rate)
            guard let answer = try ask(worker, what, .snapshot(disk: name, name: snapshot, options: options)).snapshot else {
                throw ControlError.workerFailed("\(what) took the snapshot but said nothing of its copy")
            }
            progress = answer
            try store.write { db in try row.insert(db) }
        } catch {
            SnapshotStaging(diskState: layout.diskState(name), name: snapshot).remove()
            giveUp()
            throw Self.reported(error)
        }
        if !source.attached.isEmpty {
            event("disk-event", name, "snapshot delivered to " + source.attached.map(\.manifest.name).joined(separator: ", "))
        }
        if let checkpoint = request.checkpoint { event("checkpoint-created", name, "\(checkpoint) at the instant of snapshot \(snapshot)") }
        event("disk-snapshot", name, "as \(snapshot) (point in time; \(source.size >> 20) MiB copying in the background through \(what))")
        snapshotCopies.add(.init(snapshot: snapshot, source: name, session: worker, ownsSession: ownsWorker, generation: generation, progress: progress))
        sessions.setActivity(ownsWorker ? [snapshot, name] : [snapshot], "copying: 0%")
        startThread(name: "snapshot-watch") { [weak self] in self?.watchCopy(snapshot, row: row) }
        // A disk no VM runs has nothing to go on with meanwhile: its copy is the job.
        if request.wait == true || ownsWorker {
            _ = snapshotCopies.waitUntilFinished(snapshot, seconds: 24 * 3600)
            guard try read({ db in try DiskRow.exists(db, key: snapshot) }) else {
                throw .conflict("the snapshot \(snapshot) failed while it was copied; see `iofilter events --severity error`")
            }
        }
        return try showDisk(snapshot)
    }

    /// Follows a copy until it is complete (the snapshot moves into place) or fails
    /// (it is removed). A worker that stopped or restarted took the copy with it.
    private func watchCopy(_ snapshot: String, row: DiskRow) {
        var silentSince: UInt64?
        while let copy = snapshotCopies.copy(snapshot), !copy.finished {
            usleep(200_000)
            let answer: WorkerControlResponse
            do {
                answer = try copy.session.supervisor.control(.snapshotStatus(name: snapshot), timeout: 10)
            } catch {
                // Restarting, or busy: a worker that comes back no longer has the copy.
                let now = monotonicNanoseconds()
                if now - (silentSince ?? now) > 30_000_000_000 || !copy.workerLives {
                    settleAfterWorker(copy, row: row, reason: "its worker stopped before the copy was complete (\(error))")
                    return
                }
                silentSince = silentSince ?? now
                continue
            }
            silentSince = nil
            guard let progress = answer.snapshot, copy.workerLives else {
                settleAfterWorker(copy, row: row, reason: "its worker restarted before the copy was complete (\(answer.error ?? "no answer"))")
                return
            }
            snapshotCopies.update(snapshot, progress)
            switch progress.state {
            case .copying:
                let percent = progress.totalBytes == 0 ? 100 : progress.preservedBytes * 100 / progress.totalBytes
                sessions.setActivity(copy.ownsSession ? [snapshot, copy.source] : [snapshot], "copying: \(percent)%")
            case .complete:
                completeCopy(copy, row: row, progress: progress)
                return
            case .failed:
                abandonCopy(snapshot, row: row, reason: progress.error ?? "the copy failed")
                return
            }
        }
    }

    /// The worker that made the copy is gone: one that finished it as it stopped
    /// recorded so beside the data; any other copy is lost.
    private func settleAfterWorker(_ copy: SnapshotCopies.Copy, row: DiskRow, reason: String) {
        if !copy.workerLives, let progress = SnapshotStaging(diskState: layout.diskState(copy.source), name: copy.snapshot).recordedCompletion {
            completeCopy(copy, row: row, progress: progress)
        } else {
            abandonCopy(copy.snapshot, row: row, reason: reason)
        }
    }

    /// Stops a worker that may be copying snapshots: with its consumers gone it
    /// finishes them at full speed (the snapshots are kept), so it gets the time that
    /// takes at a slow disk's pace besides the usual grace.
    /// Returns the snapshots it was copying: call `awaitSettled` with them once the
    /// operation lock is released (their watchers move them into place under it).
    func stopFinishingCopies(_ session: VMSession) -> [String] {
        let running = snapshotCopies.running(in: session)
        let remaining = running.reduce(UInt64(0)) { $0 + ($1.progress.totalBytes - min($1.progress.preservedBytes, $1.progress.totalBytes)) }
        if remaining > 0 { logger.info("stopping a worker that finishes \(remaining >> 20) MiB of snapshot copies first") }
        session.stop(timeout: 20 + Double(remaining) / Double(Self.slowestCopyBytesPerSecond))
        snapshotCopies.forgetFinished(in: session)
        return running.map(\.snapshot)
    }

    /// Waits until the watchers of these copies moved them into place (or removed them),
    /// so that whoever stopped their worker finds them settled.
    func awaitSettled(_ snapshots: [String]) {
        for snapshot in snapshots { _ = snapshotCopies.waitUntilFinished(snapshot, seconds: 60) }
    }

    /// The pace a stopping worker's copies are given time for.
    static let slowestCopyBytesPerSecond: UInt64 = 32 << 20

    /// Moves a complete snapshot's file and frozen checkpoints into place.
    private func completeCopy(_ copy: SnapshotCopies.Copy, row: DiskRow, progress: SnapshotProgress) {
        do {
            try exclusive { try moveIntoPlace(row, source: copy.source, progress: progress) }
        } catch {
            abandonCopy(copy.snapshot, row: row, reason: "\(error)")
            return
        }
        if copy.ownsSession {
            copy.session.stop()
            unmarkBusy([copy.source])
        }
        unmarkBusy([copy.snapshot])
        snapshotCopies.finish(copy.snapshot, keepOffering: !copy.ownsSession)
    }

    /// Caller holds the operation lock.
    private func moveIntoPlace(_ row: DiskRow, source: String, progress: SnapshotProgress) throws(ControlError) {
        let staging = SnapshotStaging(diskState: layout.diskState(source), name: row.name)
        guard rename(staging.data, row.path) == 0 else {
            throw .internalError("cannot move the snapshot into place: \(String(cString: strerror(errno)))")
        }
        let state = layout.diskState(row.name)
        try? FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
        if rename(staging.checkpoints.path, checkpoints(of: row.name).path) != 0 {
            logger.warning("snapshot \(row.name): its frozen checkpoints could not be moved: \(String(cString: strerror(errno)))")
        }
        staging.remove()
        var done = row
        done.copying = nil
        do {
            try store.write { db in try done.update(db) }
        } catch {
            throw Self.reported(error)
        }
        event("snapshot-complete", row.name,
              "\(progress.writtenBytes >> 20) MiB of data of \(progress.totalBytes >> 20) MiB copied in \(String(format: "%.1f", progress.seconds))s")
    }

    /// Removes a snapshot whose copy cannot be completed: never a snapshot that might
    /// be wrong.
    private func abandonCopy(_ snapshot: String, row: DiskRow, reason: String) {
        guard let copy = snapshotCopies.remove(snapshot) else { return }
        _ = try? exclusive {
            _ = try store.write { db in try DiskRow.deleteOne(db, key: snapshot) }
            SnapshotStaging(diskState: layout.diskState(copy.source), name: snapshot).remove()
            event("snapshot-failed", snapshot, "snapshot of \(copy.source) removed: \(reason)")
        }
        if copy.ownsSession {
            copy.session.stop()
            unmarkBusy([copy.source])
        } else {
            _ = try? copy.session.supervisor.control(.releaseSnapshot(name: snapshot), timeout: 10)
        }
        unmarkBusy([snapshot])
        snapshotCopies.finish(snapshot, keepOffering: false)
    }

    /// Snapshots whose copy a worker of a previous run was making: that worker is gone,
    /// with its copy unless it recorded it complete as it stopped; the others are
    /// removed (with what their copy left).
    func settleUnfinishedSnapshots() {
        let rows = (try? store.read { db in try DiskRow.filter(Column("copying") == true).fetchAll(db) }) ?? []
        for row in rows {
            // Its source's worker, adopted from the previous host, may still be copying it.
            if let source = row.snapshotOf, let vm = try? store.read({ db in try DiskRow.fetchOne(db, key: source)?.vm }),
               let session = sessions.vm(vm),
               let progress = try? session.supervisor.control(.snapshotStatus(name: row.name), timeout: 10).snapshot, progress.state != .failed {
                snapshotCopies.add(.init(snapshot: row.name, source: source, session: session, ownsSession: false,
                                         generation: session.supervisor.generation, progress: progress))
                sessions.setActivity([row.name], "copying")
                logger.info("snapshot \(row.name): its copy goes on in the adopted worker of VM \(vm)")
                startThread(name: "snapshot-watch") { [weak self] in self?.watchCopy(row.name, row: row) }
                continue
            }
            if let source = row.snapshotOf, let progress = SnapshotStaging(diskState: layout.diskState(source), name: row.name).recordedCompletion,
               (try? moveIntoPlace(row, source: source, progress: progress)) != nil {
                continue
            }
            _ = try? store.write { db in try DiskRow.deleteOne(db, key: row.name) }
            if let source = row.snapshotOf { SnapshotStaging(diskState: layout.diskState(source), name: row.name).remove() }
            event("snapshot-failed", row.name, "snapshot of \(row.snapshotOf ?? "?") removed: the host stopped before its copy was complete")
        }
    }

    /// At shutdown: copies still running end with their workers.
    func abandonRunningCopies() {
        for copy in snapshotCopies.takeAll() where !copy.finished {
            guard let row = try? store.read({ db in try DiskRow.fetchOne(db, key: copy.snapshot) }) else { continue }
            snapshotCopies.add(copy)
            abandonCopy(copy.snapshot, row: row, reason: "the host stopped before its copy was complete")
        }
    }

    // MARK: reading a disk over NBD

    /// Where `disk` can be read over NBD now: a snapshot through the worker that offers
    /// it (its copy may still run), a disk through its VM or offline session, or else a
    /// new read-only offline session (stopped with `stopOffline`).
    public func nbdExport(_ disk: String) throws(ControlError) -> NBDExportInfo {
        let row = try read { db in try diskRow(disk, db) }
        if let copy = snapshotCopies.copy(disk), copy.workerLives,
           let uri = copy.session.uri(copy.source, export: disk) {
            let through = copy.ownsSession ? "its snapshot worker" : server(of: try read { db in try diskRow(copy.source, db) })?.what ?? "its source's worker"
            return NBDExportInfo(disk: disk, uri: uri, readOnly: true, through: through)
        }
        if let (what, worker) = server(of: row), let uri = worker.uri(disk) {
            return NBDExportInfo(disk: disk, uri: uri, readOnly: row.readOnly, through: what)
        }
        let session = try serveOffline(disk, OfflineServeRequest(readOnly: true))
        return NBDExportInfo(disk: disk, uri: session.uri, readOnly: true, through: "offline session")
    }

    // MARK: revert

    /// Replaces a stopped disk's contents with one of its snapshots': the filters hear
    /// first (a cache drops its blocks, replication plans a resync; any may veto), then
    /// every block is written through the disk's chain, so the checkpoints record it.
    public func revertDisk(_ name: String, _ request: DiskRevertRequest) throws(ControlError) -> TransferReport {
        let (target, snapshot) = try read { db in (try diskRow(name, db), try diskRow(request.snapshot, db)) }
        guard snapshot.snapshotOf == name else {
            throw .conflict("disk \(request.snapshot) is not a snapshot of \(name)")
        }
        if snapshot.copying == true { throw .conflict("snapshot \(request.snapshot) is still being copied; revert once it is complete") }
        if target.readOnly { throw .conflict("disk \(name) is read-only") }
        guard snapshot.size == target.size else {
            throw .conflict("snapshot \(request.snapshot) is \(snapshot.size) bytes and disk \(name) \(target.size): it grew since")
        }
        try exclusive { try requireIdle(target, for: "revert") }
        try whileBusy([name], doing: "reverting to \(request.snapshot)") {
            try deliver(.revert(snapshot: request.snapshot), to: target)
        }
        let report = try copyDisk(request.snapshot, DiskCopyRequest(target: name), recording: false)
        event("disk-reverted", name, "to snapshot \(request.snapshot): \(report.bytes >> 20) MiB written through its chain")
        return report
    }
}
