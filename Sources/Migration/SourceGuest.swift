import Dispatch
import GuestMemory
import OSCall
import Synchronization
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// The source's side of the guest-control protocol (docs/GUEST-CONTROL.md):
/// every read and write `livemig send --guest` makes to the guest's control
/// file goes through here.
///
/// Its life: `claim` accepts the guest (or refuses it by its run state),
/// `throttle` applies auto-converge steps, `pause` asks for and waits for
/// every thread's acknowledgement, `pausedState` reads the state bytes,
/// `handOver` stops the source copy for good, `markMigrated` records the
/// commit. On failure `restoreAfterFailure` lifts the pause and the
/// throttle, unless the guest was handed over. While a pause or a throttle
/// is in force a private `LeaseKeeper` renews the lease, so the guest
/// resumes by itself only when this process is gone.
///
/// The `Switchover` is shared with `SourceMigration`: its lock arbitrates
/// between the hand-over (here) and the switchover deadline (the watchdog),
/// and it tells the restore and the death check that the guest was handed
/// over.
///
/// Threads: the migration thread calls everything but `isRunning`,
/// `awaitsPauseAcknowledgement` and `diedBeforeHandOver` (the watchdog) and
/// `restoreAfterFailure` (the migration thread, after the failure).
final class SourceGuest: Sendable {
    private let control: GuestControl
    private let switchover: Switchover
    private let latch: FailureLatch
    /// How long the guest may take to acknowledge a pause.
    private let pauseTimeout: Double
    private let lease: LeaseKeeper
    /// Set once `claim` accepted the guest: only then may a failure touch
    /// its run state and throttle.
    private let claimed = Atomic<Bool>(false)
    /// The guest process ran when the migration began (`claim`): if it
    /// dies before the hand-over, the migration fails. A guest that had
    /// already stopped is migrated as it lies.
    private let ranAtClaim = Atomic<Bool>(false)

    init(control: GuestControl, switchover: Switchover, latch: FailureLatch, pauseTimeout: Double) {
        self.control = control
        self.switchover = switchover
        self.latch = latch
        self.pauseTimeout = pauseTimeout
        lease = LeaseKeeper(control: control)
    }

    /// The guest's dirty bitmap, which the rounds harvest.
    var bitmap: DirtyBitmap { control.bitmap }

    /// Whether the guest process ran when the migration began.
    var wasRunning: Bool { ranAtClaim.load(ordering: .relaxed) }

    /// Run state *running*: no pause has been requested.
    var isRunning: Bool { control.runState == .running }

    /// A pause was requested and not every guest thread has acknowledged
    /// it yet: the wait is on the guest, not on the peer.
    var awaitsPauseAcknowledgement: Bool {
        control.runState == .pauseRequested && control.pausedThreads < control.guestThreads
    }

    /// The throttle in force, in percent of the guest's time asleep.
    var throttlePercent: UInt32 { control.throttlePercent }

