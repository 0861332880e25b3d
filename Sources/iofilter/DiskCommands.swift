import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterModel
import IOFilterPosix

struct DiskCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "disk",
        abstract: "Create, filter, copy and serve virtual disks.",
        discussion: """
            Disks are raw images in the host's state directory. A disk's policy decides its \
            filters; a disk is served by its VM (see `iofilter vm`) or, while no VM runs it, \
            offline: export, copy, snapshot, clone and `serve --offline` always go through \
            the disk's filters in a sandboxed worker, so a write-back cache's data, \
            encryption and replication are honoured.

              iofilter disk create data --size 10G --policy gold
              iofilter disk compliance data
              iofilter disk export data /backup/data.img
            """,
        subcommands: [
            Create.self, Import.self, List.self, Show.self, Delete.self, Grow.self, Snapshot.self, Clone.self,
            AssignPolicy.self, Compliance.self, Export.self, Copy.self, Serve.self, Promote.self,
            CheckpointCommand.self, ExportNBD.self, Revert.self,
        ])

    static func describe(_ disk: DiskInfo) -> String {
        var lines = [
            "\(disk.name)  \(sizeText(disk.sizeBytes)) (\(disk.sizeBytes) bytes) \(disk.format)\(disk.readOnly ? ", read-only" : "")",
            "  file:        \(disk.path)",
            "  policy:      \(disk.policy ?? "none")",
            "  compliance:  \(disk.compliance.status.rawValue)\(disk.compliance.reason.map { " (\($0))" } ?? "")",
            "  VM:          \(disk.vm ?? "none")",
        ]
        if let uri = disk.uri { lines.append("  served at:   \(uri)") }
        if let source = disk.snapshotOf { lines.append("  snapshot of: \(source)") }
        if let keeper = disk.replicaOf { lines.append("  replica:     kept by the daemon of \(keeper); read-only until `iofilter disk promote \(disk.name)`") }
        if let activity = disk.activity { lines.append("  busy:        \(activity)") }
        if let copy = disk.copy {
            lines.append("  copy:        \(copy.state.rawValue), \(sizeText(Int64(copy.preservedBytes))) of \(sizeText(Int64(copy.totalBytes))) settled "
                         + "(\(sizeText(Int64(copy.writtenBytes))) of data) in \(String(format: "%.1f", copy.seconds))s")
        }
        if let checkpoints = disk.checkpoints, !checkpoints.isEmpty { lines.append("  checkpoints: \(checkpoints.joined(separator: ", "))") }
        lines.append("  filters:     " + (disk.attached.isEmpty ? "none"
            : disk.attached.map { "\($0.plugin) \($0.version) [\($0.category.rawValue)]" }.joined(separator: " -> ")))
        return lines.joined(separator: "\n")
    }

    static func summary(_ disk: DiskInfo) -> [String] {
        [disk.name, sizeText(disk.sizeBytes), disk.policy ?? "-", disk.compliance.status.rawValue, disk.vm ?? "-",
         disk.snapshotOf.map { "snapshot of \($0)" } ?? disk.replicaOf.map { "replica (\($0))" } ?? (disk.uri ?? "")]
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create an empty (sparse) disk.")
        @Argument(help: "The disk's name.") var name: String
        @Option(help: "Its size: bytes, or with K, M, G or T (like 10G).") var size: String
        @Option(help: "A policy to assign; its filters are attached at once.") var policy: String?
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks", body: DiskCreateRequest(name: name, size: size, policy: policy),
                                      as: DiskInfo.self, text: DiskCommand.describe)
            }
        }
    }

    struct Import: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "import", abstract: "Copy a raw image in as a new disk (holes stay holes).")
        @Argument(help: "The new disk's name.") var name: String
        @Option(name: .customLong("from"), help: "The raw image to copy.") var source: String
        @Option(help: "A policy to assign after the copy.") var policy: String?
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks/import", body: DiskImportRequest(name: name, source: absolutePath(source), policy: policy),
                                      as: DiskInfo.self, text: DiskCommand.describe)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the disks with their policy and compliance.")
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/disks", as: [DiskInfo].self) { disks in
                    disks.isEmpty ? "no disks; create one with `iofilter disk create NAME --size 1G`"
                        : table(["NAME", "SIZE", "POLICY", "COMPLIANCE", "VM", "SERVED AT"], disks.map(DiskCommand.summary))
                }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "show", abstract: "Show a disk.")
        @Argument(help: "The disk's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("GET", "/disks/\(name)", as: DiskInfo.self, text: DiskCommand.describe) }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "delete", abstract: "Delete a disk and its data.", discussion: "Refused while a VM owns the disk or anything serves it.")
        @Argument(help: "The disk's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures { try daemon.client.run("DELETE", "/disks/\(name)", as: DiskInfo.self) { "deleted disk \($0.name)" } }
        }
    }

    struct Grow: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "grow", abstract: "Grow a disk no VM is running.",
            discussion: "Its filters hear of it first (their `event` callback, in the VM's worker or a maintenance one) and may veto it.")
        @Argument(help: "The disk's name.") var name: String
        @Option(help: "The new, larger size.") var size: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks/\(name)/grow", body: DiskGrowRequest(size: size), as: DiskInfo.self, text: DiskCommand.describe)
            }
        }
    }

    struct Promote: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "promote", abstract: "Make a replica an ordinary, writable disk of this host (failover).",
            discussion: """
                A replica is a disk a plug-in's daemon writes for another host (replication to \
                iofilter://HOST:PORT/DISK). Promoted, it is this host's own: writable, usable by a VM, \
                and the daemon refuses the old primary's stream from then on (no split brain).

                Failover drill:
                  host A: iofilter vm stop web
                  host B: iofilter disk promote web-replica
                  host B: iofilter vm create web --disk web-replica
                  host B: iofilter vm start web
                """)
        @Argument(help: "The replica disk.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks/\(name)/promote", as: DiskInfo.self) { "promoted \($0.name): writable, no longer a replica" }
            }
        }
    }

    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot", abstract: "Take a point-in-time, read-only snapshot of a disk as its consumer sees it now.",
            discussion: """
                The disk's filters hear of it first (they flush) with its I/O held back; from \
                that instant its worker preserves every block before the consumer overwrites it \
                and copies the rest in the background, so the snapshot is the disk exactly as it \
                was, while its VM goes on running. The command returns at that instant (with \
                --wait, once the copy is complete; a disk no VM runs is always copied first). The \
                snapshot can be read at once (`iofilter disk export-nbd SNAPSHOT`); `disk show` \
                says how far its copy is. If the worker stops before the copy is complete, the \
                snapshot is removed (an event says why).

                With --checkpoint, a checkpoint of the disk is made at the same instant: the next \
                snapshot's export offers qemu:dirty-bitmap:NAME, exactly what changed in between.

                  iofilter disk snapshot data nightly --checkpoint nightly --wait
                """)
        @Argument(help: "The disk.") var disk: String
        @Argument(help: "The snapshot's name.") var snapshot: String
        @Option(help: "Make a checkpoint of the disk at the snapshot's instant.") var checkpoint: String?
        @Option(help: "That checkpoint's granularity (a power of two, 4K to 64M; default 64K).") var granularity: String?
        @Option(help: "Limit the background copy to this many bytes a second (like 100M).") var rate: String?
        @Flag(help: "Return once the copy is complete.") var wait = false
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                let request = DiskDeriveRequest(name: snapshot, checkpoint: checkpoint, granularity: granularity, rate: rate, wait: wait ? true : nil)
                try daemon.client.run("POST", "/disks/\(disk)/snapshot", body: request, as: DiskInfo.self, text: DiskCommand.describe)
            }
        }
    }

    struct CheckpointCommand: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "checkpoint",
            abstract: "Track which blocks of a disk change (changed-block tracking for incremental backup).",
            discussion: """
                A checkpoint records, per granule, what the disk's consumer changed since it was \
                made; the record is kept beside the disk and survives worker and host restarts. \
                Backup tools read it over NBD as the metadata context qemu:dirty-bitmap:NAME \
                (`nbdinfo --map=qemu:dirty-bitmap:NAME URI`). A checkpoint that may have missed \
                changes (the machine went down while it was tracked) says so and is no longer \
                offered: delete it and take a full backup.
                """,
            subcommands: [Create.self, List.self, Delete.self])

        struct Create: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "create", abstract: "Start tracking a disk's changes from now on.")
            @Argument(help: "The disk.") var disk: String
            @Argument(help: "The checkpoint's name.") var name: String
            @Option(help: "Bytes per tracked granule (a power of two, 4K to 64M; default 64K).") var granularity: String?
            @OptionGroup var daemon: DaemonOptions

            func run() throws {
                try reportingFailures {
                    try daemon.client.run("POST", "/disks/\(disk)/checkpoints", body: CheckpointCreateRequest(name: name, granularity: granularity),
                                          as: CheckpointInfo.self) { "checkpoint \($0.name) of \($0.disk): tracking changes (\($0.metaContext))" }
                }
            }
        }

        struct List: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "list", abstract: "A disk's checkpoints, oldest first.")
            @Argument(help: "The disk.") var disk: String
            @OptionGroup var daemon: DaemonOptions

            func run() throws {
                try reportingFailures {
                    try daemon.client.run("GET", "/disks/\(disk)/checkpoints", as: [CheckpointInfo].self) { checkpoints in
                        table(["NAME", "CHANGED", "GRANULARITY", "CREATED", "STATE"], checkpoints.map(CheckpointCommand.row))
                    }
                }
            }
        }

        static func row(_ checkpoint: CheckpointInfo) -> [String] {
            let state: String
            if let reason = checkpoint.inconsistency {
                state = "inconsistent: \(reason)"
            } else {
                state = checkpoint.frozen ? "frozen at the snapshot" : "tracking"
            }
            return [checkpoint.name, sizeText(Int64(checkpoint.changedBytes)), sizeText(Int64(checkpoint.granularity)), checkpoint.createdAt, state]
        }

        struct Delete: ParsableCommand {
            static let configuration = CommandConfiguration(commandName: "delete", abstract: "Stop tracking since a checkpoint and remove its record.")
            @Argument(help: "The disk.") var disk: String
            @Argument(help: "The checkpoint.") var name: String
            @OptionGroup var daemon: DaemonOptions

            func run() throws {
                try reportingFailures {
                    try daemon.client.run("DELETE", "/disks/\(disk)/checkpoints/\(name)", as: CheckpointInfo.self) { "deleted checkpoint \($0.name) of \($0.disk)" }
                }
            }
        }
    }

    struct ExportNBD: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export-nbd",
            abstract: "Print an NBD URI to read a disk (a snapshot, even while it is copied) without stopping anything.",
            discussion: """
                A snapshot is read through the worker that copies it; a running VM's disk through \
                its VM; anything else through a read-only offline session, which stays until \
                `iofilter disk export-nbd DISK --stop`.

                  uri=$(iofilter disk export-nbd nightly)
                  nbdcopy "$uri" /backup/full.img
                  nbdinfo --map=qemu:dirty-bitmap:monday "$uri"
                """)
        @Argument(help: "The disk or snapshot.") var disk: String
        @Flag(help: "End the offline session an earlier export-nbd started.") var stop = false
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                let client = try daemon.client
                if stop {
                    try client.run("DELETE", "/disks/\(disk)/offline", as: OfflineSession.self) { "stopped serving \($0.disk)" }
                    return
                }
                try client.run("POST", "/disks/\(disk)/nbd", as: NBDExportInfo.self) { $0.uri }
            }
        }
    }

    struct Revert: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "revert", abstract: "Put a stopped disk back to one of its snapshots.",
            discussion: """
                The disk's filters hear first (a cache drops its blocks, replication plans a \
                resync; any may veto, and then nothing changes); then every block is written \
                through the disk's chain, so its checkpoints record the change.
                """)
        @Argument(help: "The disk.") var disk: String
        @Argument(help: "A complete snapshot of it.") var snapshot: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks/\(disk)/revert", body: DiskRevertRequest(snapshot: snapshot), as: TransferReport.self) {
                    "reverted \(disk) to \(snapshot): \(sizeText(Int64($0.bytes))) written through its filters in \(String(format: "%.1f", $0.seconds))s"
                }
            }
        }
    }

    struct Clone: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "clone", abstract: "Make a new, independent disk with a disk's contents.")
        @Argument(help: "The disk (or snapshot) to clone.") var disk: String
        @Argument(help: "The new disk's name.") var clone: String
        @Option(help: "The new disk's policy.") var policy: String?
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("POST", "/disks/\(disk)/clone", body: DiskDeriveRequest(name: clone, policy: policy), as: DiskInfo.self,
                                      text: DiskCommand.describe)
            }
        }
    }

    struct AssignPolicy: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "assign-policy",
            abstract: "Assign a policy to a disk (or remove it with --none).",
            discussion: """
                On a disk no VM is running, the filters are attached (their attach callbacks run: \
                initial replication sync, cache creation) or detached (a write-back cache destages \
                first) at once. On a running VM's disk it applies at once too: a new worker with \
                the new chain takes the VM's clients over (see `iofilter vm upgrade-filters`).
                """)
        @Argument(help: "The disk.") var disk: String
        @Argument(help: "The policy.") var policy: String?
        @Flag(help: "Remove the disk's policy and detach its filters.") var none = false
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            guard (policy == nil) == none else { throw ValidationError("give a policy or --none") }
        }

        func run() throws {
            try reportingFailures {
                try daemon.client.run("PUT", "/disks/\(disk)/policy", body: DiskPolicyRequest(policy: policy), as: DiskInfo.self,
                                      text: DiskCommand.describe)
            }
        }
    }

    struct Compliance: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "compliance", abstract: "Does a disk's chain match its policy?",
            discussion: """
                Prints compliant, non-compliant (with the reason), pending (applies at the VM's \
                next start) or none. Exits 0 when compliant or without a policy, 2 when pending, \
                3 when non-compliant (1 is an error), so that scripts can wait for compliance. \
                A served disk whose chain is not healthy gets a second line, "health: \
                degraded: REASON" (see `iofilter health`).
                """)
        @Argument(help: "The disk.") var disk: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            var status: IOFilterAPI.Compliance.Status?
            try reportingFailures {
                try daemon.client.run("GET", "/disks/\(disk)/compliance", as: IOFilterAPI.Compliance.self) {
                    status = $0.status
                    let health = $0.health.flatMap { $0.status == .ok ? nil : "\nhealth: \($0)" } ?? ""
                    return $0.status.rawValue + ($0.reason.map { ": \($0)" } ?? "") + health
                }
            }
            switch status {
            case .pending: throw ExitCode(2)
            case .nonCompliant: throw ExitCode(3)
            default: break
            }
        }
    }

    struct Export: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export", abstract: "Write a disk, through its filters, to a new raw image file.",
            discussion: "While the disk's VM runs, it is read through the VM's worker; never around the filters.")
        @Argument(help: "The disk.") var disk: String
        @Argument(help: "The raw image to create (must not exist).") var file: String
        /// Accepted from scripts written for earlier releases; it never changed anything
        /// (transfers always go through the filters), so it is no longer offered.
        @Flag(help: .hidden) var offline = false
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try withProgress(of: disk, daemon: daemon) {
                    try daemon.client.run("POST", "/disks/\(disk)/export", body: DiskExportRequest(path: absolutePath(file)), as: TransferReport.self) {
                        "exported \(sizeText($0.bytes)) to \(file) in \(String(format: "%.1f", $0.seconds)) s through the \($0.through)"
                    }
                }
            }
        }
    }

    struct Copy: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "copy", abstract: "Copy a disk onto another disk, through both disks' filters.",
            discussion: "The target must exist, be at least as large, and not be in use.")
        @Argument(help: "The source disk.") var disk: String
        @Argument(help: "The target disk.") var target: String
        /// Accepted from scripts written for earlier releases; it never changed anything
        /// (transfers always go through the filters), so it is no longer offered.
        @Flag(help: .hidden) var offline = false
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try withProgress(of: disk, daemon: daemon) {
                    try daemon.client.run("POST", "/disks/\(disk)/copy", body: DiskCopyRequest(target: target), as: TransferReport.self) {
                        "copied \(sizeText($0.bytes)) onto \(target) in \(String(format: "%.1f", $0.seconds)) s through the \($0.through)"
                    }
                }
            }
        }
    }

    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "serve", abstract: "Serve a disk no VM is running over NBD, through its filters.",
            discussion: """
                Prints the NBD URI and serves until interrupted (Ctrl-C), then stops. With \
                --detach, leaves the session running; end it with `iofilter disk serve DISK --stop`.

                  iofilter disk serve data --offline --readonly
                  qemu-img convert -O qcow2 'nbd+unix:///data?socket=…' data.qcow2
                """)
        @Argument(help: "The disk.") var disk: String
        @Flag(help: "Required: serve a disk whose VM is stopped (a running VM's disks are served by the VM).") var offline = false
        @Flag(help: "Refuse writes.") var readonly = false
        @Flag(help: "Leave the session running and return.") var detach = false
        @Flag(help: "Stop a detached session.") var stop = false
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            guard offline || stop else { throw ValidationError("give --offline (or --stop to end a detached session)") }
        }

        func run() throws {
            try reportingFailures {
                let client = try daemon.client
                if stop {
                    try client.run("DELETE", "/disks/\(disk)/offline", as: OfflineSession.self) { "stopped serving \($0.disk)" }
                    return
                }
                let signals = TerminationSignals.block()
                let (session, raw) = try client.send("POST", "/disks/\(disk)/offline", body: OfflineServeRequest(readOnly: readonly),
                                                     as: OfflineSession.self)
                print(daemon.json ? APIClient.pretty(raw) : session.uri)
                if detach { return }
                FileHandle.standardError.write(Data("serving \(disk) offline\(session.readOnly ? " (read-only)" : ""); Ctrl-C stops\n".utf8))
                _ = signals.wait()
                _ = try client.send("DELETE", "/disks/\(disk)/offline", as: OfflineSession.self)
            }
        }
    }
}
