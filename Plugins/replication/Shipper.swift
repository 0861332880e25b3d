import Glibc
import IOFilterSDK
import Synchronization

/// The background thread that keeps the replica up to date: it connects (and
/// reconnects) to the target, ships the journal in order, then resyncs dirty regions by
/// reading the disk below the filter.
final class Shipper: @unchecked Sendable {
    // @unchecked: `target`, `retired`, `stopping` and `connected` are guarded by `lock`.
    let disk: Disk
    let targetSpec: String
    /// An NBD target that requires TLS.
    let tls: TargetTLS?
    let journal: Journal
    let regions: RegionMap
    let synchronousMode: Bool
    private let lock = ConditionLock()
    private var target: (any BlockTarget)?
    private var retired: [any BlockTarget] = []
    private var stopping = false
    private var running = false
    private var lastFailure = ""
    private let replicatedBytes = Atomic<UInt64>(0)

    /// The way to the local daemon, for a replica another host keeps (iofilter://).
    private let peer: (link: PeerLink, address: PeerAddress)?

    init(disk: Disk, targetSpec: String, tls: TargetTLS?, journal: Journal, regions: RegionMap, synchronousMode: Bool) {
        self.disk = disk
        peer = PeerAddress(targetSpec).map { (PeerLink(disk: disk), $0) }
        self.targetSpec = targetSpec
        self.tls = tls
        self.journal = journal
        self.regions = regions
        self.synchronousMode = synchronousMode
        // Sync mode needs its replica from the first write, and a replica whose replies
        // the guest waits for is served at normal priority. Async mode connects from the
        // shipper's own (background) thread, and an NBD replica's reply reader inherits
        // that priority.
        if synchronousMode, let opened = try? openReplica() { target = opened }
    }

    /// The replica: a file or NBD export the host opens, or a disk another host's
    /// replication daemon keeps, reached through this host's daemon.
    private func openReplica() throws(FilterError) -> any BlockTarget {
        guard let peer else { return try openBlockTarget(targetSpec, size: disk.size, tls: tls) }
        let target = try peer.link.open(peer.address, synchronous: synchronousMode, tls: tls)
        adopt(target.identity)
        return target
    }

