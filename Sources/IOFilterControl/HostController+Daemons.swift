import Foundation
import GRDB
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterNBD
import IOFilterPosix

/// Partner daemons: one per installed plug-in that defines `daemon_main` (its newest
/// version), sandboxed and supervised like a worker, started with the host, replaced
/// when a newer version is installed, stopped when the plug-in is removed.
extension HostController {
    static func daemonListenSetting(_ plugin: String) -> String { "daemon-listen/\(plugin)" }
    static func daemonTLSSetting(_ plugin: String) -> String { "daemon-tls-psk/\(plugin)" }

    /// Starts the daemon of every installed plug-in that has one (at host start).
    public func startDaemons() {
        let rows = (try? store.read { db in try PluginRow.fetchAll(db) }) ?? []
        for (name, versions) in Dictionary(grouping: rows, by: \.name) {
            guard let newest = versions.max(by: { Versions.isNewer($1.version, than: $0.version) }), newest.manifest.hasDaemon else { continue }
            do {
                try startDaemon(newest.manifest)
            } catch {
                event("daemon-failed", name, error.message)
            }
        }
    }

    /// Stops every daemon (at host stop, after the workers).
    public func stopDaemons() {
        for daemon in daemons.takeAll() { daemon.stop() }
    }

    /// (Re)starts the daemon of `manifest`'s plug-in, replacing one of another version.
    func startDaemon(_ manifest: PluginManifest) throws(ControlError) {
        stopDaemon(manifest.name)
        let name = manifest.name
        let listen = manifest.daemonListens ? daemonListenAddress(name) : nil
        let daemon: DaemonSupervisor
        do {
            daemon = try DaemonSupervisor(
                plugin: manifest, directory: layout.daemon(name), socketDirectory: layout.daemonSockets, listen: listen,
                peerPSK: listen == nil ? nil : setting(Self.daemonTLSSetting(name)),
                logLevel: logLevel, hiddenPaths: hiddenFromWorkers,
                continuity: (layout.controlSocket("daemon-\(name)"), layout.record("daemon-\(name)")),
                adopting: takeLeftover("daemon-\(name)"), logger: logger,
                answer: DaemonSupervisor.brokerAnswer(
                    plugin: manifest, peers: { [weak self] in self?.peerTargets(of: name) ?? [] },
                    replica: { [weak self] replica, size in
                        self?.openReplica(replica, size: size, keptBy: name)
                            ?? .failure(TargetBroker.Failure(ESHUTDOWN, "the host is stopping"))
                    }))
        } catch {
            throw .conflict("\(error)")
        }
        daemon.restartPolicy.maximumBackoff = max(restartBackoffLimit, daemon.restartPolicy.minimumBackoff)
        daemon.onEvent = { [weak self] kind, message in self?.event(kind.rawValue, name, message) }
        daemons.add(name, daemon)
        daemon.start()
        let status = daemon.status
        event(daemon.adopted ? "daemon-adopted" : "daemon-started", name, "version \(manifest.version)"
              + (status.state == .running ? ", pid \(status.pid ?? 0)" : ", not running yet: \(status.lastError ?? "?")")
              + (daemon.listenAddress.map { ", accepting peers on \($0)" } ?? ""))
    }

    func stopDaemon(_ plugin: String) {
        guard let daemon = daemons.remove(plugin) else { return }
        daemon.stop()
        event("daemon-stopped", plugin, "version \(daemon.plugin.version)")
    }

    /// A connection to `plugin`'s daemon for one filter instance (the workers' brokers
    /// ask for it).
    func daemonChannel(_ plugin: String) -> Result<Int32, TargetBroker.Failure> {
        guard let daemon = daemons.daemon(plugin) else {
            return .failure(TargetBroker.Failure(ECONNREFUSED, "\(plugin) has no daemon running on this host"))
        }
        return daemon.connectChannel()
    }

    func daemonStatus(_ plugin: String, version: String) -> DaemonStatus? {
        daemons.daemon(plugin).flatMap { $0.plugin.version == version ? $0.status : nil }
    }

    func daemonListenAddress(_ plugin: String) -> String? { setting(Self.daemonListenSetting(plugin)) }

    func setting(_ key: String) -> String? {
        try? store.read { db in try SettingRow.fetchOne(db, key: key)?.value }
    }

    /// Lets `plugin`'s daemon accept peers on `address` ("HOST:PORT"), or nowhere (nil),
    /// with TLS if `tlsPSK` names a key file, and restarts it on the new socket.
    public func setDaemonListen(_ plugin: String, address: String?, tlsPSK: String? = nil) throws(ControlError) -> PluginInfo {
        if let tlsPSK {
            guard address != nil else { throw .badRequest("a TLS key is for peers: give an address too") }
            try allowedPaths.check(tlsPSK, "the peers' TLS key")
            guard FileManager.default.isReadableFile(atPath: tlsPSK) else { throw .notFound("cannot read \(tlsPSK)") }
        }
        try exclusive {
            let newest = try Self.newestFirst(try store.read { db in try PluginRow.filter(Column("name") == plugin).fetchAll(db) }, name: plugin)[0]
            try applyDaemonListen(newest.manifest, address: address, tlsPSK: tlsPSK)
        }
        return try showPlugin(plugin)[0]
    }

