import Foundation
import IOFilterAPI
import Testing

/// vhost-user-blk: a disk served to a guest's virtio driver from guest memory the
/// worker maps, through the same chain as NBD. A real Linux guest under QEMU (TCG), and
/// a scripted front-end (Fixtures/vhost_user_client.py) that programs rings no driver
/// would.
@Suite("vhost-user-blk", .serialized)
struct VhostUserTests {
    let directory = Harness.temporaryDirectory("vhost")
    static let client = Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/vhost_user_client.py").path

    /// A guest boots with its data disk on vhost-user-blk through the C sample and the
    /// cache; it writes files on ext4, syncs each, and the worker is killed -9 twice. The guest sees no I/O
    /// error, every file reads back after its caches are dropped, and the host's copy
    /// of the disk holds the same bytes (read over NBD after the guest is gone).
    @Test func aGuestWritesExt4ThroughTheChainAndSurvivesWorkerKills() throws {
        let disk = Harness.makeImage(directory.appendingPathComponent("guest.img").path, size: 256 << 20)
        try Harness.check(Harness.tool("mkfs.ext4"), ["-q", "-F", disk])
        let socket = directory.appendingPathComponent("guest.sock").path
        let served = try ServedDisk([disk, "--filter", "passthrough-c", "--filter", "cache:size=32M",
                                     "--vhost-user-blk", socket])
        defer { served.stop() }
        let initramfs = try Guest.initramfs(script: """
            echo "GUEST-SEGMENTS $(cat /sys/block/vda/queue/max_segments)"
            mount -t ext4 /dev/vda /mnt && echo GUEST-MOUNTED
            echo "GUEST-SERIAL $(cat /sys/block/vda/serial)"
            echo GUEST-WRITING
            i=0
            while [ $i -lt 48 ]; do
              dd if=/dev/urandom of=/mnt/f$i bs=64k count=16 2>/dev/null && sync && md5sum /mnt/f$i >> /tmp/sums
              i=$((i+1))
            done
            echo 3 > /proc/sys/vm/drop_caches
            md5sum -c /tmp/sums > /tmp/check 2>&1 && echo GUEST-VERIFIED || { grep -v OK /tmp/check; echo GUEST-VERIFY-FAILED; }
            md5sum /mnt/f0 /mnt/f47
            dmesg | grep -i -E "i/o error|ext4.*error|blk_update" | sed 's/^/GUEST-KERNEL /'
            umount /mnt && echo GUEST-UNMOUNTED
            """, in: directory)
        let guest = try Guest.boot(initramfs: initramfs, devices: Guest.vhostUserDisk(socket: socket))
        defer { Harness.end(guest.process) }
        #expect(Harness.eventually(120) { guest.output.snapshot().contains("GUEST-WRITING") }, "\(guest.output.snapshot())")
        #expect(guest.output.snapshot().contains("GUEST-MOUNTED"))
        // A request of as many segments as the guest may send, with its header and status,
        // fits the 128-entry ring: when it did not, writeback of scattered pages made one
        // that Linux waited to place forever (the guest hung 1 run in 3 under load).
        #expect(guest.output.snapshot().contains("GUEST-SEGMENTS 126"), "\(guest.output.snapshot())")
        // The disk's serial is its name, from GET_ID.
        #expect(guest.output.snapshot().contains("GUEST-SERIAL guest.img"))

        // Two kills while the guest writes and syncs: QEMU reconnects, and what the
        // killed worker had taken is submitted again (from the inflight region) or taken
        // again from the ring.
        for round in 1...2 {
            usleep(1_500_000)
            let worker = try #require(served.workerPID)
            kill(worker, SIGKILL)
            _ = try served.waitForNewWorker(replacing: worker)
            #expect(Harness.eventually(30) { served.log.components(separatedBy: "front-end connected").count > round + 1 },
                    "kill \(round): QEMU did not reconnect:\n\(served.log)")
        }
        #expect(Harness.eventually(240) { guest.output.snapshot().contains("GUEST-DONE") }, "\(guest.output.snapshot())\n\(served.log)")
        let console = guest.output.snapshot()
        #expect(console.contains("GUEST-VERIFIED"), "\(console)")
        #expect(console.contains("GUEST-UNMOUNTED"), "\(console)")
        #expect(!console.contains("GUEST-KERNEL"), "the guest saw I/O errors: \(console)")
        #expect(!console.contains("GUEST-MODULE-FAILED"), "\(console)")
        Harness.end(guest.process)

