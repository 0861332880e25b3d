/// How far a host trusts a plug-in's origin, after VMware's VIB acceptance levels.
/// A host installs only plug-ins at or above its own level.
public enum AcceptanceLevel: String, Codable, Sendable, CaseIterable, Comparable, CustomStringConvertible {
    /// Unsigned, or signed by a key the host does not trust.
    case community
    /// Signed by an enrolled partner key.
    case partner
    /// Tested by the project and countersigned by it.
    case accepted
    /// Signed by the project's own key.
    case certified

    public static let hostDefault = AcceptanceLevel.partner

    var rank: Int { Self.allCases.firstIndex(of: self)! }

    public static func < (lhs: Self, rhs: Self) -> Bool { lhs.rank < rhs.rank }

    public var description: String { rawValue }

    /// "community|partner|accepted|certified", for help and error messages.
    public static var choices: String { allCases.map(\.rawValue).joined(separator: "|") }
}
