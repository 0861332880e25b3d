import CSystemShims
import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging

/// What the server allows each client, so that idle, slow or hostile clients cannot
/// starve the ones doing work.
///
/// Clients that have negotiated are what `maxConnections` counts. Connections still
/// negotiating are bounded apart, in total and per peer (an address, or a local user):
/// one more evicts the oldest of them (of that peer first), so that a flood of
/// connections that never finish the handshake cannot keep a real client out — its
/// handshake takes milliseconds, the flood's would take the whole deadline.
public struct NBDServerLimits: Sendable, Equatable {
    /// A client must finish negotiating (greeting to NBD_OPT_GO) within this time.
    public var handshakeSeconds: Double
    /// Clients served at once once negotiated; one more is accepted and closed at once
    /// (a clean end, not a hang in the listen queue) and logged.
    public var maxConnections: Int
    /// Connections negotiating at once, and from one peer.
    public var maxNegotiating: Int
    public var maxNegotiatingPerPeer: Int
    /// Offer structured replies (and with them block status). Off, as nbdkit's --no-sr,
    /// for clients that read faster without them.
    public var structuredReplies: Bool

    public init(handshakeSeconds: Double = 5, maxConnections: Int = 16, maxNegotiating: Int = 64, maxNegotiatingPerPeer: Int = 16,
                structuredReplies: Bool = true) {
        self.handshakeSeconds = handshakeSeconds
        self.maxConnections = maxConnections
        self.maxNegotiating = maxNegotiating
        self.maxNegotiatingPerPeer = maxNegotiatingPerPeer
        self.structuredReplies = structuredReplies
    }
}

/// What a client negotiated, carried with its socket when a connection is handed to
/// another process (a worker replacing this one): the new server goes on with the
/// transmission phase as if it had negotiated it itself.
public struct NBDConnectionState: Codable, Sendable, Equatable {
    public var export: String
    public var structured: Bool
    public var baseAllocation: Bool
    /// Metadata contexts besides base:allocation, in the order of their ids (2, 3, ...).
    public var contexts: [String]
    /// Bytes of the next requests, received but not read yet.
    public var buffered: [UInt8]

    public init(export: String, structured: Bool, baseAllocation: Bool, contexts: [String], buffered: [UInt8]) {
        self.export = export
        self.structured = structured
        self.baseAllocation = baseAllocation
        self.contexts = contexts
        self.buffered = buffered
    }
}

/// A client's socket and what it negotiated, handed over.
public struct HandedOverConnection: Sendable {
    public let fd: Int32
    public let state: NBDConnectionState

    public init(fd: Int32, state: NBDConnectionState) {
        self.fd = fd
        self.state = state
    }
}

/// Serves a catalog of exports on listening sockets it is given. Each accepted client
/// gets its own thread, which negotiates and then serves requests with blocking I/O.
///
/// `stop` ends it in order: no new clients, every connection's reading side shut down
/// so that it answers what it accepted and ends, and only then does `stop` return,
/// so that the caller may close what the exports use.
public final class NBDServer: @unchecked Sendable {
    // @unchecked: the mutable state is guarded by `lock`; `wake` is set once in init.
    public let catalog: any NBDExportCatalog
    public let limits: NBDServerLimits
    let logger: Logger
    private let lock = ConditionLock()
    private var connections: [Int: Int32] = [:]  // (lock) id → socket
    private var transmitting: [Int: NBDConnection] = [:]  // (lock) id → its transmission phase, once there
    private var negotiating: [Int: (fd: Int32, peer: String, since: UInt64)] = [:]  // (lock) not negotiated yet
    private var admitted: Set<Int> = []  // (lock) negotiated (or being told so): what maxConnections counts
    private var evictions = 0  // (lock)
    private var detaching = false  // (lock) connections are being handed over
    private var detached: [HandedOverConnection] = []  // (lock)
    private var threads = 0  // (lock) accept and connection threads still running
    private var stopping = false  // (lock)
    private var nextID = 0  // (lock)
    /// A pipe whose read end wakes the accept threads when the server stops.
    private let wake = WakePipe()

