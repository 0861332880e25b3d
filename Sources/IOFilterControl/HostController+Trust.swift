import Foundation
import GRDB
import IOFilterAPI
import IOFilterModel
import IOFilterTrust

extension ControlError {
    /// A plug-in whose signatures this host does not accept.
    static func notAccepted(_ message: String) -> ControlError { ControlError(status: 422, code: "not-accepted", message: message) }
}

extension HostController {
    static let acceptanceLevelSetting = "acceptanceLevel"

    /// Makes `level` the host's acceptance level. Like an ESXi host, it refuses a level
    /// above a plug-in already installed (remove that plug-in, or stay lower); lowering
    /// the level is allowed and recorded.
    public func adoptAcceptanceLevel(_ level: AcceptanceLevel) throws(ControlError) {
        try exclusive {
            let (previous, below) = try store.read { db in
                (try SettingRow.fetchOne(db, key: Self.acceptanceLevelSetting).flatMap { AcceptanceLevel(rawValue: $0.value) },
                 try PluginRow.fetchAll(db).filter { $0.acceptanceLevel < level })
            }
            if !below.isEmpty {
                throw ControlError.conflict(
                    "cannot run at acceptance level \(level): installed plug-in(s) below it: "
                        + below.map { "\($0.name) \($0.version) (\($0.acceptanceLevel))" }.joined(separator: ", ")
                        + "; remove them (`iofilter plugin remove NAME`) or start with --acceptance-level \(below.map(\.acceptanceLevel).min()!)")
            }
            acceptanceLevel = level
            guard previous != level else { return }
            try store.write { db in try SettingRow(key: Self.acceptanceLevelSetting, value: level.rawValue).save(db) }
            if let previous, level < previous {
                logger.warning("the acceptance level was lowered from \(previous) to \(level)")
                event("acceptance-level-lowered", "host", "from \(previous) to \(level): plug-ins down to \(level) may now be installed")
            } else {
                event("acceptance-level-set", "host", previous.map { "from \($0) to \(level)" } ?? "\(level)")
            }
        }
    }

    func trustedKeys() throws(ControlError) -> [TrustedKey] {
        try read { db in try TrustedKeyRow.fetchAll(db) }.compactMap { row in
            (try? PublicSigningKey(line: row.publicKey)).map { TrustedKey(publicKey: $0, level: row.level, addedAt: row.addedAt) }
        }
    }

    public func listTrust() throws(ControlError) -> [TrustedKeyInfo] {
        let (keys, plugins) = try read { db in (try TrustedKeyRow.order(Column("addedAt")).fetchAll(db), try PluginRow.fetchAll(db)) }
        return keys.map { info($0, plugins: plugins) }
    }

    func info(_ row: TrustedKeyRow, plugins: [PluginRow]) -> TrustedKeyInfo {
        TrustedKeyInfo(
            keyId: row.keyId, publicKey: row.publicKey, comment: row.comment, level: row.level, addedAt: row.addedAt,
            signed: plugins.filter { $0.signers.contains { $0.keyId == row.keyId } }.map { "\($0.name) \($0.version)" })
    }

    /// Enrols a key: plug-ins it signs count up to `level`. Enrolling a key again
    /// changes its level.
    public func addTrust(_ request: TrustAddRequest) throws(ControlError) -> TrustedKeyInfo {
        let key: PublicSigningKey
        do {
            key = try PublicSigningKey(line: request.publicKey)
        } catch {
            throw .badRequest("publicKey: \(error.message)")
        }
        return try exclusive {
            let row = TrustedKeyRow(keyId: key.id, publicKey: key.line, comment: key.comment, level: request.level, addedAt: StateStore.now())
            let previous = try store.read { db in try TrustedKeyRow.fetchOne(db, key: key.id) }
            try store.write { db in try row.save(db) }
            event("trust-key-added", key.id, "\(key.comment.isEmpty ? "a key" : "'\(key.comment)'") enrolled for \(request.level)"
                  + (previous.map { " (was \($0.level))" } ?? ""))
            return info(row, plugins: try store.read { db in try PluginRow.fetchAll(db) })
        }
    }

    /// Removes a key. Plug-ins it signed stay installed (they were checked when they
    /// were installed); the answer names them.
    public func removeTrust(_ keyId: String) throws(ControlError) -> TrustedKeyInfo {
        try exclusive {
            guard let row = try store.read({ db in try TrustedKeyRow.fetchOne(db, key: keyId) }) else {
                throw ControlError.notFound("no key \(keyId) is enrolled on this host (see `iofilter trust list`)")
            }
            try store.write { db in _ = try TrustedKeyRow.deleteOne(db, key: keyId) }
            let removed = info(row, plugins: try store.read { db in try PluginRow.fetchAll(db) })
            event("trust-key-removed", keyId, "'\(row.comment)' (\(row.level)) no longer trusted"
                  + (removed.signed.isEmpty ? "" : "; installed plug-ins it signed stay installed: \(removed.signed.joined(separator: ", "))"))
            return removed
        }
    }

    /// The signatures of the staged copy of a plug-in, judged against the trust store
    /// and the host's level: its level and signers, or why it is refused.
    func verifySignature(staged: String, manifest: PluginManifest, signature: Data?, source: String) throws(ControlError)
        -> SignatureVerdict
    {
        let file: SignatureFile?
        do {
            file = try signature.map { bytes throws(TrustError) in try SignatureFile(bytes: bytes, source: source + ".sig") }
        } catch {
            throw .notAccepted("\(source): \(error.message)")
        }
        let digest: PluginDigest
        do {
            digest = try PluginDigest(file: staged)
        } catch {
            throw .internalError("cannot read the staged copy of \(source): \(error.message)")
        }
        let verdict = SignatureVerdict.check(file, digest: digest, plugin: SignedPlugin(manifest), trusted: try trustedKeys())
        if let refusal = verdict.refusal(required: acceptanceLevel) {
            event("plugin-refused", manifest.name, "version \(manifest.version) from \(source): \(refusal)")
            throw .notAccepted("\(manifest.name) \(manifest.version) (\(source)) is not accepted on this host: \(refusal)")
        }
        return verdict
    }
}

extension SignatureVerdict {
    var pluginSigners: [PluginSigner] {
        signers.map { PluginSigner(keyId: $0.keyId, comment: $0.comment, claimed: $0.claimed, effective: $0.effective) }
    }

    var summary: String {
        guard isSigned else { return "unsigned (community)" }
        return "acceptance level \(level), signed by "
            + pluginSigners.map { "\($0.keyId)\($0.comment.isEmpty ? "" : " (\($0.comment))")" }.joined(separator: ", ")
    }
}
