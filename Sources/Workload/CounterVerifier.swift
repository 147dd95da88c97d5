import GuestMemory

/// Checks a `counter` guest's RAM against its saved state, like QEMU's
/// migration-test checks guest memory page by page.
///
/// Thread `t` at (pass P, position Q) over its slice of n pages means:
/// pages `[0, Q)` of the slice hold P+1 and pages `[Q, n)` hold P. So along
/// a slice every counter equals its neighbour's except at exactly one
/// boundary, and that boundary is where the saved state says the guest stopped.
public struct CounterVerifier {
    /// One page whose counter is not what the state implies.
    public struct BadPage: Sendable, Equatable, CustomStringConvertible {
        public var page: Int
        public var expected: UInt64
        public var found: UInt64
        public var pageSize: UInt64 = 4096
        public var description: String {
            "page \(page) (offset 0x\(String(UInt64(page) * pageSize, radix: 16))): counter \(found), expected \(expected)"
        }
    }

    /// The verdict: bad pages (the first `limit`), and how many in all.
    public struct Report: Sendable {
        public var pagesChecked: Int
        public var badCount: Int
        public var firstBad: [BadPage]
        public var boundaries: [(thread: Int, pass: UInt64, position: UInt64)]
        public var passed: Bool { badCount == 0 }
    }

    public static func verify(ram: RAMFile, state: StressState, limit: Int = 10) -> Report {
        var report = Report(pagesChecked: 0, badCount: 0, firstBad: [], boundaries: [])
        let pageSize = ram.block.pageSize
        for t in 0..<state.threads {
            let slice = StressState.slice(t, threads: state.threads, pageCount: state.pageCount)
            let slot = state.slots[t]
            report.boundaries.append((t, slot.pass, slot.position))
            for (i, page) in slice.enumerated() {
                let expected = UInt64(i) < slot.position ? slot.pass + 1 : slot.pass
                let found = ram.pointer(at: UInt64(page) * pageSize).load(as: UInt64.self)
                report.pagesChecked += 1
                if found != expected {
                    report.badCount += 1
                    if report.firstBad.count < limit {
                        report.firstBad.append(BadPage(page: page, expected: expected, found: found, pageSize: pageSize))
                    }
                }
            }
        }
        return report
    }
}
