import Glibc
import Synchronization
import IOFilterModel
import IOFilterPosix

/// A control group of a worker's own: its memory (without swap), its number of tasks
/// (threads: the worker makes no processes) and its CPU weight are limited by the
/// kernel, which kills the worker alone — never the host or another VM — when it goes
/// past its memory, and everything left in the group is killed when the worker ends.
///
/// cgroup v2 where the host can write its own cgroup's subtree (root, or a delegated
/// subtree); else the v1 memory, pids and cpu hierarchies where they are mounted and
/// writable. Where neither is possible the worker falls back on rlimits, and says so.
public final class WorkerCgroup: @unchecked Sendable {
    // @unchecked: immutable after init.
    /// One directory per hierarchy (v1), or one (v2).
    public let directories: [String]
    /// Each hierarchy's `cgroup.procs`: the worker joins the group through them (see
    /// `CgroupMembership.join`), and everything in it is found there.
    public let procsFiles: [String]
    public let limits: WorkerCgroupLimits
    let version: Int

    init(directories: [String], procsFiles: [String], limits: WorkerCgroupLimits, version: Int) {
        self.directories = directories
        self.procsFiles = procsFiles
        self.limits = limits
        self.version = version
    }

    /// Makes (or reuses) the group `name` with `limits`, or says why it cannot.
    public static func create(name: String, limits: WorkerCgroupLimits) -> Result<WorkerCgroup, SupervisorError> {
        let mounts = CgroupMounts.read()
        if let unified = mounts.unified, let own = mounts.ownPath["", default: nil] {
            var root = unified + (own == "/" ? "" : own)
            // A host already in its leaf (see createV2) makes its groups beside it, not
            // below: each worker would otherwise nest the host one level deeper.
            if root.hasSuffix("/" + hostLeaf) { root = String(root.dropLast(hostLeaf.count + 1)) }
            let available = (FileDescriptorIO.readFile("\(root)/cgroup.controllers") ?? "").split(whereSeparator: \.isWhitespace).map(String.init)
            // A hybrid host's v2 tree holds none of them: its controllers are v1's.
            if controllers.allSatisfy(available.contains) {
                return createV2(root: root, name: name, limits: limits)
            }
        }
        return createV1(mounts: mounts, name: name, limits: limits)
    }

    private static func createV2(root: String, name: String, limits: WorkerCgroupLimits) -> Result<WorkerCgroup, SupervisorError> {
        // No process may sit in a group whose controllers are handed to children: the
        // host moves itself into a leaf of its own first.
        let host = "\(root)/\(hostLeaf)"
        if !(FileDescriptorIO.readFile("\(root)/cgroup.subtree_control") ?? "").contains("memory") {
            guard mkdir(host, 0o755) == 0 || errno == EEXIST, FileDescriptorIO.writeFile("0", to: "\(host)/cgroup.procs"),
                  FileDescriptorIO.writeFile(controllers.map { "+\($0)" }.joined(separator: " "), to: "\(root)/cgroup.subtree_control") else {
                return .failure(SupervisorError(message: "cannot delegate controllers below \(root): \(String(cString: strerror(errno)))"))
            }
        }
        guard let directory = makeGroup(below: root, for: name),
              FileDescriptorIO.writeFile("\(limits.memory)", to: "\(directory)/memory.max"),
              FileDescriptorIO.writeFile("\(limits.tasks)", to: "\(directory)/pids.max"),
              FileDescriptorIO.writeFile("\(limits.cpuWeight)", to: "\(directory)/cpu.weight") else {
            return .failure(SupervisorError(message: "cannot set up the group of \(name) below \(root): \(String(cString: strerror(errno)))"))
        }
        _ = FileDescriptorIO.writeFile("0", to: "\(directory)/memory.swap.max")  // absent without swap accounting
        return .success(WorkerCgroup(directories: [directory], procsFiles: ["\(directory)/cgroup.procs"], limits: limits, version: 2))
    }

