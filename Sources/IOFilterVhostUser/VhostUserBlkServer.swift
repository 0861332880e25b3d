import CSystemShims
import CVhostUser
import Glibc
import IOFilterPosix
import Logging
import Synchronization

/// Serves one disk over vhost-user-blk: accepts the front-end (QEMU) on a listening
/// unix socket, answers its messages on one thread, and serves each virtqueue on a
/// thread of its own while the front-end has it started. One front-end at a time; one
/// that reconnects (QEMU's `reconnect=`) is served again, and the requests the previous
/// connection left in flight are submitted again from the shared inflight region.
public final class VhostUserBlkServer: @unchecked Sendable {
    // @unchecked: the mutable state (the connection's socket, stopping) is under `lock`.
    public let export: any VirtioBlkExport
    public let queues: UInt16
    public let serial: String
    let logger: Logger
    private let lock = ConditionLock()
    private var stopping = false
    private var connection: Int32 = -1
    private var running = 0
    private let wake = WakePipe()

    /// - Parameters:
    ///   - queues: virtqueues offered (the guest's blk-mq hardware queues), 1 to 16.
    ///   - serial: what the guest reads as the disk's serial (GET_ID), 20 bytes at most.
    public init(export: any VirtioBlkExport, queues: UInt16 = 1, serial: String, logger: Logger) {
        self.export = export
        self.queues = min(max(queues, 1), UInt16(IOF_VU_MAX_QUEUES))
        self.serial = String(serial.utf8.prefix(Int(IOF_VIRTIO_BLK_ID_BYTES)))!
        self.logger = logger
    }

    /// Accepts front-ends on `listenFD` on a new thread until `stop`; the listening
    /// socket stays its owner's.
    public func serve(listenFD: Int32) {
        lock.withLock { running += 1 }
        startThread(name: "vhost-accept") { [self] in
            acceptLoop(listenFD)
            lock.withLock {
                running -= 1
                lock.broadcast()
            }
        }
    }

    /// Ends the connection (its queues stop once their requests are answered) and
    /// accepts no more; returns when nothing of the server runs.
    public func stop() {
        lock.withLock {
            stopping = true
            if connection >= 0 { shutdown(connection, Int32(SHUT_RDWR)) }
        }
        wake.wake()
        lock.withLock {
            while running > 0 { lock.wait() }
        }
    }

    private func acceptLoop(_ listenFD: Int32) {
        var ready = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0), pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
        while true {
            if poll(&ready, 2, -1) < 0 {
                if errno == EINTR { continue }
                logger.error("poll on the vhost-user socket failed: \(SystemError("poll"))")
                return
            }
            if ready[1].revents != 0 || lock.withLock({ stopping }) { return }
            let client = Sockets.accept(listenFD)
            if client < 0 {
                if errno == EINTR || errno == ECONNABORTED || errno == EAGAIN { continue }
                logger.error("accept on the vhost-user socket failed: \(SystemError("accept"))")
                return
            }
            // One front-end drives a device; a second would fight it over the rings.
            let admitted = lock.withLock {
                guard !stopping, connection < 0 else { return false }
                connection = client
                running += 1
                return true
            }
            guard admitted else {
                logger.warning("refused a second vhost-user front-end: this disk has one")
                close(client)
                continue
            }
            startThread(name: "vhost-conn") { [self] in
                serveConnection(client)
                lock.withLock {
                    connection = -1
                    close(client)
                    running -= 1
                    lock.broadcast()
                }
            }
        }
    }

    private func serveConnection(_ socket: Int32) {
        let device = VirtioDevice(server: self)
        logger.info("a vhost-user front-end connected")
        let problem = device.run(socket: socket)
        if let problem {
            logger.error("closing the vhost-user connection: \(problem)")
        } else {
            logger.info("the vhost-user front-end disconnected")
        }
    }
}

/// One front-end's device: the C device that speaks the protocol, and the queues it
/// starts and stops through its callbacks.
final class VirtioDevice: @unchecked Sendable {
    // @unchecked: `queues` changes only on the connection's thread (in the callbacks).
    let server: VhostUserBlkServer
    private(set) var raw: OpaquePointer?
    private var queues: [VirtioQueue?]

    init(server: VhostUserBlkServer) {
        self.server = server
        queues = Array(repeating: nil, count: Int(server.queues))
    }

