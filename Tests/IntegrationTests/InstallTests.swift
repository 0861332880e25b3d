import Foundation
import Testing

/// `scripts/install.sh` into a temporary prefix, from this build: what an operator and a
/// C partner get, used as they would use it.
@Suite("install")
struct InstallTests {
    @Test func anInstalledPrefixBuildsServesAndDocumentsItself() throws {
        let directory = Harness.temporaryDirectory("install")
        let prefix = directory.appendingPathComponent("prefix").path
        // Built beside the programs by the README's test command: install.sh would build
        // it otherwise, and SwiftPM cannot build while `swift test` holds the build
        // directory.
        try #require(FileManager.default.isExecutableFile(atPath: Harness.binDirectory.appendingPathComponent("generate-manual").path),
                     "run `swift build --product generate-manual` first, as the README's test command does")
        let install = try Harness.run("/bin/sh", [Harness.repository.appendingPathComponent("scripts/install.sh").path,
                                                  "--prefix", prefix, "--from", Harness.binDirectory.path], timeout: 300)
        #expect(install.status == 0, "\(install.stderr)")

        // A C partner: pkg-config gives the flags, and the sample builds with them alone.
        var environment = ProcessInfo.processInfo.environment
        environment["PKG_CONFIG_PATH"] = "\(prefix)/lib/pkgconfig"
        let flags = try Harness.run("/usr/bin/pkg-config", ["--cflags", "iofilter"], environment: environment)
        #expect(flags.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "-I\(prefix)/include")
        #expect(try Harness.run("/usr/bin/pkg-config", ["--modversion", "iofilter"], environment: environment).stdout.hasPrefix("0."))
        let plugin = directory.appendingPathComponent("mine.so").path
        let cc = try Harness.run("/usr/bin/cc", ["-shared", "-fPIC", "-o", plugin,
                                                 Harness.repository.appendingPathComponent("Plugins/passthrough-c/passthrough.c").path]
                                 + flags.stdout.split(whereSeparator: \.isWhitespace).map(String.init))
        #expect(cc.status == 0, "\(cc.stderr)")

        // The installed programs find their worker in libexec and serve through the plug-in.
        #expect(try Harness.run("\(prefix)/bin/iofilter", ["--version"]).stdout.contains("plug-in ABI"))
        let disk = Harness.makeImage(directory.appendingPathComponent("disk.img").path, size: 4 << 20)
        let served = try ServedDisk([disk, "--filter", plugin, "--socket", directory.appendingPathComponent("s.sock").path],
                                    executable: "\(prefix)/bin/iofilter")
        defer { served.stop() }
        #expect(try Harness.qemuIO(served.uri, ["write -P 0x21 0 64k", "read -P 0x21 0 64k"]).contains("read 65536/65536"))

        // The installed host finds its sample plug-ins for the demo.
        let (demo, demoLog, demoURI) = try DemoTests.startDemo("\(prefix)/bin/iofilterd", state: directory.appendingPathComponent("demo"),
                                                               size: "16M")
        defer {
            demo.terminate()
            demo.waitUntilExit()
        }
        #expect(demoURI.hasPrefix("nbd+unix:///demo-disk"), "\(demoLog.snapshot())")
        #expect(try Harness.qemuIO(demoURI, ["read 0 4096"]).contains("read 4096/4096"))

        // A manual page for every command, shell completions, the systemd unit.
        for page in ["iofilter.1", "iofilter.serve.1", "iofilter.vm.create.1", "iofilter.plugin.install.1", "iofilterd.1"] {
            let text = (try? String(contentsOfFile: "\(prefix)/share/man/man1/\(page)", encoding: .utf8)) ?? ""
            #expect(text.contains(".Dt") || text.contains(".TH"), "\(page) is a manual page")
        }
        let rendered = try Harness.run("/usr/bin/man", ["-l", "\(prefix)/share/man/man1/iofilter.vm.create.1"],
                                       environment: environment.merging(["MANPAGER": "cat", "MANWIDTH": "100"]) { $1 })
        #expect(rendered.stdout.contains("--cpu-weight"), "\(rendered.stdout.prefix(400))")
        #expect(try Harness.run("/bin/bash", ["-n", "\(prefix)/share/bash-completion/completions/iofilter"]).status == 0)
        #expect(FileManager.default.fileExists(atPath: "\(prefix)/share/zsh/site-functions/_iofilter"))
        // The Prometheus alert rules: valid, and each fires on the series a host in that
        // state exports (promtool's unit tests, Fixtures/alerts-test.yml).
        let rules = "\(prefix)/share/iofilter/alerts.yml"
        #expect(FileManager.default.fileExists(atPath: rules))
        let promtool = try #require(Harness.promtool, "promtool is missing: run scripts/install-dependencies.sh --tests")
        let checked = try Harness.run(promtool, ["check", "rules", rules])
        #expect(checked.status == 0 && checked.stdout.contains("SUCCESS: 7 rules found"), "\(checked.stdout) \(checked.stderr)")
        let ruleTests = directory.appendingPathComponent("alerts-test.yml")
        let template = try String(contentsOf: Harness.repository.appendingPathComponent("Tests/IntegrationTests/Fixtures/alerts-test.yml"), encoding: .utf8)
        try template.replacingOccurrences(of: "ALERTS_FILE", with: rules).write(to: ruleTests, atomically: true, encoding: .utf8)
        let fired = try Harness.run(promtool, ["test", "rules", ruleTests.path])
        #expect(fired.status == 0, "promtool test rules: \(fired.stdout) \(fired.stderr)")

        let unit = "\(prefix)/lib/systemd/system/iofilterd.service"
        #expect((try? String(contentsOfFile: unit, encoding: .utf8))?.contains("ExecStart=\(prefix)/bin/iofilterd") == true)
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/systemd-analyze") {
            // With the prefix's manual pages on MANPATH, its Documentation= resolves too.
            let verify = try Harness.run("/usr/bin/systemd-analyze", ["verify", unit],
                                         environment: environment.merging(["MANPATH": "\(prefix)/share/man"]) { $1 })
            #expect(verify.status == 0, "systemd-analyze verify: \(verify.stderr)")
        } else {
            print("note: no systemd-analyze here; the unit was not verified")
        }
    }
}
