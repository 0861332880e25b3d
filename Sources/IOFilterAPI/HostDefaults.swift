import Foundation

/// Where iofilterd keeps its state, and so where its clients find its socket, when
/// neither is told.
public enum HostDefaults {
    /// /var/lib/iofilter as root, else $XDG_STATE_HOME/iofilter (~/.local/state/iofilter).
    public static var stateDirectory: String {
        if getuid() == 0 { return "/var/lib/iofilter" }
        let base = ProcessInfo.processInfo.environment["XDG_STATE_HOME"] ?? "\(NSHomeDirectory())/.local/state"
        return "\(base)/iofilter"
    }

    /// The API's unix socket inside a state directory.
    public static func apiSocket(in stateDirectory: String) -> String { "\(stateDirectory)/api.sock" }
}
