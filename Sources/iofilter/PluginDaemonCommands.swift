import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterModel

extension IOFilterCommand.Plugin {
    struct Install: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "install", abstract: "Validate plug-ins and install them on the host.",
            discussion: """
                iofilterd copies each plug-in into its state directory, validates the copy in a \
                sandboxed worker and checks its signature (PLUGIN.so.sig beside it, from \
                `iofilter plugin sign`) against the keys it trusts (`iofilter trust`): a plug-in \
                below the host's acceptance level, signed by an unknown key, changed since it \
                was signed or carrying another plug-in's signature is refused. A newer version \
                of a plug-in in use is picked up by each VM at its next start, or at once with \
                --live (each running VM's worker is replaced under its clients, as `iofilter vm \
                upgrade-filters` does).

                Example:  iofilter plugin install --live ./libmyfilter.so
                """)

        @Argument(help: "Plug-in shared objects (.so).")
        var plugins: [String]

        @Option(help: ArgumentHelp("Where the plug-in's partner daemon may accept peers on other hosts, if it declares IOF_DAEMON_LISTENS.",
                                   valueName: "host:port"))
        var daemonListen: String?

        @Flag(help: "Then give every running VM whose policies pick the new version its new chain now, without a restart.")
        var live = false

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            let timestamp = ISO8601DateFormatter()
            timestamp.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            try reportingFailures {
                for path in plugins {
                    let asked = Date()
                    try daemon.client.run("POST", "/plugins", body: PluginInstallRequest(path: absolutePath(path), daemonListen: daemonListen), as: PluginInfo.self) {
                        // The host answers an install of the very same build with the copy
                        // it has: say so rather than pretend something happened.
                        if let since = timestamp.date(from: $0.installedAt), since < asked.addingTimeInterval(-1) {
                            return "\($0.name) \($0.version) is already installed (since \($0.installedAt)); nothing to do"
                        }
                        return "installed \($0.name) \($0.version) (\($0.category.rawValue), \($0.vendor)) at acceptance level \($0.acceptanceLevel)"
                    }
                }
                guard live else { return }
                let (vms, _) = try daemon.client.send("GET", "/vms", as: [VMInfo].self)
                for vm in vms where vm.state == .running {
                    try daemon.client.run("POST", "/vms/\(vm.name)/upgrade-filters", as: LiveUpgradeReport.self) { report in
                        report.changes.isEmpty ? "VM \(vm.name): nothing to change"
                            : "VM \(vm.name): \(report.changes.joined(separator: "; ")) (\(report.clients) client(s) taken over in \(String(format: "%.1f", report.stallMilliseconds)) ms)"
                    }
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the installed plug-ins.")

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/plugins", as: [PluginInfo].self) { plugins in
                    plugins.isEmpty ? "no plug-ins installed; add one with `iofilter plugin install PLUGIN.so`" : table(
                        ["NAME", "VERSION", "CATEGORY", "LEVEL", "VENDOR", "ATTACHED TO"],
                        plugins.map { [$0.name, $0.version, $0.category.rawValue, $0.acceptanceLevel.rawValue, $0.vendor, $0.attachedTo.joined(separator: ",")] })
                }
            }
        }
    }

    struct DaemonListen: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "daemon-listen",
            abstract: "Let a plug-in's partner daemon accept peers from other hosts on an address, or on none.",
            discussion: """
                The host opens the listening socket and hands it to the daemon (restarted for it); \
                the daemon gets no other network. Only plug-ins that declare IOF_DAEMON_LISTENS \
                (ABI 1.3) take peers.

                Examples (NAME: the plug-in, like org.swift-iofilter.replication):
                  iofilter plugin daemon-listen NAME 192.0.2.10:10900
                  iofilter plugin daemon-listen NAME 192.0.2.10:10900 --tls-psk peers.psk
                  iofilter plugin daemon-listen NAME --off
                """)

        @Argument(help: "The plug-in's name.") var name: String
        @Argument(help: ArgumentHelp("Where to accept peers.", valueName: "host:port")) var address: String?
        @Flag(help: "Accept no peers.") var off = false
        @Option(help: ArgumentHelp("Peers must start TLS with this pre-shared key (a psktool file).", valueName: "file"))
        var tlsPsk: String?
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            if off == (address != nil) { throw ValidationError("give HOST:PORT or --off") }
            if off && tlsPsk != nil { throw ValidationError("--tls-psk is for peers; not with --off") }
        }

        func run() throws {
            try reportingFailures {
                try daemon.client.run("PUT", "/plugins/\(name)/daemon-listen", body: DaemonListenRequest(address: address, tlsPsk: tlsPsk.map(absolutePath)), as: PluginInfo.self) {
                    $0.daemon?.listen.map { "the daemon of \(name) accepts peers on \($0)" } ?? "the daemon of \(name) accepts no peers"
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "show", abstract: "Show a plug-in: versions, parameters, operations.")

        @Argument(help: "The plug-in's name (like org.example.cache).")
        var name: String

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/plugins/\(name)", as: [PluginInfo].self) { versions in
                    versions.map(Self.describe).joined(separator: "\n\n")
                }
            }
        }

        static func describe(_ plugin: PluginInfo) -> String { describe(plugin, installed: true) }

        /// A plug-in for people; `installed` adds where and to what the host has it.
        static func describe(_ plugin: PluginInfo, installed: Bool) -> String {
            var lines = [
                "\(plugin.name) \(plugin.version)  [\(plugin.category.rawValue)]  by \(plugin.vendor)",
                "  \(plugin.description)",
            ]
            if installed {
                lines += [
                    "  installed \(plugin.installedAt) at \(plugin.path); thread model \(plugin.threadModel.rawValue)",
                    "  attached to: \(plugin.attachedTo.isEmpty ? "no disk" : plugin.attachedTo.joined(separator: ", "))",
                    "  acceptance level \(plugin.acceptanceLevel)" + (plugin.signers.isEmpty ? ", unsigned" : ", signed by "
                        + plugin.signers.map { "\($0.keyId) (\($0.comment), \($0.claimed), counts as \($0.effective))" }.joined(separator: "; ")),
                ]
                if let status = plugin.daemon {
                    lines.append("  daemon: \(status.state.rawValue)" + (status.pid.map { ", pid \($0)" } ?? "") + ", \(status.restarts) restart(s)"
                                 + (status.lastError.map { ", last exit: \($0)" } ?? "")
                                 + (status.listen.map { ", accepts peers on \($0)" } ?? (plugin.daemonListens == true ? ", accepts no peers (iofilter plugin daemon-listen)" : "")))
                } else if plugin.daemonListens != nil {
                    lines.append("  daemon: not run by this version (a newer one's runs)")
                }
            } else {
                lines.append("  \(plugin.path); thread model \(plugin.threadModel.rawValue)")
                if let listens = plugin.daemonListens {
                    lines.append("  partner daemon: yes" + (listens ? ", accepts peers on other hosts (IOF_DAEMON_LISTENS)" : ""))
                }
            }
            if !plugin.parameters.isEmpty {
                lines.append("  parameters:")
                lines += plugin.parameters.map { parameterLine($0) }
            }
            if !plugin.operations.isEmpty {
                lines.append("  operations:")
                lines += plugin.operations.map { "    \($0.signature)" }
            }
            return lines.joined(separator: "\n")
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "remove", abstract: "Remove a plug-in that no disk has attached.",
            discussion: "Refused while a disk has it attached or a policy still needs it.")

        @Argument(help: "The plug-in's name.")
        var name: String

        @Option(help: "Remove only this version (default: every version).")
        var version: String?

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("DELETE", "/plugins/\(name)", query: version.map { ["version": $0] } ?? [:], as: [PluginInfo].self) {
                    $0.map { "removed \($0.name) \($0.version)" }.joined(separator: "\n")
                }
            }
        }
    }
}

