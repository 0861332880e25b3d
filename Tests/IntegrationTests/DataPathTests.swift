import Foundation
import Testing

/// Real NBD clients against `iofilter serve` and its sandboxed worker, on real files.
@Suite("data path", .serialized)
struct DataPathTests {
    let directory = Harness.temporaryDirectory("data")
    let qemuIO = Harness.tool("qemu-io")
    let qemuImg = Harness.tool("qemu-img")

    func image(_ name: String, size: Int = 64 << 20) -> String {
        Harness.makeImage(directory.appendingPathComponent(name).path, size: size)
    }

    func io(_ uri: String, _ commands: [String]) throws -> String {
        try Harness.qemuIO(uri, commands)
    }

    @Test func qemuIOPatternsThroughTheCSampleMatchTheFile() throws {
        let disk = image("pattern.img")
        let passthrough = try Harness.buildPassthrough(in: directory)
        let served = try ServedDisk([disk, "--filter", passthrough])
        defer { served.stop() }
        let writes = [(0xa5, 0, 65536), (0x5a, 1 << 20, 4096), (0x11, 7 << 20 + 512, 131_072), (0xee, (64 << 20) - 4096, 4096)]
        for (pattern, offset, length) in writes {
            _ = try io(served.uri, ["write -P \(pattern) \(offset) \(length)"])
        }
        for (pattern, offset, length) in writes {
            let out = try io(served.uri, ["read -P \(pattern) \(offset) \(length)"])
            #expect(out.contains("read \(length)/\(length) bytes"))
        }
        _ = try io(served.uri, ["flush"])
        // What the export shows and what the file holds are the same bytes.
        let compare = try Harness.run(qemuImg, ["compare", "-f", "raw", "-F", "raw", served.uri, disk])
        #expect(compare.status == 0, "\(compare.stdout) \(compare.stderr)")
        #expect(compare.stdout.contains("Images are identical"))
        // And the counters of the sample saw the traffic (it is in the chain).
        #expect(served.waitForLog("org.swift-iofilter.passthrough-c"))
    }

    @Test func nbdinfoReportsSizeAndFlags() throws {
        let disk = image("info.img", size: 48 << 20)
        let served = try ServedDisk([disk])
        defer { served.stop() }
        let json = try Harness.check(Harness.tool("nbdinfo"), ["--json", served.uri])
        let object = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any]
        let export = (object?["exports"] as? [[String: Any]])?.first
        #expect(export?["export-size"] as? Int == 48 << 20)
        #expect(export?["can_flush"] as? Bool == true)
        #expect(export?["can_fua"] as? Bool == true)
        #expect(export?["can_trim"] as? Bool == true)
        #expect(export?["can_zero"] as? Bool == true)
        #expect(export?["can_multi_conn"] as? Bool == true)
        #expect(export?["is_read_only"] as? Bool == false)
        #expect(export?["block_size_maximum"] as? Int == 32 << 20)

