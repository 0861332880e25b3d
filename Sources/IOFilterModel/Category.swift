/// A filter's category fixes its place in a disk's chain: a request meets the categories
/// in this order on its way from the consumer to the disk, and a disk has at most one
/// filter of each.
public enum FilterCategory: String, Codable, Sendable, CaseIterable, Comparable {
    case inspection, replication, encryption, cache, qos

    /// The value `enum iof_category` uses for this category.
    public var abiValue: UInt32 {
        switch self {
        case .inspection: 1
        case .replication: 2
        case .encryption: 3
        case .cache: 4
        case .qos: 5
        }
    }

    public init?(abiValue: UInt32) {
        guard let match = Self.allCases.first(where: { $0.abiValue == abiValue }) else { return nil }
        self = match
    }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.abiValue < rhs.abiValue }
}

/// How the host may call into one filter concurrently (`enum iof_thread_model`).
public enum ThreadModel: String, Codable, Sendable {
    case serializeAll = "serialize-all"
    case serializePerDisk = "serialize-per-disk"
    case parallel

    public init?(abiValue: UInt32) {
        switch abiValue {
        case 0: self = .serializeAll
        case 1: self = .serializePerDisk
        case 2: self = .parallel
        default: return nil
        }
    }
}