        // The host's view: the same files, read through the chain over NBD by the
        // kernel's own ext4 checksums (e2fsck on a copy made by qemu-img).
        let copy = directory.appendingPathComponent("copy.img").path
        try Harness.check(Harness.tool("qemu-img"), ["convert", "-f", "raw", "-O", "raw", served.uri, copy])
        let fsck = try Harness.run(Harness.tool("e2fsck"), ["-f", "-n", copy])
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout) \(fsck.stderr)")
    }

    /// A front-end that programs what no driver would: descriptors outside the guest's
    /// memory or past its end, a length that wraps, chains that loop or leave the table,
    /// indirect tables that are nested, misplaced, outside memory or loop, a readable
    /// piece after a writable one, a short header, reads past the disk,
    /// partial sectors, an unknown type, a ring whose index jumps, guest memory that can
    /// shrink, a hang-up mid-negotiation. Each gets an error status (or, for a chain
    /// that cannot be followed, nothing written), the worker never restarts, and a good
    /// client is served after all of them.
    @Test func aHostileFrontEndGetsErrorsAndNeverCrashesTheWorker() throws {
        let disk = Harness.makeImage(directory.appendingPathComponent("hostile.img").path, size: 64 << 20)
        let socket = directory.appendingPathComponent("hostile.sock").path
        let served = try ServedDisk([disk, "--filter", "passthrough-c", "--vhost-user-blk", socket])
        defer { served.stop() }
        let worker = try #require(served.workerPID)
        for scenario in ["good", "hostile", "break-ring", "unsealed", "hangup", "notifications", "good"] {
            let result = try Harness.run("/usr/bin/python3", [Self.client, socket, scenario], timeout: 60)
            #expect(result.status == 0, "\(scenario): \(result.stdout) \(result.stderr)\n\(served.log)")
            #expect(!result.stdout.contains("FAIL"), "\(scenario): \(result.stdout)")
            #expect(served.workerPID == worker, "the worker restarted during \(scenario):\n\(served.log)")
        }
        let log = served.log
        for reason in ["a descriptor outside the guest's memory", "a descriptor chain loops", "a descriptor's next is outside the table",
                       "a readable descriptor after a writable one", "a request header shorter than 16 bytes",
                       "the guest's ring indices make no sense", "guest memory in a memfd that can shrink",
                       "an indirect table outside the guest's memory", "an indirect table of a length no request has",
                       "an indirect descriptor where none may be"] {
            #expect(log.contains(reason), "the log does not say '\(reason)':\n\(log)")
        }
        // The disk's NBD export was there all along.
        #expect(try Harness.qemuIO(served.uri, ["read -P 0 1M 4k"]).contains("read 4096/4096"))
    }

    /// Bad input at the command line: a path that holds a file, or a socket another
    /// process serves, is refused with a message that says so, and nothing is served.
    @Test func aSocketPathThatIsTakenIsRefused() throws {
        let disk = Harness.makeImage(directory.appendingPathComponent("taken.img").path, size: 8 << 20)
        let file = directory.appendingPathComponent("not-a-socket").path
        _ = FileManager.default.createFile(atPath: file, contents: Data("keep me".utf8))
        let refused = try Harness.run(Harness.iofilter, ["serve", disk, "--vhost-user-blk", file], timeout: 30)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("exists and is not a socket"), "\(refused.stderr)")
        #expect(try String(contentsOfFile: file, encoding: .utf8) == "keep me")

        let socket = directory.appendingPathComponent("taken.sock").path
        let first = try ServedDisk([disk, "--vhost-user-blk", socket])
        defer { first.stop() }
        let second = try Harness.run(Harness.iofilter, ["serve", disk, "--vhost-user-blk", socket, "--state-dir", directory.appendingPathComponent("second").path], timeout: 30)
        #expect(second.status != 0)
        #expect(second.stderr.contains("is served by another process"), "\(second.stderr)")
        // The first still serves its front-end.
        let good = try Harness.run("/usr/bin/python3", [Self.client, socket, "good"], timeout: 60)
        #expect(good.status == 0, "\(good.stdout) \(good.stderr)")
    }

    /// A VM on iofilterd with --export vhost-user-blk: `vm show` names its socket, `vm
    /// libvirt-xml` prints a domain libvirt's schema accepts, and a guest on that socket
    /// writes through the VM's policy while iofilterd is killed -9 and restarted (it
    /// adopts the worker with both its sockets) and while a policy change replaces the
    /// worker live (the guest's front-end reconnects to the new one). The guest never
    /// sees an I/O error and every file reads back.
    @Test func aVMsGuestRidesThroughAHostRestartAndALivePolicyChange() throws {
        let daemon = try Daemon()
        let image = Harness.makeImage(directory.appendingPathComponent("vm-source.img").path, size: 128 << 20)
        try Harness.check(Harness.tool("mkfs.ext4"), ["-q", "-F", image])
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-passthrough-c")])
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache")])
        try daemon.ok(["policy", "create", "cached", "--filter", "org.swift-iofilter.passthrough-c", "--filter", "org.swift-iofilter.cache:size=16M"])
        try daemon.ok(["policy", "create", "plain", "--filter", "org.swift-iofilter.passthrough-c"])
        try daemon.ok(["disk", "import", "d", "--from", image, "--policy", "cached"])
        try daemon.ok(["vm", "create", "g", "--disk", "d", "--export", "vhost-user-blk"])
        try daemon.ok(["vm", "start", "g"])
        let vm = try daemon.json(["vm", "show", "g", "--json"], as: VMInfo.self)
        let socket = try #require(vm.vhostUserSockets?["d"], "vm show names no vhost-user socket")
        #expect(try daemon.ok(["vm", "show", "g"]).contains("vhost-user-blk: \(socket)"))

        // The domain libvirt would define: its schema accepts it, and it says what QEMU needs.
        let xml = try daemon.ok(["vm", "libvirt-xml", "g", "--memory", "256M", "--virt-type", "qemu", "--kernel", "/boot/vmlinuz", "--cmdline", "console=ttyS0"])
        let xmlFile = directory.appendingPathComponent("g.xml").path
        try xml.write(toFile: xmlFile, atomically: true, encoding: .utf8)
        let validated = try Harness.run(Harness.tool("virt-xml-validate"), [xmlFile, "domain"])
        #expect(validated.status == 0, "virt-xml-validate: \(validated.stdout) \(validated.stderr)\n\(xml)")
        for expected in ["<disk type='vhostuser' device='disk'>", "path='\(socket)'", "<reconnect enabled='yes' timeout='1'/>",
                         "<source type='memfd'/>", "<access mode='shared'/>"] {
            #expect(xml.contains(expected), "\(expected) missing from:\n\(xml)")
        }
        let nbdXML = try daemon.ok(["vm", "libvirt-xml", "g", "--nbd", "--disks-only"])
        #expect(nbdXML.contains("<source protocol='nbd' name='d'>") && !nbdXML.contains("vhostuser"), "\(nbdXML)")

        let initramfs = try Guest.initramfs(script: """
            mount -t ext4 /dev/vda /mnt && echo GUEST-MOUNTED
            echo GUEST-WRITING
            i=0
            while [ $i -lt 200 ]; do
              dd if=/dev/urandom of=/mnt/f$i bs=32k count=8 2>/dev/null && sync && md5sum /mnt/f$i >> /tmp/sums
              echo "GUEST-WROTE $i"
              i=$((i+1))
            done
            echo 3 > /proc/sys/vm/drop_caches
            md5sum -c /tmp/sums > /tmp/check 2>&1 && echo GUEST-VERIFIED || { grep -v OK /tmp/check; echo GUEST-VERIFY-FAILED; }
            dmesg | grep -i -E "i/o error|ext4.*error|blk_update" | sed 's/^/GUEST-KERNEL /'
            umount /mnt && echo GUEST-UNMOUNTED
            """, in: directory)
        let guest = try Guest.boot(initramfs: initramfs, devices: Guest.vhostUserDisk(socket: socket))
        defer { Harness.end(guest.process) }
        func wrote() -> Int { guest.output.snapshot().components(separatedBy: "GUEST-WROTE").count - 1 }
        #expect(Harness.eventually(120) { wrote() >= 4 }, "\(guest.output.snapshot())")

        // iofilterd killed -9 and started again: the worker serves on, adopted.
        let worker = try #require(vm.pid)
        daemon.kill(SIGKILL)
        let before = wrote()
        #expect(Harness.eventually(60) { wrote() > before + 2 }, "the guest stopped while no host ran")
        try daemon.start()
        #expect(Harness.eventually(30) { (try? daemon.json(["vm", "show", "g", "--json"], as: VMInfo.self).pid) == worker },
                "the worker was not adopted:\n\(daemon.log)")
        #expect(try daemon.ok(["events", "--limit", "50"]).contains("vm-adopted"))

        // A policy change replaces the worker live; the guest's front-end reconnects.
        try daemon.ok(["disk", "assign-policy", "d", "plain"])
        #expect(Harness.eventually(30) { (try? daemon.json(["vm", "show", "g", "--json"], as: VMInfo.self).pid).map { $0 != worker } ?? false })
        let afterChange = wrote()
        #expect(Harness.eventually(120) { wrote() > afterChange + 2 }, "the guest stopped after the policy change:\n\(daemon.log.suffix(3000))")

        #expect(Harness.eventually(240) { guest.output.snapshot().contains("GUEST-DONE") }, "\(guest.output.snapshot())\n\(daemon.log.suffix(3000))")
        let console = guest.output.snapshot()
        #expect(console.contains("GUEST-VERIFIED"), "\(console)")
        #expect(!console.contains("GUEST-KERNEL"), "the guest saw I/O errors: \(console)")
        Harness.end(guest.process)
        try daemon.ok(["vm", "stop", "g"])
        #expect(!FileManager.default.fileExists(atPath: socket), "the vhost-user socket outlived its VM")
    }

    /// libvirt, for real: Debian's libvirtd, in session mode as an unprivileged user (so
    /// that nothing of this machine's libvirt is touched), defines and starts the domain
    /// `vm libvirt-xml` prints for an iofilterd VM. Its QEMU, running as that user,
    /// reaches the disk socket through --guest-group alone; the guest writes and checks
    /// files on ext4; `virsh destroy` ends it; the disk holds a clean file system.
    @Test func libvirtStartsADomainWhoseDiskIofilterdServes() throws {
        let user: (uid: uid_t, gid: gid_t) = (65534, 65534)  // nobody, nogroup
        let daemon = try Daemon(arguments: ["--guest-group", "\(user.gid)"])
        let image = Harness.makeImage(directory.appendingPathComponent("libvirt-source.img").path, size: 64 << 20)
        try Harness.check(Harness.tool("mkfs.ext4"), ["-q", "-F", image])
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-passthrough-c")])
        try daemon.ok(["policy", "create", "plain", "--filter", "org.swift-iofilter.passthrough-c"])
        try daemon.ok(["disk", "import", "d", "--from", image, "--policy", "plain"])
        try daemon.ok(["vm", "create", "lv", "--disk", "d", "--export", "vhost-user-blk"])
        try daemon.ok(["vm", "start", "lv"])

        // The session's home, runtime directory and files, the user's own (a short path:
        // libvirt's sockets live under it).
        let home = URL(fileURLWithPath: "/tmp/iofl-\(UUID().uuidString.prefix(6))")
        let runtime = home.appendingPathComponent("run")
        try FileManager.default.createDirectory(at: runtime, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: home) }
        let initramfs = try Guest.initramfs(script: """
            mount -t ext4 /dev/vda /mnt && echo GUEST-MOUNTED
            i=0
            while [ $i -lt 16 ]; do
              dd if=/dev/urandom of=/mnt/f$i bs=64k count=4 2>/dev/null && md5sum /mnt/f$i >> /tmp/sums
              i=$((i+1))
            done
            sync; echo 3 > /proc/sys/vm/drop_caches
            md5sum -c /tmp/sums > /tmp/check 2>&1 && echo GUEST-VERIFIED || { grep -v OK /tmp/check; echo GUEST-VERIFY-FAILED; }
            umount /mnt && echo GUEST-UNMOUNTED
            sleep 3600
            """, in: home)
        let console = home.appendingPathComponent("console.log").path
        let kernel = try #require(Guest.kernel?.image)
        let xml = try daemon.ok(["vm", "libvirt-xml", "lv", "--memory", "256M", "--virt-type", "qemu", "--kernel", kernel, "--initrd", initramfs,
                                 "--cmdline", "console=ttyS0 quiet panic=-1", "--console-log", console])
        try xml.write(to: home.appendingPathComponent("lv.xml"), atomically: true, encoding: .utf8)
        try Harness.check("/bin/chown", ["-R", "\(user.uid):\(user.gid)", home.path])
        chmod(runtime.path, 0o700)

        func virsh(_ arguments: [String]) throws -> Harness.Output {
            try Harness.run("/usr/bin/setpriv", ["--reuid=\(user.uid)", "--regid=\(user.gid)", "--clear-groups", "/usr/bin/env",
                                                 "HOME=\(home.path)", "XDG_RUNTIME_DIR=\(runtime.path)", "XDG_CONFIG_HOME=\(home.path)/config",
                                                 "XDG_CACHE_HOME=\(home.path)/cache", Harness.tool("virsh"), "-c", "qemu:///session"] + arguments,
                            timeout: 120)
        }
        // virsh starts the session's daemons; they are ended here, whatever happens.
        defer {
            _ = try? virsh(["destroy", "lv"])
            _ = try? virsh(["undefine", "lv"])
            for daemonName in ["libvirtd", "virtqemud", "virtlogd"] {
                if let pid = try? String(contentsOfFile: "\(runtime.path)/libvirt/\(daemonName).pid", encoding: .utf8),
                   let number = pid_t(pid.trimmingCharacters(in: .whitespacesAndNewlines)) {
                    kill(number, SIGTERM)
                }
            }
        }
        let defined = try virsh(["define", home.appendingPathComponent("lv.xml").path])
        #expect(defined.status == 0, "virsh define: \(defined.stdout) \(defined.stderr)\n\(xml)")
        let started = try virsh(["start", "lv"])
        try #require(started.status == 0, "virsh start: \(started.stdout) \(started.stderr)\n\(daemon.log.suffix(2000))")
        func consoleText() -> String { (try? String(contentsOfFile: console, encoding: .utf8)) ?? "" }
        #expect(Harness.eventually(240) { consoleText().contains("GUEST-UNMOUNTED") }, "\(consoleText())\n\(daemon.log.suffix(2000))")
        #expect(consoleText().contains("GUEST-MOUNTED") && consoleText().contains("GUEST-VERIFIED"), "\(consoleText())")
        #expect(daemon.log.contains("a vhost-user front-end connected"), "\(daemon.log.suffix(2000))")
        #expect(try virsh(["domstate", "lv"]).stdout.contains("running"))
        let destroyed = try virsh(["destroy", "lv"])
        #expect(destroyed.status == 0, "virsh destroy: \(destroyed.stderr)")
        #expect(try virsh(["domstate", "lv"]).stdout.contains("shut off"))

        // The guest unmounted before it was destroyed: the disk, read over NBD through
        // the chain, holds a clean file system.
        let vm = try daemon.json(["vm", "show", "lv", "--json"], as: VMInfo.self)
        let copy = home.appendingPathComponent("copy.img").path
        try Harness.check(Harness.tool("qemu-img"), ["convert", "-f", "raw", "-O", "raw", try #require(vm.uris["d"]), copy])
        let fsck = try Harness.run(Harness.tool("e2fsck"), ["-f", "-n", copy])
        #expect(fsck.status == 0, "e2fsck: \(fsck.stdout) \(fsck.stderr)")
        try daemon.ok(["vm", "stop", "lv"])
    }
}