    /// A replica other than the one this filter synced (made anew on the other host:
    /// deleted and recreated, its host rebuilt) holds nothing it was sent before: copy
    /// everything again. The map says so durably before the new identity is recorded.
    private func adopt(_ identity: String) {
        guard !identity.isEmpty else { return }
        let file = disk.sidecarDirectory + "/replica.id"
        var known = ""
        let existing = open(file, O_RDONLY | O_CLOEXEC)
        if existing >= 0 {
            var bytes = [UInt8](repeating: 0, count: 256)
            let count = read(existing, &bytes, bytes.count)
            close(existing)
            known = String(decoding: bytes[..<max(count, 0)], as: UTF8.self)
        }
        guard known != identity else { return }
        if !known.isEmpty {
            regions.markAll()
            regions.sync()
            disk.log(.warning, "replica \(targetSpec) is not the one synced before (it was made anew): copying the whole disk again")
        }
        let fd = open(file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        if fd >= 0 {
            _ = Array(identity.utf8).withUnsafeBytes { FileIO.writeAll(fd, $0.baseAddress!, count: $0.count, offset: 0) }
            fsync(fd)
            close(fd)
        }
    }

    var connectedTarget: (any BlockTarget)? { lock.withLock { target } }
    private let sleeping = Atomic<Bool>(false)
    var bytesReplicated: UInt64 { replicatedBytes.load(ordering: .relaxed) }
    func replicated(_ bytes: UInt64) { replicatedBytes.add(bytes, ordering: .relaxed) }

    func start() {
        lock.withLock { running = true }
        // Async shipping is background work; in sync mode this thread only resyncs, and
        // an NBD replica it reconnects serves the guest's writes.
        startThread(name: "replication", priority: synchronousMode ? .normal : .background) { [self] in run() }
    }

    /// Stops shipping; first gives a reachable replica up to `drain` seconds to catch up,
    /// so that a graceful stop leaves it in sync (an unreachable one is not waited for).
    func stop(drain: Double = 0) {
        let deadline = monotonicNanoseconds() + UInt64(drain * 1e9)
        while monotonicNanoseconds() < deadline, connectedTarget != nil,
              journal.pendingBytes > 0 || regions.dirtyCount > 0 {
            wake()
            usleep(20_000)
        }
        lock.withLock {
            stopping = true
            lock.broadcast()
            while running { lock.wait() }
            target?.close()
            retired.forEach { $0.close() }
            target = nil
            retired = []
        }
    }

    /// Records shipped to the replica at once (pipelined on an NBD target).
    static let batchRecords = 64
    /// While writes keep coming, the shipper naps this long between partial batches
    /// rather than being woken by each write: a futex wake per write cost the guest's
    /// connection thread a sixth of its time (perf, 4k random writes), and napping lets
    /// the next batch gather. It adds at most this much to the replica's lag.
    static let napNanoseconds: UInt64 = 1_000_000
    /// Naps with nothing to ship before the shipper sleeps until a write wakes it.
    static let napsBeforeSleep = 100

    /// Wakes the shipper if it sleeps (not if it naps). The data path calls this on
    /// every write, so it costs one atomic load unless the shipper is actually asleep.
    func wake() {
        guard sleeping.load(ordering: .sequentiallyConsistent) else { return }
        lock.withLock { lock.signal() }
    }

    /// The replica failed: stop using it until the shipper reconnects. The object is
    /// kept (not closed) because writes in flight may still hold it.
    func targetFailed(_ reason: String) {
        journal.rewindToDurable()
        lock.withLock {
            if let target {
                retired.append(target)
                disk.log(.warning, "replica \(targetSpec) failed (\(reason)); degraded, will reconnect and resync")
            }
            target = nil
            lock.broadcast()
        }
    }

    private func run() {
        var buffer = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        var capacity = 1 << 20
        var backoff: UInt64 = 200_000_000
        var idleNaps = 0
        defer {
            buffer.deallocate()
            lock.withLock {
                running = false
                lock.broadcast()
            }
        }
        while !lock.withLock({ stopping }) {
            guard let target = connectedTarget ?? reconnect() else {
                lock.withLock { _ = stopping || lock.wait(nanoseconds: backoff) }
                backoff = min(backoff * 2, 5_000_000_000)
                continue
            }
            backoff = 200_000_000
            if !synchronousMode, let batch = journal.peek(max: Self.batchRecords) {
                // The whole batch is in flight at once (pipelined on an NBD target).
                let writes = batch.records.map { record, payload in
                    (offset: record.offset, length: Int(record.length), buffer: record.kind == Journal.Record.write ? Optional(payload) : nil)
                }
                let error = target.wait { target.writeBatch(writes, completion: $0) }
                if error != 0 {
                    targetFailed("journal batch from offset \(batch.records[0].record.offset): \(String(cString: strerror(error)))")
                    continue
                }
                journal.advance(past: batch)
                replicated(batch.bytes)
                if journal.unflushedBytes >= journal.capacity / 4 || monotonicNanoseconds() - lastDurable >= Self.durableNanoseconds {
                    _ = makeDurable(target)
                }
                idleNaps = 0
                if batch.records.count < Self.batchRecords { nap() }
                continue
            }
            if let run = regions.nextDirtyRun(maxRegions: max(1, Int((1 << 20) / regions.regionSize))) {
                let region = run.first
                let offset = UInt64(region) * regions.regionSize
                let length = Int(min(regions.regionSize * UInt64(run.generations.count), disk.size - offset))
                if length > capacity {
                    buffer.deallocate()
                    capacity = length
                    buffer = .allocate(byteCount: capacity, alignment: 4096)
                }
                let pointer = buffer
                let readError = waitForCompletion { disk.submitBelow(.read, offset: offset, length: length, buffer: pointer, completion: $0) }
                if readError != 0 {
                    disk.log(.warning, "cannot read region \(region) for resync: \(String(cString: strerror(readError)))")
                    lock.withLock { _ = stopping || lock.wait(nanoseconds: 1_000_000_000) }
                    continue
                }
                let error = target.wait { target.write(offset: offset, length: length, from: pointer, completion: $0) }
                if error != 0 {
                    targetFailed("resync of region \(region): \(String(cString: strerror(error)))")
                    continue
                }
                regions.shipped(run)
                replicated(UInt64(length))
                if regions.dirtyCount == 0 {
                    if makeDurable(target), journal.resumeJournallingIfClean(regions) {
                        disk.log(.info, "replica \(targetSpec) is in sync")
                        // What follows are small writes: leave no bulk copy cached.
                        target.releaseCache()
                    }
                }
                continue
            }
            _ = journal.resumeJournallingIfClean(regions)
            if idleNaps < Self.napsBeforeSleep {
                idleNaps += 1
                nap()
                continue
            }
            // Quiet for a while: what was shipped goes to the replica's stable storage
            // before the shipper sleeps. (A flush each time it catches up cost the guest
            // a quarter of its IOPS on 4k random writes.)
            if journal.unflushedBytes > 0 {
                _ = makeDurable(target)
                continue
            }
            // Nothing to ship for a while: sleep until a write wakes us. `sleeping` is
            // raised before the last look at the journal, so a write that lands after
            // that look sees it and signals (under the lock, once this thread waits).
            lock.withLock {
                sleeping.store(true, ordering: .sequentiallyConsistent)
                if !stopping && journal.pendingBytes == 0 && regions.dirtyCount == 0 {
                    _ = lock.wait(nanoseconds: 1_000_000_000)
                }
                sleeping.store(false, ordering: .sequentiallyConsistent)
            }
            // A replica another host keeps can go away while nothing is written (that
            // host restarted, its disk made anew): ask after it now and then, so that
            // the state says so and a new replica is copied at once, not at the next write.
            if peer != nil, monotonicNanoseconds() - lastPeerCheck > Self.peerCheckNanoseconds {
                lastPeerCheck = monotonicNanoseconds()
                let error = target.wait { target.flush(completion: $0) }
                if error != 0 { targetFailed("idle check: \(String(cString: strerror(error)))") }
            }
        }
    }

    /// Asks the replica to flush what it was sent, then lets the journal drop the
    /// records shipped before the flush (and persist its head past them). False when
    /// the flush failed (the replica is then failed).
    private func makeDurable(_ target: any BlockTarget) -> Bool {
        let mark = journal.shippedMark
        let error = target.wait { target.flush(completion: $0) }
        lastDurable = monotonicNanoseconds()
        guard error == 0 else {
            targetFailed("flush: \(String(cString: strerror(error)))")
            return false
        }
        journal.makeDurable(upTo: mark)
        return true
    }

    /// The longest the shipper goes under a steady load without asking the replica to
    /// flush (and the journal to drop what was shipped): the window a replica that
    /// loses power can lose, and the journal holds again for it.
    static let durableNanoseconds: UInt64 = 1_000_000_000
    private var lastDurable: UInt64 = 0

    /// How often an idle shipper checks a replica on another host.
    static let peerCheckNanoseconds: UInt64 = 5_000_000_000
    private var lastPeerCheck: UInt64 = 0

    private func nap() {
        lock.withLock { _ = stopping || lock.wait(nanoseconds: Self.napNanoseconds) }
    }

    private func reconnect() -> (any BlockTarget)? {
        do throws(FilterError) {
            let opened = try openReplica()
            lock.withLock { target = opened }
            disk.log(.info, "connected to replica \(targetSpec)")
            return opened
        } catch {
            if error.message != lastFailure {
                disk.log(.warning, "replica unreachable: \(error.message); journalling and retrying")
                lastFailure = error.message
            }
            return nil
        }
    }
}

