import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterModel
import IOFilterNBDServer
import IOFilterPosix
import IOFilterTracking
import IOFilterVhostUser

/// Offers a chain to NBD clients: each NBD request slot gets a `ChainRequest` once,
/// and every request runs through the chain on the connection's thread.
public final class ChainExport: NBDExport {
    public let name: String
    public let chain: Chain
    public let features: NBDExportFeatures
    public var size: UInt64 { chain.backend.size }

    public init(name: String, chain: Chain, readOnly: Bool) {
        self.name = name
        self.chain = chain
        let backend = chain.backend
        features = NBDExportFeatures(
            readOnly: readOnly || backend.readOnly, flush: true, fua: true, trim: backend.canTrim,
            writeZeroes: backend.canWriteZeroes,
            multiConn: chain.filters.allSatisfy { $0.plugin.library.manifest.multiConn },
            cache: true, fastZero: backend.canWriteZeroes, blockStatus: true)
    }

    public func makeRequestContext(for request: NBDRequest) -> AnyObject? {
        ChainRequest(chain: chain, top: 0, completion: .nbd(request))
    }

    public func releaseRequestContext(_ context: AnyObject) {
        unsafeDowncast(context, to: ChainRequest.self).retire()
    }

    public func submit(_ request: NBDRequest) {
        let chained = unsafeDowncast(request.exportContext!, to: ChainRequest.self)
        var flags: UInt32 = 0
        if request.flags.contains(.fua) { flags |= UInt32(IOF_REQ_FUA) }
        if request.flags.contains(.noHole) { flags |= UInt32(IOF_REQ_NO_HOLE) }
        if request.flags.contains(.fastZero) { flags |= UInt32(IOF_REQ_FAST_ZERO) }
        let op: iof_op
        var buffer: UnsafeMutableRawPointer? = nil
        switch request.command {
        case .read: op = IOF_OP_READ; buffer = request.buffer
        case .write: op = IOF_OP_WRITE; buffer = request.buffer
        case .flush: op = IOF_OP_FLUSH
        case .trim: op = IOF_OP_TRIM
        case .writeZeroes: op = IOF_OP_WRITE_ZEROES
        case .blockStatus: op = IOF_OP_BLOCK_STATUS
        case .cache: op = IOF_OP_CACHE
        default: return request.complete(error: EINVAL)
        }
        chained.startConsumerRequest(op: op, flags: flags, offset: request.offset, length: UInt64(request.length), buffer: buffer)
    }
}

extension ChainExport {
    /// A checkpoint's bitmap is offered while it can be trusted.
    public var metadataContextNames: [String] {
        chain.tracker.allBitmaps.filter { $0.inconsistency == nil }.map { CheckpointInfo.metaContextPrefix + $0.name }
    }

    public func metadataContext(named name: String) -> (any NBDMetadataContext)? {
        BitmapContext.named(name, among: chain.tracker.allBitmaps)
    }
}

extension BitmapContext {
    /// The context for `qemu:dirty-bitmap:NAME` among these bitmaps, if it may be offered.
    static func named(_ context: String, among bitmaps: [ChangeBitmap]) -> BitmapContext? {
        guard context.hasPrefix(CheckpointInfo.metaContextPrefix) else { return nil }
        let name = context.dropFirst(CheckpointInfo.metaContextPrefix.count)
        return bitmaps.first { $0.name == name && $0.inconsistency == nil }.map(BitmapContext.init)
    }
}

/// A point-in-time snapshot offered read-only by the worker that makes it, while it is
/// being copied and after: reads preserve what they read first, so they see the
/// instant's bytes whatever the disk's consumers write meanwhile. Its frozen
/// checkpoints are offered as `qemu:dirty-bitmap:NAME` (changes from each checkpoint to
/// the snapshot's instant): what an incremental backup reads.
public final class SnapshotExport: NBDExport {
    public let copy: PointInTimeCopy
    public var name: String { copy.name }
    public var size: UInt64 { copy.size }
    public let features = NBDExportFeatures(readOnly: true, flush: true, fua: false, trim: false, writeZeroes: false,
                                            multiConn: true, cache: false, fastZero: false, blockStatus: true)

    public init(_ copy: PointInTimeCopy) { self.copy = copy }

