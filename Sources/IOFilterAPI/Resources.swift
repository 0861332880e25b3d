// The resources of iofilterd's JSON API, shared by the daemon and its clients. The
// OpenAPI document (served at /openapi.json) describes the same shapes.
import IOFilterModel

/// Every failed request answers with this body and a 4xx/5xx status.
public struct APIErrorBody: Codable, Sendable, Error, CustomStringConvertible {
    /// A stable, machine-readable code: bad-request, not-found, conflict, invalid,
    /// worker-failed, internal, no-route, method-not-allowed.
    public var error: String
    /// What went wrong, for a person.
    public var message: String

    public init(error: String, message: String) {
        self.error = error
        self.message = message
    }

    public var description: String { message }
}

/// An installed plug-in (one version).
public struct PluginInfo: Codable, Sendable, Equatable {
    public var name: String
    public var version: String
    public var vendor: String
    public var category: FilterCategory
    public var description: String
    public var threadModel: ThreadModel
    public var parameters: [ParameterSpec]
    public var operations: [OperationInfo]
    /// Where the host keeps its copy.
    public var path: String
    public var installedAt: String
    /// Disks whose chain has this version attached (it cannot be removed while any has).
    public var attachedTo: [String]
    /// The level its signatures earned when it was installed (community: unsigned).
    public var acceptanceLevel: AcceptanceLevel
    /// Who signed it, with what each signature counted for on this host.
    public var signers: [PluginSigner]
    /// Its partner daemon, on the version that runs it (the newest installed).
    public var daemon: DaemonStatus?
    /// Its daemon may accept peers on other hosts (IOF_DAEMON_LISTENS).
    public var daemonListens: Bool?

    public init(manifest: PluginManifest, installedAt: String, attachedTo: [String],
                acceptanceLevel: AcceptanceLevel = .community, signers: [PluginSigner] = [], daemon: DaemonStatus? = nil) {
        self.daemon = daemon
        name = manifest.name
        version = manifest.version
        vendor = manifest.vendor
        category = manifest.category
        description = manifest.description
        threadModel = manifest.threadModel
        parameters = manifest.parameters
        operations = manifest.operations.map { OperationInfo(name: $0.name, signature: $0.signature) }
        path = manifest.path
        self.installedAt = installedAt
        self.attachedTo = attachedTo
        self.acceptanceLevel = acceptanceLevel
        self.signers = signers
        daemonListens = manifest.hasDaemon ? manifest.daemonListens : nil
    }
}

/// One signature of an installed plug-in.
public struct PluginSigner: Codable, Sendable, Equatable {
    public var keyId: String
    public var comment: String
    /// The level the signature claims.
    public var claimed: AcceptanceLevel
    /// What it counted for: the lower of the claim and the key's enrolment.
    public var effective: AcceptanceLevel

    public init(keyId: String, comment: String, claimed: AcceptanceLevel, effective: AcceptanceLevel) {
        self.keyId = keyId
        self.comment = comment
        self.claimed = claimed
        self.effective = effective
    }
}

/// A public key enrolled on the host, and the highest level it may sign at.
public struct TrustedKeyInfo: Codable, Sendable, Equatable {
    public var keyId: String
    /// The key's line, as in its .pub file.
    public var publicKey: String
    public var comment: String
    public var level: AcceptanceLevel
    public var addedAt: String
    /// Installed plug-ins (name and version) it signed.
    public var signed: [String]

    public init(keyId: String, publicKey: String, comment: String, level: AcceptanceLevel, addedAt: String, signed: [String]) {
        self.keyId = keyId
        self.publicKey = publicKey
        self.comment = comment
        self.level = level
        self.addedAt = addedAt
        self.signed = signed
    }
}

public struct TrustAddRequest: Codable, Sendable {
    /// The line of a PREFIX.pub file from `iofilter plugin keygen`.
    public var publicKey: String
    public var level: AcceptanceLevel
    public init(publicKey: String, level: AcceptanceLevel) {
        self.publicKey = publicKey
        self.level = level
    }
}

public struct OperationInfo: Codable, Sendable, Equatable {
    public var name: String
    public var signature: String
}

public struct PluginInstallRequest: Codable, Sendable {
    /// An absolute path, on the host, of the `.so` to validate and copy. Its signature
    /// is read from PATH.sig beside it, if there is one.
    public var path: String
    /// Where its partner daemon may accept peers on other hosts ("HOST:PORT"), if it
    /// declares IOF_DAEMON_LISTENS: as `PUT /plugins/{name}/daemon-listen` would set.
    public var daemonListen: String?
    public init(path: String, daemonListen: String? = nil) {
        self.path = path
        self.daemonListen = daemonListen
    }
}

