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

    public init(name: String, backend: BackendSpec, readOnly: Bool, filters: [PlannedFilter], listenFD: Int32) {
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
    /// The VM's private state directory: each filter's sidecar directory lives below it
    /// as DISK/PLUGIN-NAME, and it is the worker's working directory.
    public var stateDirectory: String
    public var disks: [DiskConfiguration]
    /// A request stuck longer than this in one filter (or the backend) kills the worker.
    public var watchdogSeconds: Double
    public var sandbox: Bool
    public var logLevel: String

    public init(
        vmName: String, stateDirectory: String, disks: [DiskConfiguration], watchdogSeconds: Double = 30,
        sandbox: Bool = true, logLevel: String = "info"
    ) {
        self.vmName = vmName
        self.stateDirectory = stateDirectory
        self.disks = disks
        self.watchdogSeconds = watchdogSeconds
        self.sandbox = sandbox
        self.logLevel = logLevel
    }
}
