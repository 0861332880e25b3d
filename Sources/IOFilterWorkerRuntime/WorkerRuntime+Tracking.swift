import FoundationEssentials
import Glibc
import IOFilterChain
import IOFilterModel
import IOFilterPosix
import IOFilterTracking

/// Checkpoints and point-in-time snapshots of the disks this worker serves.
extension WorkerRuntime {
    func chainAndCatalog(_ disk: String) throws(ChainError) -> (Chain, ChainCatalog, DiskConfiguration) {
        guard let index = chains.firstIndex(where: { $0.diskName == disk }) else { throw .backend("this worker has no disk \(disk)") }
        return (chains[index], catalogs[index], configuration.disks[index])
    }

    /// Takes a point-in-time snapshot of `disk` named `name`: the filters hear of it
    /// (and may veto) with the disk quiesced, and at that instant its checkpoints are
    /// frozen into the snapshot and copy-before-write begins; the copy goes on in the
    /// background while the snapshot is offered by this disk's server.
    public func takeSnapshot(of disk: String, name: String, options: SnapshotOptions) throws(ChainError) -> SnapshotProgress {
        let (chain, catalog, configuration) = try chainAndCatalog(disk)
        guard ResourceName.isValid(name) else { throw .backend("'\(name)' is no valid snapshot name") }
        guard name != disk, catalog.snapshot(named: name) == nil else { throw .backend("disk \(disk) has a snapshot \(name) already") }
        let diskState = Self.sidecarRoot(configuration, in: self.configuration)
        if let checkpoint = options.checkpoint, CheckpointDirectory(diskState: diskState).exists(checkpoint) {
            throw .backend("disk \(disk) has a checkpoint \(checkpoint) already")
        }
        let staging = SnapshotStaging(diskState: diskState, name: name)
        do {
            try staging.checkpoints.makeDirectory()
        } catch {
            throw .backend("cannot make the snapshot's directory: \(error)")
        }
        let target = open(staging.data, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard target >= 0 else {
            let reason = errno == EEXIST ? "a snapshot \(name) of disk \(disk) is being made already" : String(cString: strerror(errno))
            throw .backend("cannot create the snapshot \(name): \(reason)")
        }
        var targetOwned = true
        defer { if targetOwned { close(target) } }
        guard ftruncate(target, off_t(chain.backend.size)) == 0 else {
            let reason = String(cString: strerror(errno))
            staging.remove()
            throw .backend("cannot size the snapshot \(name): \(reason)")
        }
        var copy: PointInTimeCopy?
        do {
            try deliver(.snapshot, disk: disk, snapshotName: name) { (chain: Chain) throws(ChainError) in
                // The instant: no consumer's request is in flight.
                var frozen: [ChangeBitmap] = []
                do {
                    for bitmap in chain.tracker.allBitmaps {
                        frozen.append(try staging.checkpoints.create(bitmap.name, granularity: bitmap.granularity, diskSize: chain.backend.size,
                                                                     frozen: true, copying: bitmap))
                    }
                    if let checkpoint = options.checkpoint {
                        let directory = CheckpointDirectory(diskState: diskState)
                        chain.tracker.track(try directory.create(checkpoint, granularity: options.granularity ?? ChangeBitmap.defaultGranularity,
                                                                 diskSize: chain.backend.size))
                    }
                } catch {
                    throw .backend("cannot freeze the checkpoints for snapshot \(name): \(error)")
                }
                let made = PointInTimeCopy(name: name, chain: chain, target: target, frozenBitmaps: frozen,
                                           bytesPerSecond: options.bytesPerSecond, logger: chain.logger)
                chain.tracker.preserve(for: made)
                copy = made
            }
        } catch {
            if copy == nil { staging.remove() }
            throw error
        }
        targetOwned = false
        guard let copy else { throw .backend("the snapshot \(name) was not taken") }
        catalog.offer(SnapshotExport(copy))
        copy.startCopying()
        logger.info("snapshot \(name) of disk \(disk) taken; copying \(chain.backend.size >> 20) MiB in the background")
        return Self.progress(of: copy)
    }

    public func snapshotProgress(_ name: String) throws(ChainError) -> SnapshotProgress {
        for catalog in catalogs {
            if let export = catalog.snapshot(named: name) { return Self.progress(of: export.copy) }
        }
        throw .backend("this worker has no snapshot \(name)")
    }

    /// Stops offering a snapshot; one still being copied fails. (A plain loop: a lazy
    /// compactMap calls its closure twice for the element it yields, and `withdraw`
    /// must run once.)
    public func releaseSnapshot(_ name: String) throws(ChainError) {
        for catalog in catalogs {
            if let export = catalog.withdraw(name) {
                export.copy.fail("released before its copy was complete")
                return
            }
        }
        throw .backend("this worker has no snapshot \(name)")
    }

    /// With no consumer left, copies still running go on unhindered to the end (the
    /// host kills a worker that takes longer than it allows), and every complete copy
    /// the host has not moved into place yet is recorded complete beside its data.
    func finishSnapshotCopies() {
        for (index, catalog) in catalogs.enumerated() {
            let diskState = Self.sidecarRoot(configuration.disks[index], in: configuration)
            for name in catalog.exportNames.dropFirst() {
                guard let copy = catalog.snapshot(named: name)?.copy else { continue }
                if copy.status == .copying {
                    logger.info("snapshot \(name) of disk \(copy.chain.diskName): finishing its copy before the worker stops")
                }
                guard copy.hurryAndWait(seconds: 24 * 3600) == .complete else { continue }
                if SnapshotStaging(diskState: diskState, name: name).recordCompletion(Self.progress(of: copy)) {
                    logger.info("snapshot \(name) of disk \(copy.chain.diskName) recorded complete for the host")
                }
            }
        }
    }

    static func progress(of copy: PointInTimeCopy) -> SnapshotProgress {
        let (preserved, written, seconds) = copy.progress
        switch copy.status {
        case .copying:
            return SnapshotProgress(name: copy.name, state: .copying, totalBytes: copy.size, preservedBytes: preserved,
                                    writtenBytes: written, seconds: seconds)
        case .complete:
            return SnapshotProgress(name: copy.name, state: .complete, totalBytes: copy.size, preservedBytes: copy.size,
                                    writtenBytes: written, seconds: seconds)
        case .failed(let reason):
            return SnapshotProgress(name: copy.name, state: .failed, totalBytes: copy.size, preservedBytes: preserved,
                                    writtenBytes: written, seconds: seconds, error: reason)
        }
    }

    /// Makes or deletes a checkpoint of a disk this worker serves: tracked (or no
    /// longer) from the next request on.
    public func changeCheckpoint(of disk: String, _ change: CheckpointChange) throws(ChainError) {
        let (chain, _, configuration) = try chainAndCatalog(disk)
        let directory = CheckpointDirectory(diskState: Self.sidecarRoot(configuration, in: self.configuration))
        do {
            switch change {
            case .create(let name, let granularity):
                if chain.backend.readOnly || configuration.readOnly { throw ChangeBitmap.Failure.malformed("disk \(disk) is read-only: nothing to track") }
                chain.tracker.track(try directory.create(name, granularity: granularity, diskSize: chain.backend.size))
                logger.info("disk \(disk): tracking changes since checkpoint \(name)")
            case .delete(let name):
                chain.tracker.stopTracking(name)
                try directory.remove(name)
                logger.info("disk \(disk): checkpoint \(name) deleted")
            }
        } catch {
            throw .backend("\(error)")
        }
    }
}
