import CIOFilter
import CSystemShims
import Glibc
import IOFilterChain
import IOFilterNBD
import IOFilterPosix
import Logging
import Synchronization

/// A raw image file: pread/pwrite on the caller's thread (page-cache hits never hop
/// threads), fdatasync for flush and FUA, fallocate for trim and write-zeroes.
public final class FileBackend: StorageBackend {
    public let path: String
    public let size: UInt64
    public let readOnly: Bool
    let fd: Int32

    public var canTrim: Bool { true }
    public var canWriteZeroes: Bool { true }
    public var description: String { "file \(path)" }

    public init(path: String, readOnly: Bool) throws(ChainError) {
        self.path = path
        self.readOnly = readOnly
        fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw .backend("cannot open \(path): \(String(cString: strerror(errno)))") }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let error = String(cString: strerror(errno))
            Glibc.close(fd)
            throw .backend("cannot stat \(path): \(error)")
        }
        switch info.st_mode & S_IFMT {
        case S_IFBLK:
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else {
                let error = String(cString: strerror(errno))
                Glibc.close(fd)
                throw .backend("cannot find the size of block device \(path): \(error)")
            }
            size = UInt64(end)
        case S_IFREG:
            size = UInt64(info.st_size)
        default:
            Glibc.close(fd)
            throw .backend("\(path) is neither a regular file nor a block device")
        }
    }

    public func submit(_ request: ChainRequest) {
        if request.io.pointee.op == IOF_OP_BLOCK_STATUS, let extents = request.extents {
            return request.backendDidComplete(error: blockStatus(request.io, into: extents))
        }
        request.backendDidComplete(error: perform(request.io))
    }

    /// The range's data and holes (a file system without them, or a block device,
    /// reports all data); up to `Extents.maximum` extents.
    private func blockStatus(_ io: UnsafeMutablePointer<iof_request>, into extents: Extents) -> Int32 {
        var position = io.pointee.offset
        SparseFile.runs(fd, offset: position, length: io.pointee.length) { length, hole in
            extents.append(length: length, flags: hole ? Self.hole : 0, at: position)
            position += length
            return !extents.isFull
        }
        return 0
    }

    private static let hole = UInt32(IOF_EXTENT_HOLE | IOF_EXTENT_ZERO)

    private func perform(_ io: UnsafeMutablePointer<iof_request>) -> Int32 {
        let offset = io.pointee.offset
        let length = Int(io.pointee.length)
        let fua = io.pointee.flags & UInt32(IOF_REQ_FUA) != 0
        switch io.pointee.op {
        case IOF_OP_READ:
            guard let buffer = io.pointee.buffer else { return EINVAL }
            return FileDescriptorIO.preadAll(fd, into: buffer, count: length, offset: offset)
        case IOF_OP_WRITE:
            guard let buffer = io.pointee.buffer else { return EINVAL }
            if readOnly { return EROFS }
            let rc = FileDescriptorIO.pwriteAll(fd, buffer, count: length, offset: offset)
            return rc != 0 || !fua ? rc : sync()
        case IOF_OP_FLUSH:
            return sync()
        case IOF_OP_TRIM:
            if readOnly { return EROFS }
            // A hint: a file system that cannot punch holes keeps the data, which is allowed.
            _ = iof_fallocate(fd, IOF_FALLOC_PUNCH_HOLE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length))
            return fua ? sync() : 0
        case IOF_OP_WRITE_ZEROES:
            if readOnly { return EROFS }
            let rc = writeZeroes(offset: offset, length: length, mayPunch: io.pointee.flags & UInt32(IOF_REQ_NO_HOLE) == 0,
                                 fast: io.pointee.flags & UInt32(IOF_REQ_FAST_ZERO) != 0)
            return rc != 0 || !fua ? rc : sync()
        case IOF_OP_CACHE:
            // Prefetch into the page cache; a hint, so its failure is no error.
            _ = iof_fadvise_willneed(fd, Int64(offset), Int64(length))
            return 0
        default:
            return EINVAL
        }
    }

    private func sync() -> Int32 {
        fdatasync(fd) == 0 ? 0 : errno
    }

    private func writeZeroes(offset: UInt64, length: Int, mayPunch: Bool, fast: Bool) -> Int32 {
        if mayPunch, iof_fallocate(fd, IOF_FALLOC_PUNCH_HOLE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length)) == 0 {
            return 0
        }
        if iof_fallocate(fd, IOF_FALLOC_ZERO_RANGE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length)) == 0 {
            return 0
        }
        // A fast zero must not fall back to writing: the consumer writes them itself.
        if fast { return ENOTSUP }
        // No fallocate support: write zeroes ourselves (rare; a block device, say).
        let chunk = min(length, 1 << 20)
        let zeroes = UnsafeMutableRawPointer.allocate(byteCount: max(chunk, 1), alignment: 4096)
        defer { zeroes.deallocate() }
        memset(zeroes, 0, chunk)
        var done = 0
        while done < length {
            let n = min(chunk, length - done)
            let rc = FileDescriptorIO.pwriteAll(fd, zeroes, count: n, offset: offset + UInt64(done))
            if rc != 0 { return rc }
            done += n
        }
        return 0
    }

    /// Makes every write durable, then closes. An error here means written data may
    /// not have reached the disk: the caller logs it.
    public func close() -> Int32 {
        let synced = fdatasync(fd) == 0 ? 0 : errno
        Glibc.close(fd)
        return synced
    }
}

