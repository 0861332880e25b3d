/// Where a disk's data lives below its chain.
public enum BackendSpec: Codable, Sendable, Equatable, CustomStringConvertible {
    /// A raw image file (or block device).
    case file(path: String)
    /// An export of a remote NBD server, by URI.
    case nbd(uri: String)

    public var description: String {
        switch self {
        case .file(let path): path
        case .nbd(let uri): uri
        }
    }
}

/// One disk a worker serves.
public struct DiskConfiguration: Codable, Sendable, Equatable {
    public var name: String
    public var backend: BackendSpec
    public var readOnly: Bool
    /// The chain, already validated and in category order.
    public var filters: [PlannedFilter]
    /// The fd number, in the worker, of the listening socket the host hands over.
    public var listenFD: Int32
    /// Where the disk's filters keep their sidecar state (one directory per plug-in
    /// below it). It belongs to the disk, so every worker that opens the disk — its
    /// VM's or an offline one — sees the same state. Nil: DISK below the VM's state
    /// directory.
    public var stateDirectory: String?
    /// The fd number, in the worker, of a listening unix socket where a vhost-user-blk
    /// front-end (QEMU) reaches the disk beside its NBD clients (nil: NBD only).
    public var vhostUserListenFD: Int32?
    /// Virtqueues the vhost-user-blk export offers; set (1 or more) exactly when the
    /// disk is offered over vhost-user-blk.
    public var vhostUserQueues: Int?

    /// The listening sockets the worker is handed for this disk: NBD's, then vhost-user-blk's.
    public var listenFDs: [Int32] { [listenFD] + (vhostUserListenFD.map { [$0] } ?? []) }

    public init(name: String, backend: BackendSpec, readOnly: Bool, filters: [PlannedFilter], listenFD: Int32,
                stateDirectory: String? = nil) {
        self.stateDirectory = stateDirectory
        self.name = name
        self.backend = backend
        self.readOnly = readOnly
        self.filters = filters
        self.listenFD = listenFD
    }
}

/// What a worker process needs to serve one VM; the host writes it to the worker's
/// standard input as JSON.
public struct WorkerConfiguration: Codable, Sendable, Equatable {
    public var vmName: String
    /// The VM's private state directory: the worker's working directory, and where a
    /// disk's sidecar directories live (as DISK/PLUGIN-NAME) unless the disk names its own.
    public var stateDirectory: String
    public var disks: [DiskConfiguration]
    /// A request stuck longer than this in one filter (or the backend) kills the worker.
    public var watchdogSeconds: Double
    public var sandbox: Bool
    public var logLevel: String
    /// The fd number, in the worker, of its control channel to the host (see
    /// `WorkerControlRequest`); nil when the host does not talk to it.
    public var controlFD: Int32?
    /// What the worker does once its disks are open.
    public var task: WorkerTask
    /// The fd number, in the worker, of a page of memory it shares with its supervisor:
    /// the worker writes the time there every 250 ms, and a supervisor that sees it
    /// stop kills the worker (nil: no supervisor watches).
    public var heartbeatFD: Int32?
    /// The most memory (address space, in bytes) the worker may map; nil: the default,
    /// `WorkerConfiguration.defaultMemoryLimit`. A filter that allocates past it gets
    /// allocation failures (and its worker, if it crashes on them, is restarted alone).
    public var memoryLimit: UInt64?
    /// 8 GiB: room for the Swift runtime, the C library's per-thread arenas, connection
    /// threads and the samples' largest journals: the most a default gives.
    public static let defaultMemoryLimit: UInt64 = 8 << 30

