import ArgumentParser
import Foundation
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterPosix
import IOFilterWire

extension IOFilterCommand.Plugin {
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "info", abstract: "Show what a plug-in file offers: category, parameters with their defaults, operations.",
            discussion: """
                Like `nbdkit --dump-plugin`: no host is needed. The plug-in is loaded in a \
                sandboxed process, as for validate.

                Example:  iofilter plugin info ./libmyfilter.so
                """)

        @Argument(help: "A plug-in shared object (.so).")
        var plugin: String

        @Flag(help: "Print the manifest as JSON.")
        var json = false

        func run() throws {
            switch PluginValidator().validate(plugin) {
            case .success(let manifest):
                if json {
                    print(jsonLine(manifest))
                } else {
                    print(Show.describe(PluginInfo(manifest: manifest, installedAt: "", attachedTo: []), installed: false))
                    print("  built for ABI \(manifest.abiMajor).\(manifest.abiMinor) (this host speaks \(Release.abi))")
                    print("  callbacks: \(manifest.callbacks.joined(separator: ", "))")
                }
            case .failure(let error):
                printError(error.description)
                throw ExitCode(1)
            }
        }
    }

    struct Validate: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "validate", abstract: "Validate plug-ins, each alone and then together as one chain.",
            discussion: """
                Each plug-in is loaded in a sandboxed process with a time limit, so one that \
                crashes or hangs is reported, not fatal. The chain is printed in the order a \
                request meets it: inspection, replication, encryption, cache, qos. \
                Exit status 0 means every plug-in and the chain are valid.
                """)

        @Argument(help: "Plug-in shared objects (.so).")
        var plugins: [String]

        @Flag(help: "Print {\"plugins\": [...], \"chain\": [{\"name\", \"category\"}...]}.")
        var json = false

        @Option(help: "Seconds a plug-in may take to load.")
        var timeout: Double = 10

        func validate() throws {
            guard !plugins.isEmpty else { throw ValidationError("give at least one plug-in") }
        }

        func run() throws {
            let validator = PluginValidator(timeout: timeout)
            let results = validator.validateAll(plugins)
            var manifests: [PluginManifest] = []
            var problems: [String] = []
            for result in results {
                switch result {
                case .success(let manifest): manifests.append(manifest)
                case .failure(let error): problems.append(error.description)
                }
            }
            var chain: [PluginManifest] = []
            if problems.isEmpty {
                do {
                    chain = try FilterChain.order(manifests)
                } catch {
                    problems.append(error.description)
                }
            }
            struct Link: Encodable { let name: String; let category: String }
            struct Report: Encodable {
                let plugins: [PluginManifest]
                let chain: [Link]
                let errors: [String]?
            }
            if json {
                print(jsonLine(Report(
                    plugins: manifests, chain: chain.map { Link(name: $0.name, category: $0.category.rawValue) },
                    errors: problems.isEmpty ? nil : problems)))
            } else if problems.isEmpty {
                for manifest in manifests {
                    print("ok  \(manifest.name) \(manifest.version) (\(manifest.category.rawValue), \(manifest.vendor))  \(manifest.path)")
                }
                print("chain: consumer -> " + chain.map { "\($0.name) [\($0.category.rawValue)]" }.joined(separator: " -> ") + " -> disk")
            }
            for problem in problems { printError(problem) }
            if !problems.isEmpty { throw ExitCode(1) }
        }
    }

    struct Call: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "call", abstract: "Call a plug-in's management operation.",
            discussion: """
                PLUGIN is a shared object (a path, or a name ending in .so), called here without \
                a daemon, or the name of a plug-in installed on iofilterd. With --vm, the call \
                runs inside that VM's worker, where it sees the live filters (their status, \
                a resync); otherwise it runs in a fresh sandboxed worker. Arguments are \
                converted to the C types the plug-in declared and checked before the call, \
                which goes through libffi. Without OP, lists the operations.

                With --serve, the call runs inside the worker of a running `iofilter serve`, \
                through the control socket it logs (its NBD socket's path + .control).

                  iofilter plugin call ./libmyfilter.so status
                  iofilter plugin call ./libmyfilter.so status --serve /tmp/disk.sock.control
                  iofilter plugin call org.swift-iofilter.replication status --vm web
                """)

        @Argument(help: "The plug-in: a .so file, or an installed plug-in's name.")
        var plugin: String

        @Argument(help: "The operation's name.")
        var operation: String?

        @Argument(parsing: .allUnrecognized, help: "The operation's arguments.")
        var arguments: [String] = []

        @Option(help: "Run it in this running VM's worker (installed plug-ins only).")
        var vm: String?

        @Option(help: "Which installed version (default: the newest).")
        var version: String?

        @Option(help: ArgumentHelp("Run it in the worker of the `iofilter serve` whose control socket this is.", valueName: "path"))
        var serve: String?

        @OptionGroup var daemon: DaemonOptions

        var isFile: Bool { plugin.contains("/") || plugin.hasSuffix(".so") }

        func run() throws {
            if isFile {
                guard vm == nil, version == nil else {
                    printError("--vm and --version are for installed plug-ins; \(plugin) is a file")
                    throw ExitCode(1)
                }
                try callFile()
            } else {
                try reportingFailures(callInstalled)
            }
        }

        func callInstalled() throws {
            let client = try daemon.client
            guard let operation else {
                try client.run("GET", "/plugins/\(plugin)", as: [PluginInfo].self) { versions in
                    let chosen = versions.first { $0.version == version } ?? versions[0]
                    return chosen.operations.isEmpty ? "\(chosen.name) declares no management operations"
                        : chosen.operations.map(\.signature).joined(separator: "\n")
                }
                return
            }
            try client.run("POST", "/plugins/\(plugin)/call",
                           body: PluginCallRequest(operation: operation, arguments: arguments, vm: vm, version: version),
                           as: ManagementResult.self) { $0.value }
        }

        func callFile() throws {
            let validator = PluginValidator()
            guard let operation else {
                switch validator.validate(plugin) {
                case .failure(let error):
                    printError(error.description)
                    throw ExitCode(1)
                case .success(let manifest):
                    if manifest.operations.isEmpty { print("\(manifest.name) declares no management operations") }
                    for op in manifest.operations { print("\(op.signature)  \(op.description)") }
                    return
                }
            }
            if let serve {
                try callServing(at: serve, operation: operation, validator: validator)
                return
            }
            switch validator.call(plugin, operation: operation, arguments: arguments) {
            case .failure(let error):
                printError(error.description)
                throw ExitCode(1)
            case .success(let value):
                if daemon.json {
                    print(jsonLine(ManagementResult(type: value.typeName, value: value.description)))
                } else {
                    print(value.description)
                }
            }
        }
    }
}

