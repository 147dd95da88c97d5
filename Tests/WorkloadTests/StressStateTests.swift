import GuestMemory
import Testing
import Workload

@Suite("StressState")
struct StressStateTests {
    // MARK: - pattern parsing

    @Test(arguments: [
        ("random", StressPattern.random),
        ("sequential", .sequential),
        ("counter", .counter),
        ("hotset:0.25", .hotset(0.25)),
        ("hotset:1", .hotset(1)),
        ("hotset:1.0", .hotset(1)),
        ("hotset:0.001", .hotset(0.001)),
    ])
    func parsesValidPatterns(text: String, pattern: StressPattern) {
        #expect(StressPattern(parsing: text) == pattern)
    }

    @Test(arguments: [
        "", "Random", "COUNTER", " counter", "counter ", "seq", "hotset", "hotset:", "hotset:0", "hotset:0.0",
        "hotset:-0.5", "hotset:1.5", "hotset:1.0000001", "hotset:abc", "hotset:nan", "hotset:inf", "hotset:0.5x",
        "hotset 0.5", "hotset=0.5", "random:0.5",
    ])
    func rejectsInvalidPatterns(text: String) {
        #expect(StressPattern(parsing: text) == nil, "parsed '\(text)' as \(String(describing: StressPattern(parsing: text)))")
    }

    @Test(arguments: [StressPattern.random, .sequential, .counter, .hotset(0.1), .hotset(0.75), .hotset(1)])
    func descriptionParsesBack(pattern: StressPattern) {
        #expect(StressPattern(parsing: pattern.description) == pattern)
    }

    // MARK: - fresh state

    @Test func freshStateStartsAtZeroWithDistinctOddSeeds() {
        let s = StressState(pattern: .random, threads: 8, pageCount: 1000, seed: 0x5EED)
        #expect(s.slots.count == 8)
        #expect(s.byteCount == 40 + 8 * 32)
        for slot in s.slots {
            #expect(slot.pass == 0 && slot.position == 0 && slot.pagesWritten == 0)
            // xorshift needs a non-zero state.
            #expect(slot.rng & 1 == 1)
        }
        #expect(Set(s.slots.map(\.rng)).count == 8)
        // Another seed, other generators.
        let t = StressState(pattern: .random, threads: 8, pageCount: 1000, seed: 0x5EEE)
        #expect(t.slots.map(\.rng) != s.slots.map(\.rng))
    }

    // MARK: - encode / decode

    static func sample(_ pattern: StressPattern, threads: Int, pageCount: Int) -> StressState {
        var s = StressState(pattern: pattern, threads: threads, pageCount: pageCount, seed: 77)
        for t in 0..<threads {
            let x = UInt64(t)
            s.slots[t].pass = 1000 + x
            // Within the slice: a stored position past it is corrupt.
            let slice = UInt64(StressState.slice(t, threads: threads, pageCount: pageCount).count)
            s.slots[t].position = (3 * x + 1) % slice
            s.slots[t].rng = 0xDEAD_BEEF_0000_0000 | x
            // All 62 bits a count may use (decode refuses 2^62 and more).
            s.slots[t].pagesWritten = StressState.maxCount - 1 - x
        }
        return s
    }

    static func decoded(_ bytes: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) -> StressState? {
        switch StressState.decode(bytes) {
        case .success(let s): return s
        case .failure(let e):
            Issue.record("decode failed: \(e)", sourceLocation: sourceLocation)
            return nil
        }
    }

    static func decodeError(_ bytes: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) -> GuestMemoryError? {
        switch StressState.decode(bytes) {
        case .success(let s):
            Issue.record("decoded \(s.pattern) × \(s.threads) from bad bytes", sourceLocation: sourceLocation)
            return nil
        case .failure(let e): return e
        }
    }

    @Test(arguments: [StressPattern.random, .sequential, .counter, .hotset(0.3), .hotset(1)], [1, 2, 3, 16, 256])
    func roundTrip(pattern: StressPattern, threads: Int) throws {
        let original = Self.sample(pattern, threads: threads, pageCount: 4096 + threads)
        let bytes = original.encoded()
        #expect(bytes.count == original.byteCount)
        #expect(bytes.count == 40 + 32 * threads)
        let back = try #require(Self.decoded(bytes))
        #expect(back.pattern == pattern)
        #expect(back.threads == threads)
        #expect(back.pageCount == 4096 + threads)
        #expect(back.slots == original.slots)
        // Bytes past the state (the rest of the state area) are ignored.
        let padded = try #require(Self.decoded(bytes + [UInt8](repeating: 0xFF, count: 100)))
        #expect(padded.slots == original.slots)
    }

