/// Numbers from the NBD protocol (proto.md of the nbd project), fixed newstyle only.
public enum NBDProtocol {
    package static let initMagic: UInt64 = 0x4e42_444d_4147_4943  // "NBDMAGIC"
    package static let optionMagic: UInt64 = 0x4948_4156_454F_5054  // "IHAVEOPT"
    package static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    package static let requestMagic: UInt32 = 0x2560_9513
    package static let simpleReplyMagic: UInt32 = 0x6744_6698

    package static let structuredReplyMagic: UInt32 = 0x668e_33ef

    package static let requestHeaderSize = 28
    package static let simpleReplySize = 16
    /// A structured reply chunk's header: magic, flags, type, cookie, length.
    package static let chunkHeaderSize = 20
    /// The only metadata context offered, and its id.
    package static let baseAllocation = "base:allocation"
    package static let baseAllocationID: UInt32 = 1

    package enum ChunkType: UInt16 {
        case none = 0, offsetData = 1, offsetHole = 2, blockStatus = 5
        case error = 0x8001, errorOffset = 0x8002
    }
    package static let chunkFlagDone: UInt16 = 1 << 0

    package struct HandshakeFlags {
        package static let fixedNewstyle: UInt16 = 1 << 0
        package static let noZeroes: UInt16 = 1 << 1
    }

    package struct ClientFlags {
        package static let fixedNewstyle: UInt32 = 1 << 0
        package static let noZeroes: UInt32 = 1 << 1
    }

    public struct TransmissionFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let hasFlags = Self(rawValue: 1 << 0)
        public static let readOnly = Self(rawValue: 1 << 1)
        public static let sendFlush = Self(rawValue: 1 << 2)
        public static let sendFUA = Self(rawValue: 1 << 3)
        public static let rotational = Self(rawValue: 1 << 4)
        public static let sendTrim = Self(rawValue: 1 << 5)
        public static let sendWriteZeroes = Self(rawValue: 1 << 6)
        public static let canMultiConn = Self(rawValue: 1 << 8)
        public static let sendCache = Self(rawValue: 1 << 10)
        public static let sendFastZero = Self(rawValue: 1 << 11)
    }

    package enum Option: UInt32 {
        case exportName = 1, abort = 2, list = 3, startTLS = 5, info = 6, go = 7
        case structuredReply = 8, listMetaContext = 9, setMetaContext = 10, extendedHeaders = 11
    }

    package enum Reply: UInt32 {
        case ack = 1, server = 2, info = 3, metaContext = 4
        case errUnsupported = 0x8000_0001, errPolicy = 0x8000_0002, errInvalid = 0x8000_0003
        case errTLSRequired = 0x8000_0005, errUnknown = 0x8000_0006
    }

    package enum Info: UInt16 {
        case export = 0, name = 1, description = 2, blockSize = 3
    }

    public enum Command: UInt16, Sendable {
        case read = 0, write = 1, disconnect = 2, flush = 3, trim = 4, cache = 5
        case writeZeroes = 6, blockStatus = 7
    }

    public struct CommandFlags: OptionSet, Sendable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let fua = Self(rawValue: 1 << 0)
        public static let noHole = Self(rawValue: 1 << 1)
        public static let dontFragment = Self(rawValue: 1 << 2)
        public static let requestOne = Self(rawValue: 1 << 3)
        public static let fastZero = Self(rawValue: 1 << 4)
    }

    /// Largest payload we accept or send, advertised as the maximum block size.
    public static let maxPayload = 32 << 20
    /// Longest option payload we read during the handshake.
    package static let maxOptionLength = 64 << 10
}

/// Big-endian field access on raw memory, for headers.
extension UnsafeMutableRawPointer {
    @inline(__always) package func storeBE<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: T.self)
    }
}

extension UnsafeRawPointer {
    @inline(__always) package func loadBE<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
        T(bigEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

/// Builds handshake messages (not the hot path).
package struct MessageWriter {
    package var bytes: [UInt8] = []
    package init() {}
    package mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    package mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    package mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes += $0 } }
    package mutating func append(_ s: String) { bytes += Array(s.utf8) }
    package mutating func append(_ b: [UInt8]) { bytes += b }
}

/// Reads handshake fields from a received byte array.
package struct MessageReader {
    package let bytes: [UInt8]
    package var position = 0
    package init(_ bytes: [UInt8]) { self.bytes = bytes }
    package var remaining: Int { bytes.count - position }

    package func first32() -> UInt32? {
        var copy = self
        return copy.u32()
    }

    package mutating func u16() -> UInt16? { integer() }
    package mutating func u32() -> UInt32? { integer() }
    package mutating func u64() -> UInt64? { integer() }
    package mutating func string(count: Int) -> String? {
        guard count >= 0, remaining >= count else { return nil }
        defer { position += count }
        return String(decoding: bytes[position..<position + count], as: UTF8.self)
    }

    private mutating func integer<T: FixedWidthInteger>() -> T? {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { return nil }
        var value: T = 0
        for byte in bytes[position..<position + size] { value = value << 8 | T(byte) }
        position += size
        return value
    }
}
