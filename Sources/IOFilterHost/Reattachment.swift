import Foundation
import IOFilterModel
import IOFilterPosix
import IOFilterWire
import Logging

/// What a host writes for each process that outlives it (a VM's worker, a partner
/// daemon), so that the next host on the same state directory can find it again: which
/// process it is, and what it was started from. Kept where no sandboxed process can
/// reach it, since a worker that could rewrite it could make the next host adopt (and
/// later signal) any process.
public struct ProcessRecord: Codable, Sendable, Equatable {
    public var pid: Int32
    /// Clock ticks after boot (see `ChildProcess.startTime(of:)`): a pid reused since
    /// is not this process.
    public var startTime: UInt64
    /// What it serves and how (`WorkerConfiguration.adoptionKey`).
    public var key: String

    /// Writes it atomically (a host killed while writing leaves the old record or the new).
    public func write(to path: String) {
        guard let data = try? JSONEncoder().encode(self) else { return }
        replaceFile(at: path, with: data)
    }

    public static func read(_ path: String) -> ProcessRecord? {
        FileManager.default.contents(atPath: path).flatMap { try? JSONDecoder().decode(ProcessRecord.self, from: $0) }
    }

    /// Removes the record at `path` if it is still `pid`'s: a successor (a live upgrade)
    /// may have written its own there already.
    public static func remove(_ path: String, ifOf pid: Int32) {
        if read(path)?.pid == pid { unlink(path) }
    }
}

/// A process an earlier host started and left serving, found again by its record.
public final class LeftoverProcess: @unchecked Sendable {
    // @unchecked: immutable after init.
    public let record: ProcessRecord
    public let process: ChildProcess
    let recordPath: String

    /// The process the record at `recordPath` names, if it still runs; a record of a
    /// process that is gone is removed.
    public static func find(recordPath: String) -> LeftoverProcess? {
        guard let record = ProcessRecord.read(recordPath) else { return nil }
        guard let process = try? ChildProcess(adopting: record.pid, startTime: record.startTime) else {
            unlink(recordPath)
            return nil
        }
        return LeftoverProcess(record: record, process: process, recordPath: recordPath)
    }

    private init(record: ProcessRecord, process: ChildProcess, recordPath: String) {
        self.record = record
        self.process = process
        self.recordPath = recordPath
    }

    /// Whether `pid` is this process or its namespace init (its child).
    public func owns(_ pid: pid_t) -> Bool {
        pid == record.pid || ProcessStat(pid)?.parent == record.pid
    }

    /// Connects to its control socket and reattaches: `broker` (the new host's) replaces
    /// its broker; it answers with its heartbeat page, its control listener and its
    /// listening sockets, and the connection stays the host's control channel.
    ///
    /// - Parameters:
    ///   - name: what it must say it serves (the VM's or the plug-in's name).
    ///   - listeners: how many listening sockets it must hand back.
    public func reattach(socket: String, name: String, listeners: Int, broker: Int32) throws(SupervisorError) -> Reattachment {
        let control: Int32
        do {
            control = try Sockets.connectUnix(path: socket)
        } catch {
            throw SupervisorError(message: "cannot reach its control socket \(socket): \(error)")
        }
        let answer: (WorkerControlResponse, [Int32])
        do throws(ControlChannel.Failure) {
            answer = try ControlChannel(fd: control).exchange(.reattach, sending: [broker], timeout: 5)
        } catch {
            close(control)
            throw SupervisorError(message: "it does not answer on \(socket): \(error)")
        }
        let (response, fds) = answer
        guard response.reattached == name, fds.count == 2 + listeners, let heartbeat = try? Heartbeat(inherited: fds[0]) else {
            fds.forEach { close($0) }
            close(control)
            throw SupervisorError(message: response.error.map { "it refused: \($0)" }
                ?? "it answered as \(response.reattached ?? "nothing") with \(fds.count) fd(s), not as \(name) with \(2 + listeners)")
        }
        return Reattachment(process: process, control: control, heartbeat: heartbeat, controlListener: fds[1],
                            listeners: Array(fds.dropFirst(2)))
    }

    /// Stops it the way a host stops its own: SIGTERM (its filters flush and close), then
    /// SIGKILL after `timeout`, and removes its record.
    public func stop(timeout: Double, logger: Logger) {
        process.signal(SIGTERM)
        if process.wait(timeout: timeout) == nil {
            logger.warning("process \(record.pid), left by an earlier host, did not stop within \(timeout)s; killing it")
            process.signal(SIGKILL)
            _ = process.wait(timeout: 5)
        }
        unlink(recordPath)
    }
}

/// A leftover process reattached: what the new host supervises it with.
public struct Reattachment: @unchecked Sendable {
    // @unchecked: the fds and the process are handed on once.
    public let process: ChildProcess
    /// The control channel (connected).
    public let control: Int32
    public let heartbeat: Heartbeat
    /// The listening socket later hosts reach it through, to hand to its successors.
    public let controlListener: Int32
    /// The listening sockets it serves (a worker's, one per disk in order; a daemon's
    /// channel, then its peer listener).
    public let listeners: [Int32]
}

extension WorkerConfiguration {
    /// What a worker's record says it was started from (see `ProcessRecord.key`).
    public var adoptionKey: String { canonicalJSON(withoutHandedOverFDs) }
}

extension DaemonConfiguration {
    public var adoptionKey: String { canonicalJSON(withoutHandedOverFDs) }
}

private func canonicalJSON(_ value: some Encodable) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? ""
}
