import CIOFilter

/// A filter's category fixes its place in a disk's chain: a request meets the categories
/// in this order on its way from the consumer to the disk, and a disk has at most one
/// filter of each.
public enum FilterCategory: String, Codable, Sendable, CaseIterable, Comparable {
    case inspection, replication, encryption, cache, qos

    /// The value `enum iof_category` uses for this category (the header defines them).
    public var abiValue: UInt32 {
        switch self {
        case .inspection: IOF_CATEGORY_INSPECTION.rawValue
        case .replication: IOF_CATEGORY_REPLICATION.rawValue
        case .encryption: IOF_CATEGORY_ENCRYPTION.rawValue
        case .cache: IOF_CATEGORY_CACHE.rawValue
        case .qos: IOF_CATEGORY_QOS.rawValue
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
        switch iof_thread_model(rawValue: abiValue) {
        case IOF_THREADS_SERIALIZE_ALL: self = .serializeAll
        case IOF_THREADS_SERIALIZE_PER_DISK: self = .serializePerDisk
        case IOF_THREADS_PARALLEL: self = .parallel
        default: return nil
        }
    }
}
