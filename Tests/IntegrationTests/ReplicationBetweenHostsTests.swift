import Foundation
import IOFilterSDK
import IOFilterAPI
import IOFilterModel
import Testing

/// Two hosts on one machine: two network namespaces joined by a veth pair (addresses of
/// the documentation range, created inside them), each with its own iofilterd and state
/// directory. The replication sample ships host A's disk through A's daemon to B's
/// daemon, which keeps the replica as a disk of B's.
final class TwoHosts: @unchecked Sendable {
    static let addressA = "192.0.2.1"
    static let addressB = "192.0.2.2"
    static let peerPort = 10950
    nonisolated(unsafe) static var counter = 0

    let namespaceA: String
    let namespaceB: String
    let vethA: String
    let a: Daemon
    let b: Daemon

    init() throws {
        Self.counter += 1
        let tag = "\(getpid() % 100_000)x\(Self.counter)"
        namespaceA = "iof-a-\(tag)"
        namespaceB = "iof-b-\(tag)"
        vethA = "iva\(tag)"
        let vethB = "ivb\(tag)"
        for command in [
            ["netns", "add", namespaceA], ["netns", "add", namespaceB],
            ["link", "add", vethA, "type", "veth", "peer", "name", vethB],
            ["link", "set", vethA, "netns", namespaceA], ["link", "set", vethB, "netns", namespaceB],
            ["-n", namespaceA, "addr", "add", "\(Self.addressA)/24", "dev", vethA],
            ["-n", namespaceB, "addr", "add", "\(Self.addressB)/24", "dev", vethB],
            ["-n", namespaceA, "link", "set", vethA, "up"], ["-n", namespaceB, "link", "set", vethB, "up"],
            ["-n", namespaceA, "link", "set", "lo", "up"], ["-n", namespaceB, "link", "set", "lo", "up"],
        ] {
            try Harness.check("/usr/sbin/ip", command)
        }
        b = try Daemon(launcher: ["/usr/sbin/ip", "netns", "exec", namespaceB])
        a = try Daemon(launcher: ["/usr/sbin/ip", "netns", "exec", namespaceA])
    }

    /// Cuts (or restores) the link between the hosts.
    func link(up: Bool) throws {
        try Harness.check("/usr/sbin/ip", ["-n", namespaceA, "link", "set", vethA, up ? "up" : "down"])
    }

    deinit {
        a.stop()
        b.stop()
        // Deleting a namespace deletes the veth end in it, and so the pair.
        _ = try? Harness.run("/usr/sbin/ip", ["netns", "delete", namespaceA])
        _ = try? Harness.run("/usr/sbin/ip", ["netns", "delete", namespaceB])
    }
}

@Suite("replication between hosts", .serialized)
struct ReplicationBetweenHostsTests {
    static let plugin = "org.swift-iofilter.replication"
    let directory = Harness.temporaryDirectory("two-hosts")

    /// The replication filter's statistics for `disk` of `vm`.
    static func replicationStats(_ host: Daemon, vm: String, disk: String) throws -> [String: Double] {
        let info: VMInfo = try host.json(["vm", "show", vm])
        return info.filters.first { $0.disk == disk }?.filters.first { $0.plugin == plugin }?.stats ?? [:]
    }

    /// Waits until the replica holds everything written so far.
    static func waitForSync(_ host: Daemon, vm: String, disk: String, timeout: Double = 60) throws {
        let deadline = Date().addingTimeInterval(timeout)
        var stats: [String: Double] = [:]
        while Date() < deadline {
            stats = try replicationStats(host, vm: vm, disk: disk)
            if stats["state_in_sync"] == 1, stats["lag_bytes"] == 0, stats["dirty_regions"] == 0 { return }
            usleep(200_000)
        }
        throw HarnessError("the replica of \(disk) did not catch up in \(timeout)s: \(stats)\nA's log:\n\(host.log.suffix(3000))")
    }

    static func compare(_ one: String, _ other: String) throws -> Harness.Output {
        try Harness.run("/usr/bin/qemu-img", ["compare", "-f", "raw", "-F", "raw", one, other])
    }

