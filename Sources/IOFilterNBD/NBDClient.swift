import Glibc
import IOFilterPosix
import Logging

/// Receives the result of a request sent with `NBDClient.submit`.
public protocol NBDClientCompletion: AnyObject, Sendable {
    func nbdRequestDidComplete(error: Int32)
}

/// What goes wrong in this module: a server that does not speak NBD as expected, a TLS
/// key or session that cannot be set up. One type for the layer.
public struct NBDError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(description: String) { self.description = description }
}

/// A client for one export, pipelining any number of requests on one connection: a
/// reader thread matches replies to requests by cookie, so slow requests overlap.
public final class NBDClient: @unchecked Sendable {
    // @unchecked: `slots`, `freeCookies` and `connected` are guarded by `lock`; the
    // socket is written only under `sendLock` and read only by the reader thread.
    public let uri: NBDURI
    public private(set) var size: UInt64 = 0
    public private(set) var flags: NBDProtocol.TransmissionFlags = []
    /// The socket, or after STARTTLS the TLS session's plaintext end: changed only while negotiating,
    /// before the reply thread starts.
    private(set) var fd: Int32
    let logger: Logger

    private struct Slot {
        var completion: (any NBDClientCompletion)?
        var buffer: UnsafeMutableRawPointer?
        var length: Int = 0
        var isRead = false
        /// When it was sent (coarse monotonic nanoseconds), for `requestTimeout`.
        var since: UInt64 = 0
    }

    static let maxInFlight = 512
    private let lock = ConditionLock()
    private let sendLock = ConditionLock()
    private var slots: [Slot]
    private var freeCookies: [Int]
    private var connected = true
    /// `disconnect` was called: the end of the connection is no error.
    private var disconnecting = false
    /// The server left a request unanswered past `requestTimeout`: the connection was
    /// given up, and what was in flight fails with ETIMEDOUT.
    private var timedOut = false
    /// How long the server may leave a request unanswered before the connection is
    /// given up (nil: as long as TCP keeps it).
    public let requestTimeout: Double?

    public convenience init(uri: NBDURI, logger: Logger) throws {
        try self.init(uri: uri, connected: try uri.connect(), logger: logger)
    }

    /// Negotiates over `connected`, a stream socket already connected to the server
    /// `uri` names (a sandboxed worker gets its sockets from the host); the client owns
    /// it from here, also when this throws.
    /// With `tls`, the client starts TLS first (a server that requires it).
    ///
    /// With `requestTimeout`, a server that leaves a request unanswered that long (a cut
    /// link, a hung peer: TCP alone would wait many minutes) loses the connection, and
    /// every request in flight fails with ETIMEDOUT.
    public init(uri: NBDURI, connected: Int32, tls: (any NBDClientHandshake)? = nil, requestTimeout: Double? = nil, logger: Logger) throws {
        self.uri = uri
        self.logger = logger
        self.requestTimeout = requestTimeout.flatMap { $0 > 0 ? $0 : nil }
        fd = connected
        slots = Array(repeating: Slot(), count: Self.maxInFlight)
        freeCookies = Array((0..<Self.maxInFlight).reversed())
        do {
            try negotiate(tls: tls)
        } catch {
            close(fd)
            throw error
        }
        startThread(name: "nbd-client") { [self] in readReplies() }
        if let timeout = self.requestTimeout {
            startThread(name: "nbd-client-timer") { [weak self] in
                while let self, self.answersInTime(timeout) { usleep(useconds_t(min(max(timeout / 4, 0.05), 1) * 1e6)) }
            }
        }
    }

    /// False once the connection is gone, or given up here because the oldest request
    /// in flight has waited past `timeout` seconds.
    private func answersInTime(_ timeout: Double) -> Bool {
        let now = monotonicNanoseconds(coarse: true)
        let oldest: UInt64? = lock.withLock {
            guard connected else { return nil }
            return slots.lazy.filter { $0.completion != nil }.map(\.since).min() ?? now
        }
        guard let oldest else { return false }
        guard now > oldest, Double(now - oldest) / 1e9 > timeout else { return true }
        lock.withLock { timedOut = true }
        logger.error("\(uri) left a request unanswered for \(Int(Double(now - oldest) / 1e9))s (the most allowed is \(timeout)s): giving up the connection")
        shutdown(fd, Int32(SHUT_RDWR))
        return false
    }

