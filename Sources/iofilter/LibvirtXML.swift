import ArgumentParser
import Foundation
import IOFilterAPI

extension VMCommand {
    struct LibvirtXML: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "libvirt-xml",
            abstract: "Print a libvirt domain whose disks are this VM's, served by iofilterd.",
            discussion: """
                A VM created with --export vhost-user-blk gets <disk type='vhostuser'> disks \\
                (with <reconnect enabled='yes'/>, so the guest rides through a worker restart) \\
                and the shared memory backing they need; any other gets NBD disks on the VM's \\
                unix sockets. Start the VM in iofilterd first: its sockets listen while it runs.

                  iofilter vm libvirt-xml web --memory 2G > web.xml && virsh define web.xml
                  iofilter vm libvirt-xml web --disks-only   # just the <disk> elements
                """)
        @Argument(help: "The VM's name.") var name: String
        @Option(help: ArgumentHelp("The guest's memory (suffixes M, G).", valueName: "size")) var memory: String = "1G"
        @Option(help: ArgumentHelp("The domain's type: kvm, or qemu for emulation (default: kvm where /dev/kvm exists).", valueName: "type"))
        var virtType: String?
        @Option(help: ArgumentHelp("Boot this kernel directly.", valueName: "path")) var kernel: String?
        @Option(help: ArgumentHelp("With --kernel: its initramfs.", valueName: "path")) var initrd: String?
        @Option(help: ArgumentHelp("With --kernel: its command line.", valueName: "text")) var cmdline: String?
        @Option(help: ArgumentHelp("Write the guest's serial console to this file (default: a pty, for virsh console).", valueName: "path"))
        var consoleLog: String?
        @Flag(help: "NBD disks even where vhost-user-blk is offered.") var nbd = false
        @Flag(help: "Print only the <disk> elements, to paste into a domain of your own.") var disksOnly = false
        @OptionGroup var daemon: DaemonOptions

        func validate() throws {
            guard LibvirtDomain.mebibytes(memory) != nil else { throw ValidationError("--memory '\(memory)' is not a size like 512M or 2G") }
            if let virtType, !["kvm", "qemu"].contains(virtType) { throw ValidationError("--virt-type must be kvm or qemu") }
            if kernel == nil && (initrd != nil || cmdline != nil) { throw ValidationError("--initrd and --cmdline go with --kernel") }
        }

        func run() throws {
            try reportingFailures {
                let (vm, _) = try daemon.client.send("GET", "/vms/\(name)", as: VMInfo.self)
                var domain = LibvirtDomain(vm: vm, memoryMiB: LibvirtDomain.mebibytes(memory)!,
                                           virtType: virtType ?? (FileManager.default.fileExists(atPath: "/dev/kvm") ? "kvm" : "qemu"))
                domain.kernel = kernel.map(absolutePath)
                domain.initrd = initrd.map(absolutePath)
                domain.cmdline = cmdline
                domain.consoleLog = consoleLog.map(absolutePath)
                domain.useNBD = nbd
                print(disksOnly ? domain.disks : domain.xml, terminator: "")
            }
        }
    }
}

/// A libvirt domain for a VM: what an operator defines with virsh so that QEMU's disks
/// are the ones iofilterd serves.
struct LibvirtDomain {
    let vm: VMInfo
    let memoryMiB: Int
    let virtType: String
    var kernel: String?
    var initrd: String?
    var cmdline: String?
    /// The serial console's file; nil: a pty.
    var consoleLog: String?
    var useNBD = false

    init(vm: VMInfo, memoryMiB: Int, virtType: String) {
        self.vm = vm
        self.memoryMiB = memoryMiB
        self.virtType = virtType
    }

    static func mebibytes(_ text: String) -> Int? {
        let units: [Character: Int] = ["M": 1, "G": 1024]
        guard let unit = text.uppercased().last.flatMap({ units[$0] }), let value = Int(text.dropLast()), value > 0 else { return Int(text) }
        return value * unit
    }

    private var vhostUser: Bool { !useNBD && vm.vhostUserSockets != nil }

    /// Target names vda, vdb, … in the VM's disk order.
    private func target(_ index: Int) -> String { "vd" + String(UnicodeScalar(UInt8(ascii: "a") + UInt8(index % 26))) }

    var disks: String {
        vm.disks.enumerated().map { index, disk in
            if vhostUser, let socket = vm.vhostUserSockets?[disk] {
                return """
                <disk type='vhostuser' device='disk'>
                  <driver name='qemu' type='raw'/>
                  <source type='unix' path='\(escaped(socket))'>
                    <reconnect enabled='yes' timeout='1'/>
                  </source>
                  <target dev='\(target(index))' bus='virtio'/>
                </disk>

                """
            }
            let socket = "\(vmDirectory)/\(disk).sock"
            return """
            <disk type='network' device='disk'>
              <driver name='qemu' type='raw'/>
              <source protocol='nbd' name='\(escaped(disk))'>
                <host transport='unix' socket='\(escaped(socket))'/>
              </source>
              <target dev='\(target(index))' bus='virtio'/>
            </disk>

            """
        }.joined()
    }

    /// Where the VM's sockets are: beside its vhost-user sockets, or from its NBD URIs.
    private var vmDirectory: String {
        if let socket = vm.vhostUserSockets?.values.first { return (socket as NSString).deletingLastPathComponent }
        for uri in vm.uris.values {
            if let range = uri.range(of: "socket=") { return (String(uri[range.upperBound...]) as NSString).deletingLastPathComponent }
        }
        return "/var/lib/iofilter/vms/\(vm.name)"
    }

    var xml: String {
        var boot = ""
        if let kernel { boot += "    <kernel>\(escaped(kernel))</kernel>\n" }
        if let initrd { boot += "    <initrd>\(escaped(initrd))</initrd>\n" }
        if let cmdline { boot += "    <cmdline>\(escaped(cmdline))</cmdline>\n" }
        let serial = consoleLog.map { "<serial type='file'>\n      <source path='\(escaped($0))'/>\n    </serial>" }
            ?? "<serial type='pty'/>\n    <console type='pty'/>"
        // vhost-user disks live in guest memory the back-end maps: it must be shared.
        let memoryBacking = vhostUser ? "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n" : ""
        return """
            <domain type='\(virtType)'>
              <name>\(escaped(vm.name))</name>
              <memory unit='MiB'>\(memoryMiB)</memory>
            \(memoryBacking)  <vcpu>1</vcpu>
              <os>
                <type arch='x86_64' machine='q35'>hvm</type>
            \(boot)  </os>
              <devices>
            \(disks.split(separator: "\n", omittingEmptySubsequences: false).map { $0.isEmpty ? "" : "    " + $0 }.joined(separator: "\n"))    \(serial)
              </devices>
            </domain>

            """
    }

    private func escaped(_ text: String) -> String {
        text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: "'", with: "&apos;").replacingOccurrences(of: "\"", with: "&quot;")
    }
}
