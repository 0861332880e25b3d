import CIOFilter
import CSystemShims
import Glibc
import IOFilterPosix
import Synchronization

/// Where the calls filters defer (ABI 1.7 `defer_call`) run when they are deferred inside
/// the chain engine (from a filter's `start` or `done`, which is nearly always): on the
/// same thread, as soon as it leaves the engine's outermost entry on that thread, once
/// the filter's callback has returned and no lock of the host's is held. A request that
/// five filters defer this way does not change threads at all. The calls wait in thread
/// storage (see `iof_engine_push`): nothing is allocated per deferral.
enum EngineThread {
    /// Runs `body` as an entry into the engine (a request's start, a backend's answer, a
    /// resume), then, from the outermost entry, every call deferred meanwhile.
    @inline(__always)
    static func run(_ body: () -> Void) {
        iof_engine_enter()
        body()
        if iof_engine_leave() == 0 { runDeferredCalls() }
    }

    /// Queues the call on this thread if it is inside the engine (false: it is not, or
    /// its queue is full; the caller hands the call to an executor).
    static func deferHere(_ request: UnsafeMutablePointer<iof_request>, _ function: iof_deferred_call, _ arg: UnsafeMutableRawPointer?) -> Bool {
        iof_engine_push(unsafeBitCast(function, to: UnsafeMutableRawPointer.self), request, arg) != 0
    }

    /// Each call is an entry of its own: the calls it leads to (the next filter deferring
    /// the same request) queue behind it and run in this loop, not deeper in the stack.
    private static func runDeferredCalls() {
        var function: UnsafeMutableRawPointer?
        var request: UnsafeMutableRawPointer?
        var arg: UnsafeMutableRawPointer?
        while iof_engine_pop(&function, &request, &arg) != 0 {
            guard let function, let request else { continue }
            let call = unsafeBitCast(function, to: iof_deferred_call.self)
            iof_engine_enter()
            call(request.assumingMemoryBound(to: iof_request.self), arg)
            _ = iof_engine_leave()
        }
    }
}

/// A completion executor of the worker: a host thread that runs, in batches, the calls
/// filters defer from outside the engine (from a thread of their own) or past a
/// thread's queue. A request deferred again from here stays here: one thread hop.
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
            // Calls these defer in turn (the next filter deferring the same request) run
            // on this thread right after the batch.
            EngineThread.run {
                for call in batch { call.function(call.request, call.arg) }
            }
            batch.removeAll(keepingCapacity: true)
        }
    }
}