/// Where a plug-in's partner daemon accepts peers on other hosts; null: nowhere.
public struct DaemonListenRequest: Codable, Sendable {
    public var address: String?
    /// Peers must start TLS with this pre-shared key (a psktool file, absolute).
    public var tlsPsk: String?
    public init(address: String?, tlsPsk: String? = nil) {
        self.address = address
        self.tlsPsk = tlsPsk
    }
}

public struct PluginCallRequest: Codable, Sendable {
    public var operation: String
    public var arguments: [String]
    /// Run it in this VM's worker, where it sees the live filters; without it the
    /// operation runs in a fresh sandboxed worker.
    public var vm: String?
    /// Which installed version (default: the newest).
    public var version: String?

    public init(operation: String, arguments: [String], vm: String? = nil, version: String? = nil) {
        self.operation = operation
        self.arguments = arguments
        self.vm = vm
        self.version = version
    }
}

/// The storage-provider view of the host: what a policy may ask for.
public struct Capabilities: Codable, Sendable {
    /// Categories in the order a request meets them.
    public var categories: [FilterCategory]
    public var plugins: [Capability]

    public init(categories: [FilterCategory], plugins: [Capability]) {
        self.categories = categories
        self.plugins = plugins
    }
}

public struct Capability: Codable, Sendable {
    public var plugin: String
    public var versions: [String]
    public var vendor: String
    public var category: FilterCategory
    public var description: String
    /// The newest version's parameters.
    public var parameters: [ParameterSpec]

    public init(plugin: String, versions: [String], vendor: String, category: FilterCategory, description: String, parameters: [ParameterSpec]) {
        self.plugin = plugin
        self.versions = versions
        self.vendor = vendor
        self.category = category
        self.description = description
        self.parameters = parameters
    }
}

/// One filter a policy asks for.
public struct PolicyRule: Codable, Sendable, Equatable {
    public var plugin: String
    /// Pin a version; nil follows the newest installed one (an upgrade applies at the
    /// next VM start).
    public var version: String?
    public var parameters: [String: String]

    public init(plugin: String, version: String? = nil, parameters: [String: String] = [:]) {
        self.plugin = plugin
        self.version = version
        self.parameters = parameters
    }
}

public struct Policy: Codable, Sendable, Equatable {
    public var name: String
    public var description: String
    public var filters: [PolicyRule]
    public var createdAt: String?

    public init(name: String, description: String = "", filters: [PolicyRule], createdAt: String? = nil) {
        self.name = name
        self.description = description
        self.filters = filters
        self.createdAt = createdAt
    }
}

/// A filter of a resolved chain: the exact version and every parameter.
public struct ChainEntry: Codable, Sendable, Equatable {
    public var plugin: String
    public var version: String
    public var category: FilterCategory
    public var parameters: [String: String]

    public init(plugin: String, version: String, category: FilterCategory, parameters: [String: String]) {
        self.plugin = plugin
        self.version = version
        self.category = category
        self.parameters = parameters
    }
}

public struct PolicyValidation: Codable, Sendable {
    public var valid: Bool
    /// The chain the policy makes today, in category order (empty when invalid).
    public var chain: [ChainEntry]
    public var errors: [String]

    public init(valid: Bool, chain: [ChainEntry], errors: [String]) {
        self.valid = valid
        self.chain = chain
        self.errors = errors
    }
}

public struct Compliance: Codable, Sendable, Equatable {
    public enum Status: String, Codable, Sendable { case compliant, nonCompliant = "non-compliant", pending, none }
    public var status: Status
    public var reason: String?
    /// In `disk compliance` while the disk is served: how its chain is doing.
    public var health: HealthReport?

    public init(status: Status, reason: String? = nil, health: HealthReport? = nil) {
        self.status = status
        self.reason = reason
        self.health = health
    }
}

