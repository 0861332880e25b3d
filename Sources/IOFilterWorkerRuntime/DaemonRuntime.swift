import CIOFilter
import Glibc
import IOFilterChain
import IOFilterModel
import IOFilterPluginLoader
import Logging

/// Runs a plug-in's partner daemon in this (confined) process: loads the plug-in as a
/// worker would, then hands `daemon_main` the host's services and the listening socket
/// its filters' channels arrive on.
public enum DaemonRuntime {
    /// Loads the plug-in and calls its `load`; throws what a worker would.
    public static func load(_ configuration: DaemonConfiguration) throws -> LoadedPlugin {
        HostServices.configureDaemon(plugin: configuration.plugin.name, brokerFD: configuration.brokerFD, peerFD: configuration.peerFD,
                                     settings: configuration.settings)
        let plugin = LoadedPlugin(library: try PluginLibrary(path: configuration.plugin.path))
        guard plugin.library.descriptor.pointee.daemon_main != nil else {
            throw ChainError.backend("\(configuration.plugin.name) has no daemon_main")
        }
        try plugin.load()
        return plugin
    }

    /// Calls `daemon_main`, which runs for as long as the daemon does; returns its result.
    public static func run(_ plugin: LoadedPlugin, channelFD: Int32) -> Int32 {
        plugin.library.descriptor.pointee.daemon_main!(HostServices.table, channelFD)
    }
}
