import CIOFilter
import CLibFFI
import Glibc
import IOFilterModel

extension PluginLibrary {
    /// Calls a declared management operation through libffi. Arguments are converted
    /// and checked against the declaration before anything is called.
    public func callManagementOperation(_ name: String, arguments: [String]) throws(ValidationError) -> ManagementValue {
        guard let declared = manifest.operation(named: name), let op = managementFunction(named: name),
            let function = op.pointee.function
        else {
            let known = manifest.operations.map(\.name).joined(separator: ", ")
            throw .badManagementCall(
                plugin: manifest.name,
                reason: "no management operation '\(name)'" + (known.isEmpty ? "; it declares none" : "; it declares \(known)"))
        }
        let values = try declared.convert(arguments: arguments, plugin: manifest.name)
        return try FFICall.invoke(
            unsafeBitCast(function, to: UnsafeMutableRawPointer.self), returning: declared.returnType,
            with: values, plugin: manifest.name)
    }
}

/// One libffi call: describe the C signature, lay the arguments out in memory, call.
enum FFICall {
    static func invoke(
        _ function: UnsafeMutableRawPointer, returning returnType: ValueType, with values: [ManagementValue],
        plugin: String
    ) throws(ValidationError) -> ManagementValue {
        // Each argument gets an 8-byte-aligned 16-byte cell; strings are copied into
        // C strings that live until the call returns.
        let cells = UnsafeMutableRawPointer.allocate(byteCount: 16 * max(values.count, 1), alignment: 16)
        let argPointers = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(values.count, 1))
        let argTypes = UnsafeMutablePointer<UnsafeMutablePointer<ffi_type>?>.allocate(capacity: max(values.count, 1))
        var strings: [UnsafeMutablePointer<CChar>] = []
        defer {
            strings.forEach { free($0) }
            cells.deallocate()
            argPointers.deallocate()
            argTypes.deallocate()
        }
        for (index, value) in values.enumerated() {
            let cell = cells + 16 * index
            argPointers[index] = cell
            switch value {
            case .int32(let v): cell.storeBytes(of: v, as: Int32.self); argTypes[index] = iof_ffi_type_sint32()
            case .int64(let v): cell.storeBytes(of: v, as: Int64.self); argTypes[index] = iof_ffi_type_sint64()
            case .uint32(let v): cell.storeBytes(of: v, as: UInt32.self); argTypes[index] = iof_ffi_type_uint32()
            case .uint64(let v): cell.storeBytes(of: v, as: UInt64.self); argTypes[index] = iof_ffi_type_uint64()
            case .double(let v): cell.storeBytes(of: v, as: Double.self); argTypes[index] = iof_ffi_type_double()
            case .bool(let v): cell.storeBytes(of: v ? 1 : 0, as: CInt.self); argTypes[index] = iof_ffi_type_sint()
            case .string(let v):
                let copy = strdup(v)!
                strings.append(copy)
                cell.storeBytes(of: UnsafePointer(copy), as: UnsafePointer<CChar>.self)
                argTypes[index] = iof_ffi_type_pointer()
            case .void:
                throw .badManagementCall(plugin: plugin, reason: "void is not an argument type")
            }
        }
        var cif = ffi_cif()
        let rtype: UnsafeMutablePointer<ffi_type> =
            switch returnType {
            case .void: iof_ffi_type_void()
            case .int32: iof_ffi_type_sint32()
            case .int64: iof_ffi_type_sint64()
            case .uint32: iof_ffi_type_uint32()
            case .uint64: iof_ffi_type_uint64()
            case .double: iof_ffi_type_double()
            case .bool: iof_ffi_type_sint()
            case .string: iof_ffi_type_pointer()
            }
        guard iof_ffi_prep_cif(&cif, UInt32(values.count), rtype, argTypes) == 0 else {
            throw .badManagementCall(plugin: plugin, reason: "libffi cannot describe this signature")
        }
        // libffi widens small integer results to a full ffi_arg register.
        var result = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &result) { resultBytes in
            ffi_call(
                &cif, unsafeBitCast(function, to: (@convention(c) () -> Void).self), resultBytes.baseAddress,
                argPointers)
        }
        return withUnsafeBytes(of: &result) { bytes in
            switch returnType {
            case .void: .void
            case .int32: .int32(Int32(truncatingIfNeeded: bytes.load(as: Int64.self)))
            case .int64: .int64(bytes.load(as: Int64.self))
            case .uint32: .uint32(UInt32(truncatingIfNeeded: bytes.load(as: UInt64.self)))
            case .uint64: .uint64(bytes.load(as: UInt64.self))
            case .double: .double(bytes.load(as: Double.self))
            case .bool: .bool(Int32(truncatingIfNeeded: bytes.load(as: Int64.self)) != 0)
            case .string:
                .string(bytes.load(as: UnsafePointer<CChar>?.self).map { String(cString: $0) } ?? "")
            }
        }
    }
}
