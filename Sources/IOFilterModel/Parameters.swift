/// One typed parameter a policy may set on a filter (`struct iof_param_spec`).
public struct ParameterSpec: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        case bool, int, size, string, `enum`
    }

    public var name: String
    public var description: String
    public var kind: Kind
    public var required: Bool
    public var defaultValue: String?
    public var min: Int64?
    public var max: Int64?
    public var enumValues: [String]?
    /// The value is a file path the sandbox must let the filter open (IOF_PARAM_PATH).
    public var isPath: Bool

    public init(
        name: String, description: String, kind: Kind, required: Bool = false,
        defaultValue: String? = nil, min: Int64? = nil, max: Int64? = nil, enumValues: [String]? = nil,
        isPath: Bool = false
    ) {
        self.isPath = isPath
        self.name = name
        self.description = description
        self.kind = kind
        self.required = required
        self.defaultValue = defaultValue
        self.min = min
        self.max = max
        self.enumValues = enumValues
    }

    /// A readable statement of what the parameter accepts, for error messages and help.
    public var expectation: String {
        switch kind {
        case .bool: "a bool (true or false)"
        case .string: "a string"
        case .enum: "one of \((enumValues ?? []).joined(separator: ", "))"
        case .int: "an integer" + rangeText
        case .size: "a size in bytes (suffixes K, M, G, T)" + rangeText
        }
    }

    private var rangeText: String {
        guard let min, let max else { return "" }
        return " in \(min)...\(max)"
    }

    /// Checks `text` against the type and range; returns its canonical text form.
    public func normalize(_ text: String) -> Result<String, ParameterProblem> {
        switch kind {
        case .string:
            return .success(text)
        case .bool:
            switch text.lowercased() {
            case "true", "yes", "on", "1": return .success("true")
            case "false", "no", "off", "0": return .success("false")
            default: return .failure(.wrongType)
            }
        case .enum:
            return (enumValues ?? []).contains(text) ? .success(text) : .failure(.wrongType)
        case .int, .size:
            let parsed = kind == .int ? Int64(text) : Self.parseSize(text)
            guard let value = parsed else { return .failure(.wrongType) }
            if let min, value < min { return .failure(.outOfRange) }
            if let max, value > max { return .failure(.outOfRange) }
            return .success(String(value))
        }
    }

    public enum ParameterProblem: Error, Sendable { case wrongType, outOfRange }

    /// Parses "4096", "64K", "1M", "2G", "1T" (powers of 1024) into bytes.
    public static func parseSize(_ text: String) -> Int64? {
        var digits = Substring(text.trimmingWhitespace())
        var multiplier: Int64 = 1
        if let last = digits.last, last.isLetter {
            switch last.uppercased() {
            case "K": multiplier = 1 << 10
            case "M": multiplier = 1 << 20
            case "G": multiplier = 1 << 30
            case "T": multiplier = 1 << 40
            default: return nil
            }
            digits = digits.dropLast()
            if digits.last == "i" || digits.last == "I" { return nil }
        }
        guard let number = Int64(digits), number >= 0 else { return nil }
        let (product, overflow) = number.multipliedReportingOverflow(by: multiplier)
        return overflow ? nil : product
    }
}

extension String {
    func trimmingWhitespace() -> String {
        var view = Substring(self)
        while view.first?.isWhitespace == true { view = view.dropFirst() }
        while view.last?.isWhitespace == true { view = view.dropLast() }
        return String(view)
    }
}
