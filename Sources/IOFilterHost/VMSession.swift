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
        }
    }

    public let supervisor: WorkerSupervisor
    public let listeners: [Listener]
    /// Its clients must start TLS (the URIs say nbds).
    public var tls: Bool { supervisor.configuration.tls != nil }
    public let startedAt = Date()

    /// - Parameters:
    ///   - listeners: one per disk, in the order of `configuration.disks`; the session
    ///     owns them from here on (closed by `stop`, or by a failed `start`).
    ///   - backoffLimit: the longest wait before a crashed worker is restarted.
    ///   - daemonChannels: connects a filter instance to its plug-in's daemon.
    public init(configuration: WorkerConfiguration, listeners: [Listener], backoffLimit: Double? = nil, logger: Logger,
                daemonChannels: (@Sendable (_ plugin: String) -> Result<Int32, TargetBroker.Failure>)?,
                onEvent: (@Sendable (_ kind: SupervisorEvent, _ message: String) -> Void)? = nil) {
        precondition(listeners.map(\.disk) == configuration.disks.map(\.name), "one listener per disk, in order")
        self.listeners = listeners
        supervisor = WorkerSupervisor(configuration: configuration, listenFDs: listeners.map(\.fd), logger: logger)
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
            throw error
        }
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
    }
}
