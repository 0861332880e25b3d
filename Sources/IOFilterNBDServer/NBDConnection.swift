import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging
import Synchronization

/// The transmission phase of one client.
///
/// The connection's thread reads requests in batches, hands each to the export, and
/// collects the replies of requests the export finished inline; when it runs out of
/// buffered requests it sends all those replies with one writev. A request the export
/// defers is answered by whichever thread completes it, so a slow request never holds
/// up the ones behind it.
///
/// Replies from several threads share one socket, so one thread at a time owns the
/// socket for writing (`writerActive`); the lock guards only the hand-over, never a
/// write. A completing thread that is not the connection's writes only what the socket
/// takes without blocking: when a client stops reading, the rest goes to this
/// connection's own reply thread, so that a backend's or a filter's thread that
/// completes requests for every connection of a disk is never stalled by one client.
final class NBDConnection: @unchecked Sendable {
    // @unchecked: fields marked (conn) are touched only by the connection's thread;
    // fields marked (lock) only with `lock` held; (writer) only by the thread that owns
    // the socket for writing. The (conn) fields skip dynamic exclusivity checks: one
    // thread owns them, and the checks showed in profiles.
    let fd: Int32
    let export: any NBDExport
    let logger: Logger
    let exportSize: UInt64
    let features: NBDExportFeatures
    /// Negotiated: structured replies (reads and block status answer in chunks), and
    /// the base:allocation metadata context (block status allowed).
    let structured: Bool
    let baseAllocation: Bool
    /// Other metadata contexts chosen (ids 2, 3, ...), answered by the export at once,
    /// and their names (what a hand-over carries).
    let contexts: [any NBDMetadataContext]
    let contextNames: [String]
    /// Room for a block-status reply: every context's chunk.
    let blockStatusBytes: Int

    // Big enough to batch many small requests, small enough that a large write payload
    // is mostly read straight into its request buffer rather than copied through here.
    static let receiveCapacity = 64 << 10
    static let maxBatch = 64
    static let maxBatchBytes = 2 << 20
    static let maxInFlight = 256
    static let pollsBeforeBlocking = 20
    /// Request buffers of idle slots are kept for reuse up to this many bytes in all
    /// (a client at 16 x 2 MiB keeps its buffers); past it, a slot returning with a
    /// buffer larger than `keptBufferBytes` gives it back.
    static let slotBufferBudget = 64 << 20
    static let keptBufferBytes = 256 << 10

    private let receive: UnsafeMutableRawPointer  // (conn)
    @exclusivity(unchecked) private var receiveStart = 0  // (conn)
    @exclusivity(unchecked) private var receiveEnd = 0  // (conn)

    private let vectors: UnsafeMutablePointer<iovec>  // (conn)
    @exclusivity(unchecked) private var batch: [NBDRequest] = []  // (conn)
    @exclusivity(unchecked) private var batchBytes = 0  // (conn)
    @exclusivity(unchecked) private var free: [NBDRequest] = []  // (conn)
    @exclusivity(unchecked) private var slots: [NBDRequest] = []  // (conn) every slot ever made
    @exclusivity(unchecked) private var slotBytes = 0  // (conn) buffer bytes of all slots

    private let lock = ConditionLock()
    private var returned: [NBDRequest] = []  // (lock) replied; ready for reuse
    private var queued: [NBDRequest] = []  // (lock) finished; reply not yet written
    private var awaitingReply = 0  // (lock) deferred or queued, not yet in `returned`
    private var writerActive = false  // (lock) a thread owns the socket for writing
    private var handedOver = false  // (lock) the owner left a partial write to the reply thread
    private var replyThreadStarted = false  // (lock)
    private var closing = false  // (lock) the reply thread may exit
    private var broken = false  // (lock) a reply write failed: stop serving

    /// Set (then the thread is woken with `wakeSignal`) when the connection is to be
    /// handed to another process: it stops reading at the next request boundary.
    private let detachRequested = Atomic<Bool>(false)
    private let thread = Guarded<pthread_t?>(nil)

    /// (writer) The replies being written by the owner, and their vectors.
    private var writing: [NBDRequest] = []
    private let writeVectors: UnsafeMutablePointer<iovec>
    private var writeFirst = 0
    private var writeCount = 0

