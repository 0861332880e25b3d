import Foundation
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// Runs a short-lived worker for a maintenance task (attach or detach filters, or
/// deliver a lifecycle event, on disks no VM is using) and waits for it to finish.
public enum MaintenanceWorker {
    public static func run(_ configuration: WorkerConfiguration, timeout: Double = 300, logger: Logger) throws(SupervisorError) {
        precondition(configuration.task != .serve)
        var configuration = configuration
        configuration.controlFD = nil
        configuration.heartbeatFD = nil
        for index in configuration.disks.indices { configuration.disks[index].listenFD = -1 }
        var launch = SandboxedLaunch(mode: .serve)
        launch.logLevel = configuration.logLevel
        // Its plug-ins' attach and detach run under the same limits as a VM's worker.
        let cgroup = try? WorkerCgroup.create(name: configuration.vmName, limits: WorkerCgroupLimits(for: configuration)).get()
        defer { cgroup?.remove() }
        if let cgroup {
            configuration.cgroupProcs = cgroup.procsFiles
            configuration.cgroupSummary = cgroup.summary
            launch.cgroup = cgroup
        }
        let outcome: (status: Int32?, output: [UInt8])
        do {
            let broker = try TargetBroker.start(allowed: configuration.namedTargets, logger: logger)
            defer { close(broker) }
            configuration.brokerFD = launch.fds.hand(broker)
            launch.configuration = try JSONEncoder().encode(configuration)
            outcome = try launch.run(timeout: timeout)
        } catch {
            throw SupervisorError(message: "cannot start a worker: \(error)")
        }
        guard let status = outcome.status else { throw SupervisorError(message: "the worker did not finish within \(timeout)s") }
        let lines = String(decoding: outcome.output, as: UTF8.self).split(separator: "\n")
        guard lines.contains("DONE"), ChildProcess.exitCode(status: status) == 0 else {
            let error = lines.last { $0.hasPrefix("ERROR ") }.map { String($0.dropFirst(6)) }
            throw SupervisorError(message: error ?? "the worker \(ChildProcess.describe(status: status))",
                                  vetoed: ChildProcess.exitCode(status: status) == WorkerTask.vetoedExitStatus)
        }
    }
}
