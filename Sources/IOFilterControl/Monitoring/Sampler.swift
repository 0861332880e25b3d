import Foundation
import IOFilterAPI
import IOFilterHost
import IOFilterModel
import IOFilterPosix
import Logging

/// The one place the host asks running workers for their figures. Every reader (`vm
/// show`, the console's live stream, /metrics scrapes, `iofilter health`) takes the last
/// sample if it is fresh enough, so any number of consoles and scrapers cost each worker
/// at most one question per second; concurrent readers of a stale sample wait for one
/// question, not one each. A background pass every `interval` seconds keeps the
/// history (rates per interval, for charts) and watches health, recording an event each
/// time a filter's or a worker's health changes.
///
/// Counters a restarted worker starts from zero are carried over: the sampler adds the
/// old worker's last reading, so the totals it serves never go down and rates are never
/// negative (requests finished between the last sample and a crash are lost to them).
final class Sampler: @unchecked Sendable {
    // @unchecked: `tracks` under `lock`; each track guards itself.

    /// One reading of a running VM.
    struct Sample: Sendable {
        let time: Double
        let worker: HealthRules.Worker
        /// Per disk, with I/O counters carried across worker restarts.
        let statistics: [DiskStatistics]
        /// Since the previous sample.
        let rates: [DiskRates]
        let health: HealthReport
        let restarts: Int
    }

    let interval: Double
    /// Points kept per VM: an hour at the default interval, whatever the interval.
    let capacity: Int
    private let sessions: SessionRegistry
    private let logger: Logger
    /// Records an event (kind, subject, message, severity).
    private let record: @Sendable (String, String, String, Severity) -> Void
    private let lock = ConditionLock()
    private var tracks: [String: VMTrack] = [:]
    private var stopping = false
    /// Whether the background pass's thread runs (`stop` waits for it to end).
    private var passing = false

    init(sessions: SessionRegistry, interval: Double, window: Double = 3600, logger: Logger,
         record: @escaping @Sendable (String, String, String, Severity) -> Void) {
        self.sessions = sessions
        self.interval = max(0.2, interval)
        capacity = max(2, Int((window / self.interval).rounded(.up)) + 1)
        self.logger = logger
        self.record = record
    }

    // MARK: reading

    /// A sample of `vm` taken at most `maxAge` seconds before this call, taken now if the
    /// last is older; nil while it does not run. With 0, a sample begun after the call
    /// (by a concurrent reader) is shared, an earlier one is not: the caller sees every
    /// request that finished before it asked.
    func sample(_ vm: String, maxAge: Double) -> Sample? {
        guard let session = sessions.vm(vm) else { return nil }
        return track(vm).sample(session, asked: Date().timeIntervalSince1970, maxAge: maxAge, timeout: 5, sampler: self)
    }

    /// The last sample, however old, without asking the worker (listings use it).
    func latest(_ vm: String) -> Sample? {
        guard sessions.vm(vm) != nil else { return nil }
        return lock.withLock { tracks[vm] }?.latest
    }

    /// A VM's history over the last `seconds`, oldest first.
    func history(_ vm: String, seconds: Double) -> [HistoryPoint] {
        guard let track = lock.withLock({ tracks[vm] }) else { return [] }
        let since = Date().timeIntervalSince1970 - seconds
        return track.points.filter { $0.time >= since }
    }

    /// A VM was deleted: its history goes.
    func forget(_ vm: String) {
        _ = lock.withLock { tracks.removeValue(forKey: vm) }
    }

    private func track(_ vm: String) -> VMTrack {
        lock.withLock {
            if let track = tracks[vm] { return track }
            let track = VMTrack(name: vm, capacity: capacity)
            tracks[vm] = track
            return track
        }
    }

    // MARK: the background pass

    func start() {
        lock.withLock { passing = true }
        startThread(name: "sampler") { [self] in
            while true {
                let stop = lock.withLock { () -> Bool in
                    if !stopping { _ = lock.wait(nanoseconds: UInt64(interval * 1e9)) }
                    return stopping
                }
                if stop { break }
                pass()
            }
            lock.withLock {
                passing = false
                lock.broadcast()
            }
        }
    }

    func stop() {
        lock.withLock {
            stopping = true
            lock.broadcast()
            while passing { lock.wait() }
        }
    }

    /// Samples every running VM (in parallel: one silent worker must not delay the
    /// others' points) and adds a history point for each.
    func pass() {
        let running = sessions.runningVMs.sorted { $0.key < $1.key }
        DispatchQueue.concurrentPerform(iterations: running.count) { index in
            let (name, session) = running[index]
            let track = track(name)
            if let sample = track.sample(session, asked: Date().timeIntervalSince1970, maxAge: interval / 2, timeout: min(5, interval),
                                         sampler: self) {
                track.addPoint(sample)
            }
        }
    }

