import Foundation

/// The installed plug-ins' files: each version's validated copy, and its signature,
/// under `directory/NAME/VERSION`. A plug-in is copied in (staged) before it is checked,
/// so that what was validated and verified is exactly what gets installed; only then is
/// the copy moved into place.
struct PluginCatalogue: Sendable {
    let directory: String

    /// Read and map for everyone who can reach it: workers run as identities of their
    /// own; the state directory (0700) keeps everyone else out.
    static let installedMode: mode_t = 0o555

    /// A private copy of `path` to check; remove it with `discard` if it is not installed.
    func stage(_ path: String) throws(ControlError) -> String {
        let staged = "\(directory)/.staged-\(UUID().uuidString).so"
        do {
            try FileManager.default.copyItem(atPath: path, toPath: staged)
        } catch {
            throw .internalError("cannot copy \(path) into \(directory): \(error)")
        }
        guard chmod(staged, Self.installedMode) == 0 else {
            unlink(staged)
            throw .internalError("cannot make \(staged) readable to the validator")
        }
        return staged
    }

    func discard(_ staged: String) { unlink(staged) }

    /// Where a version lives once installed.
    func versionDirectory(_ name: String, _ version: String) -> String { "\(directory)/\(name)/\(version)" }

    /// Moves a checked copy into place, with its signature; returns the installed path.
    /// Nothing is left behind if it fails.
    func install(staged: String, name: String, version: String, signature: Data?) throws(ControlError) -> String {
        let versionDirectory = versionDirectory(name, version)
        let destination = "\(versionDirectory)/lib\(name).so"
        do {
            try FileManager.default.createDirectory(atPath: versionDirectory, withIntermediateDirectories: true)
        } catch {
            throw .internalError("cannot create \(versionDirectory): \(error)")
        }
        if let signature, !FileManager.default.createFile(atPath: destination + ".sig", contents: signature) {
            try? FileManager.default.removeItem(atPath: versionDirectory)
            throw .internalError("cannot write \(destination).sig")
        }
        guard rename(staged, destination) == 0 else {
            let reason = String(cString: strerror(errno))
            try? FileManager.default.removeItem(atPath: versionDirectory)
            throw .internalError("cannot move the validated copy into \(versionDirectory): \(reason)")
        }
        return destination
    }

    /// Removes one installed version's files (a row that could not be recorded, or a
    /// version removed).
    func remove(_ name: String, version: String) {
        try? FileManager.default.removeItem(atPath: versionDirectory(name, version))
    }

    /// Removes what is left of a plug-in whose last version went.
    func removeAll(_ name: String) {
        try? FileManager.default.removeItem(atPath: "\(directory)/\(name)")
    }
}
