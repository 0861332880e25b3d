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
        // The icon a browser asks for on its own, without a token.
        #expect(try Harness.run("/usr/bin/curl", ["-s", "-o", "/dev/null", "-w", "%{http_code} %{content_type}", "\(base)/favicon.ico"]).stdout
                == "200 image/svg+xml")

        // An operator, while fio runs: live figures move without a reload.
        let fio = Process()
        fio.executableURL = URL(fileURLWithPath: "/usr/bin/fio")
        fio.arguments = ["--name=console", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw", "--bs=4k", "--iodepth=8", "--size=64M",
                         "--time_based", "--runtime=25", "--output=/dev/null"]
        fio.standardOutput = FileHandle.nullDevice
        fio.standardError = FileHandle.nullDevice
        try fio.run()
        defer { if fio.isRunning { fio.terminate() } }
        let iops = Self.text("[data-vm=web] [data-metric=read-iops]")
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
        #expect((live["errors"] as? [Any])?.isEmpty == true, "the page reported errors: \(live["errors"] ?? "")")
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

    /// What an operator sees when things go wrong: a degraded filter (its reason, its lag
    /// against the RPO, a warning event), charts of the last hour with axes and units,
    /// the same at phone width without sideways scrolling, a host that went away (a
    /// banner with the time of the last update, no state shown as current), and a
    /// revoked token (signed out at once). The page reports no errors while the host is
    /// up. Screenshots at 1400 and 390 px are kept for people to look at.
    @Test func consoleShowsHealthChartsAndAHostThatWentAway() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)", "--sample-interval", "1"])
        defer { daemon.kill(SIGKILL) }
        let base = "http://127.0.0.1:\(port)"
        let test = try Harness.buildTestPlugin("console-health", in: directory)
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache"), test])
        try daemon.ok(["policy", "create", "cached", "--filter", "\(Self.cache):size=32M"])
        try daemon.ok(["policy", "create", "watched", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "web", "--size", "64M", "--policy", "cached"])
        try daemon.ok(["disk", "create", "db", "--size", "16M", "--policy", "watched"])
        try daemon.ok(["vm", "create", "web", "--disk", "web"])
        try daemon.ok(["vm", "create", "db", "--disk", "db"])
        let web: VMInfo = try daemon.json(["vm", "start", "web"])
        try daemon.ok(["vm", "start", "db"])
        let uri = try #require(web.uris["web"])
        // Some history to draw: a few seconds of mixed I/O.
        _ = try Harness.run("/usr/bin/fio", ["--name=history", "--ioengine=nbd", "--uri=\(uri)", "--rw=randrw", "--bs=4k", "--iodepth=4",
                                              "--size=32M", "--time_based", "--runtime=6", "--output=/dev/null"], timeout: 60)
        // The test filter says what its sidecar files say: degraded, 45 s behind a 15 s RPO.
        let sidecar = daemon.state.appendingPathComponent("disks/db.state/org.test.filter")
        try "degraded replica target unreachable since 12:00".write(to: sidecar.appendingPathComponent("health"), atomically: true, encoding: .utf8)
        try "45 15".write(to: sidecar.appendingPathComponent("lag"), atomically: true, encoding: .utf8)
        let token: TokenInfo = try daemon.json(["token", "create", "console-watch", "--role", "operator"])
        let secret = try #require(token.token)
        let browser = Browser(directory: directory)

        let noOverflow = "document.documentElement.scrollWidth <= window.innerWidth + 1"
        let seen = try browser.run([
            ["navigate": "\(base)/#token=\(secret)"],
            ["wait": "document.querySelector('[data-vm=db] [data-health=degraded]')", "timeout": 20],
            ["read": Self.text("[data-vm=db] .reason"), "as": "reason"],
            ["read": Self.text("[data-filter='db/org.test.filter'] .lag span"), "as": "lag"],
            ["read": Self.text("#host-health"), "as": "hostHealth"],
            // The VM list filters and sorts (the filter by any name shown).
            ["type": "#vm-filter", "text": "db"],
            ["read": "document.querySelectorAll('article[data-vm]').length", "as": "filtered"],
            ["type": "#vm-filter", "text": ""],
            ["read": "(() => { const s = document.querySelector('#vm-sort'); s.value = 'health'; s.dispatchEvent(new Event('change')); return document.querySelector('article[data-vm]').dataset.vm })()", "as": "worstFirst"],
            ["click": "[data-charts=web] summary"],
            ["wait": "document.querySelectorAll('[data-chart-holder=web] svg.chart polyline').length >= 2", "timeout": 20],
            ["read": "Array.from(document.querySelectorAll('[data-chart-holder=web] figcaption')).map(e => e.textContent).join('|')", "as": "charts"],
            ["read": "Array.from(document.querySelectorAll('[data-chart-holder=web] svg.chart text.axis')).map(e => e.textContent).join('|')", "as": "axes"],
            ["read": Self.text("[data-vm=web] [data-metric=read-throughput]"), "as": "throughput"],
            // Live updates and a re-sort leave an open chart panel open.
            ["read": "(() => { const s = document.querySelector('#vm-sort'); s.value = 'name'; s.dispatchEvent(new Event('change')); return 1 })()", "as": "resorted"],
            ["sleep": 2.5],
            ["read": "document.querySelector('[data-charts=web]').open && document.querySelectorAll('[data-chart-holder=web] svg.chart').length >= 3", "as": "chartsStayOpen"],
            browser.shot("7-health-desktop"),
            ["click": "#tabs button[data-tab=events]"],
            ["wait": "document.querySelector('[data-event=filter-degraded] [data-severity=warning]')", "timeout": 15],
            ["wait": "document.querySelector('[data-event=rpo-exceeded]')", "timeout": 15],
            ["read": "(() => { const s = document.querySelector('#event-severity'); s.value = 'warning'; s.dispatchEvent(new Event('change')); return Array.from(document.querySelectorAll('#event-rows [data-severity]')).every(e => e.dataset.severity !== 'info') })()", "as": "onlyWarnings"],
            browser.shot("8-events-desktop"),
            // A phone: nothing scrolls sideways, the tabs are reachable.
            ["viewport": [390, 844]],
            ["click": "#tabs button[data-tab=vms]"],
            ["sleep": 1.5],
            ["read": noOverflow, "as": "vmsFit"],
            ["read": "document.querySelector('#tabs button[data-tab=events]').getBoundingClientRect().right <= window.innerWidth || document.querySelector('#tabs').scrollWidth > document.querySelector('#tabs').clientWidth", "as": "tabsReachable"],
            browser.shot("9-vms-phone"),
            ["click": "#tabs button[data-tab=disks]"],
            ["sleep": 0.5],
            ["read": noOverflow, "as": "disksFit"],
            browser.shot("10-disks-phone"),
            ["click": "#tabs button[data-tab=events]"],
            ["sleep": 0.5],
            ["read": noOverflow, "as": "eventsFit"],
            browser.shot("11-events-phone"),
            ["click": "#tabs button[data-tab=vms]"],
            // The narrowest phones.
            ["viewport": [360, 740]],
            ["sleep": 0.5],
            ["read": noOverflow, "as": "narrowFits"],
        ], name: "health")
        #expect((seen["reason"] as? String ?? "").contains("replica target unreachable since 12:00"), "\(seen)")
        #expect((seen["lag"] as? String ?? "") == "lag 45 s of 15 s RPO", "\(seen)")
        #expect(seen["hostHealth"] as? String == "host degraded")
        let charts = seen["charts"] as? String ?? ""
        #expect(charts.contains("web · IOPS") && charts.contains("web · throughput") && charts.contains("web · latency"), "\(charts)")
        #expect((seen["axes"] as? String ?? "").contains("/s") && (seen["axes"] as? String ?? "").contains("ms"), "axes carry units: \(seen["axes"] ?? "")")
        #expect((seen["throughput"] as? String ?? "").hasSuffix("/s"))
        #expect(seen["filtered"] as? Int == 1)
        #expect(seen["chartsStayOpen"] as? Bool == true)
        #expect(seen["worstFirst"] as? String == "db")
        #expect(seen["onlyWarnings"] as? Bool == true)
        #expect(seen["vmsFit"] as? Bool == true && seen["disksFit"] as? Bool == true && seen["eventsFit"] as? Bool == true, "\(seen)")
        #expect(seen["tabsReachable"] as? Bool == true && seen["narrowFits"] as? Bool == true)
        #expect((seen["errors"] as? [Any])?.isEmpty == true, "the page reported errors: \(seen["errors"] ?? "")")

        // Revoking the token signs the console out at once; signing out by hand works too.
        let revoked = try browser.run([
            ["navigate": "\(base)/#token=\(secret)"],
            ["wait": "document.querySelector('#live-state').textContent === 'live'", "timeout": 15],
            ["shell": "\(Harness.iofilter) token revoke console-watch --socket \(daemon.socket)"],
            ["wait": "!document.querySelector('#login').hidden", "timeout": 5],
            ["read": Self.text("#login-error"), "as": "why"],
        ], name: "revoked")
        #expect((revoked["why"] as? String ?? "").contains("Signed out"), "\(revoked)")
        let other: TokenInfo = try daemon.json(["token", "create", "console-again", "--role", "read-only"])
        let signedOut = try browser.run([
            ["navigate": "\(base)/#token=\(try #require(other.token))"],
            ["wait": "!document.querySelector('#account').hidden", "timeout": 15],
            ["click": "#sign-out"],
            ["read": "!document.querySelector('#login').hidden && document.querySelector('#tabs').hidden", "as": "out"],
            ["read": "sessionStorage.getItem('iofilter-token')", "as": "kept"],
        ], name: "sign-out")
        #expect(signedOut["out"] as? Bool == true && signedOut["kept"] is NSNull, "\(signedOut)")

        // The host goes away under an open page: the page says so, with the time of the
        // last update, and shows no state as current.
        let fresh: TokenInfo = try daemon.json(["token", "create", "console-gone", "--role", "read-only"])
        let pid = try #require(daemon.process?.processIdentifier)
        let gone = try browser.run([
            ["navigate": "\(base)/#token=\(try #require(fresh.token))"],
            ["wait": "document.querySelector('#live-state').textContent === 'live'", "timeout": 15],
            ["shell": "kill -9 \(pid)"],
            ["wait": "!document.querySelector('#stale').hidden", "timeout": 15],
            ["read": Self.text("#stale"), "as": "banner"],
            ["read": "Array.from(document.querySelectorAll('article[data-vm] [data-state]')).map(e => e.textContent).join(',')", "as": "states"],
            ["read": Self.text("#host-health"), "as": "hostHealth"],
            browser.shot("12-host-gone-desktop"),
            ["viewport": [390, 844]],
            ["sleep": 0.5],
            browser.shot("13-host-gone-phone"),
        ], name: "gone")
        #expect((gone["banner"] as? String ?? "").contains("last updated at"), "\(gone)")
        #expect(gone["states"] as? String == "unknown,unknown", "\(gone)")
        #expect(gone["hostHealth"] as? String == "unknown")
    }
}
