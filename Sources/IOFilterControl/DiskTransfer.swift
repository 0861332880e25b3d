import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging

/// Copies a whole disk from an NBD export (a worker serving it through its chain) to a
/// new raw file or to another NBD export, a window of reads in flight at a time.
enum DiskTransfer {
    enum Sink {
        /// A new file: all-zero chunks are left as holes.
        case newFile(path: String)
        /// An export whose old contents are overwritten: zero chunks become write-zeroes.
        case nbd(uri: String)
    }

    static let chunk = 1 << 20
    static let window = 8

    /// Returns the number of bytes copied; `progress` hears (bytes done, bytes in all)
    /// after each window.
    static func copy(from source: String, to sink: Sink, logger: Logger,
                     progress: (UInt64, UInt64) -> Void = { _, _ in }) throws(ControlError) -> Int64 {
        guard let sourceURI = NBDURI(source) else { throw .internalError("bad source URI \(source)") }
        let reader: NBDClient
        do {
            reader = try NBDClient(uri: sourceURI, logger: logger)
        } catch {
            throw .workerFailed("cannot read \(source): \(error)")
        }
        defer { reader.disconnect() }
        let size = reader.size
        var writer: NBDClient?
        var fd: Int32 = -1
        switch sink {
        case .newFile(let path):
            fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
            guard fd >= 0 else { throw .badRequest("cannot create \(path): \(String(cString: strerror(errno)))") }
            guard ftruncate(fd, off_t(size)) == 0 else {
                let message = String(cString: strerror(errno))
                close(fd)
                unlink(path)
                throw .conflict("cannot size \(path) to \(size) bytes: \(message)")
            }
        case .nbd(let uri):
            guard let target = NBDURI(uri) else { throw .internalError("bad target URI \(uri)") }
            do {
                writer = try NBDClient(uri: target, logger: logger)
            } catch {
                throw .workerFailed("cannot write \(uri): \(error)")
            }
            guard writer!.size >= size else {
                throw .conflict("the target (\(writer!.size) bytes) is smaller than the source (\(size) bytes)")
            }
        }
        defer {
            writer?.disconnect()
            if fd >= 0 { close(fd) }
        }
        let buffers = (0..<window).map { _ in UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096) }
        defer { buffers.forEach { $0.deallocate() } }

        var offset: UInt64 = 0
        while offset < size {
            let lengths = (0..<window).map { index -> Int in
                let start = offset + UInt64(index * chunk)
                return start >= size ? 0 : Int(min(UInt64(chunk), size - start))
            }.filter { $0 > 0 }
            let reads = Batch(count: lengths.count)
            for (index, length) in lengths.enumerated() {
                reader.submit(.read, offset: offset + UInt64(index * chunk), length: length, buffer: buffers[index], completion: reads)
            }
            if let error = reads.wait() {
                if case .newFile(let path) = sink { unlink(path) }
                throw .workerFailed("reading the source at offset \(offset) failed: \(String(cString: strerror(error)))")
            }
            if let writer {
                let writes = Batch(count: lengths.count)
                for (index, length) in lengths.enumerated() {
                    let at = offset + UInt64(index * chunk)
                    if isZero(buffers[index], length) && writer.canWriteZeroes {
                        writer.submit(.writeZeroes, offset: at, length: length, buffer: nil, completion: writes)
                    } else {
                        writer.submit(.write, offset: at, length: length, buffer: buffers[index], completion: writes)
                    }
                }
                if let error = writes.wait() {
                    throw .workerFailed("writing the target at offset \(offset) failed: \(String(cString: strerror(error)))")
                }
            } else {
                for (index, length) in lengths.enumerated() where !isZero(buffers[index], length) {
                    let result = FileDescriptorIO.pwriteAll(fd, buffers[index], count: length, offset: offset + UInt64(index * chunk))
                    if result != 0 {
                        if case .newFile(let path) = sink { unlink(path) }
                        throw .conflict("writing the export failed: \(String(cString: strerror(result)))")
                    }
                }
            }
            offset += UInt64(lengths.reduce(0, +))
            progress(offset, size)
        }
        if let writer {
            let flush = Batch(count: 1)
            writer.submit(.flush, offset: 0, length: 0, buffer: nil, completion: flush)
            if let error = flush.wait() { throw .workerFailed("flushing the target failed: \(String(cString: strerror(error)))") }
        } else if fsync(fd) != 0 {
            throw .conflict("cannot sync the export: \(String(cString: strerror(errno)))")
        }
        return Int64(size)
    }

    static func isZero(_ buffer: UnsafeMutableRawPointer, _ count: Int) -> Bool {
        let words = buffer.assumingMemoryBound(to: UInt64.self)
        for index in 0..<(count / 8) where words[index] != 0 { return false }
        let bytes = buffer.assumingMemoryBound(to: UInt8.self)
        for index in (count / 8 * 8)..<count where bytes[index] != 0 { return false }
        return true
    }

    /// Counts down the requests of one window; keeps the first error.
    final class Batch: NBDClientCompletion, @unchecked Sendable {
        // @unchecked: `remaining` and `error` are guarded by `lock`.
        private let lock = ConditionLock()
        private var remaining: Int
        private var error: Int32?

        init(count: Int) { remaining = count }

        func nbdRequestDidComplete(error: Int32) {
            lock.withLock {
                if error != 0 && self.error == nil { self.error = error }
                remaining -= 1
                if remaining == 0 { lock.broadcast() }
            }
        }

        func wait() -> Int32? {
            lock.withLock {
                while remaining > 0 { lock.wait() }
                return error
            }
        }
    }
}
