import Foundation
import IOFilterAPI
import IOFilterControl
import IOFilterHost
import IOFilterModel
import IOFilterTrust
import Logging

/// The README's first command: sample plug-ins, a policy, a disk and a VM, set up once
/// on an empty state directory and started on every run.
struct Demo {
    let controller: HostController
    let apiSocket: String
    let size: String
    let logger: Logger

    static let vm = "demo"
    static let disk = "demo-disk"
    static let policy = "demo"

    func run() throws {
        if (try? controller.showVM(Self.vm)) == nil { try setUp() }
        var vm = try controller.showVM(Self.vm)
        if vm.state == .stopped { vm = try controller.startVM(Self.vm) }
        let disk = try controller.showDisk(Self.disk)
        guard let uri = vm.uris[Self.disk] else { throw ControlError.internalError("the demo VM serves no URI") }
        let chain = disk.attached.map { "\($0.plugin) [\($0.category.rawValue)]" }.joined(separator: " -> ")
        FileHandle.standardOutput.write(Data("""
            \(uri)
            demo VM '\(Self.vm)' (worker pid \(vm.pid.map(String.init) ?? "?")) serves disk '\(Self.disk)' (\(disk.sizeBytes) bytes) through: \(chain)
            try it:  qemu-img info '\(uri)'
                     qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '\(uri)'
                     iofilter vm show \(Self.vm) --socket \(apiSocket)

            """.utf8))
    }

    private func setUp() throws {
        let directory = WorkerExecutable.samplesDirectory()
        let key = try sampleSigningKey()
        var installed: [String: PluginInfo] = [:]
        for file in ["libiofilter-passthrough-c.so", "libiofilter-replication.so", "libiofilter-cache.so"] {
            let path = "\(directory)/\(file)"
            guard FileManager.default.fileExists(atPath: path) else {
                throw ControlError.internalError("sample plug-in \(path) is missing; build with `swift build`")
            }
            let plugin = try controller.installPlugin(path: path, signature: try sign(path, with: key))
            installed[plugin.category.rawValue] = plugin
        }
        var rules = [PolicyRule(plugin: installed["inspection"]!.name)]
        rules.append(PolicyRule(plugin: installed["replication"]!.name,
                                parameters: ["target": "{state}/replicas/{disk}.replica.img", "mode": "async"]))
        rules.append(PolicyRule(plugin: installed["cache"]!.name, parameters: ["mode": "write-back", "size": "256M"]))
        if (try? controller.showPolicy(Self.policy)) == nil {
            _ = try controller.createPolicy(Policy(
                name: Self.policy, description: "demo: inspection, async replication to a local replica file, write-back cache",
                filters: rules))
        }
        if (try? controller.showDisk(Self.disk)) == nil {
            _ = try controller.createDisk(DiskCreateRequest(name: Self.disk, size: size, policy: Self.policy))
        }
        _ = try controller.createVM(VMCreateRequest(name: Self.vm, disks: [Self.disk]))
        logger.info("demo set up: policy \(Self.policy), disk \(Self.disk), VM \(Self.vm)")
    }

    /// The samples built here are nobody's release: the demo signs them with a key of
    /// this host's own, enrolled at partner, the way a partner's build would arrive.
    private func sampleSigningKey() throws -> PrivateSigningKey {
        let prefix = "\(controller.stateDirectory)/demo-samples"
        if !FileManager.default.fileExists(atPath: prefix + ".key") {
            try PrivateSigningKey.generate(comment: "this host's demo key for the sample builds").write(prefix: prefix)
        }
        let key = try PrivateSigningKey(file: prefix + ".key")
        if try !controller.listTrust().contains(where: { $0.keyId == key.publicKey.id }) {
            _ = try controller.addTrust(TrustAddRequest(publicKey: key.publicKey.line, level: .partner))
        }
        return key
    }

    private func sign(_ path: String, with key: PrivateSigningKey) throws -> Data {
        let manifest: PluginManifest
        switch PluginValidator().validate(path) {
        case .success(let valid): manifest = valid
        case .failure(let error): throw ControlError.internalError("sample plug-in \(path) is not valid: \(error)")
        }
        return try SignatureFile.signing(SignedPlugin(manifest), digest: PluginDigest(file: path), key: key, level: .partner, adding: nil).bytes
    }
}
