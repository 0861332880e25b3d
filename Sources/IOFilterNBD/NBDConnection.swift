import Glibc
import IOFilterPosix
import Logging
import Synchronization

/// The transmission phase of one client.
///
/// The connection's thread reads requests in batches, hands each to the export, and
/// collects the replies of requests the export finished inline; when it runs out of
/// buffered requests it sends all those replies with one writev. A request the export
/// defers is answered by whichever thread completes it, under `lock`, so a slow request
/// never holds up the ones behind it.
final class NBDConnection: @unchecked Sendable {
    // @unchecked: fields marked (conn) are touched only by the connection's thread;
    // fields marked (lock) only with `lock` held. The (conn) fields skip dynamic
    // exclusivity checks: one thread owns them, and the checks showed in profiles.
    let fd: Int32
    let export: any NBDExport
    let logger: Logger
    let exportSize: UInt64
    let features: NBDExportFeatures

    // Big enough to batch many small requests, small enough that a large write payload
    // is mostly read straight into its request buffer rather than copied through here.
    static let receiveCapacity = 64 << 10
    static let maxBatch = 64
    static let maxBatchBytes = 2 << 20
    static let maxInFlight = 256
    static let pollsBeforeBlocking = 20

    private let receive: UnsafeMutableRawPointer  // (conn)
    @exclusivity(unchecked) private var receiveStart = 0  // (conn)
    @exclusivity(unchecked) private var receiveEnd = 0  // (conn)

    private let vectors: UnsafeMutablePointer<iovec>  // (conn)
    @exclusivity(unchecked) private var batch: [NBDRequest] = []  // (conn)
    @exclusivity(unchecked) private var batchBytes = 0  // (conn)
    @exclusivity(unchecked) private var free: [NBDRequest] = []  // (conn)
    @exclusivity(unchecked) private var created = 0  // (conn)

    private let lock = ConditionLock()
    private var returned: [NBDRequest] = []  // (lock)
    private var deferredInFlight = 0  // (lock)
    private var broken = false  // (lock) a reply write failed: stop serving

    init(fd: Int32, export: any NBDExport, logger: Logger) {
        self.fd = fd
        self.export = export
        self.logger = logger
        self.exportSize = export.size
        self.features = export.features
        receive = .allocate(byteCount: Self.receiveCapacity, alignment: 64)
        vectors = .allocate(capacity: Self.maxBatch * 2)
        batch.reserveCapacity(Self.maxBatch)
        free.reserveCapacity(Self.maxInFlight)
        returned.reserveCapacity(Self.maxInFlight)
    }

    deinit {
        receive.deallocate()
        vectors.deallocate()
    }

    func run() {
        logger.debug("serving export '\(export.name)'")
        do {
            try serveRequests()
        } catch {
            logger.debug("connection ended: \(error)")
        }
        shutdown(fd, Int32(SHUT_RDWR))
        // Deferred requests still point at this connection; wait for them.
        lock.withLock {
            while deferredInFlight > 0 { lock.wait() }
        }
        close(fd)
        // Break the request → context → request cycles so that everything is freed.
        for request in free { request.exportContext = nil }
        for request in returned { request.exportContext = nil }
        free.removeAll()
        returned.removeAll()
    }

    private enum Stop: Error { case disconnect, peerClosed, protocolViolation(String) }

