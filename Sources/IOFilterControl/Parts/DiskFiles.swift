import Foundation

/// The disks' files: each image and its filters' sidecar state, where the layout puts
/// them. The records about them are the state store's; this is the part on disk.
struct DiskFiles: Sendable {
    let layout: StateLayout

    /// A new, sparse image of `size` bytes at `path`; never over an existing file.
    func createSparse(_ path: String, size: Int64) throws(ControlError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw .internalError("cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let reason = String(cString: strerror(errno))
            unlink(path)
            throw .conflict("cannot size \(path) to \(size) bytes: \(reason)")
        }
    }

    /// Removes disk `name`'s image (at `path`) and its filters' sidecar state.
    func remove(_ name: String, path: String) {
        unlink(path)
        try? FileManager.default.removeItem(atPath: layout.diskState(name))
    }

    /// Whether `path` lies in the host's state directory (after resolving links): files
    /// a filter wrote there for the host go with their disk.
    func isInsideStateDirectory(_ path: String) -> Bool {
        let state = (layout.root as NSString).resolvingSymlinksInPath
        let directory = ((path as NSString).deletingLastPathComponent as NSString).resolvingSymlinksInPath
        return directory == state || directory.hasPrefix(state + "/")
    }
}
