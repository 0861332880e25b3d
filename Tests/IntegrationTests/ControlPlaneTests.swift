import Foundation
import IOFilterAPI
import IOFilterModel
import IOFilterPosix
import Testing

/// iofilterd end to end, through the `iofilter` CLI against a real daemon, real workers,
/// real plug-ins and real NBD clients.
@Suite("control plane", .serialized)
struct ControlPlaneTests {
    static let cache = "org.swift-iofilter.cache"
    static let replication = "org.swift-iofilter.replication"
    static let passthrough = "org.swift-iofilter.passthrough-c"

    static func installSamples(_ daemon: Daemon) throws {
        try daemon.ok(["plugin", "install"] + ["iofilter-cache", "iofilter-replication", "iofilter-passthrough-c"].map(Daemon.samplePlugin))
    }

    static func readsBack(_ path: String, _ pattern: String, _ offset: String, _ length: String) -> Bool {
        let result = try? Harness.run(Harness.tool("qemu-io"), ["-r", "-f", "raw", "-c", "read -P \(pattern) \(offset) \(length)", path])
        return result?.status == 0 && result?.stdout.contains("Pattern verification failed") == false
    }

    /// `GET /vms` reuses each VM's JSON and the decoded rows while nothing changed (a
    /// thousand VMs answer in milliseconds): every change shows at once, and the body is
    /// byte for byte what encoding the whole list gives.
    @Test func theVMListFollowsEveryChangeAndEncodesAsAWhole() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        for name in ["l1", "l2", "l3"] {
            try daemon.ok(["disk", "create", "d-\(name)", "--size", "4M"])
            try daemon.ok(["vm", "create", name, "--disk", "d-\(name)"])
        }
        func list() throws -> (vms: [VMInfo], body: [UInt8]) {
            let response = try daemon.http("GET", "/vms")
            #expect(response.status == 200)
            return (try JSONDecoder().decode([VMInfo].self, from: Data(response.body)), response.body)
        }
        func states() throws -> [String] { try list().vms.map { "\($0.name):\($0.state.rawValue)" } }
        #expect(try states() == ["l1:stopped", "l2:stopped", "l3:stopped"])
        try daemon.ok(["vm", "start", "l2"])
        #expect(try states() == ["l1:stopped", "l2:running", "l3:stopped"])
        #expect(try states() == ["l1:stopped", "l2:running", "l3:stopped"])  // the kept JSON
        try daemon.ok(["vm", "stop", "l2"])
        try daemon.ok(["vm", "delete", "l3"])
        try daemon.ok(["vm", "create", "l0", "--disk", "d-l3"])
        #expect(try states() == ["l0:stopped", "l1:stopped", "l2:stopped"])
        try daemon.ok(["vm", "start", "l1"])
        let (vms, body) = try list()
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        #expect(Array(try encoder.encode(vms)) == body)
        #expect(vms.first { $0.name == "l1" }?.uris["d-l1"]?.hasPrefix("nbd+unix://") == true)
    }

    @Test func stateOnDiskIsPrivateToTheHost() throws {
        // A state directory that existed with a looser mode is closed at start.
        let state = Harness.temporaryDirectory("private")
        #expect(chmod(state.path, 0o755) == 0)
        let daemon = try Daemon(state: state)
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        try daemon.ok([
            "policy", "create", "private", "--filter", "\(Self.replication):target={state}/replicas/{disk}.img,mode=async",
            "--filter", "\(Self.cache):mode=write-back,size=16M",
        ])
        try daemon.ok(["disk", "create", "p1", "--size", "16M", "--policy", "private"])
        try daemon.ok(["vm", "create", "pvm", "--disk", "p1"])
        let started: VMInfo = try daemon.json(["vm", "start", "pvm"])
        _ = try Harness.qemuIO(try #require(started.uris["p1"]), ["write -P 7 0 1M", "flush"])

        var info = stat()
        #expect(stat(state.path, &info) == 0 && info.st_mode & 0o777 == 0o700)
        var checked = 0
        let walker = FileManager.default.enumerator(atPath: state.path)
        while let relative = walker?.nextObject() as? String {
            let path = state.appendingPathComponent(relative).path
            guard lstat(path, &info) == 0 else { continue }
            let kind = info.st_mode & S_IFMT
            guard kind == S_IFDIR || kind == S_IFREG else { continue }  // sockets live inside the closed directory
            // Installed plug-ins are read-only for the workers' identities (and only they
            // can reach them, through the closed directory); the rest is the host's alone.
            let allowed: mode_t = relative.hasPrefix("plugins/") && kind == S_IFREG ? 0o555 : 0o700
            #expect(info.st_mode & 0o777 & ~allowed == 0, "\(relative) is mode \(String(info.st_mode & 0o777, radix: 8))")
            checked += 1
        }
        // The database, the disk, the replica, the journal, the cache and their directories.
        #expect(checked >= 10, "only \(checked) files and directories")
        try daemon.ok(["vm", "stop", "pvm"])
    }

    /// A worker's cgroup value (v1 or v2) for one of its limits.
    static func cgroupValue(_ pid: Int32?, v1 controller: String, _ v1File: String, v2 v2File: String) -> String? {
        guard let pid, let groups = try? String(contentsOfFile: "/proc/\(pid)/cgroup", encoding: .utf8) else { return nil }
        for line in groups.split(separator: "\n") where line.contains("iofilter-worker") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard parts.count == 3 else { continue }
            let file = parts[1] == controller ? "/sys/fs/cgroup/\(controller)\(parts[2])/\(v1File)"
                : parts[1].isEmpty ? "/sys/fs/cgroup\(parts[2])/\(v2File)" : nil
            if let file { return (try? String(contentsOfFile: file, encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) }
        }
        return nil
    }
    /// Its memory limit: its cgroup's, or (no cgroup) its address-space limit.
    static func addressSpace(_ pid: Int32?) -> String? {
        if let limit = cgroupValue(pid, v1: "memory", "memory.limit_in_bytes", v2: "memory.max") { return limit }
        guard let pid, let text = try? String(contentsOfFile: "/proc/\(pid)/limits", encoding: .utf8) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix("Max address space") }
            .map { $0.split(separator: " ", omittingEmptySubsequences: true)[3...3].joined() }
    }

    @Test func aVMsDefaultMemoryLimitIsItsShareOfTheHost() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        for name in ["s1", "s2", "s3"] {
            try daemon.ok(["disk", "create", name, "--size", "8M"])
            try daemon.ok(["vm", "create", name, "--disk", name])
        }
        let hostMemory = UInt64(sysconf(Int32(_SC_PHYS_PAGES))) * UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let vm: VMInfo = try daemon.json(["vm", "start", "s1"])
        #expect(Self.addressSpace(vm.pid) == "\(WorkerConfiguration.defaultMemoryLimit(hostMemory: hostMemory, vms: 3))")
        // A fourth VM, and a host restart: the adopted worker's group takes the new
        // share without a restart of the worker.
        try daemon.ok(["disk", "create", "s4", "--size", "8M"])
        try daemon.ok(["vm", "create", "s4", "--disk", "s4"])
        daemon.leave()
        try daemon.start()
        let adopted: VMInfo = try daemon.json(["vm", "show", "s1"])
        #expect(adopted.pid == vm.pid)
        if Self.cgroupValue(vm.pid, v1: "memory", "memory.limit_in_bytes", v2: "memory.max") != nil {
            #expect(Self.addressSpace(vm.pid) == "\(WorkerConfiguration.defaultMemoryLimit(hostMemory: hostMemory, vms: 4))")
        }
        try daemon.ok(["vm", "stop", "s1"])
    }

    @Test func aVMsLimitsReachItsWorker() throws {
        let daemon = try Daemon(arguments: ["--worker-memory-limit", "2G"])
        defer { daemon.stop() }
        try daemon.ok(["disk", "create", "l1", "--size", "8M"])
        try daemon.ok(["disk", "create", "l2", "--size", "8M"])
        #expect(try daemon.refused(["vm", "create", "tiny", "--disk", "l1", "--memory-limit", "1M"]).contains("at least 256M"))
        try daemon.ok(["vm", "create", "limited", "--disk", "l1", "--memory-limit", "1G", "--max-connections", "2", "--cpu-weight", "50"])
        #expect(try daemon.refused(["vm", "create", "greedy", "--disk", "l2", "--cpu-weight", "0"]).contains("1...10000"))
        try daemon.ok(["vm", "create", "plain", "--disk", "l2"])
        let limited: VMInfo = try daemon.json(["vm", "start", "limited"])
        let plain: VMInfo = try daemon.json(["vm", "start", "plain"])
        #expect(limited.limits == VMLimits(memoryLimit: 1 << 30, maxConnections: 2, cpuWeight: 50))
        #expect(try daemon.ok(["vm", "show", "limited"]).contains("limits: memory 1024 MiB, 2 connections per disk, CPU weight 50"))
        // The worker runs under its VM's limit; another VM under the host's default:
        // its cgroup's, or (no cgroup here) its address-space limit.
        // CPU weight 50 is half the default: 512 shares in cgroup v1.
        if let weight = Self.cgroupValue(limited.pid, v1: "cpu", "cpu.shares", v2: "cpu.weight") {
            #expect(weight == "512" || weight == "50", "\(weight)")
        }
        #expect(Self.addressSpace(limited.pid) == "1073741824")
        #expect(Self.addressSpace(plain.pid) == "2147483648")
        // Two clients at once; a third is turned away while they stay. Connections that
        // have not negotiated do not count.
        let uri = try #require(limited.uris["l1"])
        let socket = try #require(uri.components(separatedBy: "socket=").last)
        let idle = (0..<5).map { _ in try? Sockets.connectUnix(path: socket) }
        defer { idle.forEach { if let fd = $0 { close(fd) } } }
        let two = try Harness.negotiatedClients(uri, count: 2)
        defer { Harness.end(two) }
        let third = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "read 0 4k", uri])
        #expect(third.status != 0, "the third client is turned away: \(third)")
        Harness.end(two)
        #expect(try Harness.eventually { try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "read 0 4k", uri]).status == 0 },
                "a client gets in once the two are gone")
        // Limits survive a restart of the host.
        daemon.stop()
        try daemon.start()
        let shown: VMInfo = try daemon.json(["vm", "show", "limited"])
        #expect(shown.limits?.maxConnections == 2 && shown.state == .running)
        #expect(Self.addressSpace(shown.pid) == "1073741824")
        try daemon.ok(["vm", "stop", "limited"])
        try daemon.ok(["vm", "stop", "plain"])
    }

    @Test func aHostThatDiedUncleanlyClearsItsLeftoversAtTheNextStart() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        func recoveries() throws -> [Event] {
            try daemon.json(["events"], as: [Event].self).filter { $0.kind == "host-recovered" }
        }
        #expect(try recoveries().isEmpty, "a first start is clean")

        // A worker of this state directory that no running host supervises: what a host
        // killed in the middle of spawning one could leave behind.
        let ghost = daemon.state.appendingPathComponent("vms/ghost").path
        try FileManager.default.createDirectory(atPath: ghost, withIntermediateDirectories: true)
        let configuration = WorkerConfiguration(vmName: "ghost", stateDirectory: ghost, disks: [], sandbox: false)
        let worker = Process()
        worker.executableURL = URL(fileURLWithPath: Harness.worker)
        worker.arguments = ["serve"]
        let input = Pipe()
        worker.standardInput = input
        worker.standardOutput = FileHandle.nullDevice
        worker.standardError = FileHandle.nullDevice
        try worker.run()
        input.fileHandleForWriting.write(try JSONEncoder().encode(configuration))
        try input.fileHandleForWriting.close()
        let leftover = worker.processIdentifier
        defer { kill(leftover, SIGKILL) }
        let scratch = daemon.state.appendingPathComponent("offline/work/stale").path
        try FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true)
        usleep(200_000)
        #expect(!Harness.isGone(leftover, within: 0.1), "the stand-in worker runs")

        daemon.kill(SIGKILL)
        try daemon.start()
        #expect(Harness.isGone(leftover), "the leftover worker was killed at start")
        #expect(!FileManager.default.fileExists(atPath: scratch), "scratch space was emptied")
        let after = try recoveries()
        #expect(after.count == 1)
        #expect(after.first?.message.contains("did not stop cleanly") == true, "\(after)")
        #expect(after.first?.message.contains("killed 1 leftover worker(s) (pid \(leftover))") == true, "\(after)")

        // A clean stop leaves no mark.
        daemon.stop()
        try daemon.start()
        #expect(try recoveries().count == 1)
    }

    @Test func aHostileFilterInOneVMLeavesTheOtherVMAndTheHostAlone() throws {
        // Two VMs on one host. VM A's filter misbehaves in turn: it freezes its worker,
        // allocates without bound (VM A has a 512M limit: small enough to be reached well
        // within the watchdog's 2 s on a loaded machine), forks, breaks its listening
        // socket, signals the host and tries the host's control socket. VM B verifies its
        // writes throughout.
        let daemon = try Daemon(arguments: ["--watchdog", "2"])
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        let directory = Harness.temporaryDirectory("hostile")
        try daemon.ok(["plugin", "install", try Harness.buildTestPlugin("hostile", in: directory)])
        try daemon.ok(["policy", "create", "calm", "--filter", "\(Self.cache):mode=write-back,size=16M", "--filter", Self.passthrough])
        try daemon.ok(["disk", "create", "b", "--size", "32M", "--policy", "calm"])
        try daemon.ok(["vm", "create", "vb", "--disk", "b"])
        let vmB: VMInfo = try daemon.json(["vm", "start", "vb"])
        let uriB = try #require(vmB.uris["b"])

        let daemonPID = daemon.process?.processIdentifier ?? 0
        let behaviours = ["hang-on-read", "allocate-on-read", "fork-on-open", "break-listener-on-open",
                          "signal-parent-on-open,marker=\(daemonPID)", "connect-on-open,marker=\(daemon.socket)"]
        for (index, behaviour) in behaviours.enumerated() {
            try daemon.ok(["policy", "create", "hostile-\(index)", "--filter", "org.test.filter:behaviour=\(behaviour)"])
            try daemon.ok(["disk", "create", "a\(index)", "--size", "8M", "--policy", "hostile-\(index)"])
            try daemon.ok(["vm", "create", "va\(index)", "--disk", "a\(index)", "--memory-limit", "512M"])
            var vmA: VMInfo = try daemon.json(["vm", "start", "va\(index)"])
            let uriA = try #require(vmA.uris["a\(index)"])

            let (verifyB, errors) = try Harness.verifyingFio(uriB, loops: 2, in: directory)

            _ = try Harness.qemuIO(uriA, ["write -P 0x4a 0 64k", "flush"])
            let hostile = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "read 2M 4096", uriA], timeout: 60)
            if behaviour == "hang-on-read" {
                #expect(hostile.status != 0 || !hostile.stdout.contains("read 4096/4096"))
                let frozen = vmA.pid
                let deadline = Date().addingTimeInterval(30)
                repeat {
                    usleep(100_000)
                    vmA = try daemon.json(["vm", "show", "va\(index)"])
                } while (vmA.pid == frozen || vmA.filters.isEmpty) && Date() < deadline
                #expect(vmA.pid != frozen && vmA.restarts >= 1, "the hung worker was replaced")
            }
            // VM A serves its disk, as it was, on the same socket.
            #expect(try Harness.qemuIO(uriA, ["read -P 0x4a 0 64k"]).contains("read 65536/65536"), "\(behaviour)")
            verifyB.waitUntilExit()
            #expect(verifyB.terminationStatus == 0, "VM B's verifying client failed while VM A ran \(behaviour): \(errors.text())")
            try daemon.ok(["vm", "stop", "va\(index)"])
        }
        let log = daemon.log
        // Memory: the kernel kills the worker at its cgroup's limit, or (no cgroup here)
        // its allocations fail at the address-space limit.
        let memory = log.contains("limited by its cgroup") ? "reached its memory limit of 512 MiB" : "allocation refused after"
        for refusal in ["stuck in filter org.test.filter", memory, "fork refused: Operation not permitted",
                        "shutdown of the listening socket refused", "signal to the parent refused: No such process",
                        "connect to the socket refused: Operation not permitted"] {
            #expect(log.contains(refusal), "the host's log says: \(refusal)")
        }
        // The hung worker's end and its replacement are events, naming its filters.
        let events: [Event] = try daemon.json(["events"])
        #expect(events.contains { $0.kind == "worker-exited" && $0.subject == "va0" && $0.message.contains("org.test.filter") })
        #expect(events.contains { $0.kind == "worker-restarted" && $0.subject == "va0" })
        #expect(!events.contains { $0.subject == "vb" && $0.kind.hasPrefix("worker-") })
        let after: VMInfo = try daemon.json(["vm", "show", "vb"])
        #expect(after.pid == vmB.pid && after.restarts == 0, "VM B's worker never restarted")
        #expect(daemon.process?.isRunning == true, "the host lives")
        try daemon.ok(["vm", "stop", "vb"])
    }

    @Test func twoHostsWithVMsOfOneNameKeepTheirWorkersApart() throws {
        // Their workers' cgroups must not be one: stopping one host's VM would kill
        // everything in the group, the other host's worker included.
        let first = try Daemon(), second = try Daemon()
        defer {
            first.stop()
            second.stop()
        }
        var uris: [String] = []
        for daemon in [first, second] {
            try daemon.ok(["disk", "create", "d", "--size", "8M"])
            try daemon.ok(["vm", "create", "twin", "--disk", "d"])
            let vm: VMInfo = try daemon.json(["vm", "start", "twin"])
            uris.append(try #require(vm.uris["d"]))
        }
        let kept: VMInfo = try second.json(["vm", "show", "twin"])
        try first.ok(["vm", "stop", "twin"])
        usleep(1_000_000)
        let after: VMInfo = try second.json(["vm", "show", "twin"])
        #expect(after.pid == kept.pid && after.restarts == 0, "the other host's worker lives on")
        #expect(!second.log.contains("worker-exited"), "\(second.log)")
        #expect(try Harness.qemuIO(uris[1], ["write -P 0x2e 0 64k", "read -P 0x2e 0 64k"]).contains("read 65536/65536"))
    }

    @Test func deletingADiskTakesTheReplicaItsPolicyPutInTheStateDirectory() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        let outside = Harness.temporaryDirectory("operator-replicas")
        try daemon.ok(["policy", "create", "inside", "--filter", "\(Self.replication):target={state}/replicas/{disk}.img,mode=sync"])
        try daemon.ok(["policy", "create", "outside", "--filter", "\(Self.replication):target=\(outside.path)/{disk}.img,mode=sync"])
        try daemon.ok(["disk", "create", "r1", "--size", "8M", "--policy", "inside"])
        try daemon.ok(["disk", "create", "r2", "--size", "8M", "--policy", "outside"])
        try daemon.ok(["vm", "create", "rv", "--disk", "r1", "--disk", "r2"])
        let vm: VMInfo = try daemon.json(["vm", "start", "rv"])
        for disk in ["r1", "r2"] { _ = try Harness.qemuIO(try #require(vm.uris[disk]), ["write -P 0x44 0 64k", "flush"]) }
        try daemon.ok(["vm", "stop", "rv"])
        try daemon.ok(["vm", "delete", "rv"])
        let inside = daemon.state.appendingPathComponent("replicas/r1.img").path
        let operators = outside.appendingPathComponent("r2.img").path
        #expect(FileManager.default.fileExists(atPath: inside) && FileManager.default.fileExists(atPath: operators))
        try daemon.ok(["disk", "delete", "r1"])
        try daemon.ok(["disk", "delete", "r2"])
        #expect(!FileManager.default.fileExists(atPath: inside), "the host's own replica went with its disk")
        #expect(FileManager.default.fileExists(atPath: operators), "a replica outside the state directory is the operator's")
        let events: [Event] = try daemon.json(["events"])
        #expect(events.contains { $0.kind == "disk-deleted" && $0.subject == "r1" && $0.message.contains("replicas/r1.img") })
    }

    @Test func aPolicyLifecycleAttachesDetachesAndGuardsWhatIsInUse() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        let plugins: [PluginInfo] = try daemon.json(["plugin", "list"])
        #expect(Set(plugins.map(\.name)) == [Self.cache, Self.replication, Self.passthrough])
        for plugin in plugins {
            #expect(plugin.path.hasPrefix(daemon.state.path + "/plugins/\(plugin.name)/1.0.0/"))
            #expect(FileManager.default.fileExists(atPath: plugin.path))
        }
        // Installing the same build again is a no-op, not a second copy, and says so.
        usleep(1_100_000)
        #expect(try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache")]).contains("is already installed"))
        let catalogue: Capabilities = try daemon.json(["capabilities"])
        #expect(catalogue.categories.map(\.rawValue) == ["inspection", "replication", "encryption", "cache", "qos"])
        #expect(catalogue.plugins.first { $0.plugin == Self.cache }?.parameters.contains { $0.name == "mode" && $0.kind == .enum } == true)

        // Validation: types and ranges, unknown plug-ins, one filter per category.
        let badMode = try daemon.cli(["policy", "validate", "draft", "--filter", "\(Self.cache):mode=sideways"])
        #expect(badMode.status == 1)
        #expect(badMode.stdout.contains("mode") && badMode.stdout.contains("write-back"))
        #expect(try daemon.refused(["policy", "create", "p0", "--filter", "org.example.nothing"]).contains("not installed"))
        let directory = Harness.temporaryDirectory("plugins")
        try daemon.ok(["plugin", "install", try Harness.buildTestPlugin("other-cache", in: directory)])
        let twoCaches = try daemon.cli(["policy", "validate", "x", "--filter", Self.cache, "--filter", "org.test.filter"])
        #expect(twoCaches.status == 1)
        #expect(twoCaches.stdout.contains(Self.cache) && twoCaches.stdout.contains("org.test.filter"))

        try daemon.ok([
            "policy", "create", "gold", "--description", "replicated and cached",
            "--filter", "\(Self.replication):target={state}/replicas/{disk}.img,mode=async",
            "--filter", "\(Self.cache):mode=write-back,size=16M",
        ])
        #expect(try daemon.refused(["policy", "create", "gold", "--filter", Self.cache]).contains("exists"))
        #expect(try daemon.ok(["policy", "validate", "gold"]).contains("\(Self.replication) 1.0.0 [replication] -> \(Self.cache) 1.0.0 [cache]"))

        // Assigning a policy to an idle disk attaches its filters at once.
        try daemon.ok(["disk", "create", "d1", "--size", "32M", "--policy", "gold"])
        #expect(try daemon.ok(["disk", "compliance", "d1"]) == "compliant\n")
        let sidecars = daemon.state.appendingPathComponent("disks/d1.state").path
        #expect(FileManager.default.fileExists(atPath: "\(sidecars)/\(Self.replication)/regions.map"))
        #expect(FileManager.default.fileExists(atPath: "\(sidecars)/\(Self.cache)"))

        // What is in use cannot go.
        #expect(try daemon.refused(["plugin", "remove", Self.cache]).contains("in use"))
        #expect(try daemon.refused(["policy", "delete", "gold"]).contains("assigned"))

        try daemon.ok(["vm", "create", "vm1", "--disk", "d1"])
        let started: VMInfo = try daemon.json(["vm", "start", "vm1"])
        let uri = try #require(started.uris["d1"])
        _ = try Harness.qemuIO(uri, ["write -P 0x5a 0 4M", "flush"])
        let shown: VMInfo = try daemon.json(["vm", "show", "vm1"])
        #expect(shown.state == .running && shown.pid == started.pid && shown.restarts == 0)
        #expect(shown.filters.first?.filters.map(\.plugin) == [Self.replication, Self.cache])
        #expect((shown.filters.first?.filters.last?.stats["dirty_bytes"] ?? 0) + (shown.filters.first?.filters.last?.stats["destaged_bytes"] ?? 0) > 0)
        #expect(try daemon.ok(["plugin", "call", Self.cache, "status", "--vm", "vm1"]).contains("vm1/d1: write-back"))

        // Removing the policy of a running VM's disk applies at once: a new worker without
        // filters takes the VM's clients over, and both filters are detached.
        try daemon.ok(["disk", "assign-policy", "d1", "--none"])
        #expect(try daemon.ok(["disk", "compliance", "d1"]).hasPrefix("none"))
        let live: VMInfo = try daemon.json(["vm", "show", "vm1"])
        #expect(live.state == .running && live.pid != started.pid && live.filters.first?.filters.isEmpty == true, "\(live)")
        #expect(!FileManager.default.fileExists(atPath: "\(sidecars)/\(Self.cache)"))
        // The write-back cache destaged before it was detached: the raw file has the data.
        #expect(Self.readsBack(daemon.state.appendingPathComponent("disks/d1.img").path, "0x5a", "0", "4M"))
        try daemon.ok(["vm", "stop", "vm1"])

        #expect(try daemon.refused(["plugin", "remove", Self.cache]).contains("policy gold"))
        try daemon.ok(["policy", "delete", "gold"])
        try daemon.ok(["plugin", "remove", Self.cache])
        let left: [PluginInfo] = try daemon.json(["plugin", "list"])
        #expect(!left.contains { $0.name == Self.cache })
        #expect(!FileManager.default.fileExists(atPath: daemon.state.appendingPathComponent("plugins/\(Self.cache)").path))
        let events = try daemon.ok(["events"])
        for kind in ["plugin-installed", "policy-created", "filters-attached", "vm-started", "filters-detached", "plugin-removed"] {
            #expect(events.contains(kind))
        }
    }

    @Test func aPluginUpgradeAppliesAtTheNextVMStart() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let directory = Harness.temporaryDirectory("upgrade")
        let old = try Harness.buildTestPlugin("filter-1.0", defines: ["PLUGIN_VERSION=\"1.0.0\""], in: directory)
        let new = try Harness.buildTestPlugin("filter-1.1", defines: ["PLUGIN_VERSION=\"1.1.0\""], in: directory)
        try daemon.ok(["plugin", "install", old])
        try daemon.ok(["policy", "create", "p", "--filter", "org.test.filter"])
        try daemon.ok(["disk", "create", "u1", "--size", "16M", "--policy", "p"])
        try daemon.ok(["vm", "create", "vmu", "--disk", "u1"])
        try daemon.ok(["vm", "start", "vmu"])
        try daemon.ok(["plugin", "install", new])
        let upgrade = try daemon.cli(["disk", "compliance", "u1"])
        #expect(upgrade.status == 2 && upgrade.stdout.contains("pending: upgrade org.test.filter 1.0.0 -> 1.1.0 at the next start of VM vmu"))
        var shown: VMInfo = try daemon.json(["vm", "show", "vmu"])
        #expect(shown.filters.first?.filters.first?.version == "1.0.0")
        #expect(try daemon.refused(["plugin", "remove", "org.test.filter", "--version", "1.0.0"]).contains("in use"))
        try daemon.ok(["vm", "stop", "vmu"])
        try daemon.ok(["vm", "start", "vmu"])
        shown = try daemon.json(["vm", "show", "vmu"])
        #expect(shown.filters.first?.filters.first?.version == "1.1.0")
        #expect(try daemon.ok(["disk", "compliance", "u1"]) == "compliant\n")
        try daemon.ok(["plugin", "remove", "org.test.filter", "--version", "1.0.0"])
        let versions: [PluginInfo] = try daemon.json(["plugin", "show", "org.test.filter"])
        #expect(versions.map(\.version) == ["1.1.0"])
    }

    @Test func aRestartedDaemonServesTheSameVMsAtTheSameURIs() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        try daemon.ok(["policy", "create", "wb", "--filter", "\(Self.cache):mode=write-back,size=16M"])
        try daemon.ok(["disk", "create", "a", "--size", "32M", "--policy", "wb"])
        try daemon.ok(["disk", "create", "b", "--size", "32M"])
        try daemon.ok(["vm", "create", "va", "--disk", "a"])
        try daemon.ok(["vm", "create", "vb", "--disk", "b"])
        let va: VMInfo = try daemon.json(["vm", "start", "va"])
        let vb: VMInfo = try daemon.json(["vm", "start", "vb"])
        _ = try Harness.qemuIO(va.uris["a"]!, ["write -P 0x11 0 2M", "flush"])
        _ = try Harness.qemuIO(vb.uris["b"]!, ["write -P 0x22 0 2M", "flush"])

        daemon.stop()
        // A graceful stop stops the workers too.
        for pid in [va.pid!, vb.pid!] { #expect(Harness.isGone(pid)) }
        try daemon.start()
        let vms: [VMInfo] = try daemon.json(["vm", "list"])
        #expect(vms.map(\.name) == ["va", "vb"])
        #expect(vms.allSatisfy { $0.state == .running })
        #expect(vms[0].uris == va.uris && vms[1].uris == vb.uris)
        #expect(vms[0].pid != va.pid && vms[1].pid != vb.pid)
        #expect(try Harness.qemuIO(va.uris["a"]!, ["read -P 0x11 0 2M"]).contains("read 2097152/2097152"))
        #expect(try Harness.qemuIO(vb.uris["b"]!, ["read -P 0x22 0 2M"]).contains("read 2097152/2097152"))
        #expect(try daemon.ok(["events"]).contains("vm-resumed"))
        // Stopped VMs stay stopped across a restart.
        try daemon.ok(["vm", "stop", "vb"])
        daemon.stop()
        try daemon.start()
        let again: [VMInfo] = try daemon.json(["vm", "list"])
        #expect(again.map(\.state) == [.running, .stopped])
    }

    @Test func offlineAccessGoesThroughAWriteBackCache() throws {
        let daemon = try Daemon()
        defer { daemon.kill(SIGKILL) }
        try Self.installSamples(daemon)
        // Destaging only when the cache closes: dirty data stays in the cache file.
        try daemon.ok(["policy", "create", "wb", "--filter", "\(Self.cache):mode=write-back,size=16M,destage-interval-ms=600000"])
        try daemon.ok(["disk", "create", "c", "--size", "32M", "--policy", "wb"])
        try daemon.ok(["vm", "create", "vc", "--disk", "c"])
        let vm: VMInfo = try daemon.json(["vm", "start", "vc"])
        _ = try Harness.qemuIO(vm.uris["c"]!, ["write -P 0x77 1M 2M", "flush"])
        let raw = daemon.state.appendingPathComponent("disks/c.img").path
        #expect(Self.readsBack(raw, "0", "1M", "2M"), "the test needs the new data to sit only in the cache")

        // While the VM runs, an export reads through its worker.
        let scratch = Harness.temporaryDirectory("exports")
        let online = scratch.appendingPathComponent("online.img").path
        #expect(try daemon.ok(["disk", "export", "c", online]).contains("through the VM vc"))
        // A finished export ends its NBD connection on purpose: no error in the log.
        #expect(!daemon.log.contains("lost the connection"), "\(daemon.log)")
        #expect(Self.readsBack(online, "0x77", "1M", "2M"))
        #expect(try daemon.refused(["disk", "serve", "c", "--offline"]).contains("while VM vc serves it"))
        #expect(try daemon.refused(["disk", "export", "c", online]).contains("exists"))

        // The host dies hard: its worker serves on, the flushed data in its cache only.
        daemon.kill(SIGKILL)
        #expect(!Harness.isGone(vm.pid!, within: 0.5))
        #expect(Self.readsBack(raw, "0", "1M", "2M"))
        // A host that resumes nothing stops it cleanly (the cache destages as it closes).
        try daemon.start(["--no-resume"])
        #expect(Harness.isGone(vm.pid!))
        let stopped: VMInfo = try daemon.json(["vm", "show", "vc"])
        #expect(stopped.state == .stopped)

        // An offline session serves the disk through its chain.
        let session: OfflineSession = try daemon.json(["disk", "serve", "c", "--offline", "--readonly", "--detach"])
        #expect(Self.readsBack(session.uri, "0x77", "1M", "2M"))
        #expect(try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "write 0 4k", session.uri]).status != 0)
        #expect(try daemon.refused(["vm", "start", "vc"]).contains("offline session"))
        try daemon.ok(["disk", "serve", "c", "--stop"])

        // An offline export equals what the guest wrote.
        let offline = scratch.appendingPathComponent("offline.img").path
        #expect(try daemon.ok(["disk", "export", "c", offline]).contains("through the offline worker"))
        #expect(try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", online, offline]).contains("identical"))

        // Copies and clones read through the chain too.
        try daemon.ok(["disk", "clone", "c", "c2"])
        #expect(Self.readsBack(daemon.state.appendingPathComponent("disks/c2.img").path, "0x77", "1M", "2M"))
        try daemon.ok(["disk", "snapshot", "c", "c-snap"])
        let snapshot: DiskInfo = try daemon.json(["disk", "show", "c-snap"])
        #expect(snapshot.readOnly && snapshot.snapshotOf == "c")
        try daemon.ok(["disk", "create", "c3", "--size", "32M"])
        try daemon.ok(["disk", "copy", "c", "c3"])
        #expect(Self.readsBack(daemon.state.appendingPathComponent("disks/c3.img").path, "0x77", "1M", "2M"))
        #expect(try daemon.refused(["disk", "copy", "c", "c-snap"]).contains("read-only"))

        // Import copies a raw image in, then attaches the policy's filters.
        try daemon.ok(["disk", "import", "imported", "--from", online, "--policy", "wb"])
        let imported = scratch.appendingPathComponent("imported.img").path
        try daemon.ok(["disk", "export", "imported", imported])
        #expect(try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", online, imported]).contains("identical"))

        // Grow: only idle disks, only larger; the data stays.
        #expect(try daemon.refused(["disk", "grow", "c2", "--size", "16M"]).contains("can only grow"))
        let grown: DiskInfo = try daemon.json(["disk", "grow", "c2", "--size", "48M"])
        #expect(grown.sizeBytes == 48 << 20)
        #expect(Self.readsBack(grown.path, "0x77", "1M", "2M"))
        try daemon.ok(["vm", "start", "vc"])
        #expect(try daemon.refused(["disk", "grow", "c", "--size", "64M"]).contains("while VM vc serves it"))
        #expect(try daemon.refused(["disk", "delete", "c"]).contains("belongs to VM vc"))
        #expect(try daemon.refused(["vm", "delete", "vc"]).contains("running"))
        try daemon.ok(["vm", "stop", "vc"])
        try daemon.ok(["vm", "delete", "vc"])
        try daemon.ok(["disk", "delete", "c"])
        #expect(!FileManager.default.fileExists(atPath: raw))
        #expect(!FileManager.default.fileExists(atPath: daemon.state.appendingPathComponent("disks/c.state").path))
    }

    @Test func concurrentAPICallsLeaveAConsistentState() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        try daemon.ok(["policy", "create", "wt", "--filter", "\(Self.cache):mode=write-through,size=4M"])
        let group = DispatchGroup()
        let results = Locked<[String: Int32]>([:])
        for worker in 0..<6 {
            DispatchQueue.global().async(group: group) {
                for index in 0..<3 {
                    let name = "w\(worker)-\(index)"
                    let created = (try? daemon.cli(["disk", "create", name, "--size", "8M"] + (index == 0 ? ["--policy", "wt"] : [])))?.status ?? -1
                    // Everyone races for the same name too: exactly one may win.
                    let contested = (try? daemon.cli(["disk", "create", "contested", "--size", "8M"]))?.status ?? -1
                    _ = try? daemon.cli(["disk", "list"])
                    results.withLock {
                        $0[name] = created
                        $0["contested-\(worker)-\(index)"] = contested
                    }
                }
            }
        }
        group.wait()
        let outcome = results.withLock { $0 }
        #expect(outcome.filter { $0.key.hasPrefix("w") }.allSatisfy { $0.value == 0 })
        #expect(outcome.filter { $0.key.hasPrefix("contested") && $0.value == 0 }.count == 1)
        let disks: [DiskInfo] = try daemon.json(["disk", "list"])
        #expect(disks.count == 19)
        for disk in disks {
            #expect(FileManager.default.fileExists(atPath: disk.path))
            #expect(disk.compliance.status == (disk.policy == nil ? .none : .compliant))
        }
        let files = try FileManager.default.contentsOfDirectory(atPath: daemon.state.appendingPathComponent("disks").path)
        #expect(files.filter { $0.hasSuffix(".img") }.count == 19)
        let check = try Harness.check(Harness.tool("sqlite3"), [daemon.state.appendingPathComponent("iofilterd.sqlite").path, "PRAGMA integrity_check"])
        #expect(check == "ok\n")
    }

    @Test func aLongExportHoldsBackOnlyWhatUsesItsDisk() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let scratch = Harness.temporaryDirectory("busy")
        let image = scratch.appendingPathComponent("random.img").path
        try Harness.check("/bin/sh", ["-c", "head -c 512M /dev/urandom > '\(image)'"])
        try daemon.ok(["disk", "import", "big", "--from", image])
        try daemon.ok(["vm", "create", "vbig", "--disk", "big"])
        let exported = scratch.appendingPathComponent("export.img").path
        let export = Process()
        export.executableURL = URL(fileURLWithPath: Harness.iofilter)
        export.arguments = ["disk", "export", "big", exported, "--socket", daemon.socket]
        export.standardOutput = FileHandle.nullDevice
        try export.run()
        var busy: DiskInfo?
        for _ in 0..<400 where busy == nil {
            let disk: DiskInfo = try daemon.json(["disk", "show", "big"])
            if disk.activity != nil { busy = disk } else { usleep(10_000) }
        }
        let during = try #require(busy, "the export never showed as the disk's activity")
        #expect(during.activity?.hasPrefix("exporting to \(exported)") == true, "\(during.activity ?? "")")
        // The activity tells how far it is (what the CLI shows as it waits).
        var percent: Int?
        for _ in 0..<400 where percent == nil && export.isRunning {
            let disk: DiskInfo = try daemon.json(["disk", "show", "big"])
            percent = disk.activity?.split(separator: " ").last.flatMap { $0.hasSuffix("%") ? Int($0.dropLast()) : nil }
            if percent == nil { usleep(10_000) }
        }
        #expect(percent.map { (0...100).contains($0) } == true, "no progress in the disk's activity")
        // Other changes go on meanwhile; what would open the disk waits its turn.
        try daemon.ok(["disk", "create", "other", "--size", "16M"])
        let refusal = try daemon.refused(["vm", "start", "vbig"])
        let stillExporting = export.isRunning
        export.waitUntilExit()
        #expect(export.terminationStatus == 0)
        #expect(stillExporting, "the export ended too soon to check what it holds back")
        #expect(refusal.contains("busy (exporting"), "\(refusal)")
        #expect(try Harness.check(Harness.tool("qemu-img"), ["compare", "-f", "raw", "-F", "raw", image, exported]).contains("identical"))
        let after: DiskInfo = try daemon.json(["disk", "show", "big"])
        #expect(after.activity == nil)
        try daemon.ok(["vm", "start", "vbig"])
    }

    @Test func failuresAnswerWithClearJSONAndChangeNothing() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        try Self.installSamples(daemon)
        func expectError(_ method: String, _ path: String, _ body: String?, status: Int, code: String, saying text: String) throws {
            let response = try daemon.http(method, path, body: body)
            #expect(response.status == status, "\(method) \(path): \(String(decoding: response.body, as: UTF8.self))")
            let problem = try JSONDecoder().decode(APIErrorBody.self, from: Data(response.body))
            #expect(problem.error == code)
            #expect(problem.message.contains(text), "\(problem.message)")
        }
        try expectError("POST", "/disks", "{not json", status: 400, code: "bad-request", saying: "not JSON")
        try expectError("POST", "/disks", #"{"name":"d"}"#, status: 400, code: "bad-request", saying: "missing field 'size'")
        try expectError("POST", "/disks", #"{"name":"d","size":"1G","colour":"red"}"#, status: 400, code: "bad-request", saying: "colour")
        try expectError("POST", "/disks", #"{"name":"../etc","size":"1G"}"#, status: 400, code: "bad-request", saying: "not valid")
        try expectError("POST", "/disks", #"{"name":"d","size":"lots"}"#, status: 400, code: "bad-request", saying: "not a positive size")
        try expectError("POST", "/disks", #"{"name":"d","size":"1M","policy":"nope"}"#, status: 404, code: "not-found", saying: "no policy named nope")
        try expectError("GET", "/vms/ghost", nil, status: 404, code: "not-found", saying: "no VM named ghost")
        try expectError("POST", "/vms", #"{"name":"v","disks":["ghost"]}"#, status: 404, code: "not-found", saying: "no disk named ghost")
        try expectError("GET", "/nowhere", nil, status: 404, code: "no-route", saying: "no API route")
        try expectError("PATCH", "/disks", nil, status: 405, code: "method-not-allowed", saying: "GET, POST")
        try expectError("POST", "/plugins", #"{"path":"/etc/hostname"}"#, status: 422, code: "invalid", saying: "not a valid plug-in")

        // A worker that will not start: a policy whose plug-in refuses to open the disk.
        let directory = Harness.temporaryDirectory("refuses")
        try daemon.ok(["plugin", "install", try Harness.buildTestPlugin("refuses", in: directory)])
        try daemon.ok(["policy", "create", "broken", "--filter", "org.test.filter:behaviour=refuse-open"])
        try daemon.ok(["disk", "create", "d", "--size", "16M"])
        try daemon.ok(["vm", "create", "v", "--disk", "d"])
        try daemon.ok(["disk", "assign-policy", "d", "broken"])
        let refusal = try daemon.refused(["vm", "start", "v"])
        #expect(refusal.contains("open failed"), "\(refusal)")
        let vm: VMInfo = try daemon.json(["vm", "show", "v"])
        #expect(vm.state == .stopped)
        let broken = try daemon.cli(["disk", "compliance", "d"])
        #expect(broken.status == 3 && broken.stdout.hasPrefix("non-compliant: VM v could not start"), "\(broken.stdout)")
        #expect(!FileManager.default.fileExists(atPath: daemon.state.appendingPathComponent("vms/v/d.sock").path))

        // Nothing above changed what exists.
        let disks: [DiskInfo] = try daemon.json(["disk", "list"])
        #expect(disks.map(\.name) == ["d"])
        let vms: [VMInfo] = try daemon.json(["vm", "list"])
        #expect(vms.map(\.name) == ["v"])
    }
}

final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<T>(_ body: (inout Value) -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body(&value)
    }
}