    /// Accepts the guest for migrating `ram`: its control file must be for
    /// that RAM, and its run state must let a source take it. A pause left
    /// by a vanished source is lifted first. Records this process as the
    /// source.
    func claim(for ram: RAMFile) throws(MigrationError) {
        let g = control
        guard g.ramSize == ram.block.size, g.pageSize == ram.block.pageSize else {
            throw MigrationError(
                .mismatch,
                "control file \(g.path) is for \(g.ramSize) bytes of RAM but \(ram.path) is \(ram.block.size) bytes; give the guest's own control file"
            )
        }
        if let why = g.blockMismatch(ram.blocks) {
            throw MigrationError(.mismatch, "control file \(g.path): \(why); give send the guest's --ram blocks in the guest's order")
        }
        switch g.runState {
        case .running: break
        case .migrated: throw MigrationError(.mismatch, "the guest in \(g.path) already migrated away")
        case .incoming:
            throw MigrationError(.mismatch, "the guest in \(g.path) was received but not resumed; start it with livemig stress --resume")
        case .incomplete:
            throw MigrationError(
                .mismatch, "the guest in \(g.path) is incomplete: the migration into it did not complete; it is no guest to send")
        case .waitingIncoming:
            throw MigrationError(
                .mismatch,
                "an incoming guest waits here (livemig stress --incoming, pid \(g.guestPID)); this is a destination: give it to receive --guest, not to send"
            )
        case .handedOver:
            throw MigrationError(
                .mismatch,
                "the guest in \(g.path) was handed over to a destination that never confirmed it; check that destination before anything else (livemig stress --resume --reclaim takes it back if it failed)"
            )
        case .pauseRequested:
            if g.pauseHolderVanished {
                g.exchangeRunState(from: .pauseRequested, to: .running)
            } else {
                throw MigrationError(.mismatch, "the guest in \(g.path) is paused by another migration (source pid \(g.sourcePID))")
            }
        }
        let pid = g.guestPID
        let running = pid > 0 && g.guestThreads > 0 && SystemCall.processExists(pid)
        switch g.guestKind {
        case .cooperative: break
        case .external:
            guard g.tracking == .kernel else {
                throw MigrationError(
                    .mismatch,
                    "the program under livemig run (pid \(pid)) has not mapped its RAM file for tracking (yet); wait for run's "
                        + "'its writes are tracked' line, or check that the program maps the file with MAP_SHARED")
            }
        case nil:
            throw MigrationError(.mismatch, "the control file \(g.path) names a kind of guest this livemig does not know")
        }
        switch g.tracking {
        case .bitmap: break
        case .kernel:
            guard running else {
                throw MigrationError(
                    .mismatch,
                    "the guest in \(g.path) tracks its writes with the kernel (--tracking kernel), but its process (pid \(pid)) is not running: "
                        + "only a running guest's page tables say what it wrote; resume it first")
            }
            guard ram.blocks.count == 1 else {
                throw MigrationError(
                    .mismatch, "kernel dirty tracking covers one RAM block; this guest has \(ram.blocks.count): track it with the bitmap")
            }
            do {
                kernelScan = try WrittenPageScan(
                    guest: g, ramPath: ram.path, pageSize: ram.block.pageSize, pageCount: ram.block.pageCount)
            } catch {
                throw MigrationError(error)
            }
        case nil:
            throw MigrationError(
                .mismatch, "the control file \(g.path) names a dirty-tracking mode this livemig does not know; restart the guest")
        }
        g.sourcePID = getpid()
        ranAtClaim.store(running, ordering: .relaxed)
        claimed.store(true, ordering: .relaxed)
    }

    /// With kernel tracking (`--tracking kernel`): the scanner of the
    /// guest's page tables, set once by `claim` (nil with the bitmap).
    /// Used by the migration thread only.
    nonisolated(unsafe) private(set) var kernelScan: WrittenPageScan?

    /// QEMU's bitmap sync: with kernel tracking, moves the pages the guest
    /// wrote since the last sync from its page tables into `bitmap` (and
    /// write-protects them again); with the bitmap, nothing (the guest marks
    /// it itself). Call before a harvest of `bitmap` that must see every
    /// write made so far: before each round's dirty count, and after the
    /// pause before the final harvest. Pages are read only after the sync
    /// that reported them. Returns the pages reported.
    @discardableResult
    func syncDirtyLog() throws(MigrationError) -> Int {
        guard let scan = kernelScan else { return 0 }
        let bitmap = self.bitmap
        do {
            return try scan.sync { bitmap.mark(page: $0) }
        } catch {
            throw MigrationError(.local, "kernel dirty tracking failed: \(error.description)")
        }
    }

    /// Sets an auto-converge step. The lease also bounds the throttle: a
    /// guest whose source vanished drops it (see StressGuest).
    func throttle(_ percent: UInt32) {
        control.renewLease()
        lease.start()
        control.throttlePercent = percent
    }

    /// Asks the guest to pause and waits until every guest thread has
    /// acknowledged, at most `pauseTimeout`; a failure of the migration
    /// ends the wait. A guest that ran when the migration began and whose
    /// process is gone fails it; one that had stopped before writes nothing.
    func pause() throws(MigrationError) {
        let g = control
        g.renewLease()
        lease.start()
        g.setRunState(.pauseRequested)
        let deadline = Monotonic.now + pauseTimeout
        var spins = 0
        // Acquire (in `pausedThreads`): pairs with each guest thread's
        // acknowledgement, published after its last page, bit and state.
        while g.pausedThreads < g.guestThreads {
            try latch.check()
            if wasRunning {
                if let died = Self.died(g) { throw died }
            } else if g.guestPID > 0, !SystemCall.processExists(g.guestPID) {
                break
            }
            if Monotonic.now > deadline {
                throw MigrationError(.timeout, "the guest did not acknowledge the pause within \(pauseTimeout) s")
            }
            spins += 1
            if spins > 100 { usleep(50) }
        }
    }

