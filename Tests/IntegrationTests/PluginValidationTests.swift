import Foundation
import Testing

/// `iofilter plugin validate` against real shared objects, good and malformed, each
/// built here with cc. The caller must never crash and must give a one-line reason.
@Suite("plug-in validation")
struct PluginValidationTests {
    let directory = Harness.temporaryDirectory("validate")

    private func validate(_ paths: [String], json: Bool = false, timeout: Double = 5) throws -> Harness.Output {
        try Harness.run(Harness.iofilter, ["plugin", "validate", "--timeout", "\(timeout)"] + (json ? ["--json"] : []) + paths)
    }

    /// Asserts the CLI refused `path` with exit status 1 and a reason containing `reason`.
    private func expectRefused(_ paths: [String], reason: String, timeout: Double = 5,
                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let result = try validate(paths, timeout: timeout)
        #expect(result.status == 1, "exit status for \(paths)", sourceLocation: sourceLocation)
        let lines = result.stderr.split(separator: "\n").filter { $0.hasPrefix("error: ") }
        #expect(lines.count == 1, "one-line reason, got: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(result.stderr.contains(reason), "expected '\(reason)' in: \(result.stderr)", sourceLocation: sourceLocation)
        #expect(!result.stderr.contains("Backtrac"), "no crash report from the caller: \(result.stderr)", sourceLocation: sourceLocation)
    }

    @Test func acceptsTheSamplesAndPrintsTheChainInCategoryOrder() throws {
        let passthrough = try Harness.buildPassthrough(in: directory)
        let cache = try Harness.buildTestPlugin("cache", defines: ["PLUGIN_NAME=\"org.test.cache\"", "CATEGORY=IOF_CATEGORY_CACHE"], in: directory)
        let replication = try Harness.buildTestPlugin("repl", defines: ["PLUGIN_NAME=\"org.test.repl\"", "CATEGORY=IOF_CATEGORY_REPLICATION"], in: directory)
        for order in [[cache, passthrough, replication], [replication, cache, passthrough], [passthrough, replication, cache]] {
            let result = try validate(order, json: true)
            #expect(result.status == 0, "\(result.stderr)")
            struct Report: Decodable {
                struct Link: Decodable { let name: String; let category: String }
                struct Plugin: Decodable { let name: String }
                let plugins: [Plugin]
                let chain: [Link]
            }
            let report = try JSONDecoder().decode(Report.self, from: Data(result.stdout.utf8))
            #expect(report.plugins.count == 3)
            #expect(report.chain.map(\.category) == ["inspection", "replication", "cache"])
            #expect(report.chain.map(\.name) == ["org.swift-iofilter.passthrough-c", "org.test.repl", "org.test.cache"])
        }
        let text = try validate([cache, passthrough])
        #expect(text.status == 0)
        #expect(text.stdout.contains("chain: consumer -> org.swift-iofilter.passthrough-c [inspection] -> org.test.cache [cache] -> disk"))
    }

    @Test func aPluginBuiltAgainstTheABI10HeaderStillLoadsAndServes() throws {
        // ABI 1.1 appended open_target to the host's services: a 1.0 plug-in never
        // looks past its struct_size, and the host takes its 1.0 descriptor as it is.
        let old = try Harness.buildTestPlugin("abi-1.0", defines: ["PLUGIN_NAME=\"org.test.abi10\""], header: Harness.abi10Header,
                                              in: directory)
        let result = try validate([old], json: true)
        #expect(result.status == 0, "\(result.stderr)")
        struct Report: Decodable {
            struct Plugin: Decodable { let name: String; let abiMajor: Int; let abiMinor: Int }
            let plugins: [Plugin]
        }
        let plugin = try #require(try JSONDecoder().decode(Report.self, from: Data(result.stdout.utf8)).plugins.first)
        #expect(plugin.abiMajor == 1 && plugin.abiMinor == 0)
        let disk = Harness.makeImage(directory.appendingPathComponent("abi10.img").path, size: 4 << 20)
        let served = try ServedDisk([disk, "--filter", "\(old):behaviour=invert",
                                     "--socket", directory.appendingPathComponent("abi10.sock").path])
        defer { served.stop() }
        #expect(try Harness.qemuIO(served.uri, ["write -P 0x0f 0 64k", "flush", "read -P 0x0f 0 64k"]).contains("read 65536/65536"))
        // Through the 1.0 filter for real: it inverted the bytes on their way to the disk.
        let bytes = try #require(FileHandle(forReadingAtPath: disk)?.readData(ofLength: 16))
        #expect(bytes.allSatisfy { $0 == 0xf0 })
    }

