/// When a live migration stops iterating (QEMU's rules; docs/ARCHITECTURE.md).
public struct ConvergencePolicy: Sendable {
    /// Switch over once the remaining dirty bytes can be sent in this long.
    public var downtimeLimit = 0.3
    /// Give up after this many precopy rounds (nil: never).
    public var maxRounds: Int?
    /// Give up after this many seconds of precopy (nil: never).
    public var timeout: Double?
    /// Throttle the guest when it dirties faster than we send.
    public var autoConverge = false
    /// Bytes per second the multifd channels may use during precopy (nil:
    /// unlimited). Lifted at switchover: the guest is paused then, and every
    /// millisecond of downtime counts.
    public var maxBandwidth: Double?
    /// First auto-converge throttle step, percent (QEMU's cpu-throttle-initial).
    public var throttleInitial: UInt32 = AutoConverge.initial
    /// Later steps, percent (QEMU's cpu-throttle-increment).
    public var throttleIncrement: UInt32 = AutoConverge.increment

    public init() {}
}

/// What one precopy round did (one line of `--events`).
public struct RoundRecord: Sendable, Encodable, Equatable {
    public var round: Int
    /// Seconds from the migration's start to the round's start.
    public var start: Double
    public var duration: Double
    /// Bytes written on the multifd channels in this round.
    public var bytes: UInt64
    /// Dirty pages harvested (and sent) in this round.
    public var pages: UInt64
    /// Dirty bytes left when the round ended (dirtied while it ran).
    public var remaining: UInt64
    /// Bandwidth estimate after this round, bytes/s.
    public var bandwidth: Double
    /// Pages the guest dirtied per second during this round.
    public var dirtyPagesRate: Double
    /// remaining ÷ bandwidth, in seconds.
    public var expectedDowntime: Double
    /// Guest throttle after this round, percent.
    public var throttle: UInt32
    /// "next-round", "switchover" or "give-up"; with postcopy "postcopy"
    /// (this round ends precopy), then one line "postcopy-active" (the
    /// destination committed: `remaining` is what it lacks) and one
    /// "postcopy-completed" (the postcopy round: what it sent).
    public var decision: String = ""

    enum CodingKeys: String, CodingKey {
        case round, start, duration, bytes, pages, remaining, bandwidth, throttle, decision
        case dirtyPagesRate = "dirty-pages-rate"
        case expectedDowntime = "expected-downtime"
    }
}

/// The verdict after a round.
public enum ConvergenceDecision: Equatable, Sendable {
    case nextRound
    case switchover
    case giveUp(String)
}

/// Decides after each round, from measurements only (no clock of its own,
/// so tests drive it with made-up times).
public struct ConvergenceJudge: Sendable {
    public let policy: ConvergencePolicy
    /// Recent rounds' (bytes, seconds) for the bandwidth estimate.
    private var window: [(bytes: UInt64, seconds: Double)] = []
    /// How much history the bandwidth estimate spans at least.
    public static let bandwidthWindow = 0.1

    public init(policy: ConvergencePolicy) { self.policy = policy }

    /// Bytes per second over the most recent rounds spanning at least
    /// `bandwidthWindow` seconds (short rounds alone are latency-bound and
    /// would underestimate the link).
    public var bandwidth: Double {
        var bytes: UInt64 = 0
        var secs = 0.0
        for r in window.reversed() {
            bytes += r.bytes
            secs += r.seconds
            if secs >= Self.bandwidthWindow { break }
        }
        return secs > 0 ? Double(bytes) / secs : 0
    }

    /// Records a round and returns the decision. `elapsed` is the precopy
    /// time so far.
    public mutating func decide(
        round: Int, bytes: UInt64, seconds: Double, remaining: UInt64, elapsed: Double
    ) -> (decision: ConvergenceDecision, expectedDowntime: Double) {
        window.append((bytes, seconds))
        if window.count > 64 { window.removeFirst() }
        let bw = bandwidth
        let expected = remaining == 0 ? 0 : (bw > 0 ? Double(remaining) / bw : .infinity)
        if expected <= policy.downtimeLimit { return (.switchover, expected) }
        let ms = expected.isFinite ? "\(Int(expected * 1000)) ms" : "forever"
        let why =
            "remaining \(remaining >> 20) MiB would take \(ms) at \(Int(bw / 1048576)) MiB/s, "
            + "over the \(Int(policy.downtimeLimit * 1000)) ms downtime limit"
        if let m = policy.maxRounds, round >= m {
            return (.giveUp("did not converge after \(round) rounds: \(why)"), expected)
        }
        if let t = policy.timeout, elapsed >= t {
            return (.giveUp("did not converge within \(t) s (\(round) rounds): \(why)"), expected)
        }
        return (.nextRound, expected)
    }
}

/// QEMU's auto-converge schedule: when the guest dirtied more than half of
/// what we sent in a round, twice, throttle it — 20% first, then +10% per
/// step, at most 99%.
public struct AutoConverge: Sendable, Equatable {
    public static let initial: UInt32 = 20
    public static let increment: UInt32 = 10
    public static let maximum: UInt32 = 99
    /// Percent of sent bytes the dirtied bytes must exceed.
    public static let triggerThreshold = 50

    public private(set) var percent: UInt32 = 0
    private var highCount = 0
    public let initialStep: UInt32
    public let incrementStep: UInt32

    public init(initial: UInt32 = AutoConverge.initial, increment: UInt32 = AutoConverge.increment) {
        initialStep = min(initial, Self.maximum)
        incrementStep = increment
    }

    /// After a round (not the first, bulk one): returns the new throttle
    /// when it changes.
    public mutating func afterRound(dirtiedBytes: UInt64, sentBytes: UInt64) -> UInt32? {
        guard dirtiedBytes > sentBytes * UInt64(Self.triggerThreshold) / 100 else { return nil }
        highCount += 1
        guard highCount >= 2 else { return nil }
        highCount = 0
        let next = percent == 0 ? initialStep : min(Self.maximum, percent + incrementStep)
        guard next != percent else { return nil }
        percent = next
        return next
    }
}