    /// TLS every client must start before anything else (nil: plaintext).
    public let tls: (any NBDServerHandshake)?

    public init(catalog: any NBDExportCatalog, limits: NBDServerLimits = NBDServerLimits(), tls: (any NBDServerHandshake)? = nil, logger: Logger) {
        self.tls = tls
        self.catalog = catalog
        self.limits = limits
        self.logger = logger
    }

    /// Accepts clients on `listenFD` (a bound, listening socket) on a new thread until
    /// `stop`. The listening socket stays open: its owner (the supervisor) keeps it.
    public func serve(listenFD: Int32) {
        lock.withLock { threads += 1 }
        startThread(name: "nbd-accept") { [self] in
            acceptLoop(listenFD)
            finished(connection: nil)
        }
    }

    private func acceptLoop(_ listenFD: Int32) {
        var ready = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0), pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
        while true {
            if poll(&ready, nfds_t(wake.readFD >= 0 ? 2 : 1), -1) < 0 {
                if errno == EINTR { continue }
                logger.error("poll on the listening socket failed: \(SystemError("poll"))")
                return
            }
            if ready[1].revents != 0 || lock.withLock({ stopping }) { return }
            if ready[0].revents & Int16(POLLNVAL) != 0 {
                logger.error("the listening socket was closed under the server")
                return
            }
            let client = iof_accept_cloexec(listenFD)
            if client < 0 {
                switch errno {
                case EINTR, ECONNABORTED, EAGAIN: continue
                case EMFILE, ENFILE:
                    usleep(10_000)
                    continue
                default:
                    logger.error("accept failed: \(SystemError("accept"))")
                    return
                }
            }
            let tcp = Sockets.isTCP(client)
            if tcp { Sockets.setNoDelay(client) }
            let peer = Self.peer(of: client, tcp: tcp)
            enum Admission { case admitted(Int), full, stopping }
            let admission: Admission = lock.withLock {
                if stopping { return .stopping }
                if admitted.count >= limits.maxConnections { return .full }
                makeRoomToNegotiate(for: peer)
                nextID += 1
                connections[nextID] = client
                negotiating[nextID] = (client, peer, monotonicNanoseconds())
                threads += 1
                return .admitted(nextID)
            }
            let id: Int
            switch admission {
            case .admitted(let admitted): id = admitted
            case .full:
                logger.warning("refused a client: \(limits.maxConnections) clients are served, the most allowed")
                close(client)
                continue
            case .stopping:
                close(client)
                return
            }
            let deadline = monotonicNanoseconds() + UInt64(max(limits.handshakeSeconds, 0.001) * 1e9)
            startThread(name: "nbd-conn-\(id)") { [self] in
                var connectionLogger = logger
                connectionLogger[metadataKey: "conn"] = "\(id)"
                let ending = Handshake(fd: client, catalog: catalog, tls: tls, structuredReplies: limits.structuredReplies, deadline: deadline,
                                       logger: connectionLogger, admit: { [self] in admit(id) }) { [self] connection in
                    register(id, connection)
                }.run()
                finished(connection: id, client, ending)
            }
        }
    }

    /// Evicts the oldest connection still negotiating if `peer`, or everyone, has as
    /// many as allowed: its socket is shut down, which ends its handshake at once.
    /// Call with `lock` held.
    private func makeRoomToNegotiate(for peer: String) {
        let fromPeer = negotiating.filter { $0.value.peer == peer }
        let crowd = fromPeer.count >= limits.maxNegotiatingPerPeer ? fromPeer
            : negotiating.count >= limits.maxNegotiating ? negotiating : [:]
        guard let oldest = crowd.min(by: { $0.value.since < $1.value.since }) else { return }
        shutdown(oldest.value.fd, Int32(SHUT_RDWR))
        negotiating[oldest.key] = nil
        evictions += 1
        if evictions == 1 || evictions % 1000 == 0 {
            logger.warning("\(evictions) connection(s) that had not negotiated evicted for newer ones (\(crowd.count) negotiating\(crowd.count == fromPeer.count ? " from \(peer)" : ""))")
        }
    }

    /// Who a client is, for the limit of connections negotiating per peer: its address
    /// (TCP), or its user (a unix socket).
    static func peer(of fd: Int32, tcp: Bool) -> String {
        if tcp {
            var storage = sockaddr_storage()
            var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
            var host = [CChar](repeating: 0, count: Int(NI_MAXHOST))
            let named = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                    getpeername(fd, address, &length) == 0
                        && getnameinfo(address, length, &host, socklen_t(host.count), nil, 0, NI_NUMERICHOST) == 0
                }
            }
            return named ? String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "?"
        }
        let uid = iof_peer_uid(fd)
        return uid >= 0 ? "uid \(uid)" : "?"
    }

    /// A client is about to be told its export is ready: it counts against
    /// `maxConnections` from now on. False: as many clients are served as allowed
    /// (others finished negotiating meanwhile), and it is refused instead.
    private func admit(_ id: Int) -> Bool {
        lock.withLock {
            negotiating[id] = nil
            guard admitted.count < limits.maxConnections else {
                logger.warning("refused a client that finished negotiating: \(limits.maxConnections) clients are served, the most allowed")
                return false
            }
            admitted.insert(id)
            return true
        }
    }

    /// A connection reached its transmission phase (told to detach at once if the
    /// server is handing its clients over).
    private func register(_ id: Int, _ connection: NBDConnection, handedOver: Bool = false) {
        lock.withLock {
            negotiating[id] = nil
            if handedOver { admitted.insert(id) }
            transmitting[id] = connection
            if detaching { connection.requestDetach() }
        }
    }

    private func finished(connection id: Int?, _ client: Int32 = -1, _ ending: NBDConnection.Ending? = nil) {
        lock.withLock {
            if let id {
                connections[id] = nil
                transmitting[id] = nil
                negotiating[id] = nil
                admitted.remove(id)
            }
            if case .detached(let state) = ending {
                detached.append(HandedOverConnection(fd: client, state: state))
            } else if client >= 0 {
                // Closed only once `stop` can no longer see it: it must never shut
                // down a later file that reuses the number.
                close(client)
            }
            threads -= 1
            lock.broadcast()
        }
    }

    /// Goes on serving a client another process negotiated with (see `handOver`). The
    /// socket is the server's from now on; a client whose export is not offered here is
    /// closed (false).
    @discardableResult
    public func adopt(_ connection: HandedOverConnection) -> Bool {
        guard let export = catalog.export(named: connection.state.export) else {
            logger.warning("a handed-over client used export '\(connection.state.export)', which is not offered here; closing it")
            close(connection.fd)
            return false
        }
        let contexts = connection.state.contexts.compactMap { name in export.metadataContext(named: name).map { (name: name, context: $0) } }
        guard contexts.count == connection.state.contexts.count else {
            logger.warning("a handed-over client of '\(export.name)' chose metadata contexts not offered here (\(connection.state.contexts)); closing it")
            close(connection.fd)
            return false
        }
        _ = NBDConnection.installWakeHandler
        let id: Int? = lock.withLock {
            guard !stopping else { return nil }
            nextID += 1
            connections[nextID] = connection.fd
            threads += 1
            return nextID
        }
        guard let id else {
            close(connection.fd)
            return false
        }
        startThread(name: "nbd-conn-\(id)") { [self] in
            var connectionLogger = logger
            connectionLogger[metadataKey: "conn"] = "\(id)"
            let adopted = NBDConnection(fd: connection.fd, export: export, logger: connectionLogger, structured: connection.state.structured,
                                        baseAllocation: connection.state.baseAllocation, contexts: contexts, buffered: connection.state.buffered)
            register(id, adopted, handedOver: true)
            let ending = adopted.run()
            finished(connection: id, connection.fd, ending)
        }
        return true
    }

    /// Stops accepting and hands every client over: each connection answers the
    /// requests it read, stops at a request boundary, and comes back with its socket
    /// and what it negotiated (the caller's to pass on, or to close). Clients still
    /// negotiating get `timeout` to finish; clients of a TLS server cannot be handed
    /// over (the session's keys live in this process) and end as with `stop`.
    public func handOver(timeout seconds: Double = 10) -> [HandedOverConnection] {
        guard tls == nil else {
            stop(timeout: seconds)
            return []
        }
        _ = NBDConnection.installWakeHandler
        lock.withLock {
            stopping = true
            detaching = true
        }
        wake.wake()
        let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
        lock.withLock {
            while threads > 0 {
                // Again and again: a wake-up that lands just before a read blocks is lost.
                for connection in transmitting.values { connection.requestDetach() }
                let now = monotonicNanoseconds()
                if now >= deadline {
                    logger.warning("\(connections.count) connection(s) could not be handed over within \(seconds)s; closing them")
                    for fd in connections.values { shutdown(fd, Int32(SHUT_RDWR)) }
                    while threads > 0 { lock.wait() }
                    break
                }
                _ = lock.wait(nanoseconds: min(deadline - now, 2_000_000))
            }
        }
        return lock.withLock {
            defer { detached = [] }
            return detached
        }
    }

    /// Stops accepting, lets every connection answer the requests it accepted and end,
    /// and waits for all of their threads (up to `timeout`, then their sockets are shut
    /// down both ways and it waits for the threads to notice). Afterwards no thread of
    /// this server touches an export.
    public func stop(timeout seconds: Double = 30) {
        let open = lock.withLock {
            stopping = true
            return Array(connections.values)
        }
        wake.wake()
        for fd in open { shutdown(fd, Int32(SHUT_RD)) }
        lock.withLock {
            let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
            while threads > 0 {
                let now = monotonicNanoseconds()
                if now >= deadline {
                    logger.warning("\(connections.count) connection(s) still busy after \(seconds)s; shutting them down")
                    for fd in connections.values { shutdown(fd, Int32(SHUT_RDWR)) }
                    while threads > 0 { lock.wait() }
                    break
                }
                _ = lock.wait(nanoseconds: deadline - now)
            }
        }
    }
}

