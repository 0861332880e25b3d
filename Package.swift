// swift-tools-version: 6.1
import PackageDescription

// The layout, described here and nowhere else (the README points here). One job per
// module; the dependency rules: IOFilterNBD and IOFilterNBDServer know nothing of
// filters; the SDK and every plug-in depend on the header, its Swift mirror
// (IOFilterABI) and the SDK only, never on the host; the host library knows no
// particular plug-in and no executable; only the worker (and the sandboxed validator,
// which is the worker) dlopen plug-ins; no plug-in links a sandboxing library.
//
//   include/                   iofilter.h: the C ABI and the partner's manual
//   Sources/IOFilterABI        the header's enumerations and flags in Swift, once (host and SDK)
//   Sources/IOFilterModel      manifests, parameters, chain rules, worker configuration (values)
//   Sources/CSystemShims       plain syscall shims (every module, plug-ins included)
//   Sources/CSandboxShims      seccomp, Landlock, namespaces, the private root (the worker only)
//   Sources/CNettle            Ed25519 and SHA-256 from Nettle, GnuTLS's own library
//   Sources/IOFilterPosix      thin wrappers over syscalls: fds, sockets, threads
//   Sources/IOFilterLogging    how every executable logs
//   Sources/IOFilterNBD        the NBD protocol, its pipelining client, the target broker's wire (no TLS library)
//   Sources/IOFilterTLS        TLS on GnuTLS (Sources/CTLS): the client's PSK handshake, server credentials
//   Sources/IOFilterNBDServer  the NBD server: handshake, STARTTLS, connections, request slots
//   Sources/CVhostUser, IOFilterVhostUser  the vhost-user-blk export: protocol, guest memory and
//                              virtqueues (C), its server, queue threads and request slots (Swift)
//   Sources/IOFilterPluginLoader  dlopen, descriptor checks, management calls via libffi
//   Sources/IOFilterTracking   changed-block tracking: checkpoints' persistent bitmaps
//   Sources/IOFilterChain      the chain engine: requests, filter instances, host services, the NBD export,
//                              point-in-time copies (copy-before-write snapshots)
//   Sources/IOFilterBackends   what is below a chain: a raw file, a remote NBD export
//   Sources/IOFilterWorkerRuntime  inside the sandbox: a worker's disks and plug-ins, a daemon's daemon_main
//   Sources/IOFilterSandbox    namespaces, identity, the private root, seccomp, Landlock, rlimits for workers
//   Sources/IOFilterWire       the host<->worker control channel (JSON lines)
//   Sources/IOFilterHost       SandboxedLaunch (how every sandboxed process starts), ProcessSupervisor
//                              (one restart policy for workers and daemons), WorkerSupervisor,
//                              DaemonSupervisor, MaintenanceWorker, PluginValidator, VMSession
//                              (a VM's listeners and worker: iofilterd and `iofilter serve`), cgroups
//   Sources/IOFilterTrust      plug-in signing keys, signature files, acceptance levels (Ed25519)
//   Sources/IOFilterHTTP       HTTP messages and a small blocking client; knows nothing of filters
//   Sources/IOFilterAPIServer  the API's transport on Hummingbird: unix (peer credentials), TCP, TLS, Host/Origin checks
//   Sources/IOFilterAPI        the JSON resources of iofilterd's API (shared with clients)
//   Sources/IOFilterControl    iofilterd's state: HostController, a facade over its parts (Parts/:
//                              StateLayout, PluginCatalogue, DiskFiles, SessionRegistry, DaemonRegistry)
//                              and the SQLite store; plug-ins, policies, disks, VMs, /metrics' figures
//   Sources/IOFilterAPIRoutes  the API's HTTP presentation: routes, the OpenAPI document, the live
//                              stream, the web console's assets
//   Sources/iofilter-worker    the sandboxed worker; Sources/iofilter the CLI; Sources/iofilterd the host
//   SDK/IOFilterSDK            the Swift SDK: the header's types, threads, locks, block targets
//   SDK/IOFilterSDKTLS         the SDK's TLS (TargetTLS(pskFile:), PeerTLS): only plug-ins that use it link GnuTLS
//   Plugins/                   samples: passthrough-c (C), replication, cache, template-swift
//   Tests/                     unit tests per module (IOFilterModelTests, IOFilterTrustTests,
//                              IOFilterChainTests: the engine in process) and IntegrationTests
//                              (real clients, workers, faults); Tests/Benchmarks
let strict: [SwiftSetting] = [.enableUpcomingFeature("ExistentialAny")]

