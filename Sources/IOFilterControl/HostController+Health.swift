import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel

/// Health, history and alerts: what the sampler saw, and where events go.
extension HostController {
    /// Every VM's health, its disks' and their filters', sampled for this call.
    public func health() throws(ControlError) -> HostHealth {
        let rows = try read { db in try VMRow.order(Column("name")).fetchAll(db) }
        let vms = rows.map { row -> VMHealth in
            guard let sample = sampler.sample(row.name, maxAge: 0) else {
                return VMHealth(name: row.name, state: .stopped, health: nil, restarts: 0, sampledAt: nil, disks: [])
            }
            return VMHealth(name: row.name, state: .running, health: sample.health, restarts: sample.restarts, sampledAt: sample.time,
                            disks: sample.statistics.map(Self.diskHealth))
        }
        return HostHealth(status: vms.compactMap(\.health?.status).max() ?? .ok, vms: vms)
    }

    static func diskHealth(_ disk: DiskStatistics) -> DiskHealth {
        DiskHealth(disk: disk.disk, health: HealthRules.disk(disk), filters: disk.filters.map { filter in
            let lag = HealthRules.lag(filter)
            return FilterHealthInfo(plugin: filter.plugin, version: filter.version, category: filter.category,
                                    health: HealthRules.filter(filter), lagSeconds: lag?.lag, rpoSeconds: lag?.rpo)
        })
    }

    /// A disk's health as last sampled, while its VM runs.
    func lastHealth(of disk: String, vm: String?) -> HealthReport? {
        guard let vm, let sample = sampler.latest(vm) else { return nil }
        switch sample.worker {
        case .answered: return sample.statistics.first { $0.disk == disk }.map(HealthRules.disk)
        default: return sample.health
        }
    }

    /// The VM's figures over the last `seconds` (at most the hour kept).
    public func vmHistory(_ name: String, seconds: Double) throws(ControlError) -> VMHistory {
        _ = try read { db in try vmRow(name, db) }
        guard seconds > 0 else { throw .badRequest("seconds must be positive") }
        return VMHistory(vm: name, intervalSeconds: sampler.interval, points: sampler.history(name, seconds: seconds))
    }

    // MARK: alert subscriptions

    public func listAlerts() throws(ControlError) -> [AlertSubscription] {
        try read { db in try AlertRow.order(Column("name")).fetchAll(db) }.map(\.subscription)
    }

    public func addAlert(_ request: AlertSubscription) throws(ControlError) -> AlertSubscription {
        try Names.check(request.name, kind: "alert subscription")
        switch (request.webhook, request.command) {
        case (let webhook?, nil):
            if case .failure(let error) = AlertDispatcher.parseWebhook(webhook) { throw .badRequest(error.description) }
        case (nil, let command?):
            guard !command.trimmingCharacters(in: .whitespaces).isEmpty else { throw .badRequest("the command is empty") }
        default:
            throw .badRequest("an alert subscription has either a webhook (http://HOST:PORT/PATH) or a command, not both")
        }
        let row = AlertRow(name: request.name, webhook: request.webhook, command: request.command, minimumSeverity: request.minimumSeverity,
                           createdAt: StateStore.now(), lastDeliveryAt: nil, lastError: nil)
        return try exclusive {
            if try store.read({ db in try AlertRow.exists(db, key: request.name) }) {
                throw ControlError.conflict("an alert subscription named \(request.name) exists; remove it first")
            }
            try store.write { db in try row.insert(db) }
            reloadAlerts()
            event("alert-added", request.name, "\(request.minimumSeverity.rawValue) and above to "
                  + (request.webhook.map { "webhook \($0)" } ?? "command \(request.command ?? "")"))
            return row.subscription
        }
    }

    public func removeAlert(_ name: String) throws(ControlError) -> AlertSubscription {
        try exclusive {
            guard let row = try store.read({ db in try AlertRow.fetchOne(db, key: name) }) else {
                throw ControlError.notFound("no alert subscription \(name) (see `iofilter alert list`)")
            }
            try store.write { db in _ = try AlertRow.deleteOne(db, key: name) }
            reloadAlerts()
            event("alert-removed", name, "no longer sent")
            return row.subscription
        }
    }

    /// Sends a test event to one subscription now and says whether it arrived.
    public func testAlert(_ name: String) throws(ControlError) -> AlertTestResult {
        guard let row = try read({ db in try AlertRow.fetchOne(db, key: name) }) else {
            throw .notFound("no alert subscription \(name) (see `iofilter alert list`)")
        }
        let probe = Event(id: 0, time: StateStore.now(), kind: "alert-test", subject: name,
                          message: "a test of alert subscription \(name)", actor: APICall.current?.caller.name, severity: row.minimumSeverity)
        let error = AlertDispatcher.deliver(probe, to: row.subscription)
        deliveryFinished(name, error: error)
        return AlertTestResult(delivered: error == nil, error: error)
    }

    func reloadAlerts() {
        alerts.use(((try? store.read { db in try AlertRow.fetchAll(db) }) ?? []).map(\.subscription))
    }

    func deliveryFinished(_ name: String, error: String?) {
        _ = try? store.write { db in
            try db.execute(sql: "UPDATE alert SET lastDeliveryAt = ?, lastError = ? WHERE name = ?", arguments: [StateStore.now(), error, name])
        }
    }
}
