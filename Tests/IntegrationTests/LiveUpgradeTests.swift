import Foundation
import IOFilterAPI
import IOFilterModel
import Testing

/// Live drills: a running VM's filters upgraded 20 times and its policy changed 20
/// times while real clients write and verify — a libnbd client on one connection that
/// is never reopened, and fio with crc32c verify. Each change starts a new worker that
/// takes the clients over (their sockets and negotiated state, over SCM_RIGHTS): no
/// client may see an error, a reconnect or a wrong byte. Then the faults: a filter's
/// veto, a new chain that cannot open, either worker killed mid-hand-over, two changes
/// at once — each ends with exactly one worker serving and nothing flushed lost.
@Suite("live upgrades: filters and policies changed under running clients", .serialized)
struct LiveUpgradeTests {
    let directory = Harness.temporaryDirectory("live")
    static let python = "/usr/bin/python3"
    static let script = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/liveclient.py").path
    static let drills = 20

    struct Summary: Decodable {
        let rounds: Int
        let errors: [String]
        let slowest: [Double]
        let p50: Double
        let p99: Double
    }

    /// The libnbd client of liveclient.py, writing and reading back in [offset, offset+span).
    final class LiveClient {
        let process = Process()
        let output = Pipe()
        let stop: String

        init(_ uri: String, offset: Int, span: Int, directory: URL) throws {
            stop = directory.appendingPathComponent("stop-\(UUID().uuidString)").path
            process.executableURL = URL(fileURLWithPath: LiveUpgradeTests.python)
            process.arguments = [LiveUpgradeTests.script, uri, "\(offset)", "\(span)", stop]
            process.standardOutput = output
            try process.run()
        }

        func finish() throws -> Summary {
            _ = FileManager.default.createFile(atPath: stop, contents: nil)
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return try JSONDecoder().decode(Summary.self, from: data)
        }
    }

    /// fio with crc32c verify, run after run on the disk's upper half until `stop`
    /// exists; the shell loop ends with fio's status at its first failure.
    func startVerifyingWriter(_ uri: String, stop: String) throws -> Process {
        let fio = "\(Harness.tool("fio")) --name=verify --ioengine=nbd --uri='\(uri)' --rw=randwrite --bs=4k --iodepth=8 "
            + "--offset=32M --size=32M --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=3 --output=/dev/null"
        let loop = Process()
        loop.executableURL = URL(fileURLWithPath: "/bin/sh")
        loop.arguments = ["-c", "runs=0; while [ ! -e '\(stop)' ]; do \(fio) || { echo \"fio failed in run $runs\" >&2; exit 1; }; runs=$((runs+1)); done; echo $runs"]
        loop.standardOutput = Pipe()
        try loop.run()
        return loop
    }

    func plugin(_ version: String, behaviour: String? = nil) throws -> String {
        try Harness.buildTestPlugin("filter-\(version)", defines: ["PLUGIN_VERSION=\"\(version)\""], in: directory)
    }