    @Test func infoShowsWhatAPluginOffersWithoutAHost() throws {
        let test = try Harness.buildTestPlugin("info", in: directory)
        let info = try Harness.run(Harness.iofilter, ["plugin", "info", test])
        #expect(info.status == 0, "\(info.stderr)")
        for expected in ["org.test.filter 1.0.0  [cache]", "behaviour (one of pass, defer", "default 4", "target (a string)", "a path",
                         "add(arg1: int32, arg2: int32) -> int32", "built for ABI 1.7", "callbacks: load, attach, done, event, stats, health"] {
            #expect(info.stdout.contains(expected), "\(expected) in: \(info.stdout)")
        }
        let json = try Harness.run(Harness.iofilter, ["plugin", "info", test, "--json"])
        struct Manifest: Decodable { let name: String; let parameters: [Parameter]; struct Parameter: Decodable { let name: String } }
        let manifest = try JSONDecoder().decode(Manifest.self, from: Data(json.stdout.utf8))
        #expect(manifest.name == "org.test.filter" && manifest.parameters.map(\.name).contains("depth"))
        let text = directory.appendingPathComponent("not-a-plugin.so").path
        _ = FileManager.default.createFile(atPath: text, contents: Data("text".utf8))
        let refused = try Harness.run(Harness.iofilter, ["plugin", "info", text])
        #expect(refused.status == 1 && refused.stderr.contains("not a shared object"))
    }

    @Test func refusesAFileThatIsNotASharedObject() throws {
        let path = directory.appendingPathComponent("text.so").path
        _ = FileManager.default.createFile(atPath: path, contents: Data("not an ELF file\n".utf8))
        try expectRefused([path], reason: "not a shared object")
    }

    @Test func refusesAMissingFile() throws {
        try expectRefused([directory.appendingPathComponent("absent.so").path], reason: "no such file")
    }

    @Test(arguments: [
        (["NO_ENTRY"], "does not export iof_plugin_entry"),
        (["ENTRY_RETURNS_NULL"], "iof_plugin_entry() returned NULL"),
        (["ABI_MAJOR_VALUE=2", "ABI_MINOR_VALUE=0"], "built for ABI 2.0; this host speaks ABI 1.x"),
        (["ABI_MINOR_VALUE=8"], "newer than this host's 1.7"),
        (["STRUCT_SIZE_VALUE=16"], "struct_size is 16, smaller than"),
        (["CATEGORY=9"], "unknown category 9"),
        (["PLUGIN_NAME=\"\""], "name is empty"),
        (["PLUGIN_NAME=\"nodots\""], "is not reverse-DNS"),
        (["PLUGIN_VERSION=\"1.0\""], "is not a semantic version"),
        (["NO_START"], "missing required callback(s): start"),
        (["BAD_ENUM_SCHEMA"], "parameter 'behaviour': an enum needs at least one value"),
        (["BAD_RANGE_SCHEMA"], "parameter 'depth': min 10 is greater than max 1"),
        (["BAD_DEFAULT_SCHEMA"], "parameter 'depth': default '99' is not an integer in 1...10"),
        (["THREAD_MODEL=7"], "unknown thread model 7"),
    ])
    func refusesAMalformedDescriptor(defines: [String], reason: String) throws {
        let path = try Harness.buildTestPlugin("bad", defines: defines, in: directory)
        try expectRefused([path], reason: reason)
    }

    @Test func reportsAConstructorThatSegfaults() throws {
        let path = try Harness.buildTestPlugin("segv", defines: ["CONSTRUCTOR_SEGFAULTS"], in: directory)
        try expectRefused([path], reason: "crashed while loading: killed by SIGSEGV")
    }

    @Test func reportsAnEntryPointThatAborts() throws {
        let path = try Harness.buildTestPlugin("abort", defines: ["ENTRY_ABORTS"], in: directory)
        try expectRefused([path], reason: "crashed while loading: killed by SIGABRT")
    }

