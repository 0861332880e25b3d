import IOFilterHost
import IOFilterModel
import IOFilterPosix

/// Point-in-time snapshots whose copy a worker makes, and the workers that offer them:
/// by the snapshot's name. An entry stays after the copy completed while the source's
/// VM worker goes on offering the snapshot (a backup tool may still be reading it).
final class SnapshotCopies: @unchecked Sendable {
    // @unchecked: `copies` is guarded by `lock`.
    struct Copy {
        let snapshot: String
        let source: String
        let session: VMSession
        /// A worker started for this copy alone (the source had none), stopped after.
        let ownsSession: Bool
        /// The worker process that makes it (a restarted worker has lost the copy).
        let generation: Int
        var progress: SnapshotProgress
        var finished = false

        /// The worker that made (or makes) the copy still runs.
        var workerLives: Bool { session.supervisor.pid != nil && session.supervisor.generation == generation }
    }

    private let lock = ConditionLock()
    private var copies: [String: Copy] = [:]

    func add(_ copy: Copy) { lock.withLock { copies[copy.snapshot] = copy } }

    func copy(_ snapshot: String) -> Copy? { lock.withLock { copies[snapshot] } }

    func update(_ snapshot: String, _ progress: SnapshotProgress) {
        lock.withLock { copies[snapshot]?.progress = progress }
    }

    /// The copy is over (complete or failed): waiters wake.
    func finish(_ snapshot: String, keepOffering: Bool) {
        lock.withLock {
            if keepOffering { copies[snapshot]?.finished = true } else { copies[snapshot] = nil }
            lock.broadcast()
        }
    }

    func remove(_ snapshot: String) -> Copy? { lock.withLock { copies.removeValue(forKey: snapshot) } }

    /// Copies still running whose source is `disk`.
    func running(from disk: String) -> [Copy] { lock.withLock { copies.values.filter { $0.source == disk && !$0.finished } } }

    /// Copies still running in `session`'s worker.
    func running(in session: VMSession) -> [Copy] { lock.withLock { copies.values.filter { $0.session === session && !$0.finished } } }

    /// Drops the finished copies `session`'s worker offered: it stopped.
    func forgetFinished(in session: VMSession) {
        lock.withLock { copies = copies.filter { !($0.value.session === session && $0.value.finished) } }
    }

    /// Waits until the snapshot's copy is over; false after `seconds`.
    func waitUntilFinished(_ snapshot: String, seconds: Double) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        return lock.withLock {
            while let copy = copies[snapshot], !copy.finished {
                let now = monotonicNanoseconds()
                if now >= deadline { return false }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return true
        }
    }

    func takeAll() -> [Copy] {
        lock.withLock {
            defer { copies = [:] }
            return Array(copies.values)
        }
    }
}
