import Foundation
import Testing

/// Sparse-aware clients through a real chain: block status (base:allocation) from the
/// file's own holes up through the filters, structured replies, fast zero and cache
/// hints, checked with nbdinfo, nbdcopy, qemu-img and nbdsh.
@Suite("block status")
struct BlockStatusTests {
    let directory = Harness.temporaryDirectory("sparse")

    /// A 64 MiB sparse disk with data at 10-12 MiB and 40-41 MiB.
    func sparseDisk() throws -> String {
        let path = Harness.makeImage(directory.appendingPathComponent("sparse.img").path, size: 64 << 20)
        for (offset, count) in [(10, 2), (40, 1)] {
            try Harness.check("/bin/dd", ["if=/dev/urandom", "of=\(path)", "bs=1M", "count=\(count)", "seek=\(offset)", "conv=notrunc", "status=none"])
        }
        return path
    }

    /// `qemu-img map --output=json` as (start, length, data, zero), merged where equal.
    static func map(_ target: String) throws -> [[String]] {
        let json = try Harness.check(Harness.tool("qemu-img"), ["map", "--output=json", target])
        let entries = try #require(try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]])
        var merged: [[String]] = []
        for entry in entries {
            let start = "\(entry["start"]!)", length = "\(entry["length"]!)"
            let data = "\((entry["data"] as? Bool) ?? false)", zero = "\((entry["zero"] as? Bool) ?? false)"
            if let last = merged.last, last[2] == data, last[3] == zero {
                merged[merged.count - 1][1] = String(Int(last[1])! + Int(length)!)
            } else {
                merged.append([start, length, data, zero])
            }
        }
        return merged
    }

    static func nbdsh(_ uri: String, _ script: String) throws -> String {
        // The system's python3 has libnbd's module (python3-libnbd).
        try Harness.check("/usr/bin/python3", ["-m", "nbd", "-u", uri, "-c", script])
    }