    @Test func reportsAPluginThatHangsOnLoadWithinTheTimeLimit() throws {
        let path = try Harness.buildTestPlugin("hang", defines: ["ENTRY_HANGS"], in: directory)
        let started = Date()
        try expectRefused([path], reason: "timed out after 2s while loading (it hangs)", timeout: 2)
        #expect(Date().timeIntervalSince(started) < 30)
    }

    @Test func refusesTwoFiltersOfOneCategoryNamingBoth() throws {
        let first = try Harness.buildTestPlugin("one", defines: ["PLUGIN_NAME=\"com.vendor-a.cache\""], in: directory)
        let second = try Harness.buildTestPlugin("two", defines: ["PLUGIN_NAME=\"com.vendor-b.cache\""], in: directory)
        try expectRefused([first, second], reason: "com.vendor-a.cache and com.vendor-b.cache are both cache filters")
    }

    @Test func refusesOnePluginTwiceInDifferentVersions() throws {
        let old = try Harness.buildTestPlugin("v1", defines: ["PLUGIN_VERSION=\"1.0.0\""], in: directory)
        let new = try Harness.buildTestPlugin("v2", defines: ["PLUGIN_VERSION=\"1.1.0\""], in: directory)
        try expectRefused([old, new], reason: "org.test.filter is given twice, as versions 1.0.0 and 1.1.0")
    }

    @Test func jsonReportsErrorsWithANonZeroStatus() throws {
        let path = try Harness.buildTestPlugin("null", defines: ["ENTRY_RETURNS_NULL"], in: directory)
        let result = try validate([path], json: true)
        #expect(result.status == 1)
        let report = try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [String: Any]
        let errors = report?["errors"] as? [String] ?? []
        #expect(errors.count == 1 && errors[0].contains("returned NULL"))
    }

    /// `iofilter serve` loads an unchanged plug-in it validated before no more (its
    /// manifest is remembered in the user's cache), and validates anew one that was
    /// rebuilt or replaced, or whose record anyone else could have written.
    @Test func serveValidatesAPluginOnceUntilItsFileChanges() throws {
        let plugin = try Harness.buildTestPlugin("remembered", defines: ["PLUGIN_NAME=\"org.test.first\""], in: directory)
        let disk = directory.appendingPathComponent("remembered.img").path
        let cache = directory.appendingPathComponent("cache").path
        let records = cache + "/iofilter/validated"
        func serve() throws -> (log: String, record: String, inode: UInt64, mode: UInt16) {
            let served = try ServedDisk([disk, "--size", "8M", "--socket", directory.appendingPathComponent("remembered.sock").path,
                                         "--filter", plugin], environment: ["XDG_CACHE_HOME": cache])
            let read = try Harness.run(Harness.tool("qemu-io"), ["-f", "raw", "-c", "read 0 4k", served.uri])
            #expect(read.status == 0, "\(read.stderr)")
            served.stop()
            let names = try FileManager.default.contentsOfDirectory(atPath: records)
            #expect(names.count == 1, "one record per plug-in path: \(names)")
            let path = records + "/" + (names.first ?? "")
            var info = stat()
            #expect(stat(path, &info) == 0)
            return (served.log, (try? String(contentsOfFile: path, encoding: .utf8)) ?? "", UInt64(info.st_ino), UInt16(info.st_mode & 0o777))
        }

        let first = try serve()
        #expect(first.record.contains("org.test.first") && first.mode == 0o600, "recorded, for this user alone")
        let again = try serve()
        #expect(again.inode == first.inode, "an unchanged plug-in is not validated again (its record is not rewritten)")
        #expect(again.log.contains("org.test.first"))

        // Rebuilt in place as another plug-in: validated anew, and the new manifest is the one served.
        _ = try Harness.buildTestPlugin("remembered", defines: ["PLUGIN_NAME=\"org.test.second\""], in: directory)
        let rebuilt = try serve()
        #expect(rebuilt.inode != first.inode && rebuilt.record.contains("org.test.second"))
        #expect(rebuilt.log.contains("org.test.second") && !rebuilt.log.contains("org.test.first"), "\(rebuilt.log)")

        // A record others may write is not trusted, nor one that does not parse.
        let record = records + "/" + (try FileManager.default.contentsOfDirectory(atPath: records).first ?? "")
        chmod(record, 0o666)
        let distrusted = try serve()
        #expect(distrusted.inode != rebuilt.inode && distrusted.mode == 0o600)
        try Data("{not json".utf8).write(to: URL(fileURLWithPath: record))
        let repaired = try serve()
        #expect(repaired.inode != distrusted.inode && repaired.record.contains("org.test.second"))
    }

