// Micro-benchmarks for livemig's per-page hot paths. See ../../README.md for
// how to run them, what each measures and how to read the numbers.
//
// Conventions used throughout:
// - Everything a benchmark needs (bitmaps, buffers, packets, threads) is made
//   outside the measured window: either before the closure, in `setup`, or
//   before `benchmark.startMeasurement()`. Only the loop under test sits
//   between `startMeasurement()` and `stopMeasurement()`.
// - Benchmarks 1-3b are hot paths that must not allocate. Two checks hold
//   them to that: (a) `zeroMalloc` thresholds plus the files in Thresholds/
//   for `swift package benchmark thresholds check` (p90 only); (b)
//   `AllocationGuard`, which reads the malloc interposer's counter around the
//   measured loop of every iteration and fails the run (`swift package
//   benchmark` exits non-zero) on any allocation at all.

import Benchmark
import CShims
import GuestMemory
import MallocInterposerSwift
import Migration
import MigrationWire
import Trust

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// MARK: - Shared pieces

/// Guest page size and the RAM size the bitmap benchmarks cover.
let pageSize = 4096
/// 1 GiB of 4 KiB pages. One bitmap benchmark iteration covers exactly 1 GiB
/// of guest RAM, so its throughput (iterations/s) *is* GiB of RAM per second.
let pagesPerGiB = (1 << 30) / pageSize  // 262_144

var hotPathMetrics: [BenchmarkMetric] { [.wallClock, .throughput, .mallocCountTotal] }

/// Zero tolerance for allocations at every percentile.
var zeroMalloc: [BenchmarkMetric: BenchmarkThresholds] {
    [.mallocCountTotal: .init(relative: BenchmarkThresholds.Relative.strict, absolute: BenchmarkThresholds.Absolute.strict)]
}

/// Counts allocations (malloc, calloc, realloc, posix_memalign, ...) made by
/// any thread while the benchmark harness has the interposer hooked, i.e.
/// during the iterations of a benchmark whose metrics include a malloc metric.
@inline(__always) func mallocCount() -> Int {
    MallocInterposerSwift.getStatistics().mallocCount
}

/// The zero-allocation assertion for one hot-path benchmark.
///
/// In the closure: `begin()` right after `startMeasurement()`, `end()` right
/// before `stopMeasurement()`, `check(benchmark)` after it. Pass `enforce` as
/// the benchmark's `teardown`.
///
/// Why the split: while iterations run, the harness sends the benchmark
/// process's stdout and stderr to /dev/null, and `benchmark.error(...)` alone
/// is only printed: `swift package benchmark` still exits 0 (1.38.1). So
/// `check` records the first violation and stops the iterations with
/// `benchmark.error`, and `enforce` (teardown, output restored) prints it and
/// exits the benchmark process with status 1, which the harness turns into a
/// failed run and a non-zero exit in every mode.
final class AllocationGuard {
    let what: String
    private var start = 0
    private var delta = 0
    private var violation: String?

    init(_ what: String) { self.what = what }

    @inline(__always) func begin() { start = mallocCount() }
    @inline(__always) func end() { delta = mallocCount() - start }

    func check(_ benchmark: Benchmark) {
        guard delta != 0, violation == nil else { return }
        let message =
            "\(benchmark.name): \(what) made \(delta) allocation(s) inside the measured loop "
            + "(iteration \(benchmark.currentIteration)); this hot path must not allocate. Find where with: "
            + "swift package benchmark --filter '\(benchmark.name)' --allocation-stacks"
        violation = message
        benchmark.error(message)
    }

    func enforce() {
        guard let violation else { return }
        let line = "error: \(violation)\n"
        _ = line.withCString { write(STDERR_FILENO, $0, strlen($0)) }
        exit(1)
    }
}

/// xorshift64: deterministic pseudo-random numbers without Foundation.
struct XorShift {
    var state: UInt64
    init(seed: UInt64) { state = seed | 1 }
    mutating func next() -> UInt64 {
        state ^= state << 13
        state ^= state >> 7
        state ^= state << 17
        return state
    }
}

