import Foundation
import IOFilterAPI
import IOFilterControl
import IOFilterModel

/// The OpenAPI 3.0 document iofilterd serves at /openapi.json: the paths come from the
/// route table the router dispatches with, the schemas are written out here and must
/// describe what the API types encode (the API tests hold them to it).
enum OpenAPIDocument {
    indirect enum Schema: Sendable {
        case string, integer, number, boolean
        /// A string matching a regular expression.
        case pattern(String)
        case enumeration([String])
        case ref(String)
        case array(Schema)
        /// An array of at least one element.
        case nonEmpty(Schema)
        case map(Schema)
        case object([String: Schema], required: [String])

        var json: [String: Any] {
            switch self {
            case .string: ["type": "string"]
            case .pattern(let expression): ["type": "string", "pattern": expression]
            case .integer: ["type": "integer"]
            case .number: ["type": "number"]
            case .boolean: ["type": "boolean"]
            case .enumeration(let values): ["type": "string", "enum": values]
            case .ref(let name): ["$ref": "#/components/schemas/\(name)"]
            case .array(let element): ["type": "array", "items": element.json]
            case .nonEmpty(let element): ["type": "array", "items": element.json, "minItems": 1]
            case .map(let value): ["type": "object", "additionalProperties": value.json]
            case .object(let properties, let required):
                ["type": "object", "properties": properties.mapValues(\.json), "required": required, "additionalProperties": false]
            }
        }

        /// Keys no schema declares, anywhere in `value` ("filters[0].colour"); the API
        /// refuses them rather than silently ignoring a misspelt field.
        func unexpectedKeys(in value: Any, at path: String = "") -> [String] {
            switch self {
            case .ref(let name): return OpenAPIDocument.schemas[name]?.unexpectedKeys(in: value, at: path) ?? []
            case .array(let element), .nonEmpty(let element):
                guard let items = value as? [Any] else { return [] }
                return items.enumerated().flatMap { element.unexpectedKeys(in: $0.element, at: "\(path)[\($0.offset)]") }
            case .map(let element):
                guard let object = value as? [String: Any] else { return [] }
                return object.flatMap { element.unexpectedKeys(in: $0.value, at: path.isEmpty ? $0.key : "\(path).\($0.key)") }
            case .object(let properties, _):
                guard let object = value as? [String: Any] else { return [] }
                return object.keys.sorted().flatMap { key -> [String] in
                    let at = path.isEmpty ? key : "\(path).\(key)"
                    guard let schema = properties[key] else { return [at] }
                    return schema.unexpectedKeys(in: object[key]!, at: at)
                }
            default: return []
            }
        }

        /// "Disk" or "[Disk]".
        static func named(_ text: String) -> Schema {
            text.hasPrefix("[") ? .array(.ref(String(text.dropFirst().dropLast()))) : .ref(text)
        }
    }

    static let category = Schema.enumeration(["inspection", "replication", "encryption", "cache", "qos"])
    /// Names of policies, disks and VMs (see `Names`).
    static let name = Schema.pattern(Names.pattern)
    /// Bytes, or a number with a K, M, G or T suffix (powers of 1024), that fits 63 bits.
    static let size = Schema.pattern("^([1-9][0-9]{0,17}|[1-9][0-9]{0,14}K|[1-9][0-9]{0,11}M|[1-9][0-9]{0,8}G|[1-9][0-9]{0,5}T)$")
    static let absolutePath = Schema.pattern("^/")
    /// "HOST:PORT" ("[::1]:PORT" for IPv6).
    static let hostPort = Schema.pattern("^.+:[0-9]{1,5}$")
    static let role = Schema.enumeration(Role.allCases.map(\.rawValue))
    static let acceptanceLevel = Schema.enumeration(AcceptanceLevel.allCases.map(\.rawValue))
    static let severity = Schema.enumeration(Severity.allCases.map(\.rawValue))
    static let health = Schema.enumeration(HealthStatus.allCases.map(\.rawValue))

