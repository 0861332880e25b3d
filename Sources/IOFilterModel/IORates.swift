/// A disk's I/O over an interval: requests and bytes per second split read/write, and
/// the latency percentiles of the requests finished in it.
public struct DiskRates: Codable, Sendable, Equatable {
    public var disk: String
    public var readIOPS: Double
    public var writeIOPS: Double
    /// Flush, trim, write-zeroes, block status, cache.
    public var otherIOPS: Double
    public var readBytesPerSecond: Double
    public var writeBytesPerSecond: Double
    public var errorsPerSecond: Double
    /// Milliseconds; nil when no request finished in the interval.
    public var latencyP50Milliseconds: Double?
    public var latencyP99Milliseconds: Double?

    public init(disk: String, readIOPS: Double = 0, writeIOPS: Double = 0, otherIOPS: Double = 0, readBytesPerSecond: Double = 0,
                writeBytesPerSecond: Double = 0, errorsPerSecond: Double = 0, latencyP50Milliseconds: Double? = nil,
                latencyP99Milliseconds: Double? = nil) {
        self.disk = disk
        self.readIOPS = readIOPS
        self.writeIOPS = writeIOPS
        self.otherIOPS = otherIOPS
        self.readBytesPerSecond = readBytesPerSecond
        self.writeBytesPerSecond = writeBytesPerSecond
        self.errorsPerSecond = errorsPerSecond
        self.latencyP50Milliseconds = latencyP50Milliseconds
        self.latencyP99Milliseconds = latencyP99Milliseconds
    }

    /// The rates between two readings of one disk's counters, `seconds` apart. Counters
    /// that went down belong to a new worker (a restart): the interval then counts from
    /// zero, never negative.
    public static func between(_ earlier: [OperationStatistics], _ later: [OperationStatistics], disk: String, seconds: Double) -> DiskRates {
        var rates = DiskRates(disk: disk)
        guard seconds > 0 else { return rates }
        let before = Dictionary(earlier.map { ($0.op, $0) }, uniquingKeysWith: { first, _ in first })
        let restarted = Self.countedAnew(earlier, later)
        var buckets: [LatencyBucket] = []
        for op in later {
            let delta = restarted ? op : op.subtracting(before[op.op])
            let perSecond = Double(delta.requests) / seconds
            switch op.op {
            case "read":
                rates.readIOPS = perSecond
                rates.readBytesPerSecond = Double(delta.bytes) / seconds
            case "write":
                rates.writeIOPS = perSecond
                rates.writeBytesPerSecond = Double(delta.bytes) / seconds
            default:
                rates.otherIOPS += perSecond
            }
            rates.errorsPerSecond += Double(delta.errors) / seconds
            buckets = LatencyBucket.sum(buckets, delta.latencyBuckets)
        }
        rates.latencyP50Milliseconds = LatencyBucket.quantile(0.5, buckets).map { $0 * 1000 }
        rates.latencyP99Milliseconds = LatencyBucket.quantile(0.99, buckets).map { $0 * 1000 }
        return rates
    }
}

extension DiskRates {
    /// Whether `later` was counted by a new worker: a counter went down, or an op
    /// counted before is missing.
    public static func countedAnew(_ earlier: [OperationStatistics], _ later: [OperationStatistics]) -> Bool {
        let before = Dictionary(earlier.map { ($0.op, $0) }, uniquingKeysWith: { first, _ in first })
        return later.contains { op in before[op.op].map { op.requests < $0.requests || op.bytes < $0.bytes } ?? false }
            || before.count > later.count
    }
}

extension OperationStatistics {
    /// What was counted since `earlier` (nil: since zero).
    public func subtracting(_ earlier: OperationStatistics?) -> OperationStatistics {
        guard let earlier else { return self }
        func minus(_ a: UInt64, _ b: UInt64) -> UInt64 { a >= b ? a - b : 0 }
        return OperationStatistics(
            op: op, requests: minus(requests, earlier.requests), bytes: minus(bytes, earlier.bytes), errors: minus(errors, earlier.errors),
            latencySeconds: max(0, latencySeconds - earlier.latencySeconds),
            latencyBuckets: zip(latencyBuckets, earlier.latencyBuckets.count == latencyBuckets.count ? earlier.latencyBuckets : latencyBuckets.map { LatencyBucket(le: $0.le, count: 0) })
                .map { LatencyBucket(le: $0.0.le, count: minus($0.0.count, $0.1.count)) })
    }

    /// Both counted together (a worker's counters carried over its restart).
    public func adding(_ other: OperationStatistics) -> OperationStatistics {
        OperationStatistics(
            op: op, requests: requests + other.requests, bytes: bytes + other.bytes, errors: errors + other.errors,
            latencySeconds: latencySeconds + other.latencySeconds, latencyBuckets: LatencyBucket.sum(latencyBuckets, other.latencyBuckets))
    }
}

extension LatencyBucket {
    /// Cumulative buckets of the same bounds added up (either may be empty).
    static func sum(_ a: [LatencyBucket], _ b: [LatencyBucket]) -> [LatencyBucket] {
        if a.isEmpty { return b }
        if b.isEmpty || a.count != b.count { return a }
        return zip(a, b).map { LatencyBucket(le: $0.0.le, count: $0.0.count + $0.1.count) }
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket as
    /// Prometheus' histogram_quantile does; past the last finite bound, that bound.
    public static func quantile(_ q: Double, _ buckets: [LatencyBucket]) -> Double? {
        guard let total = buckets.last?.count, total > 0 else { return nil }
        let rank = q * Double(total)
        var lowerBound = 0.0
        var lowerCount: UInt64 = 0
        for bucket in buckets {
            if Double(bucket.count) >= rank {
                if bucket.le.isInfinite { return lowerBound }
                let inBucket = Double(bucket.count - lowerCount)
                return inBucket == 0 ? bucket.le : lowerBound + (bucket.le - lowerBound) * (rank - Double(lowerCount)) / inBucket
            }
            lowerBound = bucket.le.isInfinite ? lowerBound : bucket.le
            lowerCount = bucket.count
        }
        return lowerBound
    }
}
