import Dispatch
import Foundation
import Hummingbird
import HummingbirdCore
import HummingbirdTLS
import IOFilterHTTP
import IOFilterPosix
import Logging
import NIOCore
import NIOSSL
import ServiceLifecycle

/// The transport of iofilterd's API, on Hummingbird: listeners on a unix socket (callers
/// known by their peer credentials) and on TCP (plain on loopback, TLS elsewhere), with
/// the checks a listener owes its clients before any handler runs: bounded bodies, idle
/// timeouts, and no cross-site or DNS-rebound requests from a browser. What a request
/// means is the handler's business; the handler is synchronous and may block (it runs
/// off the event loops).
public final class APIServer: Sendable {
    public typealias Handler = @Sendable (IOFilterHTTP.HTTPRequest) -> IOFilterHTTP.HTTPResponse

    public static let maximumBodyBytes = 16 << 20

    public enum Listener: Sendable, CustomStringConvertible {
        /// A unix socket, made `mode` and given to `group` once bound.
        case unix(path: String, mode: mode_t, group: gid_t?)
        /// TCP on `host`:`port`; TLS when `tls` is given. `names` are host names (besides
        /// the address itself) clients may call the listener by.
        case tcp(host: String, port: Int, tls: TLSFiles?, names: [String])

        public var description: String {
            switch self {
            case .unix(let path, _, _): "unix:\(path)"
            case .tcp(let host, let port, let tls, _): "\(tls == nil ? "http" : "https")://\(Sockets.authority(host: host, port: port))"
            }
        }
    }

    public struct TLSFiles: Sendable {
        public let certificateChain: String
        public let privateKey: String
        public init(certificateChain: String, privateKey: String) {
            self.certificateChain = certificateChain
            self.privateKey = privateKey
        }
    }

    public struct StartFailure: Error, CustomStringConvertible {
        public let description: String
    }

    let handler: Handler
    let logger: Logger
    /// The running service group and the task that runs it, once `start` made them.
    private let running = Guarded<(group: ServiceGroup, task: Task<Void, Never>)?>(nil)
    /// Signalled when the service group has ended.
    private let finished = DispatchSemaphore(value: 0)

    public init(logger: Logger, handler: @escaping Handler) {
        self.handler = handler
        self.logger = logger
    }

    /// Binds every listener and serves them in the background; returns once all are
    /// bound, or throws what stopped one.
    public func start(_ listeners: [Listener]) throws {
        let started = DispatchSemaphore(value: 0)
        let failure = Guarded<String?>(nil)
        var applications: [any Service] = []
        for listener in listeners {
            let responder = Responder(handler: handler, listener: listener, logger: logger)
            let configuration: ApplicationConfiguration
            let server: HTTPServerBuilder
            let http1 = HTTPServerBuilder.http1(configuration: .init(idleTimeout: .seconds(120)))
            switch listener {
            case .unix(let path, _, _):
                configuration = ApplicationConfiguration(address: .unixDomainSocket(path: path), serverName: "iofilterd")
                server = http1
            case .tcp(let host, let port, let tls, _):
                configuration = ApplicationConfiguration(address: .hostname(host, port: port), serverName: "iofilterd")
                if let tls {
                    do {
                        server = try .tls(http1, tlsConfiguration: Self.tlsConfiguration(tls))
                    } catch {
                        throw StartFailure(description: "cannot use the TLS certificate \(tls.certificateChain) and key \(tls.privateKey): \(error)")
                    }
                } else {
                    server = http1
                }
            }
            var silent = logger
            silent.logLevel = max(logger.logLevel, .warning)
            applications.append(Application(
                responder: responder, server: server, configuration: configuration,
                onServerRunning: { _ in
                    if case .unix(let path, let mode, let group) = listener {
                        chmod(path, mode)
                        if let group { chown(path, UInt32.max, group) }
                    }
                    started.signal()
                }, logger: silent))
        }
        let serviceGroup = ServiceGroup(configuration: ServiceGroupConfiguration(
            services: applications.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) },
            gracefulShutdownSignals: [], cancellationSignals: [], logger: logger))
        let finished = self.finished
        let task = Task.detached {
            do {
                try await serviceGroup.run()
            } catch {
                failure.withLock { $0 = "\(error)" }
            }
            finished.signal()
            started.signal()
        }
        running.withLock { $0 = (serviceGroup, task) }
        for _ in listeners {
            started.wait()
            if let failure = failure.withLock({ $0 }) { throw StartFailure(description: failure) }
        }
    }

    /// Stops accepting, lets requests being handled finish (up to `timeout` seconds),
    /// then closes every connection.
    public func stop(timeout: Double = 30) {
        guard let (serviceGroup, task) = running.withLock({ $0 }) else { return }
        Task.detached { await serviceGroup.triggerGracefulShutdown() }
        if finished.wait(timeout: .now() + timeout) == .timedOut {
            // Cancelling the group's task cancels its servers, which close their connections.
            logger.warning("API requests still running after \(timeout)s; closing their connections")
            task.cancel()
            _ = finished.wait(timeout: .now() + 5)
        }
    }

    static func tlsConfiguration(_ files: TLSFiles) throws -> TLSConfiguration {
        let chain = try NIOSSLCertificate.fromPEMFile(files.certificateChain).map { NIOSSLCertificateSource.certificate($0) }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: chain, privateKey: .privateKey(try NIOSSLPrivateKey(file: files.privateKey, format: .pem)))
        configuration.minimumTLSVersion = .tlsv12
        return configuration
    }
}

/// The request context: Hummingbird's, plus the connection, for its peer credentials.
public struct APIRequestContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }

    public var maxUploadSize: Int { APIServer.maximumBodyBytes }
}
