import CIOFilter
import IOFilterModel
import Synchronization

/// What a disk's consumers asked of it, per op: requests, bytes, errors and a latency
/// histogram, counted as each NBD request finishes (relaxed atomic adds: no lock, no
/// allocation). The host reads a snapshot when it is scraped for metrics.
public final class IOCounters: Sendable {
    /// Upper bounds of the latency buckets, in nanoseconds (Prometheus `le`, seconds).
    static let bucketBounds: [UInt64] = [
        50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 100_000_000, 1_000_000_000,
    ]
    static let ops: [(op: iof_op, name: String)] = [
        (IOF_OP_READ, "read"), (IOF_OP_WRITE, "write"), (IOF_OP_FLUSH, "flush"), (IOF_OP_TRIM, "trim"),
        (IOF_OP_WRITE_ZEROES, "write-zeroes"), (IOF_OP_BLOCK_STATUS, "block-status"), (IOF_OP_CACHE, "cache"),
    ]

    /// An atomic counter in a box of its own (atomics cannot live in arrays).
    private final class Cell: Sendable {
        let value = Atomic<UInt64>(0)
    }

    private final class PerOp: Sendable {
        let requests = Atomic<UInt64>(0)
        let bytes = Atomic<UInt64>(0)
        let errors = Atomic<UInt64>(0)
        let latencyNanoseconds = Atomic<UInt64>(0)
        /// One per bound, and one past the last (+Inf).
        let buckets: [Cell]
        init() { buckets = (0...IOCounters.bucketBounds.count).map { _ in Cell() } }
    }

    private let perOp: [PerOp] = IOCounters.ops.map { _ in PerOp() }

    @inline(__always)
    func record(_ op: iof_op, bytes: UInt64, error: Int32, nanoseconds: UInt64) {
        let index = Int(op.rawValue)
        guard index < perOp.count else { return }
        let counters = perOp[index]
        counters.requests.add(1, ordering: .relaxed)
        if op == IOF_OP_READ || op == IOF_OP_WRITE { counters.bytes.add(bytes, ordering: .relaxed) }
        if error != 0 { counters.errors.add(1, ordering: .relaxed) }
        counters.latencyNanoseconds.add(nanoseconds, ordering: .relaxed)
        var bucket = 0
        while bucket < Self.bucketBounds.count && nanoseconds > Self.bucketBounds[bucket] { bucket += 1 }
        counters.buckets[bucket].value.add(1, ordering: .relaxed)
    }

    /// Ops that saw at least one request.
    public func snapshot() -> [OperationStatistics] {
        zip(Self.ops, perOp).compactMap { entry, counters in
            let requests = counters.requests.load(ordering: .relaxed)
            guard requests > 0 else { return nil }
            var cumulative: UInt64 = 0
            let buckets = counters.buckets.map { bucket -> UInt64 in
                cumulative += bucket.value.load(ordering: .relaxed)
                return cumulative
            }
            return OperationStatistics(
                op: entry.name, requests: requests, bytes: counters.bytes.load(ordering: .relaxed),
                errors: counters.errors.load(ordering: .relaxed),
                latencySeconds: Double(counters.latencyNanoseconds.load(ordering: .relaxed)) / 1e9,
                latencyBuckets: zip(Self.bucketBounds.map { Double($0) / 1e9 } + [Double.infinity], buckets).map {
                    LatencyBucket(le: $0.0, count: $0.1)
                })
        }
    }
}
