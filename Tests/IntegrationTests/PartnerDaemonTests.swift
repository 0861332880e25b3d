import Foundation
import IOFilterAPI
import IOFilterModel
import IOFilterPosix
import Testing

/// Partner daemons: one sandboxed process per plug-in that defines `daemon_main`,
/// supervised by `iofilter serve` and by iofilterd; each filter instance reaches it over
/// a channel the host brokers; peers on other hosts reach it only where the operator
/// allowed it. The test plug-in's daemon (WITH_DAEMON) counts its starts and echoes.
@Suite("partner daemons")
struct PartnerDaemonTests {
    let directory = Harness.temporaryDirectory("partner-daemon")

    func daemonPlugin(_ name: String = "with-daemon", listens: Bool = true, header: String? = nil) throws -> String {
        try Harness.buildTestPlugin(name, defines: ["WITH_DAEMON", "PLUGIN_NAME=\"org.test.daemon\""] + (listens ? ["DAEMON_LISTENS"] : []),
                                    header: header, in: directory)
    }

    /// The pid of `parent`'s child that runs a daemon (`iofilter-worker daemon`).
    static func daemonChild(of parent: pid_t) -> pid_t? {
        Harness.children(of: parent).first { pid in
            let line = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            return line.split(separator: "\0").dropFirst().first == "daemon"
        }
    }

