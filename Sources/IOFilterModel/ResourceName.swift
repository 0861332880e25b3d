/// Names of policies, disks and VMs: they become file names and URI path segments, so
/// they are 1 to 64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit.
public enum ResourceName {
    public static let pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

    public static func isValid(_ name: String) -> Bool {
        guard let first = name.unicodeScalars.first, name.unicodeScalars.count <= 64 else { return false }
        func alphanumeric(_ c: Unicode.Scalar) -> Bool { ("a"..."z").contains(c) || ("A"..."Z").contains(c) || ("0"..."9").contains(c) }
        return alphanumeric(first) && name.unicodeScalars.allSatisfy { alphanumeric($0) || $0 == "." || $0 == "_" || $0 == "-" }
    }
}