/// A remote NBD export as the storage below a chain (a local cache in front of slow or
/// remote storage). Requests are pipelined on one connection and complete on the
/// client's reader thread, so a slow request never blocks the next.
public final class NBDBackend: StorageBackend {
    let client: NBDClient

    public var size: UInt64 { client.size }
    public var readOnly: Bool { client.isReadOnly }
    public var canTrim: Bool { client.canTrim }
    public var canWriteZeroes: Bool { client.canWriteZeroes }
    public var description: String { "nbd \(client.uri)" }

    public convenience init(uri text: String, logger: Logger) throws(ChainError) {
        let uri = try Self.parse(text)
        let fd: Int32
        do {
            fd = try uri.connect()
        } catch {
            throw .backend("cannot connect to \(text): \(error)")
        }
        try self.init(uri: uri, connected: fd, logger: logger)
    }

    /// Over a socket already connected to the server (the worker connects before it
    /// gives up its network); the backend owns `connected`.
    public init(uri: NBDURI, connected: Int32, logger: Logger) throws(ChainError) {
        do {
            client = try NBDClient(uri: uri, connected: connected, logger: logger)
        } catch {
            throw .backend("cannot open \(uri): \(error)")
        }
    }

    public static func parse(_ text: String) throws(ChainError) -> NBDURI {
        guard let uri = NBDURI(text) else {
            throw .backend("'\(text)' is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
        }
        return uri
    }

    /// The largest piece sent as one NBD request: the protocol's payload limit for data,
    /// 1 GiB for trim and write-zeroes (whose length field is 32 bits).
    static func pieceLimit(_ op: iof_op) -> UInt64 {
        op == IOF_OP_READ || op == IOF_OP_WRITE ? UInt64(NBDProtocol.maxPayload) : 1 << 30
    }

    /// What an NBD server is asked for a request: a command and its flags, or nothing
    /// at all (a flush or trim the server does not offer succeeds as a no-op, an op
    /// NBD lacks fails).
    private enum Translation {
        case send(NBDProtocol.Command, NBDProtocol.CommandFlags)
        case finish(error: Int32)
    }

    private func translate(_ io: iof_request) -> Translation {
        var flags: NBDProtocol.CommandFlags = []
        if io.flags & UInt32(IOF_REQ_FUA) != 0 && client.canFUA { flags.insert(.fua) }
        switch io.op {
        case IOF_OP_READ: return .send(.read, [])
        case IOF_OP_WRITE: return .send(.write, flags)
        case IOF_OP_FLUSH: return client.canFlush ? .send(.flush, []) : .finish(error: 0)
        case IOF_OP_TRIM: return client.canTrim ? .send(.trim, flags) : .finish(error: 0)
        case IOF_OP_WRITE_ZEROES:
            // This client does not negotiate fast zero: such a request fails as the
            // protocol lets it, and the consumer writes the zeroes.
            if io.flags & UInt32(IOF_REQ_FAST_ZERO) != 0 { return .finish(error: ENOTSUP) }
            if io.flags & UInt32(IOF_REQ_NO_HOLE) != 0 { flags.insert(.noHole) }
            return .send(.writeZeroes, flags)
        case IOF_OP_CACHE: return .finish(error: 0)  // a hint
        default: return .finish(error: EINVAL)
        }
    }

    public func submit(_ request: ChainRequest) {
        // This client does not ask the server for block status: all data, which is
        // always true (a consumer only loses the chance to skip holes).
        if request.io.pointee.op == IOF_OP_BLOCK_STATUS, let extents = request.extents {
            extents.append(length: request.io.pointee.length, flags: 0, at: request.io.pointee.offset)
            return request.backendDidComplete(error: 0)
        }
        let io = request.io.pointee
        let command: NBDProtocol.Command, flags: NBDProtocol.CommandFlags
        switch translate(io) {
        case .finish(let error): return request.backendDidComplete(error: error)
        case .send(let translated, let translatedFlags): (command, flags) = (translated, translatedFlags)
        }
        if io.length > Self.pieceLimit(io.op) {
            return submitInPieces(request, command, flags)
        }
        if io.flags & UInt32(IOF_REQ_FUA) != 0 && !client.canFUA && command != .read {
            // The server cannot do FUA: follow the write with a flush.
            client.submit(command, flags: flags, offset: io.offset, length: Int(io.length), buffer: io.buffer,
                          completion: FlushAfter(request: request, client: client))
            return
        }
        client.submit(command, flags: flags, offset: io.offset, length: Int(io.length), buffer: io.buffer, completion: request)
    }

    public func close() -> Int32 {
        client.disconnect()
        return 0
    }

    /// A request larger than one NBD request may be (a filter's own submit_below of a
    /// whole region, say) goes as several, and completes when all have, with the first
    /// error any of them met.
    private func submitInPieces(_ request: ChainRequest, _ command: NBDProtocol.Command, _ flags: NBDProtocol.CommandFlags) {
        let io = request.io.pointee
        let limit = Self.pieceLimit(io.op)
        let pieces = Int((io.length + limit - 1) / limit)
        // Without FUA on the server, one flush after every piece has landed.
        let flushAfter = io.flags & UInt32(IOF_REQ_FUA) != 0 && !client.canFUA && client.canFlush && command != .read
        let gather = Gather(request: request, count: pieces, flushAfter: flushAfter)
        var offset: UInt64 = 0
        while offset < io.length {
            let length = min(limit, io.length - offset)
            client.submit(command, flags: flags, offset: io.offset + offset, length: Int(length),
                          buffer: io.buffer.map { $0 + Int(offset) }, completion: gather)
            offset += length
        }
    }

    private final class Gather: NBDClientCompletion, @unchecked Sendable {
        // @unchecked: the counters are atomics; the request is finished by the last piece.
        let request: ChainRequest
        let left: Atomic<Int>
        let firstError = Atomic<Int32>(0)
        let flushAfter: Bool
        init(request: ChainRequest, count: Int, flushAfter: Bool) {
            self.request = request
            self.left = Atomic(count)
            self.flushAfter = flushAfter
        }
        func nbdRequestDidComplete(error: Int32) {
            if error != 0 { _ = firstError.compareExchange(expected: 0, desired: error, ordering: .relaxed) }
            guard left.subtract(1, ordering: .acquiringAndReleasing).newValue == 0 else { return }
            let error = firstError.load(ordering: .relaxed)
            if error == 0 && flushAfter, let backend = request.chain.backend as? NBDBackend {
                // FUA for the whole: every piece is written, now make them durable.
                return backend.client.submit(.flush, offset: 0, length: 0, buffer: nil, completion: request)
            }
            request.backendDidComplete(error: error)
        }
    }

    private final class FlushAfter: NBDClientCompletion, @unchecked Sendable {
        // @unchecked: used once, by the client's reader thread.
        let request: ChainRequest
        let client: NBDClient
        init(request: ChainRequest, client: NBDClient) {
            self.request = request
            self.client = client
        }
        func nbdRequestDidComplete(error: Int32) {
            guard error == 0, client.canFlush else { return request.backendDidComplete(error: error) }
            client.submit(.flush, offset: 0, length: 0, buffer: nil, completion: request)
        }
    }
}