/// A page-aligned buffer whose contents are written in `setup` (so creating
/// the benchmark, which every benchmark process does, costs nothing).
final class PageBuffer {
    let pages: Int
    let base: UnsafeMutableRawPointer
    private(set) var filled = false

    init(bytes: Int) {
        pages = bytes / pageSize
        base = .allocate(byteCount: bytes, alignment: pageSize)
    }

    deinit { base.deallocate() }

    /// Writes every byte (real, distinct physical pages: an untouched
    /// anonymous mapping would read the kernel's one shared zero page and
    /// stay in L1, which real guest RAM does not).
    func fillZero() {
        guard !filled else { return }
        base.initializeMemory(as: UInt8.self, repeating: 0, count: pages * pageSize)
        filled = true
    }

    func fillRandom(seed: UInt64) {
        guard !filled else { return }
        var rng = XorShift(seed: seed)
        let words = base.bindMemory(to: UInt64.self, capacity: pages * pageSize / 8)
        for i in 0..<(pages * pageSize / 8) { words[i] = rng.next() }
        filled = true
    }
}

/// A sender transport that does nothing but count, so the hand-off itself is
/// what gets measured. Used by one sender thread; read after `finish()`.
final class NoOpTransport: ChannelTransport, @unchecked Sendable {
    var pagesSeen = 0
    var syncs = 0
    func sendJob(_ job: MultiFDJob, release: () -> Void) throws(MigrationError) {
        for b in 0..<job.count { pagesSeen &+= job.batches[b].count }
        release()
    }
    func sendSync() throws(MigrationError) { syncs &+= 1 }
}

