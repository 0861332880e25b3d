import Glibc
import IOFilterPosix
import Logging

/// Receives the result of a request sent with `NBDClient.submit`.
public protocol NBDClientCompletion: AnyObject, Sendable {
    func nbdRequestDidComplete(error: Int32)
}

public struct NBDClientError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// A client for one export, pipelining any number of requests on one connection: a
/// reader thread matches replies to requests by cookie, so slow requests overlap.
public final class NBDClient: @unchecked Sendable {
    // @unchecked: `slots`, `freeCookies` and `connected` are guarded by `lock`; the
    // socket is written only under `sendLock` and read only by the reader thread.
    public let uri: NBDURI
    public private(set) var size: UInt64 = 0
    public private(set) var flags: NBDProtocol.TransmissionFlags = []
    let fd: Int32
    let logger: Logger

    private struct Slot {
        var completion: (any NBDClientCompletion)?
        var buffer: UnsafeMutableRawPointer?
        var length: Int = 0
        var isRead = false
    }

    static let maxInFlight = 512
    private let lock = ConditionLock()
    private let sendLock = ConditionLock()
    private var slots: [Slot]
    private var freeCookies: [Int]
    private var connected = true

    public init(uri: NBDURI, logger: Logger) throws {
        self.uri = uri
        self.logger = logger
        switch uri {
        case .unix(let socket, _): fd = try Sockets.connectUnix(path: socket)
        case .tcp(let host, let port, _): fd = try Sockets.connectTCP(host: host, port: port)
        }
        slots = Array(repeating: Slot(), count: Self.maxInFlight)
        freeCookies = Array((0..<Self.maxInFlight).reversed())
        do {
            try negotiate()
        } catch {
            close(fd)
            throw error
        }
        startThread(name: "nbd-client") { [self] in readReplies() }
    }

    public var canFlush: Bool { flags.contains(.sendFlush) }
    public var canFUA: Bool { flags.contains(.sendFUA) }
    public var canTrim: Bool { flags.contains(.sendTrim) }
    public var canWriteZeroes: Bool { flags.contains(.sendWriteZeroes) }
    public var isReadOnly: Bool { flags.contains(.readOnly) }

    /// Sends a request; `completion` runs exactly once, on the reader thread or (for a
    /// connection already lost) on this one. `buffer` must stay valid until then.
    public func submit(
        _ command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags = [], offset: UInt64, length: Int,
        buffer: UnsafeMutableRawPointer?, completion: any NBDClientCompletion
    ) {
        lock.lock()
        while freeCookies.isEmpty && connected { lock.wait() }
        guard connected, let cookie = freeCookies.popLast() else {
            lock.unlock()
            completion.nbdRequestDidComplete(error: EIO)
            return
        }
        slots[cookie] = Slot(completion: completion, buffer: buffer, length: length, isRead: command == .read)
        lock.unlock()

        var header = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &header) { raw in
            let base = raw.baseAddress!
            base.storeBE(NBDProtocol.requestMagic, at: 0)
            base.storeBE(flags.rawValue, at: 4)
            base.storeBE(command.rawValue, at: 6)
            base.storeBE(UInt64(cookie), at: 8)
            base.storeBE(offset, at: 16)
            base.storeBE(UInt32(length), at: 24)
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

    public func disconnect() {
        var header = (UInt64(0), UInt64(0), UInt64(0), UInt32(0))
        withUnsafeMutableBytes(of: &header) { raw in
            let base = raw.baseAddress!
            base.storeBE(NBDProtocol.requestMagic, at: 0)
            base.storeBE(NBDProtocol.Command.disconnect.rawValue, at: 6)
            sendLock.withLock { try? FileDescriptorIO.writeAll(fd, base, count: NBDProtocol.requestHeaderSize) }
        }
        shutdown(fd, Int32(SHUT_RDWR))
    }

    private func readReplies() {
        let header = UnsafeMutableRawPointer.allocate(byteCount: NBDProtocol.simpleReplySize, alignment: 8)
        defer { header.deallocate() }
        while true {
            guard (try? FileDescriptorIO.readExactly(fd, into: header, count: NBDProtocol.simpleReplySize)) == true,
                UnsafeRawPointer(header).loadBE(at: 0, as: UInt32.self) == NBDProtocol.simpleReplyMagic
            else { break }
            let error = Int32(bitPattern: UnsafeRawPointer(header).loadBE(at: 4, as: UInt32.self))
            let cookie = Int(UnsafeRawPointer(header).loadBE(at: 8, as: UInt64.self))
            guard cookie < Self.maxInFlight else { break }
            let slot = lock.withLock { slots[cookie] }
            guard let completion = slot.completion else { break }
            if slot.isRead && error == 0, let buffer = slot.buffer {
                guard (try? FileDescriptorIO.readExactly(fd, into: buffer, count: slot.length)) == true else { break }
            }
            lock.withLock {
                slots[cookie] = Slot()
                freeCookies.append(cookie)
                lock.signal()
            }
            completion.nbdRequestDidComplete(error: error)
        }
        logger.error("lost the connection to \(uri); failing requests in flight")
        let orphans: [any NBDClientCompletion] = lock.withLock {
            connected = false
            lock.broadcast()
            let pending = slots.compactMap(\.completion)
            slots = Array(repeating: Slot(), count: Self.maxInFlight)
            return pending
        }
        shutdown(fd, Int32(SHUT_RDWR))
        for completion in orphans { completion.nbdRequestDidComplete(error: EIO) }
    }

    // MARK: handshake

    private func negotiate() throws {
        var greeting = [UInt8](repeating: 0, count: 18)
        try readExactly(&greeting)
        var reader = MessageReader(greeting)
        guard reader.u64() == NBDProtocol.initMagic, reader.u64() == NBDProtocol.optionMagic,
            let serverFlags = reader.u16(), serverFlags & NBDProtocol.HandshakeFlags.fixedNewstyle != 0
        else { throw NBDClientError(description: "\(uri): not a fixed-newstyle NBD server") }
        let noZeroes = serverFlags & NBDProtocol.HandshakeFlags.noZeroes != 0
        var clientFlags = MessageWriter()
        clientFlags.u32(NBDProtocol.ClientFlags.fixedNewstyle | (noZeroes ? NBDProtocol.ClientFlags.noZeroes : 0))
        try FileDescriptorIO.writeAll(fd, clientFlags.bytes)

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
            else { throw NBDClientError(description: "\(uri): bad option reply") }
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
                throw NBDClientError(description: "\(uri): server refused export '\(uri.export)'" + (message.isEmpty ? "" : ": \(message)"))
            }
        }
    }

    private func readExactly(_ bytes: inout [UInt8]) throws {
        guard !bytes.isEmpty else { return }
        guard let received = try FileDescriptorIO.readBytes(fd, count: bytes.count) else { throw NBDClientError(description: "\(uri): server closed the connection during the handshake") }
        bytes = received
    }
}
