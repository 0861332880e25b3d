// What the host reports of its VMs' health and figures over time, and the alerts it
// sends: the resources behind `iofilter health`, `GET /health`, `GET /vms/{name}/history`
// and `iofilter alert`.
import IOFilterModel

/// How much an event matters. Warning and above is something an operator should look at;
/// alert subscriptions choose their floor.
public enum Severity: String, Codable, Sendable, CaseIterable, Comparable {
    case info, warning, error, critical

    public static func < (lhs: Self, rhs: Self) -> Bool { allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)! }
}

/// The host's health: each VM, its disks and their filters, as last sampled.
public struct HostHealth: Codable, Sendable {
    /// The worst of the running VMs' (ok with none running).
    public var status: HealthStatus
    public var vms: [VMHealth]

    public init(status: HealthStatus, vms: [VMHealth]) {
        self.status = status
        self.vms = vms
    }
}

public struct VMHealth: Codable, Sendable {
    public var name: String
    public var state: VMInfo.State
    /// nil while stopped.
    public var health: HealthReport?
    public var restarts: Int
    /// When these figures were sampled (seconds since 1970).
    public var sampledAt: Double?
    public var disks: [DiskHealth]

    public init(name: String, state: VMInfo.State, health: HealthReport?, restarts: Int, sampledAt: Double?, disks: [DiskHealth]) {
        self.name = name
        self.state = state
        self.health = health
        self.restarts = restarts
        self.sampledAt = sampledAt
        self.disks = disks
    }
}

public struct DiskHealth: Codable, Sendable {
    public var disk: String
    public var health: HealthReport
    public var filters: [FilterHealthInfo]

    public init(disk: String, health: HealthReport, filters: [FilterHealthInfo]) {
        self.disk = disk
        self.health = health
        self.filters = filters
    }
}

public struct FilterHealthInfo: Codable, Sendable {
    public var plugin: String
    public var version: String
    public var category: FilterCategory
    public var health: HealthReport
    /// A replication filter's lag and its recovery point objective, when it reports them.
    public var lagSeconds: Double?
    public var rpoSeconds: Double?

    public init(plugin: String, version: String, category: FilterCategory, health: HealthReport, lagSeconds: Double?, rpoSeconds: Double?) {
        self.plugin = plugin
        self.version = version
        self.category = category
        self.health = health
        self.lagSeconds = lagSeconds
        self.rpoSeconds = rpoSeconds
    }
}

/// A VM's figures over time, oldest first, one point per sampling interval.
public struct VMHistory: Codable, Sendable {
    public var vm: String
    public var intervalSeconds: Double
    public var points: [HistoryPoint]

    public init(vm: String, intervalSeconds: Double, points: [HistoryPoint]) {
        self.vm = vm
        self.intervalSeconds = intervalSeconds
        self.points = points
    }
}

public struct HistoryPoint: Codable, Sendable, Equatable {
    /// Seconds since 1970, at the end of the interval.
    public var time: Double
    /// How long the interval was (rates times this are what it counted); longer than the
    /// sampling interval after a gap (a crash, a host that was busy).
    public var seconds: Double
    /// nil while the worker did not answer.
    public var health: HealthStatus?
    public var disks: [DiskRates]
    /// Each filter's own figures at that time.
    public var filters: [FilterSample]

    public init(time: Double, seconds: Double, health: HealthStatus?, disks: [DiskRates], filters: [FilterSample]) {
        self.time = time
        self.seconds = seconds
        self.health = health
        self.disks = disks
        self.filters = filters
    }
}

public struct FilterSample: Codable, Sendable, Equatable {
    public var disk: String
    public var plugin: String
    public var health: HealthStatus
    public var stats: [String: Double]

    public init(disk: String, plugin: String, health: HealthStatus, stats: [String: Double]) {
        self.disk = disk
        self.plugin = plugin
        self.health = health
        self.stats = stats
    }
}

/// Where events of a severity and above go: a webhook (an HTTP POST of the event as
/// JSON) or a command the host runs (the event as JSON on its stdin).
public struct AlertSubscription: Codable, Sendable {
    public var name: String
    public var webhook: String?
    public var command: String?
    public var minimumSeverity: Severity
    public var createdAt: String?
    /// The outcome of the last delivery: when, and the error if it failed.
    public var lastDeliveryAt: String?
    public var lastError: String?

    public init(name: String, webhook: String? = nil, command: String? = nil, minimumSeverity: Severity = .warning, createdAt: String? = nil,
                lastDeliveryAt: String? = nil, lastError: String? = nil) {
        self.name = name
        self.webhook = webhook
        self.command = command
        self.minimumSeverity = minimumSeverity
        self.createdAt = createdAt
        self.lastDeliveryAt = lastDeliveryAt
        self.lastError = lastError
    }

    enum CodingKeys: String, CodingKey { case name, webhook, command, minimumSeverity, createdAt, lastDeliveryAt, lastError }

    /// A request that names no severity subscribes to warning and above.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        name = try container.decode(String.self, forKey: .name)
        webhook = try container.decodeIfPresent(String.self, forKey: .webhook)
        command = try container.decodeIfPresent(String.self, forKey: .command)
        minimumSeverity = try container.decodeIfPresent(Severity.self, forKey: .minimumSeverity) ?? .warning
        createdAt = try container.decodeIfPresent(String.self, forKey: .createdAt)
        lastDeliveryAt = try container.decodeIfPresent(String.self, forKey: .lastDeliveryAt)
        lastError = try container.decodeIfPresent(String.self, forKey: .lastError)
    }
}

/// What `POST /alerts/{name}/test` did.
public struct AlertTestResult: Codable, Sendable {
    public var delivered: Bool
    public var error: String?

    public init(delivered: Bool, error: String?) {
        self.delivered = delivered
        self.error = error
    }
}

/// What the console's live stream sends each second.
public struct LiveSnapshot: Codable, Sendable {
    public var time: Double
    public var vms: [VMInfo]
    public var disks: [DiskInfo]
    public var events: [Event]

    public init(time: Double, vms: [VMInfo], disks: [DiskInfo], events: [Event]) {
        self.time = time
        self.vms = vms
        self.disks = disks
        self.events = events
    }
}