public struct DiskInfo: Codable, Sendable {
    public var name: String
    public var path: String
    public var sizeBytes: Int64
    public var format: String
    public var readOnly: Bool
    public var policy: String?
    /// The VM the disk belongs to, if any.
    public var vm: String?
    /// Where it is served right now: by its running VM or an offline session.
    public var uri: String?
    /// The filters attached to the disk now (what its next open will run, upgrades aside).
    public var attached: [ChainEntry]
    public var compliance: Compliance
    public var snapshotOf: String?
    /// A long transfer using the disk right now ("exporting to /backup/d.img").
    public var activity: String?
    public var createdAt: String
    /// The plug-in whose daemon keeps this disk as a replica of another host's; it is
    /// read-only until `iofilter disk promote`.
    public var replicaOf: String?
    /// While served: the health of its chain, as last sampled.
    public var health: HealthReport?
    /// A point-in-time snapshot whose background copy is not complete yet: how far it is.
    public var copy: SnapshotProgress?
    /// Its checkpoints (changed-block tracking), oldest first.
    public var checkpoints: [String]?

    public init(name: String, path: String, sizeBytes: Int64, readOnly: Bool, policy: String?, vm: String?, uri: String?,
                attached: [ChainEntry], compliance: Compliance, snapshotOf: String?, activity: String? = nil, createdAt: String,
                replicaOf: String? = nil, health: HealthReport? = nil, copy: SnapshotProgress? = nil, checkpoints: [String]? = nil) {
        self.health = health
        self.copy = copy
        self.checkpoints = checkpoints
        self.activity = activity
        self.replicaOf = replicaOf
        self.name = name
        self.path = path
        self.sizeBytes = sizeBytes
        self.format = "raw"
        self.readOnly = readOnly
        self.policy = policy
        self.vm = vm
        self.uri = uri
        self.attached = attached
        self.compliance = compliance
        self.snapshotOf = snapshotOf
        self.createdAt = createdAt
    }
}

public struct DiskCreateRequest: Codable, Sendable {
    public var name: String
    /// Bytes, or with a suffix: 512M, 1G.
    public var size: String
    public var policy: String?
    public init(name: String, size: String, policy: String? = nil) {
        self.name = name
        self.size = size
        self.policy = policy
    }
}

public struct DiskImportRequest: Codable, Sendable {
    public var name: String
    /// A raw image on the host (absolute path); it is copied, not moved.
    public var source: String
    public var policy: String?
    public init(name: String, source: String, policy: String? = nil) {
        self.name = name
        self.source = source
        self.policy = policy
    }
}

public struct DiskGrowRequest: Codable, Sendable {
    public var size: String
    public init(size: String) { self.size = size }
}

public struct DiskPolicyRequest: Codable, Sendable {
    /// nil removes the policy (its filters are detached).
    public var policy: String?
    public init(policy: String?) { self.policy = policy }
}

/// Names the new disk a snapshot or clone makes.
public struct DiskDeriveRequest: Codable, Sendable {
    public var name: String
    /// Clones only: the policy of the new disk.
    public var policy: String?
    /// Snapshots only: a checkpoint of the source made at the snapshot's instant (where
    /// the next incremental backup starts), and its granularity ("64K").
    public var checkpoint: String?
    public var granularity: String?
    /// Snapshots only: the background copy's pace, bytes per second ("50M").
    public var rate: String?
    /// Snapshots only: answer once the copy is complete (otherwise at once, with the
    /// copy going on; the snapshot is readable meanwhile).
    public var wait: Bool?

    public init(name: String, policy: String? = nil, checkpoint: String? = nil, granularity: String? = nil, rate: String? = nil,
                wait: Bool? = nil) {
        self.name = name
        self.policy = policy
        self.checkpoint = checkpoint
        self.granularity = granularity
        self.rate = rate
        self.wait = wait
    }
}

public struct CheckpointCreateRequest: Codable, Sendable {
    public var name: String
    /// Bytes per bit ("64K", the default; a power of two from 4K to 64M).
    public var granularity: String?

    public init(name: String, granularity: String? = nil) {
        self.name = name
        self.granularity = granularity
    }
}

public struct DiskRevertRequest: Codable, Sendable {
    /// A complete snapshot of the disk.
    public var snapshot: String

    public init(snapshot: String) { self.snapshot = snapshot }
}

/// Where a disk can be read over NBD right now.
public struct NBDExportInfo: Codable, Sendable, Equatable {
    public var disk: String
    public var uri: String
    public var readOnly: Bool
    /// "VM vm1" (its VM's worker, or the source's for a snapshot being copied) or
    /// "offline session" (stop it with `iofilter disk export-nbd --stop`).
    public var through: String

    public init(disk: String, uri: String, readOnly: Bool, through: String) {
        self.disk = disk
        self.uri = uri
        self.readOnly = readOnly
        self.through = through
    }
}

public struct DiskExportRequest: Codable, Sendable {
    /// An absolute path on the host for the raw image; must not exist yet.
    public var path: String
    public init(path: String) { self.path = path }
}