    /// A replica deleted and made again at the same path must not pass for the old one,
    /// even where its identity cannot be kept in an attribute (a daemon's uid may not
    /// read one on a disk its host keeps private; here an immutable file refuses one).
    /// The next file made usually takes the freed inode number: the birth time tells
    /// them apart. This let a sender skip the full copy the new replica needed.
    @Test func aFileMadeAnewAtTheSamePathHasAnotherIdentity() throws {
        let path = directory.appendingPathComponent("replica-identity.img").path
        func makeImmutable() throws -> (identity: String, again: String, inode: UInt64) {
            _ = Harness.makeImage(path, size: 1 << 20)
            try Harness.check(Harness.tool("chattr"), ["+i", path])
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            defer { close(fd) }
            var info = stat()
            fstat(fd, &info)
            return (FileIO.identity(of: fd), FileIO.identity(of: fd), UInt64(info.st_ino))
        }
        let first = try makeImmutable()
        try Harness.check(Harness.tool("chattr"), ["-i", path])
        unlink(path)
        let second = try makeImmutable()
        try Harness.check(Harness.tool("chattr"), ["-i", path])
        #expect(first.identity == first.again && second.identity == second.again, "an identity is stable")
        #expect(first.identity != second.identity, "inode \(first.inode) then \(second.inode): \(first.identity) and \(second.identity)")
        #expect(first.identity.contains("-born"), "\(first.identity)")
    }

