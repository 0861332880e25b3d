import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel
import Prometheus

/// GET /metrics: the Prometheus text format. The daemon's own series (API calls and
/// their latency, through swift-metrics into `registry`) and, gathered from each running
/// worker at scrape time, every VM's I/O per disk and op, its filters' statistics as
/// labelled gauges, and its worker's state and restarts. A VM's series go away with it.
extension HostController {
    public func prometheusMetrics(registry: PrometheusCollectorRegistry) -> String {
        var text = registry.emitToString()
        var output = PrometheusText()
        let rows = (try? read { db in try VMRow.order(Column("name")).fetchAll(db) }) ?? []
        // One sampler for every scraper and console: a worker is asked at most once a second.
        let samples = Dictionary(uniqueKeysWithValues: rows.compactMap { row in sampler.sample(row.name, maxAge: 1).map { (row.name, $0) } })
        output.family("iofilter_vm_up", "gauge", "1 while the VM's worker runs, 0 when it is stopped.")
        for row in rows { output.sample("iofilter_vm_up", ["vm": row.name], samples[row.name] == nil ? 0 : 1) }
        output.family("iofilter_worker_restarts_total", "counter", "Times the VM's worker was restarted since the VM started.")
        for row in rows { output.sample("iofilter_worker_restarts_total", ["vm": row.name], Double(samples[row.name]?.restarts ?? 0)) }
        output.family("iofilter_worker_start_seconds", "gauge",
                      "How long the VM's worker took to start: from its spawn, through confinement and its plug-ins and disks opened, to serving.")
        let running = sessions.runningVMs
        for row in rows {
            if let seconds = running[row.name]?.supervisor.lastStartSeconds { output.sample("iofilter_worker_start_seconds", ["vm": row.name], seconds) }
        }
        output.family("iofilter_vm_health", "gauge", "A running VM's health: 0 ok, 1 degraded, 2 failed (worker down or silent, or its worst disk).")
        for row in rows { if let sample = samples[row.name] { output.sample("iofilter_vm_health", ["vm": row.name], Double(sample.health.status.level)) } }

        let perDisk = rows.flatMap { row in (samples[row.name]?.statistics ?? []).map { (vm: row.name, statistics: $0) } }
        output.family("iofilter_disk_health", "gauge", "A served disk's health: 0 ok, 1 degraded, 2 failed (its least healthy filter).")
        for (vm, statistics) in perDisk {
            output.sample("iofilter_disk_health", ["vm": vm, "disk": statistics.disk], Double(HealthRules.disk(statistics).status.level))
        }
        output.family("iofilter_filter_health", "gauge", "Each filter's health: 0 ok, 1 degraded, 2 failed (what it reports, and lag past its RPO).")
        for (vm, statistics) in perDisk {
            for filter in statistics.filters {
                output.sample("iofilter_filter_health", ["vm": vm, "disk": statistics.disk, "plugin": filter.plugin],
                              Double(HealthRules.filter(filter).status.level))
            }
        }
        output.family("iofilter_replication_lag_seconds", "gauge", "How far a replica is behind, for filters that report lag and an RPO.")
        output.family("iofilter_replication_rpo_seconds", "gauge", "The recovery point objective the replication filter keeps to.")
        for (vm, statistics) in perDisk {
            for filter in statistics.filters {
                guard let (lag, rpo) = HealthRules.lag(filter) else { continue }
                let labels = ["vm": vm, "disk": statistics.disk, "plugin": filter.plugin]
                output.sample("iofilter_replication_lag_seconds", labels, lag)
                output.sample("iofilter_replication_rpo_seconds", labels, rpo)
            }
        }
        let io = perDisk.flatMap { entry in (entry.statistics.io ?? []).map { (entry.vm, entry.statistics.disk, $0) } }
        output.family("iofilter_requests_total", "counter", "NBD requests served, per VM, disk and op (carried across worker restarts).")
        for (vm, disk, op) in io { output.sample("iofilter_requests_total", ["vm": vm, "disk": disk, "op": op.op], Double(op.requests)) }
        output.family("iofilter_bytes_total", "counter", "Bytes read and written by consumers, per VM, disk and op.")
        for (vm, disk, op) in io where op.op == "read" || op.op == "write" {
            output.sample("iofilter_bytes_total", ["vm": vm, "disk": disk, "op": op.op], Double(op.bytes))
        }
        output.family("iofilter_errors_total", "counter", "Requests that failed, per VM, disk and op.")
        for (vm, disk, op) in io { output.sample("iofilter_errors_total", ["vm": vm, "disk": disk, "op": op.op], Double(op.errors)) }
        output.family("iofilter_request_duration_seconds", "histogram", "Time from a request's arrival to its answer, through the chain.")
        for (vm, disk, op) in io {
            let labels = ["vm": vm, "disk": disk, "op": op.op]
            for bucket in op.latencyBuckets {
                output.sample("iofilter_request_duration_seconds_bucket", labels.merging(["le": bucket.le.isInfinite ? "+Inf" : "\(bucket.le)"]) { $1 },
                              Double(bucket.count))
            }
            output.sample("iofilter_request_duration_seconds_sum", labels, op.latencySeconds)
            output.sample("iofilter_request_duration_seconds_count", labels, Double(op.requests))
        }
        output.family("iofilter_filter_stat", "gauge", "Each filter's own statistics, as it reports them (hit_ratio, dirty_bytes, lag_seconds, ...).")
        for (vm, statistics) in perDisk {
            for filter in statistics.filters {
                for (stat, value) in filter.stats.sorted(by: { $0.key < $1.key }) {
                    output.sample("iofilter_filter_stat", ["vm": vm, "disk": statistics.disk, "plugin": filter.plugin, "stat": stat], value)
                }
            }
        }
        text += output.text
        return text
    }
}

/// Prometheus' text exposition format, written by hand for the series the workers report.
struct PrometheusText {
    private(set) var text = ""

    mutating func family(_ name: String, _ type: String, _ help: String) {
        text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
    }

    mutating func sample(_ name: String, _ labels: [String: String], _ value: Double) {
        let rendered = labels.sorted { $0.key < $1.key }.map { "\($0.key)=\"\(Self.escape($0.value))\"" }.joined(separator: ",")
        let number = value.isNaN ? "NaN" : value.isInfinite ? (value > 0 ? "+Inf" : "-Inf")
            : value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : "\(value)"
        text += "\(name){\(rendered)} \(number)\n"
    }

    static func escape(_ value: String) -> String {
        value.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
}
