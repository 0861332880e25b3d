// `iofilter-worker serve`: a VM's disks through their chains over NBD, or a
// maintenance task on them (attach, detach, a lifecycle event).
import FoundationEssentials
import Glibc
import IOFilterChain
import IOFilterModel
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPosix
import IOFilterSandbox
import IOFilterVhostUser
import IOFilterWire
import IOFilterWorkerRuntime
import Logging

/// Serves the disks the host's configuration names until SIGTERM.
@MainActor func serveDisks() -> Never {
    let (given, signals) = beginBoot(WorkerConfiguration.self, mode: "serve", label: "iofilter.worker") { ("vm", $0.vmName) }
    var configuration = given

    configuration.stateDirectory = absolute(configuration.stateDirectory)
    var ownDirectories = [configuration.stateDirectory]
    for index in configuration.disks.indices {
        for filter in configuration.disks[index].filters.indices {
            configuration.disks[index].filters[filter].manifest.path = absolute(configuration.disks[index].filters[filter].manifest.path)
        }
        if let directory = configuration.disks[index].stateDirectory {
            configuration.disks[index].stateDirectory = absolute(directory)
            ownDirectories.append(absolute(directory))
        }
    }
    for directory in ownDirectories {
        try? FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
    }
    if configuration.sandbox {
        closeInheritedFDs(keeping: configuration.disks.flatMap(\.listenFDs)
                          + [configuration.controlFD, configuration.heartbeatFD, configuration.brokerFD, configuration.controlListenFD,
                             configuration.tlsTerminatorFD].compactMap { $0 })
    }
    // The cgroup that limits this worker and everything it will ever be (its pid
    // namespace's init included), joined first, while this is still one thread (see
    // CgroupMembership.join); what opening the disks allocates counts there too.
    let inCgroup = joinedCgroup(configuration.cgroupProcs, what: "worker")
    let runtime = WorkerRuntime(configuration: configuration, logger: logger)
    do {
        // Disks first: once confined, the worker has no path to them and no network.
        try runtime.openBackends()
    } catch {
        cannotStart(error)
    }
    // TLS sessions are the terminator's, and so are the keys: the worker only passes it
    // the clients that asked for STARTTLS.
    var tls: TLSTerminatorLink?
    if configuration.tls != nil {
        guard let channel = configuration.tlsTerminatorFD else {
            cannotStart(NBDError(description: "TLS is required, but the host started no TLS terminator for this worker"))
        }
        tls = TLSTerminatorLink(channel: channel)
    }
    if configuration.sandbox {
        let memoryLimit = configuration.memoryLimit ?? WorkerConfiguration.defaultMemoryLimit
        confine {
            $0.readWritePaths = ownDirectories
            $0.readExecutePaths = configuration.disks.flatMap { $0.filters.map(\.manifest.path) }
            $0.keepFDsBelow = nil  // closed above, before the disks were opened
            $0.pinnedFDs = (configuration.disks.flatMap(\.listenFDs) + [configuration.controlListenFD, configuration.tlsTerminatorFD].compactMap { $0 })
                .filter { $0 >= 0 }
            $0.outlivesSupervisor = configuration.controlListenFD != nil
            // The cgroup limits memory as the kernel accounts it; an address-space limit
            // would only refuse a filter's large but harmless reservations.
            $0.addressSpaceLimit = inCgroup ? nil : memoryLimit
            $0.hiddenPaths = configuration.hiddenPaths ?? []
            $0.identity = identity(configuration.identity ?? WorkerIdentity(for: configuration.vmName))
            $0.ownPidNamespace = true
            // Targets come through the host's broker; without one (a host that
            // predates it) the filters open their own.
            $0.denySockets = configuration.brokerFD != nil
        }
        if inCgroup, let summary = configuration.cgroupSummary {
            logger.notice("this worker is limited by its \(summary)")
        } else {
            logger.notice("no cgroup for this worker: its memory is limited by RLIMIT_AS to \(memoryLimit >> 20) MiB")
        }
    }
    enterStateDirectory(configuration.stateDirectory)
    do {
        try runtime.loadPlugins()
    } catch {
        cannotStart(error)
    }
    var guests: [VhostUserBlkServer] = []
    func startServing() throws -> [NBDServer] {
        _ = try runtime.openDisks(attachOnly: configuration.task == .attach)
        if configuration.task != .serve { runMaintenanceTask(configuration.task, runtime: runtime) }
        for (disk, catalog) in zip(configuration.disks, runtime.catalogs) {
            guard let listenFD = disk.vhostUserListenFD, listenFD >= 0 else { continue }
            let guest = VhostUserBlkServer(export: ChainVirtioExport(chain: catalog.disk.chain, readOnly: disk.readOnly),
                                           queues: UInt16(clamping: disk.vhostUserQueues ?? 1), serial: disk.name, logger: logger)
            guest.serve(listenFD: listenFD)
            guests.append(guest)
        }
        var servers: [NBDServer] = []
        for (disk, catalog) in zip(configuration.disks, runtime.catalogs) {
            var limits = NBDServerLimits()
            if let maxConnections = configuration.maxConnections { limits.maxConnections = maxConnections }
            if let handshakeSeconds = configuration.handshakeSeconds { limits.handshakeSeconds = handshakeSeconds }
            if let structuredReplies = configuration.structuredReplies { limits.structuredReplies = structuredReplies }
            let server = NBDServer(catalog: catalog, limits: limits, tls: tls, logger: logger)
            server.serve(listenFD: disk.listenFD)
            servers.append(server)
        }
        return servers
    }
    let heartbeat: Heartbeat?
    let servers: [NBDServer]
    if configuration.standby == true, let controlFD = configuration.controlFD {
        // Plug-ins loaded and checked: ready to take over. The disks open only once the
        // worker being replaced has closed its filters (a filter's files are its alone).
        heartbeat = startHeartbeat(configuration.heartbeatFD) { runtime.oldestInFlight() }
        say("READY")
        servers = adoptClients(controlFD: controlFD, startServing: startServing)
    } else {
        do {
            servers = try startServing()
        } catch {
            cannotStart(error)
        }
        heartbeat = startHeartbeat(configuration.heartbeatFD) { runtime.oldestInFlight() }
        say("READY")
    }
    stopTalkingOnStdout()
    let workerLogger = logger
    tls?.watch {
        // Rather than refuse every TLS client from now on: the host starts this worker
        // anew, and a new terminator with it.
        workerLogger.critical("the TLS terminator has ended: no client could start TLS; exiting to be started anew")
        exit(75)
    }
    serveControl(configuration, runtime: runtime, servers: servers, guests: guests, logger: logger)
    runtime.startWatchdog()
    let received = signals.wait()
    // In order: no new clients, every connection answers what it accepted and ends,
    // and only then are filters closed (never while a request runs in one of them).
    logger.info("signal \(received): finishing requests, then closing filters and disks")
    for guest in guests { guest.stop() }
    for server in servers { server.stop() }
    runtime.shutdown()
    withExtendedLifetime(heartbeat) {}
    exit(0)
}

