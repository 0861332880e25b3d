import Foundation
import GRDB
import IOFilterAPI
import IOFilterHost
import IOFilterModel

extension HostController {
    func pluginInfo(_ row: PluginRow, disks: [DiskRow]) -> PluginInfo {
        PluginInfo(
            manifest: row.manifest, installedAt: row.installedAt,
            attachedTo: disks.filter { $0.attached.contains { $0.manifest.name == row.name && $0.manifest.version == row.version } }
                .map(\.name),
            acceptanceLevel: row.acceptanceLevel, signers: row.signers, daemon: daemonStatus(row.name, version: row.version))
    }

    public func listPlugins() throws(ControlError) -> [PluginInfo] {
        try read { db in
            let disks = try DiskRow.fetchAll(db)
            return try PluginRow.order(Column("name"), Column("version")).fetchAll(db).map { pluginInfo($0, disks: disks) }
        }
    }

    /// Every installed version of one plug-in, newest first.
    public func showPlugin(_ name: String) throws(ControlError) -> [PluginInfo] {
        let (rows, disks) = try read { db in (try PluginRow.filter(Column("name") == name).fetchAll(db), try DiskRow.fetchAll(db)) }
        return try Self.newestFirst(rows, name: name).map { pluginInfo($0, disks: disks) }
    }

    /// One plug-in's installed versions, newest first; not found when there are none.
    static func newestFirst(_ rows: [PluginRow], name: String) throws(ControlError) -> [PluginRow] {
        guard !rows.isEmpty else { throw .notFound("no plug-in named \(name) is installed (see `iofilter plugin list`)") }
        return rows.sorted { Versions.isNewer($0.version, than: $1.version) }
    }

    /// Installs a plug-in: copies the `.so` into the state directory, validates the copy
    /// in a sandboxed worker and checks its signature (PATH.sig, or `signature`) against
    /// the trust store and the host's acceptance level; only then does the copy become
    /// the installed version. Installing a newer version of a plug-in in use is allowed:
    /// VMs pick it up at their next start.
    public func installPlugin(path: String, signature givenSignature: Data? = nil, daemonListen: String? = nil) throws(ControlError) -> PluginInfo {
        guard path.hasPrefix("/") else { throw .badRequest("the plug-in path must be absolute, got '\(path)'") }
        guard FileManager.default.isReadableFile(atPath: path) else { throw .notFound("cannot read \(path)") }
        let signature = givenSignature ?? FileManager.default.contents(atPath: path + ".sig")
        // What is checked is a private copy, so the file cannot change between the checks
        // and the install. Workers (identities of their own) read and map it.
        let staged = try catalogue.stage(path)
        defer { catalogue.discard(staged) }
        let manifest: PluginManifest
        switch PluginValidator().validate(staged) {
        case .success(let valid): manifest = valid
        case .failure(let error): throw .invalid("\(path) is not a valid plug-in: \(String(describing: error).replacingOccurrences(of: staged, with: path))")
        }
        return try exclusive {
            let verdict = try verifySignature(staged: staged, manifest: manifest, signature: signature, source: path)
            if let existing = try store.read({ db in try PluginRow.fetchOne(db, key: ["name": manifest.name, "version": manifest.version]) }) {
                if FileManager.default.contentsEqual(atPath: existing.manifest.path, andPath: staged) {
                    logger.info("\(manifest.name) \(manifest.version) from \(path) is already installed")
                    return try store.read { db in pluginInfo(existing, disks: try DiskRow.fetchAll(db)) }
                }
                throw ControlError.conflict(
                    "\(manifest.name) \(manifest.version) is already installed with different contents; give the new build a new version")
            }
            var installed = manifest
            installed.path = try catalogue.install(staged: staged, name: manifest.name, version: manifest.version, signature: signature)
            let row = PluginRow(name: manifest.name, version: manifest.version, category: manifest.category.rawValue,
                                manifest: installed, installedAt: StateStore.now(), acceptanceLevel: verdict.level,
                                signers: verdict.pluginSigners)
            do {
                try store.write { db in try row.insert(db) }
            } catch {
                catalogue.remove(manifest.name, version: manifest.version)
                throw error
            }
            event("plugin-installed", manifest.name, "version \(manifest.version) (\(manifest.category.rawValue)) from \(path), \(verdict.summary)")
            // Its daemon: the newest version's runs, so an upgrade replaces it.
            let versions = try store.read { db in try PluginRow.filter(Column("name") == manifest.name).fetchAll(db) }
            if installed.hasDaemon, !versions.contains(where: { Versions.isNewer($0.version, than: manifest.version) }) {
                if let daemonListen {
                    try applyDaemonListen(installed, address: daemonListen)
                } else {
                    try startDaemon(installed)
                }
            } else if daemonListen != nil {
                throw ControlError.badRequest("\(manifest.name) \(manifest.version) was installed, but its daemon does not run (it has none, or a newer version's does)")
            }
            return try store.read { db in pluginInfo(row, disks: try DiskRow.fetchAll(db)) }
        }
    }

