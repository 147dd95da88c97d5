import Synchronization
import Testing

@testable import Migration

@Suite("FailureLatch")
struct FailureLatchTests {
    @Test("the first failure wins and wakers run")
    func firstWins() {
        let latch = FailureLatch()
        let woken = WakeCounter()
        latch.onFailure { woken.bump() }
        #expect(!latch.hasFailed)
        #expect(latch.fail(MigrationError(.peer, "first")))
        #expect(!latch.fail(MigrationError(.local, "second")))
        #expect(latch.error?.description == "first")
        #expect(woken.count == 1)
        // A waker registered after the trip runs at once.
        latch.onFailure { woken.bump() }
        #expect(woken.count == 2)
        #expect(throws: MigrationError.self) { try latch.check() }
    }
}

final class WakeCounter: Sendable {
    private let n = Atomic<Int>(0)
    func bump() { n.add(1, ordering: .relaxed) }
    var count: Int { n.load(ordering: .relaxed) }
}
