/// A health status and why: what a filter said, or what the host derived for a disk or
/// a VM. The reason is empty when all is well.
public struct HealthReport: Codable, Sendable, Equatable, CustomStringConvertible {
    public var status: HealthStatus
    public var reason: String

    public init(status: HealthStatus, reason: String = "") {
        self.status = status
        self.reason = reason
    }

    public static let ok = HealthReport(status: .ok)

    public var description: String { reason.isEmpty ? status.rawValue : "\(status.rawValue): \(reason)" }

    /// The worst of several, its reasons joined (those of the worst status only).
    public static func worst(_ reports: [HealthReport]) -> HealthReport {
        guard let status = reports.map(\.status).max(), status != .ok else { return .ok }
        return HealthReport(status: status, reason: reports.filter { $0.status == status }.map(\.reason).filter { !$0.isEmpty }.joined(separator: "; "))
    }
}

/// How the host judges health, the same for the CLI, the API, the console and /metrics.
public enum HealthRules {
    /// How long after a crash a VM's worker still makes the VM degraded.
    public static let recentRestartSeconds = 300.0

    /// The statistics keys a filter reports for a recovery point objective.
    public static let lagKey = "lag_seconds"
    public static let rpoKey = "rpo_seconds"

    /// A filter's lag and its RPO, if it reports both.
    public static func lag(_ filter: FilterStatistics) -> (lag: Double, rpo: Double)? {
        guard let lag = filter.stats[lagKey], let rpo = filter.stats[rpoKey], lag.isFinite, rpo.isFinite, rpo > 0 else { return nil }
        return (lag, rpo)
    }

    /// What a filter says of itself, made at least degraded while its lag is past its RPO.
    /// A filter that says nothing is ok: it answered, since its statistics came back.
    public static func filter(_ filter: FilterStatistics) -> HealthReport {
        var report = filter.health ?? .ok
        // The reason comes from a worker, that is from plug-in code: one line, bounded,
        // before it reaches an event, a log line or a page.
        report.reason = String(report.reason.unicodeScalars.prefix(300).map { $0.properties.generalCategory == .control ? " " : Character($0) })
        if let (lag, rpo) = lag(filter), lag > rpo, report.status == .ok {
            report = HealthReport(status: .degraded, reason: "lag \(Int(lag))s is past the RPO of \(Int(rpo))s")
        }
        return report
    }

    /// A disk is as healthy as its least healthy filter; reasons name the plug-in.
    public static func disk(_ disk: DiskStatistics) -> HealthReport {
        HealthReport.worst(disk.filters.map { filter in
            let report = Self.filter(filter)
            return HealthReport(status: report.status, reason: report.reason.isEmpty ? "" : "\(filter.plugin): \(report.reason)")
        })
    }

    /// What the host knows of a running VM's worker.
    public enum Worker: Sendable, Equatable {
        /// It answered with these statistics.
        case answered([DiskStatistics])
        /// It runs but did not answer in time (a hung filter, an overloaded host).
        case notAnswering(String)
        /// It crashed and is being restarted.
        case restarting
    }

    /// A running VM: failed while its worker is down or silent, degraded for a while
    /// after a crash, else as healthy as its least healthy disk.
    public static func vm(_ worker: Worker, restarts: Int, secondsSinceRestart: Double?) -> HealthReport {
        switch worker {
        case .restarting:
            return HealthReport(status: .failed, reason: "the worker crashed and is being restarted (\(restarts) restart(s))")
        case .notAnswering(let why):
            return HealthReport(status: .failed, reason: "the worker does not answer: \(why)")
        case .answered(let disks):
            var reports = disks.map { disk in
                let report = Self.disk(disk)
                return HealthReport(status: report.status, reason: report.reason.isEmpty ? "" : "disk \(disk.disk): \(report.reason)")
            }
            if let seconds = secondsSinceRestart, seconds < recentRestartSeconds {
                reports.append(HealthReport(status: .degraded, reason: "the worker restarted \(Int(seconds))s ago (\(restarts) restart(s))"))
            }
            return HealthReport.worst(reports)
        }
    }
}