    public var canFlush: Bool { flags.contains(.sendFlush) }
    public var canFUA: Bool { flags.contains(.sendFUA) }
    public var canTrim: Bool { flags.contains(.sendTrim) }
    public var canWriteZeroes: Bool { flags.contains(.sendWriteZeroes) }
    public var isReadOnly: Bool { flags.contains(.readOnly) }

    /// One request of a batch sent with `submit(_:)`.
    public struct Request {
        public var command: NBDProtocol.Command
        public var flags: NBDProtocol.CommandFlags
        public var offset: UInt64
        public var length: Int
        public var buffer: UnsafeMutableRawPointer?
        public var completion: any NBDClientCompletion

        public init(_ command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags = [], offset: UInt64, length: Int,
                    buffer: UnsafeMutableRawPointer?, completion: any NBDClientCompletion) {
            self.command = command
            self.flags = flags
            self.offset = offset
            self.length = length
            self.buffer = buffer
            self.completion = completion
        }
    }

    /// Sends several requests with one writev (a replication journal batch, say). Each
    /// completion runs once, as with the single-request `submit`.
    public func submit(_ requests: [Request]) {
        guard requests.count > 1 else {
            if let request = requests.first {
                submit(request.command, flags: request.flags, offset: request.offset, length: request.length,
                       buffer: request.buffer, completion: request.completion)
            }
            return
        }
        if let tooLong = requests.firstIndex(where: { $0.length < 0 || UInt64($0.length) > UInt64(UInt32.max) }) {
            submit(Array(requests[..<tooLong]))
            requests[tooLong].completion.nbdRequestDidComplete(error: EINVAL)
            return submit(Array(requests[(tooLong + 1)...]))
        }
        var cookies: [Int] = []
        cookies.reserveCapacity(requests.count)
        lock.lock()
        for request in requests {
            if freeCookies.isEmpty && connected {
                // Send what is reserved so far: its replies free the cookies the rest waits for.
                lock.unlock()
                send(Array(requests[..<cookies.count]), cookies: cookies)
                return submit(Array(requests[cookies.count...]))
            }
            guard connected, let cookie = freeCookies.popLast() else { break }
            slots[cookie] = Slot(completion: request.completion, buffer: request.buffer, length: request.length,
                                 isRead: request.command == .read, since: monotonicNanoseconds(coarse: true))
            cookies.append(cookie)
        }
        lock.unlock()
        for request in requests[cookies.count...] { request.completion.nbdRequestDidComplete(error: EIO) }
        send(Array(requests[..<cookies.count]), cookies: cookies)
    }

