import CIOFilter
@_exported import IOFilterABI

/// A filter plug-in written in Swift.
///
/// Conform a final class, describe it in `metadata`, and export it with one line:
///
/// ```swift
/// @_cdecl("iof_plugin_entry")
/// public func iofPluginEntry() -> UnsafeRawPointer { exportFilter(MyFilter.self) }
/// ```
///
/// The host creates one instance per disk (`init(disk:)` is the ABI's `open`) and calls
/// `start` for every request on its way to the disk. Return a ``Disposition``: pass it
/// down, complete it yourself, fail it, or defer the decision (see ``Request/defer(_:)``).
/// Requests you passed come back up through `done` with their result, if
/// ``FilterMetadata/observesCompletions`` is set.
public protocol IOFilter: AnyObject, Sendable {
    /// Name, vendor, version, category, parameters, management operations.
    static var metadata: FilterMetadata { get }

    /// Once per process, before any disk is opened.
    static func load() throws(FilterError)

    /// A policy adds the filter to `disk` for the first time: create sidecar state.
    static func attach(_ disk: Disk) throws(FilterError)

    /// A policy removes the filter: leave the disk consistent (a write-back cache
    /// destages first), then delete sidecar state.
    static func detach(_ disk: Disk) throws(FilterError)

    /// A worker opens the disk (ABI `open`).
    init(disk: Disk) throws(FilterError)

    /// No request is in flight; release what the instance holds.
    func close()

    /// A request on its way down.
    func start(_ request: Request) -> Disposition

    /// The result of a request this filter passed, on its way up (`request.error` is 0
    /// or an errno). Return `.pass`, `.fail(errno)` or `.deferred`.
    func done(_ request: Request) -> Disposition

    /// Snapshot, clone, grow. Throwing vetoes the event.
    func handle(_ event: DiskEvent) throws(FilterError)

    /// Figures for operators: key/value pairs. Report `lag_seconds` with `rpo_seconds`
    /// and the host itself marks the filter degraded while the lag is past the RPO.
    func stats() -> [(String, Double)]

    /// How this instance is doing, for operators (ABI 1.4): the host samples it with the
    /// statistics and records an event when it changes. Answer from state you keep;
    /// never wait here.
    func health() -> Health
}

extension IOFilter {
    public static func load() throws(FilterError) {}
    public static func attach(_ disk: Disk) throws(FilterError) {}
    public static func detach(_ disk: Disk) throws(FilterError) {}
    public func close() {}
    public func done(_ request: Request) -> Disposition { .pass }
    public func handle(_ event: DiskEvent) throws(FilterError) {}
    public func stats() -> [(String, Double)] { [] }
    public func health() -> Health { .ok }
}

/// A filter instance's health, with the reason operators read when it is not ok.
public struct Health: Sendable, Equatable {
    public let status: HealthStatus
    public let reason: String

    /// Doing what its policy asks.
    public static let ok = Health(status: .ok, reason: "")
    /// Serving, but not as asked: a replica behind or out of reach, a cache bypassed.
    public static func degraded(_ reason: String) -> Health { Health(status: .degraded, reason: reason) }
    /// Not doing its job: requests fail, or protection is lost.
    public static func failed(_ reason: String) -> Health { Health(status: .failed, reason: reason) }
}

/// What a filter decides for a request.
public enum Disposition: Sendable, Equatable {
    /// Send it to the next layer down (in `done`: let the result go up).
    case pass
    /// The filter finished it: for a read, the buffer holds the data.
    case complete
    /// Fail it with a positive errno (EIO, ENOSPC, …).
    case fail(Int32)
    /// The filter decides later and calls ``Request/resume(_:)`` exactly once.
    case deferred
}

/// A typed parameter a policy may set.
public struct Parameter: Sendable {
    public enum Kind: Sendable {
        case bool(default: Bool)
        case int(default: Int64, range: ClosedRange<Int64>)
        case size(default: String, range: ClosedRange<Int64>)
        case string(default: String)
        case choice(default: String, values: [String])
        /// A file the filter opens itself; the sandbox lets it. Empty default: required.
        case path(default: String)
    }

    public var name: String
    public var description: String
    public var kind: Kind
    public var required: Bool

    public init(_ name: String, _ kind: Kind, required: Bool = false, description: String) {
        self.name = name
        self.kind = kind
        self.required = required
        self.description = description
    }
}

public struct FilterMetadata: Sendable {
    public var name: String
    public var vendor: String
    public var version: String
    public var description: String
    public var category: FilterCategory
    public var threadModel: ThreadModel
    public var parameters: [Parameter]
    public var operations: [ManagementOperation]
    /// Ask for `done` on every request this filter passes (costs a call per request).
    public var observesCompletions: Bool
    /// The filter keeps per-connection state: the host must not offer multi-conn.
    public var multiConnSafe: Bool
    /// The filter sees `.blockStatus` requests (and adjusts their extents in `done`).
    /// Without it the host passes them by; for a cache or encryption filter it then
    /// reports the whole range as data.
    public var answersBlockStatus: Bool
    /// The filter sees `.cache` (prefetch) hints; without it the host passes them by.
    public var handlesCacheHints: Bool
    /// The plug-in's partner daemon, if it has one.
    public var daemon: PartnerDaemon?

    public init(
        name: String, vendor: String, version: String, description: String, category: FilterCategory,
        threadModel: ThreadModel = .parallel, parameters: [Parameter] = [], operations: [ManagementOperation] = [],
        observesCompletions: Bool = false, multiConnSafe: Bool = true, answersBlockStatus: Bool = false,
        handlesCacheHints: Bool = false, daemon: PartnerDaemon? = nil
    ) {
        self.daemon = daemon
        self.answersBlockStatus = answersBlockStatus
        self.handlesCacheHints = handlesCacheHints
        self.name = name
        self.vendor = vendor
        self.version = version
        self.description = description
        self.category = category
        self.threadModel = threadModel
        self.parameters = parameters
        self.operations = operations
        self.observesCompletions = observesCompletions
        self.multiConnSafe = multiConnSafe
    }
}

public enum DiskEvent: Sendable {
    case snapshot
    case clone(target: String)
    case grow(newSize: UInt64)
    /// ABI 1.5: the disk's contents are about to be replaced by this snapshot's; drop
    /// what you hold of the old ones.
    case revert(toSnapshot: String)
    /// ABI 1.6: the chain changes live; this filter is closed here and `to` (nil: no
    /// filter, it is detached) opens in a new worker that keeps the disk's clients.
    /// Keep what it needs in the sidecar directory.
    case upgrade(from: String, to: String?)
}

/// A failure with an errno, for the callbacks that return one.
public struct FilterError: Error, Sendable, CustomStringConvertible {
    public var errno: Int32
    public var message: String

    public init(_ errno: Int32, _ message: String) {
        self.errno = errno
        self.message = message
    }

    public var description: String { message }
}
