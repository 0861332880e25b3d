import Foundation
import GRDB
import IOFilterAPI
import IOFilterHTTP
import IOFilterPosix
import IOFilterTrust

/// Who is calling the API, as the host established it.
public struct Caller: Sendable, CustomStringConvertible {
    public let role: Role
    /// For events and logs: "uid 0 (root)", "token ci".
    public let name: String
    /// The token it signed in with, if it did.
    public var tokenID: String? = nil
    public var description: String { "\(name) [\(role.rawValue)]" }
}

/// The groups whose members get each role on the unix socket (root and the daemon's own
/// user are always admin).
public struct AccessGroups: Sendable {
    public var admin: [gid_t] = []
    public var `operator`: [gid_t] = []
    public var readOnly: [gid_t] = []
    public init() {}

    public var all: [gid_t] { admin + self.operator + readOnly }

    /// A group by name or number.
    public static func gid(_ text: String) -> gid_t? {
        if let number = gid_t(text) { return number }
        return text.withCString { getgrnam($0) }.map { $0.pointee.gr_gid }
    }
}

/// The API call being handled on this thread: who made it, and whether it has recorded
/// an event yet (every change made through the API is an event naming its caller).
public final class APICall: @unchecked Sendable {
    // @unchecked: one call is handled on one thread; nothing else reads it.
    @TaskLocal public static var current: APICall?
    public let caller: Caller
    public internal(set) var recordedEvent = false
    public init(caller: Caller) { self.caller = caller }
}

extension ControlError {
    public static func unauthenticated(_ message: String) -> ControlError { ControlError(status: 401, code: "unauthenticated", message: message) }
    public static func forbidden(_ message: String) -> ControlError { ControlError(status: 403, code: "forbidden", message: message) }
}

extension HostController {
    /// Establishes who sent `request`: by peer credentials on the unix socket, by bearer
    /// token over TCP.
    /// A refusal is an event ("sign-in-failed"), at most one per peer a minute.
    public func authenticate(_ request: HTTPRequest) throws(ControlError) -> Caller {
        do throws(ControlError) {
            switch request.peer {
            case .local(let uid, let gid, _):
                return try localCaller(uid: uid, gid: gid)
            case .network:
                return try tokenCaller(request.headers["authorization"])
            case nil:
                throw ControlError.unauthenticated("the request came with no peer")
            }
        } catch {
            // By address, not port: each attempt comes from a new port.
            let peer: String
            switch request.peer {
            case .local(let uid, _, _): peer = "uid \(uid)"
            case .network(let address, _): peer = Sockets.hostPort(address)?.host ?? address
            case nil: peer = "unknown peer"
            }
            if let count = signInFailures.failed(peer) {
                let earlier = count > 1 ? "\(count) refused requests in the last minute; last: " : ""
                record("sign-in-failed", peer, earlier + "\(request.method) \(request.path): \(error.message)", actor: nil)
            }
            throw error
        }
    }

    /// Whether a token still lets its holder in (a live stream asks every update).
    public func tokenIsValid(_ id: String) -> Bool {
        guard let row = try? read({ db in try TokenRow.fetchOne(db, key: id) }) else { return false }
        return !Self.expired(row)
    }

    static func expired(_ row: TokenRow) -> Bool {
        guard let expiresAt = row.expiresAt, let date = StateStore.date(expiresAt) else { return false }
        return date <= Date()
    }

    func localCaller(uid: uid_t, gid: gid_t) throws(ControlError) -> Caller {
        let user = Self.userName(uid)
        let name = "uid \(uid)" + (user.map { " (\($0))" } ?? "")
        if uid == 0 || uid == geteuid() { return Caller(role: .admin, name: name) }
        var groups = Set([gid])
        if let user {
            var count: Int32 = 64
            var list = [gid_t](repeating: 0, count: Int(count))
            if getgrouplist(user, gid, &list, &count) == -1 {
                list = [gid_t](repeating: 0, count: Int(count))
                _ = getgrouplist(user, gid, &list, &count)
            }
            groups.formUnion(list.prefix(Int(max(0, count))))
        }
        let granted: [(Role, [gid_t])] = [(.admin, accessGroups.admin), (.operator, accessGroups.operator), (.readOnly, accessGroups.readOnly)]
        if let role = granted.first(where: { !groups.isDisjoint(with: $0.1) })?.0 { return Caller(role: role, name: name) }
        throw .forbidden("\(name) may not use this API: it is not root, nor in a group iofilterd grants a role "
                         + "(--admin-group, --operator-group, --read-only-group)")
    }

    /// The user's name, if it has one (getpwuid_r: requests run on many threads).
    static func userName(_ uid: uid_t) -> String? {
        var buffer = [CChar](repeating: 0, count: 4096)
        return buffer.withUnsafeMutableBufferPointer { storage in
            var entry = passwd()
            var result: UnsafeMutablePointer<passwd>?
            guard getpwuid_r(uid, &entry, storage.baseAddress!, storage.count, &result) == 0, result != nil, let name = entry.pw_name else { return nil }
            return String(cString: name)
        }
    }

    static func tokenHash(_ token: String) -> String {
        SHA256Digest.hex(Data(token.utf8))
    }