    @Test func encodingIsLittleEndianWithTheDocumentedLayout() {
        var s = StressState(pattern: .hotset(0.5), threads: 2, pageCount: 0x0102_0304, seed: 0)
        s.slots[1].pass = 0x11
        s.slots[1].position = 0x22
        s.slots[1].rng = 0x33
        s.slots[1].pagesWritten = 0x44
        let b = s.encoded()
        #expect(Array(b[0..<8]) == Array("LMSTRES1".utf8))
        #expect(Array(b[8..<12]) == [1, 0, 0, 0])
        #expect(Array(b[12..<16]) == [2, 0, 0, 0])  // hotset
        #expect(Array(b[16..<20]) == [2, 0, 0, 0])  // threads
        #expect(Array(b[24..<32]) == withUnsafeBytes(of: (0.5).bitPattern.littleEndian) { Array($0) })
        #expect(Array(b[32..<40]) == [4, 3, 2, 1, 0, 0, 0, 0])
        let slot1 = 40 + 32
        #expect(b[slot1] == 0x11 && b[slot1 + 8] == 0x22 && b[slot1 + 16] == 0x33 && b[slot1 + 24] == 0x44)
    }

    @Test func patternCodes() {
        let codes = [StressPattern.random, .sequential, .hotset(0.5), .counter].map {
            StressState(pattern: $0, threads: 1, pageCount: 1, seed: 0).encoded()[12]
        }
        #expect(codes == [0, 1, 2, 3])
    }

    // MARK: - decode failures

    @Test func wrongMagicIsNotAStressState() throws {
        let good = Self.sample(.counter, threads: 2, pageCount: 100).encoded()
        var bad = good
        bad[0] ^= 0x01
        let e = try #require(Self.decodeError(bad))
        #expect(e.description.contains("no stress-guest state"), "\(e)")
        #expect(e.description.contains("\(good.count) bytes"), "\(e)")
        #expect(e.description.contains("livemig stress"), "\(e)")
    }

    @Test func emptyAndWrongVersionAreNotAStressState() throws {
        let empty = try #require(Self.decodeError([]))
        #expect(empty.description.contains("no stress-guest state (0 bytes)"), "\(empty)")
        let v2 = settingLE32(Self.sample(.random, threads: 1, pageCount: 10).encoded(), 2, at: 8)
        let e = try #require(Self.decodeError(v2))
        #expect(e.description.contains("no stress-guest state"), "\(e)")
    }

    @Test(arguments: [1, 8, 12, 39, 40, 41, 71, 72 + 31])
    func truncatedIsRejected(keep: Int) throws {
        // Two threads: 40 + 64 = 104 bytes in all.
        let good = Self.sample(.sequential, threads: 2, pageCount: 100).encoded()
        #expect(good.count == 104)
        let e = try #require(Self.decodeError(Array(good.prefix(keep))))
        if keep >= 12 {
            #expect(e.description.contains("truncated or corrupt"), "\(e)")
        } else {
            #expect(e.description.contains("no stress-guest state"), "\(e)")
        }
    }

    @Test(arguments: [UInt32(4), 7, 0xFFFF_FFFF])
    func unknownPatternCode(code: UInt32) throws {
        let bad = settingLE32(Self.sample(.counter, threads: 1, pageCount: 10).encoded(), code, at: 12)
        let e = try #require(Self.decodeError(bad))
        #expect(e.description.contains("unknown stress pattern code \(code)"), "\(e)")
    }

    @Test func zeroThreadsIsCorrupt() throws {
        let bad = settingLE32(Self.sample(.counter, threads: 1, pageCount: 10).encoded(), 0, at: 16)
        let e = try #require(Self.decodeError(bad))
        #expect(e.description.contains("truncated or corrupt"), "\(e)")
    }

    @Test func tooManyThreadsOrTooFewPagesIsCorrupt() throws {
        let many = settingLE32(
            Self.sample(.counter, threads: 1, pageCount: 10_000).encoded() + [UInt8](repeating: 0, count: 32 * 300), 257, at: 16)
        #expect(Self.decodeError(many)?.description.contains("truncated or corrupt") == true)
        // Fewer pages than threads would leave a thread an empty slice.
        let few = settingLE64(Self.sample(.counter, threads: 4, pageCount: 100).encoded(), 3, at: 32)
        #expect(Self.decodeError(few)?.description.contains("truncated or corrupt") == true)
        // Exactly one page per thread is fine.
        let one = Self.sample(.counter, threads: 4, pageCount: 4).encoded()
        #expect(Self.decoded(one)?.pageCount == 4)
    }

