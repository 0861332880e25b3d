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

@Suite("health and rates")
struct HealthAndRateTests {
    static func op(_ name: String, requests: UInt64, bytes: UInt64 = 0, errors: UInt64 = 0, buckets: [UInt64]) -> OperationStatistics {
        // Bounds 1 ms, 10 ms, +Inf; `buckets` are cumulative counts.
        OperationStatistics(op: name, requests: requests, bytes: bytes, errors: errors, latencySeconds: 0,
                            latencyBuckets: zip([0.001, 0.01, Double.infinity], buckets).map { LatencyBucket(le: $0.0, count: $0.1) })
    }

    @Test func ratesSplitReadAndWriteAndGivePercentiles() {
        let earlier = [Self.op("read", requests: 100, bytes: 409_600, buckets: [100, 100, 100]), Self.op("write", requests: 10, bytes: 40_960, buckets: [10, 10, 10])]
        // In 2 s: 200 reads (100 under 1 ms, 100 between 1 and 10 ms), 20 writes, 2 flushes, one error.
        let later = [Self.op("read", requests: 300, bytes: 1_228_800, buckets: [200, 300, 300]),
                     Self.op("write", requests: 30, bytes: 122_880, errors: 1, buckets: [30, 30, 30]),
                     Self.op("flush", requests: 2, buckets: [2, 2, 2])]
        let rates = DiskRates.between(earlier, later, disk: "d", seconds: 2)
        #expect(rates.readIOPS == 100 && rates.writeIOPS == 10 && rates.otherIOPS == 1)
        #expect(rates.readBytesPerSecond == 409_600 && rates.writeBytesPerSecond == 40_960 && rates.errorsPerSecond == 0.5)
        // 222 requests: 122 under 1 ms, 100 in (1, 10] ms. The median is the 111th: inside the first bucket.
        let p50 = try! #require(rates.latencyP50Milliseconds)
        #expect(abs(p50 - 111.0 / 122.0) < 1e-9)
        let p99 = try! #require(rates.latencyP99Milliseconds)
        #expect(p99 > 9 && p99 <= 10)
    }

    @Test func aRestartedWorkersCountersNeverMakeANegativeRate() {
        let old = [Self.op("write", requests: 5000, bytes: 20_480_000, buckets: [5000, 5000, 5000])]
        let restarted = [Self.op("write", requests: 40, bytes: 163_840, buckets: [40, 40, 40])]
        let rates = DiskRates.between(old, restarted, disk: "d", seconds: 4)
        #expect(rates.writeIOPS == 10 && rates.writeBytesPerSecond == 40_960)
        // Carried over, the totals keep growing.
        let carried = old[0].adding(restarted[0])
        #expect(carried.requests == 5040 && carried.latencyBuckets.last?.count == 5040)
    }

    @Test func quantilesFollowPrometheus() {
        #expect(LatencyBucket.quantile(0.5, []) == nil)
        let buckets = [LatencyBucket(le: 0.001, count: 0), LatencyBucket(le: 0.01, count: 0), LatencyBucket(le: .infinity, count: 4)]
        // Everything past the last finite bound: that bound, as histogram_quantile gives.
        #expect(LatencyBucket.quantile(0.99, buckets) == 0.01)
    }

    @Test func aDiskIsAsHealthyAsItsWorstFilterAndLagPastTheRPODegrades() {
        let replication = FilterStatistics(plugin: "r", version: "1.0.0", category: .replication, stats: ["lag_seconds": 45, "rpo_seconds": 15])
        #expect(HealthRules.filter(replication) == HealthReport(status: .degraded, reason: "lag 45s is past the RPO of 15s"))
        var withinRPO = replication
        withinRPO.stats["lag_seconds"] = 3
        #expect(HealthRules.filter(withinRPO) == .ok)
        // What the filter says wins when it is worse.
        var failed = replication
        failed.health = HealthReport(status: .failed, reason: "journal lost")
        #expect(HealthRules.filter(failed).status == .failed)
        let cache = FilterStatistics(plugin: "c", version: "1.0.0", category: .cache, stats: [:], health: HealthReport(status: .degraded, reason: "bypassed"))
        let disk = DiskStatistics(disk: "d", filters: [replication, cache])
        #expect(HealthRules.disk(disk) == HealthReport(status: .degraded, reason: "r: lag 45s is past the RPO of 15s; c: bypassed"))
        #expect(HealthRules.vm(.answered([disk]), restarts: 0, secondsSinceRestart: nil).reason.hasPrefix("disk d: r: lag 45s"))
        #expect(HealthRules.vm(.answered([]), restarts: 2, secondsSinceRestart: 30).status == .degraded)
        #expect(HealthRules.vm(.answered([]), restarts: 2, secondsSinceRestart: 900) == .ok)
        #expect(HealthRules.vm(.restarting, restarts: 3, secondsSinceRestart: 0).status == .failed)
        #expect(HealthRules.vm(.notAnswering("timed out"), restarts: 0, secondsSinceRestart: nil).status == .failed)
        #expect(HealthStatus(abiValue: 7) == .failed && HealthStatus.degraded.level == 1)
        // A plug-in's reason is one bounded line whatever it wrote.
        let forged = FilterStatistics(plugin: "x", version: "1.0.0", category: .cache, stats: [:],
                                      health: HealthReport(status: .degraded, reason: "ok\n2026-12-04 INFO all fine\u{1b}[2J" + String(repeating: "a", count: 400)))
        let cleaned = HealthRules.filter(forged).reason
        #expect(!cleaned.contains("\n") && !cleaned.contains("\u{1b}") && cleaned.unicodeScalars.count == 300 && cleaned.hasPrefix("ok 2026-12-04 INFO"))
    }

    @Test func aWorkersDefaultMemoryLimitIsItsShareOfTheHost() {
        let gib: UInt64 = 1 << 30
        #expect(WorkerConfiguration.defaultMemoryLimit(hostMemory: 24 * gib, vms: 1) == 8 * gib, "at most 8 GiB")
        #expect(WorkerConfiguration.defaultMemoryLimit(hostMemory: 24 * gib, vms: 9) == 2 * gib, "three quarters shared by 9")
        #expect(WorkerConfiguration.defaultMemoryLimit(hostMemory: 24 * gib, vms: 1000) == WorkerConfiguration.minimumMemoryLimit)
        #expect(WorkerConfiguration.defaultMemoryLimit(hostMemory: 4 * gib, vms: 0) == 3 * gib, "no VM yet counts as one")
    }
}
