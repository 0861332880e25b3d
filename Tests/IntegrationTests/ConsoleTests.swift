import Foundation
import IOFilterAPI
import Testing

/// The web console iofilterd serves, in headless Chromium (driven over the DevTools
/// protocol by Fixtures/browser.py): its pages render from the API, its figures move
/// while fio runs, an operator's action works, a read-only user cannot act, and an admin
/// makes a policy with the editor the plug-ins' parameters generate. Screenshots are
/// kept for people to look at (in $IOFILTER_SCREENSHOTS, or the test's scratch space).
@Suite("web console", .serialized)
struct ConsoleTests {
    static let chromium = "/usr/bin/chromium"
    static let cache = "org.swift-iofilter.cache"
    let directory = Harness.temporaryDirectory("console")

    struct Browser {
        let directory: URL

        /// Runs a plan (see browser.py) and returns what it read.
        func run(_ plan: [[String: Any]], name: String) throws -> [String: Any] {
            let file = directory.appendingPathComponent("\(name).json")
            try JSONSerialization.data(withJSONObject: plan).write(to: file)
            let script = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/browser.py").path
            let result = try Harness.run("/usr/bin/python3", [script, ConsoleTests.chromium, file.path], timeout: 120)
            let output = (try? JSONSerialization.jsonObject(with: Data(result.stdout.utf8))) as? [String: Any] ?? [:]
            guard result.status == 0 else {
                throw HarnessError("browser plan \(name) failed: \(result.stdout) \(result.stderr.suffix(2000))")
            }
            return output
        }

        /// Screenshots go to $IOFILTER_SCREENSHOTS if set (the scratch space goes away
        /// with the run), else beside the plans.
        func shot(_ name: String) -> [String: Any] {
            let kept = ProcessInfo.processInfo.environment["IOFILTER_SCREENSHOTS"].map { URL(fileURLWithPath: $0) } ?? directory
            try? FileManager.default.createDirectory(at: kept, withIntermediateDirectories: true)
            return ["screenshot": kept.appendingPathComponent("\(name).png").path]
        }
    }

    static func text(_ selector: String) -> String {
        "(document.querySelector(\(json(selector))) || {}).textContent"
    }
    static func json(_ text: String) -> String {
        String(decoding: try! JSONSerialization.data(withJSONObject: [text]), as: UTF8.self).dropFirst().dropLast().description
    }

    @Test func consoleRendersGoesLiveActsAndRespectsRoles() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        let base = "http://127.0.0.1:\(port)"
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache"), Daemon.samplePlugin("iofilter-replication")])
        try daemon.ok(["policy", "create", "gold", "--filter", "\(Self.cache):size=64M",
                       "--filter", "org.swift-iofilter.replication:target={state}/replicas/{disk}.img"])
        try daemon.ok(["disk", "create", "web", "--size", "128M", "--policy", "gold"])
        try daemon.ok(["vm", "create", "web", "--disk", "web"])
        let vm: VMInfo = try daemon.json(["vm", "start", "web"])
        let uri = try #require(vm.uris["web"])
        func token(_ name: String, _ role: String) throws -> String {
            let created: TokenInfo = try daemon.json(["token", "create", name, "--role", role])
            return try #require(created.token)
        }
        let operatorToken = try token("console-operator", "operator")
        let readOnlyToken = try token("console-viewer", "read-only")
        let adminToken = try token("console-admin", "admin")
        let browser = Browser(directory: directory)
        print("console screenshots in \(directory.path)")

        // The page itself holds no data and needs no token; the API behind it does.
        let page = try Harness.run("/usr/bin/curl", ["-s", "-D", "-", "\(base)/"])
        #expect(page.stdout.contains("Content-Security-Policy: default-src 'self'") && page.stdout.contains("<title>iofilterd console</title>"))
        #expect(try Harness.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", "\(base)/live"]).stdout == "401")

