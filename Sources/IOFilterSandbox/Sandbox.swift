import CSandboxShims
import CSystemShims
import Glibc
import IOFilterPosix
import Logging

/// Confines the current process before any plug-in code runs in it.
///
/// The order is the design: first everything the process will keep is opened (while
/// its identity can still reach it); then it leaves the host's namespaces, becomes init
/// of a pid namespace of its own (a parent stays outside to report how it ended), and
/// changes its root to a tmpfs that holds only what it was given; then it gives up
/// its identity and every capability; Landlock and seccomp come last, as further
/// layers over a process that already has nothing to abuse.
public struct Sandbox: Sendable {
    /// Paths the process may read and write below (its sidecar state). As root, they
    /// are handed to `identity` (recursively) before it takes over.
    public var readWritePaths: [String] = []
    /// Paths it may read and map executable (plug-in files and their libraries).
    public var readExecutePaths: [String] = []
    /// fds below this number stay open; every other inherited fd is closed (nil: the
    /// caller did that itself, with `closeInheritedFDs`, before opening what it keeps).
    public var keepFDsBelow: Int32? = 3
    /// fds the host handed over that must stay as they are (listening sockets): the
    /// process may not close, shut down or replace them.
    public var pinnedFDs: [Int32] = []
    /// Paths covered with /dev/null before anything else, should they be within the
    /// process's view: the host's control socket, say.
    public var hiddenPaths: [String] = []
    /// Address space limit in bytes, or nil for none.
    public var addressSpaceLimit: UInt64?
    public var openFilesLimit: UInt64 = 4096
    /// Who the process becomes when it was started as root (ignored otherwise: an
    /// unprivileged host's workers stay its user, in a user namespace of their own).
    public var identity: (uid: UInt32, gid: UInt32)?
    /// Own user, mount, network, IPC and UTS namespaces and a private root; a warning
    /// (and no isolation beyond Landlock and seccomp) where the kernel refuses them.
    public var isolate = true
    /// Also a pid namespace, with this process as its init: nothing it starts can
    /// outlive it, it sees no other process, and it ignores its own kill signals.
    /// Forks, so only for processes that are still single-threaded.
    public var ownPidNamespace = false
    /// The host's sockets are handed in by the host: no socket(2) or connect(2).
    public var denySockets = false
    /// The process goes on when its supervisor ends (a VM's worker or a partner daemon,
    /// which the next host adopts); otherwise the kernel kills it with its supervisor.
    public var outlivesSupervisor = false

    public init() {}

    /// The system calls no filter has any business making. They fail with EPERM.
    public static let deniedSyscalls = [
        "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
        "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
        "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
        "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
        "sethostname", "setdomainname", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
        "unshare", "setns", "userfaultfd", "personality", "iopl", "ioperm", "quotactl", "lookup_dcookie",
        "fanotify_init", "open_by_handle_at", "name_to_handle_at",
        // Device nodes (and FIFOs): no filter needs to make any, and a device node
        // would be a door to the hardware.
        "mknod", "mknodat",
    ]

    public struct Report: Sendable {
        public var landlockABI: Int32?
        public var seccomp: Bool
        public var namespaces: Bool
        public var warnings: [String]
    }