    private static func createV1(mounts: CgroupMounts, name: String, limits: WorkerCgroupLimits) -> Result<WorkerCgroup, SupervisorError> {
        var directories: [String] = []
        for controller in controllers {
            guard let mount = mounts.v1[controller], let own = mounts.ownPath[controller] ?? nil else {
                if controller == "cpu" { continue }  // a CPU weight is a nicety; memory and tasks are not
                return .failure(SupervisorError(message: "no cgroup v2 with controllers, and the cgroup v1 \(controller) hierarchy is not mounted"))
            }
            let parent = "\(mount)\(own == "/" ? "" : own)"
            guard let directory = makeGroup(below: parent, for: name) else {
                return .failure(SupervisorError(message: "cannot create the group of \(name) below \(parent): \(String(cString: strerror(errno)))"))
            }
            directories.append(directory)
            let settings: [(String, String)] = switch controller {
            case "memory": [("memory.limit_in_bytes", "\(limits.memory)"), ("memory.swappiness", "0")]
            case "pids": [("pids.max", "\(limits.tasks)")]
            default: [("cpu.shares", "\(limits.cpuWeight * 1024 / 100)")]
            }
            for (file, value) in settings where !FileDescriptorIO.writeFile(value, to: "\(directory)/\(file)") && file != "memory.swappiness" {
                return .failure(SupervisorError(message: "cannot set \(directory)/\(file): \(String(cString: strerror(errno)))"))
            }
        }
        return .success(WorkerCgroup(directories: directories, procsFiles: directories.map { "\($0)/cgroup.procs" },
                                     limits: limits, version: 1))
    }

    /// The group an earlier host made for `pid` (a worker or daemon it left serving),
    /// to be supervised with by the next one; nil if `pid` is in no group of ours.
    public static func of(pid: pid_t, limits: WorkerCgroupLimits) -> WorkerCgroup? {
        let mounts = CgroupMounts.read(process: "\(pid)")
        let ours = { (path: String?) -> Bool in ((path ?? "") as String).split(separator: "/").last?.hasPrefix("iofilter-worker-") == true }
        let found: WorkerCgroup
        if let unified = mounts.unified, let path = mounts.ownPath["", default: nil], ours(path) {
            let directory = unified + path
            found = WorkerCgroup(directories: [directory], procsFiles: ["\(directory)/cgroup.procs"], limits: limits, version: 2)
        } else {
            var directories: [String] = []
            for controller in controllers {
                guard let mount = mounts.v1[controller], let path = mounts.ownPath[controller] ?? nil, ours(path) else { continue }
                directories.append(mount + path)
            }
            guard !directories.isEmpty else { return nil }
            found = WorkerCgroup(directories: directories, procsFiles: directories.map { "\($0)/cgroup.procs" }, limits: limits, version: 1)
        }
        // The limits are this host's now (they may have changed: a default follows the
        // host's memory and its VMs); the process is not restarted for them.
        found.applyLimits()
        return found
    }

    /// Writes `limits` to the group's controllers (a running process's group too).
    func applyLimits() {
        for directory in directories {
            let settings: [(String, String)] = version == 2
                ? [("memory.max", "\(limits.memory)"), ("pids.max", "\(limits.tasks)"), ("cpu.weight", "\(limits.cpuWeight)")]
                : [("memory.limit_in_bytes", "\(limits.memory)"), ("pids.max", "\(limits.tasks)"), ("cpu.shares", "\(limits.cpuWeight * 1024 / 100)")]
            for (file, value) in settings where access("\(directory)/\(file)", F_OK) == 0 {
                _ = FileDescriptorIO.writeFile(value, to: "\(directory)/\(file)")
            }
        }
    }

    /// What the worker logs of its group.
    public var summary: String {
        "cgroup v\(version): memory \(limits.memory >> 20) MiB, \(limits.tasks) tasks, CPU weight \(limits.cpuWeight)"
    }

    /// Bytes of memory the group uses now that the kernel cannot simply reclaim: what
    /// it counts, less the page cache of the files it reads and writes (a worker
    /// writing its disk fills that, and the kernel drops it before it kills anyone).
    public var memoryInUse: UInt64? {
        let (total, cacheKey) = version == 2 ? ("memory.current", "file") : ("memory.usage_in_bytes", "total_cache")
        guard let used = FileDescriptorIO.readFile("\(directories[0])/\(total)").flatMap({ UInt64($0.split(separator: "\n").first ?? "") })
        else { return nil }
        let stat = FileDescriptorIO.readFile("\(directories[0])/memory.stat") ?? ""
        let cache = stat.split(separator: "\n").first { $0.hasPrefix(cacheKey + " ") }.flatMap { UInt64($0.dropFirst(cacheKey.count + 1)) } ?? 0
        return used > cache ? used - cache : 0
    }

    /// How often the kernel's OOM killer has killed in this group so far.
    public var oomKills: Int {
        let file = version == 2 ? "\(directories[0])/memory.events" : "\(directories[0])/memory.oom_control"
        for line in (FileDescriptorIO.readFile(file) ?? "").split(separator: "\n") where line.hasPrefix("oom_kill ") {
            return Int(line.dropFirst("oom_kill ".count)) ?? 0
        }
        return 0
    }

