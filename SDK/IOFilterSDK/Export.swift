import CIOFilter
import Glibc

/// Builds the C descriptor for `filter` and returns it: the whole body of the plug-in's
/// entry point. One filter type per shared object.
///
/// ```swift
/// @_cdecl("iof_plugin_entry")
/// public func iofPluginEntry() -> UnsafeRawPointer { exportFilter(MyFilter.self) }
/// ```
public func exportFilter(_ filter: any IOFilter.Type) -> UnsafeRawPointer {
    Host.lock.lock()
    defer { Host.lock.unlock() }
    if let descriptor = Host.descriptor { return UnsafeRawPointer(descriptor) }
    Host.filterType = filter
    let descriptor = DescriptorBuilder.build(filter.metadata)
    Host.descriptor = descriptor
    return UnsafeRawPointer(descriptor)
}

/// Process-wide state of the plug-in: set once by `exportFilter` and `load`.
enum Host {
    static let lock = NSLockLike()
    nonisolated(unsafe) static var filterType: (any IOFilter.Type)?
    nonisolated(unsafe) static var descriptor: UnsafeMutablePointer<iof_plugin>?
    nonisolated(unsafe) static var services: UnsafePointer<iof_host_services>!

    /// The services, if the host speaks ABI 1.`minor` or later (its table is that long).
    static func servicesSince(minor: UInt16) -> UnsafePointer<iof_host_services>? {
        guard let services, services.pointee.abi_minor >= minor else { return nil }
        return services
    }
}

/// The filter instance behind the ABI's `void *instance`.
final class Instance {
    let filter: any IOFilter
    init(_ filter: any IOFilter) { self.filter = filter }

    static func from(_ pointer: UnsafeMutableRawPointer?) -> Instance {
        Unmanaged<Instance>.fromOpaque(pointer!).takeUnretainedValue()
    }
}

enum DescriptorBuilder {
    static func build(_ metadata: FilterMetadata) -> UnsafeMutablePointer<iof_plugin> {
        var plugin = iof_plugin()
        plugin.struct_size = UInt32(MemoryLayout<iof_plugin>.size)
        plugin.abi_major = UInt16(IOF_ABI_MAJOR)
        plugin.abi_minor = UInt16(IOF_ABI_MINOR)
        plugin.name = keep(metadata.name)
        plugin.vendor = keep(metadata.vendor)
        plugin.version = keep(metadata.version)
        plugin.description = keep(metadata.description)
        plugin.category = metadata.category.abiValue
        plugin.thread_model = metadata.threadModel.abiValue
        var flags: PluginFlags = []
        if !metadata.multiConnSafe { flags.insert(.noMultiConn) }
        if metadata.answersBlockStatus { flags.insert(.blockStatus) }
        if metadata.handlesCacheHints { flags.insert(.cacheHints) }
        plugin.flags = flags.rawValue

        let params = UnsafeMutablePointer<iof_param_spec>.allocate(capacity: max(metadata.parameters.count, 1))
        for (index, parameter) in metadata.parameters.enumerated() {
            params[index] = spec(parameter)
        }
        plugin.param_count = UInt32(metadata.parameters.count)
        plugin.params = UnsafePointer(params)

        let ops = UnsafeMutablePointer<iof_mgmt_op>.allocate(capacity: max(metadata.operations.count, 1))
        for (index, operation) in metadata.operations.enumerated() {
            ops[index] = operation.abi()
        }
        plugin.mgmt_op_count = UInt32(metadata.operations.count)
        plugin.mgmt_ops = UnsafePointer(ops)

        plugin.load = { services in
            Host.services = services
            do throws(FilterError) {
                try Host.filterType!.load()
                return 0
            } catch {
                return error.errno
            }
        }
        plugin.attach = { handle, info in
            do throws(FilterError) {
                try Host.filterType!.attach(Disk(handle: handle!, info: info!))
                return 0
            } catch {
                Disk(handle: handle!, info: info!).log(.error, "attach: \(error.message)")
                return error.errno
            }
        }
        plugin.detach = { handle, info in
            do throws(FilterError) {
                try Host.filterType!.detach(Disk(handle: handle!, info: info!))
                return 0
            } catch {
                Disk(handle: handle!, info: info!).log(.error, "detach: \(error.message)")
                return error.errno
            }
        }
        plugin.open = { handle, info, out in
            let disk = Disk(handle: handle!, info: info!)
            do throws(FilterError) {
                let filter = try Host.filterType!.init(disk: disk)
                out!.pointee = Unmanaged.passRetained(Instance(filter)).toOpaque()
                return 0
            } catch {
                disk.log(.error, "open: \(error.message)")
                return error.errno
            }
        }
        plugin.close = { instance in
            let box = Unmanaged<Instance>.fromOpaque(instance!)
            box.takeUnretainedValue().filter.close()
            box.release()
        }
        plugin.start = { instance, raw, slot in
            let request = Request(raw: raw!, slot: slot, storedWord: nil)
            return DescriptorBuilder.apply(Instance.from(instance).filter.start(request), to: raw!)
        }
        if metadata.observesCompletions {
            plugin.done = { instance, raw, word in
                let request = Request(raw: raw!, slot: nil, storedWord: word)
                return DescriptorBuilder.apply(Instance.from(instance).filter.done(request), to: raw!)
            }
        }
        plugin.event = { instance, event in
            let filter = Instance.from(instance).filter
            let e = event!.pointee
            let translated: DiskEvent =
                switch e.type {
                case IOF_EVENT_GROW: .grow(newSize: e.new_size)
                case IOF_EVENT_CLONE: .clone(target: e.target_name.map { String(cString: $0) } ?? "")
                case IOF_EVENT_REVERT: .revert(toSnapshot: e.target_name.map { String(cString: $0) } ?? "")
                case IOF_EVENT_UPGRADE: .upgrade(from: e.from_version.map { String(cString: $0) } ?? "", to: e.to_version.map { String(cString: $0) })
                default: .snapshot
                }
            do throws(FilterError) {
                try filter.handle(translated)
                return 0
            } catch {
                return error.errno
            }
        }
        plugin.stats = { instance, emit, context in
            for (key, value) in Instance.from(instance).filter.stats() {
                emit?(context, key, value)
            }
        }
        plugin.health = { instance, reason, size in
            let health = Instance.from(instance).filter.health()
            if let reason, size > 0 {
                // At most size - 1 bytes and a NUL, cut on a byte boundary: the host
                // repairs a cut UTF-8 sequence when it decodes.
                let bytes = Array(health.reason.utf8.prefix(size - 1))
                for (index, byte) in bytes.enumerated() { reason[index] = CChar(bitPattern: byte) }
                reason[bytes.count] = 0
            }
            return health.status.abiValue
        }

        if let daemon = metadata.daemon {
            plugin.daemon_main = { services, channels in
                // A daemon's process loads the plug-in (`load` above) before this.
                if Host.services == nil { Host.services = services }
                return Host.filterType!.metadata.daemon!.main(DaemonHost(channels: channels))
            }
            plugin.daemon_flags = daemon.listensForPeers ? UInt32(IOF_DAEMON_LISTENS) : 0
        }

        let descriptor = UnsafeMutablePointer<iof_plugin>.allocate(capacity: 1)
        descriptor.initialize(to: plugin)
        return descriptor
    }