        let readOnly = try ServedDisk([disk, "--readonly", "--socket", directory.appendingPathComponent("ro.sock").path])
        defer { readOnly.stop() }
        let roJSON = try Harness.check(Harness.tool("nbdinfo"), ["--json", readOnly.uri])
        #expect(roJSON.contains("\"is_read_only\": true"))
        let refused = try Harness.run(qemuIO, ["-f", "raw", "-c", "write 0 4096", readOnly.uri])
        #expect(!refused.stdout.contains("wrote") || refused.status != 0, "a write to a read-only export must fail")
    }

    @Test func nbdcopyRoundTripsBitExact() throws {
        let source = directory.appendingPathComponent("source.bin").path
        Harness.makeRandomFile(source, size: 24 << 20, seed: 42)
        let disk = image("copy.img", size: 24 << 20)
        let passthrough = try Harness.buildPassthrough(in: directory)
        let served = try ServedDisk([disk, "--filter", passthrough])
        defer { served.stop() }
        try Harness.check(Harness.tool("nbdcopy"), [source, served.uri])
        let back = directory.appendingPathComponent("back.bin").path
        try Harness.check(Harness.tool("nbdcopy"), [served.uri, back])
        #expect(try Harness.sha(back) == Harness.sha(source))
        #expect(try Harness.sha(disk) == Harness.sha(source))
    }

    @Test(arguments: ["pass", "defer", "defer-on-host", "invert"])
    func fioRandomWritesVerify(behaviour: String) throws {
        let disk = image("fio-\(behaviour).img", size: 64 << 20)
        let test = try Harness.buildTestPlugin("tf", in: directory)
        let passthrough = try Harness.buildPassthrough(in: directory)
        let served = try ServedDisk([disk, "--filter", "\(test):behaviour=\(behaviour)", "--filter", passthrough])
        defer { served.stop() }
        let out = try Harness.check(Harness.tool("fio"), [
            "--name=verify", "--ioengine=nbd", "--uri=\(served.uri)", "--rw=randwrite", "--bs=4k", "--size=32M",
            "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--output-format=terse",
        ])
        #expect(!out.isEmpty)
        if behaviour == "invert" {
            // The filter changed what reached the disk: the file holds the bytes inverted.
            let plain = try io(served.uri, ["read -v 0 16"])
            let raw = try Data(contentsOf: URL(fileURLWithPath: disk)).prefix(16)
            let shown = plain.split(separator: "\n").first?.split(separator: " ").dropFirst().prefix(16).compactMap { UInt8($0, radix: 16) } ?? []
            #expect(shown.count == 16)
            #expect(Array(raw) == shown.map { $0 ^ 0xff })
        }
    }

    /// A chain of five filters that defer every start and done to the host (ABI 1.7
    /// defer_call), one of them built against the 1.6 header (it falls back to a thread
    /// of its own): fio verifies what it wrote, and the host ran the deferred calls on
    /// the threads that ran the chain, with no executor thread.
    @Test func fiveFiltersDeferringToTheHostServeCorrectly() throws {
        let disk = image("executor.img", size: 64 << 20)
        var filters: [String] = []
        for category in ["inspection", "replication", "encryption", "cache", "qos"] {
            let plugin = try Harness.buildTestPlugin(
                "defer-\(category)", defines: ["CATEGORY=IOF_CATEGORY_\(category.uppercased())", "PLUGIN_NAME=\"org.test.\(category)\""],
                header: category == "qos" ? Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/abi-1.6").path : nil,
                in: directory)
            filters += ["--filter", "\(plugin):behaviour=defer-on-host"]
        }
        let served = try ServedDisk([disk] + filters)
        defer { served.stop() }
        #expect(try Harness.check(Harness.iofilter, ["plugin", "info", directory.appendingPathComponent("defer-qos.so").path])
            .contains("built for ABI 1.6"))
        let out = try Harness.check(Harness.tool("fio"), [
            "--name=verify", "--ioengine=nbd", "--uri=\(served.uri)", "--rw=randrw", "--bs=4k", "--size=16M",
            "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--randrepeat=1", "--output-format=terse",
        ])
        #expect(!out.isEmpty)
        _ = try io(served.uri, ["write -P 0x3c 40M 1M", "read -P 0x3c 40M 1M"])
        let worker = try #require(served.workerPID)
        let inner = try #require(Harness.children(of: worker).first)
        let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(inner)/task")) ?? []
        let names = threads.compactMap { try? String(contentsOfFile: "/proc/\(inner)/task/\($0)/comm", encoding: .utf8) }
        // The 1.7 filters' deferred calls ran on the thread that ran the chain, once each
        // callback had returned: no executor thread was needed.
        #expect(!names.contains { $0.hasPrefix("completions") }, "deferred calls made inside the chain hop no thread: \(names)")
    }

    @Test func trimAndWriteZeroesReadBackAsZeroes() throws {
        let disk = image("zero.img", size: 16 << 20)
        let served = try ServedDisk([disk])
        defer { served.stop() }
        _ = try io(served.uri, ["write -P 0x77 0 4M"])
        _ = try io(served.uri, ["write -z 1M 1M", "write -z -u 2M 64k"])
        #expect(try io(served.uri, ["read -P 0 1M 1M"]).contains("read 1048576/1048576"))
        #expect(try io(served.uri, ["read -P 0 2M 64k"]).contains("read 65536/65536"))
        #expect(try io(served.uri, ["read -P 0x77 0 1M"]).contains("read 1048576/1048576"))
        _ = try io(served.uri, ["discard 3M 1M", "flush"])
        // Neighbours of the discarded and zeroed ranges keep their data.
        #expect(try io(served.uri, ["read -P 0x77 2162688 4096"]).contains("read 4096/4096"))
    }

    @Test func aFailingFilterFailsTheRequestAndLeavesTheDisk() throws {
        let disk = image("fail.img", size: 8 << 20)
        let test = try Harness.buildTestPlugin("tf", in: directory)
        let served = try ServedDisk([disk, "--filter", "\(test):behaviour=fail-writes"])
        defer { served.stop() }
        let result = try Harness.run(qemuIO, ["-f", "raw", "-c", "write -P 0x99 0 4096", served.uri])
        #expect((result.stdout + result.stderr).contains("No space left on device"))
        #expect(try Data(contentsOf: URL(fileURLWithPath: disk)).prefix(4096).allSatisfy { $0 == 0 })
    }

    @Test func servesOverTCPAndThroughAnNBDBackend() throws {
        // Lower layer: a plain export of a file over TCP on loopback.
        let disk = image("lower.img", size: 16 << 20)
        let lower = try ServedDisk([disk, "--port", "0"])
        defer { lower.stop() }
        #expect(lower.uri.hasPrefix("nbd://127.0.0.1:"))
        // Upper layer: a chain whose backend is the lower export.
        let test = try Harness.buildTestPlugin("tf", in: directory)
        let upper = try ServedDisk([lower.uri, "--filter", "\(test):behaviour=defer",
                                    "--state-dir", directory.appendingPathComponent("upper-state").path])
        defer { upper.stop() }
        _ = try io(upper.uri, ["write -P 0x3c 1M 256k", "flush"])
        #expect(try io(upper.uri, ["read -P 0x3c 1M 256k"]).contains("read 262144/262144"))
        #expect(try io(lower.uri, ["read -P 0x3c 1M 256k"]).contains("read 262144/262144"))
        let fio = try Harness.check(Harness.tool("fio"), [
            "--name=proxy", "--ioengine=nbd", "--uri=\(upper.uri)", "--rw=randrw", "--bs=4k", "--size=8M",
            "--iodepth=16", "--verify=crc32c", "--verify_fatal=1", "--output-format=terse",
        ])
        #expect(!fio.isEmpty)
    }

    @Test func createsAndGrowsTheDiskFileWithSize() throws {
        let path = directory.appendingPathComponent("new.img").path
        let served = try ServedDisk([path, "--size", "8M"])
        _ = try io(served.uri, ["write -P 1 0 4096"])
        served.stop()
        #expect((try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) == 8 << 20)
        let grown = try ServedDisk([path, "--size", "16M"])
        defer { grown.stop() }
        #expect(try io(grown.uri, ["read -P 1 0 4096"]).contains("read 4096/4096"))
        let shrink = try Harness.run(Harness.iofilter, ["serve", path, "--size", "4M"], timeout: 30)
        #expect(shrink.status == 1)
        #expect(shrink.stderr.contains("larger than --size"))
    }

    @Test func refusesBadServeArgumentsClearly() throws {
        let missing = try Harness.run(Harness.iofilter, ["serve", directory.appendingPathComponent("nope.img").path], timeout: 30)
        #expect(missing.status != 0 && missing.stderr.contains("no such file; give --size to create it"))
        let disk = image("args.img", size: 1 << 20)
        let test = try Harness.buildTestPlugin("tf", in: directory)
        let badParameter = try Harness.run(Harness.iofilter, ["serve", disk, "--filter", "\(test):behaviour=sideways"], timeout: 30)
        #expect(badParameter.status != 0)
        #expect(badParameter.stderr.contains("org.test.filter: parameter 'behaviour' must be one of pass, defer"))
        let unknown = try Harness.run(Harness.iofilter, ["serve", disk, "--filter", "\(test):colour=red"], timeout: 30)
        #expect(unknown.stderr.contains("unknown parameter 'colour'; it takes behaviour, marker, depth, size"))
        let range = try Harness.run(Harness.iofilter, ["serve", disk, "--filter", "\(test):depth=100"], timeout: 30)
        #expect(range.stderr.contains("parameter 'depth' must be an integer in 1...64, got '100'"))
        let both = try Harness.run(Harness.iofilter, ["serve", disk, "--socket", "/tmp/x.sock", "--port", "1"], timeout: 30)
        #expect(both.status != 0 && both.stderr.contains("give --socket or --port, not both"))
    }

    @Test func aFailedAttachLeavesNoSidecarSoTheNextOpenAttachesAgain() throws {
        let disk = image("attach.img", size: 1 << 20)
        let test = try Harness.buildTestPlugin("tf-attach", in: directory)
        let sidecar = "\(disk).iofilter/attach.img/org.test.filter"
        let refused = try Harness.run(Harness.iofilter, ["serve", disk, "--filter", "\(test):behaviour=refuse-attach"], timeout: 30)
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("attach failed"))
        #expect(!FileManager.default.fileExists(atPath: sidecar), "the refused attach left its sidecar directory")
        let served = try ServedDisk([disk, "--filter", "\(test):behaviour=pass"])
        defer { served.stop() }
        #expect(FileManager.default.fileExists(atPath: "\(sidecar)/attached"), "attach ran again on the next open")
    }

    @Test func refusesABackendThatIsNoFileOrBlockDevice() throws {
        let fifo = directory.appendingPathComponent("fifo").path
        #expect(mkfifo(fifo, 0o600) == 0)
        let result = try Harness.run(Harness.iofilter, ["serve", fifo], timeout: 30)
        #expect(result.status != 0)
        #expect(result.stderr.contains("neither a regular file nor a block device"), "\(result.stderr)")
    }
}
