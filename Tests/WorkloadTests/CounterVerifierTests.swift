import Foundation
import GuestMemory
import Testing
import Workload

@Suite("CounterVerifier")
struct CounterVerifierTests {
    static let pages = 256

    /// A bad page as (page, expected, found), comparable.
    struct Bad: Equatable, CustomStringConvertible {
        var page: Int
        var expected: UInt64
        var found: UInt64
        init(_ page: Int, _ expected: UInt64, _ found: UInt64) {
            self.page = page
            self.expected = expected
            self.found = found
        }
        var description: String { "(page \(page): expected \(expected), found \(found))" }
    }

    static func bad(_ report: CounterVerifier.Report) -> [Bad] {
        report.firstBad.map { Bad($0.page, $0.expected, $0.found) }
    }

    /// A 256-page RAM file and a 2-thread counter state; thread 0 owns pages
    /// 0..<128 at (pass 5, position 40), thread 1 pages 128..<256 at
    /// (pass 3, position 100). The RAM is written to match.
    static func withGuest(_ body: (RAMFile, StressState) throws -> Void) throws {
        try withTempDir { dir in
            let ram = try RAMFile.create(path: filePath(dir.appendingPathComponent("ram")), size: UInt64(pages) * 4096, pageSize: 4096)
            var state = StressState(pattern: .counter, threads: 2, pageCount: pages, seed: 1)
            state.slots[0].pass = 5
            state.slots[0].position = 40
            state.slots[1].pass = 3
            state.slots[1].position = 100
            writeCounters(ram, for: state)
            try body(ram, state)
        }
    }

    @Test func matchingCountersPass() throws {
        try Self.withGuest { ram, state in
            // Spot-check the layout the helper wrote.
            #expect(counter(ram, 0) == 6 && counter(ram, 39) == 6 && counter(ram, 40) == 5 && counter(ram, 127) == 5)
            #expect(counter(ram, 128) == 4 && counter(ram, 227) == 4 && counter(ram, 228) == 3 && counter(ram, 255) == 3)
            let report = CounterVerifier.verify(ram: ram, state: state)
            #expect(report.passed)
            #expect(report.badCount == 0)
            #expect(report.firstBad.isEmpty)
            #expect(report.pagesChecked == Self.pages)
            #expect(report.boundaries.count == 2)
            #expect(report.boundaries.map(\.thread) == [0, 1])
            #expect(report.boundaries.map(\.pass) == [5, 3])
            #expect(report.boundaries.map(\.position) == [40, 100])
        }
    }

    @Test func onlyTheFirstEightBytesAreTheCounter() throws {
        try Self.withGuest { ram, state in
            ram.pointer(at: 7 * 4096 + 8).storeBytes(of: UInt64.max, as: UInt64.self)
            ram.pointer(at: 200 * 4096 + 4088).storeBytes(of: UInt64.max, as: UInt64.self)
            #expect(CounterVerifier.verify(ram: ram, state: state).passed)
        }
    }

    @Test(arguments: [0, 39, 40, 127, 128, 227, 228, 255])
    func oneCorruptPageIsReported(page: Int) throws {
        try Self.withGuest { ram, state in
            let expected = counter(ram, page)
            setCounter(ram, page, 999)
            let report = CounterVerifier.verify(ram: ram, state: state)
            #expect(!report.passed)
            #expect(report.badCount == 1)
            #expect(report.pagesChecked == Self.pages)
            #expect(Self.bad(report) == [Bad(page, expected, 999)])
            #expect(
                report.firstBad.first?.description
                    == "page \(page) (offset 0x\(String(page * 4096, radix: 16))): counter 999, expected \(expected)")
        }
    }

    @Test func boundaryOneTooFarIsReported() throws {
        try Self.withGuest { ram, state in
            // The guest wrote page 40 too, but the state says it stopped before it.
            setCounter(ram, 40, 6)
            let report = CounterVerifier.verify(ram: ram, state: state)
            #expect(report.badCount == 1)
            #expect(Self.bad(report) == [Bad(40, 5, 6)])
        }
    }

    @Test func boundaryOneShortIsReported() throws {
        try Self.withGuest { ram, state in
            // Thread 1's page 99 of its slice (page 227) still holds the old pass.
            setCounter(ram, 227, 3)
            let report = CounterVerifier.verify(ram: ram, state: state)
            #expect(report.badCount == 1)
            #expect(Self.bad(report) == [Bad(227, 4, 3)])
        }
    }

    @Test func stateOffByOneReportsThePage() throws {
        try Self.withGuest { ram, state in
            var ahead = state
            ahead.slots[0].position = 41
            #expect(Self.bad(CounterVerifier.verify(ram: ram, state: ahead)) == [Bad(40, 6, 5)])
            var behind = state
            behind.slots[1].position = 99
            #expect(Self.bad(CounterVerifier.verify(ram: ram, state: behind)) == [Bad(227, 3, 4)])
        }
    }

    @Test func positionZero() throws {
        try Self.withGuest { ram, state in
            var s = state
            s.slots[0].pass = 7
            s.slots[0].position = 0
            writeCounters(ram, for: s)
            #expect((0..<128).allSatisfy { counter(ram, $0) == 7 })
            #expect(CounterVerifier.verify(ram: ram, state: s).passed)
            // The first page of the slice already at the next pass is a bad page.
            setCounter(ram, 0, 8)
            let report = CounterVerifier.verify(ram: ram, state: s)
            #expect(Self.bad(report) == [Bad(0, 7, 8)])
            // So is the last page of the previous pass left behind.
            setCounter(ram, 0, 7)
            setCounter(ram, 127, 6)
            #expect(Self.bad(CounterVerifier.verify(ram: ram, state: s)) == [Bad(127, 7, 6)])
        }
    }

    @Test func freshRAMPassesAtPassZeroPositionZero() throws {
        try withTempDir { dir in
            let ram = try RAMFile.create(path: filePath(dir.appendingPathComponent("ram")), size: 256 * 4096, pageSize: 4096)
            let fresh = StressState(pattern: .counter, threads: 2, pageCount: 256, seed: 0)
            #expect(CounterVerifier.verify(ram: ram, state: fresh).passed)
            // But not a state that claims one page was written.
            var one = fresh
            one.slots[1].position = 1
            #expect(Self.bad(CounterVerifier.verify(ram: ram, state: one)) == [Bad(128, 1, 0)])
        }
    }

    @Test func reportsAreLimitedButCountEverything() throws {
        try Self.withGuest { ram, state in
            for page in stride(from: 0, to: 256, by: 10) { setCounter(ram, page, 12345) }
            let report = CounterVerifier.verify(ram: ram, state: state, limit: 5)
            #expect(report.badCount == 26)
            #expect(report.firstBad.map(\.page) == [0, 10, 20, 30, 40])
            #expect(CounterVerifier.verify(ram: ram, state: state).firstBad.count == 10)
        }
    }
}
