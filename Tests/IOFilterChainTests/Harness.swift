@preconcurrency import CIOFilter
import Glibc
import IOFilterModel
import IOFilterPluginLoader
import IOFilterPosix
import Logging
import Synchronization

@testable import IOFilterChain

// The chain engine under test with real filters linked into the test process — C
// descriptors whose callbacks run Swift closures — over an in-memory disk: the way
// swift-nio tests its handlers on an EmbeddedChannel. Everything the engine does with
// a plug-in loaded from a file it does with these.

/// A filter whose `start` and `done` are closures a test sets.
final class ScriptedFilter: @unchecked Sendable {
    // @unchecked: the closures are set before the chain runs; `events` is a Mutex.
    let name: String
    let threadModel: iof_thread_model
    var onStart: (UnsafeMutablePointer<iof_request>) -> iof_disposition = { _ in IOF_PASS }
    var onDone: (UnsafeMutablePointer<iof_request>) -> iof_disposition = { _ in IOF_PASS }
    /// "start <id>" and "done <id>" in the order the engine made the calls.
    let events = Guarded<[String]>([])

    init(_ name: String, threadModel: iof_thread_model = IOF_THREADS_PARALLEL) {
        self.name = name
        self.threadModel = threadModel
    }

    func record(_ what: String, _ request: UnsafeMutablePointer<iof_request>) {
        events.withLock { $0.append("\(what) \(request.pointee.id)") }
    }

    func calls(_ what: String) -> Int { events.withLock { $0.filter { $0.hasPrefix(what + " ") }.count } }

    /// The C descriptor that runs this filter: built once per filter, never freed.
    func descriptor(category: iof_category) -> UnsafePointer<iof_plugin> {
        let plugin = UnsafeMutablePointer<iof_plugin>.allocate(capacity: 1)
        plugin.initialize(to: iof_plugin())
        plugin.pointee.struct_size = UInt32(MemoryLayout<iof_plugin>.size)
        plugin.pointee.abi_major = UInt16(IOF_ABI_MAJOR)
        plugin.pointee.abi_minor = UInt16(IOF_ABI_MINOR)
        plugin.pointee.name = UnsafePointer(strdup("org.test.\(name)"))
        plugin.pointee.vendor = UnsafePointer(strdup("tests"))
        plugin.pointee.version = UnsafePointer(strdup("1.0.0"))
        plugin.pointee.description = UnsafePointer(strdup("a scripted test filter"))
        plugin.pointee.category = category
        plugin.pointee.thread_model = threadModel
        plugin.pointee.open = { disk, _, instance in
            guard let text = FilterInstance.from(disk)?.parameter("scripted"),
                  let address = UInt(String(cString: text)), let pointer = UnsafeRawPointer(bitPattern: address)
            else { return EINVAL }
            instance?.pointee = UnsafeMutableRawPointer(mutating: pointer)
            return 0
        }
        plugin.pointee.close = { _ in }
        plugin.pointee.start = { instance, request, _ in
            let filter = Unmanaged<ScriptedFilter>.fromOpaque(instance!).takeUnretainedValue()
            filter.record("start", request!)
            return filter.onStart(request!)
        }
        plugin.pointee.done = { instance, request, _ in
            let filter = Unmanaged<ScriptedFilter>.fromOpaque(instance!).takeUnretainedValue()
            filter.record("done", request!)
            return filter.onDone(request!)
        }
        return UnsafePointer(plugin)
    }
}

/// A disk in memory. Completes inline, or (with `asynchronous`) from a thread of its
/// own, as a remote backend would. Records every request that reaches it.
final class MemoryBackend: StorageBackend, @unchecked Sendable {
    // @unchecked: `bytes` is written only by requests the engine serialises per range
    // in these tests; `seen` is a Mutex.
    let size: UInt64
    let bytes: UnsafeMutableRawPointer
    let asynchronous: Bool
    let seen = Guarded<[(op: iof_op, offset: UInt64, length: UInt64)]>([])
    var readOnly: Bool { false }
    var canTrim: Bool { true }
    var canWriteZeroes: Bool { true }
    var description: String { "memory" }