/// The fixed-newstyle negotiation phase for one client.
struct Handshake {
    /// The client's socket.
    let socket: Int32
    let catalog: any NBDExportCatalog
    /// When set, the client must start TLS before anything else.
    let tls: (any NBDServerHandshake)?
    let structuredReplies: Bool
    /// When negotiation must be over (monotonic nanoseconds).
    let deadline: UInt64
    let logger: Logger
    /// Asked before the client is told its export is ready; false: the server is
    /// full, and the client is refused.
    let admit: () -> Bool
    /// Told of the connection once negotiation is over.
    let onTransmission: (NBDConnection) -> Void

    private enum Outcome {
        case serve(any NBDExport)
        case close
    }

    /// What the client negotiated so far.
    private final class Negotiated {
        var structured = false
        var baseAllocation = false
        /// Contexts the export answers itself, in the order of their ids (2, 3, ...),
        /// and the export they were chosen for (a GO for another one drops them).
        var contexts: [(name: String, context: any NBDMetadataContext)] = []
        var contextsExport: String?
        /// After STARTTLS: the plaintext end of the TLS session, which the rest of the
        /// negotiation and the transmission phase use.
        var secured: Int32?
    }
    private let negotiated = Negotiated()

    /// Where the protocol's bytes go: the socket, or the TLS session's plaintext.
    private var fd: Int32 { negotiated.secured ?? socket }

