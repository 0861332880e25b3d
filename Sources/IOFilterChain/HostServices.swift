import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging

/// The `struct iof_host_services` every plug-in receives: C entry points that find
/// their Swift object through the opaque `iof_host_disk` or the request's host_private.
enum HostServices {
    nonisolated(unsafe) static let table: UnsafeMutablePointer<iof_host_services> = {
        let table = UnsafeMutablePointer<iof_host_services>.allocate(capacity: 1)
        table.initialize(to: iof_host_services(
            struct_size: UInt32(MemoryLayout<iof_host_services>.size),
            abi_major: UInt16(IOF_ABI_MAJOR), abi_minor: UInt16(IOF_ABI_MINOR),
            log: { disk, level, message in
                HostServices.log(disk, level, message)
            },
            param: { disk, key in
                guard let filter = FilterInstance.from(disk), let key else { return nil }
                return filter.parameter(String(cString: key))
            },
            resume: { request, disposition, error in
                ChainRequest.resume(request, disposition, error: error)
            },
            submit_below: { disk, op, flags, offset, length, buffer, callback, arg in
                guard let filter = FilterInstance.from(disk), let chain = filter.chain, let callback else { return EINVAL }
                return chain.submitBelow(
                    position: filter.position, op: op, flags: flags, offset: offset, length: length, buffer: buffer,
                    completion: .callback(callback, arg))
            },
            start_timer: { disk, delay, interval, callback, arg in
                guard let filter = FilterInstance.from(disk), let callback else { return 0 }
                return filter.timers.start(delay: delay, interval: interval, callback: callback, arg: arg)
            },
            cancel_timer: { disk, id in
                FilterInstance.from(disk)?.timers.cancel(id)
            },
            daemon_channel: { _ in -1 },
            open_target: { disk, spec in
                guard let spec else { return -EINVAL }
                return HostServices.openTarget(FilterInstance.from(disk), String(cString: spec))
            },
            extent_count: { io in
                guard let io, let extents = LiveRequests.shared.lookup(io)?.extents else { return 0 }
                return UInt32(extents.count)
            },
            extent: { io, index, offset, length, flags in
                guard let io, let extents = LiveRequests.shared.lookup(io)?.extents else { return EINVAL }
                guard Int(index) < extents.count else { return ERANGE }
                offset?.pointee = extents.offsets[Int(index)]
                length?.pointee = extents.lengths[Int(index)]
                flags?.pointee = extents.flags[Int(index)]
                return 0
            },
            set_extent: { io, offset, length, flags in
                guard let io, io.pointee.op == IOF_OP_BLOCK_STATUS, let extents = LiveRequests.shared.lookup(io)?.extents,
                      flags & ~UInt32(IOF_EXTENT_HOLE | IOF_EXTENT_ZERO) == 0 else { return EINVAL }
                extents.set(offset: offset, length: length, flags: flags)
                return 0
            }))
        return table
    }()

    /// How this worker's filters reach their targets: through the host's broker (a
    /// sandboxed worker), or by opening them here (one run without a sandbox).
    public enum TargetAccess: Sendable {
        case broker(fd: Int32)
        case direct
    }
    private static let targets = Guarded<(access: TargetAccess, named: Set<String>)>((.direct, []))

    /// Set once at start, before any plug-in loads: how targets are reached, and every
    /// target this worker's policies name (what a call without a disk may open).
    public static func configureTargets(_ access: TargetAccess, named: Set<String>) {
        targets.withLock { $0 = (access, named) }
    }

    static func openTarget(_ filter: FilterInstance?, _ spec: String) -> Int32 {
        let logger = filter?.logger ?? pluginLogger
        // The lock also keeps one request at a time on the broker's socket.
        return targets.withLock { state -> Int32 in
            guard filter.map({ $0.targets.contains(spec) }) ?? state.named.contains(spec) else {
                logger.warning("open_target refused: \(spec) is not a target its policy names")
                return -EACCES
            }
            let outcome = switch state.access {
            case .broker(let fd): TargetBroker.request(spec, over: fd)
            case .direct: TargetBroker.open(spec)
            }
            switch outcome {
            case .success(let fd): return fd
            case .failure(let failure):
                logger.warning("open_target \(spec): \(failure.message)")
                return -failure.code
            }
        }
    }

    static let pluginLogger = Logger(label: "iofilter.plugin")

    static func log(_ disk: OpaquePointer?, _ level: iof_log_level, _ message: UnsafePointer<CChar>?) {
        let logger = FilterInstance.from(disk)?.logger ?? pluginLogger
        let text = message.map { String(cString: $0) } ?? ""
        switch level {
        case IOF_LOG_ERROR: logger.error("\(text)")
        case IOF_LOG_WARNING: logger.warning("\(text)")
        case IOF_LOG_INFO: logger.info("\(text)")
        default: logger.debug("\(text)")
        }
    }
}

/// The timers of one filter instance, run on one thread of their own.
final class TimerSet: @unchecked Sendable {
    // @unchecked: all state is guarded by `lock`.
    private struct Timer {
        var due: UInt64
        let interval: UInt64
        let callback: iof_timer_callback
        let arg: UnsafeMutableRawPointer?
    }
    private let lock = ConditionLock()
    private var timers: [UInt64: Timer] = [:]
    private var nextID: UInt64 = 1
    private var running: UInt64 = 0
    private var threadStarted = false
    private var stopped = false

    func start(delay: UInt64, interval: UInt64, callback: @escaping iof_timer_callback, arg: UnsafeMutableRawPointer?) -> UInt64 {
        lock.withLock {
            guard !stopped else { return 0 }
            let id = nextID
            nextID += 1
            timers[id] = Timer(due: monotonicNanoseconds() + delay, interval: interval, callback: callback, arg: arg)
            if !threadStarted {
                threadStarted = true
                startThread(name: "filter-timers") { [self] in runLoop() }
            }
            lock.broadcast()
            return id
        }
    }

    func cancel(_ id: UInt64) {
        lock.withLock {
            timers[id] = nil
            // A callback cancelling its own timer must not wait for itself.
            while running == id && !isTimerThread { lock.wait() }
        }
    }

    func cancelAll() {
        lock.withLock {
            stopped = true
            timers.removeAll()
            while running != 0 && !isTimerThread { lock.wait() }
            lock.broadcast()
        }
    }

    private var timerThread: pthread_t?
    private var isTimerThread: Bool { timerThread.map { pthread_equal($0, pthread_self()) != 0 } ?? false }

    private func runLoop() {
        lock.lock()
        timerThread = pthread_self()
        while !stopped {
            let now = monotonicNanoseconds()
            guard let (id, timer) = timers.min(by: { $0.value.due < $1.value.due }) else {
                lock.wait()
                continue
            }
            if timer.due > now {
                _ = lock.wait(nanoseconds: timer.due - now)
                continue
            }
            if timer.interval > 0 {
                timers[id]?.due = now + timer.interval
            } else {
                timers[id] = nil
            }
            running = id
            lock.unlock()
            timer.callback(timer.arg)
            lock.lock()
            running = 0
            lock.broadcast()
        }
        lock.unlock()
    }
}
