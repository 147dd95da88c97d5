// swift-tools-version:6.0
import PackageDescription

// The folder tree is the architecture: each target has one job and imports only
// the targets listed before it (see docs/ARCHITECTURE.md).
let strict: [SwiftSetting] = [.unsafeFlags(["-warnings-as-errors"])]

let package = Package(
    name: "livemig",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "livemig", targets: ["livemig"]),
        // Loaded into an unmodified program by `livemig run` (LD_PRELOAD).
        .library(name: "LivemigPreload", type: .dynamic, targets: ["LivemigPreload"]),
        // For the nested Benchmarks/ package (a path dependency sees products only).
        .library(
            name: "LivemigCore",
            targets: ["CShims", "OSCall", "GuestMemory", "MigrationWire", "Trust", "URing", "WorkerThreads", "Migration"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        // Postcopy fault latencies (p50/p99/max) on the destination.
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
    ],
    targets: [
        // Linux, liburing and libzstd pieces Swift cannot import directly:
        // atomics on raw memory, futex, seccomp, uapi constants newer than
        // Debian 12's headers, opaque ring and zstd contexts.
        .target(
            name: "CShims",
            path: "CShims",
            linkerSettings: [.linkedLibrary("uring"), .linkedLibrary("zstd"), .linkedLibrary("xxhash")]
        ),
        // `livemig run`'s preload library: registers the program's mapping
        // of its RAM file for kernel write tracking. Plain C, no Swift
        // runtime in the program.
        .target(name: "LivemigPreload", path: "Preload"),
        // The system-call conventions in one place: EINTR retried, errno
        // captured as an Errno, the monotonic clock, process liveness.
        .target(
            name: "OSCall", dependencies: [.product(name: "SystemPackage", package: "swift-system")], swiftSettings: strict),
        // Joinable OS threads whose bodies never inherit an actor's isolation.
        .target(name: "WorkerThreads", dependencies: ["CShims"], swiftSettings: strict),
        // The guest's RAM file, page geometry and the dirty bitmap. No network.
        .target(
            name: "GuestMemory",
            dependencies: ["CShims", "OSCall", "WorkerThreads", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict
        ),
        // Wire formats: encode, decode, validate. Pure: no sockets, no files.
        .target(name: "MigrationWire", swiftSettings: strict),
        // Pre-shared keys, hello proofs, per-channel keys, MACs and AEAD
        // (swift-crypto), and the content hashes of integrity checks.
        .target(
            name: "Trust",
            dependencies: ["CShims", .product(name: "Crypto", package: "swift-crypto")],
            swiftSettings: strict
        ),
        // Sockets, addresses and the io_uring ring with its plain-syscall fallback.
        .target(
            name: "URing",
            dependencies: ["CShims", "OSCall", .product(name: "SystemPackage", package: "swift-system")],
            swiftSettings: strict
        ),
        // Source and destination engines: channels, hand-off, rounds, statistics.
        .target(
            name: "Migration",
            dependencies: [
                "CShims", "OSCall", "GuestMemory", "MigrationWire", "Trust", "URing", "WorkerThreads",
                .product(name: "SystemPackage", package: "swift-system"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
            ],
            swiftSettings: strict
        ),
        // QMP, the QEMU Machine Protocol: JSON values, framing, capabilities
        // negotiation, commands and events over a Unix or loopback socket.
        // Knows nothing about migration.
        .target(name: "QMP", dependencies: ["OSCall", "URing", "WorkerThreads"], swiftSettings: strict),
        // The stress guest (patterns, rates, counter workload) and its verifier.
        .target(name: "Workload", dependencies: ["CShims", "OSCall", "GuestMemory", "WorkerThreads"], swiftSettings: strict),
        // The command line: parsing, output formatting, exit codes.
        .executableTarget(
            name: "livemig",
            dependencies: [
                "CShims", "OSCall", "GuestMemory", "MigrationWire", "Trust", "URing", "Migration", "Workload", "WorkerThreads",
                "QMP", .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "SystemPackage", package: "swift-system"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "GuestMemoryTests",
            dependencies: [
                "GuestMemory", "TestSupport", "WorkerThreads", "CShims", .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(name: "OSCallTests", dependencies: ["OSCall", .product(name: "SystemPackage", package: "swift-system")]),
        .testTarget(name: "WorkloadTests", dependencies: ["Workload", "GuestMemory"]),
        .testTarget(name: "MigrationWireTests", dependencies: ["MigrationWire", "TestSupport"]),
        .testTarget(name: "TrustTests", dependencies: ["Trust", .product(name: "Crypto", package: "swift-crypto")]),
        .testTarget(name: "QMPTests", dependencies: ["QMP", "URing"]),
        .testTarget(
            name: "MigrationTests",
            dependencies: [
                "Migration", "GuestMemory", "MigrationWire", "Trust", "URing", "TestSupport",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        .testTarget(name: "LivemigIntegrationTests", dependencies: ["MigrationWire", "Trust", "URing", "TestSupport"]),
        // Helpers every test target shares (a seeded generator).
        .target(name: "TestSupport", path: "Tests/TestSupport", swiftSettings: strict),
    ]
)
