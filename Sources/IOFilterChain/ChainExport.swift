import CIOFilter
import Glibc
import IOFilterNBD
import IOFilterNBDServer

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
        chain.quiesce.enter()  // left when the request is answered (ChainRequest.finish)
        chained.prepare(op: op, flags: flags, offset: request.offset, length: UInt64(request.length), buffer: buffer)
        chained.run()
    }
}

/// A catalog of chain exports for one worker.
public struct ChainCatalog: NBDExportCatalog {
    public let exports: [ChainExport]

    public init(exports: [ChainExport]) {
        self.exports = exports
    }

    public func export(named name: String) -> (any NBDExport)? {
        if name.isEmpty, exports.count == 1 { return exports[0] }
        return exports.first { $0.name == name }
    }

    public var exportNames: [String] { exports.map(\.name) }
}
