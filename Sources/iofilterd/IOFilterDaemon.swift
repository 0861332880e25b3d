import ArgumentParser
import Foundation
import IOFilterHost
import IOFilterModel
import IOFilterNBD
import IOFilterPosix
import Logging

/// The host runtime. This first version runs the demo VM: it validates the sample
/// plug-ins, creates a disk under the state directory and serves it through the sample
/// chain (C inspection sample, async replication to a replica file, write-back cache)
/// in a supervised, sandboxed worker. Policies, the API and persistent state come with
/// the control plane (see the issues).
@main
struct IOFilterDaemon: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iofilterd",
        abstract: "The swift-iofilter host runtime.",
        discussion: """
            With --demo, sets up a demo VM: a 1 GiB disk served over NBD through the sample \
            filter chain in a sandboxed worker, and prints its NBD URI and a qemu-img \
            command to try it. Runs until interrupted; a crashed worker is restarted.
            """)

    @Option(help: ArgumentHelp("Where the host keeps its state.", valueName: "dir"))
    var stateDir: String = "/var/lib/iofilter"

    @Flag(help: "Set up and serve the demo VM.")
    var demo = false

    @Option(help: ArgumentHelp("Size of the demo disk.", valueName: "size"))
    var demoSize: String = "1G"

    func validate() throws {
        guard demo else { throw ValidationError("only --demo is available in this version; see `iofilter serve` to serve one disk") }
        guard ParameterSpec.parseSize(demoSize) != nil else { throw ValidationError("--demo-size '\(demoSize)' is not a size") }
    }

    func run() throws {
        StandardErrorLogging.bootstrap()
        let logger = Logger(label: "iofilterd")
        let state = URL(fileURLWithPath: stateDir, isDirectory: true)
        let vmDirectory = state.appendingPathComponent("vms/demo")
        try FileManager.default.createDirectory(at: vmDirectory, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: state.appendingPathComponent("disks"), withIntermediateDirectories: true)

        let disk = state.appendingPathComponent("disks/demo-disk.img").path
        let samples = Self.samplePlugins(replica: state.appendingPathComponent("disks/demo-disk.replica.img").path)
        guard !samples.isEmpty else { throw ValidationError("no sample plug-ins found beside \(WorkerExecutable.path()); build with `swift build`") }
        let chain: [PlannedFilter]
        switch PluginValidator().validateChain(samples) {
        case .success(let planned): chain = planned
        case .failure(let error): throw ValidationError("sample chain: \(error)")
        }

        if !FileManager.default.fileExists(atPath: disk) {
            _ = FileManager.default.createFile(atPath: disk, contents: nil)
            guard truncate(disk, off_t(ParameterSpec.parseSize(demoSize)!)) == 0 else {
                throw ValidationError("cannot size \(disk): \(String(cString: strerror(errno)))")
            }
        }
        let socketPath = state.appendingPathComponent("demo.sock").path
        let listenFD = try Sockets.listenUnix(path: socketPath)
        let configuration = WorkerConfiguration(
            vmName: "demo", stateDirectory: vmDirectory.path,
            disks: [DiskConfiguration(name: "demo-disk", backend: .file(path: disk), readOnly: false, filters: chain, listenFD: 3)],
            logLevel: StandardErrorLogging.level.rawValue)

        let signals = TerminationSignals.block()

        let supervisor = WorkerSupervisor(configuration: configuration, listenFDs: [listenFD], logger: logger)
        try supervisor.start()
        let uri = NBDURI.unix(socket: socketPath, export: "demo-disk").description
        let chainText = chain.map { "\($0.manifest.name) [\($0.manifest.category.rawValue)]" }.joined(separator: " -> ")
        FileHandle.standardOutput.write(Data("""
            \(uri)
            demo VM 'demo' is serving \(disk) through: \(chainText)
            try it:  qemu-img info '\(uri)'
                     qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '\(uri)'

            """.utf8))
        _ = signals.wait()
        logger.info("stopping the demo VM")
        supervisor.stop()
        unlink(socketPath)
    }

    /// The sample plug-ins SwiftPM built beside this executable, with demo parameters.
    static func samplePlugins(replica: String) -> [(path: String, parameters: [String: String])] {
        let directory = (WorkerExecutable.path() as NSString).deletingLastPathComponent
        let samples: [(String, [String: String])] = [
            ("libiofilter-passthrough-c.so", [:]),
            ("libiofilter-replication.so", ["target": replica, "mode": "async"]),
            ("libiofilter-cache.so", ["mode": "write-back", "size": "256M"]),
        ]
        return samples.map { ("\(directory)/\($0.0)", $0.1) }.filter { FileManager.default.fileExists(atPath: $0.path) }
    }
}
