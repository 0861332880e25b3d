import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel

extension HostController {
    /// Turns a policy into the chain it asks for on `disk`, from the plug-ins installed
    /// now: each rule's version (pinned, or the newest), its parameters checked against
    /// the plug-in's schema, one filter per category, in category order.
    ///
    /// Parameter values may say `{disk}` (the disk's name) and `{state}` (the host's
    /// state directory), so one policy can give each disk its own replica file.
    func plan(_ policy: Policy, disk: String, plugins: [PluginRow]) throws(ControlError) -> [PlannedFilter] {
        var selections: [FilterSelection] = []
        for rule in policy.filters {
            let candidates = plugins.filter { $0.name == rule.plugin }
            guard !candidates.isEmpty else {
                throw .invalid("policy \(policy.name): plug-in \(rule.plugin) is not installed (see `iofilter capabilities`)")
            }
            let chosen = rule.version.map { wanted in candidates.first { $0.version == wanted } }
                ?? candidates.max { Versions.isNewer($1.version, than: $0.version) }
            guard let chosen else {
                throw .invalid("policy \(policy.name): \(rule.plugin) \(rule.version ?? "") is not installed; installed: "
                               + candidates.map(\.version).joined(separator: ", "))
            }
            let parameters = rule.parameters.mapValues {
                $0.replacingOccurrences(of: "{disk}", with: disk).replacingOccurrences(of: "{state}", with: stateDirectory)
            }
            selections.append(FilterSelection(manifest: chosen.manifest, parameters: parameters))
        }
        let chain: [PlannedFilter]
        do {
            chain = try FilterChain.plan(selections)
        } catch {
            throw .invalid("policy \(policy.name): \(error)")
        }
        // A worker's files and sockets are opened for it by the host: they must lie
        // where the admin allows.
        let allowed = allowedPaths
        for filter in chain {
            for spec in filter.manifest.parameters where spec.isPath {
                guard let value = filter.parameters[spec.name], !value.isEmpty else { continue }
                try allowed.checkTarget(value, "policy \(policy.name): \(filter.manifest.name)'s \(spec.name)")
            }
        }
        return chain
    }

    func policyRow(_ name: String, _ db: Database) throws -> PolicyRow {
        guard let row = try PolicyRow.fetchOne(db, key: name) else {
            throw ControlError.notFound("no policy named \(name) (see `iofilter policy list`)")
        }
        return row
    }

    public func listPolicies() throws(ControlError) -> [Policy] {
        try read { db in try PolicyRow.order(Column("name")).fetchAll(db).map(\.policy) }
    }

    public func showPolicy(_ name: String) throws(ControlError) -> Policy {
        try read { db in try policyRow(name, db).policy }
    }

    /// Checks a policy (stored or not) against the plug-ins installed now.
    public func validatePolicy(_ policy: Policy) throws(ControlError) -> PolicyValidation {
        try Names.check(policy.name, kind: "policy")
        let plugins = try read { db in try PluginRow.fetchAll(db) }
        var errors: [String] = []
        if policy.filters.isEmpty { errors.append("policy \(policy.name) names no filters") }
        do {
            let chain = try plan(policy, disk: "{disk}", plugins: plugins)
            if errors.isEmpty { return PolicyValidation(valid: true, chain: chain.map(\.entry), errors: []) }
        } catch {
            errors.append(error.message)
        }
        return PolicyValidation(valid: false, chain: [], errors: errors)
    }

    public func createPolicy(_ policy: Policy) throws(ControlError) -> Policy {
        try Names.check(policy.name, kind: "policy")
        let validation = try validatePolicy(policy)
        guard validation.valid else { throw .invalid(validation.errors.joined(separator: "; ")) }
        return try exclusive {
            if try store.read({ db in try PolicyRow.exists(db, key: policy.name) }) {
                throw ControlError.conflict("a policy named \(policy.name) exists; delete it first or pick another name")
            }
            let row = PolicyRow(name: policy.name, description: policy.description, filters: policy.filters, createdAt: StateStore.now())
            try store.write { db in try row.insert(db) }
            event("policy-created", policy.name, validation.chain.map { "\($0.plugin) \($0.version)" }.joined(separator: " -> "))
            return row.policy
        }
    }

    public func deletePolicy(_ name: String) throws(ControlError) -> Policy {
        try exclusive {
            let (row, users) = try store.read { db in
                (try policyRow(name, db), try DiskRow.filter(Column("policy") == name).fetchAll(db).map(\.name))
            }
            if !users.isEmpty {
                throw ControlError.conflict("policy \(name) is assigned to disk(s) \(users.joined(separator: ", ")); assign them another policy first")
            }
            _ = try store.write { db in try PolicyRow.deleteOne(db, key: name) }
            event("policy-deleted", name, "")
            return row.policy
        }
    }

    /// Where a disk stands against its policy. Compliant: its attached chain is what
    /// the policy asks for. Pending: it will be at its VM's next start (a policy
    /// changed, or a plug-in was upgraded, while the VM ran). Non-compliant: it cannot
    /// be, with the reason.
    func compliance(of disk: DiskRow, plugins: [PluginRow], policies: [PolicyRow]) -> Compliance {
        if let error = disk.attachError { return Compliance(status: .nonCompliant, reason: error) }
        var desired: [PlannedFilter] = []
        if let name = disk.policy {
            guard let policy = policies.first(where: { $0.name == name }) else {
                return Compliance(status: .nonCompliant, reason: "policy \(name) does not exist")
            }
            do {
                desired = try plan(policy.policy, disk: disk.name, plugins: plugins)
            } catch {
                return Compliance(status: .nonCompliant, reason: error.message)
            }
        }
        let have = disk.attached.map(\.entry)
        let want = desired.map(\.entry)
        if have == want {
            return disk.policy == nil ? Compliance(status: .none, reason: "no policy assigned") : Compliance(status: .compliant)
        }
        var changes: [String] = []
        for entry in want {
            if let current = have.first(where: { $0.plugin == entry.plugin }) {
                if current.version != entry.version { changes.append("upgrade \(entry.plugin) \(current.version) -> \(entry.version)") }
                if current.parameters != entry.parameters { changes.append("new parameters for \(entry.plugin)") }
            } else {
                changes.append("attach \(entry.plugin) \(entry.version)")
            }
        }
        for entry in have where !want.contains(where: { $0.plugin == entry.plugin }) { changes.append("detach \(entry.plugin)") }
        let when = disk.vm.map { "at the next start of VM \($0)" } ?? "at the disk's next open"
        return Compliance(status: .pending, reason: "\(changes.joined(separator: ", ")) \(when)")
    }
}

extension PlannedFilter {
    var entry: ChainEntry {
        ChainEntry(plugin: manifest.name, version: manifest.version, category: manifest.category, parameters: parameters)
    }
}
