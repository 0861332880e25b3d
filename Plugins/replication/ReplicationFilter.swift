// Replication sample: keeps a replica (a file or an NBD export) of the disk.
//
// async mode: every write, trim and write-zeroes is appended to a journal in the
//   sidecar directory before it goes down, and a shipper thread sends the journal to
//   the replica in order. The guest never waits for the replica.
// sync mode: a write completes only when the replica has it too.
//
// When the journal is full, or the replica is unreachable in sync mode, or on the
// first attach, the filter falls back to a map of dirty regions and resyncs them by
// reading the disk below itself. After kill -9 at any moment the restarted filter
// replays the journal from its persisted head and resyncs the regions its map marks.
//
// Durability follows the guest: journal and map reach stable storage when the guest
// flushes (or writes with FUA), like the disk's own data.
import Glibc
import IOFilterSDK
import IOFilterSDKTLS
import Synchronization

public final class ReplicationFilter: IOFilter {
    public static let metadata = FilterMetadata(
        name: "org.swift-iofilter.replication",
        vendor: "swift-iofilter",
        version: "1.0.0",
        description: "Replicates every write to a file, an NBD target or another host, synchronously or through a journal",
        category: .replication,
        threadModel: .parallel,
        parameters: [
            Parameter("target", .path(default: ""), required: true,
                      description: "the replica: a raw file path, an NBD URI (nbd://host:port/export, nbd+unix:///export?socket=path), or iofilter://host:port/disk, a disk the replication daemon on another host keeps"),
            Parameter("mode", .choice(default: "async", values: ["async", "sync"]),
                      description: "sync: a write completes when both sides have it; async: journalled and shipped in order"),
            Parameter("rpo-seconds", .int(default: 15, range: 1...86_400),
                      description: "async: the most lag tolerated before the state turns degraded"),
            Parameter("journal-size", .size(default: "64M", range: 1 << 20...1 << 36),
                      description: "async: bytes of journal in the sidecar directory; when full, dirty regions are tracked instead"),
            Parameter("region-size", .size(default: "4K", range: 1 << 12...1 << 30),
                      description: "granularity of the dirty-region map used for resync (contiguous dirty regions are copied together)"),
            Parameter("tls-psk", .path(default: ""),
                      description: "an NBD target that requires TLS: a psktool file with its pre-shared key"),
            Parameter("tls-username", .string(default: ""), description: "the PSK's user (default: the file's first)"),
            Parameter("on-target-failure", .choice(default: "degrade", values: ["degrade", "fail"]),
                      description: "sync: when the replica fails a write, keep going degraded (resync later) or fail the guest's write"),
        ],
        operations: [
            ManagementOperation("status", "state and lag of every replicated disk in this worker", function: replicationStatus),
        ],
        observesCompletions: true,
        daemon: ReplicationDaemon.daemon)

    let disk: Disk
    let synchronous: Bool
    let failGuestOnTargetError: Bool
    let rpoSeconds: Double
    let targetSpec: String
    let journal: Journal
    let regions: RegionMap
    let shipper: Shipper

    // MARK: attach / open / close

    public static func attach(_ disk: Disk) throws(FilterError) {
        // A new replica: everything needs copying once. The map says so durably.
        let map = try RegionMap(directory: disk.sidecarDirectory, diskSize: disk.size,
                                regionSize: UInt64(disk.parameter("region-size", default: Int64(4 << 10))))
        map.markAll()
        map.sync()
        map.close()
        disk.log(.info, "attached: full initial sync of \(disk.size) bytes to \(disk.parameter("target") ?? "?") scheduled")
    }

    public static func detach(_ disk: Disk) throws(FilterError) {
        for file in ["journal.data", "journal.state", "regions.map", "replica.id"] {
            unlink("\(disk.sidecarDirectory)/\(file)")
        }
    }