    @Test func theSwiftPMBuiltCSampleValidates() throws {
        let product = Harness.binDirectory.appendingPathComponent("libiofilter-passthrough-c.so").path
        let result = try validate([product])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("org.swift-iofilter.passthrough-c 1.0.0 (inspection, swift-iofilter)"))
    }

    @Test func theCSampleBuildsWithOnlyTheHeader() throws {
        // -std=c11 -pedantic -Werror: the header and the sample need nothing else.
        let output = directory.appendingPathComponent("strict.so").path
        try Harness.check("/usr/bin/cc", ["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                                          "-I", Harness.repository.appendingPathComponent("include").path, "-o", output,
                                          Harness.repository.appendingPathComponent("Plugins/passthrough-c/passthrough.c").path])
        let probe = directory.appendingPathComponent("c99.c").path
        try "#include <iofilter.h>\nint main(void) { return (int)sizeof(struct iof_plugin) == 0; }\n"
            .write(toFile: probe, atomically: true, encoding: .utf8)
        try Harness.check("/usr/bin/cc", ["-std=c99", "-pedantic", "-Wall", "-Werror", "-I",
                                          Harness.repository.appendingPathComponent("include").path, "-o",
                                          directory.appendingPathComponent("c99").path, probe])
        #expect(try validate([output]).status == 0)
    }
}

/// `iofilter plugin call`: typed arguments through libffi, wrong calls refused first.
@Suite("management operations")
struct ManagementCallTests {
    let directory = Harness.temporaryDirectory("call")

    @Test func callsOperationsOfEveryArgumentKind() throws {
        let passthrough = try Harness.buildPassthrough(in: directory)
        let test = try Harness.buildTestPlugin("calc", in: directory)
        #expect(try Harness.check(Harness.iofilter, ["plugin", "call", test, "add", "40", "2"]) == "42\n")
        #expect(try Harness.check(Harness.iofilter, ["plugin", "call", test, "add", "-7", "3"]) == "-4\n")
        #expect(try Harness.check(Harness.iofilter, ["plugin", "call", passthrough, "get_counter", "read"]) == "0\n")
        #expect(try Harness.check(Harness.iofilter, ["plugin", "call", passthrough, "get_counters"])
                == "read=0 write=0 flush=0 trim=0 write_zeroes=0\n")
        #expect(try Harness.check(Harness.iofilter, ["plugin", "call", passthrough, "average_request_size", "write", "1.5"]) == "0.0\n")
        let json = try Harness.check(Harness.iofilter, ["plugin", "call", "--json", passthrough, "reset_counters"])
        #expect(json.contains("\"type\":\"int32\"") && json.contains("\"value\":\"0\""))
        let listing = try Harness.check(Harness.iofilter, ["plugin", "call", passthrough])
        #expect(listing.contains("average_request_size(op: string, scale: double) -> double"))
    }

    @Test(arguments: [
        (["add", "1"], "add takes 2 argument(s), 1 given; usage: add(arg1: int32, arg2: int32) -> int32"),
        (["add", "1", "2", "3"], "add takes 2 argument(s), 3 given"),
        (["add", "1", "two"], "argument 2 of add must be int32, got 'two'"),
        (["add", "1", "99999999999"], "argument 2 of add must be int32, got '99999999999'"),
        (["nosuch"], "no management operation 'nosuch'; it declares add"),
    ])
    func refusesWrongCallsBeforeCalling(arguments: [String], reason: String) throws {
        let test = try Harness.buildTestPlugin("calc", in: directory)
        let result = try Harness.run(Harness.iofilter, ["plugin", "call", test] + arguments)
        #expect(result.status == 1)
        #expect(result.stderr.contains(reason), "\(result.stderr)")
    }
}