    /// Kills whatever is still in the group (nothing should be: the worker makes no
    /// processes, and the pid namespace's init takes its own with it).
    public func killAll() {
        if version == 2, FileDescriptorIO.writeFile("1", to: "\(directories[0])/cgroup.kill") { return }
        for _ in 0..<10 {
            let pids = procsFiles.flatMap { (FileDescriptorIO.readFile($0) ?? "").split(separator: "\n").compactMap { pid_t($0) } }
            if pids.isEmpty { return }
            for pid in pids { kill(pid, SIGKILL) }
            usleep(10_000)
        }
    }

    /// Removes the group (once it is empty).
    public func remove() {
        killAll()
        for directory in directories {
            for _ in 0..<50 where rmdir(directory) != 0 && errno == EBUSY { usleep(10_000) }
        }
    }

    /// Where the host process itself sits in cgroup v2, beside its workers' groups.
    static let hostLeaf = "iofilter-host"

    /// The controllers a worker's group limits with.
    static let controllers = ["memory", "pids", "cpu"]

    /// Makes (or reuses) the group of worker `name` below `parent`, named the same in
    /// v1 and v2 after this host process and the worker: two hosts on one machine may
    /// have VMs of the same name, and one's cleanup must not kill the other's worker.
    /// First removes the groups of hosts that died before they could (their pid is gone).
    static func makeGroup(below parent: String, for name: String) -> String? {
        let prefix = "iofilter-worker-"
        for entry in Directory.entries(parent) where entry.hasPrefix(prefix) {
            let owner = entry.dropFirst(prefix.count).prefix { $0 != "-" }
            if let pid = pid_t(owner), kill(pid, 0) != 0, errno == ESRCH { _ = rmdir("\(parent)/\(entry)") }
        }
        // One group per supervisor: a worker taking over from another of the same VM
        // must not be in the group its predecessor's stop empties.
        let directory = "\(parent)/\(prefix)\(getpid())-\(name)-\(groupSerial.add(1, ordering: .relaxed).newValue)"
        return mkdir(directory, 0o755) == 0 || errno == EEXIST ? directory : nil
    }

    private static let groupSerial = Atomic<Int>(0)

}

/// What a worker's cgroup allows.
public struct WorkerCgroupLimits: Sendable, Equatable {
    /// Bytes of memory (RAM; no swap).
    public var memory: UInt64
    /// Tasks: threads, since a worker makes no processes.
    public var tasks: Int
    /// CPU weight, 1 to 10000 (cgroup v2's scale; 100 is everyone's default).
    public var cpuWeight: Int

    public static let defaultTasks = 512
    public static let defaultCPUWeight = 100

    public init(memory: UInt64, tasks: Int = defaultTasks, cpuWeight: Int = defaultCPUWeight) {
        self.memory = memory
        self.tasks = tasks
        self.cpuWeight = cpuWeight
    }

    /// A worker's: its memory limit and CPU weight, and room for two threads per client
    /// of every disk besides the filters' own, and with TLS for its terminator's (two
    /// per client, one per handshake under way).
    public init(for configuration: WorkerConfiguration) {
        let clients = (configuration.maxConnections ?? 16) * max(configuration.disks.count, 1)
        let terminator = configuration.tls == nil ? 0 : 8 + 3 * clients
        self.init(memory: configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit, tasks: Self.defaultTasks + 2 * clients + terminator,
                  cpuWeight: configuration.cpuWeight ?? Self.defaultCPUWeight)
    }
}

/// Where this process's cgroups are: the v2 mount, the v1 controllers' mounts, and this
/// process's path in each hierarchy (from /proc/self/cgroup; "" is v2's).
struct CgroupMounts {
    var unified: String?
    var v1: [String: String] = [:]
    var ownPath: [String: String?] = [:]

    /// - Parameter process: whose groups ("self", or a pid).
    static func read(process: String = "self") -> CgroupMounts {
        var mounts = CgroupMounts()
        for line in (FileDescriptorIO.readFile("/proc/self/mountinfo") ?? "").split(separator: "\n") {
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2 else { continue }
            let fields = halves[0].split(separator: " "), tail = halves[1].split(separator: " ")
            guard fields.count > 4, tail.count > 2 else { continue }
            let point = String(fields[4])
            if tail[0] == "cgroup2" {
                mounts.unified = point
            } else if tail[0] == "cgroup" {
                for option in tail[2].split(separator: ",") where WorkerCgroup.controllers.contains(String(option)) {
                    mounts.v1[String(option)] = point
                }
            }
        }
        for line in (FileDescriptorIO.readFile("/proc/\(process)/cgroup") ?? "").split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            for controller in parts[1].split(separator: ",", omittingEmptySubsequences: false) {
                mounts.ownPath[String(controller)] = String(parts[2])
            }
        }
        return mounts
    }
}
