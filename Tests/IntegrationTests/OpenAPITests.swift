import Foundation
import IOFilterAPI
import IOFilterAPIRoutes
import IOFilterControl
import Logging
import Testing

/// The OpenAPI document iofilterd serves must describe the API it really serves.
@Suite("openapi", .serialized)
struct OpenAPITests {
    struct Operation: Hashable, CustomStringConvertible {
        let method: String
        let path: String
        var description: String { "\(method) \(path)" }
    }

    static func documented(_ daemon: Daemon) throws -> (operations: [Operation: [String: Any]], document: [String: Any]) {
        let response = try daemon.http("GET", "/openapi.json")
        #expect(response.status == 200)
        let document = try #require(try JSONSerialization.jsonObject(with: Data(response.body)) as? [String: Any])
        let paths = try #require(document["paths"] as? [String: [String: Any]])
        var operations: [Operation: [String: Any]] = [:]
        for (path, methods) in paths {
            for (method, operation) in methods { operations[Operation(method: method.uppercased(), path: path)] = operation as? [String: Any] }
        }
        return (operations, document)
    }

    @Test func everyServedRouteIsDocumentedAndAnswersAsDocumented() throws {
        let daemon = try Daemon()
        defer { daemon.stop() }
        let (operations, document) = try Self.documented(daemon)

        // The router's own table, built the way iofilterd builds it, against the document.
        let controller = try HostController(stateDirectory: Harness.temporaryDirectory("router").path, logger: Logger(label: "test"))
        let router = APIRouter(controller: controller, apiSocket: "/unused", logger: Logger(label: "test"))
        let served = Set(router.routes.map { Operation(method: $0.method, path: $0.path) }
            + [Operation(method: "GET", path: "/openapi.json"), Operation(method: "GET", path: "/metrics")])
        #expect(served == Set(operations.keys), "served but undocumented: \(served.subtracting(operations.keys)); documented but not served: \(Set(operations.keys).subtracting(served))")

        // Every schema a document refers to exists.
        let schemas = try #require((document["components"] as? [String: Any])?["schemas"] as? [String: Any])
        let text = String(decoding: try JSONSerialization.data(withJSONObject: document), as: UTF8.self)
        for reference in text.components(separatedBy: "#/components/schemas/").dropFirst() {
            let name = String(reference.prefix { $0 != "\"" })
            #expect(schemas[name] != nil, "no schema \(name)")
        }

        // Each documented operation, called with names that exist nowhere and an empty
        // body, answers with a status it documents, and errors in the Error shape.
        for (operation, details) in operations.sorted(by: { $0.key.description < $1.key.description }) {
            let path = operation.path.replacingOccurrences(of: "{name}", with: "nothing-here")
            let response = try daemon.http(operation.method, path, body: details["requestBody"] == nil ? nil : "{}")
            let statuses = Set((details["responses"] as? [String: Any] ?? [:]).keys)
            #expect(statuses.contains(String(response.status)), "\(operation) answered \(response.status), documents \(statuses.sorted())")
            #expect(response.header("content-type") == (operation.path == "/metrics" && response.status == 200
                ? "text/plain; version=0.0.4; charset=utf-8" : "application/json"))
            if response.status >= 400 {
                #expect((try? JSONDecoder().decode(APIErrorBody.self, from: Data(response.body))) != nil, "\(operation): not an Error body")
            }
        }
    }

    /// schemathesis (from PyPI; `scripts/install-dependencies.sh --tests` installs it)
    /// generates requests from the document and checks every answer against it: status
    /// codes, content types, response schemas, and no server errors.
    @Test(.enabled(if: OpenAPITests.schemathesis != nil, "schemathesis is not installed"))
    func schemathesisFindsTheDocumentTrue() throws {
        let port = Harness.freePort()
        let daemon = try Daemon(arguments: ["--listen", "127.0.0.1:\(port)"])
        defer { daemon.stop() }
        try daemon.ok(["plugin", "install", Daemon.samplePlugin("iofilter-cache"), Daemon.samplePlugin("iofilter-passthrough-c")])
        try daemon.ok(["policy", "create", "p1", "--filter", "org.swift-iofilter.cache:size=4M"])
        try daemon.ok(["disk", "create", "d1", "--size", "16M", "--policy", "p1"])
        try daemon.ok(["vm", "create", "v1", "--disk", "d1"])
        try daemon.ok(["vm", "start", "v1"])
        // An admin's token, named so that no generated name revokes it.
        let token = try daemon.ok(["token", "create", "schemathesis-\(UUID().uuidString)", "--role", "admin"])
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let result = try Harness.run(Self.schemathesis!, [
            "run", "http://127.0.0.1:\(port)/openapi.json", "--max-examples", "15", "--request-timeout", "60",
            "--header", "Authorization: Bearer \(token)",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
            // These take paths on the host; generated ones must not touch the test machine.
            "--exclude-operation-id", "installPlugin", "--exclude-operation-id", "exportDisk", "--exclude-operation-id", "importDisk",
            // These copy a whole disk, and a generated disk may be terabytes (sparse):
            // their answers are checked by the control-plane tests instead.
            "--exclude-operation-id", "snapshotDisk", "--exclude-operation-id", "cloneDisk", "--exclude-operation-id", "copyDisk",
        ], timeout: 900, environment: ["NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""])
        #expect(result.status == 0, "\(result.stdout.suffix(6000))")
        #expect(result.stdout.contains("generated"))
        #expect(!daemon.log.contains("internal"), "\(daemon.log.suffix(2000))")
    }

    static let schemathesis: String? = {
        guard let found = try? Harness.run("/bin/sh", ["-c", "command -v schemathesis"]), found.status == 0 else { return nil }
        let path = found.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        return path.isEmpty ? nil : path
    }()
}
