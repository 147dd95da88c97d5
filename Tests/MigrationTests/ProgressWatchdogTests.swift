import OSCall
import Synchronization
import Testing

@testable import Migration

#if canImport(Glibc)
    import Glibc
#endif

/// The silence clock with made-up times, then the watchdog's thread with a
/// fake counter and short timeouts. No test asserts how fast anything was:
/// only that the watchdog fired within a generous bound, or did not fire.
@Suite("ProgressWatchdog")
struct ProgressWatchdogTests {
    /// A `SilenceClock` behind a reference, so `#expect` can sample it.
    final class Clock {
        var clock: SilenceClock
        init(timeout: Double, value: UInt64, at now: Double) { clock = SilenceClock(timeout: timeout, value: value, at: now) }
        func isSilent(value: UInt64, at now: Double, held: Bool) -> Bool { clock.isSilent(value: value, at: now, held: held) }
    }

    @Test("silent after the timeout without a change, not before")
    func silenceClockFires() {
        let c = Clock(timeout: 1, value: 5, at: 100)
        for i in 1...9 { #expect(!c.isSilent(value: 5, at: 100 + Double(i) * 0.1, held: false)) }
        #expect(c.isSilent(value: 5, at: 101, held: false))
    }

    @Test("a change, a held sample or a late sample restarts the clock")
    func silenceClockRestarts() {
        let c = Clock(timeout: 1, value: 0, at: 0)
        #expect(!c.isSilent(value: 0, at: 0.4, held: false))
        #expect(!c.isSilent(value: 1, at: 0.8, held: false))  // progress
        #expect(!c.isSilent(value: 1, at: 1.2, held: false))
        #expect(!c.isSilent(value: 1, at: 1.6, held: false))
        #expect(c.isSilent(value: 1, at: 1.8, held: false))  // 1 s since the change

        let h = Clock(timeout: 1, value: 0, at: 0)
        for i in 1...30 { #expect(!h.isSilent(value: 0, at: Double(i) * 0.1, held: true)) }
        #expect(!h.isSilent(value: 0, at: 3.5, held: false))  // released: counts from the last held sample
        #expect(h.isSilent(value: 0, at: 4.0, held: false))

        // This process did not run for 5 s (stopped): not the peer's fault.
        let late = Clock(timeout: 1, value: 0, at: 0)
        #expect(!late.isSilent(value: 0, at: 5, held: false))
        #expect(!late.isSilent(value: 0, at: 5.4, held: false))
        #expect(!late.isSilent(value: 0, at: 5.8, held: false))
        #expect(late.isSilent(value: 0, at: 6.0, held: false))
    }

    /// A counter a test moves by hand, standing in for `TransferCounters`.
    final class FakeCounter: Sendable {
        let value = Atomic<UInt64>(0)
        func bump() { value.add(1, ordering: .relaxed) }
        var read: @Sendable () -> UInt64 { { [self] in value.load(ordering: .relaxed) } }
    }

    static let timeout = 0.3
    static let interval = 0.02

    /// Waits up to `seconds` for the latch to trip.
    func waitForTrip(_ latch: FailureLatch, within seconds: Double) -> Bool {
        let end = Monotonic.now + seconds
        while Monotonic.now < end, !latch.hasFailed { usleep(5_000) }
        return latch.hasFailed
    }

    @Test("fires without progress, with the no-progress message and the timeout kind")
    func firesWithoutProgress() {
        let latch = FailureLatch()
        let counter = FakeCounter()
        let w = ProgressWatchdog(peerTimeout: Self.timeout, interval: Self.interval)
        w.start(latch: latch, progress: counter.read)
        defer { w.stop() }
        #expect(waitForTrip(latch, within: 10))
        #expect(latch.error?.kind == .timeout)
        #expect(latch.error?.description.contains("no progress from the peer for 0.3 s") == true, "\(latch.error?.description ?? "")")
    }

    @Test("never fires while progress continues")
    func quietWhileProgressing() {
        let latch = FailureLatch()
        let counter = FakeCounter()
        let w = ProgressWatchdog(peerTimeout: Self.timeout, interval: Self.interval)
        w.start(latch: latch, progress: counter.read)
        for _ in 0..<100 {  // about 1 s, over three timeouts
            counter.bump()
            usleep(10_000)
        }
        w.stop()
        #expect(!latch.hasFailed, "\(latch.error?.description ?? "")")
    }

    @Test("never fires while held or while waiting locally; fires after the release")
    func quietWhileHeld() {
        let latch = FailureLatch()
        let counter = FakeCounter()
        let w = ProgressWatchdog(peerTimeout: Self.timeout, interval: Self.interval)
        let local = Atomic<Bool>(false)
        w.start(latch: latch, waitingLocally: { local.load(ordering: .relaxed) }, progress: counter.read)
        defer { w.stop() }
        w.holding { usleep(1_000_000) }
        #expect(!latch.hasFailed, "fired while held: \(latch.error?.description ?? "")")
        // A hold that ends between two ticks restarts the clock too.
        for _ in 0..<50 {
            w.holding { usleep(100) }
            usleep(10_000)
        }
        #expect(!latch.hasFailed, "fired between short holds: \(latch.error?.description ?? "")")
        local.store(true, ordering: .relaxed)
        usleep(1_000_000)
        #expect(!latch.hasFailed, "fired while waiting locally: \(latch.error?.description ?? "")")
        local.store(false, ordering: .relaxed)
        #expect(waitForTrip(latch, within: 10), "silent after the local wait, and never fired")
    }

    @Test("stop ends the thread without firing, also when never started")
    func stops() {
        ProgressWatchdog(peerTimeout: 1).stop()
        let latch = FailureLatch()
        let w = ProgressWatchdog(peerTimeout: Self.timeout, interval: Self.interval)
        w.start(latch: latch) { 0 }
        w.stop()
        w.stop()
        usleep(600_000)
        #expect(!latch.hasFailed)
    }

    @Test("the deadline fires mid-way with its own error, even while progress continues")
    func deadlineFires() {
        let latch = FailureLatch()
        let counter = FakeCounter()
        let w = ProgressWatchdog(peerTimeout: 100, interval: Self.interval)
        let deadline = ProgressWatchdog.Deadline(at: Monotonic.now + 0.2) { MigrationError(.timeout, "did not converge within 0.2 s") }
        w.start(latch: latch, deadline: deadline, progress: counter.read)
        defer { w.stop() }
        let end = Monotonic.now + 10
        while Monotonic.now < end, !latch.hasFailed {
            counter.bump()
            usleep(5_000)
        }
        #expect(latch.error?.description == "did not converge within 0.2 s")
    }

    @Test("a disarmed deadline, or one whose failure says it no longer applies, does not fire")
    func deadlineDisarmed() {
        let counter = FakeCounter()
        for disarmByHand in [true, false] {
            let latch = FailureLatch()
            let w = ProgressWatchdog(peerTimeout: 100, interval: Self.interval)
            let deadline = ProgressWatchdog.Deadline(at: Monotonic.now + 0.2) {
                disarmByHand ? MigrationError(.timeout, "should have been disarmed") : nil
            }
            w.start(latch: latch, deadline: deadline, progress: counter.read)
            if disarmByHand { w.disarmDeadline() }
            usleep(600_000)
            w.stop()
            #expect(!latch.hasFailed, "\(latch.error?.description ?? "")")
        }
    }

    @Test("seconds read as a user writes them")
    func seconds() {
        #expect(formatSeconds(10) == "10")
        #expect(formatSeconds(2.5) == "2.5")
    }
}