// MARK: - Benchmarks

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: hotPathMetrics,
        warmupIterations: 3,
        maxDuration: .seconds(1),
        maxIterations: 200
    )

    // ---- 1. Dirty bitmap: scan and harvest, 1 GiB of 4 KiB pages --------
    // One iteration = one harvestAll over the whole 262,144-page bitmap.
    // throughput (#/s) = GiB of guest RAM covered per second;
    // pages/s = throughput x 262,144.

    let cleanBitmap = DirtyBitmap(pageCount: pagesPerGiB)
    let cleanGuard = AllocationGuard("bitmap scan (all clean)")
    Benchmark(
        "Bitmap scan 1GiB all-clean",
        configuration: .init(metrics: hotPathMetrics, maxIterations: 2_000, thresholds: zeroMalloc),
        closure: { benchmark in
            var taken = 0
            benchmark.startMeasurement()
            cleanGuard.begin()
            cleanBitmap.harvestAll { page in taken &+= page }
            cleanGuard.end()
            benchmark.stopMeasurement()
            cleanGuard.check(benchmark)
            if taken != 0 { benchmark.error("a clean bitmap yielded pages") }
        },
        teardown: { cleanGuard.enforce() }
    )

    let sparseBitmap = DirtyBitmap(pageCount: pagesPerGiB)
    // 1% of the pages, spread at random (fixed seed): 2,621 marks.
    let sparsePages: [Int] = {
        var rng = XorShift(seed: 0x5EED_0001)
        return (0..<(pagesPerGiB / 100)).map { _ in Int(rng.next() % UInt64(pagesPerGiB)) }
    }()
    let sparseGuard = AllocationGuard("bitmap harvest (1% dirty)")
    Benchmark(
        "Bitmap harvest 1GiB 1pct-dirty",
        configuration: .init(metrics: hotPathMetrics, maxIterations: 2_000, thresholds: zeroMalloc),
        closure: { benchmark in
            // Unmeasured: the guest's writes.
            for page in sparsePages { sparseBitmap.mark(page: page) }
            let expected = sparseBitmap.dirtyCount()
            var count = 0
            var sum = 0
            benchmark.startMeasurement()
            sparseGuard.begin()
            sparseBitmap.harvestAll { page in
                count &+= 1
                sum &+= page
            }
            sparseGuard.end()
            benchmark.stopMeasurement()
            sparseGuard.check(benchmark)
            blackHole(sum)
            if count != expected { benchmark.error("harvested \(count) pages, expected \(expected)") }
        },
        teardown: { sparseGuard.enforce() }
    )

    let fullBitmap = DirtyBitmap(pageCount: pagesPerGiB)
    let fullGuard = AllocationGuard("bitmap harvest (all dirty)")
    Benchmark(
        "Bitmap harvest 1GiB all-dirty",
        configuration: .init(metrics: hotPathMetrics, maxIterations: 500, thresholds: zeroMalloc),
        closure: { benchmark in
            fullBitmap.markAll()  // unmeasured: the first round's "send everything"
            var count = 0
            var sum = 0
            benchmark.startMeasurement()
            fullGuard.begin()
            fullBitmap.harvestAll { page in
                count &+= 1
                sum &+= page
            }
            fullGuard.end()
            benchmark.stopMeasurement()
            fullGuard.check(benchmark)
            blackHole(sum)
            if count != pagesPerGiB { benchmark.error("harvested \(count) pages, expected \(pagesPerGiB)") }
        },
        teardown: { fullGuard.enforce() }
    )

    // ---- 2. Zero-page detection: lm_buffer_is_zero, page by page ---------
    // One iteration = 16,384 calls, one per 4 KiB page of a 64 MiB buffer.
    // zero pages: bytes/s = throughput x 64 MiB (every byte is read);
    // random pages: pages/s = throughput x 16,384 (each call stops after
    // the first 64-byte block).

    let zeroBuffer = PageBuffer(bytes: 64 << 20)
    let zeroGuard = AllocationGuard("zero check (zero pages)")
    Benchmark(
        "Zero check 64MiB zero-pages",
        configuration: .init(metrics: hotPathMetrics, maxIterations: 100, thresholds: zeroMalloc),
        closure: { benchmark in
            let base = zeroBuffer.base
            let pages = zeroBuffer.pages
            var zeros = 0
            benchmark.startMeasurement()
            zeroGuard.begin()
            for i in 0..<pages where lm_buffer_is_zero(base + i * pageSize, pageSize) {
                zeros &+= 1
            }
            zeroGuard.end()
            benchmark.stopMeasurement()
            zeroGuard.check(benchmark)
            if zeros != pages { benchmark.error("\(pages - zeros) zero pages not detected") }
        },
        setup: { zeroBuffer.fillZero() },
        teardown: { zeroGuard.enforce() }
    )

    let randomBuffer = PageBuffer(bytes: 64 << 20)
    let randomGuard = AllocationGuard("zero check (random pages)")
    Benchmark(
        "Zero check 64MiB random-pages",
        configuration: .init(metrics: hotPathMetrics, maxIterations: 200, thresholds: zeroMalloc),
        closure: { benchmark in
            let base = randomBuffer.base
            let pages = randomBuffer.pages
            var zeros = 0
            benchmark.startMeasurement()
            randomGuard.begin()
            for i in 0..<pages where lm_buffer_is_zero(base + i * pageSize, pageSize) {
                zeros &+= 1
            }
            randomGuard.end()
            benchmark.stopMeasurement()
            randomGuard.check(benchmark)
            if zeros != 0 { benchmark.error("\(zeros) random pages reported zero") }
        },
        setup: { randomBuffer.fillRandom(seed: 0x5EED_0002) },
        teardown: { randomGuard.enforce() }
    )

    // ---- 3. multifd packet prefix: encode, and decode + validate ---------
    // One iteration = 1,000 packets (scalingFactor .kilo), so wallClock and
    // mallocCountTotal are reported per packet and throughput in packets/s.
    // A packet here is the 48-byte header plus 128 page entries (offset and
    // hash, 2,096 bytes): a full batch. The allocation guard counts the whole 1,000.

    let maxPages = MultiFDPacketHeader.maxPages
    let prefixSize = MultiFDPacketHeader.maxPrefixSize
    let encodeBuffer = UnsafeMutableRawPointer.allocate(byteCount: prefixSize, alignment: 8)
    let encodeGuard = AllocationGuard("packet encode")
    Benchmark(
        "Packet encode header+128 entries",
        configuration: .init(
            metrics: hotPathMetrics, scalingFactor: .kilo, maxIterations: 2_000, thresholds: zeroMalloc),
        closure: { benchmark in
            benchmark.startMeasurement()
            encodeGuard.begin()
            for n in benchmark.scaledIterations {
                let header = MultiFDPacketHeader(
                    flags: [], normalCount: UInt32(maxPages), zeroCount: 0,
                    payloadSize: UInt32(maxPages * pageSize), packetNumber: UInt64(n), blockID: 0)
                header.encode(to: encodeBuffer)
                let first = UInt64(n % 2_048) * UInt64(maxPages * pageSize)
                for j in 0..<maxPages {
                    MultiFDPacketHeader.encodeEntry(offset: first + UInt64(j * pageSize), hash: UInt64(j), index: j, to: encodeBuffer)
                }
                blackHole(encodeBuffer)  // the bytes escape: no store can be dropped
            }
            encodeGuard.end()
            benchmark.stopMeasurement()
            encodeGuard.check(benchmark)
        },
        teardown: { encodeGuard.enforce() }
    )

    // 1,000 distinct valid packets, packet numbers 0..999, as a receiver
    // would find them in its socket buffer one after another.
    let limits = PacketLimits(
        channelID: 0, pageSize: UInt64(pageSize),
        blocks: [RAMBlockLayout(name: "pc.ram", size: 1 << 30, pageSize: UInt64(pageSize))])
    let packetCount = BenchmarkScalingFactor.kilo.rawValue
    let packets = UnsafeMutableRawPointer.allocate(byteCount: packetCount * prefixSize, alignment: 8)
    let decodedOffsets = UnsafeMutablePointer<UInt64>.allocate(capacity: maxPages)
    let decodedHashes = UnsafeMutablePointer<UInt64>.allocate(capacity: maxPages)
    let decodeGuard = AllocationGuard("packet decode + validate")
    Benchmark(
        "Packet decode+validate header+128 entries",
        configuration: .init(
            metrics: hotPathMetrics, scalingFactor: .kilo, maxIterations: 2_000, thresholds: zeroMalloc),
        closure: { benchmark in
            var checksum: UInt64 = 0
            benchmark.startMeasurement()
            decodeGuard.begin()
            for n in benchmark.scaledIterations {
                let p = packets + n * prefixSize
                let header = try MultiFDPacketHeader.decode(p, limits: limits, expectedPacketNumber: UInt64(n))
                try header.decodeEntries(p + MultiFDPacketHeader.size, offsets: decodedOffsets, hashes: decodedHashes, limits: limits)
                checksum &+= decodedOffsets[maxPages - 1]
            }
            decodeGuard.end()
            benchmark.stopMeasurement()
            decodeGuard.check(benchmark)
            blackHole(checksum)
        },
        setup: {
            for n in 0..<packetCount {
                let p = packets + n * prefixSize
                MultiFDPacketHeader(
                    flags: [], normalCount: UInt32(maxPages), zeroCount: 0,
                    payloadSize: UInt32(maxPages * pageSize), packetNumber: UInt64(n), blockID: 0
                ).encode(to: p)
                let first = UInt64(n) * UInt64(maxPages * pageSize)
                for j in 0..<maxPages {
                    MultiFDPacketHeader.encodeEntry(offset: first + UInt64(j * pageSize), hash: UInt64(j), index: j, to: p)
                }
            }
        },
        teardown: { decodeGuard.enforce() }
    )

    // ---- 3b. Receiver placement: 64 MiB of 4 KiB pages into a mapping ------
    // One iteration = 128 packets of 128 pages (64 MiB), each placed from
    // one 512 KiB packet buffer (hot, as after recv) into a pre-faulted
    // 64 MiB shared mapping (cold), every page's XXH3-64 checked against
    // the buffer's. Two ways, the receiver's before and after it folded the
    // hash into the copy (PacketReceiver.placeChecked):
    //   hash, then copy  ContentHash.page per page, then lm_place_pages;
    //   fused            ContentHash.placeHashed (lm_place_pages_hashed).
    // GB/s = 64 MiB x throughput. Hashes are compared outside the window.

    let placePackets = 128, placeBytes = placePackets * maxPages * pageSize
    let placeBuffer = UnsafeMutableRawPointer.allocate(byteCount: maxPages * pageSize, alignment: 4096)
    let placeTarget = mmap(nil, placeBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)!
    let placeOffsets = UnsafeMutablePointer<UInt64>.allocate(capacity: maxPages)
    let placeHashes = UnsafeMutablePointer<UInt64>.allocate(capacity: maxPages)
    let wantHashes = UnsafeMutablePointer<UInt64>.allocate(capacity: maxPages)
    var placeRNG = XorShift(seed: 0x5EED_0003)
    for w in 0..<(maxPages * pageSize / 8) { placeBuffer.storeBytes(of: placeRNG.next(), toByteOffset: w * 8, as: UInt64.self) }
    for i in 0..<maxPages { wantHashes[i] = ContentHash.page(placeBuffer + i * pageSize, length: pageSize) }
    for (name, fused) in [("Place 64MiB hash-then-copy", false), ("Place 64MiB fused", true)] {
        let placeGuard = AllocationGuard(name)
        Benchmark(
            name,
            configuration: .init(metrics: hotPathMetrics, maxIterations: 300, thresholds: zeroMalloc),
            closure: { benchmark in
                benchmark.startMeasurement()
                placeGuard.begin()
                for packet in 0..<placePackets {
                    for i in 0..<maxPages { placeOffsets[i] = UInt64((packet * maxPages + i) * pageSize) }
                    if fused {
                        ContentHash.placeHashed(
                            placeBuffer, count: maxPages, pageSize: pageSize, into: placeTarget, offsets: placeOffsets,
                            hashes: placeHashes)
                    } else {
                        for i in 0..<maxPages { placeHashes[i] = ContentHash.page(placeBuffer + i * pageSize, length: pageSize) }
                        lm_place_pages(placeTarget, placeOffsets, placeBuffer, maxPages, pageSize)
                    }
                }
                placeGuard.end()
                benchmark.stopMeasurement()
                placeGuard.check(benchmark)
                for i in 0..<maxPages where placeHashes[i] != wantHashes[i] {
                    benchmark.error("\(name): page \(i) hashed to \(placeHashes[i]), not \(wantHashes[i])")
                    break
                }
                if memcmp(placeTarget + placeBytes - maxPages * pageSize, placeBuffer, maxPages * pageSize) != 0 {
                    benchmark.error("\(name): the last packet was not copied")
                }
            },
            teardown: { placeGuard.enforce() }
        )
    }

    // ---- 4. Hand-off round trip: MultiFDSend, 2 channels, no-op transport
    // One iteration = 10,000 full batches (128 pages each, appended by the
    // migration thread as the real loop does) handed to 2 sender threads,
    // then sync(). Thread start-up and finish() are outside the window.
    // Per batch: wallClock / 10,000. Batches/s = throughput x 10,000.
    // Not under the zero-allocation assertion (other threads run here);
    // mallocCountTotal is reported for information.

    let batches = 10_000
    Benchmark(
        "Hand-off 2ch 10k batches+sync",
        configuration: .init(metrics: hotPathMetrics, warmupIterations: 1, maxIterations: 30),
        closure: { benchmark in
            let transports = [NoOpTransport(), NoOpTransport()]
            let pool = MultiFDSend(transports: transports, latch: FailureLatch())
            var pages = MultiFDPages()
            var offset: UInt64 = 0
            var failure: MigrationError?
            // Unmeasured: one empty round, so both sender threads are past
            // their start-up (WorkerThread.run names its thread, which
            // allocates) before the window opens.
            do throws(MigrationError) { try pool.sync() } catch { failure = error }
            benchmark.startMeasurement()
            do throws(MigrationError) {
                for _ in 0..<batches {
                    for _ in 0..<MultiFDPages.capacity {
                        pages.append(offset: offset, block: 0)
                        offset &+= UInt64(pageSize)
                    }
                    try pool.send(&pages)
                }
                try pool.sync()
            } catch {
                failure = error
            }
            benchmark.stopMeasurement()
            pool.finish()
            if let failure { benchmark.error("hand-off failed: \(failure)") }
            let seen = transports.reduce(0) { $0 + $1.pagesSeen }
            if seen != batches * MultiFDPages.capacity || transports.contains(where: { $0.syncs != 2 }) {
                benchmark.error("senders saw \(seen) pages, syncs \(transports.map(\.syncs))")
            }
        }
    )
}
