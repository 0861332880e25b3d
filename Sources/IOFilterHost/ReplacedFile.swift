import Foundation

/// Puts `data` at `path` (mode 0600) in one step: written beside it, then renamed over
/// it, so that a reader, or a writer killed halfway, finds the old file or the new and
/// never part of one. Each process writes a temporary of its own: two writing at once
/// do not mix.
@discardableResult
func replaceFile(at path: String, with data: Data) -> Bool {
    let temporary = "\(path).partial-\(getpid())"
    guard FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o600]) else { return false }
    guard rename(temporary, path) == 0 else {
        unlink(temporary)
        return false
    }
    return true
}