public struct DiskCopyRequest: Codable, Sendable {
    /// An existing disk, at least as large, that no VM is using.
    public var target: String
    public init(target: String) { self.target = target }
}

public struct OfflineServeRequest: Codable, Sendable {
    public var readOnly: Bool
    public init(readOnly: Bool) { self.readOnly = readOnly }
}

/// What an offline export or copy did.
public struct TransferReport: Codable, Sendable {
    public var bytes: Int64
    public var seconds: Double
    /// "offline worker" or "running VM <name>".
    public var through: String
    public init(bytes: Int64, seconds: Double, through: String) {
        self.bytes = bytes
        self.seconds = seconds
        self.through = through
    }
}

public struct OfflineSession: Codable, Sendable {
    public var disk: String
    public var uri: String
    public var readOnly: Bool
    public var pid: Int32?
    public init(disk: String, uri: String, readOnly: Bool, pid: Int32?) {
        self.disk = disk
        self.uri = uri
        self.readOnly = readOnly
        self.pid = pid
    }
}

/// What a VM's worker may use; nil fields take the host's defaults.
public struct VMLimits: Codable, Sendable, Equatable {
    /// Bytes of memory the worker may map (at least 256 MiB).
    public var memoryLimit: UInt64?
    /// NBD clients served at once per disk (1 to 1024).
    public var maxConnections: Int?
    /// The worker's share of CPU against other workers, 1 to 10000 (100 is the
    /// default); applied where the host gives workers cgroups.
    public var cpuWeight: Int?

    public init(memoryLimit: UInt64? = nil, maxConnections: Int? = nil, cpuWeight: Int? = nil) {
        self.memoryLimit = memoryLimit
        self.maxConnections = maxConnections
        self.cpuWeight = cpuWeight
    }

    public static let connectionRange = 1...1024
    public static let cpuWeightRange = 1...10000

    public var isEmpty: Bool { memoryLimit == nil && maxConnections == nil && cpuWeight == nil }

    /// Why these limits cannot be used, or nil.
    public var problem: String? {
        let minimum = WorkerConfiguration.minimumMemoryLimit
        if let memoryLimit, memoryLimit < minimum { return "memoryLimit must be at least \(minimum >> 20) MiB (\(minimum) bytes)" }
        if let maxConnections, !Self.connectionRange.contains(maxConnections) { return "maxConnections must be in 1...1024" }
        if let cpuWeight, !Self.cpuWeightRange.contains(cpuWeight) { return "cpuWeight must be in 1...10000" }
        return nil
    }
}

public struct VMCreateRequest: Codable, Sendable {
    public var name: String
    public var disks: [String]
    public var limits: VMLimits?
    /// TLS every NBD client of the VM must start (nil: plaintext on its unix sockets).
    public var tls: TLSSettings?
    /// Also offer each disk to the VM's QEMU over vhost-user-blk (a socket per disk,
    /// `VMInfo.vhostUserSockets`), beside its NBD export.
    public var vhostUserBlk: Bool?
    public init(name: String, disks: [String], limits: VMLimits? = nil, tls: TLSSettings? = nil, vhostUserBlk: Bool? = nil) {
        self.tls = tls
        self.vhostUserBlk = vhostUserBlk
        self.name = name
        self.disks = disks
        self.limits = limits
    }
}

public struct VMInfo: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable { case running, stopped }
    public var name: String
    public var disks: [String]
    public var state: State
    public var pid: Int32?
    public var restarts: Int
    /// Disk name to NBD URI, while running.
    public var uris: [String: String]
    /// Each disk's filters with their live statistics, while running.
    public var filters: [DiskStatistics]
    public var startedAt: String?
    public var createdAt: String
    /// The limits set for this VM (fields left out take the host's defaults).
    public var limits: VMLimits?
    public var tls: TLSSettings?
    /// While running: its health (the worker's, and its least healthy disk's).
    public var health: HealthReport?
    /// While running, in `vm show` and the live stream: each disk's I/O rates over the
    /// last sampling interval (counters carried across worker restarts).
    public var rates: [DiskRates]?
    /// For a VM created with vhostUserBlk: disk name to the socket its QEMU connects to
    /// (`-chardev socket,path=…,reconnect=1`), listened on while the VM runs.
    public var vhostUserSockets: [String: String]?

    public init(name: String, disks: [String], state: State, pid: Int32?, restarts: Int, uris: [String: String],
                filters: [DiskStatistics], startedAt: String?, createdAt: String, limits: VMLimits? = nil, tls: TLSSettings? = nil) {
        self.limits = limits
        self.tls = tls
        self.name = name
        self.disks = disks
        self.state = state
        self.pid = pid
        self.restarts = restarts
        self.uris = uris
        self.filters = filters
        self.startedAt = startedAt
        self.createdAt = createdAt
    }
}