    private func send(_ requests: [Request], cookies: [Int]) {
        guard !requests.isEmpty else { return }
        let headers = UnsafeMutableRawPointer.allocate(byteCount: 32 * requests.count, alignment: 8)
        let vectors = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * requests.count)
        defer {
            headers.deallocate()
            vectors.deallocate()
        }
        var count = 0
        for (index, request) in requests.enumerated() {
            let header = headers + 32 * index
            Self.writeHeader(into: header, request.command, flags: request.flags, cookie: cookies[index],
                             offset: request.offset, length: request.length)
            vectors[count] = iovec(iov_base: header, iov_len: NBDProtocol.requestHeaderSize)
            count += 1
            if request.command == .write {
                vectors[count] = iovec(iov_base: request.buffer, iov_len: request.length)
                count += 1
            }
        }
        sendLock.withLock {
            do {
                try FileDescriptorIO.writeAll(fd, vectors: vectors, count: count)
            } catch {
                shutdown(fd, Int32(SHUT_RDWR))  // the reader fails everything in flight
            }
        }
    }

    /// Sends a request; `completion` runs exactly once, on the reader thread or (for a
    /// connection already lost) on this one. `buffer` must stay valid until then.
    public func submit(
        _ command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags = [], offset: UInt64, length: Int,
        buffer: UnsafeMutableRawPointer?, completion: any NBDClientCompletion
    ) {
        guard length >= 0, UInt64(length) <= UInt64(UInt32.max) else {
            // One NBD request carries a 32-bit length; callers split larger ones.
            return completion.nbdRequestDidComplete(error: EINVAL)
        }
        lock.lock()
        while freeCookies.isEmpty && connected { lock.wait() }
        guard connected, let cookie = freeCookies.popLast() else {
            lock.unlock()
            completion.nbdRequestDidComplete(error: EIO)
            return
        }
        slots[cookie] = Slot(completion: completion, buffer: buffer, length: length, isRead: command == .read,
                             since: monotonicNanoseconds(coarse: true))
        lock.unlock()

        var header = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &header) { raw in
            let base = raw.baseAddress!
            Self.writeHeader(into: base, command, flags: flags, cookie: cookie, offset: offset, length: length)
            var vectors = (
                iovec(iov_base: base, iov_len: NBDProtocol.requestHeaderSize),
                iovec(iov_base: command == .write ? buffer : nil, iov_len: command == .write ? length : 0)
            )
            sendLock.withLock {
                withUnsafeMutablePointer(to: &vectors) { pointer in
                    pointer.withMemoryRebound(to: iovec.self, capacity: 2) { v in
                        do {
                            try FileDescriptorIO.writeAll(fd, vectors: v, count: command == .write ? 2 : 1)
                        } catch {
                            // The reader sees the dead socket and fails everything in flight.
                            shutdown(fd, Int32(SHUT_RDWR))
                        }
                    }
                }
            }
        }
    }

    /// The 28-byte request header.
    private static func writeHeader(
        into base: UnsafeMutableRawPointer, _ command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags,
        cookie: Int, offset: UInt64, length: Int
    ) {
        base.storeBE(NBDProtocol.requestMagic, at: 0)
        base.storeBE(flags.rawValue, at: 4)
        base.storeBE(command.rawValue, at: 6)
        base.storeBE(UInt64(cookie), at: 8)
        base.storeBE(offset, at: 16)
        base.storeBE(UInt32(length), at: 24)
    }

    public func disconnect() {
        lock.withLock { disconnecting = true }
        var header = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &header) { raw in
            let base = raw.baseAddress!
            Self.writeHeader(into: base, .disconnect, flags: [], cookie: 0, offset: 0, length: 0)
            sendLock.withLock { try? FileDescriptorIO.writeAll(fd, base, count: NBDProtocol.requestHeaderSize) }
        }
        shutdown(fd, Int32(SHUT_RDWR))
    }

    /// Reads replies in batches (many small replies arrive in one read), matching each
    /// to its request by cookie.
    private func readReplies() {
        let capacity = 64 << 10
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 8)
        defer { buffer.deallocate() }
        var start = 0, end = 0
        /// Makes `count` bytes available at `start`; false at EOF or error.
        func fill(_ count: Int) -> Bool {
            if end - start >= count { return true }
            memmove(buffer, buffer + start, end - start)
            end -= start
            start = 0
            while end < count {
                guard let n = try? FileDescriptorIO.readSome(fd, into: buffer + end, count: capacity - end), n > 0 else { return false }
                end += n
            }
            return true
        }
        while true {
            guard fill(NBDProtocol.simpleReplySize) else { break }
            let header = UnsafeRawPointer(buffer + start)
            guard header.loadBE(at: 0, as: UInt32.self) == NBDProtocol.simpleReplyMagic else { break }
            let error = Int32(bitPattern: header.loadBE(at: 4, as: UInt32.self))
            let cookie = Int(header.loadBE(at: 8, as: UInt64.self))
            start += NBDProtocol.simpleReplySize
            guard cookie < Self.maxInFlight else { break }
            let slot = lock.withLock { slots[cookie] }
            guard let completion = slot.completion else { break }
            if slot.isRead && error == 0, let destination = slot.buffer {
                let buffered = min(slot.length, end - start)
                memcpy(destination, buffer + start, buffered)
                start += buffered
                if buffered < slot.length {
                    guard (try? FileDescriptorIO.readExactly(fd, into: destination + buffered, count: slot.length - buffered)) == true
                    else { break }
                }
            }
            lock.withLock {
                slots[cookie] = Slot()
                freeCookies.append(cookie)
                lock.signal()
            }
            completion.nbdRequestDidComplete(error: error)
        }
        let (orphans, asked, late): ([any NBDClientCompletion], Bool, Bool) = lock.withLock {
            connected = false
            lock.broadcast()
            let pending = slots.compactMap(\.completion)
            slots = Array(repeating: Slot(), count: Self.maxInFlight)
            return (pending, disconnecting, timedOut)
        }
        if !asked {
            logger.error("lost the connection to \(uri); failing \(orphans.count) request(s) in flight")
        } else if !orphans.isEmpty {
            logger.warning("disconnected from \(uri) with \(orphans.count) request(s) in flight; failing them")
        } else {
            logger.debug("disconnected from \(uri)")
        }
        shutdown(fd, Int32(SHUT_RDWR))
        for completion in orphans { completion.nbdRequestDidComplete(error: late ? ETIMEDOUT : EIO) }
    }

    // MARK: handshake

    private func negotiate(tls: (any NBDClientHandshake)?) throws {
        var greeting = [UInt8](repeating: 0, count: 18)
        try readExactly(&greeting)
        var reader = MessageReader(greeting)
        guard reader.u64() == NBDProtocol.initMagic, reader.u64() == NBDProtocol.optionMagic,
            let serverFlags = reader.u16(), serverFlags & NBDProtocol.HandshakeFlags.fixedNewstyle != 0
        else { throw NBDError(description: "\(uri): not a fixed-newstyle NBD server") }
        let noZeroes = serverFlags & NBDProtocol.HandshakeFlags.noZeroes != 0
        var clientFlags = MessageWriter()
        clientFlags.u32(NBDProtocol.ClientFlags.fixedNewstyle | (noZeroes ? NBDProtocol.ClientFlags.noZeroes : 0))
        try FileDescriptorIO.writeAll(fd, clientFlags.bytes)
        if let tls { try startTLS(tls) }

        let name = Array(uri.export.utf8)
        var go = MessageWriter()
        go.u64(NBDProtocol.optionMagic)
        go.u32(NBDProtocol.Option.go.rawValue)
        go.u32(UInt32(4 + name.count + 2))
        go.u32(UInt32(name.count))
        go.append(name)
        go.u16(0)
        try FileDescriptorIO.writeAll(fd, go.bytes)

        while true {
            var header = [UInt8](repeating: 0, count: 20)
            try readExactly(&header)
            var r = MessageReader(header)
            guard r.u64() == NBDProtocol.optionReplyMagic, r.u32() != nil, let type = r.u32(), let length = r.u32(),
                length <= NBDProtocol.maxOptionLength
            else { throw NBDError(description: "\(uri): bad option reply") }
            var data = [UInt8](repeating: 0, count: Int(length))
            try readExactly(&data)
            if type == NBDProtocol.Reply.ack.rawValue { return }
            if type == NBDProtocol.Reply.info.rawValue {
                var info = MessageReader(data)
                if info.u16() == NBDProtocol.Info.export.rawValue, let size = info.u64(), let flags = info.u16() {
                    self.size = size
                    self.flags = NBDProtocol.TransmissionFlags(rawValue: flags)
                }
                continue
            }
            if type & 0x8000_0000 != 0 {
                let message = String(decoding: data, as: UTF8.self)
                throw NBDError(description: "\(uri): server refused export '\(uri.export)'" + (message.isEmpty ? "" : ": \(message)"))
            }
        }
    }

    /// NBD_OPT_STARTTLS, then the TLS handshake; from here on `fd` is the session's
    /// plaintext end (the network socket is the session's).
    private func startTLS(_ tls: any NBDClientHandshake) throws {
        var option = MessageWriter()
        option.u64(NBDProtocol.optionMagic)
        option.u32(NBDProtocol.Option.startTLS.rawValue)
        option.u32(0)
        try FileDescriptorIO.writeAll(fd, option.bytes)
        var header = [UInt8](repeating: 0, count: 20)
        try readExactly(&header)
        var reader = MessageReader(header)
        guard reader.u64() == NBDProtocol.optionReplyMagic, reader.u32() == NBDProtocol.Option.startTLS.rawValue, let type = reader.u32(),
              let length = reader.u32(), length <= NBDProtocol.maxOptionLength
        else { throw NBDError(description: "\(uri): bad reply to STARTTLS") }
        var message = [UInt8](repeating: 0, count: Int(length))
        try readExactly(&message)
        guard type == NBDProtocol.Reply.ack.rawValue else {
            throw NBDError(description: "\(uri): the server does not offer TLS" + (message.isEmpty ? "" : ": \(String(decoding: message, as: UTF8.self))"))
        }
        let plaintext: Int32
        do {
            plaintext = try tls.connect(fd, timeoutMilliseconds: 10_000)
        } catch {
            throw NBDError(description: "\(uri): \(error)")
        }
        close(fd)
        fd = plaintext
    }

    private func readExactly(_ bytes: inout [UInt8]) throws {
        guard !bytes.isEmpty else { return }
        guard let received = try FileDescriptorIO.readBytes(fd, count: bytes.count) else { throw NBDError(description: "\(uri): server closed the connection during the handshake") }
        bytes = received
    }
}
