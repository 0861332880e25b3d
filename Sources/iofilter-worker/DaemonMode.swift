// `iofilter-worker daemon`: a plug-in's partner daemon (its daemon_main), confined
// as a worker is.
import FoundationEssentials
import Glibc
import IOFilterChain
import IOFilterModel
import IOFilterPosix
import IOFilterSandbox
import IOFilterWire
import IOFilterWorkerRuntime
import Logging

/// Runs the daemon until daemon_main returns or SIGTERM.
@MainActor func runDaemon() -> Never {
    let (given, signals) = beginBoot(DaemonConfiguration.self, mode: "daemon", label: "iofilter.daemon") { ("plugin", $0.plugin.name) }
    var configuration = given
    configuration.stateDirectory = absolute(configuration.stateDirectory)
    configuration.plugin.path = absolute(configuration.plugin.path)
    try? FileManager.default.createDirectory(atPath: configuration.stateDirectory, withIntermediateDirectories: true)
    let listeners = [configuration.channelFD] + [configuration.peerFD].compactMap { $0 }
    if configuration.sandbox {
        closeInheritedFDs(keeping: listeners + [configuration.brokerFD, configuration.heartbeatFD, configuration.controlListenFD].compactMap { $0 })
    }
    let inCgroup = joinedCgroup(configuration.cgroupProcs, what: "daemon")
    if configuration.sandbox {
        // A worker's confinement: its own directory, its plug-in, the sockets it was
        // handed; no network but those and what the host's broker opens for it.
        confine {
            $0.readWritePaths = [configuration.stateDirectory]
            $0.readExecutePaths = [configuration.plugin.path]
            $0.keepFDsBelow = nil
            $0.pinnedFDs = listeners + [configuration.controlListenFD].compactMap { $0 }
            $0.outlivesSupervisor = configuration.controlListenFD != nil
            $0.addressSpaceLimit = inCgroup ? nil : configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit
            $0.hiddenPaths = configuration.hiddenPaths ?? []
            $0.identity = identity(configuration.identity ?? WorkerIdentity(for: "daemon:" + configuration.plugin.name))
            $0.ownPidNamespace = true
            $0.denySockets = configuration.brokerFD != nil
        }
    }
    enterStateDirectory(configuration.stateDirectory)
    let plugin: LoadedPlugin
    do {
        plugin = try DaemonRuntime.load(configuration)
    } catch {
        cannotStart(error)
    }
    let heartbeat = startHeartbeat(configuration.heartbeatFD)
    let daemonLogger = logger
    startThread(name: "signals") {
        let received = signals.wait()
        daemonLogger.info("signal \(received): stopping the daemon")
        exit(0)
    }
    say("READY")
    stopTalkingOnStdout()
    if let listener = configuration.controlListenFD {
        // Only a later host talks to a daemon: to reattach.
        let handBack = [configuration.heartbeatFD, listener].compactMap { $0 } + listeners
        serveControl(first: nil, listener: listener, name: configuration.plugin.name, brokerFD: configuration.brokerFD,
                     handBack: handBack, logger: logger) { _, fds in
            fds.forEach { close($0) }
            return (WorkerControlResponse(error: "a partner daemon answers only reattach"), [])
        }
    }
    let status = DaemonRuntime.run(plugin, channelFD: configuration.channelFD)
    logger.notice("daemon_main returned \(status)")
    withExtendedLifetime(heartbeat) {}
    exit(status == 0 ? 0 : 1)
}
