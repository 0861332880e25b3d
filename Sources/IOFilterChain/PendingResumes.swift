import CSystemShims

/// Resumes that a thread must not carry on where they were issued.
///
/// A filter with a serialized thread model runs each callback under a lock the host
/// holds. If, inside that callback, it resumes another request it had deferred, that
/// request's trip may lead straight back into the same filter (its `done`) and the
/// lock: a deadlock on one thread. Such a resume is therefore recorded here and
/// carried on by the same thread as soon as the outermost serialized callback returns
/// and the lock is released.
final class PendingResumes {
    private var depth = 0
    private var queue: [ChainRequest] = []

    /// The calling thread's list; made the first time a thread enters a serialized call.
    private static var current: PendingResumes {
        if let raw = iof_thread_local_get() {
            return Unmanaged<PendingResumes>.fromOpaque(raw).takeUnretainedValue()
        }
        // Lives as long as the thread; a handful of threads ever run serialized filters.
        let made = PendingResumes()
        iof_thread_local_set(Unmanaged.passRetained(made).toOpaque())
        return made
    }

    /// Runs `body` (a serialized callback, `lock` already taken) and then, with `unlock`
    /// done, carries on every resume `body` issued.
    @inline(__always)
    static func serialized<T>(unlock: () -> Void, _ body: () -> T) -> T {
        let pending = current
        pending.depth += 1
        let result = body()
        pending.depth -= 1
        unlock()
        if pending.depth == 0 && !pending.queue.isEmpty { pending.drain() }
        return result
    }

    /// True if the request was queued because this thread is inside a serialized call.
    static func deferIfInsideSerializedCallback(_ request: ChainRequest) -> Bool {
        guard let raw = iof_thread_local_get() else { return false }
        let pending = Unmanaged<PendingResumes>.fromOpaque(raw).takeUnretainedValue()
        guard pending.depth > 0 else { return false }
        pending.queue.append(request)
        return true
    }

    private func drain() {
        while !queue.isEmpty {
            let request = queue.removeFirst()
            request.carryOn()
        }
    }
}
