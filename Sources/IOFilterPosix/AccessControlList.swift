import CSystemShims
import Glibc

/// POSIX access control lists, written as the kernel's `system.posix_acl_access`
/// extended attribute: the owner keeps the mode's owner bits, the listed groups get
/// `permissions`, everyone else nothing. One file can so admit several groups.
public enum AccessControlList {
    // <linux/posix_acl_xattr.h>
    private static let version: UInt32 = 2
    private static let userObject: UInt16 = 0x01, group: UInt16 = 0x08, groupObject: UInt16 = 0x04, mask: UInt16 = 0x10, other: UInt16 = 0x20
    private static let undefinedID = UInt32.max

    /// Grants `groups` the `permissions` (rwx bits, 0-7) on `path`.
    public static func grant(_ path: String, owner permissionsOfOwner: UInt16, groups: [gid_t], permissions: UInt16) throws(SystemError) {
        // Entries sorted by tag, then id, as the kernel requires.
        var entries: [(tag: UInt16, permissions: UInt16, id: UInt32)] = [(userObject, permissionsOfOwner, undefinedID), (groupObject, 0, undefinedID)]
        entries += Set(groups).sorted().map { (group, permissions, $0) }
        entries += [(mask, permissions, undefinedID), (other, 0, undefinedID)]
        entries.sort { ($0.tag, $0.id) < ($1.tag, $1.id) }
        var bytes: [UInt8] = []
        func append<T: FixedWidthInteger>(_ value: T) { withUnsafeBytes(of: value.littleEndian) { bytes += $0 } }
        append(version)
        for entry in entries {
            append(entry.tag)
            append(entry.permissions)
            append(entry.id)
        }
        guard iof_setxattr(path, "system.posix_acl_access", bytes, bytes.count) == 0 else { throw SystemError("setxattr \(path)") }
    }
}
