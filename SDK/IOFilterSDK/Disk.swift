import CIOFilter
import Glibc

/// The host's services for one disk: what the filter is told about it, its parameters,
/// logging, I/O below the filter, timers.
public final class Disk: @unchecked Sendable {
    // @unchecked: immutable after init; the host services are thread-safe.
    let handle: OpaquePointer
    public let name: String
    public let vmName: String
    public let size: UInt64
    public let readOnly: Bool
    /// A directory only this filter on this disk uses; it survives restarts.
    public let sidecarDirectory: String

    init(handle: OpaquePointer, info: UnsafePointer<iof_disk_info>) {
        self.handle = handle
        let info = info.pointee
        name = info.disk_name.map { String(cString: $0) } ?? ""
        vmName = info.vm_name.map { String(cString: $0) } ?? ""
        size = info.size
        readOnly = info.read_only != 0
        sidecarDirectory = info.sidecar_dir.map { String(cString: $0) } ?? ""
    }

    /// A parameter's value as text (its default if the policy did not set it).
    public func parameter(_ key: String) -> String? {
        Host.services.pointee.param(handle, key).map { String(cString: $0) }
    }

    public func parameter(_ key: String, default value: Int64) -> Int64 {
        parameter(key).flatMap { Int64($0) } ?? value
    }

    public func parameter(_ key: String, default value: Bool) -> Bool {
        parameter(key).map { $0 == "true" } ?? value
    }

    public enum LogLevel: Sendable {
        case error, warning, info, debug

        var abi: iof_log_level {
            switch self {
            case .error: IOF_LOG_ERROR
            case .warning: IOF_LOG_WARNING
            case .info: IOF_LOG_INFO
            case .debug: IOF_LOG_DEBUG
            }
        }
    }

    public func log(_ level: LogLevel, _ message: String) {
        Host.services.pointee.log(handle, level.abi, message)
    }

    /// The disk's checkpoints (changed-block tracking), oldest first; empty on a host
    /// older than ABI 1.5.
    public var checkpoints: [String] {
        guard let lookup = Host.servicesSince(minor: 5)?.pointee.checkpoint_name else { return [] }
        var names: [String] = []
        var buffer = [CChar](repeating: 0, count: 128)
        while lookup(handle, UInt32(names.count), &buffer, buffer.count) == 0 {
            names.append(String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return names
    }

    /// What changed since checkpoint `name` in [offset, offset+length): runs, each
    /// changed or not, contiguous from `offset`. Throws ENOENT for no such checkpoint,
    /// ESTALE for one that may have missed changes (count everything as changed).
    public func changes(since name: String, offset: UInt64 = 0, length: UInt64? = nil) throws(FilterError)
        -> [(offset: UInt64, length: UInt64, changed: Bool)] {
        guard let query = Host.servicesSince(minor: 5)?.pointee.changed_extents else {
            throw FilterError(ENOSYS, "this host does not track changes (ABI 1.5)")
        }
        final class Runs { var list: [(offset: UInt64, length: UInt64, changed: Bool)] = [] }
        let runs = Runs()
        let error = withExtendedLifetime(runs) {
            query(handle, name, offset, length ?? size - min(offset, size), { arg, offset, length, changed in
                Unmanaged<Runs>.fromOpaque(arg!).takeUnretainedValue().list.append((offset, length, changed != 0))
                return 0
            }, Unmanaged.passUnretained(runs).toOpaque())
        }
        guard error == 0 else { throw FilterError(error, "changes since checkpoint \(name): \(String(cString: strerror(error)))") }
        return runs.list
    }

    /// I/O of the filter's own to the layers below it. `completion` runs exactly once,
    /// on any thread (possibly before this returns); `buffer` must stay valid until then.
    public func submitBelow(
        _ operation: Request.Operation, offset: UInt64, length: Int, buffer: UnsafeMutableRawPointer?,
        fua: Bool = false, completion: @escaping @Sendable (Int32) -> Void
    ) {
        let op: iof_op =
            switch operation {
            case .read: IOF_OP_READ
            case .write: IOF_OP_WRITE
            case .flush: IOF_OP_FLUSH
            case .trim: IOF_OP_TRIM
            case .writeZeroes, .unknown: IOF_OP_WRITE_ZEROES
            case .cache: IOF_OP_CACHE
            case .blockStatus: IOF_OP_BLOCK_STATUS  // the host refuses it (EINVAL): its answer has no way back
            }
        let box = Unmanaged.passRetained(CompletionBox(completion)).toOpaque()
        let rc = Host.services.pointee.submit_below(
            handle, op, fua ? UInt32(IOF_REQ_FUA) : 0, offset, UInt64(length), buffer,
            { arg, error in
                Unmanaged<CompletionBox>.fromOpaque(arg!).takeRetainedValue().body(error)
            }, box)
        if rc != 0 {
            Unmanaged<CompletionBox>.fromOpaque(box).takeRetainedValue().body(rc)
        }
    }

    /// The same, awaited. Returns 0 or an errno.
    public func submitBelow(
        _ operation: Request.Operation, offset: UInt64, length: Int, buffer: UnsafeMutableRawPointer?, fua: Bool = false
    ) async -> Int32 {
        let pointer = UnsafeSendablePointer(buffer)
        return await withCheckedContinuation { continuation in
            submitBelow(operation, offset: offset, length: length, buffer: pointer.value, fua: fua) { continuation.resume(returning: $0) }
        }
    }

    /// Runs `body` after `delay`, then every `interval` if given, on a host thread,
    /// until cancelled or the disk closes.
    @discardableResult
    public func startTimer(after delay: Duration, every interval: Duration? = nil, _ body: @escaping @Sendable () -> Void) -> DiskTimer {
        let box = Unmanaged.passRetained(TimerBox(body))
        let id = Host.services.pointee.start_timer(
            handle, delay.nanoseconds, interval?.nanoseconds ?? 0,
            { arg in Unmanaged<TimerBox>.fromOpaque(arg!).takeUnretainedValue().body() },
            box.toOpaque())
        return DiskTimer(disk: self, id: id, box: box)
    }
}

/// A timer started with ``Disk/startTimer(after:every:_:)``.
public final class DiskTimer: @unchecked Sendable {
    // @unchecked: `cancel` may race only with itself, which the host tolerates.
    let disk: Disk
    let id: UInt64
    private var box: Unmanaged<TimerBox>?

    init(disk: Disk, id: UInt64, box: Unmanaged<TimerBox>) {
        self.disk = disk
        self.id = id
        self.box = box
    }

    /// Stops the timer, waiting for a running callback to return.
    public func cancel() {
        guard let box else { return }
        Host.services.pointee.cancel_timer(disk.handle, id)
        box.release()
        self.box = nil
    }
}

final class CompletionBox {
    let body: @Sendable (Int32) -> Void
    init(_ body: @escaping @Sendable (Int32) -> Void) { self.body = body }
}

final class TimerBox {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

/// A raw pointer carried across an `await` whose lifetime the caller guarantees.
struct UnsafeSendablePointer: @unchecked Sendable {
    let value: UnsafeMutableRawPointer?
    init(_ value: UnsafeMutableRawPointer?) { self.value = value }
}

extension Duration {
    var nanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        return UInt64(max(seconds, 0)) * 1_000_000_000 + UInt64(max(attoseconds, 0) / 1_000_000_000)
    }
}
