// swift-tools-version:6.1
// Micro-benchmarks for livemig's hot paths (ordo-one/benchmark).
// Run from this folder: `swift package benchmark` (see README.md).
//
// A nested package so the parent's dependency graph and CI stay free of the
// benchmark harness. It needs the parent to export its targets as a library
// product (a path dependency sees only products, never targets):
//     .library(name: "LivemigCore", targets: ["CShims", "GuestMemory", "MigrationWire", "URing", "Migration"]),
import PackageDescription

let package = Package(
    name: "LivemigBenchmarks",
    platforms: [.macOS(.v15)],
    dependencies: [
        .package(name: "livemig", path: ".."),
        // Only the MallocInterposer trait: it supplies mallocCountTotal on Linux. The default
        // RuntimeInterposer trait (ARC counters) would add ordo-one/swift-runtime-interposer on
        // Linux with Swift 6.3; no benchmark here uses ARC metrics.
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]),
        // Read directly by the zero-allocation guard in the hot-path benchmarks.
        .package(url: "https://github.com/ordo-one/malloc-interposer", from: "1.6.1"),
    ],
    targets: [
        .executableTarget(
            name: "LivemigBenchmarks",
            dependencies: [
                .product(name: "Benchmark", package: "benchmark"),
                .product(name: "MallocInterposerSwift", package: "malloc-interposer"),
                .product(name: "LivemigCore", package: "livemig"),
            ],
            path: "Benchmarks/LivemigBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        )
    ]
)