    @Test func holesReachTheConsumerThroughTheChain() throws {
        let disk = try sparseDisk()
        let served = try ServedDisk([disk, "--socket", directory.appendingPathComponent("a.sock").path,
                                     "--filter", Daemon.samplePlugin("iofilter-passthrough-c"),
                                     "--filter", Daemon.samplePlugin("iofilter-cache") + ":mode=write-back,destage-interval-ms=600000"])
        defer { served.stop() }
        let map = try Harness.check(Harness.tool("nbdinfo"), ["--map", served.uri])
        let lines = map.split(separator: "\n").map { $0.split(separator: " ", omittingEmptySubsequences: true).map(String.init) }
        #expect(lines.map { [$0[0], $0[1], $0[3]] } == [
            ["0", "10485760", "hole,zero"], ["10485760", "2097152", "data"], ["12582912", "29360128", "hole,zero"],
            ["41943040", "1048576", "data"], ["42991616", "24117248", "hole,zero"],
        ], "\(map)")
        #expect(try Self.map(served.uri) == Self.map(disk))

        // A block the write-back cache holds, not yet on the disk, is data.
        _ = try Self.nbdsh(served.uri, "h.pwrite(b'\\xab' * 4096, 20 << 20)")
        let afterWrite = try Harness.check(Harness.tool("nbdinfo"), ["--map", served.uri])
        #expect(afterWrite.contains("20971520        4096    0  data"), "\(afterWrite)")
        #expect(try Self.map(disk).contains { $0[0] == "12582912" && $0[1] == "29360128" && $0[2] == "false" }, "the block is only in the cache")

        // Copies are sparse and identical.
        let copy = directory.appendingPathComponent("copy.img").path
        try Harness.check(Harness.tool("nbdcopy"), [served.uri, copy])
        let converted = directory.appendingPathComponent("converted.img").path
        try Harness.check(Harness.tool("qemu-img"), ["convert", "-O", "raw", served.uri, converted])
        #expect(try Harness.sha(copy) == Harness.sha(converted))
        for file in [copy, converted] {
            var info = stat()
            #expect(stat(file, &info) == 0 && Int(info.st_blocks) * 512 < 8 << 20, "\(file) is not sparse: \(info.st_blocks) blocks")
        }
        let probe = try Self.nbdsh(served.uri, "print(h.pread(4096, 20 << 20)[:1] == b'\\xab', h.pread(4096, 0) == bytearray(4096))")
        #expect(probe.contains("True True"))
    }

    @Test func fastZeroAndCacheHintsHaveTheirMeaning() throws {
        let disk = try sparseDisk()
        let served = try ServedDisk([disk, "--socket", directory.appendingPathComponent("b.sock").path,
                                     "--filter", Daemon.samplePlugin("iofilter-passthrough-c")])
        defer { served.stop() }
        let answer = try Self.nbdsh(served.uri, """
            print(h.can_fast_zero(), h.can_cache(), h.can_zero())
            h.zero(2 << 20, 10 << 20, nbd.CMD_FLAG_FAST_ZERO)
            h.cache(1 << 20, 40 << 20)
            print(h.pread(4096, (10 << 20) + 8192) == bytearray(4096), h.pread(4096, 40 << 20) != bytearray(4096))
            """)
        #expect(answer == "True True True\nTrue True\n", "\(answer)")
        // The zeroed range is a hole in the file itself (punched, not written).
        #expect(try Self.map(disk).first == ["0", "41943040", "false", "true"])

        // Block status asked for one extent answers one, from the offset.
        let one = try Self.nbdsh(served.uri, """
            h2 = nbd.NBD()
            h2.add_meta_context("base:allocation")
            h2.connect_uri(\"\(served.uri)\")
            seen = []
            h2.block_status(64 << 20, 0, lambda ctx, off, entries, err: seen.append((ctx, off, list(entries))), nbd.CMD_FLAG_REQ_ONE)
            print(seen)
            """)
        #expect(one.contains("('base:allocation', 0, [41943040, 3])"), "\(one)")
    }

    @Test func anEncryptionFilterBuiltFor10TurnsHolesIntoData() throws {
        let disk = try sparseDisk()
        let plugin = try Harness.buildTestPlugin(
            "old-encryption", defines: ["CATEGORY=IOF_CATEGORY_ENCRYPTION", "PLUGIN_NAME=\"org.test.old-encryption\""],
            header: Harness.abi10Header, in: directory)
        let served = try ServedDisk([disk, "--socket", directory.appendingPathComponent("c.sock").path, "--filter", plugin])
        defer { served.stop() }
        let map = try Harness.check(Harness.tool("nbdinfo"), ["--map", served.uri])
        #expect(map.split(separator: "\n").count == 1 && map.contains("67108864    0  data"), "\(map)")
        // It still serves the bytes.
        let copy = directory.appendingPathComponent("through-old.img").path
        try Harness.check(Harness.tool("nbdcopy"), [served.uri, copy])
        #expect(try Harness.sha(copy) == Harness.sha(disk))
    }

    @Test func theCacheSamplePrefetchesOnACacheHint() throws {
        let disk = try sparseDisk()
        let socket = directory.appendingPathComponent("d.sock").path
        let cache = Daemon.samplePlugin("iofilter-cache")
        let served = try ServedDisk([disk, "--socket", socket, "--filter", cache + ":size=8M"])
        defer { served.stop() }
        func status() throws -> String {
            try Harness.check(Harness.iofilter, ["plugin", "call", cache, "status", "--serve", socket + ".control"])
        }
        _ = try Self.nbdsh(served.uri, "h.cache(1 << 20, 10 << 20)")
        #expect(try status().contains("1048576 cached bytes"))
        // The hinted range is then read from the cache alone.
        #expect(try Harness.qemuIO(served.uri, ["read 10M 1M"]).contains("read 1048576/1048576"))
        let after = try status()
        #expect(after.contains("hit ratio 100%"), "\(after)")
    }
}
