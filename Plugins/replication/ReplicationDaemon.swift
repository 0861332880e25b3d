import Glibc
import IOFilterSDK
import IOFilterSDKTLS

/// The replication sample's partner daemon. On the sending host it carries each
/// filter's journal to the peer daemon its target names (`iofilter://HOST:PORT/DISK`);
/// on the receiving host it writes what its peers send into replica disks the host
/// keeps (`open_replica`: listed by `iofilter disk list`, read-only until promoted).
/// One process does both, so two hosts can replicate to each other.
enum ReplicationDaemon {
    static let daemon = PartnerDaemon(listensForPeers: true) { host in
        if let peers = host.peerListener {
            // The operator's key for peers (`daemon-listen --tls-psk`), copied by the
            // host into this daemon's directory.
            var tls: PeerTLS.Server?
            if let psk = host.setting("tls-psk") {
                do throws(FilterError) {
                    tls = try PeerTLS.Server(pskFile: psk)
                } catch {
                    host.log(.error, "cannot load the peers' TLS key: \(error.message); refusing peers")
                    return 1
                }
            }
            host.log(.info, "accepting replication peers on \(host.setting("listen") ?? "the host's listener")\(tls == nil ? "" : " (TLS, PSK)")")
            startThread(name: "replica-peers") { [tls] in acceptLoop(peers) {
                var server = ReplicaServer(host: host, fd: $0, tls: tls)
                server.run()
            } }
        }
        acceptLoop(host.channels) { ChannelRelay(host: host, channel: $0).run() }
        return 0
    }

    /// Accepts connections on `listener` for ever, each served on a thread of its own.
    static func acceptLoop(_ listener: Int32, serve: @escaping @Sendable (Int32) -> Void) {
        while true {
            let fd = FileIO.accept(listener)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                usleep(100_000)
                continue
            }
            startThread(name: "replication-connection") { serve(fd) }
        }
    }
}

/// One filter instance's channel: its requests, forwarded to the peer daemon of the
/// target its HELLO named, over NBD (pipelined; replies come back from the NBD
/// client's thread).
final class ChannelRelay: @unchecked Sendable {
    // @unchecked: `target` is only touched on the relay's own thread; `writeLock` keeps
    // reply frames whole.
    let host: DaemonHost
    let channel: Int32
    private var target: (any BlockTarget)?
    private var background = false
    private let writeLock = ConditionLock()

    init(host: DaemonHost, channel: Int32) {
        self.host = host
        self.channel = channel
    }

    func run() {
        defer {
            target?.close()
            close(channel)
        }
        var header = [UInt8](repeating: 0, count: PeerFrame.requestHeaderSize)
        while header.withUnsafeMutableBytes({ Stream.read(channel, into: $0.baseAddress!, count: $0.count) }) {
            let size = Int(PeerFrame.load(UInt32.self, from: header, at: 0))
            let payload = size - (PeerFrame.requestHeaderSize - 4)
            guard payload >= 0, payload <= PeerFrame.maxPayload, let kind = PeerFrame.Kind(rawValue: header[4]) else {
                host.log(.error, "a filter sent a malformed frame; closing its channel")
                return
            }
            let id = PeerFrame.load(UInt64.self, from: header, at: 5)
            let offset = PeerFrame.load(UInt64.self, from: header, at: 13)
            let length = Int(PeerFrame.load(UInt32.self, from: header, at: 21))
            // The payload lives until the replica has it (the NBD client sends it later).
            let payloadBuffer = PayloadBuffer(count: payload)
            let buffer = payloadBuffer.pointer
            guard Stream.read(channel, into: buffer, count: payload) else {
                payloadBuffer.free()
                return
            }
            let answer: @Sendable (Int32) -> Void = { [self] error in
                payloadBuffer.free()
                reply(id: id, error: error)
            }
            switch kind {
            case .hello:
                let text = String(decoding: UnsafeRawBufferPointer(start: buffer, count: payload), as: UTF8.self)
                payloadBuffer.free()
                // Nobody waits for an async stream: like the filter's shipper, its relay
                // (and the NBD reader it starts) takes only CPU the guests leave idle.
                if length == 0 && !background {
                    moveThisThreadToBackground()
                    background = true
                }
                hello(id: id, target: text, size: offset)
            case .write:
                guard let target, payload == length else { answer(target == nil ? ENOTCONN : EINVAL); continue }
                target.write(offset: offset, length: length, from: buffer, completion: answer)
            case .zero:
                guard let target else { answer(ENOTCONN); continue }
                target.writeZeroes(offset: offset, length: length, completion: answer)
            case .flush:
                guard let target else { answer(ENOTCONN); continue }
                target.flush(completion: answer)
            case .batch:
                guard let target else { answer(ENOTCONN); continue }
                guard let writes = Self.records(in: UnsafeRawBufferPointer(start: buffer, count: payload), count: length) else {
                    answer(EINVAL)
                    continue
                }
                target.writeBatch(writes, completion: answer)
            }
        }
    }