    /// - Parameter buffered: bytes of requests already received (a connection handed
    ///   over from another process), served before anything read from `fd`.
    init(fd: Int32, export: any NBDExport, logger: Logger, structured: Bool = false, baseAllocation: Bool = false,
         contexts: [(name: String, context: any NBDMetadataContext)] = [], buffered: [UInt8] = []) {
        self.fd = fd
        self.export = export
        self.structured = structured
        self.baseAllocation = structured && baseAllocation && export.features.blockStatus
        self.contexts = structured ? contexts.map(\.context) : []
        self.contextNames = structured ? contexts.map(\.name) : []
        blockStatusBytes = Self.blockStatusReplyBytes * (1 + self.contexts.count) + Self.chunkPrefix * self.contexts.count
        self.logger = logger
        self.exportSize = export.size
        self.features = export.features
        receive = .allocate(byteCount: Self.receiveCapacity, alignment: 64)
        vectors = .allocate(capacity: Self.maxBatch * 2)
        writeVectors = .allocate(capacity: Self.maxInFlight * 2)
        batch.reserveCapacity(Self.maxBatch)
        free.reserveCapacity(Self.maxInFlight)
        slots.reserveCapacity(Self.maxInFlight)
        returned.reserveCapacity(Self.maxInFlight)
        queued.reserveCapacity(Self.maxInFlight)
        writing.reserveCapacity(Self.maxInFlight)
        let carried = min(buffered.count, Self.receiveCapacity)
        buffered.withUnsafeBytes { if carried > 0 { memcpy(receive, $0.baseAddress!, carried) } }
        receiveEnd = carried
    }

    deinit {
        receive.deallocate()
        vectors.deallocate()
        writeVectors.deallocate()
    }

    /// Serves until the client disconnects, breaks the protocol or the socket is shut
    /// down; then answers what it accepted, waits for deferred requests, and frees
    /// every slot (the export's per-slot state included).
    /// How a connection ended: closed, or detached with what its client negotiated, its
    /// socket left open for another process to go on with.
    enum Ending {
        case closed
        case detached(NBDConnectionState)
    }

    @discardableResult
    func run() -> Ending {
        thread.withLock { $0 = pthread_self() }
        logger.debug("serving export '\(export.name)'")
        var detached = false
        do {
            try serveRequests()
        } catch Stop.detach {
            detached = true
        } catch {
            logger.debug("connection ended: \(error)")
        }
        thread.withLock { $0 = nil }
        // Replies already batched are still owed to the client (a disconnect or a bad
        // request after them does not cancel requests that were carried out).
        try? flushBatch()
        let intact = lock.withLock {
            while awaitingReply > 0 || writerActive { lock.wait() }
            closing = true
            lock.broadcast()
            return !broken
        }
        let ending: Ending
        if detached && intact {
            // Every request read is answered; what is buffered is the next ones'.
            ending = .detached(NBDConnectionState(export: export.name, structured: structured, baseAllocation: baseAllocation,
                                                  contexts: contextNames, buffered: Array(UnsafeRawBufferPointer(start: receive + receiveStart, count: receiveEnd - receiveStart))))
        } else {
            ending = .closed
            shutdown(fd, Int32(SHUT_RDWR))  // the server closes it
        }
        defer { releaseSlots() }
        return ending
    }

    /// Asks the connection to stop at the next request boundary and hand its client
    /// over; call again until it has ended (a wake-up may land just before the thread
    /// blocks, and is then lost).
    func requestDetach() {
        detachRequested.store(true, ordering: .releasing)
        if let thread = thread.withLock({ $0 }) { pthread_kill(thread, NBDConnection.wakeSignal) }
    }

