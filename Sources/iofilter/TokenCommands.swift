import ArgumentParser
import Foundation
import IOFilterAPI

extension Role: ExpressibleByArgument {}

struct TokenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "token",
        abstract: "Manage bearer tokens for the API over TCP (iofilterd --listen).",
        discussion: """
            On the unix socket the host knows its callers by their uid and groups; over TCP \
            every request carries a token. Roles: read-only (list, show, compliance, \
            events), operator (also start and stop VMs, snapshots, exports, plug-in \
            operations), admin (everything). The host keeps only a token's hash.
            """,
        subcommands: [Create.self, List.self, Revoke.self])

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a token; prints it once, on stdout.",
            discussion: """
                Example:  export IOFILTER_TOKEN=$(iofilter token create ci --role operator)
                          iofilter vm list --url http://127.0.0.1:8080
                """)

        @Argument(help: "What the token is for (default: ROLE-TIME).")
        var name: String?

        @Option(help: ArgumentHelp("read-only, operator or admin.", valueName: "role"))
        var role: Role

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
            try reportingFailures {
                try daemon.client.run("POST", "/tokens", body: TokenCreateRequest(name: name ?? "\(role.rawValue)-\(stamp)", role: role),
                                      as: TokenInfo.self) { created in
                    FileHandle.standardError.write(Data(
                        "token '\(created.name)' (\(created.role.rawValue), id \(created.id)) created; it is shown only now\n".utf8))
                    return created.token ?? ""
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List the tokens (never their secrets).")

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/tokens", as: [TokenInfo].self) { tokens in
                    tokens.isEmpty ? "no tokens; create one with `iofilter token create NAME --role ROLE`" : table(
                        ["ID", "NAME", "ROLE", "CREATED", "LAST USED"],
                        tokens.map { [$0.id, $0.name, $0.role.rawValue, $0.createdAt, $0.lastUsedAt ?? "never"] })
                }
            }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Revoke a token, by id or name; it stops working at once.")

        @Argument(help: "The token's id or name.")
        var token: String

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("DELETE", "/tokens/\(token)", as: TokenInfo.self) { "revoked \($0.name) (\($0.role.rawValue))" }
            }
        }
    }
}
