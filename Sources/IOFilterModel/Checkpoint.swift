/// A named point from which a disk's changes are tracked (changed-block tracking), as
/// the host and its API describe it.
public struct CheckpointInfo: Codable, Sendable, Equatable {
    public var name: String
    public var disk: String
    /// Bytes per bit of its bitmap.
    public var granularity: UInt64
    /// When it was made (ISO 8601).
    public var createdAt: String
    /// Bytes changed since (whole granules).
    public var changedBytes: UInt64
    /// False once it may have missed changes (the machine went down while a worker
    /// tracked them): clients are no longer offered it; delete it and start afresh.
    public var consistent: Bool
    public var inconsistency: String?
    /// Frozen: a snapshot's copy of its source's bitmap at the snapshot's instant.
    public var frozen: Bool
    /// The NBD metadata context that offers it.
    public var metaContext: String

    public init(name: String, disk: String, granularity: UInt64, createdAt: String, changedBytes: UInt64,
                inconsistency: String?, frozen: Bool) {
        self.name = name
        self.disk = disk
        self.granularity = granularity
        self.createdAt = createdAt
        self.changedBytes = changedBytes
        self.consistent = inconsistency == nil
        self.inconsistency = inconsistency
        self.frozen = frozen
        self.metaContext = Self.metaContextPrefix + name
    }

    /// How QEMU names a bitmap's context, and so every backup tool that reads one.
    public static let metaContextPrefix = "qemu:dirty-bitmap:"
}
