import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterTrust

extension AcceptanceLevel: ExpressibleByArgument {}

extension IOFilterCommand.Plugin {
    struct Keygen: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "keygen", abstract: "Make an Ed25519 key pair for signing plug-ins.",
            discussion: """
                Writes PREFIX.key (the private key, mode 0600; keep it off build machines \
                you do not trust) and PREFIX.pub (give it to the hosts that should trust \
                your plug-ins: `iofilter trust add PREFIX.pub --level partner`). Never \
                overwrites an existing key.

                Example:  iofilter plugin keygen --out ~/keys/acme --comment "ACME release key"
                """)

        @Option(help: ArgumentHelp("Where to write PREFIX.key and PREFIX.pub.", valueName: "prefix"))
        var out: String

        @Option(help: "Who the key belongs to; shown wherever the key is named.")
        var comment: String?

        func run() throws {
            let key = PrivateSigningKey.generate(comment: comment ?? ((out as NSString).lastPathComponent))
            do {
                try key.write(prefix: out)
            } catch {
                printError(error.message)
                throw ExitCode(1)
            }
            print("wrote \(out).key (private, 0600) and \(out).pub; key id \(key.publicKey.id)")
        }
    }

    struct Sign: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "sign", abstract: "Sign a plug-in: writes PLUGIN.so.sig beside it.",
            discussion: """
                The signature covers the file's bytes and its identity as its descriptor \
                declares it (name, version, category) and the level claimed, so it cannot be \
                moved to another plug-in or version, nor its level raised. A host counts it \
                at the lower of the claimed level and the level it enrolled the key for. \
                Signing an already signed file with another key adds a countersignature \
                (the project countersigns partner plug-ins it tested at `accepted`).

                Example:  iofilter plugin sign ./libmyfilter.so --key ~/keys/acme.key
                """)

        @Argument(help: "The plug-in shared object (.so).")
        var plugin: String

        @Option(help: ArgumentHelp("The private key (PREFIX.key from keygen).", valueName: "file"))
        var key: String

        @Option(help: ArgumentHelp("The level this signature claims: \(AcceptanceLevel.choices).", valueName: "level"))
        var level: AcceptanceLevel = .partner

        func run() throws {
            let signingKey: PrivateSigningKey
            let manifest: PluginManifest
            let digest: PluginDigest
            do {
                signingKey = try PrivateSigningKey(file: key)
                digest = try PluginDigest(file: plugin)
            } catch {
                printError(error.message)
                throw ExitCode(1)
            }
            switch PluginValidator().validate(plugin) {
            case .success(let valid): manifest = valid
            case .failure(let error):
                printError("\(error.description) (only a valid plug-in can be signed)")
                throw ExitCode(1)
            }
            let path = plugin + ".sig"
            let existing = FileManager.default.contents(atPath: path).flatMap { try? SignatureFile(bytes: $0, source: path) }
            do {
                let file = try SignatureFile.signing(SignedPlugin(manifest), digest: digest, key: signingKey, level: level, adding: existing)
                try file.bytes.write(to: URL(fileURLWithPath: path))
                let others = file.signatures.count - 1
                print("signed \(manifest.name) \(manifest.version) at \(level) with key \(signingKey.publicKey.id): wrote \(path)"
                      + (others > 0 ? " (\(others) other signature(s) kept)" : ""))
            } catch {
                printError("cannot write \(path): \(error)")
                throw ExitCode(1)
            }
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "verify", abstract: "Check a plug-in's signatures (PLUGIN.so.sig).",
            discussion: """
                Checks that the file is the one that was signed, that the signature names \
                this plug-in, and that every signature verifies. With --trust, keys given \
                count up to the level they claim, as a host that enrolled them at \
                certified would; the effective level is printed. Exit status 0 means the \
                signatures hold (and, with --trust, at least one is by a trusted key).

                Example:  iofilter plugin verify ./libmyfilter.so --trust ~/keys/acme.pub
                """)

        @Argument(help: "The plug-in shared object (.so).")
        var plugin: String

        @Option(help: ArgumentHelp("A public key (PREFIX.pub) to trust; repeat for several.", valueName: "file"))
        var trust: [String] = []

        @Flag(help: "Print the verdict as JSON.")
        var json = false

        func run() throws {
            let path = plugin + ".sig"
            let digest: PluginDigest
            let file: SignatureFile
            let trusted: [TrustedKey]
            do {
                digest = try PluginDigest(file: plugin)
                guard let bytes = FileManager.default.contents(atPath: path) else {
                    printError("\(plugin) is unsigned: there is no \(path) (sign it with `iofilter plugin sign`)")
                    throw ExitCode(1)
                }
                file = try SignatureFile(bytes: bytes, source: path)
                trusted = try trust.map { TrustedKey(publicKey: try PublicSigningKey(file: $0), level: .certified, addedAt: "") }
            } catch let error as TrustError {
                printError(error.message)
                throw ExitCode(1)
            }
            let manifest: PluginManifest
            switch PluginValidator().validate(plugin) {
            case .success(let valid): manifest = valid
            case .failure(let error):
                printError(error.description)
                throw ExitCode(1)
            }
            let verdict = SignatureVerdict.check(file, digest: digest, plugin: SignedPlugin(manifest), trusted: trusted)
            let trustedSigner = verdict.signers.contains { $0.valid && $0.enrolled != nil }
            if json {
                print(jsonLine(verdict))
            } else {
                print("\(plugin): \(SignedPlugin(manifest)), sha256 \(digest.sha256)")
                for signer in verdict.signers {
                    let trust = trusted.isEmpty ? "" : signer.enrolled == nil ? ", key not in --trust" : ", trusted"
                    print("  signed by \(signer.keyId)\(signer.comment.isEmpty ? "" : " (\(signer.comment))") at \(signer.claimed): "
                          + (signer.valid ? "valid" : "INVALID") + trust)
                }
                if trusted.isEmpty {
                    print("signatures hold; pass --trust KEY.pub to judge the signers (a host counts only keys it enrolled)")
                } else if verdict.problems.isEmpty {
                    print("effective level: \(verdict.level)")
                }
            }
            for problem in verdict.problems { printError(problem) }
            if !verdict.problems.isEmpty { throw ExitCode(1) }
            if !trusted.isEmpty && !trustedSigner {
                printError("no signature is by a key given with --trust")
                throw ExitCode(1)
            }
        }
    }
}

