import Foundation
import IOFilterAPI
import Testing

/// NBD over TLS as nbdkit and qemu-nbd offer it: pre-shared keys (psktool) and X.509
/// certificates (certtool), from nbdinfo, nbdcopy, qemu-img and qemu-io; plaintext and
/// wrong keys refused.
@Suite("NBD over TLS")
struct TLSTests {
    let directory = Harness.temporaryDirectory("tls")

    func disk() throws -> String {
        let path = directory.appendingPathComponent("disk.img").path
        Harness.makeRandomFile(path, size: 8 << 20, seed: 7)
        return path
    }

    /// `psktool -u USER -p FILE`.
    func pskFile(_ name: String, user: String = "alice") throws -> String {
        let path = directory.appendingPathComponent(name).path
        try Harness.check(Harness.tool("psktool"), ["-u", user, "-p", path])
        return path
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate, as nbdkit's
    /// and QEMU's manuals make them; the server's directory and the client's.
    func certificates() throws -> (server: String, client: String) {
        let server = directory.appendingPathComponent("pki"), client = directory.appendingPathComponent("client")
        try FileManager.default.createDirectory(at: server, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(at: client, withIntermediateDirectories: true)
        let certtool = Harness.tool("certtool")
        func file(_ base: URL, _ name: String) -> String { base.appendingPathComponent(name).path }
        func key(_ path: String) throws { try Data(try Harness.check(certtool, ["--generate-privkey"]).utf8).write(to: URL(fileURLWithPath: path)) }
        func template(_ name: String, _ text: String) throws -> String {
            let path = file(directory, name)
            try Data(text.utf8).write(to: URL(fileURLWithPath: path))
            return path
        }
        try key(file(server, "ca-key.pem"))
        try Harness.check(certtool, ["--generate-self-signed", "--load-privkey", file(server, "ca-key.pem"), "--outfile", file(server, "ca-cert.pem"),
                                     "--template", try template("ca.info", "cn = Test CA\nca\ncert_signing_key\nexpiration_days = 2\n")])
        try key(file(server, "server-key.pem"))
        try Harness.check(certtool, [
            "--generate-certificate", "--load-ca-certificate", file(server, "ca-cert.pem"), "--load-ca-privkey", file(server, "ca-key.pem"),
            "--load-privkey", file(server, "server-key.pem"), "--outfile", file(server, "server-cert.pem"),
            "--template", try template("server.info", "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n"),
        ])
        try key(file(client, "client-key.pem"))
        try Harness.check(certtool, [
            "--generate-certificate", "--load-ca-certificate", file(server, "ca-cert.pem"), "--load-ca-privkey", file(server, "ca-key.pem"),
            "--load-privkey", file(client, "client-key.pem"), "--outfile", file(client, "client-cert.pem"),
            "--template", try template("client.info", "cn = client\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 2\n"),
        ])
        try FileManager.default.copyItem(atPath: file(server, "ca-cert.pem"), toPath: file(client, "ca-cert.pem"))
        return (server.path, client.path)
    }

    @Test func preSharedKeys() throws {
        let disk = try disk(), keys = try pskFile("keys.psk"), wrong = try pskFile("wrong.psk")
        let socket = directory.appendingPathComponent("psk.sock").path
        let served = try ServedDisk([disk, "--socket", socket, "--tls-psk", keys, "--filter", Daemon.samplePlugin("iofilter-passthrough-c")])
        defer { served.stop() }
        #expect(served.uri == "nbds+unix:///disk.img?socket=\(socket)")
        let uri = "nbds+unix://alice@/disk.img?socket=\(socket)&tls-psk-file=\(keys)"
        let nbdinfo = Harness.tool("nbdinfo")
        #expect(try Harness.check(nbdinfo, [uri]).contains("export-size: 8388608"))
        let copy = directory.appendingPathComponent("copy.img").path
        try Harness.check(Harness.tool("nbdcopy"), [uri, copy])
        #expect(try Harness.sha(copy) == Harness.sha(disk))

        // QEMU reads the key from keys.psk in a directory of its own.
        let qemuKeys = directory.appendingPathComponent("qemu-psk")
        try FileManager.default.createDirectory(at: qemuKeys, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: keys, toPath: qemuKeys.appendingPathComponent("keys.psk").path)
        let object = "tls-creds-psk,id=tls0,endpoint=client,dir=\(qemuKeys.path),username=alice"
        let image = "driver=nbd,path=\(socket),export=disk.img,tls-creds=tls0"
        #expect(try Harness.check(Harness.tool("qemu-img"), ["info", "--object", object, "--image-opts", image]).contains("8 MiB"))
        let written = try Harness.check(Harness.tool("qemu-io"), ["--object", object, "--image-opts", image,
                                                                  "-c", "write -P 0x5a 1M 64k", "-c", "read -P 0x5a 1M 64k"])
        #expect(written.contains("read 65536/65536") && !written.contains("Pattern verification failed"))

        // Plaintext is refused (TLS required), and so is a wrong key.
        let plain = try Harness.run(nbdinfo, ["nbd+unix:///disk.img?socket=\(socket)"])
        #expect(plain.status != 0)
        let refused = try Harness.run(nbdinfo, ["nbds+unix://alice@/disk.img?socket=\(socket)&tls-psk-file=\(wrong)"])
        #expect(refused.status != 0)
        #expect(served.waitForLog("TLS handshake failed"))
    }

    /// The keys are out of the plug-ins' reach: a separate process, outside the worker's
    /// pid namespace and under another uid, runs the TLS sessions. Read as root through
    /// /proc/PID/mem, the worker's memory (where the plug-in is mapped) holds no copy of
    /// the key, while the terminator's does (so the search itself works). A terminator
    /// killed -9 takes the worker with it, and the restarted pair serves TLS again.
    @Test func theKeysStayOutOfTheWorkersReach() throws {
        let disk = try disk(), keys = try pskFile("reach.psk")
        let socket = directory.appendingPathComponent("reach.sock").path
        let sample = Daemon.samplePlugin("iofilter-passthrough-c")
        let served = try ServedDisk([disk, "--socket", socket, "--tls-psk", keys, "--filter", sample])
        defer { served.stop() }
        let uri = "nbds+unix://alice@/disk.img?socket=\(socket)&tls-psk-file=\(keys)"
        let copy = directory.appendingPathComponent("reach-copy.img").path
        try Harness.check(Harness.tool("nbdcopy"), [uri, copy])  // sessions ran: the key was used
        #expect(try Harness.sha(copy) == Harness.sha(disk))

        let hex = try #require(try String(contentsOfFile: keys, encoding: .utf8).split(separator: ":").last)
            .trimmingCharacters(in: .whitespacesAndNewlines)
        let key = stride(from: 0, to: hex.count, by: 2).map { offset -> UInt8 in
            let start = hex.index(hex.startIndex, offsetBy: offset)
            return UInt8(hex[start..<hex.index(start, offsetBy: 2)], radix: 16)!
        }
        let worker = try #require(served.servingPID)
        let maps = try Self.procFile(worker, "maps")
        #expect(maps.contains(URL(fileURLWithPath: sample).lastPathComponent), "the plug-in runs in this process")
        let terminator = try #require(Harness.children(of: served.process.processIdentifier).first { pid in
            ((try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? "").contains("tls-terminator")
        })
        #expect(try Self.occurrences(of: key, inMemoryOf: terminator) > 0, "the search finds the key where it is")
        #expect(try Self.occurrences(of: key, inMemoryOf: worker) == 0, "no copy of the key in the plug-in's process")
        #expect(try Self.occurrences(of: Array(hex.utf8), inMemoryOf: worker) == 0)
        // Not in the worker's pid namespace (invisible to it), and not its uid.
        let namespace = { (pid: pid_t) in try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/ns/pid") }
        #expect(try namespace(terminator) != namespace(worker))
        if geteuid() == 0 {
            let uid = { (pid: pid_t) in
                ((try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? "").split(separator: "\n").first { $0.hasPrefix("Uid:") }
            }
            #expect(uid(terminator) != nil && uid(terminator) != uid(worker))
        }
        // In the worker's cgroup, which it joined itself as it started: its memory counts
        // with the worker's.
        if served.log.contains("limited by its cgroup") {
            #expect(try Self.procFile(terminator, "cgroup") == Self.procFile(worker, "cgroup"))
        }

        let oldWorker = try #require(served.workerPID)
        kill(terminator, SIGKILL)
        #expect(served.waitForLog("the TLS terminator has ended"))
        _ = try served.waitForNewWorker(replacing: oldWorker)
        #expect(try Harness.check(Harness.tool("nbdinfo"), ["--size", uri]).contains("8388608"))
    }

    /// A /proc file read to its end (String(contentsOfFile:) stops at the first page).
    static func procFile(_ pid: pid_t, _ name: String) throws -> String {
        guard let handle = FileHandle(forReadingAtPath: "/proc/\(pid)/\(name)") else { throw HarnessError("no /proc/\(pid)/\(name)") }
        defer { try? handle.close() }
        return String(decoding: try handle.readToEnd() ?? Data(), as: UTF8.self)
    }

    /// How many times `needle` occurs in the readable memory of `pid` (as root).
    static func occurrences(of needle: [UInt8], inMemoryOf pid: pid_t) throws -> Int {
        let memory = open("/proc/\(pid)/mem", O_RDONLY)
        guard memory >= 0 else { throw HarnessError("cannot open /proc/\(pid)/mem: \(String(cString: strerror(errno)))") }
        defer { close(memory) }
        let needleData = Data(needle)
        var found = 0
        for line in try procFile(pid, "maps").split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 1, fields[1].hasPrefix("r") else { continue }
            let bounds = fields[0].split(separator: "-").compactMap { UInt64($0, radix: 16) }
            guard bounds.count == 2, bounds[1] > bounds[0] else { continue }
            var region = Data(count: Int(bounds[1] - bounds[0]))
            let read = region.withUnsafeMutableBytes { pread(memory, $0.baseAddress, $0.count, off_t(truncatingIfNeeded: bounds[0])) }
            guard read > 0 else { continue }  // [vvar] and the like cannot be read
            region = region.prefix(read)
            var start = region.startIndex
            while let match = region.range(of: needleData, in: start..<region.endIndex) {
                found += 1
                start = match.upperBound
            }
        }
        return found
    }

    @Test func certificatesWithClientVerification() throws {
        let disk = try disk()
        let (server, client) = try certificates()
        let served = try ServedDisk([disk, "--port", "0", "--tls-certificates", server, "--tls-verify-peer"])
        defer { served.stop() }
        #expect(served.uri.hasPrefix("nbds://127.0.0.1:"))
        let nbdinfo = Harness.tool("nbdinfo")
        #expect(try Harness.check(nbdinfo, ["\(served.uri)?tls-certificates=\(client)"]).contains("export-size: 8388608"))
        let port = served.uri.split(separator: ":")[2].split(separator: "/")[0]
        let object = "tls-creds-x509,id=tls0,endpoint=client,dir=\(client)"
        let image = "driver=nbd,host=127.0.0.1,port=\(port),export=disk.img,tls-creds=tls0"
        let read = try Harness.check(Harness.tool("qemu-io"), ["-r", "--object", object, "--image-opts", image, "-c", "read 0 1M"])
        #expect(read.contains("read 1048576/1048576"))
        // A client without a certificate of the CA's is turned away.
        let anonymous = directory.appendingPathComponent("anonymous")
        try FileManager.default.createDirectory(at: anonymous, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: client + "/ca-cert.pem", toPath: anonymous.appendingPathComponent("ca-cert.pem").path)
        #expect(try Harness.run(nbdinfo, ["\(served.uri)?tls-certificates=\(anonymous.path)"]).status != 0)
        #expect(served.waitForLog("Certificate is required"))
    }

    @Test func misconfiguredTLSIsRefusedUpFront() throws {
        let disk = try disk()
        let missing = try Harness.run(Harness.iofilter, ["serve", disk, "--tls-psk", directory.appendingPathComponent("nope.psk").path])
        #expect(missing.status != 0 && missing.stderr.contains("cannot read the PSK file"), "\(missing.stderr)")
        let both = try Harness.run(Harness.iofilter, ["serve", disk, "--tls-psk", "a", "--tls-certificates", "b"])
        #expect(both.status != 0 && both.stderr.contains("not both"))
    }

    @Test func aHostServesAVMsDisksOverTLS() throws {
        let keys = try pskFile("vm.psk", user: "backup")
        let daemon = try Daemon()
        defer { daemon.stop() }
        try daemon.ok(["disk", "create", "secret", "--size", "16M"])
        try daemon.ok(["vm", "create", "tlsvm", "--disk", "secret", "--tls-psk", keys])
        let vm: VMInfo = try daemon.json(["vm", "start", "tlsvm"])
        let uri = try #require(vm.uris["secret"])
        #expect(uri.hasPrefix("nbds+unix:///secret?socket=") && vm.tls?.pskFile == keys)
        let socket = String(uri.split(separator: "=", maxSplits: 1)[1])
        let client = "nbds+unix://backup@/secret?socket=\(socket)&tls-psk-file=\(keys)"
        #expect(try Harness.check(Harness.tool("nbdinfo"), [client]).contains("export-size: 16777216"))
        #expect(try Harness.run(Harness.tool("nbdinfo"), ["nbd+unix:///secret?socket=\(socket)"]).status != 0)
        // Keys must lie where the admin allows paths, like any file a request names.
        let outside = try daemon.refused(["vm", "create", "other", "--disk", "secret", "--tls-psk", "/etc/passwd"])
        #expect(outside.contains("lies outside"), "\(outside)")
    }

    @Test func theReplicationSampleShipsToATargetThatRequiresTLS() throws {
        let disk = try disk(), keys = try pskFile("replica.psk", user: "replica")
        let socket = directory.appendingPathComponent("replica.sock").path
        let replica = Process()
        replica.executableURL = URL(fileURLWithPath: Harness.tool("nbdkit"))
        replica.arguments = ["-f", "--exit-with-parent", "-U", socket, "--tls=require", "--tls-psk=\(keys)", "memory", "8M"]
        try replica.run()
        defer {
            kill(replica.processIdentifier, SIGKILL)
            replica.waitUntilExit()
        }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: socket) { usleep(50_000) }
        let served = try ServedDisk([disk, "--filter", "replication:target=nbd+unix:///?socket=\(socket),tls-psk=\(keys),mode=sync"])
        defer { served.stop() }
        _ = try Harness.qemuIO(served.uri, ["write -P 0x3c 1M 256k", "flush"])
        // The initial sync and the write reach the replica; read it back over TLS until
        // it matches the disk.
        let copy = directory.appendingPathComponent("replica-copy.img").path
        let deadline = Date().addingTimeInterval(30)
        var same = false
        while !same && Date() < deadline {
            try? FileManager.default.removeItem(atPath: copy)
            try Harness.check(Harness.tool("nbdcopy"), ["nbds+unix://replica@/?socket=\(socket)&tls-psk-file=\(keys)", copy])
            same = try Harness.sha(copy) == Harness.sha(disk)
            if !same { usleep(250_000) }
        }
        #expect(same, "the replica never matched the disk")
        #expect(try Harness.qemuIO(copy, ["read -P 0x3c 1M 256k"]).contains("read 262144/262144"))
    }
}
