import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel
import Synchronization

// The rows iofilterd keeps in SQLite. Nested values (manifests, chains, rules) are
// stored as JSON columns: they are read and written whole, never queried inside.

struct PluginRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "plugin"
    var name: String
    var version: String
    var category: String
    var manifest: PluginManifest
    var installedAt: String
    /// (v4) What its signatures earned at install; existing rows are community.
    var acceptanceLevel: AcceptanceLevel
    var signers: [PluginSigner]
}

/// (v4) A signing key enrolled on the host.
struct TrustedKeyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "trustedKey"
    var keyId: String
    var publicKey: String
    var comment: String
    var level: AcceptanceLevel
    var addedAt: String
}

/// (v4) A host setting that must survive restarts (the acceptance level last used).
struct SettingRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "setting"
    var key: String
    var value: String
}

struct PolicyRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "policy"
    var name: String
    var description: String
    var filters: [PolicyRule]
    var createdAt: String

    var policy: Policy { Policy(name: name, description: description, filters: filters, createdAt: createdAt) }
}

struct DiskRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "disk"
    var name: String
    var path: String
    var size: Int64
    var readOnly: Bool
    var policy: String?
    /// The chain attached to the disk: what its next open runs (plug-in paths pinned).
    var attached: [PlannedFilter]
    /// Why the last attach or detach failed, if it did.
    var attachError: String?
    var snapshotOf: String?
    var vm: String?
    var createdAt: String
    /// (v7) The plug-in whose daemon keeps it as a replica; read-only while set.
    var replicaOf: String?
    /// (v9) A point-in-time snapshot whose copy is not complete: removed at the next
    /// start if it is still set (the worker that copied it is gone).
    var copying: Bool?
}

struct VMRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "vm"
    var name: String
    var disks: [String]
    /// "running" or "stopped": what a restarted iofilterd brings back.
    var desiredState: String
    var startedAt: String?
    var createdAt: String
    /// The worker's limits (v2); NULL takes the host's defaults.
    var memoryLimit: Int64?
    var maxConnections: Int?
    /// (v3)
    var cpuWeight: Int?
    /// (v6) TLS for its NBD clients.
    var tls: TLSSettings?
    /// (v10) Its disks are offered over vhost-user-blk too.
    var vhostUserBlk: Bool?

    var limits: VMLimits? {
        let limits = VMLimits(memoryLimit: memoryLimit.map(UInt64.init), maxConnections: maxConnections, cpuWeight: cpuWeight)
        return limits.isEmpty ? nil : limits
    }
}

struct EventRow: Codable, FetchableRecord, MutablePersistableRecord {
    static let databaseTableName = "event"
    var id: Int64?
    var time: String
    var kind: String
    var subject: String
    var message: String
    /// (v5)
    var actor: String?
    /// (v8) Rows from before it are info.
    var severity: Severity

    var event: Event { Event(id: id ?? 0, time: time, kind: kind, subject: subject, message: message, actor: actor, severity: severity) }

    mutating func didInsert(_ inserted: InsertionSuccess) { id = inserted.rowID }
}

/// (v5) An API token: only its SHA-256 is kept.
struct TokenRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "token"
    var id: String
    var name: String
    var role: Role
    var hash: String
    var createdAt: String
    var lastUsedAt: String?
    /// (v8) When it stops working; nil: until revoked.
    var expiresAt: String?
}

/// (v8) Where events of a severity and above are sent.
struct AlertRow: Codable, FetchableRecord, PersistableRecord {
    static let databaseTableName = "alert"
    var name: String
    var webhook: String?
    var command: String?
    var minimumSeverity: Severity
    var createdAt: String
    var lastDeliveryAt: String?
    var lastError: String?

    var subscription: AlertSubscription {
        AlertSubscription(name: name, webhook: webhook, command: command, minimumSeverity: minimumSeverity, createdAt: createdAt,
                          lastDeliveryAt: lastDeliveryAt, lastError: lastError)
    }
}

/// iofilterd's persistent state: one SQLite database under the state directory.
final class StateStore: Sendable {
    let database: DatabaseQueue

    init(path: String) throws {
        var configuration = Configuration()
        configuration.busyMode = .timeout(10)
        database = try DatabaseQueue(path: path, configuration: configuration)
        try Self.migrator.migrate(database)
    }