    // MARK: health changes

    /// Compares a sample's health with the last one's and records what changed.
    fileprivate func reportChanges(vm: String, from old: VMTrack.Verdicts, to new: VMTrack.Verdicts) {
        if old.worker != new.worker {
            if let why = new.worker {
                record("worker-unresponsive", vm, why, .error)
            } else if old.worker != nil {
                record("worker-responsive", vm, "the worker answers again", .info)
            }
        }
        for (key, report) in new.filters.sorted(by: { $0.key < $1.key }) where old.filters[key] ?? .ok != report {
            let before = old.filters[key] ?? .ok
            switch report.status {
            case .ok:
                record("filter-recovered", key, "back to ok (was \(before))", .info)
            case .degraded:
                record("filter-degraded", key, report.reason.isEmpty ? "degraded" : report.reason, .warning)
            case .failed:
                record("filter-failed", key, report.reason.isEmpty ? "failed" : report.reason, .error)
            }
        }
        for (key, lag) in new.lags.sorted(by: { $0.key < $1.key }) {
            let wasPast = old.lags[key]?.past ?? false
            if lag.past && !wasPast {
                record("rpo-exceeded", key, "replication lag \(Int(lag.lag))s is past the RPO of \(Int(lag.rpo))s", .warning)
            } else if !lag.past && wasPast {
                record("rpo-met", key, "replication lag \(Int(lag.lag))s is within the RPO of \(Int(lag.rpo))s again", .info)
            }
        }
        // A filter that stopped reporting its lag (the worker answered, the filter is
        // still there) is no longer behind as far as the host can tell.
        for (key, lag) in old.lags.sorted(by: { $0.key < $1.key }) where lag.past && new.lags[key] == nil && new.filters[key] != nil {
            record("rpo-met", key, "the filter no longer reports its lag (it was \(Int(lag.lag))s, past the RPO of \(Int(lag.rpo))s)", .info)
        }
    }

    /// Benchmarks count these lines (Tests/Benchmarks/consoles.sh).
    fileprivate func debug(_ message: String) { logger.debug("\(message)") }
}

/// One VM's samples, carried counters, history and last verdicts.
private final class VMTrack: @unchecked Sendable {
    // @unchecked: `sampling` serializes questions to the worker; the rest is under `lock`.

    /// What the last sample concluded, to tell changes by.
    struct Verdicts {
        /// Why the worker did not answer, if it did not.
        var worker: String?
        /// Per "vm/disk/plugin".
        var filters: [String: HealthReport] = [:]
        var lags: [String: (lag: Double, rpo: Double, past: Bool)] = [:]
    }

    let name: String
    let capacity: Int
    private let sampling = ConditionLock()
    private let lock = ConditionLock()
    private var last: Sampler.Sample?
    /// The session sampled last: another one is a new start of the VM.
    private var session: ObjectIdentifier?
    /// When that session started.
    private var started = 0.0
    private var restarts = 0
    /// The worker's own counters at the last sample, and what earlier workers counted.
    private var raw: [String: [OperationStatistics]] = [:]
    private var carried: [String: [String: OperationStatistics]] = [:]
    private var verdicts = Verdicts()
    /// The last history point's counters.
    private var pointBase: (time: Double, io: [String: [OperationStatistics]])?
    private var history: [HistoryPoint] = []

    init(name: String, capacity: Int) {
        self.name = name
        self.capacity = capacity
    }

    var latest: Sampler.Sample? { lock.withLock { last } }
    var points: [HistoryPoint] { lock.withLock { history } }

    func sample(_ vmSession: VMSession, asked: Double, maxAge: Double, timeout: Double, sampler: Sampler) -> Sampler.Sample? {
        sampling.withLock {
            if let last = latest, last.time >= asked - maxAge, lock.withLock({ session == ObjectIdentifier(vmSession) }) { return last }
            // The sample's time is when the worker is asked: what it counts finished by then.
            let now = Date().timeIntervalSince1970
            let supervisor = vmSession.supervisor
            sampler.debug("asking the worker of VM \(name) for its figures")
            let restartsNow = supervisor.restarts
            let worker: HealthRules.Worker
            if supervisor.pid == nil {
                worker = .restarting
            } else {
                do throws(SupervisorError) {
                    worker = .answered(try supervisor.control(.stats, timeout: timeout).disks ?? [])
                } catch {
                    worker = .notAnswering(error.message)
                }
            }
            return lock.withLock { record(worker, session: vmSession, restarts: restartsNow,
                                          secondsSinceRestart: supervisor.secondsSinceLastExit, at: now, sampler: sampler) }
        }
    }

