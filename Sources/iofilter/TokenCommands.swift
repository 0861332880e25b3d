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
            commandName: "create", abstract: "Create a token; prints it once, on stdout.",
            discussion: """
                Example:  export IOFILTER_TOKEN=$(iofilter token create ci --role operator)
                          iofilter vm list --url http://127.0.0.1:8080
                """)

        @Argument(help: "What the token is for (default: ROLE-TIME).")
        var name: String?

        @Option(help: ArgumentHelp("read-only, operator or admin.", valueName: "role"))
        var role: Role

        @Option(help: ArgumentHelp("How long it is good for: a number with s, m, h, d or w (30d, 12h); default: until revoked.",
                                   valueName: "duration"))
        var expires: String?

        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            if let expires, Self.seconds(expires) == nil {
                throw ValidationError("--expires '\(expires)' is not a duration: a positive number with s, m, h, d or w (30d, 12h, 90m)")
            }
        }

        /// "30d" in seconds.
        static func seconds(_ text: String) -> Int64? {
            let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800]
            guard let unit = text.last.flatMap({ units[$0] }), let count = Int64(text.dropLast()), count > 0, count <= 10 * 366 * 86_400 / unit
            else { return nil }
            return count * unit
        }

        func run() throws {
            let stamp = ISO8601DateFormatter().string(from: Date()).replacingOccurrences(of: ":", with: "")
            try reportingFailures {
                try daemon.client.run("POST", "/tokens", body: TokenCreateRequest(name: name ?? "\(role.rawValue)-\(stamp)", role: role,
                                                                                 expiresInSeconds: expires.flatMap(Self.seconds)),
                                      as: TokenInfo.self) { created in
                    FileHandle.standardError.write(Data(
                        ("token '\(created.name)' (\(created.role.rawValue), id \(created.id)) created"
                         + (created.expiresAt.map { ", expires \($0)" } ?? "") + "; it is shown only now\n").utf8))
                    return created.token ?? ""
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the tokens (never their secrets).")

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/tokens", as: [TokenInfo].self) { tokens in
                    tokens.isEmpty ? "no tokens; create one with `iofilter token create NAME --role ROLE`" : table(
                        ["ID", "NAME", "ROLE", "CREATED", "LAST USED", "EXPIRES"],
                        tokens.map { [$0.id, $0.name, $0.role.rawValue, $0.createdAt, $0.lastUsedAt ?? "never", $0.expiresAt ?? "never"] })
                }
            }
        }
    }

    struct Revoke: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "revoke", abstract: "Revoke a token, by id or name; it stops working at once.")

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
