import Foundation
import IOFilterAPI
import IOFilterControl
import IOFilterHTTP
import IOFilterPosix
import Logging
import Metrics
import Prometheus

/// One operation of the API: its method and path template, what it takes and gives
/// (which the OpenAPI document is built from), and the controller call that does it.
public struct Route: Sendable {
    public let method: String
    /// Like "/disks/{name}/export".
    public let path: String
    public let operationID: String
    public let summary: String
    /// The request body's schema name, if it takes one.
    public let body: String?
    /// The success status and its body's schema ("Disk", "[Disk]").
    public let success: (status: Int, schema: String)
    /// Error statuses it may answer with (besides 400 and 500, which any may).
    public let errors: [Int]
    public let query: [(name: String, description: String, type: String)]
    /// The least role that may call it.
    public let role: Role
    let handler: @Sendable (APIRequest) throws -> any Encodable

    var segments: [Substring] { path.split(separator: "/") }
}

/// A request on its way to a handler: the path's parameters and the decoded body.
struct APIRequest {
    let http: HTTPRequest
    let parameters: [String: String]

    func parameter(_ name: String) -> String { parameters[name] ?? "" }

    func decode<T: Decodable>(_ type: T.Type) throws -> T {
        guard !http.body.isEmpty else { throw ControlError.badRequest("this request needs a JSON body (see /openapi.json)") }
        do {
            return try JSONDecoder().decode(T.self, from: Data(http.body))
        } catch DecodingError.dataCorrupted(let context) where context.codingPath.isEmpty {
            throw ControlError.badRequest("the body is not JSON: \(context.underlyingError.map { "\($0)" } ?? context.debugDescription)")
        } catch let error as DecodingError {
            throw ControlError.badRequest("the JSON body does not match \(T.self): \(Self.describe(error))")
        } catch {
            throw ControlError.badRequest("the body is not JSON: \(error)")
        }
    }

    static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let text = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return text.isEmpty ? "the body" : String(text.drop { $0 == "." })
        }
        switch error {
        case .keyNotFound(let key, let context): return "\(path(context).isEmpty ? "" : path(context) + ": ")missing field '\(key.stringValue)'"
        case .typeMismatch(let type, let context): return "\(path(context)): expected \(type)"
        case .valueNotFound(let type, let context): return "\(path(context)): expected \(type), got null"
        case .dataCorrupted(let context): return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}

/// The console's live update, as one server-sent event, built at most once a second
/// whatever the number of streams: concurrent streams wait for the one being built.
/// Every role may read all of it, so every stream gets the same bytes.
final class LiveFeed: @unchecked Sendable {
    // @unchecked: `event` and `builtAt` are guarded by `lock`.
    private let lock = ConditionLock()
    private var event: [UInt8] = []
    private var builtAt: UInt64 = 0
    static let maximumAge: UInt64 = 900_000_000

    func current(_ host: HostController) -> [UInt8] {
        lock.withLock { build(host) }
    }

    /// Call under `lock`.
    private func build(_ host: HostController) -> [UInt8] {
        let now = monotonicNanoseconds()
        if !event.isEmpty && now - builtAt < Self.maximumAge { return event }
        let vms = ((try? host.listVMs()) ?? []).map { vm in vm.state == .running ? ((try? host.showVM(vm.name, maxAge: 1)) ?? vm) : vm }
        let snapshot = LiveSnapshot(time: Date().timeIntervalSince1970, vms: vms, disks: (try? host.listDisks()) ?? [],
                                    events: (try? host.events(limit: 50)) ?? [])
        let encoder = JSONEncoder()
        encoder.outputFormatting = APIRouter.jsonFormatting
        guard let data = try? encoder.encode(snapshot) else { return event }
        event = Array("data: ".utf8) + Array(data) + Array("\n\n".utf8)
        builtAt = now
        return event
    }
}

/// Maps HTTP requests to controller calls and their results (or errors) to JSON.
public struct APIRouter: Sendable {
    public let routes: [Route]
    let openAPI: [UInt8]
    let host: HostController
    let logger: Logger
    /// Where the daemon's own metrics go (swift-metrics is bootstrapped onto it).
    let registry: PrometheusCollectorRegistry
    /// The live streams' shared update.
    let liveFeed = LiveFeed()