    static let schemas: [String: Schema] = [
        "Error": .object(["error": .string, "message": .string], required: ["error", "message"]),
        "Session": .object(["name": .string, "role": role], required: ["name", "role"]),
        "HostInfo": .object([
            "version": .string, "stateDirectory": .string, "apiSocket": .string, "pid": .integer, "runningVMs": .array(.string),
            "acceptanceLevel": acceptanceLevel,
        ], required: ["version", "stateDirectory", "apiSocket", "pid", "runningVMs", "acceptanceLevel"]),
        "Event": .object(["id": .integer, "time": .string, "kind": .string, "subject": .string, "message": .string, "actor": .string,
                          "severity": severity],
                         required: ["id", "time", "kind", "subject", "message", "severity"]),
        "HealthReport": .object(["status": health, "reason": .string], required: ["status", "reason"]),
        "FilterHealth": .object([
            "plugin": .string, "version": .string, "category": category, "health": .ref("HealthReport"), "lagSeconds": .number, "rpoSeconds": .number,
        ], required: ["plugin", "version", "category", "health"]),
        "DiskHealth": .object(["disk": .string, "health": .ref("HealthReport"), "filters": .array(.ref("FilterHealth"))],
                              required: ["disk", "health", "filters"]),
        "VMHealth": .object([
            "name": .string, "state": .enumeration(["running", "stopped"]), "health": .ref("HealthReport"), "restarts": .integer,
            "sampledAt": .number, "disks": .array(.ref("DiskHealth")),
        ], required: ["name", "state", "restarts", "disks"]),
        "HostHealth": .object(["status": health, "vms": .array(.ref("VMHealth"))], required: ["status", "vms"]),
        "DiskRates": .object([
            "disk": .string, "readIOPS": .number, "writeIOPS": .number, "otherIOPS": .number, "readBytesPerSecond": .number,
            "writeBytesPerSecond": .number, "errorsPerSecond": .number, "latencyP50Milliseconds": .number, "latencyP99Milliseconds": .number,
        ], required: ["disk", "readIOPS", "writeIOPS", "otherIOPS", "readBytesPerSecond", "writeBytesPerSecond", "errorsPerSecond"]),
        "FilterSample": .object(["disk": .string, "plugin": .string, "health": health, "stats": .map(.number)],
                                required: ["disk", "plugin", "health", "stats"]),
        "HistoryPoint": .object(["time": .number, "seconds": .number, "health": health, "disks": .array(.ref("DiskRates")),
                                 "filters": .array(.ref("FilterSample"))],
                                required: ["time", "seconds", "disks", "filters"]),
        "VMHistory": .object(["vm": .string, "intervalSeconds": .number, "points": .array(.ref("HistoryPoint"))],
                             required: ["vm", "intervalSeconds", "points"]),
        "AlertSubscription": .object([
            "name": .string, "webhook": .string, "command": .string, "minimumSeverity": severity, "createdAt": .string,
            "lastDeliveryAt": .string, "lastError": .string,
        ], required: ["name", "minimumSeverity"]),
        "AlertCreateRequest": .object(["name": name, "webhook": .pattern("^http://"), "command": .string, "minimumSeverity": severity],
                                      required: ["name"]),
        "AlertTestResult": .object(["delivered": .boolean, "error": .string], required: ["delivered"]),
        "Parameter": .object([
            "name": .string, "description": .string, "kind": .enumeration(["bool", "int", "size", "string", "enum"]),
            "required": .boolean, "defaultValue": .string, "min": .integer, "max": .integer, "enumValues": .array(.string),
            "isPath": .boolean,
        ], required: ["name", "description", "kind", "required", "isPath"]),
        "Operation": .object(["name": .string, "signature": .string], required: ["name", "signature"]),
        "Plugin": .object([
            "name": .string, "version": .string, "vendor": .string, "category": category, "description": .string,
            "threadModel": .enumeration(["serialize-all", "serialize-per-disk", "parallel"]),
            "parameters": .array(.ref("Parameter")), "operations": .array(.ref("Operation")), "path": .string,
            "installedAt": .string, "attachedTo": .array(.string), "acceptanceLevel": acceptanceLevel, "signers": .array(.ref("PluginSigner")),
            "daemon": .ref("DaemonStatus"), "daemonListens": .boolean,
        ], required: ["name", "version", "vendor", "category", "description", "threadModel", "parameters", "operations", "path",
                      "installedAt", "attachedTo", "acceptanceLevel", "signers"]),
        "PluginSigner": .object(["keyId": .string, "comment": .string, "claimed": acceptanceLevel, "effective": acceptanceLevel],
                                required: ["keyId", "comment", "claimed", "effective"]),
        "TrustedKey": .object([
            "keyId": .string, "publicKey": .string, "comment": .string, "level": acceptanceLevel, "addedAt": .string, "signed": .array(.string),
        ], required: ["keyId", "publicKey", "comment", "level", "addedAt", "signed"]),
        "Token": .object([
            "id": .string, "name": .string, "role": role, "createdAt": .string, "lastUsedAt": .string, "token": .string, "expiresAt": .string,
        ], required: ["id", "name", "role", "createdAt"]),
        "TokenCreateRequest": .object(["name": name, "role": role, "expiresInSeconds": .integer], required: ["name", "role"]),
        "TrustAddRequest": .object(["publicKey": .pattern("^iofilter-ed25519 "), "level": acceptanceLevel], required: ["publicKey", "level"]),
        "PluginInstallRequest": .object(["path": absolutePath, "daemonListen": hostPort], required: ["path"]),
        "DaemonStatus": .object([
            "state": .enumeration(["starting", "running", "restarting", "stopped"]), "pid": .integer, "restarts": .integer,
            "lastError": .string, "listen": .string,
        ], required: ["state", "restarts"]),
        "DaemonListenRequest": .object(["address": hostPort, "tlsPsk": absolutePath], required: []),
        "PluginCallRequest": .object(["operation": .pattern("^[a-z][a-z0-9_-]*$"), "arguments": .array(.string), "vm": name, "version": .string],
                                     required: ["operation", "arguments"]),
        "ManagementResult": .object(["type": .string, "value": .string], required: ["type", "value"]),
        "Capability": .object([
            "plugin": .string, "versions": .array(.string), "vendor": .string, "category": category, "description": .string,
            "parameters": .array(.ref("Parameter")),
        ], required: ["plugin", "versions", "vendor", "category", "description", "parameters"]),
        "Capabilities": .object(["categories": .array(category), "plugins": .array(.ref("Capability"))], required: ["categories", "plugins"]),
        "PolicyRule": .object(["plugin": .pattern("^[a-z0-9-]+(\\.[a-z0-9-]+)+$"), "version": .pattern("^[0-9]+\\.[0-9]+\\.[0-9]+"), "parameters": .map(.string)], required: ["plugin", "parameters"]),
        "Policy": .object(["name": name, "description": .string, "filters": .nonEmpty(.ref("PolicyRule")), "createdAt": .string],
                          required: ["name", "description", "filters"]),
        "ChainEntry": .object(["plugin": .string, "version": .string, "category": category, "parameters": .map(.string)],
                              required: ["plugin", "version", "category", "parameters"]),
        "PolicyValidation": .object(["valid": .boolean, "chain": .array(.ref("ChainEntry")), "errors": .array(.string)],
                                    required: ["valid", "chain", "errors"]),
        "Compliance": .object(["status": .enumeration(["compliant", "non-compliant", "pending", "none"]), "reason": .string,
                               "health": .ref("HealthReport")],
                              required: ["status"]),
        "Disk": .object([
            "name": .string, "path": .string, "sizeBytes": .integer, "format": .enumeration(["raw"]), "readOnly": .boolean,
            "policy": .string, "vm": .string, "uri": .string, "attached": .array(.ref("ChainEntry")), "compliance": .ref("Compliance"),
            "snapshotOf": .string, "activity": .string, "createdAt": .string, "replicaOf": .string, "health": .ref("HealthReport"),
            "copy": .ref("SnapshotProgress"), "checkpoints": .array(.string),
        ], required: ["name", "path", "sizeBytes", "format", "readOnly", "attached", "compliance", "createdAt"]),
        "SnapshotProgress": .object([
            "name": .string, "state": .enumeration(["copying", "complete", "failed"]), "totalBytes": .integer,
            "preservedBytes": .integer, "writtenBytes": .integer, "seconds": .number, "error": .string,
        ], required: ["name", "state", "totalBytes", "preservedBytes", "writtenBytes", "seconds"]),
        "Checkpoint": .object([
            "name": .string, "disk": .string, "granularity": .integer, "createdAt": .string, "changedBytes": .integer,
            "consistent": .boolean, "inconsistency": .string, "frozen": .boolean, "metaContext": .string,
        ], required: ["name", "disk", "granularity", "createdAt", "changedBytes", "consistent", "frozen", "metaContext"]),
        "CheckpointCreateRequest": .object(["name": name, "granularity": size], required: ["name"]),
        "DiskRevertRequest": .object(["snapshot": name], required: ["snapshot"]),
        "NBDExport": .object(["disk": .string, "uri": .string, "readOnly": .boolean, "through": .string],
                             required: ["disk", "uri", "readOnly", "through"]),
        "DiskCreateRequest": .object(["name": name, "size": size, "policy": name], required: ["name", "size"]),
        "DiskImportRequest": .object(["name": name, "source": absolutePath, "policy": name], required: ["name", "source"]),
        "DiskGrowRequest": .object(["size": size], required: ["size"]),
        "DiskPolicyRequest": .object(["policy": name], required: []),
        "DiskDeriveRequest": .object(["name": name, "policy": name, "checkpoint": name, "granularity": size, "rate": size, "wait": .boolean],
                                     required: ["name"]),
        "DiskExportRequest": .object(["path": absolutePath], required: ["path"]),
        "DiskCopyRequest": .object(["target": name], required: ["target"]),
        "OfflineServeRequest": .object(["readOnly": .boolean], required: ["readOnly"]),
        "OfflineSession": .object(["disk": .string, "uri": .string, "readOnly": .boolean, "pid": .integer],
                                  required: ["disk", "uri", "readOnly"]),
        "TransferReport": .object(["bytes": .integer, "seconds": .number, "through": .string], required: ["bytes", "seconds", "through"]),
        "LiveUpgradeReport": .object(["vm": .string, "changes": .array(.string), "clients": .integer, "stallMilliseconds": .number, "pid": .integer],
                                     required: ["vm", "changes", "clients", "stallMilliseconds"]),
        "FilterStatistics": .object(["plugin": .string, "version": .string, "category": category, "stats": .map(.number),
                                     "health": .ref("HealthReport")],
                                    required: ["plugin", "version", "category", "stats"]),
        "LatencyBucket": .object(["le": .string, "count": .integer], required: ["le", "count"]),
        "OperationStatistics": .object([
            "op": .string, "requests": .integer, "bytes": .integer, "errors": .integer, "latencySeconds": .number,
            "latencyBuckets": .array(.ref("LatencyBucket")),
        ], required: ["op", "requests", "bytes", "errors", "latencySeconds", "latencyBuckets"]),
        "DiskStatistics": .object(["disk": .string, "filters": .array(.ref("FilterStatistics")), "io": .array(.ref("OperationStatistics"))],
                                  required: ["disk", "filters"]),
        "VMLimits": .object(["memoryLimit": .integer, "maxConnections": .integer, "cpuWeight": .integer], required: []),
        "TLSSettings": .object(["pskFile": absolutePath, "certificatesDirectory": absolutePath, "verifyPeer": .boolean], required: ["verifyPeer"]),
        "VMCreateRequest": .object(["name": name, "disks": .nonEmpty(name), "limits": .ref("VMLimits"), "tls": .ref("TLSSettings"),
                                    "vhostUserBlk": .boolean], required: ["name", "disks"]),
        "VM": .object([
            "name": .string, "disks": .array(.string), "state": .enumeration(["running", "stopped"]), "pid": .integer,
            "restarts": .integer, "uris": .map(.string), "filters": .array(.ref("DiskStatistics")), "startedAt": .string,
            "createdAt": .string, "limits": .ref("VMLimits"), "tls": .ref("TLSSettings"), "health": .ref("HealthReport"),
            "rates": .array(.ref("DiskRates")), "vhostUserSockets": .map(.string),
        ], required: ["name", "disks", "state", "restarts", "uris", "filters", "createdAt"]),
    ]