    init(size: UInt64, asynchronous: Bool = false) {
        self.size = size
        self.asynchronous = asynchronous
        bytes = .allocate(byteCount: Int(size), alignment: 4096)
        memset(bytes, 0, Int(size))
    }

    deinit { bytes.deallocate() }

    func submit(_ request: ChainRequest) {
        let io = request.io.pointee
        seen.withLock { $0.append((io.op, io.offset, io.length)) }
        let perform: @Sendable () -> Void = { [self] in
            let io = request.io.pointee
            let length = Int(io.length), offset = Int(io.offset)
            switch io.op {
            case IOF_OP_READ: memcpy(io.buffer, bytes + offset, length)
            case IOF_OP_WRITE: memcpy(bytes + offset, io.buffer, length)
            case IOF_OP_TRIM, IOF_OP_WRITE_ZEROES: memset(bytes + offset, 0, length)
            default: break
            }
            request.backendDidComplete(error: 0)
        }
        if asynchronous { Background.run(perform) } else { perform() }
    }

    func close() -> Int32 { 0 }

    var requestsSeen: Int { seen.withLock { $0.count } }
}

/// Runs closures on a few long-lived threads (filters deferring to "their own
/// thread", an asynchronous backend).
enum Background {
    private final class Queue: @unchecked Sendable {
        let lock = ConditionLock()
        var work: [@Sendable () -> Void] = []
    }
    private static let queues: [Queue] = (0..<4).map { index in
        let queue = Queue()
        startThread(name: "test-bg-\(index)") {
            while true {
                queue.lock.lock()
                while queue.work.isEmpty { queue.lock.wait() }
                let next = queue.work.removeFirst()
                queue.lock.unlock()
                next()
            }
        }
        return queue
    }
    private static let next = Atomic<Int>(0)

    static func run(_ body: @escaping @Sendable () -> Void) {
        let queue = queues[next.wrappingAdd(1, ordering: .relaxed).oldValue & 3]
        queue.lock.withLock {
            queue.work.append(body)
            queue.lock.signal()
        }
    }
}

/// Log lines, captured per test.
final class LogRecord: @unchecked Sendable {
    let lines = Guarded<[String]>([])
    var all: [String] { lines.withLock { $0 } }
    func contains(_ text: String) -> Bool { all.contains { $0.contains(text) } }

    struct Handler: LogHandler {
        let record: LogRecord
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }
        func log(event: LogEvent) {
            let filter = metadata["filter"].map { "[\($0)] " } ?? ""
            record.lines.withLock { $0.append("\(event.level) \(filter)\(event.message)") }
        }
    }

    var logger: Logger { Logger(label: "test") { _ in Handler(record: self) } }
}

/// A chain of scripted filters (consumer side first) over a memory disk.
final class TestChain: @unchecked Sendable {
    let filters: [ScriptedFilter]
    let backend: MemoryBackend
    let chain: Chain
    let log = LogRecord()

    /// Over `storage` instead of the memory disk, when given (then `backend` sees nothing).
    init(_ filters: [ScriptedFilter], size: UInt64 = 1 << 20, asynchronousBackend: Bool = false,
         storage: (any StorageBackend)? = nil) throws {
        // As in the worker: a client that hung up is an error to handle, not a reason to die.
        signal(SIGPIPE, SIG_IGN)
        self.filters = filters
        backend = MemoryBackend(size: storage == nil ? size : 4096, asynchronous: asynchronousBackend)
        let size = storage?.size ?? size
        let categories: [iof_category] = [
            IOF_CATEGORY_INSPECTION, IOF_CATEGORY_REPLICATION, IOF_CATEGORY_ENCRYPTION, IOF_CATEGORY_CACHE, IOF_CATEGORY_QOS,
        ]
        let logger = log.logger
        var instances: [FilterInstance] = []
        for (index, filter) in filters.enumerated() {
            let library = try PluginLibrary(linkedDescriptor: filter.descriptor(category: categories[index]), name: filter.name)
            let address = UInt(bitPattern: Unmanaged.passUnretained(filter).toOpaque())
            instances.append(FilterInstance(
                plugin: LoadedPlugin(library: library), parameters: ["scripted": "\(address)"], diskName: "disk",
                vmName: "vm", size: size, readOnly: false, sidecarDirectory: "/nonexistent", logger: logger))
        }
        chain = Chain(diskName: "disk", filters: instances, backend: storage ?? backend, logger: logger)
        for instance in instances.reversed() { try instance.open() }
    }

