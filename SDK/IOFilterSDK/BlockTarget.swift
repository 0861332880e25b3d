import Glibc
import CIOFilter
package import IOFilterNBD
internal import IOFilterPosix
import Logging

/// A block device a filter writes to or reads from on its own: a replica, a cache
/// device, a remote export. Given as a file path or an NBD URI.
public protocol BlockTarget: AnyObject, Sendable {
    var size: UInt64 { get }
    var description: String { get }
    /// `completion` runs once, possibly before this returns (files) or on another
    /// thread (NBD). The buffer must stay valid until then.
    func write(offset: UInt64, length: Int, from buffer: UnsafeRawPointer, completion: @escaping @Sendable (Int32) -> Void)
    func read(offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer, completion: @escaping @Sendable (Int32) -> Void)
    func writeZeroes(offset: UInt64, length: Int, completion: @escaping @Sendable (Int32) -> Void)
    func flush(completion: @escaping @Sendable (Int32) -> Void)
    func close()
    /// Writes several non-overlapping ranges at once (they may complete in any order);
    /// `completion` runs once with the first error, or 0.
    func writeBatch(_ writes: [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)], completion: @escaping @Sendable (Int32) -> Void)
    /// Lets the host drop what it caches of the target (after a bulk copy, say). Only
    /// a hint; the default does nothing.
    func releaseCache()
}

extension BlockTarget {
    public func releaseCache() {}

    /// One write at a time; a nil buffer writes zeroes.
    public func writeBatch(_ writes: [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)], completion: @escaping @Sendable (Int32) -> Void) {
        let pending = CountDown(count: writes.count, done: completion)
        for write in writes {
            if let buffer = write.buffer {
                self.write(offset: write.offset, length: write.length, from: buffer, completion: pending.finish)
            } else {
                writeZeroes(offset: write.offset, length: write.length, completion: pending.finish)
            }
        }
    }
}

/// Counts completions down; reports once, with the first error.
final class CountDown: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = ConditionLock()
    private var left: Int
    private var error: Int32 = 0
    private let done: @Sendable (Int32) -> Void

    init(count: Int, done: @escaping @Sendable (Int32) -> Void) {
        left = count
        self.done = done
        if count == 0 { done(0) }
    }

    @Sendable func finish(_ result: Int32) {
        let report: Int32? = lock.withLock {
            if error == 0 { error = result }
            left -= 1
            return left == 0 ? error : nil
        }
        if let report { done(report) }
    }
}

extension BlockTarget {
    /// Waits for one operation: for background threads, never for `start`.
    public func wait(_ operation: (@escaping @Sendable (Int32) -> Void) -> Void) -> Int32 {
        if self is FileTarget {
            // Files complete on the calling thread: no waiter to allocate.
            let result = InlineResult()
            operation { result.value = $0 }
            return result.value ?? EIO
        }
        return waitForCompletion(operation)
    }
}

/// Runs an operation that reports an errno through a completion, and waits for it: for
/// a filter's background threads (destaging, resync), never inside `start` or `done`.
public func waitForCompletion(_ operation: (@escaping @Sendable (Int32) -> Void) -> Void) -> Int32 {
    let result = WaitBox()
    operation { result.finish($0) }
    return result.wait()
}

/// The result of an operation that completed on the calling thread.
final class InlineResult: @unchecked Sendable {
    // @unchecked: written and read on one thread (the completion ran inline).
    var value: Int32?
}

/// How long an NBD target may leave a request unanswered before it counts as
/// unreachable (its requests fail with ETIMEDOUT): well inside the 30 s in which an
/// operator expects to hear of a cut link.
public let defaultRequestTimeout: Double? = 20

