import Dispatch
import OSCall
import Synchronization
import WorkerThreads

/// Ends a migration whose peer stopped moving bytes, and bounds a live
/// source's precopy by its `--timeout` in the middle of a round too.
///
/// One thread per migration (`mig/watchdog`) wakes every `interval` and
/// reads a progress figure: the transfer counters of both directions, which
/// grow with every packet and main-channel message sent or received. When
/// the figure has not changed for `peerTimeout` during the data phase, it
/// fails the migration's `FailureLatch` with a `.timeout` error. The
/// latch's wakers shut the sockets down, which ends the io_uring sends and
/// the `recv`s blocked on a peer that is stopped (SIGSTOP) or cut off.
///
/// The silence clock stands still while this side waits on something that
/// is not the peer: between `hold()` and `release()` (the rate limiter's
/// sleep), and whenever the `waitingLocally` predicate given to `start` is
/// true (the source waiting for its guest to acknowledge a pause, which has
/// a deadline of its own). It also restarts after a tick that came far too
/// late: then this process was not running (stopped itself, or a stalled
/// VM), and the silence says nothing about the peer.
///
/// Thread safety: `start` and `stop` are called by the thread that runs the
/// migration; `hold`, `release` and `disarmDeadline` by any thread.
public final class ProgressWatchdog: Sendable {
    /// A deadline for the whole precopy: past `at` (seconds on
    /// `Monotonic`), the watchdog fails the migration with `failure()`,
    /// unless that returns nil, which means the deadline no longer applies
    /// (switchover began) and disarms it.
    public struct Deadline: Sendable {
        public var at: Double
        public var failure: @Sendable () -> MigrationError?

        public init(at: Double, failure: @escaping @Sendable () -> MigrationError?) {
            self.at = at
            self.failure = failure
        }
    }

    /// How often the counters are read.
    public static let defaultInterval = 0.1

    /// How long the counters may stand still before the peer is given up.
    public let peerTimeout: Double
    public let interval: Double

    private let holds = Atomic<Int>(0)
    /// Bumped by every `release()`: a hold that began and ended between two
    /// ticks still restarts the silence clock.
    private let releases = Atomic<UInt64>(0)
    private let deadline = Mutex<Deadline?>(nil)
    private let stopping = Atomic<Bool>(false)
    private let thread = Mutex<WorkerThread?>(nil)
    /// Posted by `stop()` so the tick's sleep ends at once.
    private let wake = DispatchSemaphore(value: 0)

    public init(peerTimeout: Double, interval: Double = ProgressWatchdog.defaultInterval) {
        precondition(peerTimeout > 0 && interval > 0, "peer timeout \(peerTimeout) and interval \(interval) must be positive")
        self.peerTimeout = peerTimeout
        self.interval = interval
    }

    /// Starts watching `progress` (any figure that grows while bytes move)
    /// on a thread of its own; a failure trips `latch`. Call it when the
    /// data phase begins (again only after `stop()`): the handshake has deadlines of its own. `fault`,
    /// checked on every tick, ends the migration with the error it returns
    /// (the source's guest died).
    public func start(
        latch: FailureLatch, deadline: Deadline? = nil, fault: @escaping @Sendable () -> MigrationError? = { nil },
        waitingLocally: @escaping @Sendable () -> Bool = { false }, progress: @escaping @Sendable () -> UInt64
    ) {
        self.deadline.withLock { $0 = deadline }
        // Again after `stop()` (a postcopy recovery watches its new
        // connections): that joined the old thread.
        stopping.store(false, ordering: .relaxed)
        let t = WorkerThread(name: "mig/watchdog") { [self] in
            watch(latch: latch, fault: fault, waitingLocally: waitingLocally, progress: progress)
        }
        thread.withLock { old in
            precondition(old == nil, "ProgressWatchdog.start called twice")
            old = t
        }
    }

