import CSandboxShims
import CSystemShims
import Glibc

/// The file system a worker sees: a tmpfs root holding its own directories, its
/// plug-ins, the libraries they need and a few device files, each at its usual path,
/// and nothing else — not the host's state directory, not other VMs' disks, not /tmp.
///
/// Each entry is opened (O_PATH) while the process can still reach it and bound from
/// that fd, so an identity that could not traverse the directories above it (a 0700
/// state directory) still finds it at its path.
struct PrivateView {
    /// Read-only system files every process needs (the dynamic loader's cache, the
    /// time zone, CPU topology for the runtime, randomness).
    static let systemReadPaths = ["/dev/zero", "/dev/urandom", "/dev/random", "/etc/ld.so.cache", "/etc/localtime",
                                  "/sys/devices/system/cpu"]

    private struct Entry {
        var path: String
        var fd: Int32 = -1
        var kind: iof_view_kind
        var link: String? = nil
    }
    private var entries: [Entry] = []
    private let newProc: Bool

    init(readWrite: [String], readExecute: [String], newProc: Bool) throws {
        self.newProc = newProc
        var wanted: [(String, iof_view_kind)] = readWrite.map { ($0, IOF_VIEW_READ_WRITE) }
            + readExecute.map { ($0, IOF_VIEW_READ_ONLY) }
            + Self.systemReadPaths.map { ($0, IOF_VIEW_READ_ONLY) }
            + [("/dev/null", IOF_VIEW_READ_WRITE)]
        if !newProc { wanted.append(("/proc", IOF_VIEW_READ_WRITE)) }
        do {
            // A link (/lib -> usr/lib) appears as the same link, and what it points to
            // is shown on its own.
            var links: [Entry] = []
            wanted = wanted.flatMap { path, kind -> [(String, iof_view_kind)] in
                let path = Self.normalized(path)
                guard !Self.systemReadPaths.contains(path), let link = Self.linkTarget(path),
                      let resolved = realpath(path, nil) else { return [(path, kind)] }
                defer { free(resolved) }
                links.append(Entry(path: path, kind: IOF_VIEW_SYMLINK, link: link))
                return [(String(cString: resolved), kind)]
            }
            // Outermost first; what an earlier directory already shows is not bound again.
            var shown: [String] = []
            for (path, kind) in wanted.sorted(by: { $0.0.count < $1.0.count })
            where !shown.contains(where: { path == $0 || path.hasPrefix($0 + "/") }) {
                let fd = iof_open_path(path)
                guard fd >= 0 else {
                    if errno == ENOENT { continue }  // a system path this machine lacks
                    throw SandboxError(message: "cannot open \(path) for the worker's view: \(String(cString: strerror(errno)))")
                }
                entries.append(Entry(path: path, fd: fd, kind: kind))
                shown.append(path)
            }
            entries += links.filter { link in !shown.contains { link.path.hasPrefix($0 + "/") } }
        } catch {
            close()
            throw error
        }
    }

    static func linkTarget(_ path: String) -> String? {
        var info = stat()
        guard lstat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFLNK else { return nil }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink(path, &buffer, Int(PATH_MAX))
        return n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : nil
    }

    /// Makes the view the process's root. The process must have a mount namespace of
    /// its own (and, with `newProc`, be in its own pid namespace).
    func enter() throws {
        // C strings that live until the call returns.
        let paths = entries.map { strdup($0.path)! }
        let links = entries.map { strdup($0.link ?? "")! }
        defer { (paths + links).forEach { free($0) } }
        let table = entries.indices.map { index in
            iof_view_entry(path: paths[index], fd: entries[index].fd, kind: Int32(entries[index].kind.rawValue),
                           link: links[index])
        }
        var failed: Int32 = -1
        let rc = table.withUnsafeBufferPointer {
            iof_enter_private_root("/tmp", $0.baseAddress, Int32($0.count), newProc ? 1 : 0, &failed)
        }
        guard rc == 0 else {
            let what = failed >= 0 ? " (placing \(entries[Int(failed)].path))" : ""
            throw SandboxError(message: "cannot give the worker its private root\(what): \(String(cString: strerror(-rc)))")
        }
    }

    func close() {
        for entry in entries where entry.fd >= 0 { Glibc.close(entry.fd) }
    }

    /// Without a trailing slash or `.` components: entries are compared as prefixes.
    static func normalized(_ path: String) -> String {
        var parts: [Substring] = []
        for part in path.split(separator: "/") where part != "." {
            if part == ".." { _ = parts.popLast() } else { parts.append(part) }
        }
        return "/" + parts.joined(separator: "/")
    }
}
