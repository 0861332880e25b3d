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
    /// A point-in-time snapshot of a disk, copied in the background by the worker.
    case snapshot(disk: String, name: String, options: SnapshotOptions)
    /// How a snapshot's copy stands.
    case snapshotStatus(name: String)
    /// The worker lets go of a snapshot: it stops offering it (and stops copying it).
    case releaseSnapshot(name: String)
    /// Makes or deletes a checkpoint of a disk the worker serves.
    case checkpoint(disk: String, change: CheckpointChange)
    /// A live upgrade's first half, to the worker being replaced: stop taking requests,
    /// answer those read, close filters and disks, and answer with every client's
    /// socket (as SCM_RIGHTS) and what it negotiated (`handedOver`). The worker then
    /// serves nothing and waits to be stopped.
    case handOver
    /// Its second half, to a standby worker: these clients (their sockets come with the
    /// request, in this order), each with what it negotiated as `handedOver` said.
    case adopt(connections: [String])
    /// From a host that started while this process serves (the one that started it is
    /// gone): the request carries the new host's broker socket, which replaces the old
    /// one; the answer (`reattached`) carries the heartbeat page, the control listener
    /// and the listening sockets the process was handed (a worker's in the order of its
    /// disks; a daemon's channel, then its peer listener), for the new host to keep.
    case reattach
}

/// How a point-in-time snapshot is made.
public struct SnapshotOptions: Codable, Sendable, Equatable {
    /// A checkpoint of the source made at the snapshot's very instant (the next
    /// incremental backup starts from it), with its granularity.
    public var checkpoint: String?
    public var granularity: UInt64?
    /// The background copy's pace in bytes per second (nil: as fast as it goes).
    public var bytesPerSecond: UInt64?

    public init(checkpoint: String? = nil, granularity: UInt64? = nil, bytesPerSecond: UInt64? = nil) {
        self.checkpoint = checkpoint
        self.granularity = granularity
        self.bytesPerSecond = bytesPerSecond
    }
}

public enum CheckpointChange: Codable, Sendable, Equatable {
    case create(name: String, granularity: UInt64)
    case delete(name: String)
}

/// Where a point-in-time snapshot's copy stands.
public struct SnapshotProgress: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable { case copying, complete, failed }
    public var name: String
    public var state: State
    public var totalBytes: UInt64
    /// Bytes of the snapshot settled so far (copied, or known to read as zero).
    public var preservedBytes: UInt64
    /// Bytes of data written to the snapshot's file.
    public var writtenBytes: UInt64
    public var seconds: Double
    public var error: String?

    public init(name: String, state: State, totalBytes: UInt64, preservedBytes: UInt64, writtenBytes: UInt64, seconds: Double,
                error: String? = nil) {
        self.name = name
        self.state = state
        self.totalBytes = totalBytes
        self.preservedBytes = preservedBytes
        self.writtenBytes = writtenBytes
        self.seconds = seconds
        self.error = error
    }
}

/// What happens to a disk that its filters hear of (`event` in the ABI) and may veto.
public enum DiskLifecycleEvent: Codable, Sendable, Equatable, CustomStringConvertible {
    /// A snapshot is taken: the disk is quiesced while the filters flush their state.
    case snapshot
    /// The disk is cloned to a new disk of this name.
    case clone(target: String)
    /// The disk grows to this many bytes.
    case grow(newSize: UInt64)
    /// The disk's contents are about to be replaced by this snapshot's (ABI 1.5).
    case revert(snapshot: String)
    /// The VM's chain changes live (ABI 1.6): by plug-in name, the version taking over
    /// from each filter that stays ("" for one that is detached); a filter not named
    /// stays as it is, in a chain that changes around it.
    case upgrade(versions: [String: String])

    /// The clone's name, or the snapshot's a revert goes back to.
    public var targetName: String? {
        switch self {
        case .clone(let target): target
        case .revert(let snapshot): snapshot
        default: nil
        }
    }

    public var description: String {
        switch self {
        case .snapshot: "snapshot"
        case .clone(let target): "clone to \(target)"
        case .grow(let size): "grow to \(size) bytes"
        case .revert(let snapshot): "revert to \(snapshot)"
        case .upgrade: "live change of the chain"
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
    public var snapshot: SnapshotProgress?
    /// `handOver`: each client's negotiated state (opaque to the host), in the order of
    /// the sockets that came with the answer.
    public var handedOver: [String]?
    /// `adopt`: how many clients the worker went on serving.
    public var adopted: Int?
    /// `reattach`: what this process serves (the VM's or the plug-in's name), so that
    /// a host never adopts one for another.
    public var reattached: String?

    public init(error: String? = nil, disks: [DiskStatistics]? = nil, result: ManagementResult? = nil, snapshot: SnapshotProgress? = nil,
                handedOver: [String]? = nil, adopted: Int? = nil, reattached: String? = nil) {
        self.reattached = reattached
        self.handedOver = handedOver
        self.adopted = adopted
        self.error = error
        self.disks = disks
        self.result = result
        self.snapshot = snapshot
    }
}
