import Foundation
import IOFilterModel

/// The manifests of plug-ins a user's validator read before, so that `iofilter serve`
/// need not load an unchanged plug-in in a validator again at each start (the
/// validator's exec, confinement and exit: some 12 ms of every start). iofilterd has its
/// own record: a registered plug-in is validated once.
///
/// A plug-in counts as unchanged while its file is: the same device and inode, size,
/// modification and change times. The change time moves with every write, rename or
/// `touch` and cannot be set back, so a rebuilt or replaced plug-in is validated anew.
/// The record is this user's own (`$XDG_CACHE_HOME/iofilter/validated`, else
/// `~/.cache/iofilter/validated`, mode 0700): a worker, under another identity or
/// confined to its own directories, cannot reach it, so a plug-in cannot forge what the
/// host plans its chain from.
public struct ValidatedManifests: Sendable {
    public let directory: String

    public init(directory: String) {
        self.directory = directory
    }

    /// This user's record, or nil where there is no home to keep it in.
    public static func ofCurrentUser() -> ValidatedManifests? {
        let environment = ProcessInfo.processInfo.environment
        let base: String
        if let cache = environment["XDG_CACHE_HOME"], cache.hasPrefix("/") {
            base = cache
        } else if let home = environment["HOME"], home.hasPrefix("/") {
            base = home + "/.cache"
        } else {
            return nil
        }
        return ValidatedManifests(directory: base + "/iofilter/validated")
    }

    private struct Entry: Codable {
        var path: String
        var file: String
        var manifest: PluginManifest
    }

    /// The manifest read when `path` was last validated, if the file is unchanged since.
    public func manifest(for path: String) -> PluginManifest? {
        let entryPath = entryPath(for: path)
        var entryInfo = stat()
        // Only an entry this user wrote and nobody else may change counts.
        guard let file = Self.fileIdentity(path), stat(entryPath, &entryInfo) == 0,
              entryInfo.st_uid == geteuid(), entryInfo.st_mode & 0o022 == 0,
              let data = FileManager.default.contents(atPath: entryPath),
              let entry = try? JSONDecoder().decode(Entry.self, from: data),
              entry.path == path, entry.file == file
        else { return nil }
        return entry.manifest
    }

    /// Records what validating `path` read; best effort (a start that cannot record
    /// only validates again next time).
    public func remember(_ manifest: PluginManifest, for path: String) {
        guard let file = Self.fileIdentity(path),
              let data = try? JSONEncoder().encode(Entry(path: path, file: file, manifest: manifest))
        else { return }
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o700])
        // A start reading at the same time sees the whole record or none.
        guard replaceFile(at: entryPath(for: path), with: data) else { return }
        prune()
    }

    /// At most `limit` entries: past that, the half least recently validated go (their
    /// plug-ins are validated again if they come back).
    private func prune(limit: Int = 512) {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory), names.count > limit else { return }
        let dated = names.compactMap { name -> (String, Int)? in
            var info = stat()
            let path = directory + "/" + name
            return stat(path, &info) == 0 ? (path, info.st_mtim.tv_sec) : nil
        }
        for (path, _) in dated.sorted(by: { $0.1 < $1.1 }).prefix(dated.count / 2) { unlink(path) }
    }

    /// One file per plug-in path (FNV-1a of the path; the entry holds the path itself,
    /// so two paths of one hash only displace each other).
    private func entryPath(for path: String) -> String {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in path.utf8 {
            hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3
        }
        return directory + "/" + String(hash, radix: 16) + ".json"
    }

    /// "device:inode:size:mtime:ctime", nanoseconds; nil if the file cannot be stat'ed.
    static func fileIdentity(_ path: String) -> String? {
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG else { return nil }
        let nanoseconds = { (time: timespec) in Int64(time.tv_sec) * 1_000_000_000 + Int64(time.tv_nsec) }
        return "\(info.st_dev):\(info.st_ino):\(info.st_size):\(nanoseconds(info.st_mtim)):\(nanoseconds(info.st_ctim))"
    }
}