    public init(disk: Disk) throws(FilterError) {
        self.disk = disk
        guard let target = disk.parameter("target"), !target.isEmpty else { throw FilterError(EINVAL, "target is required") }
        targetSpec = target
        synchronous = disk.parameter("mode") == "sync"
        failGuestOnTargetError = disk.parameter("on-target-failure") == "fail"
        rpoSeconds = Double(disk.parameter("rpo-seconds", default: 15))
        regions = try RegionMap(directory: disk.sidecarDirectory, diskSize: disk.size,
                                regionSize: UInt64(disk.parameter("region-size", default: Int64(4 << 10))))
        journal = try Journal.open(directory: disk.sidecarDirectory, capacity: UInt64(disk.parameter("journal-size", default: 64 << 20)),
                                   diskSize: disk.size, carryingOverInto: regions)
        var tls: TargetTLS?
        if let psk = disk.parameter("tls-psk"), !psk.isEmpty {
            let user = disk.parameter("tls-username") ?? ""
            tls = try TargetTLS(pskFile: psk, username: user.isEmpty ? nil : user, disk: disk)
        }
        shipper = Shipper(disk: disk, targetSpec: target, tls: tls, journal: journal, regions: regions, synchronousMode: synchronous)
        if let torn = journal.cutShort {
            disk.log(.warning, "the journal's last record (sequence \(torn.sequence)) was cut short by a crash while it was being appended; "
                + "its write was never acknowledged, so it is left out")
        }
        if let carried = journal.carriedOver {
            disk.log(.info, "the journal was \(carried.previousCapacity) bytes and is \(journal.capacity) now; "
                + "its \(carried.bytes) bytes still to ship are resynced from the disk instead")
        }
        let pending = journal.pendingBytes
        for range in journal.pendingRanges() {
            regions.mark(offset: range.offset, length: range.length)
        }
        if synchronous && pending > 0 {
            // Sync mode ships no journal: what async mode left there is copied from the
            // disk instead, its regions marked (and persisted) before the records go.
            regions.sync()
            journal.dropPending()
        }
        if pending > 0 || regions.dirtyCount > 0 {
            disk.log(.info, "to ship: \(pending) journal bytes to replay, then \(regions.dirtyCount) dirty regions to resync")
        }
        shipper.start()
        Self.registry.withLock { $0[ObjectIdentifier(self)] = self }
    }

    public func close() {
        Self.registry.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(self)) }
        shipper.stop(drain: 15)
        journal.sync()
        regions.sync()
        journal.close()
        regions.close()
    }

    // MARK: the data path

    public func start(_ request: Request) -> Disposition {
        switch request.operation {
        case .write, .trim, .writeZeroes:
            if synchronous { return startSynchronous(request) }
            // Journal first: whatever reaches the disk is in the journal (or the map).
            let zeroes = request.operation != .write
            let journalled = journal.record(offset: request.offset, length: request.length,
                                            payload: zeroes ? nil : UnsafeRawPointer(request.buffer.baseAddress), orMarkIn: regions)
            if !journalled { request.privateWord = Self.markedDirty }
            shipper.wake()
            if request.isFUA { journal.sync(); regions.sync() }
            return .pass
        case .flush:
            journal.sync()
            regions.sync()
            if synchronous && shipper.connectedTarget != nil {
                // The replica is flushed before the guest's flush completes (in `done`).
                request.privateWord = 1
            }
            return .pass
        default:
            return .pass
        }
    }

    public func done(_ request: Request) -> Disposition {
        switch request.operation {
        case .write, .trim, .writeZeroes:
            if synchronous { return doneSynchronous(request) }
            if request.privateWord == Self.markedDirty {
                regions.endWrite(offset: request.offset, length: UInt64(request.length))
            } else if request.error != 0 {
                // The disk refused what the journal already holds: resync from the disk.
                regions.mark(offset: request.offset, length: UInt64(request.length))
            }
            return .pass
        case .flush where request.privateWord == 1 && request.error == 0:
            guard let target = shipper.connectedTarget else { return .pass }
            target.flush { error in
                if error != 0 { self.shipper.targetFailed("flush: \(String(cString: strerror(error)))") }
                request.resume(.pass)
            }
            return .deferred
        default:
            return .pass
        }
    }

    // MARK: sync mode

    private func startSynchronous(_ request: Request) -> Disposition {
        guard let target = shipper.connectedTarget, !regions.isOverflowing else {
            // Degraded: the map remembers what the replica lacks.
            regions.beginWrite(offset: request.offset, length: UInt64(request.length))
            request.privateWord = Self.markedDirty
            shipper.wake()
            return .pass
        }
        let wait = SyncWrite()
        request.privateWord = UInt(bitPattern: Unmanaged.passRetained(wait).toOpaque())
        let finish: @Sendable (Int32) -> Void = { error in
            if let resumeWith = wait.targetFinished(error) { resumeWith(self.afterTarget(error, request)) }
        }
        // The replica write runs alongside the disk write, from the same buffer.
        switch request.operation {
        case .write:
            target.write(offset: request.offset, length: request.length, from: UnsafeRawPointer(request.buffer.baseAddress!), completion: finish)
        default:
            target.writeZeroes(offset: request.offset, length: request.length, completion: finish)
        }
        return .pass
    }

    private func doneSynchronous(_ request: Request) -> Disposition {
        if request.privateWord == Self.markedDirty {
            regions.endWrite(offset: request.offset, length: UInt64(request.length))
            return .pass
        }
        guard request.privateWord != 0, let raw = UnsafeRawPointer(bitPattern: request.privateWord) else {
            return .pass
        }
        let wait = Unmanaged<SyncWrite>.fromOpaque(raw).takeRetainedValue()
        if request.error != 0 {
            regions.mark(offset: request.offset, length: UInt64(request.length))
        }
        if let error = wait.diskFinished(resume: { request.resume($0) }) {
            return afterTarget(error, request)
        }
        return .deferred
    }

    /// What the guest sees once the replica answered a sync write.
    private func afterTarget(_ error: Int32, _ request: Request) -> Disposition {
        if error == 0 {
            shipper.replicated(UInt64(request.length))
            return .pass
        }
        regions.mark(offset: request.offset, length: UInt64(request.length))
        shipper.targetFailed("write at \(request.offset): \(String(cString: strerror(error)))")
        return failGuestOnTargetError ? .fail(EIO) : .pass
    }

    // MARK: operators

    public func stats() -> [(String, Double)] {
        let lag = lagSeconds
        let state = self.state
        return [
            ("bytes_replicated", Double(shipper.bytesReplicated)),
            ("lag_seconds", lag),
            ("rpo_seconds", rpoSeconds),
            ("lag_bytes", Double(journal.pendingBytes + UInt64(regions.dirtyCount) * regions.regionSize)),
            ("dirty_regions", Double(regions.dirtyCount)),
            ("state", Double(state.rawValue)),
            ("state_in_sync", state == .inSync ? 1 : 0),
            ("state_syncing", state == .syncing ? 1 : 0),
            ("state_degraded", state == .degraded ? 1 : 0),
        ]
    }

    public func health() -> Health {
        let unshipped = journal.pendingBytes + UInt64(regions.dirtyCount) * regions.regionSize
        let behind = "\(unshipped >> 20) MiB not yet on the replica"
        if shipper.connectedTarget == nil {
            return .degraded("replica \(targetSpec) unreachable; \(behind), lag \(Int(lagSeconds))s")
        }
        if lagSeconds > rpoSeconds {
            return .degraded("lag \(Int(lagSeconds))s is past the RPO of \(Int(rpoSeconds))s; \(behind)")
        }
        return .ok
    }

    /// `privateWord` of a write that went to the region map instead of the journal or
    /// the replica (never a valid pointer).
    static let markedDirty: UInt = 2

    enum State: Int { case inSync = 0, syncing = 1, degraded = 2 }

    var state: State {
        if shipper.connectedTarget == nil || lagSeconds > rpoSeconds { return .degraded }
        if regions.dirtyCount > 0 || journal.pendingBytes > 0 { return .syncing }
        return .inSync
    }

    var lagSeconds: Double {
        let journalLag = journal.oldestPendingAge
        let regionLag = regions.dirtyCount > 0 ? regions.oldestDirtyAge : 0
        return max(journalLag, regionLag)
    }

    var statusLine: String {
        let state = ["in-sync", "syncing", "degraded"][self.state.rawValue]
        return "\(disk.vmName)/\(disk.name) -> \(targetSpec): \(state), lag \(Int(lagSeconds))s, "
            + "\(journal.pendingBytes) journal bytes, \(regions.dirtyCount) dirty regions, \(shipper.bytesReplicated) bytes replicated"
    }

    /// The disks open in this process, for `status`. Strong references, dropped at
    /// `close`: a weak one would move the filter's reference count to a side table and
    /// put every retain and release on the data path on the runtime's slow path.
    static let registry = Mutex<[ObjectIdentifier: ReplicationFilter]>([:])
}

