import Foundation

/// A Linux guest for tests: the host's Debian kernel (linux-image-amd64), busybox
/// (busybox-static) and the kernel's own virtio and ext4 modules in an initramfs made
/// here, booted by QEMU under TCG. Its /init runs the test's script and powers off.
enum Guest {
    /// The newest installed kernel and its modules directory.
    static let kernel: (image: String, modules: String)? = {
        let boot = (try? FileManager.default.contentsOfDirectory(atPath: "/boot")) ?? []
        for image in boot.filter({ $0.hasPrefix("vmlinuz-") }).sorted().reversed() {
            let version = String(image.dropFirst("vmlinuz-".count))
            if FileManager.default.fileExists(atPath: "/lib/modules/\(version)/modules.dep") {
                return ("/boot/\(image)", "/lib/modules/\(version)")
            }
        }
        return nil
    }()

    /// Modules in load order (each after what it needs).
    static let modules = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk",
                          "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]

    /// An initramfs whose /init mounts the basics, loads the modules and runs `script`
    /// (busybox sh), then powers the guest off.
    static func initramfs(script: String, in directory: URL, modules: [String] = Guest.modules) throws -> String {
        guard let kernel else { throw HarnessError("no kernel in /boot with its modules (install linux-image-amd64)") }
        let root = directory.appendingPathComponent("root")
        for sub in ["bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"] {
            try FileManager.default.createDirectory(at: root.appendingPathComponent(sub), withIntermediateDirectories: true)
        }
        try FileManager.default.copyItem(atPath: "/usr/bin/busybox", toPath: root.appendingPathComponent("bin/busybox").path)
        let dependencies = try String(contentsOfFile: kernel.modules + "/modules.dep", encoding: .utf8)
        for module in modules {
            guard let line = dependencies.split(separator: "\n").first(where: { $0.hasSuffix("/\(module).ko:") || $0.contains("/\(module).ko:") }),
                  let path = line.split(separator: ":").first
            else { throw HarnessError("the kernel has no module \(module)") }
            try FileManager.default.copyItem(atPath: "\(kernel.modules)/\(path)", toPath: root.appendingPathComponent("lib/modules/\(module).ko").path)
        }
        let initScript = """
            #!/bin/busybox sh
            /bin/busybox --install -s /bin
            mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
            for m in \(modules.joined(separator: " ")); do insmod /lib/modules/$m.ko || echo "GUEST-MODULE-FAILED $m"; done
            \(script)
            echo GUEST-DONE
            poweroff -f

            """
        let initPath = root.appendingPathComponent("init").path
        try initScript.write(toFile: initPath, atomically: true, encoding: .utf8)
        chmod(initPath, 0o755)
        let output = directory.appendingPathComponent("initrd.cpio").path
        try Harness.check("/bin/sh", ["-c", "cd '\(root.path)' && find . | cpio -o -H newc --quiet > '\(output)'"])
        return output
    }

    /// Boots the guest with `devices` (QEMU arguments) and `memory` MiB of shared memory
    /// (memfd, sealed: what a vhost-user back-end needs). Its console is `output`.
    static func boot(initramfs: String, devices: [String], memory: Int = 256, kernelArguments: String = "")
        throws -> (process: Process, output: ReadAll)
    {
        guard let kernel else { throw HarnessError("no kernel in /boot") }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: Harness.tool("qemu-system-x86_64"))
        process.arguments = [
            "-machine", "q35,accel=tcg,memory-backend=mem", "-object", "memory-backend-memfd,id=mem,size=\(memory)M,share=on,seal=on",
            "-m", "\(memory)", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
            "-kernel", kernel.image, "-initrd", initramfs, "-append", "console=ttyS0 quiet panic=-1 \(kernelArguments)",
        ] + devices
        let out = Pipe()
        process.standardOutput = out
        process.standardError = out
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return (process, ReadAll(out.fileHandleForReading))
    }

    /// Modules for a guest whose root is this machine's, shared read-only over virtio-9p.
    static let hostRootModules = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                                  "netfs", "fscache", "9pnet", "9pnet_virtio", "9p"]

    /// An initramfs that runs `script` (sh) chrooted in this machine's own root, shared
    /// read-only (see `hostRootDevice`): the build, its libraries and the test tools are
    /// where they are here, without copying them (the test's own directory in /tmp too).
    /// /run is the guest's, in memory, for what the script writes; cgroup v2 is mounted
    /// at /sys/fs/cgroup.
    static func hostRootInitramfs(script: String, in directory: URL) throws -> String {
        let scriptPath = directory.appendingPathComponent("guest-script.sh").path
        try script.write(toFile: scriptPath, atomically: true, encoding: .utf8)
        return try initramfs(script: """
            mkdir -p /host
            mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /host || echo GUEST-NO-ROOT
            mount -t proc proc /host/proc; mount -t sysfs sys /host/sys; mount -t devtmpfs dev /host/dev
            mount -t tmpfs tmpfs /host/run
            mount -t cgroup2 cgroup2 /host/sys/fs/cgroup || echo GUEST-NO-CGROUP2
            chroot /host /bin/sh '\(scriptPath)'
            """, in: directory, modules: hostRootModules)
    }

    /// QEMU's arguments that share this machine's root read-only as `hostroot`.
    static let hostRootDevice = ["-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"]

    /// QEMU's arguments for a vhost-user-blk disk on `socket`, reconnecting each second.
    static func vhostUserDisk(socket: String, id: String = "disk0", queues: Int = 1) -> [String] {
        ["-chardev", "socket,id=\(id),path=\(socket),reconnect=1", "-device", "vhost-user-blk-pci,chardev=\(id),num-queues=\(queues)"]
    }
}
