import Foundation
import IOFilterAPI
import IOFilterNBD

/// The directories under which a request or a policy may name files: imports, exports,
/// replica and cache files, NBD unix sockets: the state directory, and those given with
/// --allow-path.
/// Paths are judged after resolving links, so a link cannot lead outside.
public struct AllowedPaths: Sendable {
    public let roots: [String]

    public init(roots: [String]) {
        self.roots = roots.map { Self.resolve(($0 as NSString).standardizingPath) }
    }

    /// `path` with every link resolved, also when its last components do not exist yet
    /// (a file an export or a replica will create): the longest existing prefix is
    /// resolved and the rest appended.
    static func resolve(_ path: String) -> String {
        var existing = (path as NSString).standardizingPath
        var rest: [String] = []
        while !existing.isEmpty && existing != "/" {
            if let real = realpath(existing, nil) {
                defer { free(real) }
                return ([String(cString: real)] + rest.reversed()).joined(separator: "/")
            }
            rest.append((existing as NSString).lastPathComponent)
            existing = (existing as NSString).deletingLastPathComponent
        }
        return "/" + rest.reversed().joined(separator: "/")
    }

    public func contains(_ path: String) -> Bool {
        let resolved = Self.resolve(path)
        return roots.contains { resolved == $0 || resolved.hasPrefix($0 == "/" ? "/" : $0 + "/") }
    }

    /// Refuses `path` unless it lies under a root; `what` says what it is for.
    func check(_ path: String, _ what: String) throws(ControlError) {
        guard path.hasPrefix("/") else { throw .badRequest("\(what) must be an absolute path, got '\(path)'") }
        guard contains(path) else {
            throw ControlError(
                status: 403, code: "path-not-allowed",
                message: "\(what) \(path) lies outside the directories this host allows (\(roots.joined(separator: ", "))); "
                    + "an admin can add one with iofilterd --allow-path DIR")
        }
    }

    /// Checks a filter's path parameter: a file, or an NBD URI's unix socket. NBD over
    /// TCP names no path.
    func checkTarget(_ value: String, _ what: String) throws(ControlError) {
        guard value.contains("://") else { return try check(value, what) }
        if case .unix(let socket, _) = NBDURI(value) { try check(socket, what) }
    }
}

extension HostController {
    /// The roots paths must lie under.
    var allowedPaths: AllowedPaths { AllowedPaths(roots: [stateDirectory] + allowedRoots) }
}