    private func serveRequests() throws {
        let header = UnsafeMutableRawPointer.allocate(byteCount: NBDProtocol.requestHeaderSize, alignment: 8)
        defer { header.deallocate() }
        while true {
            guard try fill(atLeast: NBDProtocol.requestHeaderSize) else { throw Stop.peerClosed }
            let raw = UnsafeRawPointer(receive + receiveStart)
            receiveStart += NBDProtocol.requestHeaderSize
            guard raw.loadBE(at: 0, as: UInt32.self) == NBDProtocol.requestMagic else {
                throw Stop.protocolViolation("bad request magic")
            }
            let flags = NBDProtocol.CommandFlags(rawValue: raw.loadBE(at: 4, as: UInt16.self))
            let type = raw.loadBE(at: 6, as: UInt16.self)
            let cookie = raw.loadBE(at: 8, as: UInt64.self)
            let offset = raw.loadBE(at: 16, as: UInt64.self)
            let length = raw.loadBE(at: 24, as: UInt32.self)

            guard let command = NBDProtocol.Command(rawValue: type) else {
                try replyImmediately(cookie: cookie, error: EINVAL)
                continue
            }
            if command == .disconnect { throw Stop.disconnect }
            let payload = command == .write ? Int(length) : 0
            if let error = check(command, flags: flags, offset: offset, length: length) {
                try discard(payload)
                try replyImmediately(cookie: cookie, error: error)
                continue
            }
            if length == 0 && command != .flush {
                try replyImmediately(cookie: cookie, error: 0)
                continue
            }

            let request = try acquireRequest()
            request.command = command
            request.flags = flags
            request.offset = offset
            request.length = length
            request.cookie = cookie
            request.error = 0
            if command == .read || command == .write { request.ensureCapacity(Int(length)) }
            if payload > 0 { try readPayload(into: request.buffer, count: payload) }

            request.state.store(NBDRequest.submitting, ordering: .relaxed)
            export.submit(request)
            if request.state.compareExchange(
                expected: NBDRequest.submitting, desired: NBDRequest.deferred, ordering: .acquiringAndReleasing
            ).exchanged {
                lock.withLock { deferredInFlight += 1 }
            } else {
                try appendToBatch(request)
            }
        }
    }

    /// Why a request cannot be served, as an NBD errno, or nil if it is well formed.
    private func check(_ command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags, offset: UInt64, length: UInt32) -> Int32? {
        let allowed: NBDProtocol.CommandFlags
        switch command {
        case .read: allowed = []
        case .write: allowed = features.fua ? [.fua] : []
        case .flush: allowed = []
        case .trim where features.trim: allowed = features.fua ? [.fua] : []
        case .writeZeroes where features.writeZeroes: allowed = features.fua ? [.fua, .noHole] : [.noHole]
        default: return EINVAL  // trim/write-zeroes not offered, cache, block status
        }
        guard flags.isSubset(of: allowed) else { return EINVAL }
        if command == .flush { return features.flush ? nil : EINVAL }
        if features.readOnly && command != .read { return EPERM }
        if Int(length) > NBDProtocol.maxPayload && (command == .read || command == .write) { return EINVAL }
        if UInt64(length) > exportSize || offset > exportSize - UInt64(length) {
            return command == .write ? ENOSPC : EINVAL
        }
        return nil
    }

    // MARK: receiving

    /// Makes at least `count` bytes available in the receive buffer, sending pending
    /// replies before it blocks. False on a clean EOF between requests.
    private func fill(atLeast count: Int) throws -> Bool {
        if receiveEnd - receiveStart >= count { return true }
        if receiveStart > 0 {
            let pending = receiveEnd - receiveStart
            if pending > 0 { memmove(receive, receive + receiveStart, pending) }
            receiveStart = 0
            receiveEnd = pending
        }
        var flushed = false
        while receiveEnd < count {
            if !flushed {
                // Anything already received is served first; only then block.
                try flushBatch()
                flushed = true
                // A client at queue depth 1 sends its next request a few microseconds
                // after our reply: look for it briefly before paying for a sleep and wake-up.
                var spins = 0
                while spins < Self.pollsBeforeBlocking {
                    let n = recv(fd, receive + receiveEnd, Self.receiveCapacity - receiveEnd, Int32(MSG_DONTWAIT))
                    if n > 0 {
                        receiveEnd += n
                        break
                    }
                    if n == 0 { break }
                    spins += 1
                }
                if receiveEnd >= count { break }
            }
            let n = try FileDescriptorIO.readSome(fd, into: receive + receiveEnd, count: Self.receiveCapacity - receiveEnd)
            if n == 0 {
                if receiveEnd == 0 { return false }
                throw Stop.protocolViolation("truncated request")
            }
            receiveEnd += n
        }
        return true
    }

    private func readPayload(into buffer: UnsafeMutableRawPointer, count: Int) throws {
        let buffered = min(count, receiveEnd - receiveStart)
        memcpy(buffer, receive + receiveStart, buffered)
        receiveStart += buffered
        if buffered < count {
            try flushBatch()
            guard try FileDescriptorIO.readExactly(fd, into: buffer + buffered, count: count - buffered) else {
                throw Stop.protocolViolation("truncated write payload")
            }
        }
    }