    /// A VM `v` with a 64 MiB disk `d` under policy `p` (the test plug-in with `behaviour`).
    func runningVM(_ daemon: Daemon, behaviour: String = "pass") throws -> VMInfo {
        try daemon.ok(["plugin", "install", try plugin("1.0.0")])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter:behaviour=\(behaviour)"])
        try daemon.ok(["disk", "create", "d", "--size", "64M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        return try daemon.json(["vm", "start", "v"])
    }

    /// The VM workers of a daemon's state directory: each is a process (the host's
    /// child, or an adopted one) with the init of its pid namespace below it, which works
    /// in the VM's directory; the outer process counts.
    static func workers(of daemon: Daemon) -> [pid_t] {
        ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { pid_t($0) }.compactMap { pid in
            guard let directory = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/cwd"),
                  directory.hasPrefix(daemon.state.appendingPathComponent("vms").path),
                  let command = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8),
                  command.contains("iofilter-worker"), command.contains("serve"),
                  let fields = Harness.statFields("/proc/\(pid)/stat"), fields.count > 1 else { return nil }
            return pid_t(fields[1])
        }.sorted()
    }

    func sidecar(_ daemon: Daemon, _ file: String) -> String {
        daemon.state.appendingPathComponent("disks/d.state/org.test.filter/\(file)").path
    }

    @Test func twentyUpgradesAndTwentyPolicyChangesWithoutAClientNoticing() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let vm = try runningVM(daemon)
        let uri = try #require(vm.uris["d"])
        try daemon.ok(["policy", "create", "deferring", "--filter", "org.test.filter:behaviour=defer"])
        // Flushed before the drills, checked after them.
        _ = try Harness.qemuIO(uri, ["write -P 0x5a 16M 1M", "flush"])
        let client = try LiveClient(uri, offset: 0, span: 8 << 20, directory: directory)
        let stopWriter = directory.appendingPathComponent("stop-fio").path
        let writer = try startVerifyingWriter(uri, stop: stopWriter)
        usleep(500_000)

        var stalls: [Double] = []
        var pids: [pid_t] = [try #require(vm.pid)]
        for drill in 1...Self.drills {
            try daemon.ok(["plugin", "install", try plugin("1.\(drill).0")])
            let report: LiveUpgradeReport = try daemon.json(["vm", "upgrade-filters", "v"])
            #expect(report.changes == ["d: org.test.filter 1.\(drill - 1).0 → 1.\(drill).0"], "\(report)")
            #expect(report.clients >= 1, "the libnbd client at least was handed over: \(report)")
            stalls.append(report.stallMilliseconds)
            pids.append(try #require(report.pid))
        }
        for drill in 1...Self.drills {
            try daemon.ok(["disk", "assign-policy", "d", drill % 2 == 1 ? "deferring" : "p"])
            let compliance: Compliance = try daemon.json(["disk", "compliance", "d"])
            #expect(compliance.status == .compliant, "drill \(drill): \(compliance)")
            let shown: VMInfo = try daemon.json(["vm", "show", "v"])
            pids.append(try #require(shown.pid))
        }
        _ = FileManager.default.createFile(atPath: stopWriter, contents: nil)
        writer.waitUntilExit()
        let summary = try client.finish()
        #expect(writer.terminationStatus == 0, "fio's verify failed during the drills")
        #expect(summary.errors.isEmpty, "\(summary.errors)")
        #expect(summary.rounds > 100)
        print("live drills: host-side stalls (ms) \(stalls.sorted().map { String(format: "%.1f", $0) }.joined(separator: " "))")
        print("live drills: client rounds \(summary.rounds), p50 \(summary.p50) ms, p99 \(summary.p99) ms, slowest \(summary.slowest.prefix(12))")

        // Each drill left one worker: every earlier one is gone.
        #expect(Set(pids).count == pids.count, "every change was made by a new worker")
        for pid in pids.dropLast() { #expect(Harness.isGone(pid), "worker \(pid) still runs") }
        #expect(Self.workers(of: daemon) == [pids.last!])
        // The filters heard of each upgrade, old and new version.
        let log = try String(contentsOfFile: sidecar(daemon, "events.log"), encoding: .utf8)
        #expect(log.contains("upgrade 1.0.0 1.1.0\n") && log.contains("upgrade 1.19.0 1.20.0\n"), "\(log)")
        #expect(try daemon.ok(["events"]).contains("filters-changed-live"))
        try daemon.ok(["vm", "stop", "v"])
        _ = try Harness.qemuIO("file:" + daemon.state.appendingPathComponent("disks/d.img").path, ["read -P 0x5a 16M 1M"])
    }

    /// iofilterd restarted 20 times under the same clients (killed -9, or told to leave
    /// with SIGQUIT as the systemd unit does): the worker and the partner daemon serve
    /// on, the new host adopts them, and the clients see nothing.
    @Test func twentyHostRestartsWithoutAClientNoticing() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let vm = try runningVM(daemon)
        let uri = try #require(vm.uris["d"])
        let withDaemon = try Harness.buildTestPlugin("with-daemon", defines: ["WITH_DAEMON", "PLUGIN_NAME=\"org.test.daemon\"", "DAEMON_LISTENS"],
                                                     in: directory)
        try daemon.ok(["plugin", "install", withDaemon, "--daemon-listen", "127.0.0.1:0"])
        func partner() throws -> DaemonStatus {
            let plugins: [PluginInfo] = try daemon.json(["plugin", "list"])
            return try #require(plugins.first { $0.name == "org.test.daemon" }?.daemon)
        }
        let before = try partner()
        #expect(before.state == .running && before.listen != nil, "\(before)")
        _ = try Harness.qemuIO(uri, ["write -P 0x6b 16M 1M", "flush"])
        let client = try LiveClient(uri, offset: 0, span: 8 << 20, directory: directory)
        let stopWriter = directory.appendingPathComponent("stop-fio-restarts").path
        let writer = try startVerifyingWriter(uri, stop: stopWriter)
        usleep(500_000)

        for restart in 1...Self.drills {
            if restart % 2 == 0 { daemon.leave() } else { daemon.kill(SIGKILL) }
            try daemon.start()
            let shown: VMInfo = try daemon.json(["vm", "show", "v"])
            #expect(shown.state == .running && shown.pid == vm.pid && shown.restarts == 0, "restart \(restart): \(shown)")
            #expect(shown.filters.first?.filters.first?.version == "1.0.0", "the adopted worker answers the new host: \(shown)")
            let now = try partner()
            #expect(now.pid == before.pid && now.listen == before.listen, "restart \(restart): \(now)")
        }
        _ = FileManager.default.createFile(atPath: stopWriter, contents: nil)
        writer.waitUntilExit()
        let summary = try client.finish()
        #expect(writer.terminationStatus == 0, "fio's verify failed during the restarts")
        #expect(summary.errors.isEmpty, "\(summary.errors)")
        print("host restarts: client rounds \(summary.rounds), p50 \(summary.p50) ms, p99 \(summary.p99) ms, slowest \(summary.slowest.prefix(8))")
        #expect(Self.workers(of: daemon) == [try #require(vm.pid)])
        let events = try daemon.ok(["events"])
        #expect(events.contains("vm-adopted") && events.contains("daemon-adopted") && events.contains("host-left"), "\(events)")
        // The adopted worker is supervised as the host's own: killed, it comes back.
        kill(try #require(vm.pid), SIGKILL)
        let back = try Self.waitForNewWorker(daemon, replacing: vm.pid)
        #expect(back.restarts == 1)
        #expect(try daemon.ok(["events"]).contains("started it) (filters: org.test.filter); restarting"))
        try daemon.ok(["vm", "stop", "v"])
        _ = try Harness.qemuIO("file:" + daemon.state.appendingPathComponent("disks/d.img").path, ["read -P 0x6b 16M 1M"])
    }

    /// What a host cannot adopt it stops cleanly or leaves alone, never wrongly.
    @Test func whatTheNextHostCannotAdoptItStopsCleanly() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let vm = try runningVM(daemon, behaviour: "slow-close")
        let uri = try #require(vm.uris["d"])
        _ = try Harness.qemuIO(uri, ["write -P 0x21 0 1M", "flush"])

        // The worker died while no host watched: the next host starts a new one.
        daemon.kill(SIGKILL)
        kill(try #require(vm.pid), SIGKILL)
        #expect(Harness.isGone(vm.pid!))
        try daemon.start()
        let fresh: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(fresh.state == .running && fresh.pid != vm.pid)
        #expect(try daemon.ok(["events"]).contains("vm-resumed"))

        // A host that would start the worker otherwise (another watchdog): the old one
        // is stopped the way a host stops its own (its filters close), a new one serves.
        daemon.kill(SIGKILL)
        unlink(sidecar(daemon, "closing"))
        try daemon.start(["--watchdog", "7"])
        let changed: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(changed.pid != fresh.pid && Harness.isGone(fresh.pid!), "\(changed)")
        #expect(try daemon.ok(["events"]).contains("worker-not-adopted"))
        #expect(FileManager.default.fileExists(atPath: sidecar(daemon, "closing")), "the filter was closed, not killed")
        _ = try Harness.qemuIO(uri, ["read -P 0x21 0 1M"])

        // --no-resume: nothing is adopted, and what was left serving stops cleanly.
        daemon.leave()
        try daemon.start(["--watchdog", "7", "--no-resume"])
        #expect(Harness.isGone(changed.pid!))
        let stopped: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(stopped.state == .stopped)
        #expect(try daemon.ok(["events"]).contains("leftover-stopped"))

        // A record whose pid now names another process (reused since): never adopted,
        // never signalled.
        daemon.stop()
        let bystander = Process()
        bystander.executableURL = URL(fileURLWithPath: "/bin/sleep")
        bystander.arguments = ["30"]
        try bystander.run()
        defer { Harness.end(bystander) }
        let record = daemon.state.appendingPathComponent("run/workers/vm-v.record").path
        try #"{"pid":\#(bystander.processIdentifier),"startTime":1,"key":"{}"}"#.write(toFile: record, atomically: true, encoding: .utf8)
        try daemon.start()
        #expect(!Harness.isGone(bystander.processIdentifier, within: 0.5), "the bystander lives")
        let left = (try? String(contentsOfFile: record, encoding: .utf8)) ?? ""
        #expect(!left.contains("\"pid\":\(bystander.processIdentifier)"), "the stale record is gone: \(left)")
    }

    /// Waits until the VM's worker is a new one that serves.
    static func waitForNewWorker(_ daemon: Daemon, replacing old: pid_t?) throws -> VMInfo {
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            if let vm: VMInfo = try? daemon.json(["vm", "show", "v"]), vm.state == .running, let pid = vm.pid, pid != old { return vm }
            usleep(100_000)
        }
        throw HarnessError("no new worker within 30s: \(daemon.log.suffix(2000))")
    }

    @Test func faultsEndWithOneWorkerServingAndNothingLost() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let vm = try runningVM(daemon)
        let uri = try #require(vm.uris["d"])
        _ = try Harness.qemuIO(uri, ["write -P 0x33 16M 1M", "flush"])

        // A filter that vetoes: refused with its reason, the same worker serves.
        try daemon.ok(["policy", "create", "vetoing", "--filter", "org.test.filter:behaviour=veto-upgrade"])
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "assign-policy", "d", "vetoing"])
        let vetoing: VMInfo = try daemon.json(["vm", "start", "v"])
        try daemon.ok(["plugin", "install", try plugin("1.1.0")])
        #expect(try daemon.refused(["vm", "upgrade-filters", "v"]).contains("vetoed the live change of the chain of disk d"))
        let kept: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(kept.pid == vetoing.pid && kept.filters.first?.filters.first?.version == "1.0.0", "\(kept)")

        // The vetoing filter refuses a policy change as well; stopped, the VM takes it.
        #expect(try daemon.refused(["disk", "assign-policy", "d", "p"]).contains("vetoed"))
        #expect((try daemon.json(["disk", "show", "d"]) as DiskInfo).policy == "vetoing")
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "assign-policy", "d", "p"])
        #expect((try daemon.json(["vm", "start", "v"]) as VMInfo).filters.first?.filters.first?.version == "1.1.0")
        // A libnbd client on one connection from here on.
        let steady = try LiveClient(uri, offset: 0, span: 4 << 20, directory: directory)
        usleep(300_000)

        // A plug-in that fails validation never gets that far.
        let broken = directory.appendingPathComponent("broken.so").path
        try Data("not a shared object".utf8).write(to: URL(fileURLWithPath: broken))
        #expect(try daemon.cli(["plugin", "install", broken]).status != 0)
        #expect(try daemon.ok(["vm", "upgrade-filters", "v"]).contains("nothing changed"))

        // A new chain whose filter cannot open: a worker with the old chain takes the
        // clients, the policy stays, the client notices nothing.
        try daemon.ok(["policy", "create", "refusing", "--filter", "org.test.filter:behaviour=refuse-open"])
        #expect(try daemon.refused(["disk", "assign-policy", "d", "refusing"]).contains("goes on with its old chain"))
        #expect((try daemon.json(["disk", "show", "d"]) as DiskInfo).policy == "p")
        #expect(Self.workers(of: daemon).count == 1)

        // Two changes at once: one makes it, the other finds nothing left to do.
        try daemon.ok(["plugin", "install", try plugin("1.2.0")])
        let first = Process(), second = Process()
        for process in [first, second] {
            process.executableURL = URL(fileURLWithPath: Harness.iofilter)
            process.arguments = ["vm", "upgrade-filters", "v", "--json", "--socket", daemon.socket]
            process.standardOutput = Pipe()
            try process.run()
        }
        first.waitUntilExit()
        second.waitUntilExit()
        #expect(first.terminationStatus == 0 && second.terminationStatus == 0)
        let reports = try [first, second].map {
            try JSONDecoder().decode(LiveUpgradeReport.self, from: ($0.standardOutput as! Pipe).fileHandleForReading.readDataToEndOfFile())
        }
        #expect(reports.filter { !$0.changes.isEmpty }.count == 1, "\(reports)")
        #expect(Self.workers(of: daemon).count == 1)
        let summary = try steady.finish()
        #expect(summary.errors.isEmpty, "\(summary.errors)")

        // The new worker killed while the old one closes its filters: its supervisor
        // starts it again, standing by, or a worker with the old chain takes over.
        try daemon.ok(["policy", "create", "slow", "--filter", "org.test.filter:behaviour=slow-close"])
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["disk", "assign-policy", "d", "slow"])
        let slow: VMInfo = try daemon.json(["vm", "start", "v"])
        let survivor = try LiveClient(uri, offset: 0, span: 4 << 20, directory: directory)
        usleep(300_000)
        try daemon.ok(["plugin", "install", try plugin("1.3.0")])
        let upgrade = try upgradeInBackground(daemon)
        try waitFor(sidecar(daemon, "closing"))
        let standby = Self.workers(of: daemon).filter { $0 != slow.pid }
        #expect(standby.count == 1, "one worker stands by: \(standby)")
        for pid in standby { kill(pid, SIGKILL) }
        upgrade.waitUntilExit()
        let afterNewKilled: VMInfo = try daemon.json(["vm", "show", "v"])
        let serving = try #require(afterNewKilled.pid)
        #expect(afterNewKilled.state == .running && Self.workers(of: daemon) == [serving])
        let survived = try survivor.finish()
        #expect(survived.errors.isEmpty, "the clients went to whichever worker took over: \(survived.errors)")

        // The old worker killed mid-hand-over: its clients lose their connection (their
        // sockets die with it), and the new worker serves whoever comes next.
        try FileManager.default.removeItem(atPath: sidecar(daemon, "closing"))
        try daemon.ok(["plugin", "install", try plugin("1.4.0")])
        let old = serving
        let second2 = try upgradeInBackground(daemon)
        try waitFor(sidecar(daemon, "closing"))
        kill(old, SIGKILL)
        second2.waitUntilExit()
        #expect(Harness.isGone(old))
        let afterOldKilled: VMInfo = try daemon.json(["vm", "show", "v"])
        let successor = try #require(afterOldKilled.pid)
        #expect(afterOldKilled.state == .running && Self.workers(of: daemon) == [successor])
        _ = try Harness.qemuIO(uri, ["read -P 0x33 16M 1M", "write -P 0x44 20M 64k", "read -P 0x44 20M 64k"])
    }

    /// ABI 1.6 is a minor bump: plug-ins built against the 1.5 header are changed live
    /// like any other (closed here, opened in the new worker) and never hear the event
    /// their build cannot know (this one would log it as a grow). `--live` on install.
    @Test func aPluginBuiltAgainstABI15IsUpgradedLiveWithoutTheEvent() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let header = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.5").path
        func old(_ version: String) throws -> String {
            try Harness.buildTestPlugin("abi15-\(version)", defines: ["PLUGIN_VERSION=\"\(version)\""], header: header, in: directory)
        }
        #expect(try Harness.check(Harness.iofilter, ["plugin", "info", try old("1.0.0")]).contains("built for ABI 1.5 (this host speaks 1.7)"))
        try daemon.ok(["plugin", "install", try old("1.0.0")])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "d", "--size", "16M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        let client = try LiveClient(try #require(vm.uris["d"]), offset: 0, span: 1 << 20, directory: directory)
        usleep(300_000)
        let output = try daemon.ok(["plugin", "install", "--live", try old("1.1.0")])
        #expect(output.contains("VM v: d: org.test.filter 1.0.0 → 1.1.0 (1 client(s) taken over"), "\(output)")
        let summary = try client.finish()
        #expect(summary.errors.isEmpty, "\(summary.errors)")
        let shown: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(shown.filters.first?.filters.first?.version == "1.1.0")
        let log = (try? String(contentsOfFile: sidecar(daemon, "events.log"), encoding: .utf8)) ?? ""
        #expect(log.isEmpty, "a 1.5 build hears nothing of the upgrade: \(log)")
    }

    func upgradeInBackground(_ daemon: Daemon) throws -> Process {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.iofilter)
        process.arguments = ["vm", "upgrade-filters", "v", "--socket", daemon.socket]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        return process
    }

    func waitFor(_ path: String, seconds: Double = 30) throws {
        let deadline = Date().addingTimeInterval(seconds)
        while !FileManager.default.fileExists(atPath: path) {
            guard Date() < deadline else { throw HarnessError("\(path) did not appear within \(seconds)s") }
            usleep(20_000)
        }
    }
}