    init(fd: Int32, catalog: any NBDExportCatalog, tls: (any NBDServerHandshake)?, structuredReplies: Bool = true, deadline: UInt64, logger: Logger,
         admit: @escaping () -> Bool = { true }, onTransmission: @escaping (NBDConnection) -> Void = { _ in }) {
        self.admit = admit
        self.onTransmission = onTransmission
        self.structuredReplies = structuredReplies
        self.socket = fd
        self.catalog = catalog
        self.tls = tls
        self.deadline = deadline
        self.logger = logger
    }

    func run() -> NBDConnection.Ending {
        var ending = NBDConnection.Ending.closed
        switch negotiate() {
        case .serve(let export):
            let chosen = negotiated.contextsExport == export.name
            let connection = NBDConnection(fd: fd, export: export, logger: logger, structured: negotiated.structured,
                                           baseAllocation: chosen && negotiated.baseAllocation,
                                           contexts: chosen ? negotiated.contexts : [])
            onTransmission(connection)
            ending = connection.run()
        case .close:
            break  // the server closes the socket
        }
        if let secured = negotiated.secured {
            close(secured)
            ending = .closed  // never: a TLS server hands nothing over
        }
        return ending
    }

    private func negotiate() -> Outcome {
        // Replies during the handshake are small; a client that does not read them
        // must not hold this thread past the deadline either.
        setSendTimeout(nanoseconds: deadline > monotonicNanoseconds() ? deadline - monotonicNanoseconds() : 1)
        defer { setSendTimeout(nanoseconds: 0) }
        do {
            var greeting = MessageWriter()
            greeting.u64(NBDProtocol.initMagic)
            greeting.u64(NBDProtocol.optionMagic)
            greeting.u16(NBDProtocol.HandshakeFlags.fixedNewstyle | NBDProtocol.HandshakeFlags.noZeroes)
            try FileDescriptorIO.writeAll(fd, greeting.bytes)

            guard let flagBytes = try readBytes(4), let clientFlags = MessageReader(flagBytes).first32() else { return .close }
            let known = NBDProtocol.ClientFlags.fixedNewstyle | NBDProtocol.ClientFlags.noZeroes
            guard clientFlags & ~known == 0, clientFlags & NBDProtocol.ClientFlags.fixedNewstyle != 0 else {
                logger.info("client flags \(clientFlags) not supported; closing")
                return .close
            }
            let noZeroes = clientFlags & NBDProtocol.ClientFlags.noZeroes != 0

            while true {
                guard let header = try readBytes(16) else { return .close }
                var reader = MessageReader(header)
                guard reader.u64() == NBDProtocol.optionMagic, let option = reader.u32(), let length = reader.u32() else {
                    logger.info("bad option magic; closing")
                    return .close
                }
                guard length <= NBDProtocol.maxOptionLength else {
                    logger.info("option \(option) of \(length) bytes is too long; closing")
                    return .close
                }
                guard let data = try readBytes(Int(length)) else { return .close }
                if let outcome = try handle(option: option, data: data, noZeroes: noZeroes) { return outcome }
            }
        } catch {
            if error.code == ETIMEDOUT || error.code == EAGAIN {
                logger.info("dropped a client that did not finish negotiating in time")
            } else {
                logger.debug("handshake ended: \(error)")
            }
            return .close
        }
    }

