import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterModel

struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Create, start and stop VMs: named sets of disks one sandboxed worker serves.",
        discussion: """
            Each running VM has its own worker process, which loads its disks' filters and \
            serves every disk over NBD on a unix socket. A crashing filter takes down only \
            that worker, and iofilterd restarts it. VMs that were running start again when \
            iofilterd restarts, at the same URIs.

              iofilter vm create web --disk data --disk logs
              iofilter vm start web
              iofilter vm show web

            With --export vhost-user-blk the worker also serves each disk to the VM's QEMU \
            as a virtio disk in shared memory (vhost-user-blk); `vm libvirt-xml` prints a \
            libvirt domain that uses it.
            """,
        subcommands: [Create.self, Start.self, Stop.self, UpgradeFilters.self, List.self, Show.self, Delete.self, LibvirtXML.self])

    static func describe(_ vm: VMInfo) -> String {
        var lines = ["\(vm.name)  \(vm.state.rawValue)" + (vm.pid.map { ", worker pid \($0), \(vm.restarts) restart(s)" } ?? "")]
        if let health = vm.health { lines.append("  health: \(health)") }
        if let started = vm.startedAt { lines.append("  started: \(started)") }
        if let limits = vm.limits {
            let parts = [limits.memoryLimit.map { "memory \($0 >> 20) MiB" }, limits.maxConnections.map { "\($0) connections per disk" },
                         limits.cpuWeight.map { "CPU weight \($0)" }]
            lines.append("  limits: " + parts.compactMap { $0 }.joined(separator: ", "))
        }
        if let tls = vm.tls {
            lines.append("  TLS required: " + (tls.pskFile.map { "pre-shared keys from \($0)" }
                ?? "certificates from \(tls.certificatesDirectory ?? "?")" + (tls.verifyPeer ? ", clients verified" : "")))
        }
        for disk in vm.disks {
            lines.append("  disk \(disk)" + (vm.uris[disk].map { ": \($0)" } ?? ""))
            if let socket = vm.vhostUserSockets?[disk] { lines.append("    vhost-user-blk: \(socket)") }
            if let rates = vm.rates?.first(where: { $0.disk == disk }) { lines.append("    " + HealthCommand.describe(rates)) }
            for filter in vm.filters.first(where: { $0.disk == disk })?.filters ?? [] {
                let stats = filter.stats.sorted { $0.key < $1.key }.map { "\($0.key)=\(number($0.value))" }.joined(separator: " ")
                lines.append("    \(filter.plugin) \(filter.version) [\(filter.category.rawValue)]: \(stats)")
                let health = HealthRules.filter(filter)
                if health.status != .ok { lines.append("      health: \(health)") }
            }
        }
        return lines.joined(separator: "\n")
    }

    static func number(_ value: Double) -> String {
        value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(format: "%.3f", value)
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a VM from existing disks.")
        @Argument(help: "The VM's name.") var name: String
        @Option(name: .customLong("disk"), help: "A disk of the VM; repeat for each.") var disks: [String] = []
        @Option(help: ArgumentHelp("The most memory its worker may map (default: the host's, 8G).", valueName: "size"))
        var memoryLimit: String?
        @Option(help: ArgumentHelp("NBD clients served at once per disk (default 16).", valueName: "n"))
        var maxConnections: Int?
        @Option(help: ArgumentHelp("Its worker's share of CPU against other workers, 1-10000 (default 100; where the host gives workers cgroups).", valueName: "n"))
        var cpuWeight: Int?
        @Option(name: .customLong("export"), help: ArgumentHelp("How its QEMU reaches the disks besides NBD: vhost-user-blk (a socket per disk, in shared memory).", valueName: "kind"))
        var exports: [String] = []
        @OptionGroup var tls: TLSOptions
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            if disks.isEmpty { throw ValidationError("give at least one --disk") }
            for export in exports where !["nbd", "vhost-user-blk"].contains(export) {
                throw ValidationError("--export '\(export)' is not nbd or vhost-user-blk")
            }
            if let memoryLimit, WorkerConfiguration.memoryLimit(parsing: memoryLimit) == nil {
                throw ValidationError("--memory-limit '\(memoryLimit)' must be a size of at least 256M")
            }
            if let maxConnections, !VMLimits.connectionRange.contains(maxConnections) {
                throw ValidationError("--max-connections must be in 1...1024")
            }
            if let cpuWeight, !VMLimits.cpuWeightRange.contains(cpuWeight) {
                throw ValidationError("--cpu-weight must be in 1...10000")
            }
        }

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/vms", body: VMCreateRequest(
                    name: name, disks: disks,
                    limits: memoryLimit == nil && maxConnections == nil && cpuWeight == nil ? nil : VMLimits(
                        memoryLimit: memoryLimit.flatMap(WorkerConfiguration.memoryLimit(parsing:)), maxConnections: maxConnections,
                        cpuWeight: cpuWeight),
                    tls: tls.settings, vhostUserBlk: exports.contains("vhost-user-blk") ? true : nil), as: VMInfo.self, text: VMCommand.describe)
            }
        }
    }

    struct Start: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "start", abstract: "Start a VM's worker and print its disks' NBD URIs.",
            discussion: "Pending policy changes and plug-in upgrades apply now.")
        @Argument(help: "The VM's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("POST", "/vms/\(name)/start", as: VMInfo.self, text: VMCommand.describe) }
        }
    }

    struct Stop: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "stop", abstract: "Stop a VM's worker; its filters flush and close first.")
        @Argument(help: "The VM's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("POST", "/vms/\(name)/stop", as: VMInfo.self, text: VMCommand.describe) }
        }
    }

    struct UpgradeFilters: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "upgrade-filters",
            abstract: "Give a running VM's disks their policies' current chains without a restart.",
            discussion: """
                After `iofilter plugin install` of a newer version, or a policy change: a new \
                worker with the new chains loads its plug-ins, the old one answers what its \
                clients sent and closes its filters, and the new one takes every NBD client \
                over where it was (no reconnect). If it cannot, a worker with the old chains \
                does, and the change is refused. TLS clients are closed cleanly instead.

                  iofilter plugin install cache-1.1.0.so
                  iofilter vm upgrade-filters web
                """)
        @Argument(help: "The VM's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/vms/\(name)/upgrade-filters", as: LiveUpgradeReport.self) { report in
                    report.changes.isEmpty ? "VM \(report.vm) runs its policies' chains already; nothing changed"
                        : (report.changes + ["\(report.clients) client(s) taken over by worker \(report.pid.map(String.init) ?? "?") in \(String(format: "%.1f", report.stallMilliseconds)) ms"]).joined(separator: "\n")
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the VMs.")
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/vms", as: [VMInfo].self) { vms in
                    vms.isEmpty ? "no VMs; create one with `iofilter vm create NAME --disk DISK`" : table(
                        ["NAME", "STATE", "HEALTH", "PID", "RESTARTS", "DISKS"],
                        vms.map { [$0.name, $0.state.rawValue, $0.health?.status.rawValue ?? "-", $0.pid.map(String.init) ?? "-", String($0.restarts),
                                   $0.disks.joined(separator: ",")] })
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "show", abstract: "Show a VM: worker, URIs and each filter's statistics.")
        @Argument(help: "The VM's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("GET", "/vms/\(name)", as: VMInfo.self, text: VMCommand.describe) }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a stopped VM; its disks are kept.")
        @Argument(help: "The VM's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("DELETE", "/vms/\(name)", as: VMInfo.self) { "deleted VM \($0.name)" } }
        }
    }
}