    private func discard(_ count: Int) throws {
        var left = count
        while left > 0 {
            if receiveEnd == receiveStart {
                receiveStart = 0
                receiveEnd = 0
                guard try fill(atLeast: 1) else { throw Stop.peerClosed }
            }
            let take = min(left, receiveEnd - receiveStart)
            receiveStart += take
            left -= take
        }
    }

    // MARK: request slots

    private func acquireRequest() throws -> NBDRequest {
        if let request = free.popLast() { return request }
        reclaimReturned()
        if let request = free.popLast() { return request }
        if created < Self.maxInFlight {
            created += 1
            let request = NBDRequest(connection: self)
            request.exportContext = export.makeRequestContext(for: request)
            return request
        }
        // Every slot is in flight: send our replies, then wait for a deferred one.
        try flushBatch()
        if let request = free.popLast() { return request }
        lock.withLock {
            while returned.isEmpty && !broken { lock.wait() }
        }
        reclaimReturned()
        guard let request = free.popLast() else { throw Stop.protocolViolation("reply path broken") }
        return request
    }

    private func reclaimReturned() {
        lock.withLock {
            free.append(contentsOf: returned)
            returned.removeAll(keepingCapacity: true)
        }
    }

    // MARK: replies

    private func prepareReply(_ request: NBDRequest) -> Int {
        let header = request.replyHeader
        header.storeBE(NBDProtocol.simpleReplyMagic, at: 0)
        header.storeBE(UInt32(bitPattern: Self.nbdErrno(request.error)), at: 4)
        header.storeBE(request.cookie, at: 8)
        return request.command == .read && request.error == 0 ? Int(request.length) : 0
    }

    private func appendToBatch(_ request: NBDRequest) throws {
        let dataBytes = prepareReply(request)
        let index = batch.count * 2
        vectors[index] = iovec(iov_base: request.replyHeader, iov_len: NBDProtocol.simpleReplySize)
        vectors[index + 1] = iovec(iov_base: request.buffer, iov_len: dataBytes)
        batch.append(request)
        batchBytes += dataBytes
        if batch.count == Self.maxBatch || batchBytes >= Self.maxBatchBytes { try flushBatch() }
    }

    private func flushBatch() throws {
        guard !batch.isEmpty else { return }
        let count = batch.count * 2
        lock.lock()
        defer { lock.unlock() }
        free.append(contentsOf: batch)
        batch.removeAll(keepingCapacity: true)
        batchBytes = 0
        try FileDescriptorIO.writeAll(fd, vectors: vectors, count: count)
    }

    private func replyImmediately(cookie: UInt64, error: Int32) throws {
        try flushBatch()  // keep replies in the order requests were finished
        var header = (UInt64(0), UInt64(0))
        try withUnsafeMutableBytes(of: &header) { raw in
            let base = raw.baseAddress!
            base.storeBE(NBDProtocol.simpleReplyMagic, at: 0)
            base.storeBE(UInt32(bitPattern: Self.nbdErrno(error)), at: 4)
            base.storeBE(cookie, at: 8)
            try lock.withLock {
                try FileDescriptorIO.writeAll(fd, base, count: NBDProtocol.simpleReplySize)
            }
        }
    }

    /// Called by `NBDRequest.complete` on the completing thread for deferred requests.
    func replyDeferred(_ request: NBDRequest) {
        let dataBytes = prepareReply(request)
        var pair = (
            iovec(iov_base: request.replyHeader, iov_len: NBDProtocol.simpleReplySize),
            iovec(iov_base: request.buffer, iov_len: dataBytes)
        )
        lock.withLock {
            if !broken {
                do {
                    try withUnsafeMutablePointer(to: &pair) { pointer in
                        try pointer.withMemoryRebound(to: iovec.self, capacity: 2) { vectors in
                            try FileDescriptorIO.writeAll(fd, vectors: vectors, count: 2)
                        }
                    }
                } catch {
                    broken = true
                    shutdown(fd, Int32(SHUT_RDWR))  // wakes the reader, which ends the connection
                }
            }
            returned.append(request)
            deferredInFlight -= 1
            lock.broadcast()
        }
    }

    /// NBD defines a few errno values; map the rest onto them.
    static func nbdErrno(_ error: Int32) -> Int32 {
        switch error {
        case 0, EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN: error
        case EROFS, EACCES: EPERM
        case EDQUOT, EFBIG: ENOSPC
        default: EIO
        }
    }
}