    /// 0 blocks without limit (the transmission phase).
    private func setSendTimeout(nanoseconds: UInt64) {
        var value = timeval(tv_sec: Int(nanoseconds / 1_000_000_000), tv_usec: Int(nanoseconds % 1_000_000_000 / 1000))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Returns an outcome when negotiation ends, nil to read the next option.
    private func handle(option rawOption: UInt32, data: [UInt8], noZeroes: Bool) throws(SystemError) -> Outcome? {
        guard let option = NBDProtocol.Option(rawValue: rawOption) else {
            try reply(rawOption, .errUnsupported, message: "option \(rawOption) is not supported")
            return nil
        }
        // With TLS configured, nothing but STARTTLS (or leaving) before it.
        if tls != nil && negotiated.secured == nil && option != .startTLS && option != .abort {
            if option == .exportName {
                logger.info("a client asked for an export without TLS; closing")
                return .close  // EXPORT_NAME has no error reply
            }
            try reply(rawOption, .errTLSRequired, message: "this server requires TLS: send STARTTLS first")
            return nil
        }
        switch option {
        case .exportName:
            let name = String(decoding: data, as: UTF8.self)
            guard let export = catalog.export(named: name) else {
                logger.info("client asked for unknown export '\(name)'")
                return .close  // the protocol has no error reply for EXPORT_NAME
            }
            guard admit() else { return .close }  // nor for a full server
            var message = MessageWriter()
            message.u64(export.size)
            message.u16(Self.transmissionFlags(export).rawValue)
            if !noZeroes { message.append([UInt8](repeating: 0, count: 124)) }
            try FileDescriptorIO.writeAll(fd, message.bytes)
            return .serve(export)

        case .abort:
            try? reply(rawOption, .ack)
            return .close

        case .list:
            guard data.isEmpty else {
                try reply(rawOption, .errInvalid, message: "LIST takes no data")
                return nil
            }
            for name in catalog.exportNames {
                var entry = MessageWriter()
                entry.u32(UInt32(name.utf8.count))
                entry.append(name)
                try reply(rawOption, .server, data: entry.bytes)
            }
            try reply(rawOption, .ack)
            return nil

        case .info, .go:
            var reader = MessageReader(data)
            guard let nameLength = reader.u32(), let name = reader.string(count: Int(nameLength)),
                let requestCount = reader.u16(), reader.remaining == Int(requestCount) * 2
            else {
                try reply(rawOption, .errInvalid, message: "malformed \(option == .go ? "GO" : "INFO") request")
                return nil
            }
            var requested: [UInt16] = []
            for _ in 0..<requestCount { requested.append(reader.u16() ?? 0) }
            guard let export = catalog.export(named: name) else {
                try reply(rawOption, .errUnknown, message: "no export named '\(name)'")
                return nil
            }
            var info = MessageWriter()
            info.u16(NBDProtocol.Info.export.rawValue)
            info.u64(export.size)
            info.u16(Self.transmissionFlags(export).rawValue)
            try reply(rawOption, .info, data: info.bytes)
            // Block sizes are always sent: clients that did not ask ignore them.
            var sizes = MessageWriter()
            sizes.u16(NBDProtocol.Info.blockSize.rawValue)
            sizes.u32(1)
            sizes.u32(4096)
            sizes.u32(UInt32(NBDProtocol.maxPayload))
            try reply(rawOption, .info, data: sizes.bytes)
            if requested.contains(NBDProtocol.Info.name.rawValue) {
                var named = MessageWriter()
                named.u16(NBDProtocol.Info.name.rawValue)
                named.append(export.name)
                try reply(rawOption, .info, data: named.bytes)
            }
            if option == .go && !admit() {
                try reply(rawOption, .errPolicy, message: "the server serves as many clients as it may; try again later")
                return nil
            }
            try reply(rawOption, .ack)
            return option == .go ? .serve(export) : nil

        case .startTLS:
            guard let tls else {
                try reply(rawOption, .errPolicy, message: "TLS is not offered; use a unix socket or a private network")
                return nil
            }
            guard data.isEmpty, negotiated.secured == nil else {
                try reply(rawOption, .errInvalid, message: negotiated.secured == nil ? "STARTTLS takes no data" : "TLS is already on")
                return nil
            }
            try reply(rawOption, .ack)
            let left = deadline > monotonicNanoseconds() ? deadline - monotonicNanoseconds() : 1_000_000
            switch tls.accept(socket, timeoutMilliseconds: Int32(min(left / 1_000_000, UInt64(Int32.max)))) {
            case .success(let plaintext):
                negotiated.secured = plaintext
                setSendTimeout(nanoseconds: left)
                return nil
            case .failure(let failure):
                logger.info("\(failure)")
                return .close
            }

        case .structuredReply:
            guard structuredReplies else {
                try reply(rawOption, .errUnsupported, message: "structured replies are turned off on this server")
                return nil
            }
            guard data.isEmpty else {
                try reply(rawOption, .errInvalid, message: "STRUCTURED_REPLY takes no data")
                return nil
            }
            negotiated.structured = true
            try reply(rawOption, .ack)
            return nil

        case .listMetaContext, .setMetaContext:
            try metaContext(rawOption, data: data, select: option == .setMetaContext)
            return nil

        case .extendedHeaders:
            try reply(rawOption, .errUnsupported, message: "extended headers are not supported")
            return nil
        }
    }

    /// LIST_META_CONTEXT and SET_META_CONTEXT: base:allocation for exports that answer
    /// block status, and the contexts an export answers itself (`qemu:dirty-bitmap:…`).
    /// LIST takes namespaces ("base:", "qemu:", "qemu:dirty-bitmap:") or full names; SET
    /// takes full names, and a name the export does not offer is left out of the answer
    /// (the protocol's way of saying no), with a line in the log.
    private func metaContext(_ option: UInt32, data: [UInt8], select: Bool) throws(SystemError) {
        guard negotiated.structured else {
            try reply(option, .errInvalid, message: "negotiate structured replies first")
            return
        }
        var reader = MessageReader(data)
        guard let nameLength = reader.u32(), let name = reader.string(count: Int(nameLength)), let count = reader.u32() else {
            try reply(option, .errInvalid, message: "malformed meta context request")
            return
        }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length = reader.u32(), let query = reader.string(count: Int(length)) else {
                try reply(option, .errInvalid, message: "malformed meta context query")
                return
            }
            queries.append(query)
        }
        guard reader.remaining == 0 else {
            try reply(option, .errInvalid, message: "trailing bytes in the meta context request")
            return
        }
        guard let export = catalog.export(named: name) else {
            try reply(option, .errUnknown, message: "no export named '\(name)'")
            return
        }
        var offered = export.features.blockStatus ? [NBDProtocol.baseAllocation] : []
        offered += export.metadataContextNames
        if select {
            negotiated.baseAllocation = false
            negotiated.contexts = []
            negotiated.contextsExport = export.name
            for query in queries {
                if query == NBDProtocol.baseAllocation && offered.contains(query) && !negotiated.baseAllocation {
                    negotiated.baseAllocation = true
                    try replyContext(option, id: NBDProtocol.baseAllocationID, name: query)
                } else if query != NBDProtocol.baseAllocation, let context = export.metadataContext(named: query),
                          !negotiated.contexts.contains(where: { $0.context === context }) {
                    negotiated.contexts.append((name: query, context: context))
                    try replyContext(option, id: NBDProtocol.baseAllocationID + UInt32(negotiated.contexts.count), name: query)
                } else if !offered.contains(query) {
                    logger.info("client asked for metadata context '\(query)', which export '\(export.name)' does not offer")
                }
            }
        } else {
            // An empty LIST asks for everything.
            let listed = queries.isEmpty ? offered : offered.filter { name in
                queries.contains { $0 == name || ($0.hasSuffix(":") && name.hasPrefix($0)) }
            }
            for context in listed { try replyContext(option, id: 0, name: context) }
        }
        try reply(option, .ack)
    }

