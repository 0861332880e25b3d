import ArgumentParser
import Foundation
import IOFilterHost
import IOFilterModel
import Logging

/// Every command names itself (`commandName:`): a name ArgumentParser derives from the
/// type costs a runtime conformance lookup per command at each start, some 12 ms of
/// every `iofilter` run, `iofilter serve` included.
@main
struct IOFilterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "iofilter",
        abstract: "Validate, try and manage I/O filter plug-ins for virtual disks.",
        discussion: """
            Plug-ins are shared objects built against include/iofilter.h. Every plug-in is \
            loaded in a sandboxed worker process, never in this one.

            Try a plug-in against real clients in one line (no daemon needed):
              iofilter serve disk.img --size 1G --filter ./myfilter.so
              qemu-img info 'nbd+unix:///disk.img?socket=/tmp/…'

            Manage a host through iofilterd (start it with `iofilterd`):
              iofilter plugin install ./myfilter.so     install a validated plug-in
              iofilter capabilities                     what policies may ask for
              iofilter policy create gold --filter …    pick filters and parameters
              iofilter disk create data --size 10G --policy gold
              iofilter vm create web --disk data && iofilter vm start web
            """,
        version: Release.description,
        subcommands: [
            Plugin.self, Capabilities.self, PolicyCommand.self, DiskCommand.self, VMCommand.self, HealthCommand.self, Events.self, AlertCommand.self, Serve.self, TrustCommand.self, TokenCommand.self,
        ])

    struct Plugin: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "plugin", abstract: "Validate, install and remove plug-ins, and call their management operations.",
            subcommands: [Validate.self, Info.self, Install.self, List.self, Show.self, Remove.self, Call.self, DaemonListen.self, Keygen.self, Sign.self, Verify.self])
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data("error: \(message)\n".utf8))
}

func jsonLine(_ value: some Encodable) -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys]
    return String(decoding: (try? encoder.encode(value)) ?? Data(), as: UTF8.self)
}