/// Opens `spec` — an NBD URI (`nbd://…`, `nbd+unix://…`) or a file path, the value of
/// one of the filter's path parameters. A file is created, or grown, to `size` if it
/// is smaller.
///
/// The host opens it (a sandboxed worker reaches no file outside its sidecar directory
/// and no network), so `spec` must be exactly what the policy set; on a host older
/// than ABI 1.1 the filter opens it itself. An NBD target's request left unanswered
/// for `requestTimeout` seconds fails with ETIMEDOUT (nil: wait as long as TCP does).
public func openBlockTarget(_ spec: String, size: UInt64?, tls: TargetTLS? = nil,
                            requestTimeout: Double? = defaultRequestTimeout) throws(FilterError) -> any BlockTarget {
    let uri = NBDURI(spec)
    if spec.contains("://") && uri == nil { throw FilterError(EINVAL, "'\(spec)' is not an NBD URI") }
    // On a host older than ABI 1.1, which has no open_target, the filter opens the
    // target itself, the way the host would.
    let fd: Int32
    if let opened = try openTarget(spec) {
        fd = opened
    } else {
        switch TargetBroker.open(spec) {
        case .success(let opened): fd = opened
        case .failure(let failure): throw FilterError(failure.code, failure.message)
        }
    }
    guard let uri else { return try FileTarget(fd: fd, path: spec, size: size) }
    do {
        return NBDTarget(client: try NBDClient(uri: uri, connected: fd, tls: tls?.handshake, requestTimeout: requestTimeout,
                                               logger: Logger(label: "iofilter.sdk.target")))
    } catch {
        throw FilterError(EIO, "cannot connect to \(spec): \(error)")
    }
}

/// TLS for an NBD target that requires it: a pre-shared key from a psktool file the
/// policy names (declare it `.path`: the host opens it, as any target). Made with
/// `TargetTLS(pskFile:)` from IOFilterSDKTLS, which links GnuTLS: a filter that speaks
/// no TLS does not link it.
public struct TargetTLS: Sendable {
    let handshake: any NBDClientHandshake

    /// The key as psktool writes it (`username:hexkey`): what a filter hands its daemon
    /// when the daemon is the one to speak TLS (`PeerTLS.connect`).
    public let pskLine: String

    package init(handshake: any NBDClientHandshake, pskLine: String) {
        self.handshake = handshake
        self.pskLine = pskLine
    }
}

/// The text of a small file a policy names (a key), opened by the host as any target.
package func readTargetFile(_ spec: String, disk: Disk?) throws(FilterError) -> String {
    let fd: Int32
    if let opened = try openTarget(spec, disk: disk) {
        fd = opened
    } else {
        fd = open(spec, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FilterError(errno, "cannot read \(spec): \(String(cString: strerror(errno)))") }
    }
    defer { close(fd) }
    var text: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = pread(fd, &chunk, chunk.count, off_t(text.count))
        if n <= 0 { break }
        text += chunk[..<n]
    }
    return String(decoding: text, as: UTF8.self)
}

/// An fd for a target the filter's policy named, opened by the host (`open_target`):
/// a file opened read-write, or a socket connected to an NBD server. Nil on a host
/// older than ABI 1.1, which has no such service (the filter opens targets itself).
public func openTarget(_ spec: String, disk: Disk? = nil) throws(FilterError) -> Int32? {
    guard let services = Host.services,
          let offset = MemoryLayout<iof_host_services>.offset(of: \.open_target),
          services.pointee.struct_size >= offset + MemoryLayout<Int>.size,
          let open = services.pointee.open_target else { return nil }
    let fd = open(disk?.handle, spec)
    guard fd >= 0 else {
        throw FilterError(-fd, "the host would not open \(spec): \(String(cString: strerror(-fd)))")
    }
    return fd
}

final class FileTarget: BlockTarget {
    let fd: Int32
    let path: String
    let size: UInt64
    var description: String { path }