    /// Applies everything; what the kernel lacks is reported as a warning, not fatal.
    public func apply(logger: Logger) throws -> Report {
        var warnings: [String] = []
        if let keepFDsBelow { Self.closeInheritedFDs(keepingBelow: keepFDsBelow) }
        setLimit(RLIMIT_CORE, 0)
        setLimit(RLIMIT_NOFILE, openFilesLimit)
        if let addressSpaceLimit { setLimit(RLIMIT_AS, addressSpaceLimit) }
        let identity = geteuid() == 0 ? self.identity : nil
        // Read before the root changes: afterwards the libraries' paths are no longer
        // what /proc/self/maps shows.
        let libraries = Self.libraryDirectories()

        var namespaces = false
        var aliveFD: Int32 = -1
        if isolate {
            var flags = iof_clone_newns() | iof_clone_newnet() | iof_clone_newipc() | iof_clone_newuts()
            if ownPidNamespace { flags |= iof_clone_newpid() }
            // Root makes these namespaces as root (its view must be built before it
            // gives up root); anyone else needs a user namespace to make them at all.
            let rc = identity != nil ? iof_unshare(flags) : iof_enter_user_namespace(flags)
            if rc == 0 {
                namespaces = true
                // Opened now: in the new mount namespace (binds come from its mounts),
                // while every path is still reachable.
                let view = try PrivateView(readWrite: readWritePaths, readExecute: readExecutePaths + libraries,
                                           newProc: ownPidNamespace)
                defer { view.close() }
                if ownPidNamespace {
                    aliveFD = iof_fork_namespace_init(identity?.uid ?? 0, identity?.gid ?? 0, identity != nil ? 1 : 0,
                                                      outlivesSupervisor ? 1 : 0)
                    try check(aliveFD, "fork into the pid namespace")
                }
                try view.enter()
            } else {
                warnings.append("cannot give the worker namespaces of its own (\(String(cString: strerror(-rc)))): it shares the host's network and sees the host's files through Landlock alone")
            }
        }
        let present = hiddenPaths.filter { access($0, F_OK) == 0 }
        if !present.isEmpty {
            let paths = present.map { UnsafePointer(strdup($0)) }
            defer { paths.forEach { free(UnsafeMutablePointer(mutating: $0)) } }
            let rc = paths.withUnsafeBufferPointer { iof_hide_paths($0.baseAddress, Int32($0.count)) }
            if rc != 0 {
                warnings.append("cannot hide \(present.joined(separator: ", ")) from the worker (\(String(cString: strerror(-rc))))")
            }
        }
        if let identity, namespaces {
            for path in readWritePaths { Self.handOver(path, to: identity) }
            try check(iof_become(identity.uid, identity.gid), "switch to uid \(identity.uid)")
            // And a user namespace of its own, as an unprivileged host's worker has.
            if iof_enter_user_namespace(0) != 0 {
                warnings.append("cannot give the worker a user namespace of its own")
            }
        } else if geteuid() == 0 {
            // Without a private root, another identity could not reach the state
            // directories below the host's (0700): root, without capabilities.
            warnings.append(identity == nil ? "the worker runs as root: no identity to switch to was given"
                                            : "the worker stays root (without capabilities): it has no namespaces to switch identity in")
        }
        try check(iof_drop_capabilities(), "drop capabilities")
        try check(iof_set_no_new_privs(), "PR_SET_NO_NEW_PRIVS")
        _ = iof_set_dumpable(0)
        // Last of the credential changes, each of which clears it. In a pid namespace
        // the parent is the process left outside, which this one always follows; it is
        // that parent which outlives the supervisor or not.
        if aliveFD >= 0 || !outlivesSupervisor {
            try check(iof_set_parent_death_signal(SIGKILL), "PR_SET_PDEATHSIG")
        }
        if aliveFD >= 0 {
            if iof_parent_is_gone(aliveFD) != 0 { _exit(1) }
            close(aliveFD)
        } else if getppid() == 1 && !outlivesSupervisor {
            _exit(1)  // the parent died before we could ask to follow it
        }

        var landlock: Int32?
        let abi = iof_landlock_abi()
        if abi > 0 {
            try applyLandlock(abi: abi, libraries: libraries)
            landlock = abi
            if abi < 6 {
                warnings.append("Landlock ABI \(abi) cannot scope signals (6 can): a filter may signal processes of the same user")
            }
        } else {
            warnings.append("Landlock is not available (\(String(cString: strerror(-abi)))); file access is not confined")
        }

        var seccomp = false
        if let context = iof_seccomp_new() {
            defer { iof_seccomp_release(context) }
            for name in Self.deniedSyscalls + (denySockets ? ["socket", "connect"] : []) {
                _ = iof_seccomp_deny(context, name, EPERM)  // a name this kernel lacks needs no rule
            }
            _ = iof_seccomp_deny_raw_sockets(context, EPERM)
            if iof_seccomp_deny_new_namespaces(context, EPERM) != 0 {
                warnings.append("seccomp cannot refuse new namespaces made with clone")
            }
            // A worker is one process: no filter may leave a process behind, fork in a
            // loop, or signal the world from a child.
            if iof_seccomp_deny_new_processes(context, EPERM) != 0 {
                warnings.append("seccomp cannot refuse new processes")
            }
            for fd in pinnedFDs where iof_seccomp_pin_fd(context, fd, EPERM) != 0 {
                warnings.append("seccomp cannot pin fd \(fd)")
            }
            let rc = iof_seccomp_load(context)
            if rc == 0 {
                seccomp = true
            } else {
                warnings.append("seccomp filter not loaded (\(String(cString: strerror(-rc))))")
            }
        } else {
            warnings.append("seccomp is not available")
        }
        for warning in warnings { logger.warning("sandbox: \(warning)") }
        return Report(landlockABI: landlock, seccomp: seccomp, namespaces: namespaces, warnings: warnings)
    }

    /// Closes every fd from `first` on: whatever the parent leaked stays out of reach.
    public static func closeInheritedFDs(keepingBelow first: Int32) {
        _ = iof_close_from(first)
    }

    /// Gives a directory and everything below it to the worker's identity: state
    /// written by an earlier worker (of another identity, or of an older version that
    /// ran as root) stays usable.
    /// A directory it owns already is taken to be its own throughout (what it makes
    /// there is its own), so a restart does not walk the tree again.
    static func handOver(_ path: String, to identity: (uid: UInt32, gid: UInt32)) {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_uid != identity.uid || info.st_gid != identity.gid else { return }
        _ = lchown(path, identity.uid, identity.gid)
        guard (info.st_mode & S_IFMT) == S_IFDIR else { return }
        for name in Directory.entries(path) { handOver(path + "/" + name, to: identity) }
    }

