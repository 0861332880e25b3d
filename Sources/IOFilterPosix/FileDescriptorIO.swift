import Glibc

/// Blocking I/O on raw file descriptors that retries EINTR and short transfers: the
/// handful of loops every socket and file user would otherwise write again.
public enum FileDescriptorIO {
    /// Reads exactly `count` bytes. Returns false on EOF before the first byte or after
    /// some bytes (a truncated stream); throws on errors.
    public static func readExactly(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> Bool {
        var done = 0
        while done < count {
            let n = read(fd, buffer + done, count - done)
            if n > 0 {
                done += n
            } else if n == 0 {
                return false
            } else if errno != EINTR {
                throw SystemError("read")
            }
        }
        return true
    }

    /// Reads exactly `count` bytes into a new array; nil on EOF first. For handshakes,
    /// not the data path.
    public static func readBytes(_ fd: Int32, count: Int) throws(SystemError) -> [UInt8]? {
        guard count > 0 else { return [] }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 8)
        defer { buffer.deallocate() }
        guard try readExactly(fd, into: buffer, count: count) else { return nil }
        return Array(UnsafeRawBufferPointer(start: buffer, count: count))
    }

    /// Reads exactly `count` bytes into a new array before `deadline` (monotonic
    /// nanoseconds); nil on EOF first. Throws ETIMEDOUT when the time runs out however
    /// the bytes trickle in. For a socket's handshake, not the data path.
    public static func readBytes(_ fd: Int32, count: Int, deadline: UInt64) throws(SystemError) -> [UInt8]? {
        guard count > 0 else { return [] }
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let now = monotonicNanoseconds()
            guard now < deadline else { throw SystemError("read", code: ETIMEDOUT) }
            var ready = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let waited = poll(&ready, 1, Int32(min((deadline - now) / 1_000_000 + 1, 60_000)))
            if waited < 0 {
                if errno == EINTR { continue }
                throw SystemError("poll")
            }
            if waited == 0 { continue }
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, Int32(MSG_DONTWAIT)) }
            if n == 0 { return nil }
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                throw SystemError("recv")
            }
            done += n
        }
        return bytes
    }

    /// Reads whatever is available, up to `count`; 0 means EOF.
    public static func readSome(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int) throws(SystemError) -> Int {
        while true {
            let n = read(fd, buffer, count)
            if n >= 0 { return n }
            if errno != EINTR { throw SystemError("read") }
        }
    }

    public static func writeAll(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int) throws(SystemError) {
        var done = 0
        while done < count {
            let n = write(fd, buffer + done, count - done)
            if n >= 0 {
                done += n
            } else if errno != EINTR {
                throw SystemError("write")
            }
        }
    }

    /// Reads until end of file (a pipe's writer closed it).
    public static func readToEnd(_ fd: Int32) throws(SystemError) -> [UInt8] {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if count < 0 && errno == EINTR { continue }
            guard count >= 0 else { throw SystemError("read") }
            if count == 0 { return bytes }
            bytes += chunk[..<count]
        }
    }

    /// A whole (small) file as text — /proc and cgroup files — or nil if it cannot be read.
    public static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        return (try? readToEnd(fd)).map { String(decoding: $0, as: UTF8.self) }
    }

    /// Writes `text` into an existing file (a cgroup or /proc control file); false with
    /// errno set if it cannot.
    public static func writeFile(_ text: String, to path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return (try? writeAll(fd, Array(text.utf8))) != nil
    }

    public static func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
        let failure: SystemError? = bytes.withUnsafeBytes { raw in
            do throws(SystemError) {
                try writeAll(fd, raw.baseAddress!, count: raw.count)
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw failure }
    }

    /// Writes every byte of `vectors` (which it may modify while advancing).
    public static func writeAll(_ fd: Int32, vectors: UnsafeMutablePointer<iovec>, count: Int) throws(SystemError) {
        var first = 0
        while first < count {
            let n = writev(fd, vectors + first, Int32(min(count - first, 1024 /* IOV_MAX */)))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("writev")
            }
            first = advance(vectors, count: count, from: first, by: n)
        }
    }

    /// Moves past `written` bytes of `vectors` from index `first`: whole vectors are
    /// skipped, a partly written one is trimmed in place. Returns the new first index.
    private static func advance(_ vectors: UnsafeMutablePointer<iovec>, count: Int, from first: Int, by written: Int) -> Int {
        var first = first
        var left = written
        while first < count && left >= vectors[first].iov_len {
            left -= vectors[first].iov_len
            first += 1
        }
        if left > 0 {
            vectors[first].iov_base = vectors[first].iov_base + left
            vectors[first].iov_len -= left
        }
        return first
    }

    /// Writes as much of `vectors` as the socket takes without blocking, advancing
    /// them in place. Returns the index of the first vector not yet written in full
    /// (`count` when everything went out). Sockets only: a non-socket fd writes nothing.
    public static func sendWithoutBlocking(_ fd: Int32, vectors: UnsafeMutablePointer<iovec>, count: Int) throws(SystemError) -> Int {
        var first = 0
        while first < count {
            let window = min(count - first, 1024 /* IOV_MAX */)
            var offered = 0
            for index in first..<(first + window) { offered += vectors[index].iov_len }
            var message = msghdr()
            message.msg_iov = vectors + first
            message.msg_iovlen = window
            let n = sendmsg(fd, &message, Int32(MSG_DONTWAIT | MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOTSOCK { return first }
                throw SystemError("sendmsg")
            }
            first = advance(vectors, count: count, from: first, by: n)
            if n < offered { return first }  // the socket buffer is full
        }
        return first
    }

    public static func preadAll(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, offset: UInt64) -> Int32 {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n > 0 {
                done += n
            } else if n == 0 {
                // Past the end of the file: a sparse tail reads as zeroes.
                memset(buffer + done, 0, count - done)
                return 0
            } else if errno != EINTR {
                return errno
            }
        }
        return 0
    }

    public static func pwriteAll(_ fd: Int32, _ buffer: UnsafeRawPointer, count: Int, offset: UInt64) -> Int32 {
        var done = 0
        while done < count {
            let n = pwrite(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n >= 0 {
                done += n
            } else if errno != EINTR {
                return errno
            }
        }
        return 0
    }
}

/// A directory's entries.
public enum Directory {
    /// The names in `path` (without "." and ".."), or none if it cannot be read.
    public static func entries(_ path: String) -> [String] {
        guard let directory = opendir(path) else { return [] }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}