    /// Handles messages until the connection ends; nil if it ended cleanly.
    func run(socket: Int32) -> String? {
        var disk = iof_vu_disk()
        disk.size_bytes = server.export.size
        disk.block_size = 512
        disk.queues = server.queues
        disk.read_only = server.export.readOnly
        disk.can_discard = server.export.canDiscard
        disk.can_write_zeroes = server.export.canWriteZeroes
        withUnsafeMutableBytes(of: &disk.serial) { bytes in
            for (index, byte) in server.serial.utf8.enumerated() { bytes[index] = byte }
        }
        let callbacks = iof_vu_callbacks(
            context: Unmanaged.passUnretained(self).toOpaque(),
            start_queue: { context, index, kick, resubmitted in
                Unmanaged<VirtioDevice>.fromOpaque(context!).takeUnretainedValue().startQueue(index, kick: kick, resubmitted: resubmitted)
            },
            stop_queue: { context, index in
                Unmanaged<VirtioDevice>.fromOpaque(context!).takeUnretainedValue().stopQueue(index)
            })
        raw = iof_vu_new(&disk, callbacks)
        guard let raw else { return "out of memory" }
        defer {
            iof_vu_free(raw)  // stops every queue through the callbacks first
            self.raw = nil
        }
        while true {
            var problem: UnsafePointer<CChar>?
            let rc = iof_vu_handle_message(raw, socket, &problem)
            if rc == 0 { continue }
            if rc == -ECONNRESET || rc == -EPIPE { return nil }
            return problem.map { String(cString: $0) } ?? "\(SystemError("the vhost-user socket", code: -rc))"
        }
    }

    private func startQueue(_ index: UInt16, kick: Int32, resubmitted: UInt16) {
        if resubmitted > 0 {
            server.logger.notice("virtqueue \(index): \(resubmitted) request(s) the previous worker left in flight are submitted again")
        }
        let queue = VirtioQueue(device: self, index: index, kick: kick)
        queues[Int(index)] = queue
        queue.start()
    }

    private func stopQueue(_ index: UInt16) {
        queues[Int(index)]?.stop()
        queues[Int(index)] = nil
    }
}

/// One virtqueue served on its own thread: waits for the guest's kick, takes every
/// request the ring holds, and hands each to the export in the slot of its descriptor
/// head (a head is the guest's until it is returned, so a slot is never shared).
final class VirtioQueue: @unchecked Sendable {
    // @unchecked: slots belong to the queue's thread; `outstanding` is atomic; a
    // completion touches only its own slot and the C queue (which locks).
    // Strong: a queue's thread drops the last reference to the queue after `stop` has
    // returned, possibly after the connection ended.
    let device: VirtioDevice
    let index: UInt16
    let kick: Int32
    private var slots: [VirtioBlkRequest?] = Array(repeating: nil, count: Int(IOF_VU_MAX_QUEUE_SIZE))
    private let outstanding = Atomic<Int>(0)
    private let stopping = Atomic<Bool>(false)
    private let done = ConditionLock()
    private var finished = false
    private let wake = WakePipe()

    init(device: VirtioDevice, index: UInt16, kick: Int32) {
        self.device = device
        self.index = index
        self.kick = kick
    }

    func start() {
        startThread(name: "vhost-q\(index)") { [self] in
            serve()
            done.withLock {
                finished = true
                done.broadcast()
            }
        }
    }

    /// Returns once the thread stopped taking requests and every request it took is answered.
    func stop() {
        stopping.store(true, ordering: .releasing)
        wake.wake()
        done.withLock {
            while !finished || outstanding.load(ordering: .acquiring) > 0 { _ = done.wait(nanoseconds: 10_000_000) }
        }
        // Released here, on the connection's thread and before the export may close.
        for index in slots.indices {
            if let context = slots[index]?.exportContext { device.server.export.releaseRequestContext(context) }
            slots[index] = nil
        }
    }

    private let tracing = getenv("IOFILTER_VHOST_TRACE") != nil
    /// The queue's thread, and whether it is draining the ring: answers it gives then
    /// are returned quietly and the guest is signalled once for the lot. Both are read
    /// by other threads only after the thread check failed them.
    private var queueThread = pthread_self()
    private var draining = false
    private var answeredQuietly = false

