import CIOFilter
import CSystemShims
import Glibc
import IOFilterNBD
import IOFilterPosix
import Logging
import Synchronization

/// The storage below a chain. `submit` reads the request's `io` and calls
/// `request.backendDidComplete(error:)` exactly once, inline or from another thread.
public protocol StorageBackend: AnyObject, Sendable, CustomStringConvertible {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    var canTrim: Bool { get }
    var canWriteZeroes: Bool { get }
    func submit(_ request: ChainRequest)
    /// Makes completed writes durable and lets go of the storage: 0 or an errno.
    func close() -> Int32
}