    @Test func asyncReplicationToAPeerHostSurvivesACutLinkAndFailsOver() throws {
        let hosts = try TwoHosts()
        let replication = Daemon.samplePlugin("iofilter-replication")
        let listen = "\(TwoHosts.addressB):\(TwoHosts.peerPort)"
        try hosts.b.ok(["plugin", "install", replication, "--daemon-listen", listen])
        let onB: [PluginInfo] = try hosts.b.json(["plugin", "show", Self.plugin])
        #expect(onB.first?.daemon?.state == .running && onB.first?.daemon?.listen == listen)

        try hosts.a.ok(["plugin", "install", replication])
        let target = "iofilter://\(listen)/web-replica"
        try hosts.a.ok(["policy", "create", "protected", "--filter", "\(Self.plugin):target=\(target),mode=async"])
        try hosts.a.ok(["disk", "create", "web", "--size", "64M", "--policy", "protected"])
        try hosts.a.ok(["vm", "create", "web", "--disk", "web"])
        let vm: VMInfo = try hosts.a.json(["vm", "start", "web"])
        let uri = try #require(vm.uris["web"])

        // fio writes on A; once drained, B's replica (created on first sync, listed by
        // B, read-only while a replica) holds the same bytes.
        let fio = try Harness.run("/usr/bin/fio", ["--name=a", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite", "--bs=4k",
                                                   "--size=32M", "--iodepth=16", "--io_size=16M", "--output-format=terse"])
        #expect(fio.status == 0, "\(fio.stderr)")
        try Self.waitForSync(hosts.a, vm: "web", disk: "web")
        let replica: DiskInfo = try hosts.b.json(["disk", "show", "web-replica"])
        #expect(replica.replicaOf == Self.plugin && replica.readOnly && replica.sizeBytes == 64 << 20, "\(replica)")
        let primaryFile = hosts.a.state.appendingPathComponent("disks/web.img").path
        let compared = try Self.compare(primaryFile, replica.path)
        #expect(compared.status == 0, "\(compared.stdout) \(compared.stderr)")

        // The link goes down while A keeps writing: A journals; the replica falls behind.
        try hosts.link(up: false)
        let during = try Harness.run("/usr/bin/qemu-io", ["-f", "raw", "-c", "write -P 0x6b 1M 4M", uri])
        #expect(during.status == 0, "\(during.stderr)")
        usleep(500_000)
        #expect(try Self.replicationStats(hosts.a, vm: "web", disk: "web")["lag_bytes"] ?? 0 > 0)
        #expect(try Self.compare(primaryFile, replica.path).status == 1, "the replica cannot have what was written while the link was down")
        // A's daemon gives up the silent peer (no TCP timeout is that short) and the
        // filter reports the replica unreachable within 30 s of the cut.
        let noticed = try Harness.eventually(30) { try hosts.a.ok(["vm", "show", "web", "--json"]).contains("unreachable") }
        #expect(noticed, "A's replication did not report the cut link within 30 s: \(hosts.a.log.suffix(2000))")
        #expect(hosts.a.log.contains("left a request unanswered"), "\(hosts.a.log.suffix(2000))")
        // Restored: it catches up.
        try hosts.link(up: true)
        try Self.waitForSync(hosts.a, vm: "web", disk: "web", timeout: 90)
        #expect(try Self.compare(primaryFile, replica.path).status == 0)

        // B loses the replica (promoted to be deleted, and B restarted): the disk its
        // daemon makes anew has another identity, so A copies everything again rather
        // than only what comes. A replica being kept cannot simply be deleted.
        let kept = try hosts.b.refused(["disk", "delete", "web-replica"])
        #expect(kept.contains("is a replica the daemon of \(Self.plugin) keeps"), "\(kept)")
        try hosts.b.ok(["disk", "promote", "web-replica"])
        try hosts.b.ok(["disk", "delete", "web-replica"])
        hosts.b.stop()
        try hosts.b.start()
        let remadeBy = Date().addingTimeInterval(30)
        while !hosts.a.log.contains("is not the one synced before") && Date() < remadeBy { usleep(100_000) }
        #expect(hosts.a.log.contains("is not the one synced before"), "\(hosts.a.log.suffix(3000))")
        try Self.waitForSync(hosts.a, vm: "web", disk: "web", timeout: 90)
        let remade: DiskInfo = try hosts.b.json(["disk", "show", "web-replica"])
        #expect(try Self.compare(primaryFile, remade.path).status == 0, "the remade replica holds the whole disk")

        // Failover drill: A's VM stops; B promotes the replica and runs a VM on it; the
        // data is the same.
        try hosts.a.ok(["vm", "stop", "web"])
        try hosts.b.ok(["disk", "promote", "web-replica"])
        let promoted: DiskInfo = try hosts.b.json(["disk", "show", "web-replica"])
        #expect(promoted.replicaOf == nil && !promoted.readOnly)
        try hosts.b.ok(["vm", "create", "web", "--disk", "web-replica"])
        let failedOver: VMInfo = try hosts.b.json(["vm", "start", "web"])
        let onHostB = try #require(failedOver.uris["web-replica"])
        let same = try Self.compare(primaryFile, onHostB)
        #expect(same.status == 0, "\(same.stdout) \(same.stderr)")
        #expect(try Harness.qemuIO(onHostB, ["write -P 0x77 0 64k", "read -P 0x77 0 64k"]).contains("read 65536/65536"),
                "the promoted disk is writable")
        // The old primary coming back does not overwrite it: B's daemon refuses its stream.
        try hosts.a.ok(["vm", "start", "web"])
        let deadline = Date().addingTimeInterval(20)
        while !hosts.b.log.contains("refused a replication stream for web-replica") && Date() < deadline { usleep(100_000) }
        #expect(hosts.b.log.contains("refused a replication stream for web-replica"), "\(hosts.b.log.suffix(2000))")
        #expect(try Harness.qemuIO(onHostB, ["read -P 0x77 0 64k"]).contains("read 65536/65536"))
        let status = try hosts.a.ok(["plugin", "call", Self.plugin, "status", "--vm", "web"])
        #expect(status.contains("degraded"), "\(status)")
    }

    @Test func daemonsSpeakTLSWithAPreSharedKeyAndRefuseAPeerWithout() throws {
        let hosts = try TwoHosts()
        let replication = Daemon.samplePlugin("iofilter-replication")
        let listen = "\(TwoHosts.addressB):\(TwoHosts.peerPort)"
        let keys = directory.appendingPathComponent("peers.psk").path
        try Harness.check("/usr/bin/psktool", ["-u", "host-a", "-p", keys])
        try hosts.b.ok(["plugin", "install", replication])
        try hosts.b.ok(["plugin", "daemon-listen", Self.plugin, listen, "--tls-psk", keys])
        try hosts.a.ok(["plugin", "install", replication])
        // One disk with the key, one without: only the first is replicated.
        try hosts.a.ok(["policy", "create", "keyed", "--filter", "\(Self.plugin):target=iofilter://\(listen)/keyed-replica,tls-psk=\(keys)"])
        try hosts.a.ok(["policy", "create", "keyless", "--filter", "\(Self.plugin):target=iofilter://\(listen)/keyless-replica"])
        for disk in ["keyed", "keyless"] {
            try hosts.a.ok(["disk", "create", disk, "--size", "16M", "--policy", disk])
        }
        try hosts.a.ok(["vm", "create", "web", "--disk", "keyed", "--disk", "keyless"])
        let vm: VMInfo = try hosts.a.json(["vm", "start", "web"])
        for disk in ["keyed", "keyless"] {
            #expect(try Harness.qemuIO(try #require(vm.uris[disk]), ["write -P 0x3c 0 1M"]).contains("wrote 1048576/1048576"))
        }
        try Self.waitForSync(hosts.a, vm: "web", disk: "keyed")
        let replica: DiskInfo = try hosts.b.json(["disk", "show", "keyed-replica"])
        #expect(try Self.compare(hosts.a.state.appendingPathComponent("disks/keyed.img").path, replica.path).status == 0)
        // The peer without the key never gets a replica made.
        #expect(hosts.b.log.contains("a peer failed the TLS handshake"), "\(hosts.b.log.suffix(2000))")
        #expect(try hosts.b.cli(["disk", "show", "keyless-replica"]).status != 0)
        #expect(try Self.replicationStats(hosts.a, vm: "web", disk: "keyless")["state_degraded"] == 1)
    }
}
