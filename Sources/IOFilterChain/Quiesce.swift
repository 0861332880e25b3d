import IOFilterPosix
import Synchronization

/// Holds a disk's consumers' requests back while its filters handle a snapshot: no
/// request is in flight between `pause` returning and `resume`. The data path pays one
/// atomic add on the way in and one on the way out; a paused disk's new requests wait
/// on their connection's own thread.
public final class Quiesce: Sendable {
    private let inFlight = Atomic<Int>(0)
    private let paused = Atomic<Bool>(false)
    private let lock = ConditionLock()

    /// Before a consumer's request enters the chain.
    @inline(__always)
    func enter() {
        while true {
            inFlight.add(1, ordering: .sequentiallyConsistent)
            if !paused.load(ordering: .sequentiallyConsistent) { return }
            // Paused: step back out (the pauser may be waiting for us) and wait.
            leave()
            lock.withLock { while paused.load(ordering: .sequentiallyConsistent) { lock.wait() } }
        }
    }

    /// When that request has been answered.
    @inline(__always)
    func leave() {
        if inFlight.subtract(1, ordering: .sequentiallyConsistent).newValue == 0 && paused.load(ordering: .sequentiallyConsistent) {
            lock.withLock { lock.broadcast() }
        }
    }

    /// Stops new requests and waits (up to `seconds`) until none is in flight; false if
    /// some still are (the caller resumes and gives up).
    public func pause(seconds: Double) -> Bool {
        lock.withLock { paused.store(true, ordering: .sequentiallyConsistent) }
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        return lock.withLock {
            while inFlight.load(ordering: .sequentiallyConsistent) > 0 {
                let now = monotonicNanoseconds()
                if now >= deadline { return false }
                _ = lock.wait(nanoseconds: min(deadline - now, 10_000_000))
            }
            return true
        }
    }

    public func resume() {
        lock.withLock {
            paused.store(false, ordering: .sequentiallyConsistent)
            lock.broadcast()
        }
    }
}