    deinit { chain.close() }

    /// Sends one request through the whole chain and waits for its completion.
    @discardableResult
    func send(_ op: iof_op, offset: UInt64 = 0, length: UInt64 = 4096, buffer: UnsafeMutableRawPointer? = nil,
              flags: UInt32 = 0, timeout: Double = 10) -> Int32? {
        let waiter = Completion()
        start(op, offset: offset, length: length, buffer: buffer, flags: flags, waiter: waiter)
        return waiter.wait(timeout: timeout)
    }

    /// Starts a request and returns at once; `waiter` learns its result.
    @discardableResult
    func start(_ op: iof_op, offset: UInt64 = 0, length: UInt64 = 4096, buffer: UnsafeMutableRawPointer? = nil,
               flags: UInt32 = 0, waiter: Completion) -> ChainRequest {
        let request = ChainRequest(chain: chain, top: 0, completion: .swift { error in waiter.complete(error) }, oneOff: true)
        request.prepare(op: op, flags: flags, offset: offset, length: length,
                        buffer: buffer ?? (op == IOF_OP_READ || op == IOF_OP_WRITE ? Scratch.page : nil))
        request.run()
        return request
    }
}

/// A page tests may scribble on when they do not care about the bytes.
enum Scratch {
    nonisolated(unsafe) static let page = UnsafeMutableRawPointer.allocate(byteCount: 1 << 20, alignment: 4096)
}

/// The result of one request, and how many times it completed (must be once).
final class Completion: @unchecked Sendable {
    private let lock = ConditionLock()
    private var error: Int32?
    private(set) var count = 0

    func complete(_ error: Int32) {
        lock.withLock {
            self.error = error
            count += 1
            lock.broadcast()
        }
    }

    func wait(timeout: Double) -> Int32? {
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
            while error == nil {
                let now = monotonicNanoseconds()
                if now >= deadline { return nil }
                _ = lock.wait(nanoseconds: deadline - now)
            }
            return error
        }
    }

    var completions: Int { lock.withLock { count } }
}

/// The host's `defer_call` (ABI 1.7), as a plug-in calls it: `resume(request,
/// disposition, error)` from the host's thread. 0, or the errno it returned.
func hostDeferCall(_ request: UnsafeMutablePointer<iof_request>, _ disposition: iof_disposition, _ error: Int32 = 0) -> Int32 {
    // The decision rides in the argument's bits: a C callback captures nothing.
    let bits = UInt(disposition.rawValue) | UInt(UInt32(bitPattern: error)) << 8
    return HostServices.table.pointee.defer_call(request, { request, arg in
        let bits = UInt(bitPattern: arg)
        DeferredCallLog.record(request)
        hostResume(request, iof_disposition(rawValue: UInt32(bits & 0xff)), Int32(truncatingIfNeeded: bits >> 8))
    }, UnsafeMutableRawPointer(bitPattern: bits))
}

/// Which thread ran each deferred call, and how many ran while a filter's callback
/// that says so (`insideCallback`) was still running.
enum DeferredCallLog {
    static let threads = Mutex<[pthread_t]>([])
    static let insideCallback = Mutex(false)
    static let ranInsideCallback = Mutex(0)
    static func record(_ request: UnsafeMutablePointer<iof_request>?) {
        threads.withLock { $0.append(pthread_self()) }
        if insideCallback.withLock({ $0 }) { ranInsideCallback.withLock { $0 += 1 } }
    }
    static func reset() {
        threads.withLock { $0 = [] }
        ranInsideCallback.withLock { $0 = 0 }
    }
}

/// The host's `resume`, as a plug-in calls it.
func hostResume(_ request: UnsafeMutablePointer<iof_request>?, _ disposition: iof_disposition, _ error: Int32 = 0) {
    HostServices.table.pointee.resume(request, disposition, error)
}
