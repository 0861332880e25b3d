import CIOFilter
import Glibc
internal import IOFilterNBD
import Logging

/// A plug-in's partner daemon: host-wide work (one stream to a remote site for every
/// VM, a shared cache device, peers on other hosts) in a sandboxed process of its own,
/// one per host, that every filter instance of the plug-in reaches over its channel
/// (`Disk.daemonChannel()`).
///
/// Declare it in `FilterMetadata(daemon:)`. The host restarts it (with backoff) when it
/// returns or crashes; its current directory is its own, kept across restarts.
public struct PartnerDaemon: Sendable {
    /// The daemon accepts peers on other hosts where the operator allows it
    /// (IOF_DAEMON_LISTENS; `iofilter plugin daemon-listen`).
    public var listensForPeers: Bool
    /// The daemon's body: accept the filters' channels on `host.channels` (and peers on
    /// `host.peerListener`) for as long as it runs; the value returned is its exit status.
    public var main: @Sendable (DaemonHost) -> Int32

    public init(listensForPeers: Bool = false, main: @escaping @Sendable (DaemonHost) -> Int32) {
        self.listensForPeers = listensForPeers
        self.main = main
    }
}

/// What the host offers a partner daemon.
public struct DaemonHost: Sendable {
    /// The listening socket the filters' channels arrive on (accept(2) them).
    public let channels: Int32

    /// The listening TCP socket for peers on other hosts, if the operator allowed one.
    public var peerListener: Int32? {
        guard let services = Host.servicesSince(minor: 3), let listener = services.pointee.peer_listener else { return nil }
        let fd = listener()
        return fd >= 0 ? fd : nil
    }

    /// One of the daemon's settings (`listen`: the address it accepts peers on).
    public func setting(_ key: String) -> String? {
        Host.services?.pointee.param(nil, key).map { String(cString: $0) }
    }

    /// A connection to a peer daemon on another host: `iofilter://HOST:PORT/…`, which a
    /// policy using this plug-in must name (the host opens it; a daemon has no network
    /// of its own). The caller owns the fd.
    public func connect(toPeer target: String) throws(FilterError) -> Int32 {
        guard let fd = try openTarget(target) else { throw FilterError(ENOSYS, "this host cannot open targets for a daemon") }
        return fd
    }

    /// A disk of this host kept as a replica (created the first time, grown if `size`
    /// is larger): a read-write fd the caller owns. Refused (EEXIST) for a disk that is
    /// not this plug-in's replica, such as one the operator promoted.
    public func openReplica(named name: String, size: UInt64) throws(FilterError) -> Int32 {
        guard let services = Host.servicesSince(minor: 3), let open = services.pointee.open_replica else {
            throw FilterError(ENOSYS, "this host keeps no replica disks (ABI 1.3)")
        }
        let fd = open(name, size)
        guard fd >= 0 else { throw FilterError(-fd, "the host would not open replica \(name): \(String(cString: strerror(-fd)))") }
        return fd
    }

    public func log(_ level: Disk.LogLevel, _ message: String) {
        Host.services?.pointee.log(nil, level.abi, message)
    }
}

extension Disk {
    /// This filter instance's channel to its plug-in's daemon, or nil while there is
    /// none (no daemon declared, or it is restarting). The fd belongs to the host: do
    /// not close it, and ask again rather than keep it (after the daemon's restart the
    /// next call gives a fresh one).
    public func daemonChannel() -> Int32? {
        guard let channel = Host.services?.pointee.daemon_channel else { return nil }
        let fd = channel(handle)
        return fd >= 0 ? fd : nil
    }
}

/// An NBD export reached over a connected stream socket (a peer daemon's, say): the
/// NBD handshake runs on `fd`, which the target then owns. A request left unanswered
/// for `requestTimeout` seconds (a cut link, a hung peer) fails with ETIMEDOUT, and so
/// does everything else in flight: the target is then closed, and you reconnect.
public func openNBDTarget(connected fd: Int32, export: String, description: String, tls: TargetTLS? = nil,
                          requestTimeout: Double? = defaultRequestTimeout) throws(FilterError) -> any BlockTarget {
    do {
        let client = try NBDClient(uri: .unix(socket: description, export: export), connected: fd, tls: tls?.handshake,
                                   requestTimeout: requestTimeout, logger: Logger(label: "iofilter.sdk.target"))
        return NBDTarget(client: client)
    } catch {
        throw FilterError(EIO, "NBD handshake with \(description) failed: \(error)")
    }
}

