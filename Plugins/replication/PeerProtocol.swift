import Glibc
import IOFilterSDK

// Replication between hosts goes filter -> local daemon -> peer daemon:
//
//   filter  --channel (frames below)-->  daemon on host A
//   daemon A  --TCP, the host opens it-->  daemon B on its peer listener:
//       TLS with a pre-shared key first, if B's operator gave one (daemon-listen --tls-psk),
//       "IOFILTER-REPLICA 1 DISK SIZE\n", answered "OK IDENTITY\n" or "ERR message\n"
//       (the identity of the replica disk, which HELLO's answer passes on to the filter),
//       then NBD (fixed newstyle, OPT_GO, simple replies) onto B's replica disk.
//
// On the channel each request is one frame, each answer one reply frame:
//   request: u32 size of what follows | u8 kind | u64 id | u64 offset | u32 length | payload
//   reply:   u32 size of what follows | u64 id | u32 errno | message (UTF-8)
// HELLO's payload is the target (iofilter://HOST:PORT/DISK), followed, if the peer
// requires TLS, by a line with the pre-shared key (username:hexkey); its offset is the disk's
// size and its length 1 if the guest waits for the replica (sync mode), else 0; WRITE carries `length` bytes; ZERO and FLUSH carry none. BATCH carries `length`
// records, each u8 kind (WRITE or ZERO) | u64 offset | u32 length | data (WRITE), and is
// answered once, when the replica has them all: the shipper sends its journal in
// batches, and a frame and a reply per record cost more than the record.
// Integers big-endian.

enum PeerFrame {
    enum Kind: UInt8 {
        case hello = 1, write = 2, zero = 3, flush = 4, batch = 5
    }
    static let batchRecordHeaderSize = 1 + 8 + 4
    static let requestHeaderSize = 4 + 1 + 8 + 8 + 4
    static let replyHeaderSize = 4 + 8 + 4
    /// Larger frames are a broken peer, not a request.
    static let maxPayload = 64 << 20

    static func requestHeader(_ kind: Kind, id: UInt64, offset: UInt64, length: UInt32, payload: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(requestHeaderSize)
        append(UInt32(requestHeaderSize - 4 + payload), to: &bytes)
        bytes.append(kind.rawValue)
        append(id, to: &bytes)
        append(offset, to: &bytes)
        append(length, to: &bytes)
        return bytes
    }

    static func reply(id: UInt64, error: Int32, message: String = "") -> [UInt8] {
        let text = Array(message.utf8.prefix(4096))
        var bytes: [UInt8] = []
        append(UInt32(replyHeaderSize - 4 + text.count), to: &bytes)
        append(id, to: &bytes)
        append(UInt32(bitPattern: error), to: &bytes)
        return bytes + text
    }

    static func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.bigEndian) { bytes += $0 }
    }

    static func load<T: FixedWidthInteger>(_ type: T.Type, from bytes: [UInt8], at offset: Int) -> T {
        bytes.withUnsafeBytes { T(bigEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    }
}

/// Blocking reads and writes on a stream socket.
enum Stream {
    /// Reads exactly `count` bytes; false at EOF or on an error.
    static func read(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = Glibc.read(fd, buffer + done, count - done)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    static func read(_ fd: Int32, count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let ok = count == 0 || bytes.withUnsafeMutableBytes { read(fd, into: $0.baseAddress!, count: count) }
        return ok ? bytes : nil
    }

    static func write(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int) -> Bool {
        var done = 0
        while done < count {
            let n = send(fd, buffer + done, count - done, Int32(MSG_NOSIGNAL))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    static func write(_ fd: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { write(fd, $0.baseAddress!, count: $0.count) }
    }

    /// One line (without its newline), at most `limit` bytes; nil at EOF or past it.
    static func readLine(_ fd: Int32, limit: Int = 1024) -> String? {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < limit {
            let n = Glibc.read(fd, &byte, 1)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return nil }
            if byte == UInt8(ascii: "\n") { return String(decoding: line, as: UTF8.self) }
            line.append(byte)
        }
        return nil
    }
}

/// Reads a stream in large chunks: a peer sends many small requests back to back, and
/// a read(2) per header and per payload cost more than the requests.
struct BufferedReader: ~Copyable {
    let fd: Int32
    private let storage: UnsafeMutableRawPointer
    private let capacity = 1 << 20
    private var start = 0
    private var end = 0

    init(fd: Int32) {
        self.fd = fd
        storage = .allocate(byteCount: capacity, alignment: 4096)
    }

    deinit { storage.deallocate() }

    /// Nothing buffered: the next read blocks (write out what you owe first).
    var isDrained: Bool { start == end }

    /// Reads exactly `count` bytes; false at EOF or on an error.
    mutating func read(into buffer: UnsafeMutableRawPointer, count: Int) -> Bool {
        var done = 0
        while done < count {
            if start == end {
                // A large payload goes straight into its buffer.
                if count - done >= capacity { return Stream.read(fd, into: buffer + done, count: count - done) }
                let n = Glibc.read(fd, storage, capacity)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { return false }
                start = 0
                end = n
            }
            let take = min(end - start, count - done)
            (buffer + done).copyMemory(from: storage + start, byteCount: take)
            start += take
            done += take
        }
        return true
    }

    mutating func read(count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        let ok = count == 0 || bytes.withUnsafeMutableBytes { read(into: $0.baseAddress!, count: count) }
        return ok ? bytes : nil
    }
}

/// `iofilter://HOST:PORT/DISK`: a disk that the replication daemon on HOST keeps.
struct PeerAddress: Equatable, Sendable {
    static let scheme = "iofilter://"
    let target: String
    let disk: String

    init?(_ target: String) {
        guard target.hasPrefix(Self.scheme) else { return nil }
        let rest = target.dropFirst(Self.scheme.count)
        guard let slash = rest.firstIndex(of: "/"), rest[..<slash].contains(":") else { return nil }
        let disk = String(rest[rest.index(after: slash)...])
        guard !disk.isEmpty, !disk.contains("/"), !disk.contains(" ") else { return nil }
        self.target = target
        self.disk = disk
    }
}
