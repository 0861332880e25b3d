import Foundation
import IOFilterAPI
import IOFilterPosix
import Testing

/// Who may do what to a real iofilterd: local users by their uid and groups on the unix
/// socket, token holders over TCP, browsers not at all; and every change names its caller.
@Suite("access")
struct AccessTests {
    /// A copy of the CLI that any uid can run, wherever the checkout lives.
    static func publicCLI() throws -> String {
        let directory = Harness.temporaryDirectory("public-cli")
        chmod(directory.path, 0o755)
        let copy = directory.appendingPathComponent("iofilter").path
        // Copied by a child process, not in this one: while this process held the copy
        // open for writing, a child another test forks meanwhile would inherit that fd,
        // and executing the copy would fail with ETXTBSY until that child exited.
        _ = try Harness.run("/bin/cp", [Harness.iofilter, copy])
        chmod(copy, 0o755)
        return copy
    }

    /// Runs the CLI as `uid` with primary group `gid` and no other groups.
    static func cli(_ binary: String, uid: Int, gid: Int, _ arguments: [String], socket: String) throws -> Harness.Output {
        try Harness.run("/usr/bin/setpriv", ["--reuid", "\(uid)", "--regid", "\(gid)", "--clear-groups", binary] + arguments + ["--socket", socket])
    }

    @Test func localUsersGetTheRoleTheirGroupsGrant() throws {
        let cli = try Self.publicCLI()
        let reader = 47_301, operatorGroup = 47_302
        let daemon = try Daemon(arguments: ["--read-only-group", "\(reader)", "--operator-group", "\(operatorGroup)"])
        defer { daemon.stop() }
        try daemon.ok(["disk", "create", "d", "--size", "8M"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])

        // Nobody else can even connect (`nobody` here); the state directory and its files
        // stay closed to them.
        let outsider = try Self.cli(cli, uid: 65_534, gid: 65_534, ["vm", "list"], socket: daemon.socket)
        #expect(outsider.status != 0 && outsider.stderr.contains("Permission denied"), "\(outsider.stderr)")
        let listing = try Harness.run("/usr/bin/setpriv", ["--reuid", "47400", "--regid", "\(reader)", "--clear-groups", "/bin/ls", daemon.state.path])
        #expect(listing.status != 0, "a group member could list the state directory: \(listing.stdout)")
        let database = try Harness.run("/usr/bin/setpriv", ["--reuid", "65534", "--regid", "65534", "--clear-groups", "/bin/cat",
                                                             daemon.state.appendingPathComponent("iofilterd.sqlite").path])
        #expect(database.status != 0, "nobody could read the state database")

        // Read-only: lists, and is told what it may not do.
        let list = try Self.cli(cli, uid: 47_401, gid: reader, ["vm", "list"], socket: daemon.socket)
        #expect(list.status == 0 && list.stdout.contains("v"), "\(list.stderr)")
        let start = try Self.cli(cli, uid: 47_401, gid: reader, ["vm", "start", "v"], socket: daemon.socket)
        #expect(start.status != 0 && start.stderr.contains("uid 47401 has the read-only role") && start.stderr.contains("needs operator"),
                "\(start.stderr)")

        // Operator: starts and stops VMs, but changes nothing else.
        #expect(try Self.cli(cli, uid: 47_402, gid: operatorGroup, ["vm", "start", "v"], socket: daemon.socket).status == 0)
        #expect(try Self.cli(cli, uid: 47_402, gid: operatorGroup, ["vm", "stop", "v"], socket: daemon.socket).status == 0)
        let create = try Self.cli(cli, uid: 47_402, gid: operatorGroup, ["disk", "create", "e", "--size", "8M"], socket: daemon.socket)
        #expect(create.status != 0 && create.stderr.contains("needs admin"), "\(create.stderr)")