    /// Stops watching and joins the thread. Harmless when never started or
    /// already stopped.
    public func stop() {
        stopping.store(true, ordering: .relaxed)
        wake.signal()
        if let t = thread.withLock({ t -> WorkerThread? in
            defer { t = nil }
            return t
        }) {
            t.join()
        }
    }

    /// Stops the silence clock until the matching `release()`: this side
    /// now waits on something other than the peer. Holds nest.
    public func hold() { holds.add(1, ordering: .relaxed) }

    /// Ends a `hold()`. The silence clock restarts from zero.
    public func release() {
        releases.add(1, ordering: .relaxed)
        holds.subtract(1, ordering: .relaxed)
    }

    /// Runs `body` under a `hold()`.
    @discardableResult
    public func holding<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        hold()
        defer { release() }
        return try body()
    }

    /// Drops the precopy deadline: switchover has begun, and has a deadline
    /// of its own. The silence watch goes on.
    public func disarmDeadline() { deadline.withLock { $0 = nil } }

    /// Sets a new deadline (the switchover's), replacing any other.
    public func arm(_ d: Deadline) { deadline.withLock { $0 = d } }

    /// The error for a peer that moved nothing for `seconds`.
    public static func noProgress(_ seconds: Double) -> MigrationError {
        MigrationError(
            .timeout,
            "no progress from the peer for \(formatSeconds(seconds)) s (it may be stopped, e.g. SIGSTOP, or the link is down); "
                + "check the other side, or raise --peer-timeout on both sides if the link is this slow")
    }

    private func watch(
        latch: FailureLatch, fault: @Sendable () -> MigrationError?, waitingLocally: @Sendable () -> Bool,
        progress: @Sendable () -> UInt64
    ) {
        var clock = SilenceClock(timeout: peerTimeout, value: progress(), at: Monotonic.now)
        var seenReleases = releases.load(ordering: .relaxed)
        while true {
            _ = wake.wait(timeout: .now() + interval)
            if stopping.load(ordering: .relaxed) || latch.hasFailed { return }
            let now = Monotonic.now
            if let failure = expiredDeadline(at: now) ?? fault() {
                latch.fail(failure)
                return
            }
            let released = releases.load(ordering: .relaxed)
            let held = holds.load(ordering: .relaxed) > 0 || released != seenReleases || waitingLocally()
            seenReleases = released
            if clock.isSilent(value: progress(), at: now, held: held) {
                latch.fail(Self.noProgress(peerTimeout))
                return
            }
        }
    }

    /// The deadline's failure once it has passed; nil before, and when it
    /// no longer applies (then it is disarmed).
    private func expiredDeadline(at now: Double) -> MigrationError? {
        guard let d = deadline.withLock({ $0 }), now >= d.at else { return nil }
        if let failure = d.failure() { return failure }
        disarmDeadline()
        return nil
    }
}

/// How long a figure has stood still, from samples taken by one thread.
/// Pure: tests drive it with made-up times.
struct SilenceClock {
    let timeout: Double
    private var value: UInt64
    private var lastChange: Double
    private var lastSample: Double

    init(timeout: Double, value: UInt64, at now: Double) {
        self.timeout = timeout
        self.value = value
        lastChange = now
        lastSample = now
    }

    /// Records a sample; true when the figure has not changed for
    /// `timeout` seconds of watched time. A `held` sample, and one taken
    /// more than half the timeout after the previous one (this process was
    /// not running in between), restart the clock.
    mutating func isSilent(value v: UInt64, at now: Double, held: Bool) -> Bool {
        defer { lastSample = now }
        if held || v != value || now - lastSample > timeout / 2 {
            value = v
            lastChange = now
            return false
        }
        return now - lastChange >= timeout
    }
}

/// `seconds` as a user reads it: "10", "2.5".
func formatSeconds(_ seconds: Double) -> String {
    seconds == seconds.rounded() && abs(seconds) < 1e15 ? String(Int(seconds)) : String(seconds)
}