    public func makeRequestContext(for request: NBDRequest) -> AnyObject? { nil }

    public func submit(_ request: NBDRequest) {
        switch request.command {
        case .read:
            request.complete(error: copy.read(into: request.buffer, offset: request.offset, length: Int(request.length)))
        case .flush:
            request.complete(error: 0)
        case .blockStatus:
            // What is in the snapshot's file already has its holes; the rest is called
            // data (the disk's own holes may have changed since the instant).
            if copy.isPreserved(offset: request.offset, length: UInt64(request.length)) {
                SparseFile.runs(copy.targetFD, offset: request.offset, length: UInt64(request.length)) { length, hole in
                    request.appendExtent(length: UInt32(length), flags: hole ? UInt32(IOF_EXTENT_HOLE | IOF_EXTENT_ZERO) : 0)
                }
            } else {
                _ = request.appendExtent(length: request.length, flags: 0)
            }
            request.complete(error: 0)
        default:
            request.complete(error: EPERM)
        }
    }

    public var metadataContextNames: [String] {
        copy.frozenBitmaps.filter { $0.inconsistency == nil }.map { CheckpointInfo.metaContextPrefix + $0.name }
    }

    public func metadataContext(named name: String) -> (any NBDMetadataContext)? {
        BitmapContext.named(name, among: copy.frozenBitmaps)
    }
}

/// The exports one disk's NBD server offers: the disk through its chain, and the
/// point-in-time snapshots its worker made of it (added while it serves).
public final class ChainCatalog: NBDExportCatalog {
    public let disk: ChainExport
    private let snapshots = Guarded<[SnapshotExport]>([])

    public init(disk: ChainExport) {
        self.disk = disk
    }

    public func export(named name: String) -> (any NBDExport)? {
        if name.isEmpty || name == disk.name { return disk }
        return snapshots.withLock { $0.first { $0.name == name } }
    }

    public var exportNames: [String] { [disk.name] + snapshots.withLock { $0.map(\.name) } }

    public func offer(_ snapshot: SnapshotExport) {
        snapshots.withLock { $0.append(snapshot) }
    }

    public func withdraw(_ name: String) -> SnapshotExport? {
        snapshots.withLock { list in
            guard let index = list.firstIndex(where: { $0.name == name }) else { return nil }
            return list.remove(at: index)
        }
    }

    public func snapshot(named name: String) -> SnapshotExport? { snapshots.withLock { $0.first { $0.name == name } } }
}

/// Offers a chain to a vhost-user-blk front-end (a guest's virtio disk): each of its
/// request slots gets a `ChainRequest` once, and each request runs through the same
/// chain, with the same flags rules and tracking, as an NBD client's.
public final class ChainVirtioExport: VirtioBlkExport {
    public let chain: Chain
    public let readOnly: Bool
    public var size: UInt64 { chain.backend.size }
    public var canDiscard: Bool { chain.backend.canTrim }
    public var canWriteZeroes: Bool { chain.backend.canWriteZeroes }

    public init(chain: Chain, readOnly: Bool) {
        self.chain = chain
        self.readOnly = readOnly || chain.backend.readOnly
    }

    public func makeRequestContext(for request: VirtioBlkRequest) -> AnyObject? {
        ChainRequest(chain: chain, top: 0, completion: .virtio(request))
    }

    public func releaseRequestContext(_ context: AnyObject) {
        unsafeDowncast(context, to: ChainRequest.self).retire()
    }

    public func submit(_ request: VirtioBlkRequest) {
        let chained = unsafeDowncast(request.exportContext!, to: ChainRequest.self)
        let op: iof_op
        var flags: UInt32 = 0
        var buffer: UnsafeMutableRawPointer? = nil
        switch request.command {
        case .read: op = IOF_OP_READ; buffer = request.buffer
        case .write: op = IOF_OP_WRITE; buffer = request.buffer
        case .flush: op = IOF_OP_FLUSH
        case .discard: op = IOF_OP_TRIM
        case .writeZeroes(let mayUnmap):
            op = IOF_OP_WRITE_ZEROES
            if !mayUnmap { flags |= UInt32(IOF_REQ_NO_HOLE) }
        }
        chained.startConsumerRequest(op: op, flags: flags, offset: request.offset, length: UInt64(request.length), buffer: buffer)
    }
}