    public init(controller: HostController, apiSocket: String, registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(),
                logger: Logger) {
        routes = Self.routes(controller, apiSocket: apiSocket)
        openAPI = OpenAPIDocument.json(routes: routes)
        host = controller
        self.registry = registry
        self.logger = logger
    }

    public func handle(_ request: HTTPRequest) -> HTTPResponse {
        if request.path == "/openapi.json" {
            guard request.method == "GET" else { return Self.onlyGET(request.path) }
            return HTTPResponse(status: 200, headers: [("Content-Type", "application/json")], body: openAPI)
        }
        // The console's page and scripts hold no data: anyone may load them, and they
        // ask for a token before they ask the API anything.
        if let asset = ConsoleAssets.asset(request.path) {
            guard request.method == "GET" else { return Self.onlyGET(request.path) }
            return HTTPResponse(status: 200, headers: [("Content-Type", asset.contentType), ("Cache-Control", "no-cache")] + ConsoleAssets.securityHeaders,
                                body: asset.body)
        }
        // Who is calling comes first: a caller the host does not know learns nothing,
        // not even which routes exist.
        let caller: Caller
        do {
            caller = try host.authenticate(request)
        } catch {
            logger.warning("refused \(request.method) \(request.path) from \(request.peer.map { "\($0)" } ?? "?"): \(error.message)")
            var response = Self.error(error)
            if error.status == 401 { response.headers.append(("WWW-Authenticate", "Bearer realm=\"iofilterd\"")) }
            return response
        }
        if request.path == "/live" {
            guard request.method == "GET" else { return Self.onlyGET(request.path) }
            return liveUpdates(for: caller)
        }
        if request.path == "/metrics" {
            guard request.method == "GET" else { return Self.onlyGET(request.path) }
            return HTTPResponse(status: 200, headers: [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                                body: Array(host.prometheusMetrics(registry: registry).utf8))
        }
        let segments = request.path.split(separator: "/", omittingEmptySubsequences: false).dropFirst()
        // The most specific template names the resource ("/disks/import" over
        // "/disks/{name}"); its routes are the methods allowed on the path.
        let matches = routes.compactMap { route in Self.match(route.segments, segments).map { (route, $0.0, $0.1) } }
        let specific = matches.map(\.2).max()
        let candidates = matches.filter { $0.2 == specific }
        let allowed = candidates.map(\.0.method)
        let best = candidates.first { $0.0.method == request.method }
        guard let (route, parameters, _) = best else {
            if allowed.isEmpty {
                return Self.error(ControlError(status: 404, code: "no-route", message: "no API route \(request.path); see /openapi.json"))
            }
            var response = Self.error(ControlError(
                status: 405, code: "method-not-allowed", message: "\(request.method) is not allowed on \(request.path); allowed: \(allowed.joined(separator: ", "))"))
            response.headers.append(("Allow", allowed.joined(separator: ", ")))
            return response
        }
        guard caller.role >= route.role else {
            host.record("access-denied", route.operationID, "\(request.method) \(request.path) needs the \(route.role.rawValue) role",
                              actor: caller.name)
            return Self.error(.forbidden(
                "\(caller.name) has the \(caller.role.rawValue) role; \(request.method) \(request.path) needs \(route.role.rawValue) "
                    + "(roles: read-only < operator < admin)"))
        }
        let call = APICall(caller: caller)
        let started = monotonicNanoseconds()
        return APICall.$current.withValue(call) {
            let response = respond(route, parameters, request)
            Counter(label: "iofilterd_api_requests_total", dimensions: [("operation", route.operationID), ("status", String(response.status))])
                .increment()
            Metrics.Timer(label: "iofilterd_api_request_duration_seconds", dimensions: [("operation", route.operationID)])
                .recordNanoseconds(Int64(monotonicNanoseconds() - started))
            // A change made through the API is an event naming its caller, even where the
            // change itself records none.
            if route.method != "GET", (200..<300).contains(response.status), !call.recordedEvent {
                host.event("api-call", route.operationID, "\(request.method) \(request.path)")
            }
            return response
        }
    }

    /// Server-sent events for the console: every second, each VM with its live figures
    /// and health, every disk, and the newest events, until the client goes away, its
    /// token is revoked or expires, or the host stops (each of which ends it at once).
    /// Every stream sends the same update, built once a second for all of them
    /// (`LiveFeed`): fifty consoles cost the host one update and the workers one sample.
    func liveUpdates(for caller: Caller) -> HTTPResponse {
        let streams = host.liveStreams
        guard let id = streams.begin(tokenID: caller.tokenID) else {
            return Self.error(ControlError(status: 503, code: "stopping", message: "the host is stopping"))
        }
        var response = HTTPResponse(status: 200, headers: [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
                                    body: Array("retry: 2000\n\n".utf8))
        let host = self.host
        let logger = self.logger
        let feed = liveFeed
        response.stream = { send in
            defer { streams.finish(id) }
            repeat {
                if let token = caller.tokenID, !host.tokenIsValid(token) { break }
                guard !streams.isEnded(id), send(feed.current(host)) else { break }
            } while streams.wait(id, seconds: 1)
            logger.info("live updates for \(caller) ended")
        }
        logger.info("live updates for \(caller)")
        return response
    }

    private func respond(_ route: Route, _ parameters: [String: String], _ request: HTTPRequest) -> HTTPResponse {
        do {
            if let body = route.body { try Self.refuseUnknownFields(request.body, schema: body) }
            let value = try route.handler(APIRequest(http: request, parameters: parameters))
            return Self.json(status: route.success.status, value)
        } catch let error as ControlError {
            if error.status >= 500 { logger.error("\(route.method) \(request.path): \(error)") }
            return Self.error(error)
        } catch {
            logger.error("\(route.method) \(request.path): \(error)")
            return Self.error(.internalError("\(error)"))
        }
    }

    static func refuseUnknownFields(_ body: [UInt8], schema: String) throws(ControlError) {
        guard !body.isEmpty, let value = try? JSONSerialization.jsonObject(with: Data(body)) else { return }
        let unexpected = OpenAPIDocument.Schema.ref(schema).unexpectedKeys(in: value)
        if !unexpected.isEmpty {
            throw .badRequest("unknown field(s) \(unexpected.joined(separator: ", ")) in the \(schema) body (see /openapi.json)")
        }
    }

    /// The path parameters, and how many literal segments matched (literals win).
    static func match(_ template: [Substring], _ path: ArraySlice<Substring>) -> ([String: String], Int)? {
        guard template.count == path.count else { return nil }
        var parameters: [String: String] = [:]
        var literals = 0
        for (expected, actual) in zip(template, path) {
            if expected.hasPrefix("{") {
                guard !actual.isEmpty else { return nil }
                parameters[String(expected.dropFirst().dropLast())] = String(actual)
            } else if expected == actual {
                literals += 1
            } else {
                return nil
            }
        }
        return (parameters, literals)
    }

    /// 405 for a path that is not a route and answers GET alone.
    static func onlyGET(_ path: String) -> HTTPResponse {
        var response = error(ControlError(status: 405, code: "method-not-allowed", message: "only GET is allowed on \(path)"))
        response.headers.append(("Allow", "GET"))
        return response
    }

    /// How every JSON answer is written: keys sorted, slashes plain.
    static let jsonFormatting: JSONEncoder.OutputFormatting = [.sortedKeys, .withoutEscapingSlashes]

    static func json(status: Int, _ value: any Encodable) -> HTTPResponse {
        if let encoded = value as? EncodedJSON {
            return HTTPResponse(status: status, headers: [("Content-Type", "application/json")], body: encoded.bytes)
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = jsonFormatting
        guard let data = try? encoder.encode(value) else { return error(.internalError("cannot encode the response")) }
        return HTTPResponse(status: status, headers: [("Content-Type", "application/json")], body: Array(data))
    }

    static func error(_ error: ControlError) -> HTTPResponse {
        json(status: error.status, error.body)
    }
}

extension APIRouter {
    static func routes(_ host: HostController, apiSocket: String) -> [Route] {
        let vmList = VMListEncoding()
        // Reading is for every role, changing the host for admins; `role: .operator`
        // marks what operators do daily.
        func route(_ method: String, _ path: String, _ id: String, _ summary: String, body: String? = nil,
                   _ success: (Int, String), errors: [Int] = [], query: [(String, String, String)] = [], role: Role? = nil,
                   _ handler: @escaping @Sendable (APIRequest) throws -> any Encodable) -> Route {
            Route(method: method, path: path, operationID: id, summary: summary, body: body, success: success, errors: errors,
                  query: query.map { (name: $0.0, description: $0.1, type: $0.2) }, role: role ?? (method == "GET" ? .readOnly : .admin),
                  handler: handler)
        }
        return [
            route("GET", "/session", "getSession", "Who the caller is, and the role it has.", (200, "Session")) { _ in
                guard let caller = APICall.current?.caller else { throw ControlError.internalError("no caller for this request") }
                return Session(name: caller.name, role: caller.role)
            },
            route("GET", "/host", "getHost", "The host runtime: version, state directory, running VMs.", (200, "HostInfo")) { _ in
                host.hostInfo(apiSocket: apiSocket)
            },
            route("GET", "/events", "listEvents", "Recent events, oldest first.", (200, "[Event]"),
                  query: [("limit", "How many of the newest events (1-1000, default 100).", "integer"),
                          ("severity", "Only events of this severity and above (info, warning, error, critical).", "string")]) { request in
                guard let limit = Int(request.http.query["limit"] ?? "100") else { throw ControlError.badRequest("limit must be an integer") }
                var severity: Severity?
                if let text = request.http.query["severity"] {
                    guard let level = Severity(rawValue: text) else {
                        throw ControlError.badRequest("severity must be one of \(Severity.allCases.map(\.rawValue).joined(separator: ", "))")
                    }
                    severity = level
                }
                return try host.events(limit: limit, severity: severity)
            },
            route("GET", "/health", "getHealth",
                  "Every VM's health, its disks' and their filters' (with replication lag against its RPO), sampled for this call.",
                  (200, "HostHealth")) { _ in try host.health() },

            route("GET", "/alerts", "listAlerts", "Alert subscriptions: where events of a severity and above are sent.",
                  (200, "[AlertSubscription]")) { _ in try host.listAlerts() },
            route("POST", "/alerts", "addAlert",
                  "Send events of a severity (default warning) and above to a webhook (an HTTP POST of the event) or a command (the event on its stdin).",
                  body: "AlertCreateRequest", (201, "AlertSubscription"), errors: [409]) { request in
                try host.addAlert(request.decode(AlertSubscription.self))
            },
            route("DELETE", "/alerts/{name}", "removeAlert", "Stop sending alerts to a subscription.", (200, "AlertSubscription"),
                  errors: [404]) { request in try host.removeAlert(request.parameter("name")) },
            route("POST", "/alerts/{name}/test", "testAlert", "Send a test event to a subscription now and say whether it arrived.",
                  (200, "AlertTestResult"), errors: [404]) { request in try host.testAlert(request.parameter("name")) },
            route("GET", "/capabilities", "getCapabilities", "The capability catalogue: what policies may ask of the installed plug-ins.",
                  (200, "Capabilities")) { _ in try host.capabilities() },

            route("GET", "/plugins", "listPlugins", "Installed plug-ins, every version.", (200, "[Plugin]")) { _ in try host.listPlugins() },
            route("POST", "/plugins", "installPlugin", "Validate a plug-in in a sandbox and install a copy of it.",
                  body: "PluginInstallRequest", (201, "Plugin"), errors: [404, 409, 422]) { request in
                let install = try request.decode(PluginInstallRequest.self)
                return try host.installPlugin(path: install.path, daemonListen: install.daemonListen)
            },
            route("PUT", "/plugins/{name}/daemon-listen", "setDaemonListen",
                  "Where the plug-in's partner daemon accepts peers on other hosts (no address: nowhere); restarts the daemon.",
                  body: "DaemonListenRequest", (200, "Plugin"), errors: [400, 403, 404, 409]) { request in
                let listen = try request.decode(DaemonListenRequest.self)
                return try host.setDaemonListen(request.parameter("name"), address: listen.address, tlsPSK: listen.tlsPsk)
            },
            route("GET", "/plugins/{name}", "showPlugin", "Every installed version of one plug-in, newest first.", (200, "[Plugin]"),
                  errors: [404]) { request in try host.showPlugin(request.parameter("name")) },
            route("DELETE", "/plugins/{name}", "removePlugin", "Remove a plug-in (one version, or all) that nothing uses.",
                  (200, "[Plugin]"), errors: [404, 409], query: [("version", "Only this version.", "string")]) { request in
                try host.removePlugin(request.parameter("name"), version: request.http.query["version"])
            },
            route("POST", "/plugins/{name}/call", "callPlugin", "Call a management operation, in a VM's worker or a fresh one.",
                  body: "PluginCallRequest", (200, "ManagementResult"), errors: [404, 409, 422, 502], role: .operator) { request in
                try host.callPlugin(request.parameter("name"), request.decode(PluginCallRequest.self))
            },

            route("GET", "/trust", "listTrust", "The signing keys this host trusts, and the level each may sign at.", (200, "[TrustedKey]")) { _ in
                try host.listTrust()
            },
            route("POST", "/trust", "addTrust", "Enrol a signing key (or change its level).", body: "TrustAddRequest", (201, "TrustedKey")) { request in
                try host.addTrust(request.decode(TrustAddRequest.self))
            },
            route("DELETE", "/trust/{keyId}", "removeTrust", "Stop trusting a key; plug-ins it signed stay installed.", (200, "TrustedKey"),
                  errors: [404]) { request in try host.removeTrust(request.parameter("keyId")) },

            route("GET", "/tokens", "listTokens", "API tokens (their secrets are never shown again).", (200, "[Token]"), role: .admin) { _ in
                try host.listTokens()
            },
            route("POST", "/tokens", "createToken", "Create a bearer token for the API over TCP; the answer holds its secret, once.",
                  body: "TokenCreateRequest", (201, "Token"), errors: [409]) { request in
                try host.createToken(request.decode(TokenCreateRequest.self))
            },
            route("DELETE", "/tokens/{id}", "revokeToken", "Revoke a token (by id or name).", (200, "Token"), errors: [404]) { request in
                try host.revokeToken(request.parameter("id"))
            },

            route("GET", "/policies", "listPolicies", "Every policy.", (200, "[Policy]")) { _ in try host.listPolicies() },
            route("POST", "/policies", "createPolicy", "Create a policy; it is validated first.", body: "Policy", (201, "Policy"),
                  errors: [409, 422]) { request in try host.createPolicy(request.decode(Policy.self)) },
            route("POST", "/policies/validate", "validatePolicyDraft", "Validate a policy without saving it.", body: "Policy",
                  (200, "PolicyValidation")) { request in try host.validatePolicy(request.decode(Policy.self)) },
            route("GET", "/policies/{name}", "showPolicy", "One policy.", (200, "Policy"), errors: [404]) { request in
                try host.showPolicy(request.parameter("name"))
            },
            route("DELETE", "/policies/{name}", "deletePolicy", "Delete a policy no disk uses.", (200, "Policy"), errors: [404, 409]) { request in
                try host.deletePolicy(request.parameter("name"))
            },
            route("POST", "/policies/{name}/validate", "validatePolicy", "Validate a stored policy against the plug-ins installed now.",
                  (200, "PolicyValidation"), errors: [404]) { request in
                try host.validatePolicy(host.showPolicy(request.parameter("name")))
            },

            route("GET", "/disks", "listDisks", "Every disk, with its compliance.", (200, "[Disk]")) { _ in try host.listDisks() },
            route("POST", "/disks", "createDisk", "Create an empty (sparse) raw disk, optionally with a policy.", body: "DiskCreateRequest",
                  (201, "Disk"), errors: [404, 409, 422, 502]) { request in try host.createDisk(request.decode(DiskCreateRequest.self)) },
            route("POST", "/disks/import", "importDisk", "Copy a raw image in as a new disk, optionally with a policy.",
                  body: "DiskImportRequest", (201, "Disk"), errors: [404, 409, 422, 502]) { request in
                try host.importDisk(request.decode(DiskImportRequest.self))
            },
            route("GET", "/disks/{name}", "showDisk", "One disk.", (200, "Disk"), errors: [404]) { request in
                try host.showDisk(request.parameter("name"))
            },
            route("DELETE", "/disks/{name}", "deleteDisk", "Delete a disk no VM owns and nothing serves.", (200, "Disk"),
                  errors: [404, 409]) { request in try host.deleteDisk(request.parameter("name")) },
            route("POST", "/disks/{name}/promote", "promoteDisk",
                  "Make a replica an ordinary, writable disk of this host (failover); its replication stream is refused from then on.",
                  (200, "Disk"), errors: [404, 409]) { request in try host.promoteDisk(request.parameter("name")) },
            route("POST", "/disks/{name}/grow", "growDisk", "Grow an idle disk.", body: "DiskGrowRequest", (200, "Disk"),
                  errors: [404, 409, 422, 502]) { request in try host.growDisk(request.parameter("name"), request.decode(DiskGrowRequest.self)) },
            route("POST", "/disks/{name}/snapshot", "snapshotDisk",
                  "A read-only, point-in-time snapshot of the disk as its consumer sees it now (copy-before-write while its VM runs; the copy completes in the background unless wait is set).",
                  body: "DiskDeriveRequest", (201, "Disk"), errors: [400, 404, 409, 502], role: .operator) { request in
                try host.snapshotDisk(request.parameter("name"), request.decode(DiskDeriveRequest.self))
            },
            route("GET", "/disks/{name}/checkpoints", "listCheckpoints",
                  "The disk's checkpoints (changed-block tracking), oldest first, with how much changed since each.",
                  (200, "[Checkpoint]"), errors: [404]) { request in try host.listCheckpoints(request.parameter("name")) },
            route("POST", "/disks/{name}/checkpoints", "createCheckpoint",
                  "Start tracking the disk's changes from now on; clients read them as qemu:dirty-bitmap:NAME.",
                  body: "CheckpointCreateRequest", (201, "Checkpoint"), errors: [400, 404, 409, 502], role: .operator) { request in
                try host.createCheckpoint(request.parameter("name"), request.decode(CheckpointCreateRequest.self))
            },
            route("DELETE", "/disks/{name}/checkpoints/{checkpoint}", "deleteCheckpoint", "Stop tracking since this checkpoint.",
                  (200, "Checkpoint"), errors: [404, 409, 502], role: .operator) { request in
                try host.deleteCheckpoint(request.parameter("name"), request.parameter("checkpoint"))
            },
            route("POST", "/disks/{name}/nbd", "exportNBD",
                  "Where the disk (a snapshot, even while it is copied) can be read over NBD now; starts a read-only offline session if nothing serves it.",
                  (200, "NBDExport"), errors: [404, 409, 502], role: .operator) { request in try host.nbdExport(request.parameter("name")) },
            route("POST", "/disks/{name}/revert", "revertDisk",
                  "Replace a stopped disk's contents with one of its snapshots', through its chain (its filters hear first and may veto).",
                  body: "DiskRevertRequest", (200, "TransferReport"), errors: [404, 409, 502], role: .operator) { request in
                try host.revertDisk(request.parameter("name"), request.decode(DiskRevertRequest.self))
            },
            route("POST", "/disks/{name}/clone", "cloneDisk", "A new, independent disk with this disk's contents.",
                  body: "DiskDeriveRequest", (201, "Disk"), errors: [404, 409, 422, 502]) { request in
                try host.cloneDisk(request.parameter("name"), request.decode(DiskDeriveRequest.self))
            },
            route("PUT", "/disks/{name}/policy", "assignPolicy", "Assign a policy (or none): filters are attached or detached now (a running VM's worker is replaced under its clients).",
                  body: "DiskPolicyRequest", (200, "Disk"), errors: [404, 409, 422, 502]) { request in
                try host.assignPolicy(request.parameter("name"), request.decode(DiskPolicyRequest.self))
            },
            route("GET", "/disks/{name}/compliance", "diskCompliance", "Does the disk's chain match its policy?", (200, "Compliance"),
                  errors: [404]) { request in try host.diskCompliance(request.parameter("name")) },
            route("POST", "/disks/{name}/export", "exportDisk", "Write the disk, through its filters, to a new raw file.",
                  body: "DiskExportRequest", (200, "TransferReport"), errors: [404, 409, 502], role: .operator) { request in
                try host.exportDisk(request.parameter("name"), request.decode(DiskExportRequest.self))
            },
            route("POST", "/disks/{name}/copy", "copyDisk", "Copy the disk onto another, through both chains.", body: "DiskCopyRequest",
                  (200, "TransferReport"), errors: [404, 409, 502]) { request in
                try host.copyDisk(request.parameter("name"), request.decode(DiskCopyRequest.self))
            },
            route("POST", "/disks/{name}/offline", "serveOffline", "Serve a disk no VM runs, through its chain, over NBD.",
                  body: "OfflineServeRequest", (201, "OfflineSession"), errors: [404, 409, 502]) { request in
                try host.serveOffline(request.parameter("name"), request.decode(OfflineServeRequest.self))
            },
            route("DELETE", "/disks/{name}/offline", "stopOffline", "Stop serving a disk offline.", (200, "OfflineSession"),
                  errors: [404]) { request in try host.stopOffline(request.parameter("name")) },

            route("GET", "/vms", "listVMs", "Every VM.", (200, "[VM]")) { _ in try vmList.encode(host.listVMs()) },
            route("POST", "/vms", "createVM", "Create a VM: a named set of disks one worker serves.", body: "VMCreateRequest",
                  (201, "VM"), errors: [404, 409]) { request in try host.createVM(request.decode(VMCreateRequest.self)) },
            route("GET", "/vms/{name}", "showVM", "One VM, with its worker and each filter's statistics.", (200, "VM"),
                  errors: [404]) { request in try host.showVM(request.parameter("name")) },
            route("GET", "/vms/{name}/history", "vmHistory",
                  "The VM's figures over time, one point per sampling interval (an hour is kept): per disk IOPS and throughput split read/write, latency p50/p99, and each filter's own figures.",
                  (200, "VMHistory"), errors: [404], query: [("seconds", "How far back (default 3600).", "number")]) { request in
                guard let seconds = Double(request.http.query["seconds"] ?? "3600"), seconds.isFinite else {
                    throw ControlError.badRequest("seconds must be a number")
                }
                return try host.vmHistory(request.parameter("name"), seconds: seconds)
            },
            route("DELETE", "/vms/{name}", "deleteVM", "Delete a stopped VM; its disks are kept.", (200, "VM"), errors: [404, 409]) { request in
                try host.deleteVM(request.parameter("name"))
            },
            route("POST", "/vms/{name}/start", "startVM", "Start the VM's worker; prints its NBD URIs.", (200, "VM"),
                  errors: [404, 409, 422, 502], role: .operator) { request in try host.startVM(request.parameter("name")) },
            route("POST", "/vms/{name}/stop", "stopVM", "Stop the VM's worker; filters flush and close.", (200, "VM"),
                  errors: [404, 409], role: .operator) { request in try host.stopVM(request.parameter("name")) },
            route("POST", "/vms/{name}/upgrade-filters", "upgradeFilters",
                  "Give a running VM's disks the chains their policies name now (newer plug-ins, other filters or parameters) without a restart: a new worker takes its clients over.",
                  (200, "LiveUpgradeReport"), errors: [404, 409, 502], role: .operator) { request in try host.upgradeFilters(request.parameter("name")) },
        ]
    }
}
