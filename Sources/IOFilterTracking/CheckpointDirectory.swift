import FoundationEssentials
import Glibc
import IOFilterModel
import IOFilterPosix

/// A disk's checkpoints: one bitmap file per checkpoint in a directory of the disk's
/// state, `.checkpoints/NAME.bitmap`. The files are the truth: the host and every worker
/// that opens the disk read the same ones.
public struct CheckpointDirectory: Sendable {
    public let path: String

    /// Below a disk's sidecar root (where its filters' directories are; a plug-in's name
    /// is reverse-DNS, never a dot-name).
    public init(diskState: String) { path = diskState + "/.checkpoints" }

    public init(path: String) { self.path = path }

    public static let suffix = ".bitmap"

    public func file(_ name: String) -> String { "\(path)/\(name)\(Self.suffix)" }

    /// Checkpoint names, oldest first.
    public func names() -> [String] {
        let names = Directory.entries(path).filter { $0.hasSuffix(Self.suffix) }.map { String($0.dropLast(Self.suffix.count)) }
        let born = names.map { name in (name, (try? ChangeBitmap.open(path: file(name), name: name, use: .read))?.createdAt ?? 0) }
        return born.sorted { ($0.1, $0.0) < ($1.1, $1.0) }.map(\.0)
    }

    public func exists(_ name: String) -> Bool { access(file(name), F_OK) == 0 }

    public func makeDirectory() throws(ChangeBitmap.Failure) {
        var prefix = path.hasPrefix("/") ? "" : "."
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if mkdir(prefix, 0o700) != 0 && errno != EEXIST {
                throw .io("cannot create \(prefix): \(String(cString: strerror(errno)))")
            }
        }
    }

    /// A new, clean checkpoint.
    public func create(_ name: String, granularity: UInt64, diskSize: UInt64, frozen: Bool = false,
                       copying source: ChangeBitmap? = nil) throws(ChangeBitmap.Failure) -> ChangeBitmap {
        guard ResourceName.isValid(name) else { throw .malformed("'\(name)' is no valid checkpoint name (\(ResourceName.pattern))") }
        try makeDirectory()
        return try ChangeBitmap.create(path: file(name), name: name, granularity: granularity, diskSize: diskSize,
                                       frozen: frozen, copying: source)
    }

    /// Every checkpoint, opened for `use`, oldest first. One that cannot be read is
    /// left out (and named in `failures`).
    public func openAll(use: ChangeBitmap.Use) -> (bitmaps: [ChangeBitmap], failures: [String]) {
        var bitmaps: [ChangeBitmap] = []
        var failures: [String] = []
        for name in names() {
            do {
                bitmaps.append(try ChangeBitmap.open(path: file(name), name: name, use: use))
            } catch {
                failures.append("\(name): \(error)")
            }
        }
        return (bitmaps, failures)
    }

    public func remove(_ name: String) throws(ChangeBitmap.Failure) {
        guard unlink(file(name)) == 0 else {
            if errno == ENOENT { throw .malformed("no checkpoint \(name)") }
            throw .io("cannot remove \(file(name)): \(String(cString: strerror(errno)))")
        }
    }

    /// What the host shows of a checkpoint.
    public static func describe(_ bitmap: ChangeBitmap, disk: String, createdAt: String) -> CheckpointInfo {
        CheckpointInfo(name: bitmap.name, disk: disk, granularity: bitmap.granularity, createdAt: createdAt,
                       changedBytes: bitmap.changedBytes, inconsistency: bitmap.inconsistency, frozen: bitmap.isFrozen)
    }
}

/// Where a worker puts a point-in-time snapshot while it copies it: below the source
/// disk's state (the one place both the host and the confined worker may write), as
/// `.snapshots/NAME/data.img` and `.snapshots/NAME/checkpoints/`. Once the copy is
/// complete the host moves them to the new disk's places.
public struct SnapshotStaging: Sendable {
    public let path: String

    public init(diskState: String, name: String) { path = "\(diskState)/.snapshots/\(name)" }

    public var data: String { path + "/data.img" }
    public var checkpoints: CheckpointDirectory { CheckpointDirectory(path: path + "/checkpoints") }
    /// Written by a worker that completed the copy as it stopped, for the host to find
    /// after the worker is gone: the snapshot's data is synced before it exists.
    var completionRecord: String { path + "/complete.json" }

    /// Records that the copy is complete (and how it went), durably; false if the
    /// staging directory is gone (the host moved the snapshot into place already).
    public func recordCompletion(_ progress: SnapshotProgress) -> Bool {
        guard let json = try? JSONEncoder().encode(progress) else { return false }
        let temporary = completionRecord + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return false }
        let error = json.withUnsafeBytes { FileDescriptorIO.pwriteAll(fd, $0.baseAddress!, count: $0.count, offset: 0) }
        let synced = error == 0 && fsync(fd) == 0
        close(fd)
        guard synced, rename(temporary, completionRecord) == 0 else {
            unlink(temporary)
            return false
        }
        return true
    }

    /// The copy a worker recorded complete, if it did.
    public var recordedCompletion: SnapshotProgress? {
        guard let data = FileManager.default.contents(atPath: completionRecord) else { return nil }
        return try? JSONDecoder().decode(SnapshotProgress.self, from: data)
    }

    /// Removes what a snapshot that failed (or was never completed) left.
    public func remove() {
        unlink(completionRecord)
        for name in Directory.entries(checkpoints.path) { unlink("\(checkpoints.path)/\(name)") }
        rmdir(checkpoints.path)
        unlink(data)
        rmdir(path)
    }
}