    /// The guest's state bytes, read while it is paused. Every guest thread
    /// acknowledged the pause (acquire), so they are complete and stable;
    /// but the lease keeps the guest paused only while we renew it: if this
    /// process stalled past it, the guest resumed and the copy is stale.
    func pausedState() throws(MigrationError) -> [UInt8] {
        let state = control.readState()
        guard control.runState == .pauseRequested else {
            throw Self.leftPause
        }
        return state
    }

    /// The failure for a guest that ran when the migration began and whose
    /// process is gone, or nil.
    func died() -> MigrationError? {
        guard wasRunning else { return nil }
        return Self.died(control)
    }

    /// `died()`, unless the guest was handed over (after which it exits by
    /// design); under the lock `handOver` takes, so the check cannot race
    /// the hand-over. For the watchdog.
    func diedBeforeHandOver() -> MigrationError? {
        guard wasRunning else { return nil }
        return switchover.unlessHandedOver { Self.died(control) }
    }

    /// The failure for a guest process that is gone, or nil while it lives.
    /// Its last state may be mid-write, and it is nobody's to run: the
    /// migration must not hand it to the destination.
    private static func died(_ g: GuestControl) -> MigrationError? {
        let pid = g.guestPID
        guard pid > 0, !SystemCall.processExists(pid) else { return nil }
        return MigrationError(.local, "the guest process (pid \(pid)) died; nothing was started on the destination")
    }

    /// The point of no return on the source: the destination is prepared,
    /// so stop this copy for good (run state *pause requested* → *handed
    /// over*, its threads exit), under `switchover`'s lock so the deadline
    /// cannot fire in between. Refused, and the guest stays paused for the
    /// restore, when the migration failed meanwhile, the guest died,
    /// `destinationRefusal` says the destination cannot commit (it could
    /// never run the guest then), or the guest left the pause.
    func handOver(unless destinationRefusal: () -> MigrationError?) throws(MigrationError) {
        var refusal: MigrationError?
        let handed = switchover.handOver {
            refusal = handOverRefusal(destinationRefusal)
            return refusal == nil && control.exchangeRunState(from: .pauseRequested, to: .handedOver)
        }
        guard handed else {
            try latch.check()
            throw refusal ?? Self.leftPause
        }
    }

    /// Why the guest must not be handed over now, or nil.
    private func handOverRefusal(_ destinationRefusal: () -> MigrationError?) -> MigrationError? {
        if latch.hasFailed { return latch.error }
        if let died = died() { return died }
        return destinationRefusal()
    }

    private static let leftPause = MigrationError(
        .local, "the guest left the pause during switchover (lease expired); not completing")

    /// The destination committed: the guest lives there. Its copy here
    /// stays stopped for good, and this process lets go of it.
    func markMigrated() {
        control.setRunState(.migrated)
        control.sourcePID = 0
        lease.stop()
    }

    /// Undoes what a failed migration did to a guest it claimed: throttle
    /// off, pause lifted, source pid cleared. Its RAM was never written by
    /// us. A handed-over guest is left alone: the destination may run it
    /// (docs/PROTOCOL.md §7).
    func restoreAfterFailure() {
        guard claimed.load(ordering: .relaxed), !switchover.isHandedOver else { return }
        control.throttlePercent = 0
        control.exchangeRunState(from: .pauseRequested, to: .running)
        control.sourcePID = 0
    }

    /// Stops renewing the lease (at the end of `run()`, success or not).
    func stopLease() { lease.stop() }
}

/// Renews the guest's pause lease while a pause or throttle is in force, so
/// the guest resumes by itself only when this process is gone.
private final class LeaseKeeper: Sendable {
    private let control: GuestControl
    private let running = Atomic<Bool>(false)
    private let thread = Mutex<WorkerThread?>(nil)
    /// Posted by `stop()` so the renewal sleep ends at once.
    private let wake = DispatchSemaphore(value: 0)

    init(control: GuestControl) { self.control = control }

    func start() {
        guard !running.exchange(true, ordering: .relaxed) else { return }
        let control = self.control
        let t = WorkerThread(name: "mig/lease") { [self] in
            while running.load(ordering: .relaxed) {
                control.renewLease()
                _ = wake.wait(timeout: .now() + .milliseconds(100))
            }
        }
        thread.withLock { $0 = t }
    }

    func stop() {
        guard running.exchange(false, ordering: .relaxed) else { return }
        wake.signal()
        if let t = thread.withLock({ t -> WorkerThread? in
            let x = t
            t = nil
            return x
        }) {
            t.join()
        }
    }
}
