/// One filter chosen for a disk, with the parameters a policy or command line set.
public struct FilterSelection: Codable, Sendable, Equatable {
    public var manifest: PluginManifest
    /// As given: text values keyed by parameter name.
    public var parameters: [String: String]

    public init(manifest: PluginManifest, parameters: [String: String] = [:]) {
        self.manifest = manifest
        self.parameters = parameters
    }
}

/// A filter in a planned chain: its manifest and every parameter resolved to its
/// canonical text (defaults filled in).
public struct PlannedFilter: Codable, Sendable, Equatable {
    public var manifest: PluginManifest
    public var parameters: [String: String]

    /// The files and NBD URIs the filter may have the host open for it (its path
    /// parameters' values).
    public var targets: [String] {
        manifest.parameters.filter(\.isPath).compactMap { parameters[$0.name] }.filter { !$0.isEmpty }
    }

    /// Its targets that are files.
    public var filePaths: [String] { targets.filter { !$0.contains("://") } }
}

/// The rules that make a set of filters a chain: each plug-in once, at most one filter
/// per category, known and well-typed parameters, and category order.
public enum FilterChain {
    public static func plan(_ selections: [FilterSelection]) throws(ValidationError) -> [PlannedFilter] {
        try checkMembership(selections.map(\.manifest))
        var planned: [PlannedFilter] = []
        for selection in selections {
            planned.append(
                PlannedFilter(
                    manifest: selection.manifest,
                    parameters: try resolve(selection.parameters, for: selection.manifest)))
        }
        return planned.sorted { $0.manifest.category < $1.manifest.category }
    }

    /// The set as a chain, in order, before any parameter is chosen (what
    /// `plugin validate` checks): each plug-in once, one filter per category.
    public static func order(_ manifests: [PluginManifest]) throws(ValidationError) -> [PluginManifest] {
        try checkMembership(manifests)
        return manifests.sorted { $0.category < $1.category }
    }

    private static func checkMembership(_ manifests: [PluginManifest]) throws(ValidationError) {
        var byName: [String: PluginManifest] = [:]
        var byCategory: [FilterCategory: PluginManifest] = [:]
        for manifest in manifests {
            if let other = byName[manifest.name] {
                throw .duplicatePlugin(
                    name: manifest.name, firstVersion: other.version, secondVersion: manifest.version)
            }
            if let other = byCategory[manifest.category] {
                throw .duplicateCategory(category: manifest.category, first: other.name, second: manifest.name)
            }
            byName[manifest.name] = manifest
            byCategory[manifest.category] = manifest
        }
    }

    /// Checks `given` against the plug-in's schema and fills in defaults.
    public static func resolve(
        _ given: [String: String], for manifest: PluginManifest
    ) throws(ValidationError) -> [String: String] {
        let specs = Dictionary(manifest.parameters.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for key in given.keys.sorted() where specs[key] == nil {
            throw .unknownParameter(plugin: manifest.name, key: key, known: manifest.parameters.map(\.name))
        }
        var resolved: [String: String] = [:]
        for spec in manifest.parameters {
            guard let text = given[spec.name] ?? (spec.required ? nil : spec.defaultValue) else {
                throw .missingParameter(plugin: manifest.name, key: spec.name, expected: spec.expectation)
            }
            switch spec.normalize(text) {
            case .success(let value):
                resolved[spec.name] = value
            case .failure:
                throw .badParameterValue(plugin: manifest.name, key: spec.name, value: text, expected: spec.expectation)
            }
        }
        return resolved
    }
}