    static var migrator: DatabaseMigrator {
        var migrator = DatabaseMigrator()
        migrator.registerMigration("v1") { db in
            try db.create(table: "plugin") { t in
                t.column("name", .text).notNull()
                t.column("version", .text).notNull()
                t.column("category", .text).notNull()
                t.column("manifest", .jsonText).notNull()
                t.column("installedAt", .text).notNull()
                t.primaryKey(["name", "version"])
            }
            try db.create(table: "policy") { t in
                t.primaryKey("name", .text)
                t.column("description", .text).notNull()
                t.column("filters", .jsonText).notNull()
                t.column("createdAt", .text).notNull()
            }
            try db.create(table: "vm") { t in
                t.primaryKey("name", .text)
                t.column("disks", .jsonText).notNull()
                t.column("desiredState", .text).notNull()
                t.column("startedAt", .text)
                t.column("createdAt", .text).notNull()
            }
            try db.create(table: "disk") { t in
                t.primaryKey("name", .text)
                t.column("path", .text).notNull().unique()
                t.column("size", .integer).notNull()
                t.column("readOnly", .boolean).notNull()
                t.column("policy", .text).references("policy", onDelete: .restrict)
                t.column("attached", .jsonText).notNull()
                t.column("attachError", .text)
                t.column("snapshotOf", .text)
                t.column("vm", .text).references("vm", onDelete: .restrict)
                t.column("createdAt", .text).notNull()
            }
            try db.create(table: "event") { t in
                t.autoIncrementedPrimaryKey("id")
                t.column("time", .text).notNull()
                t.column("kind", .text).notNull()
                t.column("subject", .text).notNull()
                t.column("message", .text).notNull()
            }
        }
        migrator.registerMigration("v2: per-VM worker limits") { db in
            try db.alter(table: "vm") { t in
                t.add(column: "memoryLimit", .integer)
                t.add(column: "maxConnections", .integer)
            }
        }
        migrator.registerMigration("v3: per-VM CPU weight") { db in
            try db.alter(table: "vm") { t in t.add(column: "cpuWeight", .integer) }
        }
        migrator.registerMigration("v4: signed plug-ins and the trust store") { db in
            try db.alter(table: "plugin") { t in
                t.add(column: "acceptanceLevel", .text).notNull().defaults(to: AcceptanceLevel.community.rawValue)
                t.add(column: "signers", .jsonText).notNull().defaults(to: "[]")
            }
            try db.create(table: "trustedKey") { t in
                t.primaryKey("keyId", .text)
                t.column("publicKey", .text).notNull().unique()
                t.column("comment", .text).notNull()
                t.column("level", .text).notNull()
                t.column("addedAt", .text).notNull()
            }
            try db.create(table: "setting") { t in
                t.primaryKey("key", .text)
                t.column("value", .text).notNull()
            }
        }
        migrator.registerMigration("v5: API tokens and who made each change") { db in
            try db.create(table: "token") { t in
                t.primaryKey("id", .text)
                t.column("name", .text).notNull().unique()
                t.column("role", .text).notNull()
                t.column("hash", .text).notNull().unique()
                t.column("createdAt", .text).notNull()
                t.column("lastUsedAt", .text)
            }
            try db.alter(table: "event") { t in t.add(column: "actor", .text) }
        }
        migrator.registerMigration("v6: NBD over TLS per VM") { db in
            try db.alter(table: "vm") { t in t.add(column: "tls", .jsonText) }
        }
        migrator.registerMigration("v7: replica disks that partner daemons keep") { db in
            try db.alter(table: "disk") { t in t.add(column: "replicaOf", .text) }
        }
        migrator.registerMigration("v8: event severity, token expiry, alert subscriptions") { db in
            try db.alter(table: "event") { t in t.add(column: "severity", .text).notNull().defaults(to: Severity.info.rawValue) }
            try db.alter(table: "token") { t in t.add(column: "expiresAt", .text) }
            try db.create(table: "alert") { t in
                t.primaryKey("name", .text)
                t.column("webhook", .text)
                t.column("command", .text)
                t.column("minimumSeverity", .text).notNull()
                t.column("createdAt", .text).notNull()
                t.column("lastDeliveryAt", .text)
                t.column("lastError", .text)
            }
        }
        migrator.registerMigration("v9: point-in-time snapshots being copied") { db in
            try db.alter(table: "disk") { t in t.add(column: "copying", .boolean) }
        }
        migrator.registerMigration("v10: vhost-user-blk exports") { db in
            try db.alter(table: "vm") { t in t.add(column: "vhostUserBlk", .boolean) }
        }
        return migrator
    }

    func read<T>(_ body: (Database) throws -> T) throws -> T { try database.read(body) }
    func write<T>(_ body: (Database) throws -> T) throws -> T {
        // Counted as it begins and as it ends: a list read across either is not kept.
        writes.add(1, ordering: .acquiringAndReleasing)
        defer {
            writes.add(1, ordering: .acquiringAndReleasing)
            vmRows.withLock { $0 = nil }
        }
        return try database.write(body)
    }

    /// Every VM's row, by name, decoded once per change of the state rather than per
    /// `vm list` (a thousand rows' JSON columns took some 10 ms to decode). Every write
    /// drops them; the next caller reads them afresh.
    func allVMRows() throws -> [VMRow] {
        if let rows = vmRows.withLock({ $0 }) { return rows }
        let before = writes.load(ordering: .acquiring)
        let rows = try database.read { db in try VMRow.order(Column("name")).fetchAll(db) }
        vmRows.withLock { if writes.load(ordering: .acquiring) == before { $0 = rows } }
        return rows
    }
    private let vmRows = Mutex<[VMRow]?>(nil)
    private let writes = Atomic<UInt64>(0)

    static func now() -> String { timestamp(Date()) }

    /// The state's timestamps: ISO 8601 with milliseconds, UTC.
    private static func timestampFormat() -> ISO8601DateFormatter {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter
    }

    static func date(_ timestamp: String) -> Date? { timestampFormat().date(from: timestamp) }

    static func timestamp(_ date: Date) -> String { timestampFormat().string(from: date) }

    /// Records an event; events are history, so failing to record one fails nothing.
    @discardableResult
    func record(_ kind: String, _ subject: String, _ message: String, actor: String? = nil, severity: Severity) -> Event {
        var row = EventRow(id: nil, time: Self.now(), kind: kind, subject: subject, message: message, actor: actor, severity: severity)
        _ = try? database.write { db in
            try row.insert(db)
            // Keep the table bounded.
            try db.execute(sql: "DELETE FROM event WHERE id <= ?", arguments: [(row.id ?? 0) - 10_000])
        }
        return row.event
    }
}
