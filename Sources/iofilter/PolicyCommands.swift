import ArgumentParser
import Foundation
import IOFilterAPI

struct PolicyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "policy",
        abstract: "Create, inspect and validate policies.",
        discussion: """
            A policy picks filters from the installed plug-ins (see `iofilter capabilities`) and \
            sets their parameters; assign it to disks with `iofilter disk assign-policy`. At most \
            one filter per category; parameters are checked against each plug-in's schema. \
            In values, {disk} stands for the disk's name and {state} for the host's state \
            directory, so one policy can give each disk its own replica:

              iofilter policy create gold \\
                --filter org.swift-iofilter.replication:target={state}/replicas/{disk}.img,mode=async \\
                --filter org.swift-iofilter.cache:mode=write-back,size=512M
            """,
        subcommands: [Create.self, Show.self, List.self, Delete.self, Validate.self])

    /// `PLUGIN[@VERSION][:key=value,...]`
    static func parseRule(_ text: String) throws -> PolicyRule {
        let (head, tail) = text.firstIndex(of: ":").map { (String(text[..<$0]), String(text[text.index(after: $0)...])) } ?? (text, "")
        let parts = head.split(separator: "@", maxSplits: 1).map(String.init)
        guard let plugin = parts.first, !plugin.isEmpty else { throw ValidationError("--filter '\(text)' names no plug-in") }
        var parameters: [String: String] = [:]
        for pair in tail.split(separator: ",") {
            guard let equals = pair.firstIndex(of: "="), equals != pair.startIndex else {
                throw ValidationError("--filter '\(text)': '\(pair)' is not key=value")
            }
            parameters[String(pair[..<equals])] = String(pair[pair.index(after: equals)...])
        }
        return PolicyRule(plugin: plugin, version: parts.count == 2 ? parts[1] : nil, parameters: parameters)
    }

    static func describe(_ policy: Policy) -> String {
        var lines = ["\(policy.name)\(policy.description.isEmpty ? "" : ": \(policy.description)")"]
        for rule in policy.filters {
            let parameters = rule.parameters.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
            lines.append("  \(rule.plugin)\(rule.version.map { "@\($0)" } ?? "")\(parameters.isEmpty ? "" : ":\(parameters)")")
        }
        return lines.joined(separator: "\n")
    }

    static func describe(_ validation: PolicyValidation) -> String {
        guard validation.valid else { return validation.errors.map { "invalid: \($0)" }.joined(separator: "\n") }
        return "valid; chain: consumer -> "
            + validation.chain.map { "\($0.plugin) \($0.version) [\($0.category.rawValue)]" }.joined(separator: " -> ") + " -> disk"
    }

    struct Rules: ParsableArguments {
        @Option(name: .customLong("filter"), help: ArgumentHelp(
            "A filter: PLUGIN[@VERSION][:key=value,...]; repeat for each (any order).", valueName: "spec"))
        var filters: [String] = []

        @Option(help: ArgumentHelp("Read the policy from a JSON file ({\"name\", \"description\", \"filters\": [...]}).", valueName: "file"))
        var file: String?

        func policy(name: String?, description: String) throws -> Policy {
            if let file {
                guard filters.isEmpty else { throw ValidationError("give --file or --filter, not both") }
                let data = try Data(contentsOf: URL(fileURLWithPath: file))
                var policy = try JSONDecoder().decode(Policy.self, from: data)
                if let name { policy.name = name }
                return policy
            }
            guard let name else { throw ValidationError("give the policy's name") }
            return Policy(name: name, description: description, filters: try filters.map(PolicyCommand.parseRule))
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "create", abstract: "Create a policy (validated first).")

        @Argument(help: "The policy's name.")
        var name: String?

        @OptionGroup var rules: Rules

        @Option(help: "What the policy is for.")
        var description = ""

        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            if rules.file == nil && rules.filters.isEmpty { throw ValidationError("give at least one --filter (or --file)") }
        }

        func run() throws {
            let policy = try rules.policy(name: name, description: description)
            try reportingFailures {
                try daemon.client.run("POST", "/policies", body: policy, as: Policy.self) { "created policy\n" + PolicyCommand.describe($0) }
            }
        }
    }

    struct Show: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "show", abstract: "Show a policy.")
        @Argument(help: "The policy's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/policies/\(name)", as: Policy.self, text: PolicyCommand.describe)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the policies.")
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/policies", as: [Policy].self) { policies in
                    policies.isEmpty ? "no policies; create one with `iofilter policy create`"
                        : policies.map(PolicyCommand.describe).joined(separator: "\n")
                }
            }
        }
    }

    struct Delete: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "delete", abstract: "Delete a policy no disk uses.")
        @Argument(help: "The policy's name.") var name: String
        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("DELETE", "/policies/\(name)", as: Policy.self) { "deleted policy \($0.name)" }
            }
        }
    }

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "validate", abstract: "Validate a stored policy, or a draft given with --filter or --file.",
            discussion: "Exit status 0 when valid; 1 with the reasons otherwise.")

        @Argument(help: "A stored policy's name (or the draft's).")
        var name: String?

        @OptionGroup var rules: Rules

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                let validation: PolicyValidation
                let raw: [UInt8]
                if rules.filters.isEmpty && rules.file == nil {
                    guard let name else { throw ValidationError("give a policy name, or --filter/--file for a draft") }
                    (validation, raw) = try daemon.client.send("POST", "/policies/\(name)/validate", as: PolicyValidation.self)
                } else {
                    let draft = try rules.policy(name: name ?? "draft", description: "")
                    (validation, raw) = try daemon.client.send("POST", "/policies/validate", body: draft, as: PolicyValidation.self)
                }
                print(daemon.json ? APIClient.pretty(raw) : PolicyCommand.describe(validation))
                if !validation.valid { throw ExitCode(1) }
            }
        }
    }
}
