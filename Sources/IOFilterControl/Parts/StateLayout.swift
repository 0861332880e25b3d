import Foundation

/// Where a host keeps what, under its state directory: one value, so that every part of
/// the host (and the recovery after an unclean stop) agrees on the layout.
///
///     iofilterd.sqlite      the state database
///     plugins/NAME/VERSION  installed plug-ins (PluginCatalogue)
///     disks/NAME.img        disk images, with their filters' sidecar state in NAME.state
///     vms/NAME              a VM's worker's directory and its disks' sockets
///     offline/              offline sessions' sockets; work/ and transfer/ are scratch
///     replicas/ daemons/    what partner daemons keep; run/ their channel sockets
///     run/workers/          each VM worker's and daemon's control socket and record,
///                           through which the next host adopts it
struct StateLayout: Sendable {
    let root: String

    init(root: String) { self.root = (root as NSString).standardizingPath }

    static let directories = ["plugins", "disks", "vms", "offline", "replicas", "daemons", "run", "run/workers"]

    /// Makes the directories that must exist.
    func create() throws {
        for directory in Self.directories {
            try FileManager.default.createDirectory(atPath: "\(root)/\(directory)", withIntermediateDirectories: true)
        }
    }

    var database: String { "\(root)/iofilterd.sqlite" }
    /// Present while a host runs; left behind by one that did not stop cleanly.
    var runningMarker: String { "\(root)/.running" }
    var plugins: String { "\(root)/plugins" }
    func disk(_ name: String) -> String { "\(root)/disks/\(name).img" }
    func diskState(_ name: String) -> String { "\(root)/disks/\(name).state" }
    func vm(_ name: String) -> String { "\(root)/vms/\(name)" }
    /// Where a VM's QEMU reaches `disk` over vhost-user-blk.
    func vhostUserSocket(vm name: String, disk: String) -> String { "\(vm(name))/\(disk).vhost.sock" }
    /// Offline sessions' sockets.
    var offlineSockets: String { "\(root)/offline" }
    /// The sockets of workers a transfer (export, copy, snapshot) reads through.
    var transferSockets: String { "\(root)/offline/transfer" }
    /// Where workers that are not a VM's (offline access, maintenance) work.
    var helpers: String { "\(root)/offline/work" }
    /// The working directory of one such worker.
    func helper(_ name: String) -> String { "\(helpers)/\(name)" }
    /// Emptied at start: what offline and maintenance workers of a previous run left.
    var scratchDirectories: [String] { [helpers, transferSockets] }
    /// The daemons' channel sockets: no sandboxed process sees them.
    var daemonSockets: String { "\(root)/run" }
    func daemon(_ plugin: String) -> String { "\(root)/daemons/\(plugin)" }
    /// Where processes that outlive the host are reached and recorded (no sandboxed
    /// process sees it): `vm-NAME` for a VM's worker, `daemon-PLUGIN` for a daemon.
    var continuity: String { "\(root)/run/workers" }
    func controlSocket(_ who: String) -> String { "\(continuity)/\(who).control" }
    func record(_ who: String) -> String { "\(continuity)/\(who).record" }
}