extension IOFilterCommand.Plugin.Call {
    /// The call, by the plug-in's name, inside a running `iofilter serve`'s worker.
    func callServing(at path: String, operation: String, validator: PluginValidator) throws {
        let manifest: PluginManifest
        switch validator.validate(plugin) {
        case .success(let valid): manifest = valid
        case .failure(let error):
            printError(error.description)
            throw ExitCode(1)
        }
        let response: WorkerControlResponse
        do {
            let fd = try Sockets.connectUnix(path: path)
            defer { close(fd) }
            response = try ControlChannel(fd: fd).exchange(
                .call(plugin: manifest.name, operation: operation, arguments: arguments), timeout: 600)
        } catch {
            printError("cannot reach the worker at \(path) (is `iofilter serve` running?): \(error)")
            throw ExitCode(1)
        }
        guard let result = response.result else {
            printError(response.error ?? "the worker gave no result")
            throw ExitCode(1)
        }
        print(daemon.json ? jsonLine(result) : result.value)
    }
}

extension ManagementValue {
    var typeName: String {
        switch self {
        case .void: "void"
        case .int32: "int32"
        case .int64: "int64"
        case .uint32: "uint32"
        case .uint64: "uint64"
        case .double: "double"
        case .bool: "bool"
        case .string: "string"
        }
    }
}
