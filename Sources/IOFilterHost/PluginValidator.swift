import Foundation
import IOFilterModel

/// Loads plug-ins in sandboxed worker processes (never in this one) and reads back
/// their manifests, so that a plug-in that crashes or hangs while loading is reported
/// instead of taking the caller down.
public struct PluginValidator: Sendable {
    public var timeout: Double
    public var workerPath: String
    /// Where the manifests of unchanged plug-ins validated before are taken from (and
    /// each new one recorded), instead of loading them again; nil: always validate.
    public var remembered: ValidatedManifests?

    public init(timeout: Double = 10, workerPath: String = WorkerExecutable.path(), remembered: ValidatedManifests? = nil) {
        self.timeout = timeout
        self.workerPath = workerPath
        self.remembered = remembered
    }

    /// Validates one plug-in on its own.
    public func validate(_ path: String) -> Result<PluginManifest, ValidationError> {
        guard FileManager.default.fileExists(atPath: path) else {
            return .failure(.loadFailed(path: path, reason: "no such file"))
        }
        let file = absolute(path)
        if let manifest = remembered?.manifest(for: file) { return .success(manifest) }
        switch runWorker(.validate, [file], what: "loading") {
        case .failure(let error):
            return .failure(.loadFailed(path: path, reason: error.reason))
        case .success(let output):
            if let manifest = try? JSONDecoder().decode(PluginManifest.self, from: output) {
                remembered?.remember(manifest, for: file)
                return .success(manifest)
            }
            if let error = Self.reportedError(output) { return .failure(error) }
            return .failure(.loadFailed(path: path, reason: Self.errorText(output) ?? "the validator printed no manifest"))
        }
    }

    /// Validates each plug-in in parallel, then the set as one chain.
    public func validateChain(_ selections: [(path: String, parameters: [String: String])]) -> Result<[PlannedFilter], ValidationError> {
        let results = validateAll(selections.map(\.path))
        var chosen: [FilterSelection] = []
        for (result, selection) in zip(results, selections) {
            switch result {
            case .failure(let error): return .failure(error)
            case .success(let manifest): chosen.append(FilterSelection(manifest: manifest, parameters: selection.parameters))
            }
        }
        do {
            return .success(try FilterChain.plan(chosen))
        } catch {
            return .failure(error)
        }
    }

    public func validateAll(_ paths: [String]) -> [Result<PluginManifest, ValidationError>] {
        let results = ResultBox(count: paths.count)
        DispatchQueue.concurrentPerform(iterations: paths.count) { index in
            results.set(index, validate(paths[index]))
        }
        return results.values
    }

    /// Calls a management operation in a sandboxed worker. The arguments are checked
    /// against the declaration here first, so a wrong call never reaches the plug-in.
    public func call(_ path: String, operation: String, arguments: [String]) -> Result<ManagementValue, ValidationError> {
        let manifest: PluginManifest
        switch validate(path) {
        case .failure(let error): return .failure(error)
        case .success(let m): manifest = m
        }
        guard let declared = manifest.operation(named: operation) else {
            let known = manifest.operations.map(\.name).joined(separator: ", ")
            return .failure(.badManagementCall(
                plugin: manifest.name,
                reason: "no management operation '\(operation)'" + (known.isEmpty ? "; it declares none" : "; it declares \(known)")))
        }
        do {
            _ = try declared.convert(arguments: arguments, plugin: manifest.name)
        } catch {
            return .failure(error)
        }
        switch runWorker(.call, [absolute(path), operation] + arguments, what: "calling \(operation)") {
        case .failure(let failure):
            return .failure(.badManagementCall(plugin: manifest.name, reason: failure.reason))
        case .success(let output):
            struct Reply: Decodable { let type: String; let value: String }
            if let reply = try? JSONDecoder().decode(Reply.self, from: output), let type = ValueType(rawValue: reply.type) {
                return .success(type == .void ? .void : ManagementValue.parse(reply.value, as: type) ?? .string(reply.value))
            }
            if let error = Self.reportedError(output) { return .failure(error) }
            return .failure(.badManagementCall(plugin: manifest.name, reason: Self.errorText(output) ?? "no result"))
        }
    }

    /// Runs the worker and returns its stdout, or why it failed.
    private func runWorker(_ mode: WorkerMode, _ arguments: [String], what: String) -> Result<Data, ValidatorFailure> {
        let outcome: (status: Int32?, output: [UInt8])
        do {
            outcome = try SandboxedLaunch(mode: mode, arguments: arguments, executable: workerPath).run(timeout: timeout)
        } catch {
            return .failure(ValidatorFailure("cannot start the sandboxed validator \(workerPath): \(error)"))
        }
        guard let status = outcome.status else {
            return .failure(ValidatorFailure("timed out after \(Self.seconds(timeout)) while \(what) (it hangs); killed"))
        }
        if ChildProcess.exitCode(status: status) == nil {
            return .failure(ValidatorFailure("crashed while \(what): \(ChildProcess.describe(status: status))"))
        }
        let data = Data(outcome.output)
        if ChildProcess.exitCode(status: status) != 0, Self.errorText(data) == nil {
            return .failure(ValidatorFailure("validator \(ChildProcess.describe(status: status))"))
        }
        return .success(data)
    }

    private func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }

    static func reportedError(_ output: Data) -> ValidationError? {
        struct Failure: Decodable { let detail: ValidationError? }
        return (try? JSONDecoder().decode(Failure.self, from: output))?.detail
    }

    static func errorText(_ output: Data) -> String? {
        struct Failure: Decodable { let error: String }
        return (try? JSONDecoder().decode(Failure.self, from: output))?.error
    }

    static func seconds(_ value: Double) -> String {
        value == value.rounded() ? "\(Int(value))s" : "\(value)s"
    }
}

private final class ResultBox: @unchecked Sendable {
    // @unchecked: each index is written by exactly one iteration, under `lock`.
    private let lock = NSLock()
    private var storage: [Result<PluginManifest, ValidationError>?]
    init(count: Int) { storage = Array(repeating: nil, count: count) }
    func set(_ index: Int, _ value: Result<PluginManifest, ValidationError>) { lock.withLock { storage[index] = value } }
    var values: [Result<PluginManifest, ValidationError>] { lock.withLock { storage.map { $0! } } }
}

/// Why the validator gave no answer.
struct ValidatorFailure: Error {
    let reason: String
    init(_ reason: String) { self.reason = reason }
}
