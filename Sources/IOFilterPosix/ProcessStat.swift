import Glibc

/// /proc/PID/stat, read the one safe way: the command (field 2) may hold spaces and
/// parentheses, so fields are counted after its last closing parenthesis.
public struct ProcessStat: Sendable {
    /// Fields 3 onward (state, parent, …): `fields[0]` is field 3.
    private let fields: [Substring]

    /// The process's status now, or nil if there is no such process.
    public init?(_ pid: pid_t) {
        guard let stat = FileDescriptorIO.readFile("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        fields = stat[stat.index(after: close)...].split(separator: " ")
    }

    private func field(_ number: Int) -> Substring? { fields.count > number - 3 ? fields[number - 3] : nil }

    /// "R", "S", "Z" (a zombie), …
    public var state: Substring? { field(3) }
    public var parent: pid_t? { field(4).flatMap { pid_t($0) } }
    /// How many threads it has.
    public var threads: Int? { field(20).flatMap { Int($0) } }
    /// When it started, in clock ticks after boot: with the pid, it names one process.
    public var startTime: UInt64? { field(22).flatMap { UInt64($0) } }
}
