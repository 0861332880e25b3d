import Foundation
import IOFilterAPI
import IOFilterHTTP
import IOFilterPosix

/// Shows a long transfer's progress on stderr while `body` waits for it: the disk's
/// activity as the host reports it ("exporting to x.img: 37%"), redrawn in place on a
/// terminal, and as a line every few seconds otherwise (a log, CI).
func withProgress<T>(of disk: String, daemon: DaemonOptions, _ body: () throws -> T) throws -> T {
    let watch = ProgressWatch()
    let terminal = isatty(STDERR_FILENO) != 0
    let interval: UInt64 = terminal ? 300_000_000 : 5_000_000_000
    let endpoint = try daemon.endpoint
    startThread(name: "progress") {
        let client = APIClient(transport: endpoint.transport(), json: false, token: endpoint.token)
        var shown: String?
        defer {
            if terminal && shown != nil { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
            watch.lock.withLock {
                watch.running = false
                watch.lock.broadcast()
            }
        }
        while true {
            let stop = watch.lock.withLock { () -> Bool in
                if !watch.done { _ = watch.lock.wait(nanoseconds: interval) }
                return watch.done
            }
            if stop { return }
            guard let activity = (try? client.send("GET", "/disks/\(disk)", as: DiskInfo.self))?.value.activity,
                  activity != shown else { continue }
            shown = activity
            FileHandle.standardError.write(Data((terminal ? "\r\u{1B}[K\(disk): \(activity)" : "\(disk): \(activity)\n").utf8))
        }
    }
    defer {
        watch.lock.withLock {
            watch.done = true
            watch.lock.broadcast()
            while watch.running { watch.lock.wait() }
        }
    }
    return try body()
}

/// The transfer's end, told to the thread that shows its progress.
private final class ProgressWatch: @unchecked Sendable {
    // @unchecked: `done` and `running` are guarded by `lock`.
    let lock = ConditionLock()
    var done = false
    var running = true
}