func parameterLine(_ spec: ParameterSpec) -> String {
    var text = "    \(spec.name) (\(spec.expectation))"
    if spec.required { text += ", required" } else if let value = spec.defaultValue { text += ", default \(value)" }
    if spec.isPath { text += ", a path" }
    return text + ": \(spec.description)"
}

struct Capabilities: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "capabilities", abstract: "Print the host's capability catalogue (JSON).",
        discussion: """
            What policies may ask for: every installed plug-in by category, with its versions \
            and the typed parameters a policy may set. This is the storage-provider view (the \
            VASA/SPBM analog).
            """)

    @OptionGroup var daemon: DaemonOptions

    func run() throws {
        try reportingFailures {
            let (_, raw) = try daemon.client.send("GET", "/capabilities", as: IOFilterAPI.Capabilities.self)
            print(APIClient.pretty(raw))
        }
    }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "events", abstract: "Show the host's recent events.")

    @Option(help: "How many of the newest events.")
    var limit = 50

    @Option(help: ArgumentHelp("Only events of this severity and above: info, warning, error, critical.", valueName: "severity"))
    var severity: Severity?

    @OptionGroup var daemon: DaemonOptions

    func run() throws {
        var query = ["limit": String(limit)]
        if let severity { query["severity"] = severity.rawValue }
        try reportingFailures {
            try daemon.client.run("GET", "/events", query: query, as: [Event].self) { events in
                events.map { "\($0.time)  \($0.severity.rawValue.uppercased())  \($0.kind)  \($0.subject)  \($0.message)"
                    + ($0.actor.map { "  (by \($0))" } ?? "") }
                    .joined(separator: "\n")
            }
        }
    }
}
