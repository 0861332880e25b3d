import CIOFilter
import CSystemShims
import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging

/// The storage below a chain. `submit` reads the request's `io` and calls
/// `request.backendDidComplete(error:)` exactly once, inline or from another thread.
public protocol StorageBackend: AnyObject, Sendable, CustomStringConvertible {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    var canTrim: Bool { get }
    var canWriteZeroes: Bool { get }
    func submit(_ request: ChainRequest)
    func close()
}

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
        fstat(fd, &info)
        if (info.st_mode & S_IFMT) == S_IFBLK {
            size = UInt64(lseek(fd, 0, SEEK_END))
        } else {
            size = UInt64(info.st_size)
        }
    }

    public func submit(_ request: ChainRequest) {
        request.backendDidComplete(error: perform(request.io))
    }

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
            let rc = writeZeroes(offset: offset, length: length, mayPunch: io.pointee.flags & UInt32(IOF_REQ_NO_HOLE) == 0)
            return rc != 0 || !fua ? rc : sync()
        default:
            return EINVAL
        }
    }

    private func sync() -> Int32 {
        fdatasync(fd) == 0 ? 0 : errno
    }

    private func writeZeroes(offset: UInt64, length: Int, mayPunch: Bool) -> Int32 {
        if mayPunch, iof_fallocate(fd, IOF_FALLOC_PUNCH_HOLE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length)) == 0 {
            return 0
        }
        if iof_fallocate(fd, IOF_FALLOC_ZERO_RANGE | IOF_FALLOC_KEEP_SIZE, Int64(offset), Int64(length)) == 0 {
            return 0
        }
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

    public func close() {
        _ = fdatasync(fd)
        Glibc.close(fd)
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

    public init(uri text: String, logger: Logger) throws(ChainError) {
        guard let uri = NBDURI(text) else {
            throw .backend("'\(text)' is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
        }
        do {
            client = try NBDClient(uri: uri, logger: logger)
        } catch {
            throw .backend("cannot connect to \(text): \(error)")
        }
    }

    public func submit(_ request: ChainRequest) {
        let io = request.io.pointee
        var flags: NBDProtocol.CommandFlags = []
        if io.flags & UInt32(IOF_REQ_FUA) != 0 && client.canFUA { flags.insert(.fua) }
        let command: NBDProtocol.Command
        switch io.op {
        case IOF_OP_READ: command = .read
        case IOF_OP_WRITE: command = .write
        case IOF_OP_FLUSH:
            guard client.canFlush else { return request.backendDidComplete(error: 0) }
            command = .flush
        case IOF_OP_TRIM:
            guard client.canTrim else { return request.backendDidComplete(error: 0) }
            command = .trim
        case IOF_OP_WRITE_ZEROES:
            if io.flags & UInt32(IOF_REQ_NO_HOLE) != 0 { flags.insert(.noHole) }
            command = .writeZeroes
        default:
            return request.backendDidComplete(error: EINVAL)
        }
        if io.flags & UInt32(IOF_REQ_FUA) != 0 && !client.canFUA && command != .read {
            // The server cannot do FUA: follow the write with a flush.
            client.submit(command, flags: flags, offset: io.offset, length: Int(io.length), buffer: io.buffer,
                          completion: FlushAfter(request: request, client: client))
            return
        }
        client.submit(command, flags: flags, offset: io.offset, length: Int(io.length), buffer: io.buffer, completion: request)
    }

    public func close() {
        client.disconnect()
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
