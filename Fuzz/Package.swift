// swift-tools-version:6.0
// libFuzzer harnesses that need the real engine (the receiver target): a
// nested package, like Benchmarks/, so the parent's build and CI stay free of
// it. Built only by tools/fuzz.sh, with the sanitizer flags on the command
// line, into the parent's .build-fuzz (see README.md, "Fuzzing").
import PackageDescription

let package = Package(
    name: "LivemigFuzz",
    platforms: [.macOS(.v15)],
    dependencies: [.package(name: "livemig", path: "..")],
    targets: [
        // Bytes of a recorded migration, mutated, through a socketpair into a
        // real PacketReceiver and ControlChannel.
        .executableTarget(
            name: "FuzzReceiver",
            dependencies: [.product(name: "LivemigCore", package: "livemig")]
        )
    ]
)
