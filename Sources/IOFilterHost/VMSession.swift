import Foundation
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// One VM served: the listening sockets the host owns (one per disk), the supervised
/// worker they are handed to, and the links to the host's partner daemons. The one
/// assembly iofilterd uses for a VM or an offline session and `iofilter serve` uses for
/// its disk, so both run a worker the same way.
public final class VMSession: @unchecked Sendable {
    // @unchecked: fixed after init; the supervisor guards its own state.

    /// Where one disk is served.
    public struct Listener: Sendable {
        public let disk: String
        public let fd: Int32
        /// The unix socket's path (nil on TCP), removed when the session ends.
        public let socketPath: String?
        public let uri: NBDURI
        /// Where a guest's vhost-user-blk front-end reaches the disk too (nil: NBD only).
        public var vhostUser: VhostUserSocket?

        /// A unix socket at `path` (an old one there is replaced).
        public static func unix(disk: String, path: String) throws(SystemError) -> Listener {
            unlink(path)
            return Listener(disk: disk, fd: try Sockets.listenUnix(path: path), socketPath: path, uri: .unix(socket: path, export: disk))
        }

        public static func tcp(disk: String, host: String, port: UInt16) throws(SystemError) -> Listener {
            let fd = try Sockets.listenTCP(host: host, port: port)
            return Listener(disk: disk, fd: fd, socketPath: nil, uri: .tcp(host: host, port: Sockets.localPort(fd), export: disk))
        }

        public func close() {
            Glibc.close(fd)
            if let socketPath { unlink(socketPath) }
            vhostUser?.close()
        }
    }

    /// A listening socket for a vhost-user-blk front-end (QEMU's `-chardev socket,path=`).
    public struct VhostUserSocket: Sendable {
        public let fd: Int32
        public let path: String

        /// Listens at `path`. Unlike an NBD socket, a path that holds anything but a
        /// socket nobody serves is refused: a guest's disk socket is named in a VM's
        /// definition, and taking another's would hand its guest our disk.
        public static func listen(path: String) throws(SupervisorError) -> VhostUserSocket {
            var status = stat()
            if lstat(path, &status) == 0 {
                guard status.st_mode & S_IFMT == S_IFSOCK else {
                    throw SupervisorError(message: "\(path) exists and is not a socket; choose another path for the vhost-user-blk socket")
                }
                if let probe = try? Sockets.connectUnix(path: path) {
                    Glibc.close(probe)
                    throw SupervisorError(message: "\(path) is served by another process; choose another path for the vhost-user-blk socket")
                }
                unlink(path)  // a socket its server left behind
            }
            do {
                return VhostUserSocket(fd: try Sockets.listenUnix(path: path, backlog: 4), path: path)
            } catch {
                throw SupervisorError(message: "cannot listen on \(path): \(error)")
            }
        }

        public func close() {
            Glibc.close(fd)
            unlink(path)
        }
    }

    /// Where a later host reaches the worker, and where the worker that serves is
    /// recorded for it (a VM's worker outlives its host; an offline one does not).
    public struct Continuity: Sendable {
        public let controlSocket: String
        public let recordPath: String
        /// The listening control socket (the session owns it: closed by `stop`).
        let listener: Int32

        /// Listens at `controlSocket` (an old socket there is replaced).
        public static func listen(controlSocket: String, recordPath: String) throws(SystemError) -> Continuity {
            unlink(controlSocket)
            return Continuity(controlSocket: controlSocket, recordPath: recordPath, listener: try Sockets.listenUnix(path: controlSocket))
        }

        func close() {
            Glibc.close(listener)
            unlink(controlSocket)
        }
    }

    public let supervisor: WorkerSupervisor
    public let listeners: [Listener]
    public let continuity: Continuity?
    /// Its clients must start TLS (the URIs say nbds).
    public var tls: Bool { supervisor.configuration.tls != nil }
    public let startedAt = Date()

    /// - Parameters:
    ///   - listeners: one per disk, in the order of `configuration.disks`; the session
    ///     owns them from here on (closed by `stop`, or by a failed `start`).
    ///   - backoffLimit: the longest wait before a crashed worker is restarted.
    ///   - daemonChannels: connects a filter instance to its plug-in's daemon.
    ///   - continuity: for a worker that outlives this host (the session owns it).
    ///   - adopting: the pid of the worker an earlier host left serving on these
    ///     listeners (then `start(adopting:)`, not `start`).
    public init(configuration: WorkerConfiguration, listeners: [Listener], continuity: Continuity? = nil, adopting: pid_t? = nil,
                backoffLimit: Double? = nil, logger: Logger,
                daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?,
                onEvent: (@Sendable (_ kind: SupervisorEvent, _ message: String) -> Void)? = nil) {
        precondition(listeners.map(\.disk) == configuration.disks.map(\.name), "one listener per disk, in order")
        self.listeners = listeners
        self.continuity = continuity
        supervisor = WorkerSupervisor(configuration: configuration, listenFDs: listeners.map(\.fd), vhostUserFDs: listeners.map { $0.vhostUser?.fd },
                                      outlivingHost: continuity.map { ($0.listener, $0.recordPath) }, adopting: adopting, logger: logger)
        if let backoffLimit { supervisor.restartPolicy.maximumBackoff = max(backoffLimit, supervisor.restartPolicy.minimumBackoff) }
        supervisor.onEvent = onEvent
        supervisor.daemonChannels = daemonChannels
    }

