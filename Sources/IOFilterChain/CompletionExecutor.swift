import CIOFilter
import CSystemShims
import Glibc
import IOFilterPosix
import Synchronization

/// A completion executor of the worker (ABI 1.7 `defer_call`): a host thread that runs
/// the calls filters defer to it, in batches. A request that several filters defer this
/// way moves here once and stays: a call queued from this thread joins the batch being
/// run, so the chain goes on without another thread hop. Filters that defer with a
/// thread of their own pay one hop each way per filter instead.
final class CompletionExecutor: @unchecked Sendable {
    // @unchecked: `queue` and `started` under `lock`.
    /// One per CPU, at most four: a request stays on the one it first went to.
    static let all = (0..<min(max(Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 1), 4)).map { _ in CompletionExecutor() }

    /// The executor this thread is (a call deferred from there stays there), else one
    /// chosen by the request's address.
    static func executor(for request: UnsafeMutablePointer<iof_request>) -> CompletionExecutor {
        let here = iof_gettid()
        if let current = all.first(where: { $0.executorThread.load(ordering: .relaxed) == here }) { return current }
        return all[(Int(bitPattern: request) >> 8) % all.count]
    }

    private struct Call {
        let request: UnsafeMutablePointer<iof_request>
        let function: iof_deferred_call
        let arg: UnsafeMutableRawPointer?
    }

    private let lock = ConditionLock()
    private var queue: [Call] = []
    private var started = false
    /// The executor thread's id, once it runs: a call queued there needs no wake-up.
    private let executorThread = Atomic<Int32>(0)

    private init() { queue.reserveCapacity(256) }

    /// Queues `function(request, arg)`; runs it on the executor thread.
    func enqueue(_ request: UnsafeMutablePointer<iof_request>, _ function: iof_deferred_call, _ arg: UnsafeMutableRawPointer?) {
        let here = iof_gettid()
        lock.withLock {
            queue.append(Call(request: request, function: function, arg: arg))
            if !started {
                started = true
                startThread(name: "completions") { [self] in run() }
            } else if here != executorThread.load(ordering: .relaxed) {
                lock.signal()
            }
        }
    }

    private func run() {
        executorThread.store(iof_gettid(), ordering: .relaxed)
        var batch: [Call] = []
        batch.reserveCapacity(256)
        while true {
            lock.withLock {
                while queue.isEmpty { lock.wait() }
                swap(&batch, &queue)
            }
            // Calls queued while these run (the next filter deferring the same request)
            // land in `queue` and make the next batch at once, without a wake-up.
            for call in batch { call.function(call.request, call.arg) }
            batch.removeAll(keepingCapacity: true)
        }
    }
}
