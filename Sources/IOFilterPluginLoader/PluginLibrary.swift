import CIOFilter
import Glibc
import IOFilterModel

/// A plug-in shared object loaded into this process, its descriptor checked.
///
/// Loading runs the object's constructors and its entry point: untrusted code. Only
/// sandboxed processes (workers and validators) load plug-ins; the host never does.
public final class PluginLibrary: @unchecked Sendable {
    // @unchecked: the handle and descriptor are immutable after init and the
    // descriptor is read-only by ABI contract.
    public let manifest: PluginManifest
    public let descriptor: UnsafePointer<iof_plugin>
    /// nil for a plug-in linked into this process.
    private let handle: UnsafeMutableRawPointer?

    /// dlopen's the object, calls its entry point and checks the descriptor against ABI v1.
    public init(path: String) throws(ValidationError) {
        dlerror()
        guard let handle = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            let reason = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            let short = Self.shorten(reason, path: path)
            let notELF = short.contains("invalid ELF header") || short.contains("file too short")
            throw .loadFailed(path: path, reason: notELF ? "not a shared object (\(short))" : "cannot load: \(short)")
        }
        guard let symbol = dlsym(handle, IOF_PLUGIN_ENTRY_SYMBOL) else {
            dlclose(handle)
            throw .loadFailed(path: path, reason: "does not export \(IOF_PLUGIN_ENTRY_SYMBOL); is it an iofilter plug-in?")
        }
        let entry = unsafeBitCast(symbol, to: (@convention(c) () -> UnsafePointer<iof_plugin>?).self)
        guard let declared = entry() else {
            dlclose(handle)
            throw .loadFailed(path: path, reason: "\(IOF_PLUGIN_ENTRY_SYMBOL)() returned NULL")
        }
        let descriptor = Self.extend(declared)
        do {
            self.manifest = try DescriptorReader.read(descriptor, path: path)
            try manifest.validate()
        } catch {
            dlclose(handle)
            throw error
        }
        self.handle = handle
        self.descriptor = descriptor
    }

    /// A plug-in linked into this process instead of loaded from a file (the chain
    /// engine's tests build their filters this way). Its descriptor is checked exactly
    /// like a loaded one's.
    public init(linkedDescriptor declared: UnsafePointer<iof_plugin>, name: String) throws(ValidationError) {
        let descriptor = Self.extend(declared)
        self.manifest = try DescriptorReader.read(descriptor, path: name)
        try manifest.validate()
        self.handle = nil
        self.descriptor = descriptor
    }

    /// The plug-in's management function for `operation`, if it declared one by that name.
    func managementFunction(named name: String) -> UnsafePointer<iof_mgmt_op>? {
        let plugin = descriptor.pointee
        guard let ops = plugin.mgmt_ops else { return nil }
        for index in 0..<Int(plugin.mgmt_op_count) where String(cString: ops[index].name) == name {
            return ops + index
        }
        return nil
    }

    /// The descriptor as this host's ABI lays it out: a plug-in built against an older
    /// minor declares a shorter struct (its struct_size), and reading the fields
    /// appended since would read past it. The copy holds the declared bytes and zeroes
    /// after them; it lives as long as the process, like the loaded object.
    private static func extend(_ declared: UnsafePointer<iof_plugin>) -> UnsafePointer<iof_plugin> {
        let copy = UnsafeMutablePointer<iof_plugin>.allocate(capacity: 1)
        copy.initialize(to: iof_plugin())
        let declaredSize = Int(UnsafeRawPointer(declared).loadUnaligned(as: UInt32.self))
        memcpy(copy, declared, min(declaredSize, MemoryLayout<iof_plugin>.size))
        return UnsafePointer(copy)
    }

    /// dlerror repeats the path; keep the reason.
    private static func shorten(_ reason: String, path: String) -> String {
        let prefix = path + ": "
        return reason.hasPrefix(prefix) ? String(reason.dropFirst(prefix.count)) : reason
    }
}