/// `status` management operation: one line per replicated disk open in this process.
@_cdecl("iofilter_replication_status")
func replicationStatus() -> UnsafePointer<CChar>? {
    let lines = ReplicationFilter.registry.withLock { $0.values.map(\.statusLine) }
    return ManagementResult.string(lines.isEmpty ? "no replicated disks are open in this process" : lines.sorted().joined(separator: "\n"))
}

/// The meeting point of a sync write's two halves: the disk's result (in `done`) and the
/// replica's (on the target's thread). Whichever comes second decides.
final class SyncWrite: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = Mutex<(target: Int32?, waiting: (@Sendable (Disposition) -> Void)?)>((nil, nil))

    /// The replica answered. Returns the resume function if `done` already deferred.
    func targetFinished(_ error: Int32) -> ((Disposition) -> Void)? {
        lock.withLock { state in
            state.target = error
            return state.waiting
        }
    }

    /// The disk answered; returns the replica's error if it already answered, else
    /// parks `resume` for the replica's completion.
    func diskFinished(resume: @escaping @Sendable (Disposition) -> Void) -> Int32? {
        lock.withLock { state in
            if let error = state.target { return error }
            state.waiting = resume
            return nil
        }
    }
}

/// Registers the filter as this shared object's plug-in.
@_cdecl("iof_plugin_entry")
public func iofPluginEntry() -> UnsafeRawPointer { exportFilter(ReplicationFilter.self) }
