import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterHTTP
import IOFilterPosix

/// How a command reaches iofilterd; every command that talks to the daemon has these.
struct DaemonOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "iofilterd's API socket (default: $IOFILTERD_SOCKET, else STATE-DIR/api.sock of the default state directory).",
        valueName: "path"))
    var socket: String?

    @Option(help: ArgumentHelp("The daemon's state directory, to find its socket.", valueName: "dir"))
    var stateDir: String?

    @Option(help: ArgumentHelp("Reach iofilterd over TCP instead: http://127.0.0.1:8080, or https://HOST:PORT (default: $IOFILTER_URL).", valueName: "url"))
    var url: String?

    @Option(help: ArgumentHelp("For an https --url: trust certificates this CA signed (default: $IOFILTER_CACERT, else the system's).", valueName: "file"))
    var cacert: String?

    @Option(help: ArgumentHelp("The API token for --url (default: $IOFILTER_TOKEN); see `iofilter token create`.", valueName: "token"))
    var token: String?

    @Flag(help: "Print the API's JSON answer instead of text.")
    var json = false

    var socketPath: String {
        if let socket { return socket }
        if let stateDir { return HostDefaults.apiSocket(in: stateDir) }
        if let fromEnvironment = ProcessInfo.processInfo.environment["IOFILTERD_SOCKET"] { return fromEnvironment }
        return HostDefaults.apiSocket(in: HostDefaults.stateDirectory)
    }

    var client: APIClient {
        get throws { APIClient(transport: try endpoint.transport(), json: json, token: try endpoint.token) }
    }

    /// Where the daemon is, and the token to show it (TCP only).
    struct Endpoint: Sendable {
        enum Address: Sendable {
            case plain(HTTPClient.Address)
            case secure(host: String, port: Int, caFile: String?)
        }
        let address: Address
        let token: String?

        func transport() -> any APITransport {
            switch address {
            case .plain(let address): HTTPClient(address: address)
            case .secure(let host, let port, let caFile): HTTPSClient(host: host, port: port, caFile: caFile)
            }
        }
    }

    var endpoint: Endpoint {
        get throws {
            let environment = ProcessInfo.processInfo.environment
            guard let url = url ?? (socket == nil && stateDir == nil ? environment["IOFILTER_URL"] : nil) else {
                return Endpoint(address: .plain(.unix(path: socketPath)), token: nil)
            }
            let secure = url.hasPrefix("https://")
            guard secure || url.hasPrefix("http://"),
                  let (host, port) = Sockets.hostPort(url.dropFirst(secure ? 8 : 7).split(separator: "/").first.map(String.init) ?? "")
            else { throw CLIFailure(description: "--url '\(url)' is not http://HOST:PORT or https://HOST:PORT") }
            let token = token ?? environment["IOFILTER_TOKEN"]
            if secure { return Endpoint(address: .secure(host: host, port: Int(port), caFile: cacert ?? environment["IOFILTER_CACERT"]), token: token) }
            return Endpoint(address: .plain(.tcp(host: host, port: port)), token: token)
        }
    }

}

/// A failure the API reported (or reaching it failed); printed as `error: …`.
struct CLIFailure: Error, CustomStringConvertible {
    let description: String
}

struct APIClient {
    let transport: any APITransport
    let json: Bool
    let token: String?

    /// Sends one request and decodes the answer; an error answer becomes a CLIFailure
    /// with the daemon's message.
    func send<T: Decodable>(
        _ method: String, _ path: String, body: (some Encodable)? = Optional<String>.none, query: [String: String] = [:],
        as type: T.Type = T.self
    ) throws -> (value: T, raw: [UInt8]) {
        var bytes: [UInt8] = []
        var headers: [String: String] = [:]
        if let token { headers["Authorization"] = "Bearer \(token)" }
        if let body {
            bytes = Array(try JSONEncoder().encode(body))
            headers["Content-Type"] = "application/json"
        }
        let response: HTTPResponse
        do {
            response = try transport.send(HTTPRequest(method: method, path: path, query: query, headers: headers, body: bytes))
        } catch {
            throw CLIFailure(description: "\(error) (is iofilterd running? start it with `iofilterd`, or pass --socket)")
        }
        guard (200..<300).contains(response.status) else {
            if let problem = try? JSONDecoder().decode(APIErrorBody.self, from: Data(response.body)) {
                throw CLIFailure(description: problem.message)
            }
            throw CLIFailure(description: "iofilterd answered \(response.status) \(HTTPResponse.reason(response.status))")
        }
        do {
            return (try JSONDecoder().decode(T.self, from: Data(response.body)), response.body)
        } catch {
            throw CLIFailure(description: "iofilterd's answer does not match this iofilter's version: \(error)")
        }
    }

    /// Sends a request and prints the answer: the JSON with --json, else `text`.
    func run<T: Decodable>(
        _ method: String, _ path: String, body: (some Encodable)? = Optional<String>.none, query: [String: String] = [:],
        as type: T.Type = T.self, text: (T) -> String
    ) throws {
        let (value, raw) = try send(method, path, body: body, query: query, as: T.self)
        print(json ? Self.pretty(raw) : text(value))
    }

    static func pretty(_ raw: [UInt8]) -> String {
        guard let object = try? JSONSerialization.jsonObject(with: Data(raw)),
              let data = try? JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
        else { return String(decoding: raw, as: UTF8.self) }
        return String(decoding: data, as: UTF8.self)
    }
}

/// Runs a command body, turning failures into `error: …` and exit status 1.
func reportingFailures(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let failure as CLIFailure {
        printError(failure.description)
        throw ExitCode(1)
    }
}

/// Columns padded to their widest cell.
func table(_ header: [String], _ rows: [[String]]) -> String {
    let all = [header] + rows
    let widths = header.indices.map { column in all.map { $0[column].count }.max() ?? 0 }
    return all.map { row in
        row.enumerated().map { $0.offset == row.count - 1 ? $0.element : $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
            .joined(separator: "  ")
    }.joined(separator: "\n")
}

func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

func sizeText(_ bytes: Int64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"]
    var value = Double(bytes)
    var unit = 0
    while value >= 1024 && unit < units.count - 1 {
        value /= 1024
        unit += 1
    }
    return unit == 0 ? "\(bytes) B" : String(format: value == value.rounded() ? "%.0f %@" : "%.1f %@", value, units[unit])
}
