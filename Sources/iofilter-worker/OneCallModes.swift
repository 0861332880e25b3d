// `iofilter-worker validate` and `call`: one plug-in loaded, one answer printed as
// JSON, confined with nothing to read or write but the plug-in itself.
import FoundationEssentials
import Glibc
import IOFilterChain
import IOFilterModel
import IOFilterPluginLoader
import Logging

/// Prints the plug-in's manifest.
@MainActor func validatePlugin(_ pluginPath: String) -> Never {
    let path = absolute(pluginPath)
    confineForOneCall(plugin: path)
    do {
        let library = try PluginLibrary(path: path)
        emit(library.manifest)
        exit(0)
    } catch {
        emit(Failure(error))
        exit(2)
    }
}

/// Calls one management operation in a fresh process and prints its result.
@MainActor func callOperation(_ pluginPath: String, _ operation: String, _ operationArguments: [String]) -> Never {
    let path = absolute(pluginPath)
    confineForOneCall(plugin: path)
    do {
        let plugin = LoadedPlugin(library: try PluginLibrary(path: path))
        try plugin.load()
        let declared = plugin.library.manifest.operation(named: operation)
        let value = try plugin.library.callManagementOperation(operation, arguments: operationArguments)
        emit(CallResult(type: declared?.returnType.rawValue ?? "void", value: value.description))
        exit(0)
    } catch let error as ValidationError {
        emit(Failure(error))
        exit(2)
    } catch {
        emit(Failure(message: "\(error)"))
        exit(2)
    }
}
