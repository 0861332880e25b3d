import IOFilterAPI
import IOFilterModel

/// A request the control plane refuses, with the HTTP status it answers with. The
/// message says what was wrong and, where it can, what to do instead.
public struct ControlError: Error, CustomStringConvertible, Sendable {
    public let status: Int
    public let code: String
    public let message: String

    public init(status: Int, code: String, message: String) {
        self.status = status
        self.code = code
        self.message = message
    }

    public var description: String { message }
    public var body: APIErrorBody { APIErrorBody(error: code, message: message) }

    public static func badRequest(_ message: String) -> ControlError { ControlError(status: 400, code: "bad-request", message: message) }
    public static func notFound(_ message: String) -> ControlError { ControlError(status: 404, code: "not-found", message: message) }
    public static func conflict(_ message: String) -> ControlError { ControlError(status: 409, code: "conflict", message: message) }
    public static func invalid(_ message: String) -> ControlError { ControlError(status: 422, code: "invalid", message: message) }
    public static func workerFailed(_ message: String) -> ControlError { ControlError(status: 502, code: "worker-failed", message: message) }
    public static func internalError(_ message: String) -> ControlError { ControlError(status: 500, code: "internal", message: message) }
}

/// Names of policies, disks and VMs: they become file names and URI path segments.
public enum Names {
    public static let pattern = ResourceName.pattern
    /// Path segments the API uses for operations ("/disks/import").
    public static let reserved: Set<String> = ["import", "validate"]

    public static func check(_ name: String, kind: String) throws(ControlError) {
        guard ResourceName.isValid(name) else {
            throw .badRequest("\(kind) name '\(name)' is not valid: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        }
        guard !reserved.contains(name) else { throw .conflict("'\(name)' is reserved; pick another \(kind) name") }
    }
}

/// Semantic versions compared by their numeric parts.
enum Versions {
    static func isNewer(_ a: String, than b: String) -> Bool {
        let parse = { (text: String) in text.split(separator: "-")[0].split(separator: ".").map { Int($0) ?? 0 } }
        let (x, y) = (parse(a), parse(b))
        for (p, q) in zip(x, y) where p != q { return p > q }
        return x.count > y.count
    }
}
