// iofilter-worker — the sandboxed process that loads plug-ins.
//
//   iofilter-worker serve                   serve a VM's disks; configuration as JSON on
//                                           stdin, listening sockets as fds 3, 4, …;
//                                           prints READY on stdout once serving
//   iofilter-worker daemon                  run a plug-in's partner daemon; configuration
//                                           as JSON on stdin, its channel listener as fd 3
//   iofilter-worker tls-terminator          run the TLS sessions of a VM's clients, out
//                                           of its worker's reach; configuration as
//                                           JSON on stdin, its channel to the worker
//   iofilter-worker validate PLUGIN.so      print the plug-in's manifest as JSON
//   iofilter-worker call PLUGIN.so OP ARG…  call a management operation, print the result
//
// It is started by the host (never by hand) and confines itself before any plug-in
// code runs: whatever a plug-in does, only this process suffers.
import Glibc
import IOFilterLogging
import IOFilterPosix

StandardErrorLogging.bootstrap()
let arguments = Array(CommandLine.arguments.dropFirst())
switch (arguments.first ?? "", arguments.count) {
case ("validate", 2): validatePlugin(arguments[1])
case ("call", 3...): callOperation(arguments[1], arguments[2], Array(arguments.dropFirst(3)))
case ("serve", 1): serveDisks()
case ("daemon", 1): runDaemon()
case ("tls-terminator", 1): terminateTLS()
default:
    try? FileDescriptorIO.writeAll(STDERR_FILENO, Array("usage: iofilter-worker serve | daemon | tls-terminator | validate PLUGIN.so | call PLUGIN.so OP [ARG...]\n(started by iofilter and iofilterd; not meant to be run by hand)\n".utf8))
    exit(64)
}