    /// Call under the change lock.
    func applyDaemonListen(_ manifest: PluginManifest, address: String?, tlsPSK: String? = nil) throws {
        guard manifest.hasDaemon else { throw ControlError.badRequest("\(manifest.name) has no partner daemon") }
        guard manifest.daemonListens else {
            throw ControlError.badRequest("\(manifest.name) does not declare IOF_DAEMON_LISTENS: its daemon takes no peers from the network")
        }
        if let address {
            guard let (host, _) = Sockets.hostPort(address), !host.isEmpty else {
                throw ControlError.badRequest("'\(address)' is not HOST:PORT")
            }
        }
        let keys = [Self.daemonListenSetting(manifest.name), Self.daemonTLSSetting(manifest.name)]
        let previous = keys.map(setting)
        func save(_ values: [String?]) throws {
            try store.write { db in
                for (key, value) in zip(keys, values) {
                    if let value { try SettingRow(key: key, value: value).save(db) } else { _ = try SettingRow.deleteOne(db, key: key) }
                }
            }
        }
        try save([address, tlsPSK])
        do {
            try startDaemon(manifest)
        } catch {
            // Back to how it was: the address is refused (in use, not ours), not the daemon.
            try save(previous)
            try? startDaemon(manifest)
            throw error
        }
        event("daemon-listen-set", manifest.name, address.map { "accepts peers on \($0)" + (tlsPSK == nil ? "" : " with TLS (PSK \(tlsPSK!))") }
              ?? "accepts no peers")
    }

    /// The peers (`iofilter://HOST:PORT/DISK`) the policies that use `plugin` name: what
    /// its daemon may connect to, decided when it asks.
    func peerTargets(of plugin: String) -> Set<String> {
        let policies = (try? store.read { db in try PolicyRow.fetchAll(db) }) ?? []
        return Set(policies.flatMap { $0.filters.filter { $0.plugin == plugin }.flatMap(\.parameters.values) }
            .filter { $0.hasPrefix(BrokerRequest.peerScheme) })
    }

    /// A daemon's `open_replica`: the disk `name`, created the first time as a replica
    /// `plugin` keeps (read-only to VMs until promoted), grown if `size` is larger.
    func openReplica(_ name: String, size: UInt64, keptBy plugin: String) -> Result<Int32, TargetBroker.Failure> {
        guard (try? Names.check(name, kind: "disk")) != nil else {
            return .failure(TargetBroker.Failure(EINVAL, "'\(name)' is not a valid disk name"))
        }
        guard size > 0, size < UInt64(Int64.max), size % 512 == 0 else {
            return .failure(TargetBroker.Failure(EINVAL, "a replica's size must be a positive multiple of 512, not \(size)"))
        }
        do {
            return .success(try exclusive { () throws -> Int32 in
                if var row = try store.read({ db in try DiskRow.fetchOne(db, key: name) }) {
                    guard row.replicaOf == plugin else {
                        throw ControlError.conflict(row.replicaOf.map { "disk \(name) is a replica \($0) keeps" }
                                                    ?? "disk \(name) exists and is not a replica (promoted, or never one)")
                    }
                    let fd = open(row.path, O_RDWR | O_CLOEXEC)
                    guard fd >= 0 else { throw ControlError.internalError("cannot open \(row.path): \(String(cString: strerror(errno)))") }
                    if Int64(size) > row.size {
                        guard ftruncate(fd, off_t(size)) == 0 else {
                            close(fd)
                            throw ControlError.conflict("cannot grow \(row.path) to \(size) bytes: \(String(cString: strerror(errno)))")
                        }
                        row.size = Int64(size)
                        try store.write { db in try row.update(db) }
                        event("replica-grown", name, "to \(size) bytes")
                    }
                    return fd
                }
                var row = try newDiskRow(name, size: Int64(size), readOnly: true)
                row.replicaOf = plugin
                var fd: Int32 = -1
                try addDisk(row, policy: nil) {
                    fd = open(row.path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
                    guard fd >= 0 else { throw ControlError.internalError("cannot create \(row.path): \(String(cString: strerror(errno)))") }
                    guard ftruncate(fd, off_t(size)) == 0 else {
                        close(fd)
                        throw ControlError.conflict("cannot size \(row.path) to \(size) bytes: \(String(cString: strerror(errno)))")
                    }
                }
                event("replica-created", name, "\(size) bytes, kept by the daemon of \(plugin)")
                return fd
            })
        } catch {
            let code: Int32 = switch error.status {
            case 409: EEXIST
            case 400: EINVAL
            default: EIO
            }
            return .failure(TargetBroker.Failure(code, error.message))
        }
    }

    /// Makes a replica an ordinary disk of this host (failover): writable, and no
    /// longer written by the daemon that kept it, which is refused from now on.
    public func promoteDisk(_ name: String) throws(ControlError) -> DiskInfo {
        try exclusive {
            var row = try store.read { db in try diskRow(name, db) }
            guard let keeper = row.replicaOf else { throw ControlError.conflict("disk \(name) is not a replica") }
            try requireIdle(row, for: "promote")
            row.replicaOf = nil
            row.readOnly = false
            try store.write { db in try row.update(db) }
            event("disk-promoted", name, "no longer a replica \(keeper) keeps: writable, and its replication stream is refused")
        }
        return try showDisk(name)
    }
}