    /// Call under `lock`.
    private func record(_ worker: HealthRules.Worker, session vmSession: VMSession, restarts restartsNow: Int, secondsSinceRestart: Double?,
                        at now: Double, sampler: Sampler) -> Sampler.Sample {
        if session != ObjectIdentifier(vmSession) {
            // A new start of the VM: nothing carries over from the last one, and its
            // worker counted from zero when it started.
            session = ObjectIdentifier(vmSession)
            raw = [:]
            carried = [:]
            started = vmSession.startedAt.timeIntervalSince1970
            pointBase = (started, [:])
            last = nil
            restarts = 0
        }
        var statistics: [DiskStatistics] = []
        if case .answered(let disks) = worker {
            let restarted = restartsNow != restarts
            for disk in disks {
                let io = disk.io ?? []
                let previous = raw[disk.disk] ?? []
                if restarted || DiskRates.countedAnew(previous, io) {
                    for op in previous { carried[disk.disk, default: [:]][op.op] = carried[disk.disk]?[op.op].map { $0.adding(op) } ?? op }
                }
                raw[disk.disk] = io
                var total = disk
                total.io = Self.combine(io, carried[disk.disk] ?? [:])
                statistics.append(total)
            }
            restarts = restartsNow
        } else {
            statistics = last?.statistics ?? []
        }
        // The first sample's rates run from the worker's start.
        let seconds = now - (last?.time ?? started)
        let rates: [DiskRates] = statistics.map { disk in
            let before = last?.statistics.first { $0.disk == disk.disk }?.io ?? []
            return DiskRates.between(before, disk.io ?? [], disk: disk.disk, seconds: seconds)
        }
        let health = HealthRules.vm(worker, restarts: restartsNow, secondsSinceRestart: secondsSinceRestart)
        let sample = Sampler.Sample(time: now, worker: worker, statistics: statistics, rates: rates, health: health, restarts: restartsNow)
        last = sample

        var next = Verdicts()
        switch worker {
        case .notAnswering(let why): next.worker = why
        case .restarting: next = verdicts  // health of filters unknown while it restarts: unchanged
        case .answered(let disks):
            for disk in disks {
                for filter in disk.filters {
                    let key = "\(name)/\(disk.disk)/\(filter.plugin)"
                    next.filters[key] = HealthRules.filter(filter)
                    if let (lag, rpo) = HealthRules.lag(filter) { next.lags[key] = (lag, rpo, lag > rpo) }
                }
            }
        }
        sampler.reportChanges(vm: name, from: verdicts, to: next)
        verdicts = next
        return sample
    }

    /// Adds a history point: the rates since the last point.
    func addPoint(_ sample: Sampler.Sample) {
        lock.withLock {
            let io = Dictionary(sample.statistics.map { ($0.disk, $0.io ?? []) }, uniquingKeysWith: { first, _ in first })
            defer { pointBase = (sample.time, io) }
            guard let base = pointBase else { return }
            let seconds = sample.time - base.time
            guard seconds > 0 else { return }
            let answered: Bool
            if case .answered = sample.worker { answered = true } else { answered = false }
            let disks = sample.statistics.map { disk in
                DiskRates.between(base.io[disk.disk] ?? [], disk.io ?? [], disk: disk.disk, seconds: seconds)
            }
            let filters = sample.statistics.flatMap { disk in
                disk.filters.map { filter in
                    // Bounded: a filter that reports hundreds of keys keeps its first 32 here.
                    FilterSample(disk: disk.disk, plugin: filter.plugin, health: HealthRules.filter(filter).status,
                                 stats: Dictionary(uniqueKeysWithValues: filter.stats.sorted { $0.key < $1.key }.prefix(32).map { ($0.key, $0.value) }))
                }
            }
            history.append(HistoryPoint(time: sample.time, seconds: seconds, health: answered ? sample.health.status : nil, disks: disks, filters: filters))
            if history.count > capacity { history.removeFirst(history.count - capacity) }
        }
    }

    /// The worker's counters plus what earlier workers counted, per op.
    static func combine(_ io: [OperationStatistics], _ carried: [String: OperationStatistics]) -> [OperationStatistics] {
        var byOp = carried
        for op in io { byOp[op.op] = carried[op.op].map { $0.adding(op) } ?? op }
        let order = io.map(\.op) + carried.keys.sorted().filter { key in !io.contains { $0.op == key } }
        return order.compactMap { byOp[$0] }
    }
}
