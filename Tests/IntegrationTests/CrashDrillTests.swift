import Foundation
import IOFilterAPI
import Testing

/// Crash drills: a VM's worker killed with SIGKILL 100 times, then the host itself 20
/// times with its worker, each time with writes in flight through the full sample chain (replication,
/// write-back cache, the C sample). Whatever was acknowledged after a flush must come
/// back, the state database must stay sound, and the VM must be back on its socket.
@Suite("crash drills", .serialized)
struct CrashDrillTests {
    static let workerKills = 100
    static let hostKills = 20
    static let region = 64 << 10

    /// Each kill gets a 64 KiB region of its own, with a pattern of its own.
    static func write(_ uri: String, region index: Int) throws {
        _ = try Harness.qemuIO(uri, ["write -P \(pattern(index)) \(index * region) \(region)", "flush"])
    }

    static func pattern(_ index: Int) -> Int { index % 251 + 1 }

    static func readsBack(_ target: String, regions: Range<Int>, raw: Bool = false) throws -> [Int] {
        let commands = regions.flatMap { ["-c", "read -P \(pattern($0)) \($0 * region) \(region)"] }
        let result = try Harness.run(Harness.tool("qemu-io"), (raw ? ["-r"] : []) + ["-f", "raw"] + commands + [target], timeout: 300)
        // qemu-io prints one "Pattern verification failed at offset N" per bad read.
        return result.stdout.split(separator: "\n").compactMap { line -> Int? in
            guard line.contains("Pattern verification failed") else { return nil }
            return line.split(separator: " ").compactMap { Int($0) }.first.map { $0 / region }
        } + (result.status == 0 ? [] : [-1])
    }

    /// Waits until the VM runs a worker other than `old` that answers, and returns it.
    static func waitForWorker(_ daemon: Daemon, vm: String, replacing old: Int32?, timeout: Double = 60) throws -> VMInfo {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let info = try? daemon.json(["vm", "show", vm], as: VMInfo.self), info.state == .running,
               let pid = info.pid, pid != old, !info.filters.isEmpty {
                return info
            }
            usleep(50_000)
        }
        throw HarnessError("VM \(vm) did not come back within \(timeout)s:\n\(daemon.log.suffix(3000))")
    }

    /// fio's random writes on the disk's upper half, in flight when the kill comes. One
    /// process (`--thread`), spawned and reaped here directly, so that SIGKILL ends all of
    /// it at once (fio keeps retrying a lost connection until its run time ends).
    func startLoad(_ uri: String) -> pid_t {
        let arguments = [Harness.tool("fio"), "--name=load", "--thread", "--ioengine=nbd", "--uri=\(uri)", "--rw=randwrite",
                         "--bs=4k", "--iodepth=8", "--offset=32M", "--size=32M", "--time_based", "--runtime=10",
                         "--output=/dev/null"]
        let argv = arguments.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid = pid_t()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
        defer { posix_spawn_file_actions_destroy(&actions) }
        #expect(posix_spawn(&pid, arguments[0], &actions, nil, argv, environ) == 0)
        return pid
    }

    func stop(_ load: pid_t) {
        kill(load, SIGKILL)
        var status: Int32 = 0
        _ = waitpid(load, &status, 0)
    }

    @Test func killedWorkersAndAKilledHostLoseNothingFlushed() throws {
        let daemon = try Daemon(arguments: ["--restart-backoff-max", "0.2"])
        defer { daemon.stop() }
        try ControlPlaneTests.installSamples(daemon)
        try daemon.ok([
            "policy", "create", "full",
            "--filter", "\(ControlPlaneTests.replication):target={state}/replicas/{disk}.img,mode=async",
            "--filter", "\(ControlPlaneTests.cache):mode=write-back,size=16M",
            "--filter", ControlPlaneTests.passthrough,
        ])
        try daemon.ok(["disk", "create", "drill", "--size", "64M", "--policy", "full"])
        try daemon.ok(["vm", "create", "dv", "--disk", "drill"])
        var vm: VMInfo = try daemon.json(["vm", "start", "dv"])
        let uri = try #require(vm.uris["drill"])

        // The worker, killed while fio writes elsewhere on the disk.
        var workerRestarts = 0
        for index in 0..<Self.workerKills {
            try Self.write(uri, region: index)
            let load = startLoad(uri)
            usleep(300_000)  // fio connected and writing
            kill(try #require(vm.pid), SIGKILL)
            vm = try Self.waitForWorker(daemon, vm: "dv", replacing: vm.pid)
            stop(load)
            workerRestarts += 1
            #expect(vm.uris["drill"] == uri, "the VM is back on its socket")
            #expect(try Self.readsBack(uri, regions: index..<(index + 1)).isEmpty, "region \(index) after kill \(index + 1)")
        }
        #expect(try Self.readsBack(uri, regions: 0..<Self.workerKills).isEmpty, "every flushed region after \(workerRestarts) worker kills")

        // The host and its worker, both killed (a worker outlives a host that merely
        // crashes, so this is the machine's whole stack going down); it brings the VM
        // back on the same socket.
        for kill in 0..<Self.hostKills {
            let index = Self.workerKills + kill
            try Self.write(uri, region: index)
            let load = startLoad(uri)
            usleep(300_000)  // fio connected and writing
            daemon.kill(SIGKILL)
            Glibc.kill(try #require(vm.pid), SIGKILL)
            stop(load)
            try daemon.start()
            vm = try Self.waitForWorker(daemon, vm: "dv", replacing: nil)
            #expect(vm.uris["drill"] == uri)
            #expect(try Self.readsBack(uri, regions: index..<(index + 1)).isEmpty, "region \(index) after host kill \(kill + 1)")
        }
        let regions = Self.workerKills + Self.hostKills
        #expect(try Self.readsBack(uri, regions: 0..<regions).isEmpty, "every flushed region after all \(regions) kills")

        // The state database is sound and agrees with the disk.
        let database = daemon.state.appendingPathComponent("iofilterd.sqlite").path
        let check = try Harness.run(Harness.tool("sqlite3"), [database, "PRAGMA integrity_check"], timeout: 60)
        #expect(check.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "ok", "\(check.stdout) \(check.stderr)")
        #expect(try daemon.ok(["disk", "compliance", "drill"]) == "compliant\n")
        // A graceful stop destages the cache: the raw file then holds every region.
        try daemon.ok(["vm", "stop", "dv"])
        let raw = daemon.state.appendingPathComponent("disks/drill.img").path
        #expect(try Self.readsBack(raw, regions: 0..<regions, raw: true).isEmpty, "the disk file after the cache destaged")
    }
}