        // An operator, while fio runs: live figures move without a reload.
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        fio.arguments = ["--name=console", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=64M",
                         "--time_based", "--runtime=25", "--output=/dev/null"]
        fio.standardOutput = FileHandle.nullDevice
        fio.standardError = FileHandle.nullDevice
        try fio.run()
        defer { if fio.isRunning { fio.terminate() } }
        let iops = Self.text("[data-vm=web] [data-metric=iops]")
        let hits = Self.text("[data-filter='web/\(Self.cache)'] [data-stat=hits]")
        let live = try browser.run([
            ["navigate": "\(base)/#token=\(operatorToken)"],
            ["wait": "\(iops) && \(iops) !== '…' && \(iops) !== '0'", "timeout": 20],
            ["read": "location.hash", "as": "hash"],
            ["read": Self.text("#whoami"), "as": "whoami"],
            ["read": hits, "as": "hits1"],
            ["read": "document.querySelector('#live-state').textContent", "as": "badge"],
            ["sleep": 2.5],
            ["read": hits, "as": "hits2"],
            ["read": iops, "as": "iops"],
            browser.shot("1-vms-live"),
            ["click": "#tabs button[data-tab=plugins]"],
            ["wait": "document.querySelector('[data-plugin=\"\(Self.cache)@1.0.0\"] [data-operation=status] select')"],
            ["read": "(() => { const s = document.querySelector('[data-plugin=\"\(Self.cache)@1.0.0\"] [data-operation=status] select'); s.value = 'web'; return s.value })()", "as": "where"],
            ["click": "[data-plugin=\"\(Self.cache)@1.0.0\"] [data-call=status]"],
            ["wait": "!document.querySelector('[data-plugin=\"\(Self.cache)@1.0.0\"] .result').hidden", "timeout": 10],
            ["read": Self.text("[data-plugin=\"\(Self.cache)@1.0.0\"] .result"), "as": "status"],
            browser.shot("2-plugins"),
            ["click": "#tabs button[data-tab=disks]"],
            ["type": "[data-snapshot-name=web]", "text": "web-snap"],
            ["click": "[data-disk=web] [data-action=snapshot]"],
            ["wait": "document.querySelector('[data-disk=\"web-snap\"]')", "timeout": 20],
            browser.shot("3-disks"),
            ["click": "#tabs button[data-tab=vms]"],
            ["click": "[data-vm=web] [data-action=stop]"],
            ["wait": "\(Self.text("[data-vm=web] [data-state]")) === 'stopped'", "timeout": 30],
            ["click": "#tabs button[data-tab=events]"],
            ["wait": "document.querySelector('[data-event=\"vm-stopped\"]')", "timeout": 10],
            browser.shot("4-events"),
        ], name: "operator")
        #expect(live["hash"] as? String == "", "the token leaves the address bar")
        #expect(live["whoami"] as? String == "token console-operator · operator")
        #expect(live["badge"] as? String == "live")
        let before = Int((live["hits1"] as? String ?? "").replacingOccurrences(of: ",", with: "")) ?? -1
        let after = Int((live["hits2"] as? String ?? "").replacingOccurrences(of: ",", with: "")) ?? -1
        #expect(before >= 0 && after > before, "the cache's hits move while fio runs: \(live)")
        #expect((live["status"] as? String ?? "").contains("web/web"), "the operation ran in the VM's worker: \(live)")
        // What the browser did, the host did.
        let stopped: VMInfo = try daemon.json(["vm", "show", "web"])
        #expect(stopped.state == .stopped)
        let snapshot: DiskInfo = try daemon.json(["disk", "show", "web-snap"])
        #expect(snapshot.snapshotOf == "web")
        #expect(try daemon.ok(["events"]).contains("vm-stopped") && (try daemon.ok(["events"])).contains("(by token console-operator)"))

        // A read-only user sees everything and can act on nothing: the console greys the
        // actions out, and the API refuses them anyway.
        let viewer = try browser.run([
            // Signing in by hand this time: the form, not a link.
            ["navigate": "\(base)/"],
            ["type": "#token", "text": readOnlyToken],
            ["click": "#login-button"],
            ["wait": "document.querySelector('[data-vm=web] [data-action=start]')", "timeout": 15],
            ["read": "document.querySelector('[data-vm=web] [data-action=start]').disabled", "as": "startDisabled"],
            ["read": "document.querySelector('[data-vm=web] [data-action=start]').title", "as": "why"],
            ["read": "fetch('/vms/web/start', {method: 'POST', headers: {Authorization: 'Bearer \(readOnlyToken)'}}).then(r => r.status)", "as": "forced"],
            browser.shot("5-read-only"),
        ], name: "read-only")
        #expect(viewer["startDisabled"] as? Bool == true)
        #expect((viewer["why"] as? String ?? "").contains("needs the operator role"))
        #expect(viewer["forced"] as? Int == 403)
        #expect(try daemon.json(["vm", "show", "web"], as: VMInfo.self).state == .stopped)

        // An admin makes a policy with the editor: its fields come from the plug-in's
        // declared parameters.
        let admin = try browser.run([
            ["navigate": "\(base)/#token=\(adminToken)"],
            ["wait": "document.querySelector('select[data-category=cache]')", "timeout": 15],
            ["click": "#tabs button[data-tab=policies]"],
            ["read": "(() => { const s = document.querySelector('select[data-category=cache]'); s.value = '\(Self.cache)'; s.dispatchEvent(new Event('change')); return s.value })()", "as": "chosen"],
            ["read": "Array.from(document.querySelectorAll('select[data-category=cache] ~ .params [data-parameter]')).map(e => e.dataset.parameter).join(',')", "as": "fields"],
            ["type": "select[data-category=cache] ~ .params [data-parameter=size]", "text": "32M"],
            ["read": "(() => { const m = document.querySelector('select[data-category=cache] ~ .params [data-parameter=mode]'); m.value = 'write-back'; return m.value })()", "as": "mode"],
            ["type": "#policy-name", "text": "silver"],
            ["type": "#policy-description", "text": "write-back cache"],
            browser.shot("6-policy-editor"),
            ["click": "#policy-create"],
            ["wait": "document.querySelector('[data-policy=silver]')", "timeout": 10],
        ], name: "admin")
        #expect((admin["fields"] as? String ?? "").contains("size") && (admin["fields"] as? String ?? "").contains("mode"), "\(admin)")
        let silver: Policy = try daemon.json(["policy", "show", "silver"])
        #expect(silver.filters.first?.plugin == Self.cache && silver.filters.first?.parameters == ["size": "32M", "mode": "write-back"])
    }
}
