import Glibc
import IOFilterSDK

/// A filter instance's link to the replication daemon on its own host, over the channel
/// the host gives it. Sessions (`PeerTarget`s) come and go on it as the shipper
/// connects and reconnects; replies find their request by id, whichever session sent it.
final class PeerLink: @unchecked Sendable {
    // @unchecked: `channel`, `pending` and `nextID` are guarded by `lock`; `writeLock`
    // keeps frames whole on the channel.
    let disk: Disk
    private let lock = ConditionLock()
    private let writeLock = ConditionLock()
    private var channel: Int32?
    private var pending: [UInt64: (_ error: Int32, _ message: String) -> Void] = [:]
    private var nextID: UInt64 = 1

    init(disk: Disk) { self.disk = disk }

    /// A session to `address` through the daemon: it connects to the peer and answers.
    /// `tls`: the peer requires TLS; the daemon, which holds the connection, speaks it.
    func open(_ address: PeerAddress, synchronous: Bool, tls: TargetTLS?) throws(FilterError) -> PeerTarget {
        guard let fd = currentChannel() else {
            throw FilterError(ECONNREFUSED, "the replication daemon on this host is not running")
        }
        let payload = Array((address.target + (tls.map { "\n" + $0.pskLine } ?? "")).utf8)
        let answer = Answer()
        send(.hello, offset: disk.size, length: synchronous ? 1 : 0, payload: payload, on: fd) { error, message in answer.finish(error, message) }
        let (error, message) = answer.wait()
        guard error == 0 else { throw FilterError(error, message.isEmpty ? String(cString: strerror(error)) : message) }
        return PeerTarget(link: self, address: address, size: disk.size, channel: fd, identity: message)
    }

    /// The channel to use: the one a reader serves, or a fresh one from the host (after
    /// the daemon restarted, the host's next answer is a new connection).
    private func currentChannel() -> Int32? {
        lock.withLock {
            if let channel { return channel }
            guard let fd = disk.daemonChannel() else { return nil }
            channel = fd
            startThread(name: "replication-peer") { [self] in readReplies(from: fd) }
            return fd
        }
    }

    /// Sends one request; `completion` runs once, with the daemon's answer or EPIPE.
    func send(_ kind: PeerFrame.Kind, offset: UInt64, length: UInt32, payload: UnsafeRawBufferPointer? = nil, on fd: Int32,
              completion: @escaping (Int32, String) -> Void) {
        let id: UInt64? = lock.withLock {
            guard channel == fd else { return nil }
            defer { nextID += 1 }
            pending[nextID] = completion
            return nextID
        }
        guard let id else { return completion(EPIPE, "the channel to the daemon closed") }
        let header = PeerFrame.requestHeader(kind, id: id, offset: offset, length: length, payload: payload?.count ?? 0)
        let sent = writeLock.withLock {
            Stream.write(fd, header) && (payload.map { $0.isEmpty || Stream.write(fd, $0.baseAddress!, count: $0.count) } ?? true)
        }
        if !sent, let completion = lock.withLock({ pending.removeValue(forKey: id) }) {
            completion(EPIPE, "the channel to the daemon closed")
        }
    }

    func send(_ kind: PeerFrame.Kind, offset: UInt64, length: UInt32, payload: [UInt8], on fd: Int32,
              completion: @escaping (Int32, String) -> Void) {
        payload.withUnsafeBytes { send(kind, offset: offset, length: length, payload: $0, on: fd, completion: completion) }
    }

    private func readReplies(from fd: Int32) {
        var header = [UInt8](repeating: 0, count: PeerFrame.replyHeaderSize)
        while header.withUnsafeMutableBytes({ Stream.read(fd, into: $0.baseAddress!, count: $0.count) }) {
            let size = Int(PeerFrame.load(UInt32.self, from: header, at: 0))
            guard size >= PeerFrame.replyHeaderSize - 4, size - (PeerFrame.replyHeaderSize - 4) <= 4096,
                  let message = Stream.read(fd, count: size - (PeerFrame.replyHeaderSize - 4)) else { break }
            let id = PeerFrame.load(UInt64.self, from: header, at: 4)
            let error = Int32(bitPattern: PeerFrame.load(UInt32.self, from: header, at: 12))
            lock.withLock { pending.removeValue(forKey: id) }?(error, String(decoding: message, as: UTF8.self))
        }
        // The daemon went away: every request still waiting fails, and the next
        // session asks the host for a fresh channel.
        let orphans = lock.withLock { () -> [(Int32, String) -> Void] in
            defer { pending = [:] }
            if channel == fd { channel = nil }
            return Array(pending.values)
        }
        for completion in orphans { completion(EPIPE, "the replication daemon closed the channel") }
    }

    /// One answer, waited for (HELLO, from the shipper's thread).
    private final class Answer: @unchecked Sendable {
        // @unchecked: guarded by `lock`.
        private let lock = ConditionLock()
        private var result: (Int32, String)?
        func finish(_ error: Int32, _ message: String) {
            lock.withLock {
                result = (error, message)
                lock.broadcast()
            }
        }
        func wait() -> (Int32, String) {
            lock.withLock {
                while result == nil { lock.wait() }
                return result!
            }
        }
    }
}

/// The replica on another host, as the shipper sees it: writes go as frames to the
/// local daemon, which forwards them to the peer daemon that keeps the replica.
final class PeerTarget: BlockTarget, @unchecked Sendable {
    // @unchecked: immutable.
    let link: PeerLink
    let address: PeerAddress
    let size: UInt64
    let channel: Int32
    /// The replica disk's identity, as its keeper reported it.
    let identity: String
    var description: String { address.target }

    init(link: PeerLink, address: PeerAddress, size: UInt64, channel: Int32, identity: String) {
        self.link = link
        self.address = address
        self.size = size
        self.channel = channel
        self.identity = identity
    }

    func write(offset: UInt64, length: Int, from buffer: UnsafeRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        link.send(.write, offset: offset, length: UInt32(length), payload: UnsafeRawBufferPointer(start: buffer, count: length),
                  on: channel) { error, _ in completion(error) }
    }

    func writeZeroes(offset: UInt64, length: Int, completion: @escaping @Sendable (Int32) -> Void) {
        link.send(.zero, offset: offset, length: UInt32(length), on: channel) { error, _ in completion(error) }
    }

    func flush(completion: @escaping @Sendable (Int32) -> Void) {
        link.send(.flush, offset: 0, length: 0, on: channel) { error, _ in completion(error) }
    }

    /// The shipper's journal batch as one frame, answered once.
    func writeBatch(_ writes: [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)], completion: @escaping @Sendable (Int32) -> Void) {
        var payload: [UInt8] = []
        payload.reserveCapacity(writes.reduce(0) { $0 + PeerFrame.batchRecordHeaderSize + ($1.buffer == nil ? 0 : $1.length) })
        for write in writes {
            payload.append(write.buffer == nil ? PeerFrame.Kind.zero.rawValue : PeerFrame.Kind.write.rawValue)
            PeerFrame.append(write.offset, to: &payload)
            PeerFrame.append(UInt32(write.length), to: &payload)
            if let buffer = write.buffer { payload += UnsafeRawBufferPointer(start: buffer, count: write.length) }
        }
        link.send(.batch, offset: 0, length: UInt32(writes.count), payload: payload, on: channel) { error, _ in completion(error) }
    }

    /// The shipper never reads its replica.
    func read(offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        completion(ENOTSUP)
    }

    /// The link outlives its sessions: nothing to close here.
    func close() {}
}
