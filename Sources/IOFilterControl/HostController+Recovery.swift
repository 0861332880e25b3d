import Foundation
import Glibc
import IOFilterHost
import IOFilterModel
import IOFilterPosix

/// What an earlier host leaves behind, and how the next start takes it up or clears it.
///
/// A VM's worker and a partner daemon outlive their host (a crash, an upgrade of the
/// host, `systemctl restart`): each is recorded, with what it was started from, under
/// run/workers/, and listens there for the next host. That host finds them at start,
/// reattaches to each one it would start the same way (the VM's clients see nothing),
/// and stops the others cleanly (their filters flush and close) before starting anew.
///
/// A marker file says the host is running; a clean shutdown removes it. At the next
/// start a marker still present means the last run ended abruptly (killed, crashed,
/// power lost): that is recorded as an event, any other worker process of that run still
/// alive (an offline or maintenance worker, found by its working directory inside this
/// state directory) is killed, and the scratch space of offline and maintenance
/// workers is emptied.
extension HostController {
    /// Called once at start, before any VM is resumed.
    public func recoverFromPreviousRun() {
        let unclean = FileManager.default.fileExists(atPath: layout.runningMarker)
        findLeftovers()
        let killed = killLeftoverWorkers()
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
        let serving = leftovers.withLock { $0.count }
        if unclean || !killed.isEmpty {
            let what = [
                unclean ? "the previous run of iofilterd did not stop cleanly" : "the previous run stopped cleanly",
                serving == 0 ? nil : "\(serving) worker(s) and daemon(s) it started serve on",
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

    /// The processes an earlier host recorded that still run, to be adopted by
    /// `resume` and `startDaemons` or stopped by `settleLeftovers`.
    private func findLeftovers() {
        var found: [String: LeftoverProcess] = [:]
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: layout.continuity)) ?? [] where entry.hasSuffix(".record") {
            let who = String(entry.dropLast(".record".count))
            if let leftover = LeftoverProcess.find(recordPath: layout.record(who)) { found[who] = leftover }
        }
        leftovers.withLock { $0 = found }
    }

    /// The leftover process recorded as `who` (`vm-NAME`, `daemon-PLUGIN`), taken: the
    /// caller adopts it or stops it.
    func takeLeftover(_ who: String) -> LeftoverProcess? {
        leftovers.withLock { $0.removeValue(forKey: who) }
    }

    /// Called once at start, after VMs were resumed and daemons started: what nobody
    /// adopted (a VM stopped meanwhile, `--no-resume`, a plug-in removed) is stopped
    /// cleanly, and snapshot copies left unfinished are taken up or removed.
    public func settleLeftovers() {
        let unadopted = leftovers.withLock { all in
            defer { all = [:] }
            return all
        }
        for (who, leftover) in unadopted {
            leftover.stop(timeout: 20, logger: logger)
            event("leftover-stopped", who, "process \(leftover.record.pid), left serving by the previous run, is not wanted now: stopped cleanly")
        }
        settleUnfinishedSnapshots()
    }

    /// Adopts the worker an earlier host left serving VM `row.name`, if it serves what
    /// this host would start; stops it cleanly otherwise. Call under the change lock.
    func adoptLeftoverWorker(of row: VMRow) -> VMSession? {
        guard let leftover = takeLeftover("vm-\(row.name)") else { return nil }
        let name = row.name
        do {
            var disks: [(row: DiskRow, filters: [PlannedFilter], readOnly: Bool)] = []
            for disk in row.disks {
                let found = try store.read { db in try self.diskRow(disk, db) }
                disks.append((found, try desiredChain(found), false))
            }
            let vhostUserBlk = row.vhostUserBlk == true
            let configuration = workerConfiguration(name: name, directory: layout.vm(name), disks: disks, limits: row.limits, tls: row.tls,
                                                    vhostUserBlk: vhostUserBlk)
            let hooks = sessionHooks(name)
            return try VMSession.adopt(leftover, configuration: configuration, socketPaths: row.disks.map { "\(layout.vm(name))/\($0).sock" },
                                       vhostUserPaths: row.disks.map { vhostUserBlk ? layout.vhostUserSocket(vm: name, disk: $0) : nil },
                                       controlSocket: layout.controlSocket("vm-\(name)"), recordPath: layout.record("vm-\(name)"),
                                       backoffLimit: restartBackoffLimit, logger: hooks.logger, daemonChannels: hooks.daemonChannels,
                                       onEvent: hooks.onEvent)
        } catch {
            logger.warning("cannot adopt worker \(leftover.record.pid) of VM \(name) (\(error)): stopping it cleanly and starting a new one")
            leftover.stop(timeout: 20, logger: logger)
            event("worker-not-adopted", name, "worker \(leftover.record.pid) left serving by the previous run: \(error); stopped it cleanly")
            return nil
        }
    }

    /// Worker processes whose working directory lies in this state directory and that no
    /// supervisor of this process started, nor an earlier host left serving for the
    /// next: SIGKILLed, and waited for (up to 5 s).
    func killLeftoverWorkers() -> [pid_t] {
        let me = getpid()
        let serving = leftovers.withLock { Array($0.values) }
        var found: [pid_t] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = pid_t(entry), pid != me, !serving.contains(where: { $0.owns(pid) }) else { continue }
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
        guard let state = ProcessStat(pid)?.state else { return false }
        return state != "Z"
    }
}
