import Migration
import Testing

/// The convergence rules driven with made-up measurements: every time is a
/// parameter, so nothing here reads a clock.
@Suite("Convergence")
struct ConvergenceTests {
    static let MiB: UInt64 = 1 << 20

    static func policy(
        downtimeLimit: Double = 0.3, maxRounds: Int? = nil, timeout: Double? = nil
    ) -> ConvergencePolicy {
        var p = ConvergencePolicy()
        p.downtimeLimit = downtimeLimit
        p.maxRounds = maxRounds
        p.timeout = timeout
        return p
    }

    static func close(_ a: Double, _ b: Double, relative: Double = 1e-12) -> Bool {
        abs(a - b) <= relative * max(abs(a), abs(b))
    }

    // MARK: - switchover or next round

    @Test("switchover exactly at remaining / bandwidth == downtimeLimit")
    func switchoverAtTheLimit() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.3))
        // 100 MiB in 1 s: 100 MiB/s; 30 MiB left takes exactly 0.3 s.
        let (decision, expected) = judge.decide(round: 1, bytes: 100 * Self.MiB, seconds: 1.0, remaining: 30 * Self.MiB, elapsed: 1.0)
        #expect(decision == .switchover)
        #expect(expected == 0.3)
        #expect(judge.bandwidth == Double(100 * Self.MiB))
    }

    @Test("one page over the limit means another round")
    func nextRoundJustOverTheLimit() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.3))
        let remaining = 30 * Self.MiB + 4096
        let (decision, expected) = judge.decide(round: 1, bytes: 100 * Self.MiB, seconds: 1.0, remaining: remaining, elapsed: 1.0)
        #expect(decision == .nextRound)
        #expect(expected == Double(remaining) / Double(100 * Self.MiB))
        #expect(expected > 0.3)
    }

    @Test("switchover well under the limit, with the expected downtime computed")
    func switchoverUnderTheLimit() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.3))
        // 50 MB/s, 5 MB left: 0.1 s.
        let (decision, expected) = judge.decide(round: 3, bytes: 25_000_000, seconds: 0.5, remaining: 5_000_000, elapsed: 4)
        #expect(decision == .switchover)
        #expect(Self.close(expected, 0.1))
    }

    @Test("nothing left is a switchover even with no bandwidth measured")
    func switchoverWhenNothingRemains() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.001))
        let (decision, expected) = judge.decide(round: 1, bytes: 0, seconds: 0, remaining: 0, elapsed: 0)
        #expect(decision == .switchover)
        #expect(expected == 0)
        #expect(judge.bandwidth == 0)
    }

    @Test("nothing left is a switchover even with a zero downtime limit")
    func switchoverWhenNothingRemainsAndZeroLimit() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0))
        let (decision, expected) = judge.decide(round: 7, bytes: Self.MiB, seconds: 0.01, remaining: 0, elapsed: 9)
        #expect(decision == .switchover)
        #expect(expected == 0)
    }

    @Test("no bandwidth measured and pages left: infinite downtime, next round")
    func noBandwidthMeansNextRound() {
        var judge = ConvergenceJudge(policy: Self.policy())
        let (decision, expected) = judge.decide(round: 1, bytes: 0, seconds: 0, remaining: 4096, elapsed: 0.5)
        #expect(decision == .nextRound)
        #expect(expected == .infinity)
    }

    @Test("dirtying faster than sending keeps iterating")
    func nextRoundWhileFarOff() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.3))
        // 10 MiB/s, 64 MiB left: 6.4 s.
        let (decision, expected) = judge.decide(round: 2, bytes: 10 * Self.MiB, seconds: 1.0, remaining: 64 * Self.MiB, elapsed: 2)
        #expect(decision == .nextRound)
        #expect(Self.close(expected, 6.4))
    }

    // MARK: - bandwidth window

    @Test("tiny rounds are averaged with older ones until the window is covered")
    func bandwidthSpansTheWindow() {
        // Binary fractions of a second, so every sum below is exact.
        #expect(ConvergenceJudge.bandwidthWindow == 0.1)
        var judge = ConvergenceJudge(policy: Self.policy())
        // A bulk round: 100,000,000 bytes in 1 s.
        _ = judge.decide(round: 1, bytes: 100_000_000, seconds: 1.0, remaining: 1 << 40, elapsed: 1)
        #expect(judge.bandwidth == 100_000_000)

        // Tiny rounds of 1/32 s. The last one alone would claim 1000/0.03125
        // = 32,000 B/s; the estimate still includes the bulk round.
        _ = judge.decide(round: 2, bytes: 1000, seconds: 0.03125, remaining: 1 << 40, elapsed: 1.03125)
        #expect(judge.bandwidth == 100_001_000 / 1.03125)
        _ = judge.decide(round: 3, bytes: 2000, seconds: 0.03125, remaining: 1 << 40, elapsed: 1.0625)
        #expect(judge.bandwidth == 100_003_000 / 1.0625)
        // Three tiny rounds make 0.09375 s < 0.1 s: the bulk round still counts.
        let (_, expected) = judge.decide(round: 4, bytes: 3000, seconds: 0.03125, remaining: 100_006_000, elapsed: 1.09375)
        #expect(judge.bandwidth == 100_006_000 / 1.09375)
        #expect(Self.close(expected, 1.09375))

        // A fourth tiny round: 0.125 s of recent rounds covers the window, so
        // the bulk round drops out: (1000 + 2000 + 3000 + 4000) / 0.125.
        _ = judge.decide(round: 5, bytes: 4000, seconds: 0.03125, remaining: 1 << 40, elapsed: 1.125)
        #expect(judge.bandwidth == 80_000)
        #expect(judge.bandwidth != 4000 / 0.03125)
    }

    @Test("a single round longer than the window is the estimate")
    func longLastRoundAlone() {
        var judge = ConvergenceJudge(policy: Self.policy())
        _ = judge.decide(round: 1, bytes: 1000, seconds: 0.5, remaining: 1, elapsed: 0.5)
        _ = judge.decide(round: 2, bytes: 64_000_000, seconds: 0.25, remaining: 1, elapsed: 0.75)
        #expect(judge.bandwidth == 256_000_000)
    }

    @Test("the estimate feeds the decision")
    func windowDecidesTheSwitchover() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.5))
        _ = judge.decide(round: 1, bytes: 100_000_000, seconds: 1.0, remaining: 1 << 40, elapsed: 1)
        // The tiny round alone says 32,000 B/s (10 MB would take 312 s); over
        // the window the estimate is 100,001,000 / 1.03125 B/s: 10 MB takes
        // 0.103 s, a switchover.
        let (decision, expected) = judge.decide(round: 2, bytes: 1000, seconds: 0.03125, remaining: 10_000_000, elapsed: 1.03125)
        #expect(decision == .switchover)
        #expect(Self.close(expected, 10_000_000 / (100_001_000 / 1.03125)))
    }

    // MARK: - giving up

    @Test("give up at maxRounds, not before; the message has the numbers")
    func giveUpAtMaxRounds() {
        let policy = Self.policy(downtimeLimit: 0.3, maxRounds: 5)
        for round in 1...4 {
            var judge = ConvergenceJudge(policy: policy)
            let (decision, _) = judge.decide(
                round: round, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: Double(round))
            #expect(decision == .nextRound, "round \(round)")
        }
        var judge = ConvergenceJudge(policy: policy)
        let (decision, expected) = judge.decide(round: 5, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: 5)
        #expect(expected == 2.0)
        #expect(
            decision
                == .giveUp(
                    "did not converge after 5 rounds: remaining 200 MiB would take 2000 ms at 100 MiB/s, over the 300 ms downtime limit"
                ))
        // Past the limit too.
        var later = ConvergenceJudge(policy: policy)
        let (after, _) = later.decide(round: 9, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: 9)
        guard case .giveUp(let text) = after else {
            Issue.record("expected give-up, got \(after)")
            return
        }
        #expect(text.contains("after 9 rounds"))
    }

    @Test("a round that converges at maxRounds still switches over")
    func switchoverBeatsMaxRounds() {
        var judge = ConvergenceJudge(policy: Self.policy(downtimeLimit: 0.3, maxRounds: 3))
        let (decision, _) = judge.decide(round: 3, bytes: 100 * Self.MiB, seconds: 1, remaining: Self.MiB, elapsed: 3)
        #expect(decision == .switchover)
    }

    @Test("give up when elapsed reaches the timeout, not before")
    func giveUpAtTimeout() {
        let policy = Self.policy(downtimeLimit: 0.3, timeout: 10)
        var before = ConvergenceJudge(policy: policy)
        let (early, _) = before.decide(round: 3, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: 9.999)
        #expect(early == .nextRound)

        var judge = ConvergenceJudge(policy: policy)
        let (decision, _) = judge.decide(round: 3, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: 10)
        #expect(
            decision
                == .giveUp(
                    "did not converge within 10.0 s (3 rounds): remaining 200 MiB would take 2000 ms at 100 MiB/s, over the 300 ms downtime limit"
                ))

        var late = ConvergenceJudge(policy: policy)
        let (after, _) = late.decide(round: 3, bytes: 100 * Self.MiB, seconds: 1, remaining: 200 * Self.MiB, elapsed: 60)
        #expect(after != .nextRound)
    }

    @Test("no bandwidth: the give-up message says forever")
    func giveUpForever() {
        var judge = ConvergenceJudge(policy: Self.policy(maxRounds: 1))
        let (decision, _) = judge.decide(round: 1, bytes: 0, seconds: 0, remaining: 3 * Self.MiB, elapsed: 0)
        #expect(
            decision
                == .giveUp("did not converge after 1 rounds: remaining 3 MiB would take forever at 0 MiB/s, over the 300 ms downtime limit")
        )
    }

    @Test("without maxRounds or timeout it never gives up")
    func neverGivesUpWithoutLimits() {
        var judge = ConvergenceJudge(policy: Self.policy())
        for round in 1...200 {
            let (decision, _) = judge.decide(
                round: round, bytes: Self.MiB, seconds: 1, remaining: 64 * Self.MiB, elapsed: Double(round) * 1000)
            #expect(decision == .nextRound)
            if decision != .nextRound { break }
        }
    }

    // MARK: - auto-converge

    @Test("QEMU's schedule: every second high round steps 20, 30, ... 90, 99, then stays")
    func autoConvergeSchedule() {
        var ac = AutoConverge()
        #expect(ac.percent == 0)
        #expect(ac.initialStep == 20)
        #expect(ac.incrementStep == 10)
        var changes: [UInt32?] = []
        for _ in 0..<22 { changes.append(ac.afterRound(dirtiedBytes: 900, sentBytes: 1000)) }
        let expected: [UInt32?] = [
            nil, 20, nil, 30, nil, 40, nil, 50, nil, 60, nil, 70, nil, 80, nil, 90, nil, 99, nil, nil, nil, nil,
        ]
        #expect(changes == expected)
        #expect(ac.percent == 99)
    }

    @Test("the first high round alone does not throttle")
    func firstHighRoundDoesNotThrottle() {
        var ac = AutoConverge()
        #expect(ac.afterRound(dirtiedBytes: 10_000, sentBytes: 1000) == nil)
        #expect(ac.percent == 0)
        #expect(ac.afterRound(dirtiedBytes: 10_000, sentBytes: 1000) == 20)
        #expect(ac.percent == 20)
    }

    @Test("low rounds neither count nor reset the count")
    func lowRoundsDoNotCount() {
        var ac = AutoConverge()
        for _ in 0..<10 { #expect(ac.afterRound(dirtiedBytes: 100, sentBytes: 1000) == nil) }
        #expect(ac.percent == 0)
        #expect(ac.afterRound(dirtiedBytes: 600, sentBytes: 1000) == nil)
        #expect(ac.afterRound(dirtiedBytes: 0, sentBytes: 1000) == nil)
        #expect(ac.afterRound(dirtiedBytes: 500, sentBytes: 1000) == nil)
        #expect(ac.percent == 0)
        // The second high round, with low ones between (as QEMU counts).
        #expect(ac.afterRound(dirtiedBytes: 600, sentBytes: 1000) == 20)
    }

    @Test("dirtied == 50% of sent does not trigger; one byte more does")
    func thresholdBoundary() {
        var ac = AutoConverge()
        for _ in 0..<4 { #expect(ac.afterRound(dirtiedBytes: 500_000, sentBytes: 1_000_000) == nil) }
        #expect(ac.percent == 0)
        #expect(ac.afterRound(dirtiedBytes: 500_001, sentBytes: 1_000_000) == nil)
        #expect(ac.afterRound(dirtiedBytes: 500_001, sentBytes: 1_000_000) == 20)

        // Nothing sent: any dirtying is high, none is not.
        var idle = AutoConverge()
        #expect(idle.afterRound(dirtiedBytes: 0, sentBytes: 0) == nil)
        #expect(idle.afterRound(dirtiedBytes: 0, sentBytes: 0) == nil)
        #expect(idle.percent == 0)
        #expect(idle.afterRound(dirtiedBytes: 1, sentBytes: 0) == nil)
        #expect(idle.afterRound(dirtiedBytes: 1, sentBytes: 0) == 20)
    }

    @Test("custom initial and increment: 60/30 gives 60, 90, 99")
    func customSteps() {
        var ac = AutoConverge(initial: 60, increment: 30)
        #expect(ac.initialStep == 60)
        #expect(ac.incrementStep == 30)
        var changes: [UInt32] = []
        for _ in 0..<12 {
            if let c = ac.afterRound(dirtiedBytes: 2, sentBytes: 2) { changes.append(c) }
        }
        #expect(changes == [60, 90, 99])
        #expect(ac.percent == 99)
    }

    @Test("an initial step over 99 is capped; a zero increment never steps again")
    func cappedAndFlatSteps() {
        var big = AutoConverge(initial: 150, increment: 10)
        #expect(big.initialStep == 99)
        #expect(big.afterRound(dirtiedBytes: 9, sentBytes: 10) == nil)
        #expect(big.afterRound(dirtiedBytes: 9, sentBytes: 10) == 99)

        var flat = AutoConverge(initial: 35, increment: 0)
        var changes: [UInt32] = []
        for _ in 0..<10 {
            if let c = flat.afterRound(dirtiedBytes: 9, sentBytes: 10) { changes.append(c) }
        }
        #expect(changes == [35])
        #expect(flat.percent == 35)
    }

    @Test("the policy defaults match QEMU's")
    func policyDefaults() {
        let p = ConvergencePolicy()
        #expect(p.downtimeLimit == 0.3)
        #expect(p.maxRounds == nil)
        #expect(p.timeout == nil)
        #expect(!p.autoConverge)
        #expect(p.throttleInitial == 20)
        #expect(p.throttleIncrement == 10)
    }
}
