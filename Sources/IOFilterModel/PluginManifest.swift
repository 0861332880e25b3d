/// Everything the host knows about a plug-in, decoded from its C descriptor. Pure data:
/// it can be checked, stored and sent between processes without the `.so` loaded.
public struct PluginManifest: Codable, Sendable, Equatable {
    public var name: String
    public var vendor: String
    public var version: String
    public var description: String
    public var category: FilterCategory
    public var threadModel: ThreadModel
    public var abiMajor: Int
    public var abiMinor: Int
    /// False when the plug-in declared IOF_PLUGIN_NO_MULTI_CONN.
    public var multiConn: Bool
    public var parameters: [ParameterSpec]
    public var operations: [ManagementOperation]
    /// The optional callbacks it provides ("attach", "done", "stats", "daemon_main", …).
    public var callbacks: [String]
    /// Where it was loaded from.
    public var path: String

    public init(
        name: String, vendor: String, version: String, description: String,
        category: FilterCategory, threadModel: ThreadModel, abiMajor: Int, abiMinor: Int,
        multiConn: Bool, parameters: [ParameterSpec], operations: [ManagementOperation],
        callbacks: [String], path: String
    ) {
        self.name = name
        self.vendor = vendor
        self.version = version
        self.description = description
        self.category = category
        self.threadModel = threadModel
        self.abiMajor = abiMajor
        self.abiMinor = abiMinor
        self.multiConn = multiConn
        self.parameters = parameters
        self.operations = operations
        self.callbacks = callbacks
        self.path = path
    }

    /// It has a partner daemon (`daemon_main`), which the host runs beside its filters.
    public var hasDaemon: Bool { callbacks.contains("daemon_main") }
    /// Its daemon accepts peers on other hosts where the operator allows it (ABI 1.3's
    /// IOF_DAEMON_LISTENS).
    public var daemonListens: Bool { callbacks.contains("daemon_listens") }

    public func operation(named name: String) -> ManagementOperation? {
        operations.first { $0.name == name }
    }
}

extension PluginManifest {
    /// Checks everything about the descriptor that does not need the object loaded:
    /// names, version, parameter schema, management-operation declarations.
    public func validate() throws(ValidationError) {
        let who = name.isEmpty ? path : name
        guard !name.isEmpty else { throw .badDescriptor(plugin: who, reason: "name is empty") }
        guard Naming.isReverseDNS(name) else {
            throw .badDescriptor(
                plugin: who, reason: "name '\(name)' is not reverse-DNS (like com.example.filter)")
        }
        guard !vendor.isEmpty else { throw .badDescriptor(plugin: who, reason: "vendor is empty") }
        guard Naming.isSemanticVersion(version) else {
            throw .badDescriptor(
                plugin: who, reason: "version '\(version)' is not a semantic version (like 1.2.0)")
        }
        var seen = Set<String>()
        for spec in parameters {
            try validate(spec, plugin: who)
            guard seen.insert(spec.name).inserted else {
                throw .badSchema(plugin: who, parameter: spec.name, reason: "declared twice")
            }
        }
        seen = []
        for op in operations {
            guard Naming.isIdentifier(op.name) else {
                throw .badDescriptor(plugin: who, reason: "management operation name '\(op.name)' is not [a-z][a-z0-9_-]*")
            }
            guard seen.insert(op.name).inserted else {
                throw .badDescriptor(plugin: who, reason: "management operation '\(op.name)' declared twice")
            }
            if op.argumentTypes.contains(.void) {
                throw .badDescriptor(plugin: who, reason: "management operation '\(op.name)' has a void argument")
            }
        }
    }

    private func validate(_ spec: ParameterSpec, plugin: String) throws(ValidationError) {
        guard Naming.isIdentifier(spec.name) else {
            throw .badSchema(plugin: plugin, parameter: spec.name, reason: "name is not [a-z][a-z0-9_-]*")
        }
        switch spec.kind {
        case .int, .size:
            if let min = spec.min, let max = spec.max, min > max {
                throw .badSchema(plugin: plugin, parameter: spec.name, reason: "min \(min) is greater than max \(max)")
            }
        case .enum:
            guard let values = spec.enumValues, !values.isEmpty else {
                throw .badSchema(plugin: plugin, parameter: spec.name, reason: "an enum needs at least one value")
            }
            guard Set(values).count == values.count else {
                throw .badSchema(plugin: plugin, parameter: spec.name, reason: "enum values repeat")
            }
        case .bool, .string:
            break
        }
        if spec.isPath && spec.kind != .string {
            throw .badSchema(plugin: plugin, parameter: spec.name, reason: "only a string parameter can be a path")
        }
        if spec.required { return }
        guard let value = spec.defaultValue else {
            throw .badSchema(plugin: plugin, parameter: spec.name, reason: "an optional parameter needs a default value")
        }
        if case .failure = spec.normalize(value) {
            throw .badSchema(
                plugin: plugin, parameter: spec.name,
                reason: "default '\(value)' is not \(spec.expectation)")
        }
    }
}

enum Naming {
    /// `com.example.filter`: two or more dot-separated labels of letters, digits and
    /// hyphens, each starting with a letter or digit and not ending with a hyphen.
    static func isReverseDNS(_ name: String) -> Bool {
        let labels = name.split(separator: ".", omittingEmptySubsequences: false)
        guard labels.count >= 2, name.utf8.count <= 253 else { return false }
        return labels.allSatisfy { label in
            guard let first = label.first, let last = label.last, label.count <= 63 else { return false }
            return (first.isASCIILetterOrDigit) && last != "-"
                && label.allSatisfy { $0.isASCIILetterOrDigit || $0 == "-" }
        }
    }

    /// MAJOR.MINOR.PATCH with an optional -prerelease and +build.
    static func isSemanticVersion(_ version: String) -> Bool {
        var core = Substring(version)
        if let plus = core.firstIndex(of: "+") {
            let build = core[core.index(after: plus)...]
            guard isDotSeparatedIdentifiers(build) else { return false }
            core = core[..<plus]
        }
        if let dash = core.firstIndex(of: "-") {
            let pre = core[core.index(after: dash)...]
            guard isDotSeparatedIdentifiers(pre) else { return false }
            core = core[..<dash]
        }
        let numbers = core.split(separator: ".", omittingEmptySubsequences: false)
        return numbers.count == 3 && numbers.allSatisfy { number in
            !number.isEmpty && number.allSatisfy(\.isASCIIDigit) && (number == "0" || number.first != "0")
        }
    }

    private static func isDotSeparatedIdentifiers(_ text: Substring) -> Bool {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        return !parts.isEmpty && parts.allSatisfy { part in
            !part.isEmpty && part.allSatisfy { $0.isASCIILetterOrDigit || $0 == "-" }
        }
    }

    /// `[a-z][a-z0-9_-]*`
    static func isIdentifier(_ name: String) -> Bool {
        guard let first = name.first, first.isASCII, first.isLowercase else { return false }
        return name.allSatisfy { ($0.isASCII && ($0.isLowercase || $0.isNumber)) || $0 == "_" || $0 == "-" }
    }
}

extension Character {
    var isASCIIDigit: Bool { isASCII && isNumber }
    var isASCIILetterOrDigit: Bool { isASCII && (isLetter || isNumber) }
}
