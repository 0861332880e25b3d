import CSystemShims
import Glibc
import Logging

/// Confines the current process before any plug-in code runs in it.
///
/// Order matters: fds and privileges first, then Landlock (which needs the paths to
/// still be openable), then seccomp last (it would refuse the Landlock syscalls'
/// callers nothing, but keeping it last keeps the filter small and final).
public struct Sandbox: Sendable {
    /// Paths the process may read and write below (disks, its sidecar state).
    public var readWritePaths: [String] = []
    /// Paths it may read and map executable (plug-in files and their libraries).
    public var readExecutePaths: [String] = []
    /// fds below this number stay open; every other inherited fd is closed.
    public var keepFDsBelow: Int32 = 3
    /// fds the host handed over that must stay as they are (listening sockets): the
    /// process may not close, shut down or replace them.
    public var pinnedFDs: [Int32] = []
    /// Paths covered (in a private mount namespace) before anything else: the worker
    /// cannot open or connect to them, even as root.
    public var hiddenPaths: [String] = []
    /// Address space limit in bytes, or nil for none.
    public var addressSpaceLimit: UInt64?
    public var openFilesLimit: UInt64 = 4096

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
        public var warnings: [String]
    }

    /// Applies everything; what the kernel lacks is reported as a warning, not fatal.
    public func apply(logger: Logger) throws -> Report {
        var warnings: [String] = []
        _ = iof_close_from(keepFDsBelow)
        // IPC and host name of its own: no SysV shared memory, semaphores or message
        // queues of other processes are within reach. (Needs root; a warning otherwise.)
        let isolated = iof_unshare(iof_clone_newipc() | iof_clone_newuts())
        if isolated != 0 {
            warnings.append("cannot give the worker IPC and UTS namespaces of its own (\(String(cString: strerror(-isolated))))")
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
        try check(iof_set_no_new_privs(), "PR_SET_NO_NEW_PRIVS")
        try check(iof_set_parent_death_signal(SIGKILL), "PR_SET_PDEATHSIG")
        if getppid() == 1 { _exit(1) }  // the parent died before we could ask to follow it
        setLimit(RLIMIT_CORE, 0)
        setLimit(RLIMIT_NOFILE, openFilesLimit)
        if let addressSpaceLimit { setLimit(RLIMIT_AS, addressSpaceLimit) }

        var landlock: Int32?
        let abi = iof_landlock_abi()
        if abi > 0 {
            try applyLandlock(abi: abi)
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
            for name in Self.deniedSyscalls {
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
        return Report(landlockABI: landlock, seccomp: seccomp, warnings: warnings)
    }

    private func applyLandlock(abi: Int32) throws {
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
        for path in readExecutePaths + Self.libraryDirectories() {
            _ = iof_landlock_allow_path(ruleset, path, readExecute)  // a missing system dir is fine
        }
        // /proc: Dispatch (under Swift concurrency) reads /proc/TID/stat of its worker
        // threads and crashes the process if it cannot; thread ids cannot be named in
        // advance, so procfs is readable (and, like any process of this user, no more).
        for path in ["/dev/null", "/dev/zero", "/dev/urandom", "/etc/ld.so.cache", "/etc/localtime", "/proc",
                     "/sys/devices/system/cpu"] {
            _ = iof_landlock_allow_path(ruleset, path, read)
        }
        _ = iof_landlock_allow_path(ruleset, "/dev/null", all & ~iof_landlock_execute_right())
        try check(iof_landlock_restrict_self(ruleset), "landlock_restrict_self")
    }

    /// Where shared libraries come from: the standard places plus every directory this
    /// process already maps a library from (the Swift runtime's, for Swift plug-ins).
    static func libraryDirectories() -> [String] {
        var directories: Set<String> = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib"]
        if let maps = try? readFile("/proc/self/maps") {
            for line in maps.split(separator: "\n") {
                guard let slash = line.firstIndex(of: "/") else { continue }
                let path = line[slash...]
                guard path.contains(".so"), let last = path.lastIndex(of: "/") else { continue }
                directories.insert(String(path[..<last]))
            }
        }
        return directories.sorted()
    }

    static func readFile(_ path: String) throws -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SandboxError(message: "open \(path)") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, 65536) }
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
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
