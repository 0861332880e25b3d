import IOFilterModel
import Testing

@Suite("names and versions")
struct NamingTests {
    private func manifest(name: String = "com.example.filter", version: String = "1.0.0",
                          parameters: [ParameterSpec] = [], category: FilterCategory = .cache) -> PluginManifest {
        PluginManifest(name: name, vendor: "Example", version: version, description: "", category: category,
                       threadModel: .parallel, abiMajor: 1, abiMinor: 0, multiConn: true, parameters: parameters,
                       operations: [], callbacks: [], path: "/x/\(name).so")
    }

    @Test(arguments: ["com.example.filter", "org.swift-iofilter.passthrough-c", "io.x9.a"])
    func acceptsReverseDNSNames(name: String) throws {
        try manifest(name: name).validate()
    }

    @Test(arguments: ["filter", "com..filter", ".com.filter", "com.filter.", "com.-bad.x", "com.bad-.x", "com.sp ace.x", "com.ünï.x"])
    func refusesOtherNames(name: String) {
        #expect(throws: ValidationError.self) { try manifest(name: name).validate() }
    }

    @Test(arguments: ["0.0.1", "1.2.3", "10.20.30", "1.0.0-rc.1", "1.0.0+build.5", "1.0.0-alpha+001"])
    func acceptsSemanticVersions(version: String) throws {
        try manifest(version: version).validate()
    }

    @Test(arguments: ["1", "1.0", "1.0.0.0", "01.0.0", "1.0.x", "1.0.0-", "1.0.0+", "v1.0.0", ""])
    func refusesOtherVersions(version: String) {
        #expect(throws: ValidationError.self) { try manifest(version: version).validate() }
    }
}

@Suite("parameters")
struct ParameterTests {
    @Test func parsesSizes() {
        #expect(ParameterSpec.parseSize("4096") == 4096)
        #expect(ParameterSpec.parseSize("64K") == 65536)
        #expect(ParameterSpec.parseSize("1m") == 1 << 20)
        #expect(ParameterSpec.parseSize("2G") == 2 << 30)
        #expect(ParameterSpec.parseSize("1T") == 1 << 40)
        #expect(ParameterSpec.parseSize("1.5G") == nil)
        #expect(ParameterSpec.parseSize("-1") == nil)
        #expect(ParameterSpec.parseSize("1KiB") == nil)
        #expect(ParameterSpec.parseSize("99999999999T") == nil)
    }

    @Test func normalizesByType() throws {
        let flag = ParameterSpec(name: "on", description: "", kind: .bool, defaultValue: "false")
        #expect(try flag.normalize("yes").get() == "true")
        #expect(throws: ParameterSpec.ParameterProblem.self) { try flag.normalize("maybe").get() }
        let depth = ParameterSpec(name: "depth", description: "", kind: .int, defaultValue: "4", min: 1, max: 64)
        #expect(try depth.normalize("64").get() == "64")
        #expect(throws: ParameterSpec.ParameterProblem.outOfRange) { try depth.normalize("65").get() }
        let size = ParameterSpec(name: "size", description: "", kind: .size, defaultValue: "1M", min: 4096, max: 1 << 30)
        #expect(try size.normalize("256M").get() == String(256 << 20))
        #expect(throws: ParameterSpec.ParameterProblem.outOfRange) { try size.normalize("2G").get() }
        let mode = ParameterSpec(name: "mode", description: "", kind: .enum, defaultValue: "sync", enumValues: ["sync", "async"])
        #expect(try mode.normalize("async").get() == "async")
        #expect(throws: ParameterSpec.ParameterProblem.self) { try mode.normalize("fast").get() }
    }
}