    /// Reads what a peer listener says to a new connection.
    static func greeting(from address: String) throws -> String {
        let (host, port) = try #require(Sockets.hostPort(address))
        let fd = try Sockets.connectTCP(host: host, port: port)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 64)
        let count = read(fd, &bytes, bytes.count)
        return String(decoding: bytes[0..<max(count, 0)], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    @Test func serveRunsTheDaemonAndEveryChannelIsFreshAfterItsRestart() throws {
        let plugin = try daemonPlugin()
        let disk = Harness.makeImage(directory.appendingPathComponent("d.img").path, size: 8 << 20)
        let socket = directory.appendingPathComponent("d.sock").path
        let served = try ServedDisk([disk, "--filter", plugin, "--socket", socket, "--daemon-listen", "127.0.0.1:0"])
        defer { served.stop() }
        func echo(_ text: String) throws -> String {
            try Harness.run(Harness.iofilter, ["plugin", "call", plugin, "daemon_echo", text, "--serve", socket + ".control"]).stdout
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(try echo("one") == "d.img=echo 1 d.img one;")
        // The daemon is confined like a worker: no socket of its own.
        #expect(served.waitForLog("daemon start 1; socket(2): Operation not permitted"), "\(served.log)")
        // Nor may it make disks of the host: it is no replication plug-in.
        #expect(served.waitForLog("daemon open_replica: Operation not permitted"), "\(served.log)")
        let address = try #require(served.log.firstMatch(of: /accepts peers on (127\.0\.0\.1:\d+)/)?.1)
        #expect(try Self.greeting(from: String(address)) == "peer 1")

        let first = try #require(Self.daemonChild(of: served.process.processIdentifier))
        kill(first, SIGKILL)
        #expect(served.waitForLog("daemon \(first) of org.test.daemon killed by SIGKILL"), "\(served.log)")
        #expect(served.waitForLog("daemon start 2;", timeout: 20), "\(served.log)")
        // The filter's old channel died with the daemon; the next call gets a fresh one
        // to the new daemon, which kept its state directory (its start count).
        #expect(try echo("two") == "d.img=echo 2 d.img two;")
        #expect(try Self.greeting(from: String(address)) == "peer 2", "the peer listener outlives the daemon's restart")
        // Real I/O still passes the filter meanwhile.
        #expect(try Harness.qemuIO(served.uri, ["write -P 0x33 0 64k", "read -P 0x33 0 64k"]).contains("read 65536/65536"))
        served.stop()
        #expect(Self.daemonChild(of: served.process.processIdentifier) == nil)
    }

    @Test func iofilterdSupervisesDaemonsAndHandsOutChannelsAndListeners() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let plugin = try daemonPlugin()
        try daemon.ok(["plugin", "install", plugin, "--daemon-listen", "127.0.0.1:0"])
        var info: [PluginInfo] = try daemon.json(["plugin", "show", "org.test.daemon"])
        var status = try #require(info.first?.daemon)
        #expect(status.state == .running && status.restarts == 0, "\(status)")
        let address = try #require(status.listen)
        #expect(try Self.greeting(from: address) == "peer 1")
        #expect(try daemon.ok(["plugin", "show", "org.test.daemon"]).contains("daemon: running, pid \(status.pid ?? 0), 0 restart(s), accepts peers on \(address)"))

        // Every instance (two disks of one VM) has its own channel.
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.daemon"])
        for disk in ["a", "b"] { try daemon.ok(["disk", "create", disk, "--size", "8M", "--policy", "p"]) }
        try daemon.ok(["vm", "create", "v", "--disk", "a", "--disk", "b"])
        try daemon.ok(["vm", "start", "v"])
        func echo(_ text: String) throws -> String {
            let result: ManagementResult = try daemon.json(["plugin", "call", "org.test.daemon", "daemon_echo", text, "--vm", "v"])
            return result.value
        }
        #expect(try echo("x") == "a=echo 1 a x;b=echo 1 b x;")

        // SIGKILL: the host restarts it, says so in its events, and the channels renew.
        let pid = try #require(status.pid)
        kill(pid, SIGKILL)
        let deadline = Date().addingTimeInterval(30)
        repeat {
            usleep(100_000)
            info = try daemon.json(["plugin", "show", "org.test.daemon"])
            status = try #require(info.first?.daemon)
        } while (status.state != .running || status.restarts < 1) && Date() < deadline
        #expect(status.state == .running && status.restarts == 1 && status.lastError == "killed by SIGKILL", "\(status)")
        #expect(try echo("y") == "a=echo 2 a y;b=echo 2 b y;")
        let events = try daemon.ok(["events"])
        #expect(events.contains("daemon-exited") && events.contains("daemon-restarted"), "\(events)")

        // The operator takes the listener away: the daemon restarts without one.
        try daemon.ok(["plugin", "daemon-listen", "org.test.daemon", "--off"])
        info = try daemon.json(["plugin", "show", "org.test.daemon"])
        #expect(info.first?.daemon?.listen == nil)
        #expect((try? Self.greeting(from: address)) == nil || (try? Self.greeting(from: address)) == "", "the old listener is closed")

        // An upgrade replaces the daemon: the newer version's runs, the old one is gone.
        let old = try #require(try daemon.json(["plugin", "show", "org.test.daemon"], as: [PluginInfo].self).first?.daemon?.pid)
        let newer = try Harness.buildTestPlugin("with-daemon-1.1", defines: ["WITH_DAEMON", "PLUGIN_NAME=\"org.test.daemon\"",
                                                                             "PLUGIN_VERSION=\"1.1.0\""], in: directory)
        try daemon.ok(["plugin", "install", newer])
        let versions: [PluginInfo] = try daemon.json(["plugin", "show", "org.test.daemon"])
        #expect(versions.map(\.version) == ["1.1.0", "1.0.0"] && versions[0].daemon?.state == .running && versions[1].daemon == nil)
        #expect(kill(old, 0) != 0, "the old version's daemon kept running")
        try daemon.ok(["plugin", "remove", "org.test.daemon", "--version", "1.1.0"])
        let afterRemoval: [PluginInfo] = try daemon.json(["plugin", "show", "org.test.daemon"])
        #expect(afterRemoval.first?.daemon?.state == .running,
                "removing the newer version hands the daemon back to the older one: \(afterRemoval.map { ($0.version, $0.daemon) })\n\(daemon.log.suffix(3000))")

        // Removing the plug-in stops its daemon.
        try daemon.ok(["vm", "stop", "v"])
        try daemon.ok(["vm", "delete", "v"])
        for disk in ["a", "b"] { try daemon.ok(["disk", "delete", disk]) }
        try daemon.ok(["policy", "delete", "p"])
        let last = try #require(try daemon.json(["plugin", "show", "org.test.daemon"], as: [PluginInfo].self).first?.daemon?.pid)
        try daemon.ok(["plugin", "remove", "org.test.daemon"])
        #expect(kill(last, 0) != 0, "the daemon outlived its plug-in")
        #expect(try daemon.ok(["events"]).contains("daemon-stopped"))
    }

    @Test func aDaemonBuiltAgainstABI12RunsButTakesNoPeers() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let old = try daemonPlugin("daemon-abi12", listens: true,
                                   header: Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.2").path)
        try daemon.ok(["plugin", "install", old])
        let info: [PluginInfo] = try daemon.json(["plugin", "show", "org.test.daemon"])
        #expect(info.first?.daemon?.state == .running && info.first?.daemonListens == false)
        let refused = try daemon.refused(["plugin", "daemon-listen", "org.test.daemon", "127.0.0.1:0"])
        #expect(refused.contains("does not declare IOF_DAEMON_LISTENS"), "\(refused)")
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.daemon"])
        try daemon.ok(["disk", "create", "a", "--size", "8M", "--policy", "p"])
        try daemon.ok(["vm", "create", "v", "--disk", "a"])
        try daemon.ok(["vm", "start", "v"])
        let result: ManagementResult = try daemon.json(["plugin", "call", "org.test.daemon", "daemon_echo", "old", "--vm", "v"])
        #expect(result.value == "a=echo 1 a old;")
    }
}