let package = Package(
    name: "swift-iofilter",
    products: [
        .executable(name: "iofilter", targets: ["iofilter"]),
        .executable(name: "iofilterd", targets: ["iofilterd"]),
        .executable(name: "iofilter-worker", targets: ["iofilter-worker"]),
        .library(name: "IOFilterHost", targets: ["IOFilterHost"]),
        .library(name: "IOFilterNBD", targets: ["IOFilterNBD"]),
        .library(name: "IOFilterSDK", targets: ["IOFilterSDK"]),
        .library(name: "IOFilterSDKTLS", targets: ["IOFilterSDKTLS"]),
        .library(name: "iofilter-passthrough-c", type: .dynamic, targets: ["PassthroughC"]),
        .library(name: "iofilter-template", type: .dynamic, targets: ["TemplateFilter"]),
        .library(name: "iofilter-replication", type: .dynamic, targets: ["ReplicationFilter"]),
        .library(name: "iofilter-cache", type: .dynamic, targets: ["CacheFilter"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
    ],
    targets: [
        .systemLibrary(name: "CIOFilter", path: "include"),
        .systemLibrary(
            name: "CLibFFI", path: "Sources/CLibFFI", pkgConfig: "libffi",
            providers: [.apt(["libffi-dev"])]),
        // Plain syscall shims, linked by everything including plug-ins; what confines a
        // worker (seccomp, Landlock, namespaces) is apart, so no plug-in links libseccomp.
        .target(name: "CSystemShims"),
        .target(name: "CSandboxShims", linkerSettings: [.linkedLibrary("seccomp")]),
        .target(name: "IOFilterPosix", dependencies: ["CSystemShims"], swiftSettings: strict),
        // TLS for the NBD server, on GnuTLS (what libnbd, nbdkit and QEMU speak).
        .target(name: "CTLS", linkerSettings: [.linkedLibrary("gnutls")]),
        // Ed25519 and SHA-256 for plug-in signatures and API tokens, from Nettle: GnuTLS's
        // own library, so the host compiles no second cryptographic library.
        .systemLibrary(name: "CNettle", path: "Sources/CNettle", pkgConfig: "hogweed", providers: [.apt(["nettle-dev"])]),

        // The header's enumerations and flags in Swift, once: the host and the SDK share them.
        .target(name: "IOFilterABI", dependencies: ["CIOFilter"], swiftSettings: strict),
        .target(name: "IOFilterModel", dependencies: ["CIOFilter", "IOFilterABI"], swiftSettings: strict),
        .target(name: "IOFilterLogging", dependencies: [.product(name: "Logging", package: "swift-log")], swiftSettings: strict),
        .target(
            name: "IOFilterNBD",
            dependencies: ["CSystemShims", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // TLS on GnuTLS: the client's PSK handshake, the server credentials.
        .target(name: "IOFilterTLS", dependencies: ["CTLS", "IOFilterNBD", "IOFilterPosix"], swiftSettings: strict),
        .target(
            name: "IOFilterNBDServer",
            dependencies: ["CSystemShims", "IOFilterNBD", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // vhost-user-blk: the protocol and virtqueues in C (Sources/CVhostUser), the
        // server, its threads and requests in Swift; like the NBD server, no filters.
        .target(name: "CVhostUser"),
        .target(
            name: "IOFilterVhostUser",
            dependencies: ["CSystemShims", "CVhostUser", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "IOFilterPluginLoader",
            dependencies: ["CIOFilter", "CLibFFI", "IOFilterABI", "IOFilterModel"],
            swiftSettings: strict),
        // Changed-block tracking: checkpoints' persistent bitmaps beside a disk.
        .target(name: "IOFilterTracking", dependencies: ["CSystemShims", "IOFilterModel", "IOFilterPosix"], swiftSettings: strict),
        // The chain engine: requests meeting filters, dispositions, resumes, the NBD export.
        .target(
            name: "IOFilterChain",
            dependencies: [
                "CIOFilter", "CSystemShims", "IOFilterPosix", "IOFilterModel", "IOFilterPluginLoader", "IOFilterNBD", "IOFilterNBDServer",
                "IOFilterTracking", "IOFilterVhostUser",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        // What is below a chain: a raw file, a remote NBD export.
        .target(
            name: "IOFilterBackends",
            dependencies: ["CIOFilter", "CSystemShims", "IOFilterChain", "IOFilterNBD", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // A worker's and a partner daemon's life inside the sandbox: plug-ins loaded, disks
        // opened through their chains, the watchdog, lifecycle events, daemon_main.
        .target(
            name: "IOFilterWorkerRuntime",
            dependencies: [
                "CIOFilter", "CSandboxShims", "CSystemShims", "IOFilterBackends", "IOFilterChain", "IOFilterModel", "IOFilterNBD",
                "IOFilterPluginLoader", "IOFilterPosix", "IOFilterTracking", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "IOFilterSandbox",
            dependencies: ["IOFilterPosix", "CSandboxShims", "CSystemShims", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        // What crosses between the host and its sandboxed processes: the control channel.
        .target(name: "IOFilterWire", dependencies: ["CSystemShims", "IOFilterModel", "IOFilterPosix"], swiftSettings: strict),
        .target(
            name: "IOFilterHost",
            dependencies: [
                "CSystemShims", "IOFilterPosix", "IOFilterModel", "IOFilterNBD", "IOFilterWire", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        .target(
            name: "IOFilterTrust",
            dependencies: ["CNettle", "IOFilterModel"],
            swiftSettings: strict),

        .target(
            name: "IOFilterHTTP",
            dependencies: ["CSystemShims", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "IOFilterAPIServer",
            dependencies: [
                "IOFilterHTTP", "IOFilterPosix",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdCore", package: "hummingbird"),
                .product(name: "HummingbirdTLS", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(name: "IOFilterAPI", dependencies: ["IOFilterModel"], swiftSettings: strict),
        .target(
            name: "IOFilterControl",
            dependencies: [
                "IOFilterAPI", "IOFilterHTTP", "IOFilterHost", "IOFilterModel", "IOFilterNBD", "IOFilterPosix", "IOFilterTracking",
                "IOFilterTrust", .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "IOFilterAPIRoutes",
            dependencies: [
                "IOFilterAPI", "IOFilterControl", "IOFilterHTTP", "IOFilterModel", "IOFilterPosix",
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            // The web console's page, style and script, compiled into iofilterd.
            resources: [.embedInCode("Console/console.html"), .embedInCode("Console/console.css"), .embedInCode("Console/console.js")],
            swiftSettings: strict),

        .executableTarget(
            name: "iofilter-worker",
            dependencies: [
                "IOFilterModel", "IOFilterPluginLoader", "IOFilterChain", "IOFilterWorkerRuntime", "IOFilterSandbox",
                "IOFilterNBD", "IOFilterNBDServer", "IOFilterLogging", "IOFilterPosix", "IOFilterTLS", "IOFilterVhostUser", "IOFilterWire",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "iofilter",
            dependencies: [
                "IOFilterHost", "IOFilterLogging", "IOFilterModel", "IOFilterAPI", "IOFilterHTTP", "IOFilterTrust",
                "IOFilterNBD", "IOFilterPosix", "IOFilterWire",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "iofilterd",
            dependencies: [
                "IOFilterHost", "IOFilterLogging", "IOFilterModel", "IOFilterControl", "IOFilterAPIRoutes", "IOFilterAPIServer", "IOFilterTrust",
                "IOFilterAPI", "IOFilterNBD", "IOFilterPosix",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        // The Swift SDK: what a Swift plug-in depends on (with the header).
        .target(
            name: "IOFilterSDK", dependencies: ["CIOFilter", "IOFilterABI", "CSystemShims", "IOFilterNBD", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            path: "SDK/IOFilterSDK", swiftSettings: strict),
        // TLS for plug-ins that speak it (NBD targets over TLS, daemons and their peers).
        .target(
            name: "IOFilterSDKTLS", dependencies: ["IOFilterNBD", "IOFilterSDK", "IOFilterTLS"],
            path: "SDK/IOFilterSDKTLS", swiftSettings: strict),

        // The C sample, built by SwiftPM as a shared object; it needs only the header.
        .target(
            name: "PassthroughC", path: "Plugins/passthrough-c",
            exclude: ["Makefile", "README.md"],
            sources: ["passthrough.c"],
            publicHeadersPath: "public",
            cSettings: [.headerSearchPath("../../include")]),

        .target(name: "TemplateFilter", dependencies: ["IOFilterSDK"], path: "Plugins/template-swift", swiftSettings: strict),
        .target(name: "ReplicationFilter", dependencies: ["IOFilterSDK", "IOFilterSDKTLS"], path: "Plugins/replication", exclude: ["README.md"],
                swiftSettings: strict),
        .target(name: "CacheFilter", dependencies: ["IOFilterSDK"], path: "Plugins/cache", exclude: ["README.md"], swiftSettings: strict),

        .testTarget(name: "IOFilterModelTests", dependencies: ["IOFilterModel"]),
        .testTarget(name: "IOFilterTrustTests", dependencies: ["IOFilterModel", "IOFilterTrust"]),
        .testTarget(
            name: "IOFilterChainTests",
            dependencies: [
                "CIOFilter", "IOFilterBackends", "IOFilterChain", "IOFilterModel", "IOFilterNBD", "IOFilterNBDServer", "IOFilterPluginLoader", "IOFilterPosix",
                "IOFilterTracking", .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "IOFilterModel", "IOFilterNBD", "IOFilterNBDServer", "IOFilterHost", "IOFilterAPI", "IOFilterHTTP", "IOFilterControl", "IOFilterAPIRoutes",
                "IOFilterPosix", "IOFilterSDK",
                .product(name: "Logging", package: "swift-log"),
            ],
            exclude: ["Fixtures"]),
    ]
)