    /// A BATCH frame's records, pointing into its payload; nil if it is malformed.
    static func records(in payload: UnsafeRawBufferPointer, count: Int) -> [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)]? {
        var writes: [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)] = []
        writes.reserveCapacity(count)
        var position = 0
        for _ in 0..<count {
            guard payload.count - position >= PeerFrame.batchRecordHeaderSize else { return nil }
            let kind = payload[position]
            let offset = UInt64(bigEndian: payload.loadUnaligned(fromByteOffset: position + 1, as: UInt64.self))
            let length = Int(UInt32(bigEndian: payload.loadUnaligned(fromByteOffset: position + 9, as: UInt32.self)))
            position += PeerFrame.batchRecordHeaderSize
            if kind == PeerFrame.Kind.write.rawValue {
                guard payload.count - position >= length else { return nil }
                writes.append((offset, length, payload.baseAddress! + position))
                position += length
            } else if kind == PeerFrame.Kind.zero.rawValue {
                writes.append((offset, length, nil))
            } else {
                return nil
            }
        }
        return position == payload.count ? writes : nil
    }

    private func reply(id: UInt64, error: Int32, message: String = "") {
        let frame = PeerFrame.reply(id: id, error: error, message: message)
        writeLock.withLock { _ = Stream.write(channel, frame) }
    }

    /// Connects this channel's session to the peer that keeps `target`'s replica.
    private func hello(id: UInt64, target text: String, size: UInt64) {
        target?.close()
        target = nil
        let lines = text.split(separator: "\n", maxSplits: 1).map(String.init)
        let spec = lines.first ?? ""
        guard let address = PeerAddress(spec) else {
            return reply(id: id, error: EINVAL, message: "'\(spec)' is not iofilter://HOST:PORT/DISK")
        }
        do throws(FilterError) {
            var fd = try host.connect(toPeer: spec)
            if lines.count == 2 {
                let connection = fd
                defer { close(connection) }
                fd = try PeerTLS.connect(connection, pskLine: lines[1])
            }
            guard Stream.write(fd, Array("IOFILTER-REPLICA 1 \(address.disk) \(size)\n".utf8)), let answer = Stream.readLine(fd) else {
                close(fd)
                throw FilterError(ECONNRESET, "\(spec) closed the connection (is the replication daemon listening there, and does it require TLS?)")
            }
            guard answer == "OK" || answer.hasPrefix("OK ") else {
                close(fd)
                throw FilterError(EEXIST, "\(spec) refused: \(answer.hasPrefix("ERR ") ? String(answer.dropFirst(4)) : answer)")
            }
            target = try openNBDTarget(connected: fd, export: address.disk, description: spec)
            host.log(.info, "replicating to \(spec) (\(size) bytes)")
            // The answer carries the replica's identity to the filter.
            reply(id: id, error: 0, message: String(answer.dropFirst(3)))
        } catch {
            host.log(.warning, "cannot reach \(spec): \(error.message)")
            reply(id: id, error: error.errno, message: error.message)
        }
    }
}

/// A request's payload, freed once its answer is in.
final class PayloadBuffer: @unchecked Sendable {
    // @unchecked: written once by the relay's thread, then only read until `free`.
    let pointer: UnsafeMutableRawPointer
    init(count: Int) { pointer = .allocate(byteCount: max(count, 1), alignment: 16) }
    func free() { pointer.deallocate() }
}

/// One peer on the receiving side: its replica disk, served over NBD to the peer's
/// relay (one request at a time, answered in order).
struct ReplicaServer {
    let host: DaemonHost
    /// The peer's connection (the plaintext end of its TLS session, once `run` has it).
    var fd: Int32
    let tls: PeerTLS.Server?

    init(host: DaemonHost, fd: Int32, tls: PeerTLS.Server?) {
        self.host = host
        self.fd = fd
        self.tls = tls
    }

    // The few NBD protocol values this server speaks (the NBD project's proto.md).
    static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    static let optionMagic: UInt64 = 0x4948_4156_454f_5054  // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let replyMagic: UInt32 = 0x6744_6698
    enum Option: UInt32 { case abort = 2, info = 6, go = 7 }
    enum OptionReply: UInt32 { case ack = 1, info = 3, unsupported = 0x8000_0001 }
    enum Command: UInt16 { case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, writeZeroes = 6 }
    /// HAS_FLAGS, SEND_FLUSH, SEND_TRIM, SEND_WRITE_ZEROES.
    static let transmissionFlags: UInt16 = 1 | 4 | 32 | 64

