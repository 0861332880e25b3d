/// What the host asks a running worker over its control channel: one JSON object per
/// line each way, one request at a time.
public enum WorkerControlRequest: Codable, Sendable, Equatable {
    /// Every filter's statistics, per disk.
    case stats
    /// A management operation of a plug-in the worker has loaded, run inside the worker
    /// so that it sees the live filter instances.
    case call(plugin: String, operation: String, arguments: [String])
    /// A disk lifecycle event for every filter of one disk; any filter may veto it.
    case event(disk: String, event: DiskLifecycleEvent)
}

/// What happens to a disk that its filters hear of (`event` in the ABI) and may veto.
public enum DiskLifecycleEvent: Codable, Sendable, Equatable, CustomStringConvertible {
    /// A snapshot is taken: the disk is quiesced while the filters flush their state.
    case snapshot
    /// The disk is cloned to a new disk of this name.
    case clone(target: String)
    /// The disk grows to this many bytes.
    case grow(newSize: UInt64)

    /// The clone's name.
    public var targetName: String? {
        if case .clone(let target) = self { return target }
        return nil
    }

    public var description: String {
        switch self {
        case .snapshot: "snapshot"
        case .clone(let target): "clone to \(target)"
        case .grow(let size): "grow to \(size) bytes"
        }
    }
}

/// The statistics one filter reported.
public struct FilterStatistics: Codable, Sendable, Equatable {
    public var plugin: String
    public var version: String
    public var category: FilterCategory
    public var stats: [String: Double]
    /// What the filter said of its health (ABI 1.4); nil from one that does not say.
    public var health: HealthReport?

    public init(plugin: String, version: String, category: FilterCategory, stats: [String: Double], health: HealthReport? = nil) {
        self.plugin = plugin
        self.version = version
        self.category = category
        self.stats = stats
        self.health = health
    }
}



public struct DiskStatistics: Codable, Sendable, Equatable {
    public var disk: String
    public var filters: [FilterStatistics]
    /// What its consumers asked of it, per op (nil from a worker that predates it).
    public var io: [OperationStatistics]?

    public init(disk: String, filters: [FilterStatistics], io: [OperationStatistics]? = nil) {
        self.disk = disk
        self.filters = filters
        self.io = io
    }
}

/// One op's requests on a disk since its worker started.
public struct OperationStatistics: Codable, Sendable, Equatable {
    public var op: String
    public var requests: UInt64
    /// Reads and writes: bytes moved.
    public var bytes: UInt64
    public var errors: UInt64
    /// The sum of their latencies.
    public var latencySeconds: Double
    /// Cumulative counts at each upper bound (the last is +Inf), as Prometheus wants.
    public var latencyBuckets: [LatencyBucket]

    public init(op: String, requests: UInt64, bytes: UInt64, errors: UInt64, latencySeconds: Double, latencyBuckets: [LatencyBucket]) {
        self.op = op
        self.requests = requests
        self.bytes = bytes
        self.errors = errors
        self.latencySeconds = latencySeconds
        self.latencyBuckets = latencyBuckets
    }
}

public struct LatencyBucket: Codable, Sendable, Equatable {
    /// Seconds; infinity for the last. Encoded as a string ("+Inf" for the last).
    public var le: Double
    public var count: UInt64

    public init(le: Double, count: UInt64) {
        self.le = le
        self.count = count
    }

    enum CodingKeys: String, CodingKey { case le, count }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let text = try container.decode(String.self, forKey: .le)
        le = text == "+Inf" ? .infinity : Double(text) ?? .infinity
        count = try container.decode(UInt64.self, forKey: .count)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(le.isInfinite ? "+Inf" : String(le), forKey: .le)
        try container.encode(count, forKey: .count)
    }
}

/// A management operation's result, in text with its C type.
public struct ManagementResult: Codable, Sendable, Equatable {
    public var type: String
    public var value: String

    public init(type: String, value: String) {
        self.type = type
        self.value = value
    }
}

public struct WorkerControlResponse: Codable, Sendable, Equatable {
    public var error: String?
    public var disks: [DiskStatistics]?
    public var result: ManagementResult?

    public init(error: String? = nil, disks: [DiskStatistics]? = nil, result: ManagementResult? = nil) {
        self.error = error
        self.disks = disks
        self.result = result
    }
}
