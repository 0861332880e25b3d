import Foundation
import Glibc

/// What a host that did not stop cleanly leaves behind, and how the next start clears it.
///
/// A marker file says the host is running; a clean shutdown removes it. At the next
/// start a marker still present means the last run ended abruptly (killed, crashed,
/// power lost): that is recorded as an event, any worker process of that run still
/// alive is killed (found by its working directory, which is always inside this state
/// directory), and the scratch space of offline and maintenance workers is emptied.
extension HostController {
    /// Called once at start, before any VM is resumed.
    public func recoverFromPreviousRun() {
        let unclean = FileManager.default.fileExists(atPath: layout.runningMarker)
        let killed = killLeftoverWorkers()
        removeUnfinishedSnapshots()
        var removed = 0
        for directory in layout.scratchDirectories {
            for entry in (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [] {
                if (try? FileManager.default.removeItem(atPath: "\(directory)/\(entry)")) != nil { removed += 1 }
            }
        }
        if let walker = FileManager.default.enumerator(atPath: layout.plugins) {
            while let relative = walker.nextObject() as? String {
                let path = "\(layout.plugins)/\(relative)"
                if relative.hasSuffix(".so") {
                    // Installed by a release whose workers ran as root (0500): readable
                    // now by the identities workers run as.
                    chmod(path, PluginCatalogue.installedMode)
                }
                guard relative.hasSuffix(".partial") else { continue }
                if (try? FileManager.default.removeItem(atPath: path)) != nil { removed += 1 }
            }
        }
        if unclean || !killed.isEmpty {
            let what = [
                unclean ? "the previous run of iofilterd did not stop cleanly" : "the previous run stopped cleanly",
                killed.isEmpty ? nil : "killed \(killed.count) leftover worker(s) (pid \(killed.map(String.init).joined(separator: ", ")))",
                removed == 0 ? nil : "removed \(removed) leftover scratch item(s)",
            ].compactMap { $0 }.joined(separator: "; ")
            logger.warning("\(what)")
            event("host-recovered", "host", what)
        }
        _ = FileManager.default.createFile(atPath: layout.runningMarker, contents: Data("\(getpid())\n".utf8))
    }

    /// Marks a clean stop (after every worker stopped).
    func markCleanStop() {
        unlink(layout.runningMarker)
    }

    /// Worker processes whose working directory lies in this state directory and that no
    /// supervisor of this process started: SIGKILLed, and waited for (up to 5 s).
    func killLeftoverWorkers() -> [pid_t] {
        let me = getpid()
        var found: [pid_t] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry), pid != me else { continue }
            guard let executable = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/exe"),
                  (executable as NSString).lastPathComponent.hasPrefix("iofilter-worker"),
                  let directory = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"),
                  directory == stateDirectory || directory.hasPrefix(stateDirectory + "/")
            else { continue }
            kill(pid, SIGKILL)
            found.append(pid)
        }
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, found.contains(where: { Self.isAlive($0) }) { usleep(20_000) }
        return found
    }

    /// Still running (a zombie waiting for a parent that is not us counts as gone).
    static func isAlive(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(after: close)...].split(separator: " ").first != "Z"
    }
}