/// A standby worker's take-over: waits for the host's `adopt` with the old worker's
/// clients, opens its disks (the old worker has closed them), and goes on serving each
/// client where it was. A worker that cannot open its disks says why and exits (the
/// host then gives the clients to a worker with the old chain).
@MainActor func adoptClients(controlFD: Int32, startServing: () throws -> [NBDServer]) -> [NBDServer] {
    var servers: [NBDServer]?
    var failure: (any Error)?
    ControlChannel(fd: controlFD).answerOne { request, fds in
        guard case .adopt(let states) = request, states.count == fds.count else {
            fds.forEach { close($0) }
            return (WorkerControlResponse(error: "a standby worker takes only the clients it is handed"), [])
        }
        do {
            servers = try startServing()
        } catch {
            failure = error
            fds.forEach { close($0) }
            return (WorkerControlResponse(error: "\(error)"), [])
        }
        var adopted = 0
        for (fd, encoded) in zip(fds, states) {
            guard let state = try? JSONDecoder().decode(NBDConnectionState.self, from: Data(encoded.utf8)) else {
                close(fd)
                continue
            }
            let server = servers?.first { $0.catalog.export(named: state.export) != nil } ?? servers?.first
            if server?.adopt(HandedOverConnection(fd: fd, state: state)) == true { adopted += 1 }
        }
        logger.info("took over \(adopted) client(s) of \(fds.count)")
        return (WorkerControlResponse(adopted: adopted), [])
    }
    guard let servers else { cannotStart(failure ?? ChainError.backend("the host handed over no clients")) }
    return servers
}