struct TrustCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "trust",
        abstract: "Manage the signing keys the host trusts, and the level each may sign at.",
        discussion: """
            A plug-in's level is the lower of what its signature claims and what its key is \
            enrolled for here; iofilterd installs only plug-ins at or above its \
            --acceptance-level (default partner). Levels, highest first: certified, \
            accepted, partner, community.
            """,
        subcommands: [Add.self, List.self, Remove.self])

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "add", abstract: "Enrol a public key (PREFIX.pub), or change its level.",
            discussion: "Example:  iofilter trust add acme.pub --level partner")

        @Argument(help: "The public key file from `iofilter plugin keygen`.")
        var publicKey: String

        @Option(help: ArgumentHelp("The highest level its signatures count for: \(AcceptanceLevel.choices).", valueName: "level"))
        var level: AcceptanceLevel

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                let key: PublicSigningKey
                do {
                    key = try PublicSigningKey(file: publicKey)
                } catch {
                    throw CLIFailure(description: "\(error)")
                }
                try daemon.client.run("POST", "/trust", body: TrustAddRequest(publicKey: key.line, level: level), as: TrustedKeyInfo.self) {
                    "trusted \($0.keyId) (\($0.comment)) up to \($0.level)"
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "list", abstract: "List the enrolled keys.")

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("GET", "/trust", as: [TrustedKeyInfo].self) { keys in
                    keys.isEmpty ? "no keys are enrolled; add one with `iofilter trust add KEY.pub --level partner`" : table(
                        ["KEY ID", "LEVEL", "COMMENT", "ADDED", "SIGNED"],
                        keys.map { [$0.keyId, $0.level.rawValue, $0.comment, $0.addedAt, $0.signed.joined(separator: ", ")] })
                }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "remove", abstract: "Stop trusting a key.",
            discussion: "Plug-ins it signed stay installed; new installs signed only by it are refused.")

        @Argument(help: "The key's id (see `iofilter trust list`).")
        var keyId: String

        @OptionGroup var daemon: DaemonOptions

        func run() throws {
            try reportingFailures {
                try daemon.client.run("DELETE", "/trust/\(keyId)", as: TrustedKeyInfo.self) {
                    "removed \($0.keyId) (\($0.comment))" + ($0.signed.isEmpty ? "" : "; still installed, signed by it: \($0.signed.joined(separator: ", "))")
                }
            }
        }
    }
}
