// The Swift mirror of include/iofilter.h's enumerations and flags, written once: the
// host (IOFilterModel, the plug-in loader) and the SDK both use these types, so a value
// the header adds is added here and nowhere else.
import CIOFilter

/// A filter's category fixes its place in a disk's chain: a request meets the categories
/// in this order on its way from the consumer to the disk, and a disk has at most one
/// filter of each (`enum iof_category`).
public enum FilterCategory: String, Codable, Sendable, CaseIterable, Comparable {
    case inspection, replication, encryption, cache, qos

    public var abiValue: iof_category {
        switch self {
        case .inspection: IOF_CATEGORY_INSPECTION
        case .replication: IOF_CATEGORY_REPLICATION
        case .encryption: IOF_CATEGORY_ENCRYPTION
        case .cache: IOF_CATEGORY_CACHE
        case .qos: IOF_CATEGORY_QOS
        }
    }

    public init?(abiValue: UInt32) {
        guard let match = Self.allCases.first(where: { $0.abiValue.rawValue == abiValue }) else { return nil }
        self = match
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.abiValue.rawValue < rhs.abiValue.rawValue }
}

/// How the host may call into one filter concurrently; it takes the locks
/// (`enum iof_thread_model`).
public enum ThreadModel: String, Codable, Sendable, CaseIterable {
    case serializeAll = "serialize-all"
    case serializePerDisk = "serialize-per-disk"
    case parallel

    public var abiValue: iof_thread_model {
        switch self {
        case .serializeAll: IOF_THREADS_SERIALIZE_ALL
        case .serializePerDisk: IOF_THREADS_SERIALIZE_PER_DISK
        case .parallel: IOF_THREADS_PARALLEL
        }
    }

    public init?(abiValue: UInt32) {
        guard let match = Self.allCases.first(where: { $0.abiValue.rawValue == abiValue }) else { return nil }
        self = match
    }
}

/// The C types a management operation takes and returns (`enum iof_value_type`).
public enum ValueType: String, Codable, Sendable, CaseIterable {
    case void, int32, int64, uint32, uint64, double, bool, string

    public var abiValue: iof_value_type {
        switch self {
        case .void: IOF_VALUE_VOID
        case .int32: IOF_VALUE_INT32
        case .int64: IOF_VALUE_INT64
        case .uint32: IOF_VALUE_UINT32
        case .uint64: IOF_VALUE_UINT64
        case .double: IOF_VALUE_DOUBLE
        case .bool: IOF_VALUE_BOOL
        case .string: IOF_VALUE_STRING
        }
    }

    public init?(abiValue: UInt32) {
        guard let match = Self.allCases.first(where: { $0.abiValue.rawValue == abiValue }) else { return nil }
        self = match
    }
}

/// `struct iof_plugin`'s flags (`IOF_PLUGIN_*`), by one name each.
public struct PluginFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// IOF_PLUGIN_NO_MULTI_CONN: the filter keeps per-connection state, so the host
    /// must not offer multi-conn (the SDK's `multiConnSafe: false`, the manifest's
    /// `multiConn: false`).
    public static let noMultiConn = PluginFlags(rawValue: UInt32(IOF_PLUGIN_NO_MULTI_CONN))
    /// IOF_PLUGIN_BLOCK_STATUS (ABI 1.2): the filter sees block-status requests.
    public static let blockStatus = PluginFlags(rawValue: UInt32(IOF_PLUGIN_BLOCK_STATUS))
    /// IOF_PLUGIN_CACHE (ABI 1.2): the filter sees prefetch hints.
    public static let cacheHints = PluginFlags(rawValue: UInt32(IOF_PLUGIN_CACHE))
}

/// How a filter instance, a disk or a VM is doing (`enum iof_health`, ABI 1.4), worst
/// last: a disk is as healthy as its least healthy filter.
public enum HealthStatus: String, Codable, Sendable, CaseIterable, Comparable {
    case ok, degraded, failed

    public var abiValue: iof_health {
        switch self {
        case .ok: IOF_HEALTH_OK
        case .degraded: IOF_HEALTH_DEGRADED
        case .failed: IOF_HEALTH_FAILED
        }
    }

    /// A value outside the enum is a filter that cannot say: failed.
    public init(abiValue: UInt32) {
        self = Self.allCases.first { $0.abiValue.rawValue == abiValue } ?? .failed
    }

    /// 0, 1, 2: the value /metrics exports, so that an alert is `> 0`.
    public var level: Int { Self.allCases.firstIndex(of: self)! }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.level < rhs.level }
}