    mutating func run() {
        let connection = fd
        defer { close(connection) }
        if let tls {
            do throws(FilterError) {
                fd = try tls.accept(connection)
            } catch {
                host.log(.warning, "a peer failed the TLS handshake: \(error.message)")
                return
            }
        }
        defer { if fd != connection { close(fd) } }
        guard let line = Stream.readLine(fd) else { return }
        let words = line.split(separator: " ")
        guard words.count == 4, words[0] == "IOFILTER-REPLICA", words[1] == "1", let size = UInt64(words[3]) else {
            _ = Stream.write(fd, Array("ERR expected IOFILTER-REPLICA 1 DISK SIZE\n".utf8))
            return
        }
        let name = String(words[2])
        let replica: Int32
        do throws(FilterError) {
            replica = try host.openReplica(named: name, size: size)
        } catch {
            host.log(.warning, "refused a replication stream for \(name): \(error.message)")
            _ = Stream.write(fd, Array("ERR \(error.message)\n".utf8))
            return
        }
        defer { close(replica) }
        // The replica's identity: a sender that synced another one (this disk was
        // deleted and made again, say) copies everything again.
        guard Stream.write(fd, Array("OK \(FileIO.identity(of: replica))\n".utf8)), negotiate(size: size) else { return }
        host.log(.info, "receiving the replica \(name) (\(size) bytes)")
        serve(replica, size: size)
    }

    /// Fixed newstyle: greeting, then options until GO.
    private func negotiate(size: UInt64) -> Bool {
        var greeting: [UInt8] = []
        PeerFrame.append(Self.initMagic, to: &greeting)
        PeerFrame.append(Self.optionMagic, to: &greeting)
        PeerFrame.append(UInt16(1 | 2), to: &greeting)  // FIXED_NEWSTYLE | NO_ZEROES
        guard Stream.write(fd, greeting), Stream.read(fd, count: 4) != nil else { return false }
        while let header = Stream.read(fd, count: 16) {
            let option = PeerFrame.load(UInt32.self, from: header, at: 8)
            let length = Int(PeerFrame.load(UInt32.self, from: header, at: 12))
            guard PeerFrame.load(UInt64.self, from: header, at: 0) == Self.optionMagic, length <= 65536,
                  Stream.read(fd, count: length) != nil else { return false }
            switch Option(rawValue: option) {
            case .go, .info:
                var info: [UInt8] = []
                PeerFrame.append(UInt16(0), to: &info)  // NBD_INFO_EXPORT
                PeerFrame.append(size, to: &info)
                PeerFrame.append(Self.transmissionFlags, to: &info)
                guard optionReply(option, .info, info), optionReply(option, .ack) else { return false }
                if option == Option.go.rawValue { return true }
            case .abort:
                _ = optionReply(option, .ack)
                return false
            case nil:
                guard optionReply(option, .unsupported) else { return false }
            }
        }
        return false
    }

    private func optionReply(_ option: UInt32, _ type: OptionReply, _ data: [UInt8] = []) -> Bool {
        var bytes: [UInt8] = []
        PeerFrame.append(Self.optionReplyMagic, to: &bytes)
        PeerFrame.append(option, to: &bytes)
        PeerFrame.append(type.rawValue, to: &bytes)
        PeerFrame.append(UInt32(data.count), to: &bytes)
        return Stream.write(fd, bytes + data)
    }

    private func serve(_ replica: Int32, size: UInt64) {
        var capacity = 1 << 20
        var buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        defer { buffer.deallocate() }
        var input = BufferedReader(fd: fd)
        // Replies wait here while more requests are already in: one write for many.
        var owed: [UInt8] = []
        while true {
            if input.isDrained && !owed.isEmpty {
                guard Stream.write(fd, owed) else { return }
                owed.removeAll(keepingCapacity: true)
            }
            guard let header = input.read(count: 28) else { return }
            guard PeerFrame.load(UInt32.self, from: header, at: 0) == Self.requestMagic else { return }
            let type = PeerFrame.load(UInt16.self, from: header, at: 6)
            let handle = PeerFrame.load(UInt64.self, from: header, at: 8)
            let offset = PeerFrame.load(UInt64.self, from: header, at: 16)
            let length = Int(PeerFrame.load(UInt32.self, from: header, at: 24))
            let command = Command(rawValue: type)
            if command == .disconnect { return }
            if command == .write || command == .read, length > capacity {
                guard length <= 64 << 20 else { return }
                buffer.deallocate()
                capacity = length
                buffer = .allocate(byteCount: capacity, alignment: 4096)
            }
            if command == .write, !input.read(into: buffer, count: length) { return }
            var error: Int32 = 0
            if offset > size || UInt64(length) > size - offset {
                error = EINVAL
            } else {
                switch command {
                case .write: error = FileIO.writeAll(replica, buffer, count: length, offset: offset)
                case .read: error = FileIO.readAll(replica, into: buffer, count: length, offset: offset)
                case .flush: error = fdatasync(replica) == 0 ? 0 : errno
                case .trim, .writeZeroes:
                    error = FileIO.zero(replica, offset: offset, length: UInt64(length))
                case .disconnect, nil: error = EINVAL
                }
            }
            PeerFrame.append(Self.replyMagic, to: &owed)
            PeerFrame.append(UInt32(bitPattern: error), to: &owed)
            PeerFrame.append(handle, to: &owed)
            if command == .read && error == 0 { owed += UnsafeRawBufferPointer(start: buffer, count: length) }
        }
    }
}
