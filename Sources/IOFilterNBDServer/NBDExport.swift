import IOFilterNBD
import Synchronization

/// What an export can do, as the server advertises it in its transmission flags.
public struct NBDExportFeatures: Sendable, Equatable {
    public var readOnly: Bool
    public var flush: Bool
    public var fua: Bool
    public var trim: Bool
    public var writeZeroes: Bool
    public var multiConn: Bool
    /// NBD_CMD_CACHE (prefetch), NBD_CMD_FLAG_FAST_ZERO, and base:allocation block status.
    public var cache: Bool
    public var fastZero: Bool
    public var blockStatus: Bool

    public init(readOnly: Bool = false, flush: Bool = true, fua: Bool = true, trim: Bool = true,
                writeZeroes: Bool = true, multiConn: Bool = true, cache: Bool = false, fastZero: Bool = false,
                blockStatus: Bool = false) {
        self.cache = cache
        self.fastZero = fastZero
        self.blockStatus = blockStatus
        self.readOnly = readOnly
        self.flush = flush
        self.fua = fua
        self.trim = trim
        self.writeZeroes = writeZeroes
        self.multiConn = multiConn
    }
}

/// A disk the server offers. The server validates every request (command, flags,
/// range, length) before it reaches `submit`.
public protocol NBDExport: AnyObject, Sendable {
    var name: String { get }
    var size: UInt64 { get }
    var features: NBDExportFeatures { get }
    /// Called once per request slot when the server creates it: per-request state the
    /// export wants to reuse instead of allocating on every request.
    func makeRequestContext(for request: NBDRequest) -> AnyObject?
    /// Called once per slot when its connection ends, after its last request finished.
    func releaseRequestContext(_ context: AnyObject)
    /// Carries out the request and calls `request.complete(error:)` exactly once, either
    /// before returning (served inline) or later from any thread (deferred).
    func submit(_ request: NBDRequest)
    /// Metadata contexts other than base:allocation that the export answers itself,
    /// at once and from its own state (QEMU's `qemu:dirty-bitmap:NAME`), by name.
    var metadataContextNames: [String] { get }
    /// The context of that name, which a connection keeps for its life (a context the
    /// export stops offering later goes on answering the connections that chose it).
    func metadataContext(named name: String) -> (any NBDMetadataContext)?
}

extension NBDExport {
    public func releaseRequestContext(_ context: AnyObject) {}
    public var metadataContextNames: [String] { [] }
    public func metadataContext(named name: String) -> (any NBDMetadataContext)? { nil }
}

/// A metadata context an export answers block status for without the request going
/// anywhere: a bitmap it reads.
public protocol NBDMetadataContext: AnyObject, Sendable {
    /// Describes [offset, offset+length): calls `append` with extents contiguous from
    /// `offset` (at least one, none longer than the range), with the context's flags,
    /// until it returns false or the range is covered.
    func describe(offset: UInt64, length: UInt32, _ append: (_ length: UInt32, _ flags: UInt32) -> Bool)
}

/// Looks exports up by the name a client asks for.
public protocol NBDExportCatalog: Sendable {
    /// "" asks for the default export.
    func export(named name: String) -> (any NBDExport)?
    var exportNames: [String] { get }
}

/// One request in flight. The server reuses these objects, and their buffers, for the
/// life of a connection: nothing is allocated per request in steady state.
public final class NBDRequest: @unchecked Sendable {
    // @unchecked: a request belongs to exactly one party at a time — the connection
    // while parsing, then the export until `complete`, then the connection again.
    // The hand-offs are ordered by `state`.
    public internal(set) var command: NBDProtocol.Command = .read
    public internal(set) var flags: NBDProtocol.CommandFlags = []
    public internal(set) var offset: UInt64 = 0
    public internal(set) var length: UInt32 = 0
    /// READ: fill `length` bytes. WRITE: holds the payload.
    public private(set) var buffer: UnsafeMutableRawPointer
    public internal(set) var error: Int32 = 0
    /// The export's per-slot state, from `makeRequestContext`.
    public internal(set) var exportContext: AnyObject?

    var cookie: UInt64 = 0
    var capacity: Int
    /// The reply header (simple, or a structured chunk's with its fixed payload), kept
    /// with the request so that batches can point at it; and how much of it is used.
    let replyHeader: UnsafeMutableRawPointer
    var replyHeaderLength = NBDProtocol.simpleReplySize
    /// Bytes of `buffer` the reply carries after its header.
    var replyDataLength = 0
    /// BLOCK_STATUS: bytes of extent descriptors written into `buffer`.
    var extentBytes = 0
    unowned(unsafe) let connection: NBDConnection
    /// submitting → (complete first) completedInline, or → deferred → (complete) finished.
    let state = Atomic<UInt8>(0)

    static let submitting: UInt8 = 0
    static let completedDuringSubmit: UInt8 = 1
    static let deferred: UInt8 = 2

    init(connection: NBDConnection) {
        self.connection = connection
        self.capacity = 4096
        self.buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
        self.replyHeader = UnsafeMutableRawPointer.allocate(byteCount: Self.replyHeaderCapacity, alignment: 8)
    }

    deinit {
        buffer.deallocate()
        replyHeader.deallocate()
    }

    func ensureCapacity(_ needed: Int) {
        guard needed > capacity else { return }
        buffer.deallocate()
        var size = capacity
        while size < needed { size *= 2 }
        capacity = size
        buffer = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096)
    }

    /// Gives a large buffer back, keeping a page for the next small request.
    func shrink() {
        guard capacity > 4096 else { return }
        buffer.deallocate()
        capacity = 4096
        buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 4096)
    }

    /// The longest reply header: a chunk's header and an error chunk's payload.
    static let replyHeaderCapacity = 32

    /// BLOCK_STATUS: how many extents the reply can carry.
    public var extentCapacity: Int { capacity / 8 }

    /// BLOCK_STATUS: appends the next extent (contiguous from `offset`) to the reply;
    /// false when the reply is full (a shorter answer is allowed).
    public func appendExtent(length: UInt32, flags: UInt32) -> Bool {
        guard extentBytes + 8 <= capacity else { return false }
        (buffer + extentBytes).storeBE(length, at: 0)
        (buffer + extentBytes).storeBE(flags, at: 4)
        extentBytes += 8
        return true
    }

    /// Finishes the request: 0 or a positive errno. Call exactly once.
    public func complete(error: Int32) {
        self.error = error
        if state.compareExchange(expected: Self.submitting, desired: Self.completedDuringSubmit, ordering: .acquiringAndReleasing).exchanged {
            return  // the connection thread is still in submit and will reply in its batch
        }
        connection.replyDeferred(self)
    }
}