public struct Event: Codable, Sendable {
    public var id: Int64
    public var time: String
    public var kind: String
    public var subject: String
    public var message: String
    /// Who made the change, when a caller of the API did ("uid 0 (root)", "token ci").
    public var actor: String?
    public var severity: Severity
    public init(id: Int64, time: String, kind: String, subject: String, message: String, actor: String? = nil, severity: Severity = .info) {
        self.actor = actor
        self.severity = severity
        self.id = id
        self.time = time
        self.kind = kind
        self.subject = subject
        self.message = message
    }
}

public struct HostInfo: Codable, Sendable {
    public var version: String
    public var stateDirectory: String
    public var apiSocket: String
    public var pid: Int32
    public var runningVMs: [String]
    /// The lowest acceptance level of plug-in this host installs.
    public var acceptanceLevel: AcceptanceLevel
    public init(version: String, stateDirectory: String, apiSocket: String, pid: Int32, runningVMs: [String], acceptanceLevel: AcceptanceLevel) {
        self.acceptanceLevel = acceptanceLevel
        self.version = version
        self.stateDirectory = stateDirectory
        self.apiSocket = apiSocket
        self.pid = pid
        self.runningVMs = runningVMs
    }
}

/// What a caller of the API may do. Read-only: list and show. Operator: also start and
/// stop VMs, take snapshots, export disks, call plug-ins' operations. Admin: everything.
/// Who the caller is (`GET /session`): what the console shows, and which of its
/// actions it offers.
public struct Session: Codable, Sendable {
    public var name: String
    public var role: Role
    /// How long the token is good for, in seconds from now; nil: until revoked.
    public var expiresInSeconds: Int64?
    public init(name: String, role: Role, expiresInSeconds: Int64? = nil) {
        self.name = name
        self.role = role
        self.expiresInSeconds = expiresInSeconds
    }
}

public enum Role: String, Codable, Sendable, CaseIterable, Comparable {
    case readOnly = "read-only"
    case `operator`
    case admin

    public static func < (lhs: Role, rhs: Role) -> Bool { allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)! }
}

public struct TokenCreateRequest: Codable, Sendable {
    /// What the token is for ("ci", "monitoring"); unique on the host.
    public var name: String
    public var role: Role
    /// How long the token is good for, in seconds from now; nil: until revoked.
    public var expiresInSeconds: Int64?
    public init(name: String, role: Role, expiresInSeconds: Int64? = nil) {
        self.name = name
        self.role = role
        self.expiresInSeconds = expiresInSeconds
    }
}

/// A bearer token for the API over TCP. The host keeps only its hash: `token` is
/// given once, when it is created.
public struct TokenInfo: Codable, Sendable {
    public var id: String
    public var name: String
    public var role: Role
    public var createdAt: String
    public var lastUsedAt: String?
    public var token: String?
    /// When it stops working, if it does.
    public var expiresAt: String?
    public init(id: String, name: String, role: Role, createdAt: String, lastUsedAt: String?, token: String?, expiresAt: String? = nil) {
        self.expiresAt = expiresAt
        self.id = id
        self.name = name
        self.role = role
        self.createdAt = createdAt
        self.lastUsedAt = lastUsedAt
        self.token = token
    }
}

/// What a live change of a running VM's filters did: its chains changed under its
/// clients, which a new worker took over without a reconnect.
public struct LiveUpgradeReport: Codable, Sendable {
    public var vm: String
    /// What changed, per disk ("d: org.example.cache 1.0.0 → 1.1.0"); empty: nothing
    /// to do, the worker serving is left alone.
    public var changes: [String]
    /// Clients handed to the new worker with what they negotiated.
    public var clients: Int
    /// From the old worker's last request to the new worker taking its clients: the
    /// longest a client waited.
    public var stallMilliseconds: Double
    /// The worker serving now.
    public var pid: Int32?

    public init(vm: String, changes: [String], clients: Int, stallMilliseconds: Double, pid: Int32?) {
        self.vm = vm
        self.changes = changes
        self.clients = clients
        self.stallMilliseconds = stallMilliseconds
        self.pid = pid
    }
}