    /// The limit a VM's worker gets when neither the VM nor the host sets one: a share
    /// of three quarters of the host's memory for each VM it has, at least the minimum
    /// (a limit is a ceiling, not a reservation: small shares overcommit safely) and at
    /// most `defaultMemoryLimit`, in whole MiB.
    public static func defaultMemoryLimit(hostMemory: UInt64, vms: Int) -> UInt64 {
        // Whole MiB: the kernel keeps a limit in pages, and says it back as it keeps it.
        min(defaultMemoryLimit, max(minimumMemoryLimit, ((hostMemory / 4 * 3 / UInt64(max(vms, 1))) >> 20) << 20))
    }
    /// The least a worker may be given: below it the runtime itself cannot start.
    public static let minimumMemoryLimit: UInt64 = 256 << 20

    /// A memory limit as an operator writes it ("2G", with the suffixes of a size
    /// parameter), or nil if the text is no size or less than the minimum.
    public static func memoryLimit(parsing text: String) -> UInt64? {
        guard let bytes = ParameterSpec.parseSize(text), bytes >= 0, UInt64(bytes) >= minimumMemoryLimit else { return nil }
        return UInt64(bytes)
    }
    /// Paths the worker must not reach at all, whatever its file rules: the host's own
    /// control socket. Covered in a private mount namespace before any plug-in loads.
    public var hiddenPaths: [String]?
    /// Who the worker becomes when the host runs as root (nil: `WorkerIdentity(for:)`
    /// of the VM's name). Ignored for an unprivileged host, whose workers stay its user.
    public var identity: WorkerIdentity?
    /// The fd number, in the worker, of its socket to the host's target broker, which
    /// opens the files and connections the VM's policies name for its filters (nil: the
    /// worker opens them itself, unconfined).
    public var brokerFD: Int32?
    /// The cgroup the worker runs in (the `cgroup.procs` file of each hierarchy), which
    /// limits its memory, tasks and CPU weight: born there on v2, it moves itself there
    /// first thing on v1, before it makes its pid namespace. Nil: there is none, and
    /// the worker limits its memory with RLIMIT_AS instead.
    public var cgroupProcs: [String]?
    /// The worker's CPU weight in its cgroup, 1 to 10000 (nil: 100).
    public var cpuWeight: Int?
    /// What that cgroup allows, for the worker's log line.
    public var cgroupSummary: String?
    /// Every target a filter of this worker may have the host open (see `brokerFD`).
    public var namedTargets: Set<String> { Set(disks.flatMap { $0.filters.flatMap(\.targets) }) }
    /// Clients served at once per disk (nil: the default, 16).
    public var maxConnections: Int?
    /// Seconds a client may take to negotiate before it is dropped (nil: 5).
    public var handshakeSeconds: Double?
    /// TLS every NBD client must start (nil: plaintext). The worker never reads these
    /// files: its TLS terminator does (see `tlsTerminatorFD`).
    public var tls: TLSSettings?
    /// The fd number, in the worker, of its channel to the process that terminates its
    /// clients' TLS sessions and alone holds the keys, out of the plug-ins' reach (see
    /// `TLSTerminatorConfiguration`). Set whenever `tls` is.
    public var tlsTerminatorFD: Int32?
    /// False: refuse structured replies (and so block status), like nbdkit --no-sr.
    public var structuredReplies: Bool?
    /// True: a worker replacing a running one (a live upgrade or policy change). It
    /// loads its plug-ins, says READY, and opens its disks only when the host hands it
    /// the old worker's clients (`WorkerControlRequest.adopt`), once the old worker has
    /// closed its filters.
    public var standby: Bool?
    /// The fd number, in the worker, of a listening socket a later host connects to
    /// (`WorkerControlRequest.reattach`) once the one that started it is gone. A
    /// worker with one outlives its host; one without (an offline or maintenance
    /// worker) dies with it.
    public var controlListenFD: Int32?