    @inline(__always)
    static func apply(_ disposition: Disposition, to raw: UnsafeMutablePointer<iof_request>) -> iof_disposition {
        let (value, errno) = disposition.abi
        if value == IOF_FAIL { raw.pointee.error = errno }
        return value
    }

    static func spec(_ parameter: Parameter) -> iof_param_spec {
        var spec = iof_param_spec()
        spec.struct_size = UInt32(MemoryLayout<iof_param_spec>.size)
        spec.name = keep(parameter.name)
        spec.description = keep(parameter.description)
        spec.flags = parameter.required ? UInt32(IOF_PARAM_REQUIRED) : 0
        switch parameter.kind {
        case .bool(let value):
            spec.type = IOF_PARAM_BOOL
            spec.default_value = keep(value ? "true" : "false")
        case .int(let value, let range):
            spec.type = IOF_PARAM_INT
            spec.default_value = keep(String(value))
            spec.min = range.lowerBound
            spec.max = range.upperBound
        case .size(let value, let range):
            spec.type = IOF_PARAM_SIZE
            spec.default_value = keep(value)
            spec.min = range.lowerBound
            spec.max = range.upperBound
        case .string(let value):
            spec.type = IOF_PARAM_STRING
            spec.default_value = keep(value)
        case .path(let value):
            spec.type = IOF_PARAM_STRING
            spec.flags |= UInt32(IOF_PARAM_PATH)
            spec.default_value = keep(value)
        case .choice(let value, let values):
            spec.type = IOF_PARAM_ENUM
            spec.default_value = keep(value)
            let list = UnsafeMutablePointer<UnsafePointer<CChar>?>.allocate(capacity: values.count + 1)
            for (index, text) in values.enumerated() { list[index] = keep(text) }
            list[values.count] = nil
            spec.enum_values = UnsafePointer(list)
        }
        if parameter.required { spec.default_value = nil }
        return spec
    }
}

/// A C string that lives as long as the plug-in (descriptor text).
func keep(_ text: String) -> UnsafePointer<CChar> {
    UnsafePointer(strdup(text)!)
}

/// A pthread mutex usable from the nonisolated globals above.
final class NSLockLike: @unchecked Sendable {
    // @unchecked: the mutex is only used through pthread calls.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    init() { pthread_mutex_init(mutex, nil) }
    func lock() { pthread_mutex_lock(mutex) }
    func unlock() { pthread_mutex_unlock(mutex) }
    func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}