    private func serve() {
        var ready = [pollfd(fd: kick, events: Int16(POLLIN), revents: 0), pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
        guard let raw = device.raw else { return }
        queueThread = pthread_self()
        // Requests may be waiting already (a reconnect's resubmissions, kicks before we ran).
        while !stopping.load(ordering: .acquiring) {
            if !takeRequests(raw) { return }
            // Kicks were off while it drained: on again, and drain again if requests
            // came in between.
            if !iof_vu_ready_to_sleep(raw, index) { continue }
            let rc = poll(&ready, 2, tracing ? 5000 : -1)
            if rc < 0 {
                if errno == EINTR { continue }
                return
            }
            if rc == 0 {
                iof_vu_trace_queue(raw, index, "idle for 5 s (\(outstanding.load(ordering: .relaxed)) outstanding)")
                continue
            }
            if ready[1].revents != 0 { return }
            if ready[0].revents & Int16(POLLIN) != 0 { iof_vu_drain_kick(kick) }
            if ready[0].revents & Int16(POLLHUP | POLLERR | POLLNVAL) != 0 { return }
        }
    }

    /// Takes what the ring holds, with the guest's kicks off meanwhile; false if the
    /// ring is broken. The requests answered while it drains are signalled once, at the end.
    private func takeRequests(_ raw: OpaquePointer) -> Bool {
        iof_vu_suppress_kicks(raw, index)
        draining = true
        defer {
            draining = false
            if answeredQuietly {
                answeredQuietly = false
                iof_vu_notify(raw, index)
            }
        }
        var head: UInt16 = 0
        while !stopping.load(ordering: .relaxed) {
            let rc = iof_vu_next_head(raw, index, &head)
            if rc == 0 { return true }
            if rc < 0 {
                device.server.logger.error("virtqueue \(index): the guest's ring indices make no sense; the queue is served no more")
                return false
            }
            let request = slots[Int(head)] ?? makeSlot(Int(head))
            iof_vu_read_request(raw, index, head, request.raw)
            outstanding.wrappingAdd(1, ordering: .relaxed)
            dispatch(request)
        }
        return true
    }

    private func makeSlot(_ head: Int) -> VirtioBlkRequest {
        let slot = VirtioBlkRequest(queue: self)
        slot.exportContext = device.server.export.makeRequestContext(for: slot)
        slots[head] = slot
        return slot
    }

    private func dispatch(_ request: VirtioBlkRequest) {
        let raw = request.raw
        let export = device.server.export
        if let problem = raw.pointee.problem {
            device.server.logger.warning("virtqueue \(index): a malformed request (\(String(cString: problem))): failing it")
            return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_IOERR), written: 0)
        }
        let type = Int32(raw.pointee.type)
        let sector = raw.pointee.sector
        switch type {
        case IOF_VIRTIO_BLK_T_GET_ID:
            let length = min(Int(raw.pointee.data_length), Int(IOF_VIRTIO_BLK_ID_BYTES))
            request.reserve(Int(raw.pointee.data_length))
            request.buffer.initializeMemory(as: UInt8.self, repeating: 0, count: Int(raw.pointee.data_length))
            for (index, byte) in device.server.serial.utf8.prefix(length).enumerated() { request.buffer.storeBytes(of: byte, toByteOffset: index, as: UInt8.self) }
            request.scatter()
            return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_OK), written: raw.pointee.data_length)
        case IOF_VIRTIO_BLK_T_IN, IOF_VIRTIO_BLK_T_OUT:
            let length = raw.pointee.data_length
            guard length % 512 == 0, sector <= export.size / 512, UInt64(length) <= export.size - sector * 512 else {
                return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_IOERR), written: 0)
            }
            if type == IOF_VIRTIO_BLK_T_OUT, export.readOnly { return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_IOERR), written: 0) }
            request.command = type == IOF_VIRTIO_BLK_T_IN ? .read : .write
            request.offset = sector * 512
            request.length = length
            request.reserve(Int(length))
            if type == IOF_VIRTIO_BLK_T_OUT { request.gather() }
        case IOF_VIRTIO_BLK_T_FLUSH:
            request.command = .flush
            request.offset = 0
            request.length = 0
        case IOF_VIRTIO_BLK_T_DISCARD, IOF_VIRTIO_BLK_T_WRITE_ZEROES:
            let start = raw.pointee.range_sector, count = UInt64(raw.pointee.range_sectors)
            let supported = type == IOF_VIRTIO_BLK_T_DISCARD ? export.canDiscard : export.canWriteZeroes
            guard supported, !export.readOnly else { return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_UNSUPP), written: 0) }
            guard count > 0, count <= UInt64(UInt32.max) / 512, start <= export.size / 512, count <= export.size / 512 - start else {
                return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_IOERR), written: 0)
            }
            request.command = type == IOF_VIRTIO_BLK_T_DISCARD ? .discard : .writeZeroes(mayUnmap: raw.pointee.range_flags & 1 != 0)
            request.offset = start * 512
            request.length = UInt32(count * 512)
        default:
            return answer(request, status: UInt8(IOF_VIRTIO_BLK_S_UNSUPP), written: 0)
        }
        export.submit(request)
    }

    /// The export's answer: a read's bytes go to the guest, then the status.
    func finish(_ request: VirtioBlkRequest, error: Int32) {
        var written: UInt32 = 0
        if error == 0, request.command == .read {
            request.scatter()
            written = request.length
        }
        answer(request, status: UInt8(error == 0 ? IOF_VIRTIO_BLK_S_OK : IOF_VIRTIO_BLK_S_IOERR), written: written)
    }

    private func answer(_ request: VirtioBlkRequest, status: UInt8, written: UInt32) {
        if let raw = device.raw {
            if pthread_equal(pthread_self(), queueThread) != 0, draining {
                iof_vu_complete_quietly(raw, request.raw, status, written)
                answeredQuietly = true
            } else {
                iof_vu_complete(raw, request.raw, status, written)
            }
        }
        if outstanding.wrappingSubtract(1, ordering: .acquiringAndReleasing).newValue == 0, stopping.load(ordering: .acquiring) {
            done.withLock { done.broadcast() }
        }
    }
}
