import CIOFilter
import Glibc
import IOFilterModel
import IOFilterPluginLoader
import IOFilterPosix
import Logging

/// One filter on one disk: the plug-in's per-disk instance, its parameters as C
/// strings, and the lock its declared thread model asks for.
public final class FilterInstance: @unchecked Sendable {
    // @unchecked: set up before any request runs and fixed after, except `instance`,
    // which changes only in open/close while no request is in flight.
    public let plugin: LoadedPlugin
    public let name: String
    public let sidecarDirectory: String
    public let logger: Logger
    private let parameters: [String: UnsafeMutablePointer<CChar>]
    /// The files and NBD URIs its policy named (its path parameters' values): what
    /// `open_target` may open for it.
    let targets: Set<String>
    private let info: UnsafeMutablePointer<iof_disk_info>
    private let cStrings: [UnsafeMutablePointer<CChar>]
    private var instance: UnsafeMutableRawPointer?
    private let serializer: ConditionLock?
    private let startFunction: @convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<iof_request>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> iof_disposition
    private let doneFunction: (@convention(c) (UnsafeMutableRawPointer?, UnsafeMutablePointer<iof_request>?, UnsafeMutableRawPointer?) -> iof_disposition)?
    let hasDone: Bool
    /// ABI 1.2 ops it declared; the others pass it by.
    let handlesBlockStatus: Bool
    let handlesCache: Bool
    /// Its contents are not what lies below (encryption, cache): block status it does
    /// not answer itself is reported as data across it.
    let hidesExtents: Bool
    unowned(unsafe) var chain: Chain?
    var position = 0
    let timers = TimerSet()

    public init(plugin: LoadedPlugin, parameters: [String: String], diskName: String, vmName: String, size: UInt64,
         readOnly: Bool, sidecarDirectory: String, logger: Logger) {
        self.plugin = plugin
        self.name = plugin.library.manifest.name
        self.sidecarDirectory = sidecarDirectory
        var logger = logger
        logger[metadataKey: "filter"] = "\(plugin.library.manifest.name)"
        self.logger = logger
        self.parameters = parameters.mapValues { strdup($0)! }
        targets = Set(plugin.library.manifest.parameters.filter(\.isPath).compactMap { parameters[$0.name] }.filter { !$0.isEmpty })
        let disk = strdup(diskName)!, vm = strdup(vmName)!, sidecar = strdup(sidecarDirectory)!
        cStrings = [disk, vm, sidecar]
        info = .allocate(capacity: 1)
        info.initialize(to: iof_disk_info(
            struct_size: UInt32(MemoryLayout<iof_disk_info>.size), disk_name: disk, vm_name: vm, size: size,
            read_only: readOnly ? 1 : 0, sidecar_dir: sidecar))
        let descriptor = plugin.library.descriptor.pointee
        startFunction = descriptor.start!
        doneFunction = descriptor.done
        hasDone = descriptor.done != nil
        let manifest = plugin.library.manifest
        handlesBlockStatus = manifest.callbacks.contains("block_status")
        handlesCache = manifest.callbacks.contains("cache")
        hidesExtents = !handlesBlockStatus && (manifest.category == .encryption || manifest.category == .cache)
        switch plugin.library.manifest.threadModel {
        case .parallel: serializer = nil
        case .serializePerDisk: serializer = ConditionLock()
        case .serializeAll: serializer = plugin.processWideLock
        }
    }

    deinit {
        parameters.values.forEach { free($0) }
        cStrings.forEach { free($0) }
        info.deallocate()
    }

    func bind(to chain: Chain, position: Int) {
        self.chain = chain
        self.position = position
    }

    var hostDisk: OpaquePointer { OpaquePointer(Unmanaged.passUnretained(self).toOpaque()) }

