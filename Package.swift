// swift-tools-version: 6.1
import PackageDescription

// Where things live:
//   include/                 the C ABI (iofilter.h), the only thing a plug-in builds against
//   Sources/IOFilterModel    plug-in manifests, parameters, chain ordering rules (pure values)
//   Sources/IOFilterNBD      the NBD protocol: server and client; knows nothing of filters
//   Sources/IOFilterPluginLoader  dlopen, descriptor checks, management calls via libffi
//   Sources/IOFilterChain    the chain engine and storage backends (runs in the worker)
//   Sources/IOFilterSandbox  seccomp, Landlock, prctl, rlimits for worker processes
//   Sources/IOFilterHost     spawning and supervising sandboxed workers and validators
//   Sources/IOFilterHTTP     a small HTTP/1.1 server and client; knows nothing of filters
//   Sources/IOFilterAPI      the JSON resources of iofilterd's API (shared with clients)
//   Sources/IOFilterControl  iofilterd's state (SQLite), policies, disks, VMs and the API routes
//   Sources/iofilter-worker, iofilter, iofilterd   the executables
//   Plugins/                 sample plug-ins
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
        .library(name: "iofilter-passthrough-c", type: .dynamic, targets: ["PassthroughC"]),
        .library(name: "iofilter-template", type: .dynamic, targets: ["TemplateFilter"]),
        .library(name: "iofilter-replication", type: .dynamic, targets: ["ReplicationFilter"]),
        .library(name: "iofilter-cache", type: .dynamic, targets: ["CacheFilter"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/groue/GRDB.swift", from: "7.10.0"),
    ],
    targets: [
        .systemLibrary(name: "CIOFilter", path: "include"),
        .systemLibrary(
            name: "CLibFFI", path: "Sources/CLibFFI", pkgConfig: "libffi",
            providers: [.apt(["libffi-dev"])]),
        .target(
            name: "CSystemShims",
            linkerSettings: [.linkedLibrary("seccomp")]),
        .target(name: "IOFilterPosix", dependencies: ["CSystemShims"], swiftSettings: strict),

        .target(name: "IOFilterModel", swiftSettings: strict),
        .target(name: "IOFilterLogging", dependencies: [.product(name: "Logging", package: "swift-log")], swiftSettings: strict),
        .target(
            name: "IOFilterNBD",
            dependencies: ["IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "IOFilterPluginLoader",
            dependencies: ["CIOFilter", "CLibFFI", "IOFilterModel"],
            swiftSettings: strict),
        .target(
            name: "IOFilterChain",
            dependencies: [
                "CIOFilter", "IOFilterPosix", "IOFilterModel", "IOFilterPluginLoader", "IOFilterNBD",
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .target(
            name: "IOFilterSandbox",
            dependencies: ["IOFilterPosix", "CSystemShims", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(
            name: "IOFilterHost",
            dependencies: [
                "CSystemShims", "IOFilterPosix", "IOFilterModel", "IOFilterNBD", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        .target(
            name: "IOFilterHTTP",
            dependencies: ["CSystemShims", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            swiftSettings: strict),
        .target(name: "IOFilterAPI", dependencies: ["IOFilterModel"], swiftSettings: strict),
        .target(
            name: "IOFilterControl",
            dependencies: [
                "IOFilterAPI", "IOFilterHTTP", "IOFilterHost", "IOFilterModel", "IOFilterNBD", "IOFilterPosix",
                .product(name: "GRDB", package: "GRDB.swift"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        .executableTarget(
            name: "iofilter-worker",
            dependencies: [
                "IOFilterModel", "IOFilterPluginLoader", "IOFilterChain", "IOFilterSandbox",
                "IOFilterNBD", "IOFilterLogging", .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "iofilter",
            dependencies: [
                "IOFilterHost", "IOFilterLogging", "IOFilterModel", "IOFilterAPI", "IOFilterHTTP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),
        .executableTarget(
            name: "iofilterd",
            dependencies: [
                "IOFilterHost", "IOFilterLogging", "IOFilterModel", "IOFilterControl", "IOFilterHTTP",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict),

        // The Swift SDK: what a Swift plug-in depends on (with the header).
        .target(
            name: "IOFilterSDK", dependencies: ["CIOFilter", "IOFilterNBD", "IOFilterPosix", .product(name: "Logging", package: "swift-log")],
            path: "SDK/IOFilterSDK", swiftSettings: strict),

        // The C sample, built by SwiftPM as a shared object; it needs only the header.
        .target(
            name: "PassthroughC", path: "Plugins/passthrough-c",
            exclude: ["Makefile", "README.md"],
            sources: ["passthrough.c"],
            publicHeadersPath: "public",
            cSettings: [.headerSearchPath("../../include")]),

        .target(name: "TemplateFilter", dependencies: ["IOFilterSDK"], path: "Plugins/template-swift", swiftSettings: strict),
        .target(name: "ReplicationFilter", dependencies: ["IOFilterSDK"], path: "Plugins/replication", swiftSettings: strict),
        .target(name: "CacheFilter", dependencies: ["IOFilterSDK"], path: "Plugins/cache", swiftSettings: strict),

        .testTarget(name: "IOFilterModelTests", dependencies: ["IOFilterModel"]),
        .testTarget(
            name: "IOFilterChainTests",
            dependencies: [
                "CIOFilter", "IOFilterChain", "IOFilterModel", "IOFilterNBD", "IOFilterPluginLoader", "IOFilterPosix",
                .product(name: "Logging", package: "swift-log"),
            ]),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["IOFilterModel", "IOFilterNBD", "IOFilterHost", "IOFilterAPI", "IOFilterHTTP", "IOFilterControl"],
            exclude: ["Fixtures"]),
    ]
)