    /// Interrupts a connection thread's blocking read (the handler does nothing; the
    /// read returns EINTR). SIGURG: ignored by default, never sent here otherwise.
    static let wakeSignal = SIGURG
    static let installWakeHandler: Void = {
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in }
        sigemptyset(&action.sa_mask)
        action.sa_flags = 0  // no SA_RESTART: the read must return
        sigaction(NBDConnection.wakeSignal, &action, nil)
    }()

    private func releaseSlots() {
        for request in slots {
            if let context = request.exportContext { export.releaseRequestContext(context) }
            request.exportContext = nil
        }
        slots.removeAll()
        free.removeAll()
        returned.removeAll()
    }

    private enum Stop: Error { case disconnect, peerClosed, protocolViolation(String), detach }

    private func serveRequests() throws {
        while true {
            if detachRequested.load(ordering: .relaxed) { throw Stop.detach }
            guard try fill(atLeast: NBDProtocol.requestHeaderSize, atBoundary: true) else { throw Stop.peerClosed }
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
                if payload > NBDProtocol.maxPayload {
                    // Too large to skip safely: the stream cannot be trusted past it.
                    throw Stop.protocolViolation("write of \(payload) bytes exceeds the maximum payload")
                }
                try discard(payload)
                try replyImmediately(cookie: cookie, error: error, to: command)
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
            if command == .read || command == .write { grow(request, to: Int(length)) }
            if command == .blockStatus {
                grow(request, to: blockStatusBytes)
                request.extentBytes = 0
                if !baseAllocation {
                    // Only contexts the export answers itself: nothing to submit.
                    try appendToBatch(request)
                    continue
                }
            }
            if payload > 0 {
                do {
                    try readPayload(into: request.buffer, count: payload)
                } catch {
                    free.append(request)
                    throw error
                }
            }

            request.state.store(NBDRequest.submitting, ordering: .relaxed)
            export.submit(request)
            if request.state.compareExchange(
                expected: NBDRequest.submitting, desired: NBDRequest.deferred, ordering: .acquiringAndReleasing
            ).exchanged {
                lock.withLock { awaitingReply += 1 }
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
        case .writeZeroes where features.writeZeroes:
            allowed = NBDProtocol.CommandFlags([.noHole]).union(features.fua ? [.fua] : []).union(features.fastZero ? [.fastZero] : [])
        case .cache where features.cache: allowed = []
        case .blockStatus where baseAllocation || !contexts.isEmpty: allowed = [.requestOne]
        default: return EINVAL  // not offered (or block status without its context)
        }
        guard flags.isSubset(of: allowed) else { return EINVAL }
        if command == .flush { return features.flush ? nil : EINVAL }
        if features.readOnly && command != .read && command != .cache && command != .blockStatus { return EPERM }
        if Int(length) > NBDProtocol.maxPayload && (command == .read || command == .write) { return EINVAL }
        if UInt64(length) > exportSize || offset > exportSize - UInt64(length) {
            return command == .write ? ENOSPC : EINVAL
        }
        return nil
    }

    // MARK: receiving

    /// Makes at least `count` bytes available in the receive buffer, sending pending
    /// replies before it blocks. False on a clean EOF between requests.
    private func fill(atLeast count: Int, atBoundary: Bool = false) throws -> Bool {
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
            let n = read(fd, receive + receiveEnd, Self.receiveCapacity - receiveEnd)
            if n < 0 {
                guard errno == EINTR else { throw SystemError("read") }
                // Woken to detach: only between requests (what is buffered goes along).
                if atBoundary && detachRequested.load(ordering: .acquiring) { throw Stop.detach }
                continue
            }
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
        if slots.count < Self.maxInFlight {
            let request = NBDRequest(connection: self)
            request.exportContext = export.makeRequestContext(for: request)
            slots.append(request)
            slotBytes += request.capacity
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

    private func grow(_ request: NBDRequest, to needed: Int) {
        guard needed > request.capacity else { return }
        slotBytes -= request.capacity
        request.ensureCapacity(needed)
        slotBytes += request.capacity
    }

    /// Returns a slot to the free list, giving back a large buffer once idle slots
    /// hold more than the budget (a burst of 32 MiB requests must not pin 256 of them).
    @inline(__always)
    private func recycle(_ request: NBDRequest) {
        if request.capacity > Self.keptBufferBytes && slotBytes > Self.slotBufferBudget {
            slotBytes -= request.capacity
            request.shrink()
            slotBytes += request.capacity
        }
        free.append(request)
    }

    private func reclaimReturned() {
        lock.lock()
        let count = returned.count
        if count == 0 {
            lock.unlock()
            return
        }
        for request in returned { recycle(request) }
        returned.removeAll(keepingCapacity: true)
        lock.unlock()
    }

    // MARK: replies

    /// Room for this many block-status extents in one reply.
    static let blockStatusReplyBytes = 1024 * 8

    private func prepareReply(_ request: NBDRequest) {
        let header = request.replyHeader
        guard structured && (request.command == .read || request.command == .blockStatus) else {
            header.storeBE(NBDProtocol.simpleReplyMagic, at: 0)
            header.storeBE(UInt32(bitPattern: Self.nbdErrno(request.error)), at: 4)
            header.storeBE(request.cookie, at: 8)
            request.replyHeaderLength = NBDProtocol.simpleReplySize
            request.replyDataLength = request.command == .read && request.error == 0 ? Int(request.length) : 0
            return
        }
        // One chunk, flagged done: the data of a read, or the error of either; a block
        // status has one chunk per chosen context.
        var error = request.error
        let extentBytes = request.command == .blockStatus && request.flags.contains(.requestOne)
            ? min(request.extentBytes, 8) : request.extentBytes
        if error == 0 && request.command == .blockStatus && baseAllocation && extentBytes == 0 {
            error = EIO  // a reply must hold at least one extent
        }
        header.storeBE(NBDProtocol.structuredReplyMagic, at: 0)
        header.storeBE(NBDProtocol.chunkFlagDone, at: 4)
        header.storeBE(request.cookie, at: 8)
        let headerSize = NBDProtocol.chunkHeaderSize
        if error != 0 {
            header.storeBE(NBDProtocol.ChunkType.error.rawValue, at: 6)
            header.storeBE(UInt32(6), at: 16)
            header.storeBE(UInt32(bitPattern: Self.nbdErrno(error)), at: headerSize)
            header.storeBE(UInt16(0), at: headerSize + 4)  // no message
            request.replyHeaderLength = headerSize + 6
            request.replyDataLength = 0
        } else if request.command == .read {
            header.storeBE(NBDProtocol.ChunkType.offsetData.rawValue, at: 6)
            header.storeBE(UInt32(8) + request.length, at: 16)
            header.storeBE(request.offset, at: headerSize)
            request.replyHeaderLength = headerSize + 8
            request.replyDataLength = Int(request.length)
        } else {
            prepareBlockStatusChunks(request, baseExtentBytes: extentBytes)
        }
    }

    /// A chunk header and its context id, before each block-status chunk after the first.
    static let chunkPrefix = NBDProtocol.chunkHeaderSize + 4

    /// The chunks of a block-status reply, one per chosen context: base:allocation's
    /// extents are in the buffer already (the chain's answer); the other contexts'
    /// follow them, each after its own chunk header. The first chunk's header is the
    /// reply header; the last carries the done flag.
    private func prepareBlockStatusChunks(_ request: NBDRequest, baseExtentBytes: Int) {
        let one = request.flags.contains(.requestOne)
        let total = (baseAllocation ? 1 : 0) + contexts.count
        var chunk = 0
        var cursor = 0
        var chunkHeader = request.replyHeader
        var chunkStart = 0
        func open(id: UInt32) {
            if chunk > 0 {
                chunkHeader = request.buffer + cursor
                cursor += Self.chunkPrefix
            }
            chunkStart = cursor
            chunkHeader.storeBE(NBDProtocol.structuredReplyMagic, at: 0)
            chunkHeader.storeBE(chunk == total - 1 ? NBDProtocol.chunkFlagDone : 0, at: 4)
            chunkHeader.storeBE(NBDProtocol.ChunkType.blockStatus.rawValue, at: 6)
            chunkHeader.storeBE(request.cookie, at: 8)
            chunkHeader.storeBE(id, at: NBDProtocol.chunkHeaderSize)
        }
        func close() {
            chunkHeader.storeBE(UInt32(4 + cursor - chunkStart), at: 16)
            chunk += 1
        }
        if baseAllocation {
            open(id: NBDProtocol.baseAllocationID)
            cursor = baseExtentBytes
            close()
        }
        let length = UInt64(request.length)
        for (index, context) in contexts.enumerated() {
            open(id: NBDProtocol.baseAllocationID + UInt32(index + 1))
            let limit = cursor + (one ? 8 : Self.blockStatusReplyBytes)
            var covered: UInt64 = 0
            context.describe(offset: request.offset, length: request.length) { extentLength, flags in
                guard extentLength > 0, cursor + 8 <= limit, covered < length else { return false }
                let clipped = UInt32(min(UInt64(extentLength), length - covered))
                (request.buffer + cursor).storeBE(clipped, at: 0)
                (request.buffer + cursor).storeBE(flags, at: 4)
                cursor += 8
                covered += UInt64(clipped)
                return covered < length
            }
            if cursor == chunkStart {
                // A context must answer with at least one extent: the whole range, flags 0.
                (request.buffer + cursor).storeBE(request.length, at: 0)
                (request.buffer + cursor).storeBE(UInt32(0), at: 4)
                cursor += 8
            }
            close()
        }
        request.replyHeaderLength = NBDProtocol.chunkHeaderSize + 4
        request.replyDataLength = cursor
    }

    /// The reply's two vectors at `slot`: its header, and the data it carries (a read's,
    /// a block status's extents). Returns the data's length.
    @inline(__always)
    private static func storeReplyVectors(of request: NBDRequest, at slot: UnsafeMutablePointer<iovec>) -> Int {
        slot[0] = iovec(iov_base: request.replyHeader, iov_len: request.replyHeaderLength)
        slot[1] = iovec(iov_base: request.buffer, iov_len: request.replyDataLength)
        return request.replyDataLength
    }

    private func appendToBatch(_ request: NBDRequest) throws {
        prepareReply(request)
        let dataBytes = Self.storeReplyVectors(of: request, at: vectors + batch.count * 2)
        batch.append(request)
        batchBytes += dataBytes
        if batch.count == Self.maxBatch || batchBytes >= Self.maxBatchBytes { try flushBatch() }
    }

    /// Sends the batch. If another thread owns the socket, the batch joins its queue
    /// instead and this thread goes on reading requests.
    private func flushBatch() throws {
        guard !batch.isEmpty else { return }
        let count = batch.count * 2
        lock.lock()
        if broken {
            lock.unlock()
            for request in batch { recycle(request) }
            batch.removeAll(keepingCapacity: true)
            batchBytes = 0
            throw Stop.protocolViolation("reply path broken")
        }
        if writerActive {
            queued.append(contentsOf: batch)
            awaitingReply += batch.count
            lock.unlock()
            batch.removeAll(keepingCapacity: true)
            batchBytes = 0
            return
        }
        writerActive = true
        lock.unlock()
        var failure: (any Error)?
        do {
            try FileDescriptorIO.writeAll(fd, vectors: vectors, count: count)
        } catch {
            failure = error
        }
        for request in batch { recycle(request) }
        batch.removeAll(keepingCapacity: true)
        batchBytes = 0
        if failure != nil { markBroken() }
        // Replies that queued up meanwhile: this thread may block for its own client.
        writeQueued(blocking: true)
        if let failure { throw failure }
    }

    /// An answer without the export: an error (in a chunk where the command needs one),
    /// or success for a request with nothing to do.
    private func replyImmediately(cookie: UInt64, error: Int32, to command: NBDProtocol.Command = .flush) throws {
        // A slot carries the reply, so that it goes out with the batch like any other.
        let request = try acquireRequest()
        request.command = error != 0 ? command : .flush
        request.flags = []
        request.length = 0
        request.cookie = cookie
        request.error = error
        try appendToBatch(request)
    }

    /// Called by `NBDRequest.complete` on the completing thread for deferred requests.
    func replyDeferred(_ request: NBDRequest) {
        prepareReply(request)
        lock.lock()
        queued.append(request)
        if writerActive {
            lock.unlock()  // the owner sends it before letting go of the socket
            return
        }
        writerActive = true
        lock.unlock()
        writeQueued(blocking: false)
    }

    /// Sends queued replies while this thread owns the socket, then lets go of it.
    /// Without `blocking`, stops where the socket would block and hands the rest to the
    /// connection's reply thread.
    private func writeQueued(blocking: Bool) {
        while true {
            if writeFirst == writeCount {
                lock.lock()
                if !writing.isEmpty {
                    returned.append(contentsOf: writing)
                    awaitingReply -= writing.count
                    writing.removeAll(keepingCapacity: true)
                }
                if queued.isEmpty || broken {
                    if broken {
                        returned.append(contentsOf: queued)
                        awaitingReply -= queued.count
                        queued.removeAll(keepingCapacity: true)
                    }
                    writerActive = false
                    lock.broadcast()
                    lock.unlock()
                    return
                }
                swap(&writing, &queued)
                lock.unlock()
                writeCount = 0
                for request in writing {
                    _ = Self.storeReplyVectors(of: request, at: writeVectors + writeCount)
                    writeCount += 2
                }
                writeFirst = 0
            }
            do {
                if blocking {
                    try FileDescriptorIO.writeAll(fd, vectors: writeVectors + writeFirst, count: writeCount - writeFirst)
                    writeFirst = writeCount
                } else {
                    writeFirst += try FileDescriptorIO.sendWithoutBlocking(
                        fd, vectors: writeVectors + writeFirst, count: writeCount - writeFirst)
                    if writeFirst < writeCount {
                        handOverToReplyThread()
                        return
                    }
                }
            } catch {
                markBroken()
                writeFirst = writeCount
            }
        }
    }

    /// Keeps ownership of the socket but passes it, with the partial write, to the
    /// reply thread (started the first time a client is this slow).
    private func handOverToReplyThread() {
        lock.withLock {
            handedOver = true
            if !replyThreadStarted {
                replyThreadStarted = true
                startThread(name: "nbd-replies") { [self] in replyLoop() }
            }
            lock.broadcast()
        }
    }

    private func replyLoop() {
        while true {
            lock.lock()
            while !handedOver && !closing { lock.wait() }
            if !handedOver {
                lock.unlock()
                return
            }
            handedOver = false
            lock.unlock()
            writeQueued(blocking: true)
        }
    }

    private func markBroken() {
        lock.withLock {
            broken = true
            lock.broadcast()
        }
        shutdown(fd, Int32(SHUT_RDWR))  // wakes the reader, which ends the connection
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