    /// Removes one version (or every version) of a plug-in that no disk has attached
    /// and no policy still needs.
    public func removePlugin(_ name: String, version: String?) throws(ControlError) -> [PluginInfo] {
        try exclusive {
            let (all, disks, policies) = try store.read { db in
                (try PluginRow.filter(Column("name") == name).fetchAll(db), try DiskRow.fetchAll(db), try PolicyRow.fetchAll(db))
            }
            let doomed = all.filter { version == nil || $0.version == version }
            guard !doomed.isEmpty else {
                throw ControlError.notFound(version.map { "\(name) \($0) is not installed" } ?? "no plug-in named \(name) is installed")
            }
            for row in doomed {
                let users = disks.filter { $0.attached.contains { $0.manifest.name == name && $0.manifest.version == row.version } }
                if !users.isEmpty {
                    throw ControlError.conflict(
                        "\(name) \(row.version) is in use: attached to disk(s) \(users.map(\.name).joined(separator: ", ")); "
                            + "assign those disks another policy (or none) first")
                }
            }
            let remaining = all.filter { row in !doomed.contains { $0.version == row.version } }
            for policy in policies {
                for rule in policy.filters where rule.plugin == name {
                    let satisfied = remaining.contains { rule.version == nil || $0.version == rule.version }
                    if !satisfied {
                        throw ControlError.conflict("policy \(policy.name) uses \(name)\(rule.version.map { " \($0)" } ?? ""); change or delete the policy first")
                    }
                }
            }
            try store.write { db in
                for row in doomed { _ = try PluginRow.deleteOne(db, key: ["name": row.name, "version": row.version]) }
            }
            for row in doomed {
                catalogue.remove(name, version: row.version)
                event("plugin-removed", name, "version \(row.version)")
            }
            if remaining.isEmpty { catalogue.removeAll(name) }
            // The daemon goes with its version; an older one left takes over.
            if doomed.contains(where: { daemonStatus(name, version: $0.version) != nil }) {
                stopDaemon(name)
                if let next = remaining.max(by: { Versions.isNewer($1.version, than: $0.version) }), next.manifest.hasDaemon {
                    try startDaemon(next.manifest)
                }
            }
            return doomed.map { pluginInfo($0, disks: []) }
        }
    }

    /// Runs a management operation: in a VM's worker when `vm` is given (the operation
    /// sees the live filters), otherwise in a fresh sandboxed worker.
    public func callPlugin(_ name: String, _ request: PluginCallRequest) throws(ControlError) -> ManagementResult {
        let versions = try Self.newestFirst(try read { db in try PluginRow.filter(Column("name") == name).fetchAll(db) }, name: name)
        guard let manifest = (request.version.map { wanted in versions.first { $0.version == wanted } } ?? versions.first)?.manifest else {
            throw .notFound("\(name) \(request.version ?? "") is not installed")
        }
        guard let operation = manifest.operation(named: request.operation) else {
            throw .notFound("\(name) \(manifest.version) has no management operation '\(request.operation)'; it declares: "
                            + (manifest.operations.isEmpty ? "none" : manifest.operations.map(\.signature).joined(separator: ", ")))
        }
        if let vm = request.vm {
            guard let worker = sessions.vm(vm) else {
                throw try read { db in try VMRow.fetchOne(db, key: vm) } == nil
                    ? .notFound("no VM named \(vm)") : .conflict("VM \(vm) is not running")
            }
            let response: WorkerControlResponse
            do {
                response = try worker.supervisor.control(.call(plugin: name, operation: request.operation, arguments: request.arguments))
            } catch {
                throw .workerFailed("VM \(vm): \(error)")
            }
            if let error = response.error { throw .invalid(error) }
            guard let result = response.result else { throw .workerFailed("VM \(vm) answered without a result") }
            return result
        }
        switch PluginValidator().call(manifest.path, operation: request.operation, arguments: request.arguments) {
        case .success(let value):
            return ManagementResult(type: operation.returnType.rawValue, value: value.description)
        case .failure(let error):
            throw error.controlError
        }
    }

    /// The capability catalogue: every installed plug-in with what a policy may set.
    public func capabilities() throws(ControlError) -> Capabilities {
        let rows = try read { db in try PluginRow.fetchAll(db) }
        let byName = Dictionary(grouping: rows, by: \.name)
        let plugins = byName.keys.sorted().map { name -> Capability in
            let versions = byName[name]!.sorted { Versions.isNewer($0.version, than: $1.version) }
            let newest = versions[0].manifest
            return Capability(plugin: name, versions: versions.map(\.version), vendor: newest.vendor, category: newest.category,
                              description: newest.description, parameters: newest.parameters)
        }
        return Capabilities(categories: FilterCategory.allCases, plugins: plugins)
    }
}