    /// What this worker serves and how, without what changes from one start to the
    /// next (the numbers of the fds it is handed, its cgroup): a later host adopts a
    /// running worker only if it would start one the same.
    public var withoutHandedOverFDs: WorkerConfiguration {
        var plain = self
        for index in plain.disks.indices {
            plain.disks[index].listenFD = -1
            plain.disks[index].vhostUserListenFD = nil  // whether there is one: vhostUserQueues
        }
        plain.controlFD = nil
        plain.heartbeatFD = nil
        plain.brokerFD = nil
        plain.controlListenFD = nil
        plain.tlsTerminatorFD = nil
        plain.cgroupProcs = nil
        plain.cgroupSummary = nil
        plain.standby = nil
        // Limits a running worker's cgroup takes as they are: no reason to restart it.
        plain.memoryLimit = nil
        plain.cpuWeight = nil
        return plain
    }

    public init(
        vmName: String, stateDirectory: String, disks: [DiskConfiguration], watchdogSeconds: Double = 30,
        sandbox: Bool = true, logLevel: String = "info", controlFD: Int32? = nil, task: WorkerTask = .serve
    ) {
        self.controlFD = controlFD
        self.task = task
        self.vmName = vmName
        self.stateDirectory = stateDirectory
        self.disks = disks
        self.watchdogSeconds = watchdogSeconds
        self.sandbox = sandbox
        self.logLevel = logLevel
    }
}

/// TLS for a worker's NBD clients, as nbdkit and qemu-nbd take it: a psktool file, or a
/// directory with ca-cert.pem, server-cert.pem and server-key.pem.
public struct TLSSettings: Codable, Sendable, Equatable {
    public var pskFile: String?
    public var certificatesDirectory: String?
    /// X.509: clients must present a certificate the CA signed.
    public var verifyPeer: Bool

    public init(pskFile: String? = nil, certificatesDirectory: String? = nil, verifyPeer: Bool = false) {
        self.pskFile = pskFile
        self.certificatesDirectory = certificatesDirectory
        self.verifyPeer = verifyPeer
    }

    /// Why these settings cannot work, or nil.
    public var problem: String? {
        switch (pskFile, certificatesDirectory) {
        case (nil, nil): "give a PSK file or a certificates directory"
        case (.some, .some): "give a PSK file or a certificates directory, not both"
        case (.some, nil) where verifyPeer: "verifying peers is for certificates, not PSK"
        default: nil
        }
    }
}

/// Serving is a worker's usual task; the host also runs short-lived workers that open a
/// disk's chain to attach or detach filters while no VM uses the disk.
public enum WorkerTask: Codable, Sendable, Equatable {
    /// Serve the disks until told to stop.
    case serve
    /// Attach every filter that meets a disk for the first time (without opening
    /// it), then exit.
    case attach
    /// Open the disks, then close and detach the named plug-ins' filters (consumer side
    /// first, with everything below them still open, so a write-back cache can destage)
    /// and delete their sidecar state; close the rest and exit.
    case detach(plugins: [String])
    /// Open the disks and deliver a lifecycle event to their filters, then exit (a
    /// disk no VM runs; a veto fails the task).
    case event(DiskLifecycleEvent)

    /// The exit status of a maintenance worker whose event a filter vetoed (an answer,
    /// not a failure).
    public static let vetoedExitStatus: Int32 = 75
}

/// The unprivileged user and group a worker runs as on a root host. Each VM gets its
/// own (derived from its name, so the same across restarts and host reboots), from a
/// range no distribution hands out to accounts: the ids own nothing on the host but the
/// VM's own state, which the worker is given when it starts.
public struct WorkerIdentity: Codable, Sendable, Equatable {
    public var uid: UInt32
    public var gid: UInt32

    /// 0x70000000: above the ranges systemd reserves for containers and dynamic users.
    public static let base: UInt32 = 0x7000_0000

    public init(uid: UInt32, gid: UInt32) {
        self.uid = uid
        self.gid = gid
    }

    /// The identity of the worker named `name` (a VM's, or "validator").
    public init(for name: String) {
        var hash: UInt32 = 2_166_136_261  // FNV-1a
        for byte in name.utf8 { hash = (hash ^ UInt32(byte)) &* 16_777_619 }
        let id = Self.base + 1 + hash % 0xFFFF
        self.init(uid: id, gid: id)
    }
}
