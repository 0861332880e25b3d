import CIOFilter
import Glibc
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import IOFilterTracking
import Logging

/// The `struct iof_host_services` every plug-in receives: C entry points that find
/// their Swift object through the opaque `iof_host_disk` or the request's host_private.
public enum HostServices {
    nonisolated(unsafe) public static let table: UnsafeMutablePointer<iof_host_services> = {
        let table = UnsafeMutablePointer<iof_host_services>.allocate(capacity: 1)
        table.initialize(to: iof_host_services(
            struct_size: UInt32(MemoryLayout<iof_host_services>.size),
            abi_major: UInt16(IOF_ABI_MAJOR), abi_minor: UInt16(IOF_ABI_MINOR),
            log: { disk, level, message in
                HostServices.log(disk, level, message)
            },
            param: { disk, key in
                guard let key else { return nil }
                guard let filter = FilterInstance.from(disk) else { return HostServices.daemonSetting(String(cString: key)) }
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
            daemon_channel: { disk in
                FilterInstance.from(disk)?.daemonChannel() ?? -1
            },
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
            },
            peer_listener: {
                HostServices.targets.withLock { $0.daemon?.peerFD ?? -1 }
            },
            open_replica: { name, size in
                guard let name else { return -EINVAL }
                return HostServices.openReplica(String(cString: name), size: size)
            },
            checkpoint_name: { disk, index, name, size in
                guard let chain = FilterInstance.from(disk)?.chain, let name else { return EINVAL }
                let bitmaps = chain.tracker.allBitmaps
                guard Int(index) < bitmaps.count else { return ERANGE }
                let bytes = Array(bitmaps[Int(index)].name.utf8)
                guard bytes.count < size else { return ENOSPC }
                _ = bytes.withUnsafeBytes { memcpy(name, $0.baseAddress!, bytes.count) }
                name[bytes.count] = 0
                return 0
            },
            changed_extents: { disk, checkpoint, offset, length, emit, arg in
                guard let chain = FilterInstance.from(disk)?.chain, let checkpoint, let emit else { return EINVAL }
                guard let bitmap = chain.tracker.bitmap(named: String(cString: checkpoint)) else { return ENOENT }
                guard bitmap.inconsistency == nil else { return ESTALE }
                guard offset <= chain.backend.size, length <= chain.backend.size - offset else { return EINVAL }
                var position = offset
                bitmap.runs(offset: offset, length: length) { runLength, changed in
                    defer { position += runLength }
                    return emit(arg, position, runLength, changed ? 1 : 0) == 0
                }
                return 0
            },
            defer_call: { io, call, arg in
                guard let io, let call, LiveRequests.shared.lookup(io) != nil else { return EINVAL }
                if !EngineThread.deferHere(io, call, arg) { CompletionExecutor.executor(for: io).enqueue(io, call, arg) }
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
    /// A partner daemon's process: what only a daemon may ask for, and its settings
    /// (`param` with a NULL disk), as C strings that live as long as the process.
    struct DaemonRole {
        let peerFD: Int32?
        let settings: [String: UnsafeMutablePointer<CChar>]
        let logger: Logger
    }

    static func daemonSetting(_ key: String) -> UnsafePointer<CChar>? {
        targets.withLock { $0.daemon?.settings[key].map { UnsafePointer($0) } }
    }
    private struct TargetState {
        var access: TargetAccess = .direct
        var named: Set<String> = []
        var daemon: DaemonRole?
    }
    private static let targets = Guarded(TargetState())

    /// Set once at start, before any plug-in loads: how targets are reached, and every
    /// target this worker's policies name (what a call without a disk may open).
    public static func configureTargets(_ access: TargetAccess, named: Set<String>) {
        targets.withLock { $0 = TargetState(access: access, named: named) }
    }

    /// Set once at start of a partner daemon's process: its broker decides what the
    /// daemon may open (the host knows which policies use the plug-in, and when), and
    /// the peer listener the operator allowed, if any.
    public static func configureDaemon(plugin: String, brokerFD: Int32?, peerFD: Int32?, settings: [String: String]) {
        var logger = Logger(label: "iofilter.daemon")
        logger[metadataKey: "plugin"] = "\(plugin)"
        let role = DaemonRole(peerFD: peerFD, settings: settings.mapValues { strdup($0)! }, logger: logger)
        targets.withLock { $0 = TargetState(access: brokerFD.map { .broker(fd: $0) } ?? .direct, named: [], daemon: role) }
    }

    static func openTarget(_ filter: FilterInstance?, _ spec: String) -> Int32 {
        let logger = filter?.logger ?? pluginLogger
        return targets.withLock { state -> Int32 in
            // A daemon's requests are the host's to judge; a worker's are its policies'.
            let allowed = filter.map { $0.targets.contains(spec) } ?? (state.daemon != nil || state.named.contains(spec))
            guard allowed, !spec.hasPrefix(BrokerRequest.daemonChannelPrefix), !spec.hasPrefix(BrokerRequest.replicaPrefix) else {
                logger.warning("open_target refused: \(spec) is not a target its policy names")
                return -EACCES
            }
            return ask(state.access, for: spec, logger: logger, what: "open_target")
        }
    }

    static func openReplica(_ name: String, size: UInt64) -> Int32 {
        targets.withLock { state -> Int32 in
            guard state.daemon != nil else {
                pluginLogger.warning("open_replica refused: only a partner daemon keeps replica disks")
                return -EPERM
            }
            return ask(state.access, for: "\(BrokerRequest.replicaPrefix)\(size):\(name)", logger: pluginLogger, what: "open_replica")
        }
    }

    /// A fresh channel to `plugin`'s daemon from the host, or -1.
    static func requestDaemonChannel(_ plugin: String, logger: Logger) -> Int32 {
        targets.withLock { state -> Int32 in
            guard case .broker(let fd) = state.access else { return -1 }
            switch TargetBroker.request(BrokerRequest.daemonChannelPrefix + plugin, over: fd) {
            case .success(let channel): return channel
            case .failure(let failure):
                logger.debug("no daemon channel: \(failure.message)")
                return -1
            }
        }
    }

    /// Sends one request to the broker (or opens the target here, without one).
    /// Callers hold `targets`' lock, which keeps one request at a time on its socket.
    private static func ask(_ access: TargetAccess, for spec: String, logger: Logger, what: String) -> Int32 {
        let outcome = switch access {
        case .broker(let fd): TargetBroker.request(spec, over: fd)
        case .direct: TargetBroker.open(spec)
        }
        switch outcome {
        case .success(let fd): return fd
        case .failure(let failure):
            logger.warning("\(what) \(spec): \(failure.message)")
            return -failure.code
        }
    }

    static let pluginLogger = Logger(label: "iofilter.plugin")

    static func log(_ disk: OpaquePointer?, _ level: iof_log_level, _ message: UnsafePointer<CChar>?) {
        let logger = FilterInstance.from(disk)?.logger ?? targets.withLock { $0.daemon?.logger } ?? pluginLogger
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
