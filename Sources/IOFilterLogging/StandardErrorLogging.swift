import Glibc
import Logging

/// Every executable logs to stderr at the level IOFILTER_LOG_LEVEL names (default info);
/// workers inherit the host's stderr, so one stream shows the host and its workers.
public enum StandardErrorLogging {
    public static var level: Logger.Level {
        getenv("IOFILTER_LOG_LEVEL").flatMap { Logger.Level(rawValue: String(cString: $0)) } ?? .info
    }

    /// The levels, for a `--log-level` option's help and checks.
    public static let levels = Logger.Level.allCases.map(\.rawValue)

    /// Why `--log-level TEXT` cannot be used, or nil.
    public static func problem(withLevel text: String?) -> String? {
        guard let text, !levels.contains(text) else { return nil }
        return "--log-level '\(text)' is none of \(levels.joined(separator: ", "))"
    }

    /// Logs at `level` (a `--log-level` given), else at IOFILTER_LOG_LEVEL's, else info;
    /// the level is also put in the environment, where the workers find it.
    public static func bootstrap(level chosen: String? = nil) {
        if let chosen { setenv("IOFILTER_LOG_LEVEL", chosen, 1) }
        let level = self.level
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