    /// Starts the worker and waits until it serves; on failure nothing is left
    /// listening.
    public func start() throws(SupervisorError) {
        do {
            try supervisor.start()
        } catch {
            listeners.forEach { $0.close() }
            continuity?.close()
            throw error
        }
    }

    /// Takes over the worker an earlier host left serving `configuration` (found by
    /// its record): reattaches to it through its control socket, and serves on with
    /// the listening sockets it hands back, checked to be the ones at `socketPaths` (and,
    /// per disk, at `vhostUserPaths` where it has one).
    /// On failure nothing of it is kept, and the caller stops it (`leftover.stop`).
    public static func adopt(_ leftover: LeftoverProcess, configuration: WorkerConfiguration, socketPaths: [String], vhostUserPaths: [String?] = [],
                             controlSocket: String, recordPath: String, backoffLimit: Double? = nil, logger: Logger,
                             daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?,
                             onEvent: (@Sendable (_ kind: SupervisorEvent, _ message: String) -> Void)? = nil)
        throws(SupervisorError) -> VMSession
    {
        guard leftover.record.key == configuration.adoptionKey else {
            throw SupervisorError(message: "it serves another configuration than this host would start")
        }
        let expected = socketPaths.indices.flatMap { index in
            [socketPaths[index]] + (vhostUserPaths.indices.contains(index) ? [vhostUserPaths[index]].compactMap { $0 } : [])
        }
        let broker: Int32
        do {
            broker = try WorkerSupervisor.startBroker(for: configuration, logger: logger, daemonChannels: daemonChannels)
        } catch {
            throw SupervisorError(message: "cannot start its broker: \(error)")
        }
        let reattachment: Reattachment
        do {
            defer { close(broker) }
            reattachment = try leftover.reattach(socket: controlSocket, name: configuration.vmName, listeners: expected.count, broker: broker)
        }
        let handedBack = [reattachment.controlListener] + reattachment.listeners
        guard handedBack.count == expected.count + 1,
              zip(handedBack, [controlSocket] + expected).allSatisfy({ Sockets.listeningUnixPath($0) == $1 }) else {
            handedBack.forEach { close($0) }
            close(reattachment.control)
            throw SupervisorError(message: "the sockets it handed back are not its listeners at \(expected.joined(separator: ", "))")
        }
        // In the worker's order: each disk's NBD socket, then its vhost-user-blk one.
        var fds = reattachment.listeners.makeIterator()
        let listeners = configuration.disks.indices.map { index -> Listener in
            let disk = configuration.disks[index].name, path = socketPaths[index]
            var listener = Listener(disk: disk, fd: fds.next()!, socketPath: path, uri: .unix(socket: path, export: disk))
            if let vhost = vhostUserPaths.indices.contains(index) ? vhostUserPaths[index] : nil {
                listener.vhostUser = VhostUserSocket(fd: fds.next()!, path: vhost)
            }
            return listener
        }
        let continuity = Continuity(controlSocket: controlSocket, recordPath: recordPath, listener: reattachment.controlListener)
        let session = VMSession(configuration: configuration, listeners: listeners, continuity: continuity, adopting: leftover.record.pid,
                                backoffLimit: backoffLimit, logger: logger, daemonChannels: daemonChannels, onEvent: onEvent)
        do {
            try session.supervisor.start(adopting: reattachment)
        } catch {
            listeners.forEach {
                Glibc.close($0.fd)
                if let vhost = $0.vhostUser { Glibc.close(vhost.fd) }
            }
            continuity.close()
            throw error
        }
        return session
    }

    /// Starts a worker that stands by to take over the clients of the session that
    /// owns these listeners (see `WorkerConfiguration.standby`); on failure the
    /// listeners stay open, its predecessor's still.
    public func startStandby() throws(SupervisorError) {
        try supervisor.start(standby: true)
    }

    /// Stops the worker of a session whose listeners a successor took over (they stay
    /// open), or a standby worker that was not needed.
    public func retire(timeout: Double = 20) {
        supervisor.stop(timeout: timeout)
    }

    /// The disk's NBD URI.
    public func uri(_ disk: String) -> String? {
        listeners.first { $0.disk == disk }.map { $0.uri.description(tls: tls) }
    }

    /// The URI of another export `disk`'s server offers (a snapshot its worker made).
    public func uri(_ disk: String, export: String) -> String? {
        listeners.first { $0.disk == disk }.map { listener -> String in
            switch listener.uri {
            case .unix(let socket, _): NBDURI.unix(socket: socket, export: export).description(tls: tls)
            case .tcp(let host, let port, _): NBDURI.tcp(host: host, port: port, export: export).description(tls: tls)
            }
        }
    }

    /// Stops the worker (its filters flush, destage and close first), then the listeners;
    /// a worker that takes longer than `timeout` seconds is killed.
    public func stop(timeout: Double = 20) {
        supervisor.stop(timeout: timeout)
        listeners.forEach { $0.close() }
        continuity?.close()
    }
}