    @Test func positionOutsideTheSliceIsCorrupt() throws {
        // A resumed counter guest would write past its slice (past the RAM
        // for the last thread).
        let base = Self.sample(.counter, threads: 2, pageCount: 100).encoded()
        let bad = settingLE64(base, 50, at: StressState.headerSize + StressState.slotSize + 8)
        let e = try #require(Self.decodeError(bad))
        #expect(e.description.contains("outside its 50-page slice"), "\(e)")
    }

    @Test func moreThreadsThanSlotsIsTruncated() throws {
        let bad = settingLE32(Self.sample(.random, threads: 2, pageCount: 100).encoded(), 3, at: 16)
        let e = try #require(Self.decodeError(bad))
        #expect(e.description.contains("truncated or corrupt"), "\(e)")
    }

    @Test("a stored hot fraction outside (0, 1] is corrupt")
    func hotFractionIsValidated() {
        // The guest computes its hot set as slice × F: F > 1 writes past its
        // slice (past the RAM for the last thread), NaN or a negative F traps.
        for f in [2.0, 0, -0.5, .nan, .infinity] {
            let bytes = settingLE64(Self.sample(.hotset(0.5), threads: 2, pageCount: 100).encoded(), f.bitPattern, at: 24)
            #expect((try? StressState.decode(bytes).get()) == nil, "hot fraction \(f) accepted")
        }
    }

    // MARK: - slices

    @Test func slicesPartitionThePagesExactly() {
        var combos: [(threads: Int, pages: Int)] = []
        for threads in [1, 2, 3, 4, 5, 7, 8, 16, 31, 64, 255, 256] {
            for pages in [threads, threads + 1, 2 * threads - 1, 100, 1000, 1023, 1024, 1025, 65_537] where pages >= threads {
                combos.append((threads, pages))
            }
        }
        for (threads, pages) in combos {
            var next = 0
            var sizes: [Int] = []
            for t in 0..<threads {
                let s = StressState.slice(t, threads: threads, pageCount: pages)
                // Contiguous, starting where the previous one ended: no gap, no overlap.
                #expect(s.lowerBound == next, "threads \(threads), pages \(pages), slice \(t) = \(s)")
                #expect(!s.isEmpty, "threads \(threads), pages \(pages), slice \(t) empty")
                next = s.upperBound
                sizes.append(s.count)
            }
            #expect(next == pages, "threads \(threads), pages \(pages): slices end at \(next)")
            // Balanced: sizes differ by at most one page.
            #expect(sizes.max()! - sizes.min()! <= 1, "threads \(threads), pages \(pages): sizes \(Set(sizes))")
            #expect(sizes.reduce(0, +) == pages)
        }
    }

    @Test func sliceExamples() {
        #expect(StressState.slice(0, threads: 2, pageCount: 256) == 0..<128)
        #expect(StressState.slice(1, threads: 2, pageCount: 256) == 128..<256)
        #expect(StressState.slice(0, threads: 3, pageCount: 10) == 0..<3)
        #expect(StressState.slice(1, threads: 3, pageCount: 10) == 3..<6)
        #expect(StressState.slice(2, threads: 3, pageCount: 10) == 6..<10)
        #expect(StressState.slice(0, threads: 1, pageCount: 7) == 0..<7)
    }
    @Test("absurd pass and pages-written counts are refused, not left to overflow", arguments: [0, 24])
    func absurdCountsRefused(field: Int) {
        let s = StressState(pattern: .counter, threads: 2, pageCount: 64, seed: 1)
        for value in [StressState.maxCount, UInt64.max] {
            let bytes = settingLE64(s.encoded(), value, at: StressState.headerSize + StressState.slotSize + field)
            guard case .failure(let e) = StressState.decode(bytes) else {
                Issue.record("a stored count of \(value) was accepted")
                continue
            }
            #expect(e.description.contains("2^62"), "\(e)")
        }
        let fine = settingLE64(s.encoded(), StressState.maxCount - 1, at: StressState.headerSize + field)
        #expect((try? StressState.decode(fine).get()) != nil)
    }

    @Test("a zero random state is refused for random and hotset guests")
    func zeroRandomStateRefused() {
        for pattern in [StressPattern.random, .hotset(0.5)] {
            let s = StressState(pattern: pattern, threads: 1, pageCount: 64, seed: 1)
            let bytes = settingLE64(s.encoded(), 0, at: StressState.headerSize + 16)
            guard case .failure = StressState.decode(bytes) else {
                Issue.record("\(pattern): a zero rng was accepted")
                continue
            }
        }
    }
}
