import CIOFilter
import IOFilterModel

/// Turns a C descriptor into a `PluginManifest`, refusing anything that breaks the ABI's
/// structural rules. Schema rules that need no pointers live in `PluginManifest.validate`.
enum DescriptorReader {
    /// Limits that keep a corrupt count from walking off into memory.
    static let maxParameters = 256
    static let maxOperations = 256
    static let maxEnumValues = 256

    static func read(_ pointer: UnsafePointer<iof_plugin>, path: String) throws(ValidationError) -> PluginManifest {
        let size = Int(pointer.pointee.struct_size)
        // ABI 1.0's descriptor ends with daemon_main; 1.3 appended daemon_flags, 1.4 health.
        let minimum = MemoryLayout<iof_plugin>.offset(of: \iof_plugin.daemon_flags)!
        guard size >= minimum else {
            throw .loadFailed(
                path: path,
                reason: "descriptor struct_size is \(size), smaller than ABI \(IOF_ABI_MAJOR).0's \(minimum)")
        }
        // The loader hands over a copy zero-extended past struct_size (PluginLibrary.extend).
        let plugin = pointer.pointee
        guard Int32(plugin.abi_major) == IOF_ABI_MAJOR else {
            throw .loadFailed(
                path: path,
                reason: "built for ABI \(plugin.abi_major).\(plugin.abi_minor); this host speaks ABI \(IOF_ABI_MAJOR).x")
        }
        guard Int32(plugin.abi_minor) <= IOF_ABI_MINOR else {
            throw .loadFailed(
                path: path,
                reason: "built for ABI \(plugin.abi_major).\(plugin.abi_minor), newer than this host's \(IOF_ABI_MAJOR).\(IOF_ABI_MINOR)")
        }
        let name = plugin.name.map { String(cString: $0) } ?? ""
        let who = name.isEmpty ? path : name
        guard let category = FilterCategory(abiValue: plugin.category.rawValue) else {
            let known = FilterCategory.allCases.map { "\($0.abiValue.rawValue)=\($0.rawValue)" }.joined(separator: ", ")
            throw .badDescriptor(plugin: who, reason: "unknown category \(plugin.category.rawValue) (known: \(known))")
        }
        guard let threadModel = ThreadModel(abiValue: plugin.thread_model.rawValue) else {
            throw .badDescriptor(plugin: who, reason: "unknown thread model \(plugin.thread_model.rawValue)")
        }
        var missing: [String] = []
        if plugin.open == nil { missing.append("open") }
        if plugin.close == nil { missing.append("close") }
        if plugin.start == nil { missing.append("start") }
        guard missing.isEmpty else {
            throw .badDescriptor(plugin: who, reason: "missing required callback(s): \(missing.joined(separator: ", "))")
        }
        guard let vendor = plugin.vendor, let version = plugin.version else {
            throw .badDescriptor(plugin: who, reason: plugin.vendor == nil ? "vendor is NULL" : "version is NULL")
        }
        var callbacks: [String] = []
        if plugin.load != nil { callbacks.append("load") }
        if plugin.unload != nil { callbacks.append("unload") }
        if plugin.attach != nil { callbacks.append("attach") }
        if plugin.detach != nil { callbacks.append("detach") }
        if plugin.done != nil { callbacks.append("done") }
        if plugin.event != nil { callbacks.append("event") }
        if plugin.stats != nil { callbacks.append("stats") }
        if plugin.daemon_main != nil { callbacks.append("daemon_main") }
        let flags = PluginFlags(rawValue: plugin.flags)
        // ABI 1.2 ops a filter declares it handles, listed with its callbacks.
        if plugin.abi_minor >= 2 && flags.contains(.blockStatus) { callbacks.append("block_status") }
        if plugin.abi_minor >= 2 && flags.contains(.cacheHints) { callbacks.append("cache") }
        // ABI 1.3: a daemon that accepts peers on other hosts.
        if plugin.daemon_main != nil && plugin.abi_minor >= 3 && plugin.daemon_flags & UInt32(IOF_DAEMON_LISTENS) != 0 {
            callbacks.append("daemon_listens")
        }
        // ABI 1.4: a filter that reports its own health.
        if plugin.abi_minor >= 4 && plugin.health != nil { callbacks.append("health") }

        return PluginManifest(
            name: name, vendor: String(cString: vendor), version: String(cString: version),
            description: plugin.description.map { String(cString: $0) } ?? "",
            category: category, threadModel: threadModel,
            abiMajor: Int(plugin.abi_major), abiMinor: Int(plugin.abi_minor),
            multiConn: !flags.contains(.noMultiConn),
            parameters: try readParameters(plugin, who: who),
            operations: try readOperations(plugin, who: who),
            callbacks: callbacks, path: path)
    }