    func tokenCaller(_ authorization: String?) throws(ControlError) -> Caller {
        guard let authorization, authorization.lowercased().hasPrefix("bearer ") else {
            throw .unauthenticated("the API over TCP needs a token: create one on the host with `iofilter token create NAME --role ROLE` "
                                   + "and pass it with --token or IOFILTER_TOKEN (header Authorization: Bearer TOKEN)")
        }
        let hash = Self.tokenHash(String(authorization.dropFirst(7)).trimmingCharacters(in: .whitespaces))
        guard var row = try read({ db in try TokenRow.filter(Column("hash") == hash).fetchOne(db) }) else {
            throw .unauthenticated("the token is not valid here (revoked, or issued by another host)")
        }
        if Self.expired(row) {
            throw .unauthenticated("the token \(row.name) expired at \(row.expiresAt ?? "?"); create a new one (`iofilter token create`)")
        }
        // Last use to the minute is enough, and spares a write per request.
        let now = StateStore.now()
        if row.lastUsedAt.map({ $0.prefix(16) != now.prefix(16) }) ?? true {
            row.lastUsedAt = now
            _ = try? store.write { db in try row.update(db) }
        }
        return Caller(role: row.role, name: "token \(row.name)", tokenID: row.id)
    }

    // MARK: tokens

    public func createToken(_ request: TokenCreateRequest) throws(ControlError) -> TokenInfo {
        try Names.check(request.name, kind: "token")
        // SystemRandomNumberGenerator is the kernel's CSPRNG (getrandom).
        var generator = SystemRandomNumberGenerator()
        let secret = (0..<32).map { _ in UInt8.random(in: 0...255, using: &generator) }
        let token = "iof_" + Data(secret).base64EncodedString().replacingOccurrences(of: "+", with: "-")
            .replacingOccurrences(of: "/", with: "_").replacingOccurrences(of: "=", with: "")
        if let seconds = request.expiresInSeconds, seconds <= 0 || seconds > 10 * 366 * 86_400 {
            throw .badRequest("expiresInSeconds must be between 1 and ten years")
        }
        let now = Date()
        let row = TokenRow(id: String(Self.tokenHash(token).prefix(12)), name: request.name, role: request.role, hash: Self.tokenHash(token),
                           createdAt: StateStore.timestamp(now), lastUsedAt: nil,
                           expiresAt: request.expiresInSeconds.map { StateStore.timestamp(now.addingTimeInterval(Double($0))) })
        return try exclusive {
            if try store.read({ db in try TokenRow.filter(Column("name") == request.name).fetchCount(db) }) > 0 {
                throw ControlError.conflict("a token named \(request.name) exists; revoke it first or pick another name")
            }
            try store.write { db in try row.insert(db) }
            event("token-created", request.name, "role \(request.role.rawValue), id \(row.id)" + (row.expiresAt.map { ", expires \($0)" } ?? ""))
            return TokenInfo(id: row.id, name: row.name, role: row.role, createdAt: row.createdAt, lastUsedAt: nil, token: token, expiresAt: row.expiresAt)
        }
    }

    public func listTokens() throws(ControlError) -> [TokenInfo] {
        try read { db in try TokenRow.order(Column("createdAt")).fetchAll(db) }.map {
            TokenInfo(id: $0.id, name: $0.name, role: $0.role, createdAt: $0.createdAt, lastUsedAt: $0.lastUsedAt, token: nil, expiresAt: $0.expiresAt)
        }
    }

    /// Revokes a token, by id or name.
    public func revokeToken(_ key: String) throws(ControlError) -> TokenInfo {
        try exclusive {
            guard let row = try store.read({ db in try TokenRow.filter(Column("id") == key || Column("name") == key).fetchOne(db) }) else {
                throw ControlError.notFound("no token \(key) (see `iofilter token list`)")
            }
            try store.write { db in _ = try TokenRow.deleteOne(db, key: row.id) }
            event("token-revoked", row.name, "id \(row.id), role \(row.role.rawValue)")
            // Its open console streams end now, not at their next update.
            liveStreams.end(tokenID: row.id)
            return TokenInfo(id: row.id, name: row.name, role: row.role, createdAt: row.createdAt, lastUsedAt: row.lastUsedAt, token: nil,
                             expiresAt: row.expiresAt)
        }
    }
}

/// Failed sign-ins per peer: the first in a minute is an event at once, the rest of
/// that minute are counted into the next one, so a flood cannot push every other event
/// out of the bounded log.
final class SignInFailures: @unchecked Sendable {
    // @unchecked: under `lock`.
    private let lock = ConditionLock()
    private var peers: [String: (lastEvent: UInt64, suppressed: Int)] = [:]
    static let quietSeconds = 60.0

    /// How many failures to report now for `peer` (including suppressed ones), or nil
    /// to stay quiet.
    func failed(_ peer: String) -> Int? {
        lock.withLock {
            let now = monotonicNanoseconds()
            if peers.count > 4096 { peers = peers.filter { Double(now - $0.value.lastEvent) / 1e9 < Self.quietSeconds } }
            if let entry = peers[peer], Double(now - entry.lastEvent) / 1e9 < Self.quietSeconds {
                peers[peer] = (entry.lastEvent, entry.suppressed + 1)
                return nil
            }
            let count = (peers[peer]?.suppressed ?? 0) + 1
            peers[peer] = (now, 0)
            return count
        }
    }
}
