/// What the host asks a running worker over its control channel: one JSON object per
/// line each way, one request at a time.
public enum WorkerControlRequest: Codable, Sendable, Equatable {
    /// Every filter's statistics, per disk.
    case stats
    /// A management operation of a plug-in the worker has loaded, run inside the worker
    /// so that it sees the live filter instances.
    case call(plugin: String, operation: String, arguments: [String])
}

/// The statistics one filter reported.
public struct FilterStatistics: Codable, Sendable, Equatable {
    public var plugin: String
    public var version: String
    public var category: FilterCategory
    public var stats: [String: Double]

    public init(plugin: String, version: String, category: FilterCategory, stats: [String: Double]) {
        self.plugin = plugin
        self.version = version
        self.category = category
        self.stats = stats
    }
}

public struct DiskStatistics: Codable, Sendable, Equatable {
    public var disk: String
    public var filters: [FilterStatistics]

    public init(disk: String, filters: [FilterStatistics]) {
        self.disk = disk
        self.filters = filters
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
