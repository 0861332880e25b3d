// Plug-ins get the SDK's thin POSIX helpers (threads, locks, file I/O) without a
// dependency of their own on the host's modules.
@_exported import IOFilterPosix
