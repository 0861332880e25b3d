import CIOFilter
import Glibc

/// A management operation: a C function operators call through the host's CLI or API
/// (`iofilter plugin call PLUGIN OP ARGS…`), its arguments converted by the host.
///
/// Write it as a global function with C types and point at it:
///
/// ```swift
/// @_cdecl("myfilter_status") func status() -> UnsafePointer<CChar>? { ManagementResult.string("ok") }
/// ManagementOperation("status", "one-line health", returns: .string, function: status as @convention(c) () -> UnsafePointer<CChar>?)
/// ```
public struct ManagementOperation: @unchecked Sendable {
    // @unchecked: `function` is a C function pointer, immutable.
    /// The C types an operation takes and returns (the header's `enum iof_value_type`).
    public typealias ValueType = IOFilterABI.ValueType

    public var name: String
    public var description: String
    public var returns: ValueType
    public var arguments: [(name: String, type: ValueType)]
    let function: UnsafeRawPointer

    /// Any C signature: give the argument types in order and the function pointer,
    /// converted with `unsafeBitCast(f, to: UnsafeRawPointer.self)`.
    public init(_ name: String, _ description: String, returns: ValueType, arguments: [(name: String, type: ValueType)] = [],
                rawFunction: UnsafeRawPointer) {
        self.name = name
        self.description = description
        self.returns = returns
        self.arguments = arguments
        self.function = rawFunction
    }

    /// `() -> const char *`
    public init(_ name: String, _ description: String, returns: ValueType = .string,
                function: @convention(c) () -> UnsafePointer<CChar>?) {
        self.init(name, description, returns: .string, rawFunction: unsafeBitCast(function, to: UnsafeRawPointer.self))
    }

    /// `() -> int64_t`
    public init(_ name: String, _ description: String, function: @convention(c) () -> Int64) {
        self.init(name, description, returns: .int64, rawFunction: unsafeBitCast(function, to: UnsafeRawPointer.self))
    }

    /// `(const char *) -> const char *`
    public init(_ name: String, _ description: String, argument: String,
                function: @convention(c) (UnsafePointer<CChar>?) -> UnsafePointer<CChar>?) {
        self.init(name, description, returns: .string, arguments: [(argument, .string)],
                  rawFunction: unsafeBitCast(function, to: UnsafeRawPointer.self))
    }

    func abi() -> iof_mgmt_op {
        var op = iof_mgmt_op()
        op.struct_size = UInt32(MemoryLayout<iof_mgmt_op>.size)
        op.name = keep(name)
        op.description = keep(description)
        op.function = unsafeBitCast(function, to: (@convention(c) () -> Void).self)
        op.return_type = returns.abiValue
        op.arg_count = UInt32(arguments.count)
        if !arguments.isEmpty {
            let types = UnsafeMutablePointer<iof_value_type>.allocate(capacity: arguments.count)
            let names = UnsafeMutablePointer<UnsafePointer<CChar>?>.allocate(capacity: arguments.count)
            for (index, argument) in arguments.enumerated() {
                types[index] = argument.type.abiValue
                names[index] = keep(argument.name)
            }
            op.arg_types = UnsafePointer(types)
            op.arg_names = UnsafePointer(names)
        }
        return op
    }
}

/// Holds the strings management operations return: the ABI lets the plug-in own them
/// until its next call on the same thread; the host copies them at once.
public enum ManagementResult {
    private static let lock = NSLockLike()
    nonisolated(unsafe) private static var recent: [UnsafeMutablePointer<CChar>] = []

    public static func string(_ text: String) -> UnsafePointer<CChar> {
        lock.withLock {
            let copy = strdup(text)!
            recent.append(copy)
            if recent.count > 64 { free(recent.removeFirst()) }
            return UnsafePointer(copy)
        }
    }
}