    static func from(_ disk: OpaquePointer?) -> FilterInstance? {
        disk.map { Unmanaged<FilterInstance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
    }

    func parameter(_ key: String) -> UnsafePointer<CChar>? {
        parameters[key].map { UnsafePointer($0) }
    }

    // MARK: lifecycle

    /// Runs the plug-in's `attach` (first time the filter meets this disk).
    public func attach() throws(ChainError) {
        guard let attach = plugin.library.descriptor.pointee.attach else { return }
        let rc = serialized { attach(hostDisk, info) }
        guard rc == 0 else { throw .filterRefused(filter: name, step: "attach", errno: rc) }
    }

    public func detach() throws(ChainError) {
        guard let detach = plugin.library.descriptor.pointee.detach else { return }
        let rc = serialized { detach(hostDisk, info) }
        guard rc == 0 else { throw .filterRefused(filter: name, step: "detach", errno: rc) }
    }

    public func open() throws(ChainError) {
        let open = plugin.library.descriptor.pointee.open!
        var created: UnsafeMutableRawPointer?
        let rc = serialized { open(hostDisk, info, &created) }
        guard rc == 0 else { throw .filterRefused(filter: name, step: "open", errno: rc) }
        instance = created
    }

    public func close() {
        timers.cancelAll()
        defer { channel.withLock { if $0 >= 0 { Glibc.close($0) }; $0 = -1 } }
        guard instance != nil else { return }
        let close = plugin.library.descriptor.pointee.close!
        serialized { close(instance) }
        instance = nil
    }

    /// This instance's channel to its plug-in's daemon (-1: none yet, or closed).
    private let channel = Guarded<Int32>(-1)

    /// `daemon_channel`: the channel while the daemon keeps its end open; once it has
    /// closed it (it exited, and the host restarts it), a fresh one from the host, or
    /// -1 while there is none to be had.
    func daemonChannel() -> Int32 {
        guard plugin.library.manifest.hasDaemon else { return -1 }
        return channel.withLock { fd -> Int32 in
            if fd >= 0 {
                var peer = pollfd(fd: fd, events: 0x2000 /* POLLRDHUP, which Glibc does not export */, revents: 0)
                if poll(&peer, 1, 0) == 0 { return fd }
                Glibc.close(fd)
                fd = -1
            }
            fd = HostServices.requestDaemonChannel(name, logger: logger)
            return fd
        }
    }

    public func event(_ event: iof_disk_event) -> Int32 {
        guard let handler = plugin.library.descriptor.pointee.event else { return 0 }
        var copy = event
        return serialized { handler(instance, &copy) }
    }

    public func stats() -> [(String, Double)] {
        guard let stats = plugin.library.descriptor.pointee.stats else { return [] }
        final class Sink { var values: [(String, Double)] = [] }
        let sink = Sink()
        withExtendedLifetime(sink) {
            serialized {
                stats(instance, { context, key, value in
                    guard let context, let key else { return }
                    Unmanaged<Sink>.fromOpaque(context).takeUnretainedValue().values.append((String(cString: key), value))
                }, Unmanaged.passUnretained(sink).toOpaque())
            }
        }
        return sink.values
    }

    /// What the instance says of its health (ABI 1.4), with its reason; nil from a
    /// filter that does not say (it has no `health`, or was built for an older minor).
    public func health() -> (status: HealthStatus, reason: String)? {
        let descriptor = plugin.library.descriptor.pointee
        guard descriptor.abi_minor >= 4, let health = descriptor.health else { return nil }
        // The reason buffer is the host's: a filter that writes no NUL still ends in one.
        var reason = [CChar](repeating: 0, count: 512)
        let status = reason.withUnsafeMutableBufferPointer { buffer in
            serialized { health(instance, buffer.baseAddress, buffer.count - 1) }
        }
        let text = String(decoding: reason.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (HealthStatus(abiValue: status.rawValue), String(text.prefix(300)))
    }

    // MARK: the data path

    /// Whether the request's op reaches this filter's callbacks.
    @inline(__always)
    func sees(_ op: iof_op) -> Bool {
        switch op {
        case IOF_OP_BLOCK_STATUS: handlesBlockStatus
        case IOF_OP_CACHE: handlesCache
        default: true
        }
    }

    @inline(__always)
    func start(_ io: UnsafeMutablePointer<iof_request>, _ slot: UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> iof_disposition {
        guard let serializer else { return startFunction(instance, io, slot) }
        serializer.lock()
        return PendingResumes.serialized(unlock: serializer.unlock) { startFunction(instance, io, slot) }
    }

    @inline(__always)
    func done(_ io: UnsafeMutablePointer<iof_request>, _ slot: UnsafeMutableRawPointer?) -> iof_disposition {
        guard let doneFunction else { return IOF_PASS }
        guard let serializer else { return doneFunction(instance, io, slot) }
        serializer.lock()
        return PendingResumes.serialized(unlock: serializer.unlock) { doneFunction(instance, io, slot) }
    }

    private func serialized<T>(_ body: () -> T) -> T {
        guard let serializer else { return body() }
        serializer.lock()
        return PendingResumes.serialized(unlock: serializer.unlock, body)
    }

    func logInvalidDisposition(_ disposition: iof_disposition, request: UnsafeMutablePointer<iof_request>, in callback: String) {
        logger.error("\(callback) returned invalid disposition \(disposition.rawValue) for request \(request.pointee.id); failing it with EIO")
    }
}

/// A plug-in loaded into this process, with the lock a serialize-all plug-in shares
/// across all of its disks.
public final class LoadedPlugin: Sendable {
    public let library: PluginLibrary
    let processWideLock = ConditionLock()

    public init(library: PluginLibrary) {
        self.library = library
    }

    /// Calls the plug-in's `load` with the host services table.
    public func load() throws(ChainError) {
        guard let load = library.descriptor.pointee.load else { return }
        let rc = load(HostServices.table)
        guard rc == 0 else { throw .filterRefused(filter: library.manifest.name, step: "load", errno: rc) }
    }

    public func unload() {
        library.descriptor.pointee.unload?()
    }
}

public enum ChainError: Error, CustomStringConvertible, Sendable {
    case filterRefused(filter: String, step: String, errno: Int32)
    case backend(String)
    /// A filter refused a disk lifecycle event.
    case vetoed(String)

    public var description: String {
        switch self {
        case .filterRefused(let filter, let step, let code):
            "\(filter): \(step) failed: \(String(cString: strerror(code))) (errno \(code))"
        case .backend(let message), .vetoed(let message):
            message
        }
    }
}