        let events = try daemon.json(["events", "--limit", "50"], as: [Event].self)
        #expect(events.contains { $0.kind == "vm-started" && $0.actor == "uid 47402" })
        #expect(events.contains { $0.kind == "disk-created" && $0.actor?.hasPrefix("uid 0") == true })
        #expect(events.contains { $0.kind == "access-denied" && $0.actor == "uid 47401" && $0.subject == "startVM" })
    }

    @Test func stalledConnectionsDoNotStopOtherClients() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        let token = try daemon.ok(["token", "create", "--role", "read-only"]).trimmingCharacters(in: .whitespacesAndNewlines)
        // 100 clients on each listener that send half a request head and then nothing.
        var stalled: [Int32] = []
        defer { stalled.forEach { close($0) } }
        for index in 0..<200 {
            let fd = index % 2 == 0 ? try Sockets.connectTCP(host: "127.0.0.1", port: port) : try Sockets.connectUnix(path: daemon.socket)
            let partial = Array("GET /vms HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nX-Slow: ".utf8)
            _ = partial.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            stalled.append(fd)
        }
        let started = Date()
        for _ in 0..<5 {
            #expect(try daemon.cli(["vm", "list"]).status == 0)
            #expect(try Harness.run(Harness.iofilter, ["vm", "list", "--url", "http://127.0.0.1:\(port)", "--token", token]).status == 0)
        }
        #expect(Date().timeIntervalSince(started) < 30, "normal clients waited behind stalled ones")
    }

    @Test func overTCPEveryRequestNeedsATokenAndItsRole() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        let url = "http://127.0.0.1:\(port)"
        let readOnly = try daemon.ok(["token", "create", "monitoring", "--role", "read-only"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let admin = try daemon.ok(["token", "create", "--role", "admin"]).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(readOnly.hasPrefix("iof_") && readOnly != admin)
        #expect(!(try String(contentsOf: daemon.state.appendingPathComponent("iofilterd.sqlite"), encoding: .isoLatin1)).contains(readOnly))

        func remote(_ arguments: [String], token: String?) throws -> Harness.Output {
            try Harness.run(Harness.iofilter, arguments + ["--url", url] + (token.map { ["--token", $0] } ?? []))
        }
        let anonymous = try remote(["vm", "list"], token: nil)
        #expect(anonymous.status != 0 && anonymous.stderr.contains("needs a token"))
        let forged = try remote(["vm", "list"], token: "iof_" + String(readOnly.dropFirst(4).reversed()))
        #expect(forged.status != 0 && forged.stderr.contains("not valid"))
        #expect(try remote(["vm", "list"], token: readOnly).status == 0)
        let refused = try remote(["disk", "create", "r", "--size", "8M"], token: readOnly)
        #expect(refused.status != 0 && refused.stderr.contains("token monitoring has the read-only role"))
        #expect(try remote(["disk", "create", "r", "--size", "8M"], token: admin).status == 0)
        let environment = try Harness.run(Harness.iofilter, ["disk", "list"], environment: ["IOFILTER_URL": url, "IOFILTER_TOKEN": readOnly])
        #expect(environment.status == 0 && environment.stdout.contains("r"))

        // A browser on another origin, or a rebound DNS name, gets nowhere, token or not.
        let curl = Harness.tool("curl")
        let rebound = try Harness.check(curl, ["-s", "-H", "Authorization: Bearer \(admin)", "-H", "Host: attacker.example:\(port)", "\(url)/disks"])
        #expect(rebound.contains("cross-site") && rebound.contains("not a name this listener answers to"))
        let crossSite = try Harness.check(curl, ["-s", "-X", "DELETE", "-H", "Authorization: Bearer \(admin)", "-H", "Origin: http://attacker.example",
                                                 "\(url)/disks/r"])
        #expect(crossSite.contains("cross-site request refused"))
        let sameOrigin = try Harness.check(curl, ["-s", "-H", "Authorization: Bearer \(admin)", "-H", "Origin: http://localhost:\(port)",
                                                  "http://localhost:\(port)/disks/r"])
        #expect(sameOrigin.contains("\"name\":\"r\""), "\(sameOrigin)")

        try daemon.ok(["token", "revoke", "monitoring"])
        let revoked = try remote(["vm", "list"], token: readOnly)
        #expect(revoked.status != 0 && revoked.stderr.contains("not valid"))
        let tokens = try daemon.json(["token", "list"], as: [TokenInfo].self)
        #expect(tokens.count == 1 && tokens[0].token == nil && tokens[0].lastUsedAt != nil)
        let events = try daemon.json(["events", "--limit", "50"], as: [Event].self)
        #expect(events.contains { $0.kind == "disk-created" && $0.subject == "r" && $0.actor?.hasPrefix("token admin-") == true })
    }

    @Test func offLoopbackTheAPIServesOnlyTLS() throws {
        let directory = Harness.temporaryDirectory("tls")
        let state = Harness.temporaryDirectory("tls-state")
        // Refused before anything binds.
        let plain = try Harness.run(Harness.binDirectory.appendingPathComponent("iofilterd").path,
                                    ["--state-dir", state.path, "--listen", "0.0.0.0:\(Harness.freePort())"])
        #expect(plain.status != 0 && plain.stderr.contains("give --tls-cert and --tls-key"), "\(plain.stderr)")

        let key = directory.appendingPathComponent("key.pem").path, certificate = directory.appendingPathComponent("cert.pem").path
        try Harness.check(Harness.tool("openssl"), [
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", certificate,
            "-days", "1", "-subj", "/CN=iofilter-test", "-addext", "subjectAltName=DNS:iofilter-test,IP:127.0.0.1",
        ])
        let port = Harness.freePort()
        // Served on loopback (tests carry no traffic elsewhere), where TLS is allowed too.
        let daemon = try Daemon(state: state, arguments: ["--listen", "127.0.0.1:\(port)", "--tls-cert", certificate, "--tls-key", key,
                                                          "--server-name", "iofilter-test"])
        defer { daemon.stop() }
        let token = try daemon.ok(["token", "create", "--role", "read-only"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let curl = Harness.tool("curl")
        let host = try Harness.check(curl, ["-sS", "--cacert", certificate, "-H", "Authorization: Bearer \(token)", "https://127.0.0.1:\(port)/host"])
        #expect(host.contains("\"acceptanceLevel\":\"community\""), "\(host)")
        let byName = try Harness.check(curl, ["-sS", "--cacert", certificate, "--resolve", "iofilter-test:\(port):127.0.0.1",
                                              "-H", "Authorization: Bearer \(token)", "https://iofilter-test:\(port)/vms"])
        #expect(byName == "[]")
        let cleartext = try Harness.run(curl, ["-sS", "-m", "5", "-H", "Authorization: Bearer \(token)", "http://127.0.0.1:\(port)/vms"])
        #expect(cleartext.status != 0 || !cleartext.stdout.contains("[]"), "plain HTTP was answered on the TLS port: \(cleartext.stdout)")

        // The CLI itself, over HTTPS, trusting this certificate (its IP name is checked).
        let listed = try Harness.run(Harness.iofilter, ["vm", "list", "--url", "https://127.0.0.1:\(port)", "--cacert", certificate, "--token", token])
        #expect(listed.status == 0 && listed.stdout.contains("no VMs"), "\(listed.stderr)")
        let untrusted = try Harness.run(Harness.iofilter, ["vm", "list", "--url", "https://127.0.0.1:\(port)", "--token", token])
        #expect(untrusted.status != 0 && untrusted.stderr.contains("cannot connect") == false && untrusted.stderr.lowercased().contains("certificate"),
                "\(untrusted.stderr)")
    }

    @Test func requestsAndPoliciesNameFilesOnlyWhereTheAdminAllows() throws {
        let allowed = Harness.temporaryDirectory("allowed"), elsewhere = Harness.temporaryDirectory("elsewhere")
        let daemon = try Daemon(allowedPaths: [allowed.path])
        defer { daemon.stop() }
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-replication")])
        let outside = Harness.makeImage(elsewhere.appendingPathComponent("outside.img").path, size: 1 << 20)
        let inside = Harness.makeImage(allowed.appendingPathComponent("inside.img").path, size: 1 << 20)

        let refusedImport = try daemon.refused(["disk", "import", "a", "--from", outside])
        #expect(refusedImport.contains("lies outside the directories this host allows") && refusedImport.contains(allowed.path)
                && refusedImport.contains("--allow-path"), "\(refusedImport)")
        try daemon.ok(["disk", "import", "a", "--from", inside])

        // A link inside that leads outside is judged by where it leads.
        let link = allowed.appendingPathComponent("escape").path
        try FileManager.default.createSymbolicLink(atPath: link, withDestinationPath: elsewhere.path)
        #expect(try daemon.refused(["disk", "export", "a", link + "/copy.img"]).contains("lies outside"))
        #expect(try daemon.refused(["disk", "export", "a", elsewhere.appendingPathComponent("copy.img").path]).contains("lies outside"))
        #expect(try daemon.refused(["disk", "export", "a", allowed.appendingPathComponent("new/copy.img").path]).contains("create no directories"))
        try daemon.ok(["disk", "export", "a", allowed.appendingPathComponent("copy.img").path])
        #expect(!FileManager.default.fileExists(atPath: elsewhere.appendingPathComponent("copy.img").path))

        let replication = "org.swift-iofilter.replication"
        let policy = try daemon.refused(["policy", "create", "p", "--filter", "\(replication):target=\(elsewhere.path)/{disk}.img"])
        #expect(policy.contains("policy p: \(replication)'s target") && policy.contains("lies outside"), "\(policy)")
        let socket = try daemon.refused(["policy", "create", "q", "--filter", "\(replication):target=nbd+unix:///r?socket=\(elsewhere.path)/r.sock"])
        #expect(socket.contains("lies outside"))
        try daemon.ok(["policy", "create", "s", "--filter", "\(replication):target={state}/replicas/{disk}.img"])
        try daemon.ok(["policy", "create", "t", "--filter", "\(replication):target=\(allowed.path)/{disk}.replica.img"])
    }
}