@Suite("chain planning")
struct ChainTests {
    static func manifest(_ name: String, _ category: FilterCategory, version: String = "1.0.0",
                         parameters: [ParameterSpec] = []) -> PluginManifest {
        PluginManifest(name: name, vendor: "V", version: version, description: "", category: category,
                       threadModel: .parallel, abiMajor: 1, abiMinor: 0, multiConn: true, parameters: parameters,
                       operations: [], callbacks: [], path: "/p/\(name).so")
    }

    @Test func ordersByCategoryWhateverTheInputOrder() throws {
        let all: [PluginManifest] = [
            Self.manifest("a.qos", .qos), Self.manifest("a.cache", .cache), Self.manifest("a.inspect", .inspection),
            Self.manifest("a.crypt", .encryption), Self.manifest("a.repl", .replication),
        ]
        for shift in 0..<all.count {
            let rotated = Array(all[shift...] + all[..<shift])
            let plan = try FilterChain.plan(rotated.map { FilterSelection(manifest: $0) })
            #expect(plan.map(\.manifest.category) == [.inspection, .replication, .encryption, .cache, .qos])
        }
    }

    @Test func refusesASecondFilterOfACategoryNamingBoth() {
        #expect(throws: ValidationError.duplicateCategory(category: .cache, first: "a.one", second: "b.two")) {
            try FilterChain.plan([FilterSelection(manifest: Self.manifest("a.one", .cache)),
                                  FilterSelection(manifest: Self.manifest("b.two", .cache))])
        }
    }

    @Test func resolvesParametersAndRefusesBadOnes() throws {
        let spec = [
            ParameterSpec(name: "mode", description: "", kind: .enum, defaultValue: "sync", enumValues: ["sync", "async"]),
            ParameterSpec(name: "target", description: "", kind: .string, required: true),
        ]
        let repl = Self.manifest("x.repl", .replication, parameters: spec)
        let plan = try FilterChain.plan([FilterSelection(manifest: repl, parameters: ["target": "/r.img"])])
        #expect(plan[0].parameters == ["mode": "sync", "target": "/r.img"])
        #expect(throws: ValidationError.missingParameter(plugin: "x.repl", key: "target", expected: "a string")) {
            try FilterChain.plan([FilterSelection(manifest: repl)])
        }
        #expect(throws: ValidationError.unknownParameter(plugin: "x.repl", key: "speed", known: ["mode", "target"])) {
            try FilterChain.plan([FilterSelection(manifest: repl, parameters: ["target": "t", "speed": "1"])])
        }
        #expect(throws: ValidationError.badParameterValue(plugin: "x.repl", key: "mode", value: "fast", expected: "one of sync, async")) {
            try FilterChain.plan([FilterSelection(manifest: repl, parameters: ["target": "t", "mode": "fast"])])
        }
        let message = ValidationError.badParameterValue(plugin: "x.repl", key: "mode", value: "fast", expected: "one of sync, async").description
        #expect(message == "x.repl: parameter 'mode' must be one of sync, async, got 'fast'")
    }
}

@Suite("management arguments")
struct ManagementArgumentTests {
    let op = ManagementOperation(name: "resize", description: "", returnType: .bool,
                                 argumentTypes: [.uint64, .double, .bool, .string], argumentNames: ["bytes", "ratio", "force", "why"])

    @Test func convertsEachType() throws {
        let values = try op.convert(arguments: ["4096", "0.5", "true", "grow"], plugin: "p")
        #expect(values == [.uint64(4096), .double(0.5), .bool(true), .string("grow")])
    }

    @Test func refusesWrongCountsAndTypes() {
        #expect(throws: ValidationError.self) { try op.convert(arguments: ["1"], plugin: "p") }
        #expect(throws: ValidationError.self) { try op.convert(arguments: ["-1", "0.5", "true", "x"], plugin: "p") }
        #expect(throws: ValidationError.self) { try op.convert(arguments: ["1", "nan", "true", "x"], plugin: "p") }
        #expect(throws: ValidationError.self) { try op.convert(arguments: ["1", "0.5", "perhaps", "x"], plugin: "p") }
    }
}
