import Foundation
import IOFilterAPI
import IOFilterModel
import Testing

/// What an operator can trust: health from the filters (ABI 1.4) and from lag against
/// the RPO, shown the same by the CLI, the API and /metrics, recorded as events with a
/// severity and delivered to alert subscriptions; figures that survive a worker crash;
/// an hour of history; tokens that expire; refused sign-ins on record; a 413 for an
/// oversized body; and live streams that end at once on revocation and at shutdown.
@Suite("health, alerts and history", .serialized)
struct HealthTests {
    let directory = Harness.temporaryDirectory("health")

    /// Polls `condition` every 0.1 s for up to `seconds`.
    func eventually(_ seconds: Double = 15, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if try condition() { return true }
            usleep(100_000)
        }
        return try condition()
    }

    /// A webhook receiver: an HTTP server on loopback that appends each POST's body as a
    /// line to `file` and answers 204.
    func webhookReceiver(port: UInt16, file: URL) throws -> Process {
        let script = """
            import http.server, sys
            class Hook(http.server.BaseHTTPRequestHandler):
                def do_POST(self):
                    body = self.rfile.read(int(self.headers["Content-Length"]))
                    with open(sys.argv[2], "ab") as f: f.write(body + b"\\n")
                    self.send_response(204); self.end_headers()
                def log_message(self, *args): pass
            http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Hook).serve_forever()
            """
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        process.arguments = ["-c", script, String(port), file.path]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        #expect(eventually(10) { (try? Harness.run(Harness.tool("curl"), ["-s", "-o", "/dev/null", "http://127.0.0.1:\(port)/"]).status) == 0 })
        return process
    }

    static func lines(_ file: URL) -> [String] {
        ((try? String(contentsOf: file, encoding: .utf8)) ?? "").split(separator: "\n").map(String.init)
    }

    @Test func aFilterThatDegradesIsSeenEverywhereAndAlerted() throws {
        let daemon = try Daemon(arguments: ["--sample-interval", "0.5"])
        defer { daemon.stop() }
        let hookPort = Harness.freePort()
        let hookFile = directory.appendingPathComponent("webhook.jsonl")
        let hook = try webhookReceiver(port: hookPort, file: hookFile)
        defer {
            // SIGKILL: a child of the test runner may start with SIGTERM blocked.
            kill(hook.processIdentifier, SIGKILL)
            hook.waitUntilExit()
        }
        let commandFile = directory.appendingPathComponent("command.jsonl")
        try daemon.ok(["alert", "add", "hook", "--webhook", "http://127.0.0.1:\(hookPort)/iofilter"])
        try daemon.ok(["alert", "add", "pager", "--command", "cat >> '\(commandFile.path)'", "--min-severity", "error"])
        #expect(try daemon.ok(["alert", "test", "hook"]).contains("delivered"))
        #expect(try daemon.refused(["alert", "add", "both", "--webhook", "http://x:1/", "--command", "true"]).contains("either --webhook or --command"))
        #expect(try daemon.refused(["alert", "add", "tls", "--webhook", "https://example.com/"]).contains("only http://"))

        let test = try Harness.buildTestPlugin("health", in: directory)
        try daemon.ok(["plugin", "install", test])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "d", "--size", "16M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        try daemon.ok(["vm", "start", "v"])
        #expect(try daemon.cli(["health"]).status == 0)

        // The filter says it is degraded, and its lag is three times its RPO.
        let sidecar = daemon.state.appendingPathComponent("disks/d.state/org.test.filter")
        try "degraded replica target unreachable".write(to: sidecar.appendingPathComponent("health"), atomically: true, encoding: .utf8)
        try "45 15".write(to: sidecar.appendingPathComponent("lag"), atomically: true, encoding: .utf8)
        #expect(try eventually { try daemon.cli(["health"]).status == 2 })
        let health = try daemon.ok(["health"], allowing: [2])
        #expect(health.contains("v  degraded: disk d: org.test.filter: replica target unreachable"), "\(health)")
        #expect(health.contains("lag 45s of RPO 15s"), "\(health)")
        #expect(try daemon.ok(["vm", "show", "v"]).contains("health: degraded"))
        #expect(try daemon.cli(["disk", "compliance", "d"]).stdout == "compliant\nhealth: degraded: org.test.filter: replica target unreachable\n")
        let api: HostHealth = try daemon.json(["health"], allowing: [2])
        let filter = try #require(api.vms.first?.disks.first?.filters.first)
        #expect(api.status == .degraded && filter.health.status == .degraded && filter.lagSeconds == 45 && filter.rpoSeconds == 15)
        let metrics = MetricsTests.parse(String(decoding: try daemon.http("GET", "/metrics").body, as: UTF8.self)).samples
        let labels = "disk=\"d\",plugin=\"org.test.filter\",vm=\"v\""
        #expect(metrics["iofilter_filter_health{\(labels)}"] == 1 && metrics["iofilter_vm_health{vm=\"v\"}"] == 1)
        #expect(metrics["iofilter_replication_lag_seconds{\(labels)}"] == 45 && metrics["iofilter_replication_rpo_seconds{\(labels)}"] == 15)
        let warnings = try daemon.ok(["events", "--severity", "warning"])
        #expect(warnings.contains("WARNING  filter-degraded  v/d/org.test.filter  replica target unreachable"), "\(warnings)")
        #expect(warnings.contains("WARNING  rpo-exceeded  v/d/org.test.filter  replication lag 45s is past the RPO of 15s"), "\(warnings)")
        #expect(!warnings.contains("vm-created"))
        // Warnings reach the webhook; the command only wants errors.
        #expect(eventually { Self.lines(hookFile).contains { $0.contains("\"kind\":\"filter-degraded\"") } && Self.lines(hookFile).contains { $0.contains("rpo-exceeded") } })
        let delivered = try #require(Self.lines(hookFile).first { $0.contains("filter-degraded") })
        let event = try JSONDecoder().decode(Event.self, from: Data(delivered.utf8))
        #expect(event.severity == .warning && event.subject == "v/d/org.test.filter")
        #expect(Self.lines(commandFile).isEmpty)

        // It fails: an error, for both subscriptions.
        try "failed journal lost".write(to: sidecar.appendingPathComponent("health"), atomically: true, encoding: .utf8)
        #expect(try eventually { try daemon.cli(["health"]).status == 3 })
        #expect(eventually { Self.lines(commandFile).contains { $0.contains("\"kind\":\"filter-failed\"") && $0.contains("\"severity\":\"error\"") } })
        #expect(eventually { Self.lines(hookFile).contains { $0.contains("filter-failed") } })

        // A value outside the enum counts as failed.
        try "7".write(to: sidecar.appendingPathComponent("health"), atomically: true, encoding: .utf8)
        #expect(try eventually {
            let now: HostHealth = try daemon.json(["health"], allowing: [2, 3])
            return now.vms.first?.disks.first?.filters.first?.health == HealthReport(status: .failed, reason: "")
        })

        // It recovers: info events, which neither subscription asked for.
        try FileManager.default.removeItem(at: sidecar.appendingPathComponent("health"))
        try FileManager.default.removeItem(at: sidecar.appendingPathComponent("lag"))
        #expect(try eventually { try daemon.cli(["health"]).status == 0 })
        let all = try daemon.ok(["events"])
        #expect(all.contains("INFO  filter-recovered  v/d/org.test.filter") && all.contains("INFO  rpo-met  v/d/org.test.filter"), "\(all)")
        usleep(500_000)
        #expect(!(Self.lines(hookFile) + Self.lines(commandFile)).contains { $0.contains("recovered") || $0.contains("rpo-met") })
        let subscriptions: [AlertSubscription] = try daemon.json(["alert", "list"])
        #expect(subscriptions.map(\.name) == ["hook", "pager"] && subscriptions.allSatisfy { $0.lastDeliveryAt != nil && $0.lastError == nil },
                "\(subscriptions)")
        try daemon.ok(["alert", "remove", "pager"])
        #expect(try daemon.json(["alert", "list"], as: [AlertSubscription].self).map(\.name) == ["hook"])
    }

    @Test func figuresSurviveAWorkerCrashAndTheHostKeepsTheirHistory() throws {
        let daemon = try Daemon(arguments: ["--sample-interval", "0.5"])
        defer { daemon.stop() }
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-passthrough-c")])
        try daemon.ok(["policy", "create", "p", "--filter", "org.swift-iofilter.passthrough-c"])
        try daemon.ok(["disk", "create", "d", "--size", "16M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        let uri = try #require(vm.uris["d"])
        func writes() throws -> Double {
            MetricsTests.parse(String(decoding: try daemon.http("GET", "/metrics").body, as: UTF8.self))
                .samples["iofilter_requests_total{disk=\"d\",op=\"write\",vm=\"v\"}"] ?? -1
        }
        _ = try Harness.qemuIO(uri, (0..<16).map { "write -P 0x5a \($0 * 64)k 64k" })
        usleep(1_200_000)
        let before = try writes()
        #expect(before >= 16)

        // kill -9: the new worker counts from zero, the host carries the old count over.
        let pid = try #require(vm.pid)
        kill(pid, SIGKILL)
        #expect(try eventually { let now: VMInfo = try daemon.json(["vm", "show", "v"]); return now.pid != nil && now.pid != pid })
        _ = try Harness.qemuIO(uri, (0..<8).map { "write -P 0x5b \($0 * 64)k 64k" })
        usleep(1_200_000)
        let after = try writes()
        #expect(after >= before + 8, "requests_total went from \(before) to \(after) across the restart")
        let shown: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(shown.health?.status == .degraded && shown.health?.reason.contains("restarted") == true, "\(String(describing: shown.health))")
        #expect(shown.rates?.allSatisfy { $0.readIOPS >= 0 && $0.writeIOPS >= 0 && $0.writeBytesPerSecond >= 0 } == true)
        #expect(try daemon.ok(["events", "--severity", "warning"]).contains("worker-exited"))

        // The history: points every 0.5 s, never a negative rate, the writes in them.
        let response = try daemon.http("GET", "/vms/v/history?seconds=3600")
        #expect(response.status == 200)
        let history = try JSONDecoder().decode(VMHistory.self, from: Data(response.body))
        #expect(history.intervalSeconds == 0.5 && history.points.count >= 4, "\(history.points.count) points")
        let rates = history.points.flatMap(\.disks)
        #expect(rates.allSatisfy { $0.readIOPS >= 0 && $0.writeIOPS >= 0 && $0.writeBytesPerSecond >= 0 && $0.errorsPerSecond >= 0 })
        // Every byte written, before and after the crash, is in exactly one interval.
        let written = history.points.reduce(0.0) { total, point in total + point.disks.reduce(0) { $0 + $1.writeBytesPerSecond } * point.seconds }
        #expect(abs(written - Double(24 * 65_536)) < 1, "the history holds the \(24 * 64) KiB written: \(written)")
        #expect(rates.contains { $0.writeIOPS > 0 && ($0.latencyP50Milliseconds ?? 0) > 0 && ($0.latencyP99Milliseconds ?? 0) >= ($0.latencyP50Milliseconds ?? 0) })
        #expect(try daemon.http("GET", "/vms/nope/history").status == 404)
        #expect(try daemon.http("GET", "/vms/v/history?seconds=soon").status == 400)
    }

    @Test func tokensExpireRefusalsAreEventsBodiesAreBoundedAndStreamsEnd() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        let base = "http://127.0.0.1:\(port)"
        let curl = Harness.tool("curl")
        func status(_ token: String, _ path: String = "/vms") throws -> String {
            try Harness.run(curl, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Authorization: Bearer \(token)", base + path]).stdout
        }

        #expect(try daemon.refused(["token", "create", "x", "--role", "admin", "--expires", "soon"]).contains("is not a duration"))
        let short: TokenInfo = try daemon.json(["token", "create", "short", "--role", "read-only", "--expires", "2s"])
        let secret = try #require(short.token)
        #expect(short.expiresAt != nil)
        #expect(try status(secret) == "200")
        #expect(try daemon.ok(["token", "list"]).contains(try #require(short.expiresAt)))
        usleep(2_500_000)
        let expired = try Harness.run(curl, ["-s", "-H", "Authorization: Bearer \(secret)", base + "/vms"]).stdout
        #expect(expired.contains("expired"), "\(expired)")
        // A flood of bad tokens is one event a minute per peer, saying how many.
        for _ in 0..<5 { #expect(try status("iof_not-a-token") == "401") }
        let refusals = try daemon.ok(["events", "--severity", "warning"]).split(separator: "\n").filter { $0.contains("sign-in-failed") }
        #expect(refusals.count == 1 && refusals[0].contains("127.0.0.1") && refusals[0].contains("expired"), "\(refusals)")

        // A body over 16 MiB is refused with 413 on its declared length, before it is sent.
        let admin: TokenInfo = try daemon.json(["token", "create", "admin", "--role", "admin"])
        let adminSecret = try #require(admin.token)
        let oversized = try Harness.run("/usr/bin/python3", ["-c", """
            import http.client, json, sys
            c = http.client.HTTPConnection("127.0.0.1", \(port), timeout=20)
            c.putrequest("POST", "/policies"); c.putheader("Authorization", "Bearer \(adminSecret)")
            c.putheader("Content-Type", "application/json"); c.putheader("Content-Length", str(1 << 30)); c.endheaders()
            c.send(b" " * (1 << 20))
            r = c.getresponse(); print(r.status, json.loads(r.read())["error"])
            """])
        #expect(oversized.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "413 too-large", "\(oversized.stdout) \(oversized.stderr)")

        // A live stream ends as soon as its token is revoked...
        let viewer: TokenInfo = try daemon.json(["token", "create", "viewer", "--role", "read-only"])
        func openStream(_ token: String) throws -> Process {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: curl)
            process.arguments = ["-sN", "-o", "/dev/null", "-H", "Authorization: Bearer \(token)", base + "/live"]
            try process.run()
            return process
        }
        let stream = try openStream(try #require(viewer.token))
        usleep(1_500_000)
        #expect(stream.isRunning)
        try daemon.ok(["token", "revoke", "viewer"])
        #expect(eventually(3) { !stream.isRunning }, "the stream outlived its token")
        if stream.isRunning { kill(stream.processIdentifier, SIGKILL) }

        // ...and a host that stops does not wait for the consoles left open.
        let second = try openStream(adminSecret)
        usleep(1_500_000)
        let started = Date()
        daemon.stop()
        #expect(Date().timeIntervalSince(started) < 10, "iofilterd took \(Date().timeIntervalSince(started))s to stop with a console open")
        #expect(eventually(3) { !second.isRunning })
        if second.isRunning { kill(second.processIdentifier, SIGKILL) }
    }
}

extension HealthTests {
    /// A plug-in built against the ABI 1.3 header (no `health` callback) still loads and
    /// serves under a 1.4 host: it is ok while its worker answers, and its lag against
    /// its RPO (statistics, which 1.3 has) still counts.
    @Test func aPluginBuiltAgainstABI13LoadsAndIsJudgedByItsStatistics() throws {
        let daemon = try Daemon(arguments: ["--sample-interval", "0.5"])
        defer { daemon.stop() }
        let old = try Harness.buildTestPlugin("abi13", header: Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.3").path,
                                              in: directory)
        try daemon.ok(["plugin", "install", old])
        let info = try Harness.check(Harness.iofilter, ["plugin", "info", old])
        #expect(info.contains("built for ABI 1.3 (this host speaks 1.7)") && info.contains("callbacks: load, attach, done, event, stats\n"), "\(info)")
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "d", "--size", "8M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        #expect(try Harness.qemuIO(try #require(vm.uris["d"]), ["write -P 0x13 0 64k", "read -P 0x13 0 64k"]).contains("read 65536/65536"))
        // Its health file means nothing to a 1.3 build: it cannot say.
        let sidecar = daemon.state.appendingPathComponent("disks/d.state/org.test.filter")
        try "failed it cannot say this".write(to: sidecar.appendingPathComponent("health"), atomically: true, encoding: .utf8)
        usleep(1_200_000)
        #expect(try daemon.cli(["health"]).status == 0)
        try "30 10".write(to: sidecar.appendingPathComponent("lag"), atomically: true, encoding: .utf8)
        #expect(try eventually { try daemon.cli(["health"]).status == 2 })
        #expect(try daemon.ok(["health"], allowing: [2]).contains("lag 30s is past the RPO of 10s"))
    }
}

extension HealthTests {
    /// The replication sample, as an operator meets it: its replica out of reach, the VM
    /// is degraded with the reason and how much is not yet shipped, not a green
    /// "running"; once the replica answers and catches up, it recovers.
    @Test func anUnreachableReplicaDegradesTheVMUntilItCatchesUp() throws {
        let daemon = try Daemon(arguments: ["--sample-interval", "0.5"])
        defer { daemon.stop() }
        let socket = directory.appendingPathComponent("replica.sock").path
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-replication")])
        try daemon.ok(["policy", "create", "dr", "--filter", "org.swift-iofilter.replication:target=nbd+unix:///?socket=\(socket),rpo-seconds=2"])
        try daemon.ok(["disk", "create", "d", "--size", "16M", "--policy", "dr"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        _ = try Harness.qemuIO(try #require(vm.uris["d"]), ["write -P 0x77 0 4M"])
        #expect(try eventually(20) { try daemon.cli(["health"]).status == 2 })
        let health = try daemon.ok(["health", "v"], allowing: [2])
        #expect(health.contains("org.swift-iofilter.replication") && health.contains("unreachable") && health.contains("not yet on the replica"),
                "\(health)")
        #expect(try eventually(20) { try daemon.ok(["events", "--severity", "warning"]).contains("rpo-exceeded") })

        // The replica comes up (nbdkit's memory plug-in): the journal drains, all is well.
        let replica = Process()
        replica.executableURL = URL(fileURLWithPath: Harness.tool("nbdkit"))
        replica.arguments = ["-f", "-U", socket, "memory", "16M"]
        try replica.run()
        defer {
            kill(replica.processIdentifier, SIGKILL)
            replica.waitUntilExit()
        }
        let recovered = try eventually(60) { try daemon.cli(["health"]).status == 0 }
        #expect(recovered, "\((try? daemon.ok(["health"], allowing: [2, 3])) ?? "")")
        let events = try daemon.ok(["events"])
        #expect(events.contains("filter-recovered  v/d/org.swift-iofilter.replication") && events.contains("rpo-met"), "\(events)")
    }
}
