/// What the host hands a VM's TLS terminator (`iofilter-worker tls-terminator`), the
/// process that runs its NBD clients' TLS sessions so that the keys stay out of the
/// worker, where plug-ins run. The worker negotiates NBD up to STARTTLS, then passes the
/// client's socket and one end of a fresh socket pair over `channelFD` (see
/// `TLSTerminatorLink`); the terminator does the handshake and carries the plaintext
/// through the pair. It ends when the worker's end of the channel closes: it lives
/// exactly as long as its worker. Run by root, it becomes `WorkerIdentity(for:)` of
/// "tls:VM", not the worker's identity, so that a plug-in could not signal it even if
/// it could see it. Its log level comes as every sandboxed process's does
/// (IOFILTER_LOG_LEVEL).
public struct TLSTerminatorConfiguration: Codable, Sendable, Equatable {
    public var vmName: String
    public var tls: TLSSettings
    /// The fd number of the terminator's end of the channel (a SOCK_SEQPACKET pair).
    public var channelFD: Int32
    public var sandbox: Bool
    /// It outlives the host as its worker does (a later host adopts the worker; the
    /// terminator goes on serving it), else it dies with the host.
    public var outlivesSupervisor: Bool
    /// Its worker's cgroup (the `cgroup.procs` file of each hierarchy), which it joins
    /// first thing where it was not born there: its memory counts with the worker's.
    public var cgroupProcs: [String]?

    public init(vmName: String, tls: TLSSettings, channelFD: Int32, sandbox: Bool, outlivesSupervisor: Bool) {
        self.vmName = vmName
        self.tls = tls
        self.channelFD = channelFD
        self.sandbox = sandbox
        self.outlivesSupervisor = outlivesSupervisor
    }
}