    static func json(routes: [Route]) -> [UInt8] {
        var paths: [String: [String: Any]] = [:]
        let errorContent: [String: Any] = ["application/json": ["schema": Schema.ref("Error").json]]
        for route in routes {
            var responses: [String: Any] = [
                String(route.success.status): [
                    "description": "Success.", "content": ["application/json": ["schema": Schema.named(route.success.schema).json]],
                ],
            ]
            for status in Set(route.errors + [400, 401, 403, 500]) {
                responses[String(status)] = ["description": errorDescription(status), "content": errorContent]
            }
            var operation: [String: Any] = [
                "operationId": route.operationID, "summary": route.summary + " Needs the \(route.role.rawValue) role.", "responses": responses,
                "x-required-role": route.role.rawValue,
            ]
            var parameters: [[String: Any]] = route.segments.filter { $0.hasPrefix("{") }.map {
                ["name": String($0.dropFirst().dropLast()), "in": "path", "required": true, "schema": ["type": "string"]]
            }
            parameters += route.query.map {
                ["name": $0.name, "in": "query", "required": false, "description": $0.description, "schema": ["type": $0.type]]
            }
            if !parameters.isEmpty { operation["parameters"] = parameters }
            if let body = route.body {
                operation["requestBody"] = ["required": true, "content": ["application/json": ["schema": Schema.ref(body).json]]]
            }
            paths[route.path, default: [:]][route.method.lowercased()] = operation
        }
        paths["/metrics"] = ["get": [
            "operationId": "getMetrics", "summary": "Prometheus metrics: every VM's I/O per disk and op, its filters' statistics, its worker; the API's own. Needs the read-only role.",
            "x-required-role": "read-only",
            "responses": [
                "200": ["description": "The Prometheus text format.", "content": ["text/plain": ["schema": ["type": "string"]]]],
                "401": ["description": errorDescription(401), "content": errorContent],
                "403": ["description": errorDescription(403), "content": errorContent],
            ],
        ]]
        paths["/openapi.json"] = ["get": [
            "operationId": "getOpenAPI", "summary": "This document.",
            "responses": ["200": ["description": "The OpenAPI document.", "content": ["application/json": ["schema": ["type": "object"]]]]],
            "security": [[String: Any]](),
        ]]
        let document: [String: Any] = [
            "openapi": "3.0.3",
            "info": [
                "title": "iofilterd", "version": "0.1.0",
                "description": "The swift-iofilter host runtime: plug-ins, policies, disks, VMs and offline access. "
                    + "Served on a unix socket, where callers are known by their uid and groups, and optionally on TCP, "
                    + "where every request carries a bearer token (TLS off loopback). Every error is a JSON Error with a clear message.",
            ],
            "paths": paths,
            // On the unix socket the kernel names the caller (SO_PEERCRED): nothing to send.
            "security": [[String: [String]](), ["bearerToken": [String]()]],
            "components": [
                "schemas": schemas.mapValues(\.json),
                "securitySchemes": [
                    "bearerToken": [
                        "type": "http", "scheme": "bearer",
                        "description": "A token from `iofilter token create`, on TCP listeners. The unix socket needs none: the kernel tells iofilterd the caller's uid and groups.",
                    ],
                ] as [String: Any],
            ],
        ]
        let data = (try? JSONSerialization.data(withJSONObject: document, options: [.sortedKeys, .withoutEscapingSlashes])) ?? Data()
        return Array(data)
    }

    static func errorDescription(_ status: Int) -> String {
        switch status {
        case 400: "The request is malformed (bad JSON, a bad name or size)."
        case 401: "No valid token (TCP listeners need `Authorization: Bearer TOKEN`)."
        case 403: "The caller's role does not allow this, or a browser's cross-site request."
        case 404: "A named plug-in, policy, disk or VM does not exist."
        case 409: "The request conflicts with the current state (in use, running, exists)."
        case 422: "The request is well-formed but invalid (a policy that does not validate, a bad plug-in, a plug-in whose signatures this host does not accept)."
        case 502: "A worker process failed to do its part."
        default: "An internal error; the state is unchanged."
        }
    }
}
