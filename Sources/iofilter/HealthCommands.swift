import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterModel

extension Severity: ExpressibleByArgument {}

struct HealthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "health",
        abstract: "How every running VM, its disks and their filters are doing.",
        discussion: """
            Health is ok, degraded or failed, with a reason. A filter reports its own (ABI \
            1.4) and is degraded while its replication lag is past its RPO; a disk is as \
            healthy as its least healthy filter; a VM fails while its worker is down or \
            silent and is degraded for five minutes after a crash. The console, the API \
            (GET /health) and /metrics (iofilter_*_health) show the same. Exits 0 when all \
            is ok, 2 when something is degraded, 3 when something failed.
            """)

    @Argument(help: "Only this VM.") var vm: String?
    @OptionGroup var daemon: DaemonOptions

    func run() throws {
        var status = HealthStatus.ok
        try reportingFailures {
            let client = try daemon.client
            let (health, raw) = try client.send("GET", "/health", as: HostHealth.self)
            let vms = health.vms.filter { vm == nil || $0.name == vm }
            if let vm, vms.isEmpty { throw CLIFailure(description: "no VM \(vm) (see `iofilter vm list`)") }
            status = vms.compactMap(\.health?.status).max() ?? .ok
            print(client.json ? APIClient.pretty(raw) : vms.isEmpty ? "no VMs" : vms.map(Self.describe).joined(separator: "\n"))
        }
        // The status speaks for scripts whether the output is text or JSON.
        switch status {
        case .ok: break
        case .degraded: throw ExitCode(2)
        case .failed: throw ExitCode(3)
        }
    }

    static func describe(_ vm: VMHealth) -> String {
        guard let health = vm.health else { return "\(vm.name)  stopped" }
        var lines = ["\(vm.name)  \(health)"]
        for disk in vm.disks {
            lines.append("  disk \(disk.disk)  \(disk.health.status.rawValue)")
            for filter in disk.filters {
                let lag = filter.lagSeconds.map { lag in "  lag \(Int(lag))s of RPO \(Int(filter.rpoSeconds ?? 0))s" } ?? ""
                lines.append("    \(filter.plugin) [\(filter.category.rawValue)]  \(filter.health)\(lag)")
            }
        }
        return lines.joined(separator: "\n")
    }

    /// "read 1,234 IOPS 4.8 MiB/s · write …" for one disk's rates.
    static func describe(_ rates: DiskRates) -> String {
        func perSecond(_ value: Double) -> String { String(format: "%.0f", value) }
        func bytes(_ value: Double) -> String {
            value >= 1_048_576 ? String(format: "%.1f MiB/s", value / 1_048_576) : String(format: "%.1f KiB/s", value / 1024)
        }
        let latency = rates.latencyP50Milliseconds.map { p50 in
            String(format: " · latency p50 %.2f ms p99 %.2f ms", p50, rates.latencyP99Milliseconds ?? p50)
        } ?? ""
        return "read \(perSecond(rates.readIOPS)) IOPS \(bytes(rates.readBytesPerSecond)) · write \(perSecond(rates.writeIOPS)) IOPS "
            + "\(bytes(rates.writeBytesPerSecond))\(latency)" + (rates.errorsPerSecond > 0 ? String(format: " · %.1f errors/s", rates.errorsPerSecond) : "")
    }
}

struct AlertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "alert",
        abstract: "Send the host's events of a severity and above to a webhook or a command.",
        discussion: """
            Events carry a severity (info, warning, error, critical): a filter that degrades \
            or fails, replication lag past its RPO, a worker that crashes or stops \
            answering, refused sign-ins. A webhook gets each event as a JSON POST; a command \
            runs on the host (as iofilterd's user) with the event as JSON on stdin and in \
            IOFILTER_EVENT_KIND, _SEVERITY, _SUBJECT, _MESSAGE and _TIME.

              iofilter alert add pager --webhook http://alerts.internal:9000/iofilter
              iofilter alert add mail --command 'mail -s "$IOFILTER_EVENT_KIND" ops' --min-severity error
              iofilter alert add slack --command 'curl -sS --fail -H content-type:application/json -d @- https://hooks…'

            Prometheus users: the alert rules for the same conditions are installed in \
            PREFIX/share/iofilter/alerts.yml.
            """,
        subcommands: [Add.self, List.self, Remove.self, Test.self])

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "add", abstract: "Subscribe a webhook or a command.")
        @Argument(help: "A name for the subscription.") var name: String
        @Option(help: ArgumentHelp("POST each event here (http://HOST[:PORT]/PATH).", valueName: "url")) var webhook: String?
        @Option(help: ArgumentHelp("Run this with /bin/sh for each event.", valueName: "command")) var command: String?
        @Option(help: ArgumentHelp("The least severity sent: info, warning, error or critical.", valueName: "severity"))
        var minSeverity: Severity = .warning
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            if (webhook == nil) == (command == nil) { throw ValidationError("give either --webhook or --command") }
        }

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/alerts", body: AlertSubscription(name: name, webhook: webhook, command: command, minimumSeverity: minSeverity),
                                      as: AlertSubscription.self) { "\($0.name): \($0.minimumSeverity.rawValue) and above to \($0.webhook ?? $0.command ?? "")" }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the subscriptions and how their last delivery went.")
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/alerts", as: [AlertSubscription].self) { alerts in
                    alerts.isEmpty ? "no alert subscriptions; add one with `iofilter alert add NAME --webhook URL`" : table(
                        ["NAME", "SEVERITY", "TO", "LAST DELIVERY"],
                        alerts.map { alert in
                            [alert.name, "\(alert.minimumSeverity.rawValue)+", alert.webhook ?? alert.command ?? "",
                             alert.lastDeliveryAt.map { $0 + (alert.lastError.map { " failed: \($0)" } ?? " ok") } ?? "never"]
                        })
                }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove a subscription.")
        @Argument(help: "The subscription.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("DELETE", "/alerts/\(name)", as: AlertSubscription.self) { "removed \($0.name)" } }
        }
    }

    struct Test: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "test", abstract: "Send a test event to a subscription now.")
        @Argument(help: "The subscription.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            var delivered = true
            try reportingFailures {
                try daemon.client.run("POST", "/alerts/\(name)/test", as: AlertTestResult.self) {
                    delivered = $0.delivered
                    return $0.delivered ? "delivered" : "not delivered: \($0.error ?? "?")"
                }
            }
            if !delivered { throw ExitCode(1) }
        }
    }
}
