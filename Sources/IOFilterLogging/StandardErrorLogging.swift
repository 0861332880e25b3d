import Glibc
import Logging

/// Every executable logs to stderr at the level IOFILTER_LOG_LEVEL names (default info);
/// workers inherit the host's stderr, so one stream shows the host and its workers.
public enum StandardErrorLogging {
    public static var level: Logger.Level {
        getenv("IOFILTER_LOG_LEVEL").flatMap { Logger.Level(rawValue: String(cString: $0)) } ?? .info
    }

    public static func bootstrap() {
        let level = self.level
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }
}