/// A maintenance run: the filters are attached by now; detach what was asked, or
/// deliver the event, then exit (DONE on success, an ERROR line otherwise).
@MainActor func runMaintenanceTask(_ task: WorkerTask, runtime: WorkerRuntime) -> Never {
        var status: Int32 = 0
        if case .detach(let plugins) = task {
            do {
                try runtime.detach(plugins: Set(plugins))
            } catch {
                logger.error("cannot detach: \(error)")
                say("ERROR \(error)")
                status = 73
            }
        }
        if case .event(let event) = task {
            do {
                try runtime.deliver(event, disk: nil)
            } catch {
                say("ERROR \(error)")
                if case .vetoed = error { status = WorkerTask.vetoedExitStatus } else { status = 73 }
            }
        }
        runtime.shutdown()
        if status == 0 { say("DONE") }
        exit(status)
}

/// Answers the host's control requests: those of the host that started it, and then
/// of each host that reattaches to it.
func serveControl(_ configuration: WorkerConfiguration, runtime: WorkerRuntime, servers: [NBDServer], guests: [VhostUserBlkServer],
                  logger: Logger) {
    let handBack = [configuration.heartbeatFD, configuration.controlListenFD].compactMap { $0 } + configuration.disks.flatMap(\.listenFDs)
    serveControl(first: configuration.controlFD, listener: configuration.controlListenFD, name: configuration.vmName,
                 brokerFD: configuration.brokerFD, handBack: handBack, logger: logger) { request, fds in
        fds.forEach { close($0) }
        var response = WorkerControlResponse()
        switch request {
        case .handOver:
            // A guest's front-end is not handed over: it reconnects to the same socket,
            // and the requests it had in flight go to the next worker from its
            // inflight region.
            for guest in guests { guest.stop() }
            return handOver(runtime: runtime, servers: servers, logger: logger)
        case .adopt:
            response.error = "this worker serves already; only a standby worker adopts clients"
        case .reattach:
            break  // answered by the channel itself
        case .stats:
            response.disks = runtime.statistics()
        case .call(let plugin, let operation, let arguments):
            do {
                response.result = try runtime.call(plugin: plugin, operation: operation, arguments: arguments)
            } catch {
                response.error = "\(error)"
            }
        case .event(let disk, let event):
            do {
                try runtime.deliver(event, disk: disk)
            } catch {
                response.error = "\(error)"
            }
        case .snapshot(let disk, let name, let options):
            do {
                response.snapshot = try runtime.takeSnapshot(of: disk, name: name, options: options)
            } catch {
                response.error = "\(error)"
            }
        case .snapshotStatus(let name):
            do {
                response.snapshot = try runtime.snapshotProgress(name)
            } catch {
                response.error = "\(error)"
            }
        case .releaseSnapshot(let name):
            do {
                try runtime.releaseSnapshot(name)
            } catch {
                response.error = "\(error)"
            }
        case .checkpoint(let disk, let change):
            do {
                try runtime.changeCheckpoint(of: disk, change)
            } catch {
                response.error = "\(error)"
            }
        }
        return (response, [])
    }
}

/// The worker being replaced: its clients stop at a request boundary with every
/// request they sent answered, the filters and disks close (nothing runs in them any
/// more), and the clients' sockets go to the host with what each negotiated.
func handOver(runtime: WorkerRuntime, servers: [NBDServer], logger: Logger) -> (WorkerControlResponse, [Int32]) {
    let started = monotonicNanoseconds()
    let connections = servers.flatMap { $0.handOver() }
    runtime.shutdown()
    let states = connections.map { String(decoding: (try? JSONEncoder().encode($0.state)) ?? Data(), as: UTF8.self) }
    logger.info("handed over \(connections.count) client(s) in \((monotonicNanoseconds() - started) / 1_000_000) ms; filters and disks closed")
    return (WorkerControlResponse(handedOver: states), connections.map(\.fd))
}

