// `iofilter-worker tls-terminator`: a VM's NBD clients' TLS sessions, in a process of
// their own so that the keys stay out of the worker, where plug-ins run. It loads no
// plug-in and reaches no file; it sees the worker only through its channel.
import FoundationEssentials
import Glibc
import CSystemShims
import IOFilterModel
import IOFilterNBD
import IOFilterNBDServer
import IOFilterPosix
import IOFilterSandbox
import IOFilterTLS
import Logging

/// Runs TLS sessions for the worker at the other end of the channel until it closes.
@MainActor func terminateTLS() -> Never {
    let (configuration, signals) = beginBoot(TLSTerminatorConfiguration.self, mode: "tls-terminator", label: "iofilter.tls") {
        ("vm", $0.vmName)
    }
    if configuration.sandbox { closeInheritedFDs(keeping: [configuration.channelFD]) }
    _ = joinedCgroup(configuration.cgroupProcs, what: "TLS terminator", otherwise: "its memory counts in the host's group")
    // The key files are not in the confined view.
    let credentials: NBDTLS
    do {
        if let file = configuration.tls.pskFile {
            credentials = try .psk(file: file)
        } else if let directory = configuration.tls.certificatesDirectory {
            credentials = try .certificates(directory: directory, verifyPeer: configuration.tls.verifyPeer)
        } else {
            throw NBDError(description: "TLS settings name no PSK file and no certificates")
        }
    } catch {
        cannotStart(error)
    }
    if configuration.sandbox {
        // The worker's confinement with nothing to read or write: no files, no sockets
        // of its own, no processes; the channel pinned. Its memory counts in the VM's
        // cgroup, joined above; no RLIMIT_AS, which would refuse the C
        // library's per-thread arenas long before memory ran short.
        confine {
            $0.keepFDsBelow = nil
            $0.pinnedFDs = [configuration.channelFD]
            $0.outlivesSupervisor = configuration.outlivesSupervisor
            $0.identity = identity(WorkerIdentity(for: "tls:" + configuration.vmName))
            $0.denySockets = true
        }
    }
    let terminatorLogger = logger
    startThread(name: "signals") {
        let received = signals.wait()
        terminatorLogger.info("signal \(received): ending every TLS session")
        exit(0)
    }
    logger.info("terminating TLS for the worker with \(credentials.description)")
    say("READY")
    stopTalkingOnStdout()
    let channel = configuration.channelFD
    while true {
        var request = [UInt8](repeating: 0, count: TLSTerminatorLink.requestSize)
        var fds: [Int32] = [-1, -1]
        var count: Int32 = 0
        var truncated: Int32 = 0
        let received = request.withUnsafeMutableBytes {
            iof_receive_with_fds(channel, $0.baseAddress, $0.count, &fds, 2, &count, &truncated)
        }
        if received == -Int(EINTR) { continue }
        guard received > 0 else {
            // The worker has gone, and with it every session's plaintext end.
            logger.info("the worker's channel closed: ending")
            exit(0)
        }
        guard received == request.count, count == 2 else {
            logger.error("a malformed request from the worker (\(received) bytes, \(count) fds); ignored")
            fds.prefix(Int(count)).forEach { close($0) }
            continue
        }
        let timeout = request.enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
        let (client, plain) = (fds[0], fds[1])
        // One handshake per thread: a slow client holds up no other.
        startThread(name: "tls-handshake") {
            if let failure = credentials.accept(client, into: plain, timeoutMilliseconds: Int32(clamping: timeout)) {
                terminatorLogger.info("\(failure)")
            }
            close(client)
        }
    }
}