    /// Takes ownership of `fd`, an open file or block device.
    init(fd: Int32, path: String, size: UInt64?) throws(FilterError) {
        self.path = path
        self.fd = fd
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            let code = errno
            Glibc.close(fd)
            throw FilterError(code, "cannot stat \(path): \(String(cString: strerror(code)))")
        }
        if let size, UInt64(info.st_size) < size, (info.st_mode & S_IFMT) == S_IFREG {
            guard ftruncate(fd, off_t(size)) == 0 else {
                let code = errno
                Glibc.close(fd)
                throw FilterError(code, "cannot grow \(path) to \(size) bytes: \(String(cString: strerror(code)))")
            }
            self.size = size
        } else {
            self.size = UInt64(info.st_size)
        }
    }

    func write(offset: UInt64, length: Int, from buffer: UnsafeRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        completion(FileDescriptorIO.pwriteAll(fd, buffer, count: length, offset: offset))
    }

    func read(offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        completion(FileDescriptorIO.preadAll(fd, into: buffer, count: length, offset: offset))
    }

    func writeZeroes(offset: UInt64, length: Int, completion: @escaping @Sendable (Int32) -> Void) {
        let zeroes = UnsafeMutableRawPointer.allocate(byteCount: min(length, 1 << 20), alignment: 4096)
        defer { zeroes.deallocate() }
        memset(zeroes, 0, min(length, 1 << 20))
        var done = 0
        while done < length {
            let n = min(1 << 20, length - done)
            let rc = FileDescriptorIO.pwriteAll(fd, zeroes, count: n, offset: offset + UInt64(done))
            if rc != 0 { return completion(rc) }
            done += n
        }
        completion(0)
    }

    func flush(completion: @escaping @Sendable (Int32) -> Void) {
        completion(fdatasync(fd) == 0 ? 0 : errno)
    }

    /// A bulk copy (a replica's initial sync) leaves the file in the page cache in
    /// large folios, and every later 4 KiB write into one costs the kernel time in
    /// proportion to the folio's size. Written back and dropped, later writes start
    /// from small pages.
    func releaseCache() {
        guard fdatasync(fd) == 0 else { return }
        _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }

    func close() { Glibc.close(fd) }
}

final class NBDTarget: BlockTarget {
    let client: NBDClient
    var size: UInt64 { client.size }
    var description: String { client.uri.description }

    init(client: NBDClient) { self.client = client }

    func write(offset: UInt64, length: Int, from buffer: UnsafeRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        client.submit(.write, offset: offset, length: length, buffer: UnsafeMutableRawPointer(mutating: buffer),
                      completion: ClosureCompletion(completion))
    }

    func read(offset: UInt64, length: Int, into buffer: UnsafeMutableRawPointer, completion: @escaping @Sendable (Int32) -> Void) {
        client.submit(.read, offset: offset, length: length, buffer: buffer, completion: ClosureCompletion(completion))
    }

    func writeZeroes(offset: UInt64, length: Int, completion: @escaping @Sendable (Int32) -> Void) {
        client.submit(.writeZeroes, offset: offset, length: length, buffer: nil, completion: ClosureCompletion(completion))
    }

    func flush(completion: @escaping @Sendable (Int32) -> Void) {
        guard client.canFlush else { return completion(0) }
        client.submit(.flush, offset: 0, length: 0, buffer: nil, completion: ClosureCompletion(completion))
    }

    /// The batch goes out in one writev, pipelined.
    func writeBatch(_ writes: [(offset: UInt64, length: Int, buffer: UnsafeRawPointer?)], completion: @escaping @Sendable (Int32) -> Void) {
        let pending = ClosureCompletion(CountDown(count: writes.count, done: completion).finish)
        client.submit(writes.map { write in
            NBDClient.Request(write.buffer == nil ? .writeZeroes : .write, offset: write.offset, length: write.length,
                              buffer: write.buffer.map { UnsafeMutableRawPointer(mutating: $0) }, completion: pending)
        })
    }

    func close() { client.disconnect() }
}

final class ClosureCompletion: NBDClientCompletion {
    let body: @Sendable (Int32) -> Void
    init(_ body: @escaping @Sendable (Int32) -> Void) { self.body = body }
    func nbdRequestDidComplete(error: Int32) { body(error) }
}

/// One result handed from a completion to a waiting thread.
final class WaitBox: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = ConditionLock()
    private var result: Int32?

    func finish(_ value: Int32) {
        lock.withLock {
            result = value
            lock.broadcast()
        }
    }

    func wait() -> Int32 {
        lock.withLock {
            while result == nil { lock.wait() }
            return result!
        }
    }
}
