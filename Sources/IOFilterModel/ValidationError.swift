/// Why a plug-in, a set of plug-ins, or a parameter was refused. Every case names what
/// was wrong and where, in one line an operator can act on.
public enum ValidationError: Error, Sendable, Equatable, Codable, CustomStringConvertible {
    /// The object could not be loaded or its descriptor could not be read.
    case loadFailed(path: String, reason: String)
    /// The descriptor was read but breaks a rule of the ABI.
    case badDescriptor(plugin: String, reason: String)
    case badSchema(plugin: String, parameter: String, reason: String)
    case duplicateCategory(category: FilterCategory, first: String, second: String)
    case duplicatePlugin(name: String, firstVersion: String, secondVersion: String)
    case unknownParameter(plugin: String, key: String, known: [String])
    case badParameterValue(plugin: String, key: String, value: String, expected: String)
    case missingParameter(plugin: String, key: String, expected: String)
    case badManagementCall(plugin: String, reason: String)

    public var description: String {
        switch self {
        case .loadFailed(let path, let reason):
            "\(path): \(reason)"
        case .badDescriptor(let plugin, let reason):
            "\(plugin): \(reason)"
        case .badSchema(let plugin, let parameter, let reason):
            "\(plugin): parameter '\(parameter)': \(reason)"
        case .duplicateCategory(let category, let first, let second):
            "\(first) and \(second) are both \(category.rawValue) filters; a disk has at most one filter per category"
        case .duplicatePlugin(let name, let firstVersion, let secondVersion):
            if firstVersion == secondVersion {
                "\(name) \(firstVersion) is given twice; a chain holds each plug-in once"
            } else {
                "\(name) is given twice, as versions \(firstVersion) and \(secondVersion); a chain holds one version of a plug-in"
            }
        case .unknownParameter(let plugin, let key, let known):
            "\(plugin): unknown parameter '\(key)'"
                + (known.isEmpty ? "; it takes no parameters" : "; it takes \(known.joined(separator: ", "))")
        case .badParameterValue(let plugin, let key, let value, let expected):
            "\(plugin): parameter '\(key)' must be \(expected), got '\(value)'"
        case .missingParameter(let plugin, let key, let expected):
            "\(plugin): parameter '\(key)' is required (\(expected))"
        case .badManagementCall(let plugin, let reason):
            "\(plugin): \(reason)"
        }
    }
}
