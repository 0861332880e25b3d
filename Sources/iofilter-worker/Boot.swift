// What every mode of the worker does the same way: talk to the host on stdout, read
// its configuration, and confine itself before any plug-in code runs.
import FoundationEssentials
import Glibc
import IOFilterModel
import IOFilterPosix
import IOFilterSandbox
import CSystemShims
import IOFilterWire
import Logging

/// This process's logger: the worker's, then named for its VM or its plug-in.
@MainActor var logger = Logger(label: "iofilter.worker")

/// One line to the host on stdout (READY, ERROR …, DONE, or a JSON answer).
func say(_ line: String) {
    try? FileDescriptorIO.writeAll(STDOUT_FILENO, Array((line + "\n").utf8))
}

/// Ends a worker that could not open its disks or plug-ins; the host reads the ERROR
/// line to tell its caller why.
@MainActor func cannotStart(_ error: any Error) -> Never {
    logger.critical("cannot start: \(error)")
    say("ERROR \(error)")
    exit(72)
}

func emit(_ value: some Encodable) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    say((try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}")
}

struct Failure: Encodable {
    let error: String
    let detail: ValidationError?
    init(_ error: ValidationError) {
        self.error = error.description
        self.detail = error
    }
    init(message: String) {
        self.error = message
        self.detail = nil
    }
}
struct CallResult: Encodable { let type: String; let value: String }

/// Confines this process (see `Sandbox`); a worker that cannot be confined does not run.
@MainActor func confine(_ configure: (inout Sandbox) -> Void) {
    var sandbox = Sandbox()
    configure(&sandbox)
    do {
        _ = try sandbox.apply(logger: logger)
    } catch {
        logger.critical("\(error)")
        say("ERROR \(error)")
        exit(70)
    }
}

/// Validating or calling a plug-in runs its code: the same confinement as serving,
/// with nothing to read or write but the plug-in itself.
@MainActor func confineForOneCall(plugin path: String) {
    confine {
        $0.readExecutePaths = [path]
        $0.identity = identity(WorkerIdentity(for: "validator"))
        $0.denySockets = true
    }
}

func identity(_ identity: WorkerIdentity) -> (uid: UInt32, gid: UInt32) { (identity.uid, identity.gid) }

/// The path with links and `..` resolved (when it exists): the worker's private root
/// shows each file at its real path, and nothing of the way to it.
func absolute(_ path: String) -> String {
    if let resolved = realpath(path, nil) {
        defer { free(resolved) }
        return String(cString: resolved)
    }
    return path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

/// The configuration the host wrote on standard input; a process without one does not run.
@MainActor func readConfiguration<T: Decodable>(_ type: T.Type, for mode: String) -> T {
    let input = (try? FileDescriptorIO.readToEnd(STDIN_FILENO)) ?? []
    guard let configuration = try? JSONDecoder().decode(T.self, from: Data(input)) else {
        logger.critical("\(mode): no valid configuration on standard input")
        exit(64)
    }
    return configuration
}

/// Moves this process into the cgroup its supervisor made for it (it must be there
/// before it makes its pid namespace or loads a plug-in); false if there is none or it
/// could not.
@MainActor func joinedCgroup(_ files: [String]?, what: String, otherwise fallback: String = "limits fall back on RLIMIT_AS") -> Bool {
    guard let files else { return false }
    if let failure = CgroupMembership.join(files) {
        logger.warning("this \(what) could not join its cgroup (\(failure)): \(fallback)")
        return false
    }
    return true
}

// MARK: the boot sequence of a long-running process (serve, daemon)
//
// In this order, before any plug-in code runs: read the configuration, block the
// termination signals, close every fd the host did not hand over, join the cgroup
// (while still one thread), open what the confined view will not show (disks, TLS
// keys), confine, enter the state directory; then load plug-ins, serve, beat, and say
// READY.

/// The first step: the host's configuration, the logger named after what this process
/// serves, and the termination signals blocked (they are waited for, not handled).
@MainActor func beginBoot<Configuration: Decodable>(
    _ type: Configuration.Type, mode: String, label: String, metadata: (Configuration) -> (key: String, value: String)
) -> (Configuration, TerminationSignals) {
    let configuration = readConfiguration(type, for: mode)
    logger = Logger(label: label)
    let (key, value) = metadata(configuration)
    logger[metadataKey: key] = "\(value)"
    return (configuration, TerminationSignals.block())
}

/// Closes every fd but stdio and those the host handed over (numbered from 3 up).
func closeInheritedFDs(keeping handedOver: [Int32]) {
    Sandbox.closeInheritedFDs(keepingBelow: max(handedOver.max() ?? 2, 2) + 1)
}

/// Makes the process's own state directory its working directory, or ends it.
@MainActor func enterStateDirectory(_ directory: String) {
    guard chdir(directory) == 0 else {
        logger.critical("cannot enter state directory \(directory): \(String(cString: strerror(errno)))")
        exit(71)
    }
}

/// The supervisor's watch, which a filter cannot switch off from in here: if this
/// beat stops (the process frozen, deadlocked, its threads stopped), it kills us.
func startHeartbeat(_ fd: Int32?, oldestInFlight: (@Sendable () -> UInt64)? = nil) -> Heartbeat? {
    let heartbeat = fd.flatMap { try? Heartbeat(inherited: $0) }
    heartbeat?.startBeating(oldestInFlight: oldestInFlight)
    return heartbeat
}

/// Stdout is the host's pipe for READY alone: a process that outlives its host would
/// write into a pipe nobody reads. What plug-ins print from here on goes to the log.
func stopTalkingOnStdout() {
    dup2(STDERR_FILENO, STDOUT_FILENO)
}

/// The control channel of a long-running process: the host's channel (if it was started
/// with one) and then, for a process that outlives its host, each later host's
/// connection on `listener`, one at a time. `reattach` is answered here the same way for
/// a worker and a daemon: the new host's broker takes the old one's fd number, and the
/// host gets copies of `handBack` (the heartbeat page, the listener, the listening
/// sockets); everything else goes to `answer`.
func serveControl(first: Int32?, listener: Int32?, name: String, brokerFD: Int32?, handBack: [Int32], logger: Logger,
                  answer: @escaping @Sendable (WorkerControlRequest, [Int32]) -> (WorkerControlResponse, [Int32])) {
    startThread(name: "control") {
        var current = first
        while true {
            if let fd = current {
                ControlChannel(fd: fd).serve { (request: WorkerControlRequest, fds: [Int32]) -> (WorkerControlResponse, [Int32]) in
                    guard case .reattach = request else { return answer(request, fds) }
                    if let brokerFD, let broker = fds.first { dup2(broker, brokerFD) }
                    fds.forEach { close($0) }
                    logger.notice("a new host reattached: it supervises this process from now on")
                    return (WorkerControlResponse(reattached: name), handBack.map { dup($0) })
                }
                close(fd)
            }
            guard let listener else { return }
            var next: Int32 = -1
            repeat { next = iof_accept_cloexec(listener) } while next < 0 && (errno == EINTR || errno == ECONNABORTED)
            guard next >= 0 else {
                logger.error("cannot accept a host's control connection: \(String(cString: strerror(errno)))")
                return
            }
            current = next
        }
    }
}