    private static func readParameters(_ plugin: iof_plugin, who: String) throws(ValidationError) -> [ParameterSpec] {
        let count = Int(plugin.param_count)
        guard count > 0 else { return [] }
        guard count <= maxParameters else {
            throw .badDescriptor(plugin: who, reason: "param_count \(count) is over the limit of \(maxParameters)")
        }
        guard let specs = plugin.params else {
            throw .badDescriptor(plugin: who, reason: "param_count is \(count) but params is NULL")
        }
        var result: [ParameterSpec] = []
        for index in 0..<count {
            let spec = specs[index]
            let label = spec.name.map { String(cString: $0) } ?? "#\(index + 1)"
            guard Int(spec.struct_size) >= MemoryLayout<iof_param_spec>.size else {
                throw .badSchema(plugin: who, parameter: label, reason: "struct_size \(spec.struct_size) is too small")
            }
            guard spec.name != nil else {
                throw .badSchema(plugin: who, parameter: label, reason: "name is NULL")
            }
            let kind: ParameterSpec.Kind
            switch spec.type {
            case IOF_PARAM_BOOL: kind = .bool
            case IOF_PARAM_INT: kind = .int
            case IOF_PARAM_SIZE: kind = .size
            case IOF_PARAM_STRING: kind = .string
            case IOF_PARAM_ENUM: kind = .enum
            default:
                throw .badSchema(plugin: who, parameter: label, reason: "unknown type \(spec.type.rawValue)")
            }
            var enumValues: [String]?
            if kind == .enum {
                guard let list = spec.enum_values else {
                    throw .badSchema(plugin: who, parameter: label, reason: "an enum needs enum_values")
                }
                var values: [String] = []
                while let value = list[values.count] {
                    values.append(String(cString: value))
                    guard values.count <= maxEnumValues else {
                        throw .badSchema(plugin: who, parameter: label, reason: "enum_values is not NULL-terminated within \(maxEnumValues) entries")
                    }
                }
                enumValues = values
            }
            let ranged = kind == .int || kind == .size
            result.append(
                ParameterSpec(
                    name: label, description: spec.description.map { String(cString: $0) } ?? "",
                    kind: kind, required: spec.flags & UInt32(IOF_PARAM_REQUIRED) != 0,
                    defaultValue: spec.default_value.map { String(cString: $0) },
                    min: ranged ? spec.min : nil, max: ranged ? spec.max : nil, enumValues: enumValues,
                    isPath: spec.flags & UInt32(IOF_PARAM_PATH) != 0))
        }
        return result
    }

    private static func readOperations(_ plugin: iof_plugin, who: String) throws(ValidationError) -> [ManagementOperation] {
        let count = Int(plugin.mgmt_op_count)
        guard count > 0 else { return [] }
        guard count <= maxOperations else {
            throw .badDescriptor(plugin: who, reason: "mgmt_op_count \(count) is over the limit of \(maxOperations)")
        }
        guard let ops = plugin.mgmt_ops else {
            throw .badDescriptor(plugin: who, reason: "mgmt_op_count is \(count) but mgmt_ops is NULL")
        }
        var result: [ManagementOperation] = []
        for index in 0..<count {
            let op = ops[index]
            let label = op.name.map { String(cString: $0) } ?? "#\(index + 1)"
            func refuse(_ reason: String) -> ValidationError {
                .badDescriptor(plugin: who, reason: "management operation '\(label)': \(reason)")
            }
            guard Int(op.struct_size) >= MemoryLayout<iof_mgmt_op>.size else { throw refuse("struct_size \(op.struct_size) is too small") }
            guard op.name != nil else { throw refuse("name is NULL") }
            guard op.function != nil else { throw refuse("function is NULL") }
            guard let returnType = ValueType(abiValue: op.return_type.rawValue) else {
                throw refuse("unknown return type \(op.return_type.rawValue)")
            }
            let argCount = Int(op.arg_count)
            guard argCount <= Int(IOF_MGMT_MAX_ARGS) else { throw refuse("takes \(argCount) arguments; at most \(IOF_MGMT_MAX_ARGS)") }
            var types: [ValueType] = []
            var names: [String] = []
            if argCount > 0 {
                guard let argTypes = op.arg_types else { throw refuse("arg_count is \(argCount) but arg_types is NULL") }
                for argIndex in 0..<argCount {
                    guard let type = ValueType(abiValue: argTypes[argIndex].rawValue), type != .void else {
                        throw refuse("argument \(argIndex + 1) has an unusable type \(argTypes[argIndex].rawValue)")
                    }
                    types.append(type)
                    names.append(op.arg_names?[argIndex].map { String(cString: $0) } ?? "arg\(argIndex + 1)")
                }
            }
            result.append(
                ManagementOperation(
                    name: label, description: op.description.map { String(cString: $0) } ?? "",
                    returnType: returnType, argumentTypes: types, argumentNames: names))
        }
        return result
    }
}