    private func applyLandlock(abi: Int32, libraries: [String]) throws {
        let all = iof_landlock_fs_rights(abi)
        // From ABI 6 the domain also scopes signals and abstract unix sockets: the
        // worker can signal only itself and its own children, and reach no abstract
        // socket of another process.
        let ruleset = abi >= 6 ? iof_landlock_create_scoped_ruleset(all) : iof_landlock_create_ruleset(all)
        try check(ruleset, "landlock_create_ruleset")
        defer { close(ruleset) }
        let read = iof_landlock_read_rights()
        let readExecute = read | iof_landlock_execute_right()
        for path in readWritePaths {
            try check(iof_landlock_allow_path(ruleset, path, all & ~iof_landlock_execute_right()), "Landlock rule for \(path)")
        }
        for path in readExecutePaths + libraries {
            _ = iof_landlock_allow_path(ruleset, path, readExecute)  // a missing system dir is fine
        }
        // /proc: Dispatch (under Swift concurrency) reads /proc/TID/stat of its worker
        // threads and crashes the process if it cannot; thread ids cannot be named in
        // advance, so procfs is readable (and, like any process of this user, no more).
        for path in PrivateView.systemReadPaths + ["/dev/null", "/proc"] {
            _ = iof_landlock_allow_path(ruleset, path, read)
        }
        _ = iof_landlock_allow_path(ruleset, "/dev/null", all & ~iof_landlock_execute_right())
        try check(iof_landlock_restrict_self(ruleset), "landlock_restrict_self")
    }

    /// Where shared libraries come from: the standard places plus every directory this
    /// process already maps a library from (the Swift runtime's, for Swift plug-ins).
    static func libraryDirectories() -> [String] {
        var directories: Set<String> = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"]
        // Scanned as bytes: String's substring search (Substring.contains) would bring
        // in the string-processing library, a millisecond of every worker start.
        let fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return directories.sorted() }
        let maps = (try? FileDescriptorIO.readToEnd(fd)) ?? []
        close(fd)
        let dotSO: [UInt8] = Array(".so".utf8)
        for line in maps.split(separator: UInt8(ascii: "\n")) {
            guard let slash = line.firstIndex(of: UInt8(ascii: "/")) else { continue }
            let path = line[slash...]
            let named = path.indices.contains { index in path[index...].starts(with: dotSO) }
            guard named, let last = path.lastIndex(of: UInt8(ascii: "/")) else { continue }
            directories.insert(String(decoding: path[..<last], as: UTF8.self))
        }
        return directories.sorted()
    }

    private func setLimit(_ resource: __rlimit_resource, _ value: UInt64) {
        let resource = __rlimit_resource_t(resource.rawValue)
        var limit = rlimit(rlim_cur: rlim_t(value), rlim_max: rlim_t(value))
        var current = rlimit()
        if getrlimit(resource, &current) == 0, current.rlim_max < limit.rlim_max {
            limit = rlimit(rlim_cur: current.rlim_max, rlim_max: current.rlim_max)
        }
        setrlimit(resource, &limit)
    }

    private func check(_ rc: Int32, _ what: String) throws {
        if rc < 0 { throw SandboxError(message: "\(what): \(String(cString: strerror(-rc)))") }
    }
}

public struct SandboxError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { "sandbox: \(message)" }
}

/// How a process gets into the cgroups its supervisor made for it: it moves itself, as
/// it starts, before it confines itself and before any plug-in code runs (on cgroup v2
/// it is usually born there, and finds nothing to do).
public enum CgroupMembership {
    /// Moves this process into each group (named by its `cgroup.procs` file) it is not
    /// in yet. Nil once it is in every one; else why not.
    ///
    /// A single-threaded process on cgroup v1 writes "0" to each group's `tasks`: a
    /// recent kernel moves the calling thread alone without its global threadgroup
    /// lock, whose write side waits for an RCU grace period — 6 to 23 ms on the 2-core
    /// test machine, once per start, which a supervisor writing the pid to
    /// `cgroup.procs` made every worker wait for (an older kernel takes the lock either
    /// way). Otherwise (v2, or more than one thread) it writes its pid to
    /// `cgroup.procs`, moving every thread.
    public static func join(_ procsFiles: [String]) -> String? {
        let me = getpid()
        let alone = ProcessStat(me)?.threads == 1
        for file in procsFiles where !lists(file, me) {
            let directory = String(file[..<(file.lastIndex(of: "/") ?? file.endIndex)])
            if alone, write("0", to: directory + "/tasks") == nil, lists(file, me) { continue }
            if let failure = write("\(me)", to: file) { return "cannot write \(file): \(failure)" }
        }
        return procsFiles.first { !lists($0, me) }.map { "\($0) does not list this process" }
    }

    private static func lists(_ procsFile: String, _ pid: pid_t) -> Bool {
        let wanted = "\(pid)"
        return (FileDescriptorIO.readFile(procsFile) ?? "").split(separator: "\n").contains { $0 == wanted }
    }

    /// Writes `text` into a cgroup file: nil, or the error.
    private static func write(_ text: String, to path: String) -> String? {
        FileDescriptorIO.writeFile(text, to: path) ? nil : String(cString: strerror(errno))
    }
}