    private func replyContext(_ option: UInt32, id: UInt32, name: String) throws(SystemError) {
        var entry = MessageWriter()
        entry.u32(id)
        entry.append(name)
        try reply(option, .metaContext, data: entry.bytes)
    }

    static func transmissionFlags(_ export: any NBDExport) -> NBDProtocol.TransmissionFlags {
        let features = export.features
        var flags: NBDProtocol.TransmissionFlags = [.hasFlags]
        if features.readOnly { flags.insert(.readOnly) }
        if features.flush { flags.insert(.sendFlush) }
        if features.fua && !features.readOnly { flags.insert(.sendFUA) }
        if features.trim && !features.readOnly { flags.insert(.sendTrim) }
        if features.writeZeroes && !features.readOnly { flags.insert(.sendWriteZeroes) }
        if features.multiConn { flags.insert(.canMultiConn) }
        if features.cache { flags.insert(.sendCache) }
        if features.fastZero && features.writeZeroes && !features.readOnly { flags.insert(.sendFastZero) }
        return flags
    }

    private func reply(_ option: UInt32, _ type: NBDProtocol.Reply, data: [UInt8] = [], message: String? = nil) throws(SystemError) {
        var payload = data
        if let message { payload = Array(message.utf8) }
        var header = MessageWriter()
        header.u64(NBDProtocol.optionReplyMagic)
        header.u32(option)
        header.u32(type.rawValue)
        header.u32(UInt32(payload.count))
        header.append(payload)
        try FileDescriptorIO.writeAll(fd, header.bytes)
    }

    private func readBytes(_ count: Int) throws(SystemError) -> [UInt8]? {
        try FileDescriptorIO.readBytes(fd, count: count, deadline: deadline)
    }
}
