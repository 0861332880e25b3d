/// A typed value passed to or returned from a management operation.
public enum ManagementValue: Sendable, Equatable, Codable, CustomStringConvertible {
    case void
    case int32(Int32), int64(Int64), uint32(UInt32), uint64(UInt64)
    case double(Double), bool(Bool), string(String)

    public var description: String {
        switch self {
        case .void: ""
        case .int32(let v): String(v)
        case .int64(let v): String(v)
        case .uint32(let v): String(v)
        case .uint64(let v): String(v)
        case .double(let v): String(v)
        case .bool(let v): String(v)
        case .string(let v): v
        }
    }

    /// Converts command-line text to a value of `type`, or nil if it is not one.
    public static func parse(_ text: String, as type: ValueType) -> ManagementValue? {
        switch type {
        case .void: nil
        case .int32: Int32(text).map(ManagementValue.int32)
        case .int64: Int64(text).map(ManagementValue.int64)
        case .uint32: UInt32(text).map(ManagementValue.uint32)
        case .uint64: UInt64(text).map(ManagementValue.uint64)
        case .double: Double(text).flatMap { $0.isFinite ? .double($0) : nil }
        case .string: .string(text)
        case .bool:
            switch text.lowercased() {
            case "true", "1", "yes": .bool(true)
            case "false", "0", "no": .bool(false)
            default: nil
            }
        }
    }
}

/// A management operation a plug-in declares (`struct iof_mgmt_op`).
public struct ManagementOperation: Codable, Sendable, Equatable {
    public var name: String
    public var description: String
    public var returnType: ValueType
    public var argumentTypes: [ValueType]
    public var argumentNames: [String]

    public init(
        name: String, description: String, returnType: ValueType, argumentTypes: [ValueType],
        argumentNames: [String]
    ) {
        self.name = name
        self.description = description
        self.returnType = returnType
        self.argumentTypes = argumentTypes
        self.argumentNames = argumentNames
    }

    /// `name(op: string, scale: double) -> double`
    public var signature: String {
        let args = argumentTypes.indices.map { index in
            let label = index < argumentNames.count ? argumentNames[index] : "arg\(index + 1)"
            return "\(label): \(argumentTypes[index].rawValue)"
        }
        return "\(name)(\(args.joined(separator: ", "))) -> \(returnType.rawValue)"
    }

    /// Converts command-line arguments to typed values, refusing a wrong count or type
    /// before anything is called.
    public func convert(arguments: [String], plugin: String) throws(ValidationError) -> [ManagementValue] {
        guard arguments.count == argumentTypes.count else {
            throw .badManagementCall(
                plugin: plugin,
                reason: "\(name) takes \(argumentTypes.count) argument(s), \(arguments.count) given; usage: \(signature)")
        }
        return try zip(arguments, argumentTypes).enumerated().map { (index, pair) throws(ValidationError) in
            guard let value = ManagementValue.parse(pair.0, as: pair.1) else {
                throw .badManagementCall(
                    plugin: plugin,
                    reason: "argument \(index + 1) of \(name) must be \(pair.1.rawValue), got '\(pair.0)'; usage: \(signature)")
            }
            return value
        }
    }
}
