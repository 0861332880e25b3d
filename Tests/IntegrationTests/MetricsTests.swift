import Foundation
import IOFilterAPI
import Testing

/// GET /metrics against a real host: what the workers counted is what the clients did,
/// histograms are well formed, a VM's series end with it, and it takes a token over TCP.
@Suite("metrics")
struct MetricsTests {
    /// Samples of the Prometheus text: "name{labels}" to value; and any malformed line.
    static func parse(_ text: String) -> (samples: [String: Double], malformed: [String]) {
        var samples: [String: Double] = [:], malformed: [String] = []
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...].replacingOccurrences(of: "+Inf", with: "inf")),
                  line.first?.isLetter == true
            else {
                malformed.append(String(line))
                continue
            }
            samples[String(line[..<space])] = value
        }
        return (samples, malformed)
    }

    /// The samples as prometheus-client's parser (PyPI) reads them: "name{k=v,...}".
    static func parsedByPrometheusClient(_ text: String) throws -> [String: Double] {
        let script = """
            import json, sys
            from prometheus_client.parser import text_string_to_metric_families
            out = {}
            for family in text_string_to_metric_families(sys.stdin.read()):
                for s in family.samples:
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}"] = s.value
            print(json.dumps(out))
            """
        let input = Harness.scratch.appendingPathComponent("metrics-\(UUID().uuidString).txt")
        try Data(text.utf8).write(to: input)
        let output = try Harness.check("/bin/sh", ["-c", "python3 -c '\(script)' < '\(input.path)'"])
        return try JSONDecoder().decode([String: Double].self, from: Data(output.utf8))
    }

    @Test func theHostReportsEachVMsIOAndFilters() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache")])
        try daemon.ok(["policy", "create", "cached", "--filter", "org.swift-iofilter.cache:size=8M"])
        try daemon.ok(["disk", "create", "d", "--size", "32M", "--policy", "cached"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        let vm: VMInfo = try daemon.json(["vm", "start", "v"])
        let uri = try #require(vm.uris["d"])
        // 16 writes and 32 reads of 64 KiB.
        _ = try Harness.qemuIO(uri, (0..<16).map { "write -P 0x11 \($0 * 64)k 64k" } + (0..<32).map { "read \($0 % 16 * 64)k 64k" })

        // Figures are at most a second old: the host asks each worker once for every
        // scraper and console (it sampled this one when the VM started).
        usleep(1_100_000)
        let response = try daemon.http("GET", "/metrics")
        #expect(response.status == 200 && response.header("content-type")?.hasPrefix("text/plain") == true)
        let text = String(decoding: response.body, as: UTF8.self)
        let (samples, malformed) = Self.parse(text)
        #expect(malformed.isEmpty, "\(malformed)")
        let disk = "disk=\"d\"", vmLabel = "vm=\"v\""
        #expect(samples["iofilter_requests_total{\(disk),op=\"write\",\(vmLabel)}"] == 16)
        #expect(samples["iofilter_requests_total{\(disk),op=\"read\",\(vmLabel)}"] == 32)
        #expect(samples["iofilter_bytes_total{\(disk),op=\"read\",\(vmLabel)}"] == Double(32 * 65536))
        #expect(samples["iofilter_request_duration_seconds_bucket{\(disk),le=\"+Inf\",op=\"read\",\(vmLabel)}"] == 32)
        #expect(samples["iofilter_request_duration_seconds_count{\(disk),op=\"read\",\(vmLabel)}"] == 32)
        let buckets = samples.filter { $0.key.hasPrefix("iofilter_request_duration_seconds_bucket{") && $0.key.contains("op=\"read\"") }
        #expect(buckets.count == 12)
        #expect(samples.keys.contains { $0.hasPrefix("iofilter_filter_stat{") && $0.contains("plugin=\"org.swift-iofilter.cache\"") })
        #expect(samples["iofilter_vm_up{\(vmLabel)}"] == 1)
        // The worker's start, as the host timed it: from its spawn to its READY line.
        let started = try #require(samples["iofilter_worker_start_seconds{\(vmLabel)}"])
        #expect(started > 0 && started < 60, "\(started)")
        #expect(samples["iofilterd_api_requests_total{operation=\"startVM\",status=\"200\"}"] == 1)
        #expect(text.contains("# TYPE iofilter_request_duration_seconds histogram"))
        // Prometheus' own client library reads it as we do.
        let parsed = try Self.parsedByPrometheusClient(text)
        #expect(parsed["iofilter_requests_total{disk=d,op=read,vm=v}"] == 32, "\(parsed.keys.sorted().prefix(20))")
        #expect(parsed["iofilter_request_duration_seconds_bucket{disk=d,le=+Inf,op=read,vm=v}"] == 32)

        // A restarted worker counts; a stopped VM's I/O series are gone.
        let pid = try #require(vm.pid)
        kill(pid, SIGKILL)
        var restarted: VMInfo = vm
        for _ in 0..<100 where restarted.pid == pid || restarted.restarts == 0 {
            usleep(100_000)
            restarted = try daemon.json(["vm", "show", "v"])
        }
        #expect(Self.parse(String(decoding: try daemon.http("GET", "/metrics").body, as: UTF8.self)).samples["iofilter_worker_restarts_total{\(vmLabel)}"] == 1)
        try daemon.ok(["vm", "stop", "v"])
        let after = Self.parse(String(decoding: try daemon.http("GET", "/metrics").body, as: UTF8.self)).samples
        #expect(after["iofilter_vm_up{\(vmLabel)}"] == 0)
        #expect(!after.keys.contains { $0.hasPrefix("iofilter_requests_total{") })

        // Over TCP, a read-only token scrapes; nothing else does.
        let token = try daemon.ok(["token", "create", "prometheus", "--role", "read-only"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let curl = Harness.tool("curl")
        let scraped = try Harness.check(curl, ["-s", "-H", "Authorization: Bearer \(token)", "http://127.0.0.1:\(port)/metrics"])
        #expect(scraped.contains("iofilter_vm_up{vm=\"v\"} 0"))
        let anonymous = try Harness.check(curl, ["-s", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:\(port)/metrics"])
        #expect(anonymous == "401")
    }
}
