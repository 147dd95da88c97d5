import Dispatch
import GuestMemory
import MigrationWire
import OSCall
import Synchronization
import Trust
import URing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// How the source connects, sends and converges.
public struct SourceConfig: Sendable {
    public var address: SocketAddress
    /// Multifd channels; must equal the destination's.
    public var channels: Int
    /// Use io_uring for the page channels (falls back when unavailable).
    public var useRing = true
    /// Send pages with IORING_OP_SENDMSG_ZC (io_uring only).
    public var zeroCopy = false
    /// How normal pages travel; the main hello announces the method.
    public var compression = CompressionSetting.none
    /// The pre-shared key and whether to encrypt (`--psk-file`, `--encrypt`).
    public var trust = TrustSetting.none
    /// How long to retry a refused connection.
    public var connectTimeout = 3.0
    /// How long to wait for each handshake reply (the destination may be
    /// creating and pre-faulting its RAM meanwhile).
    public var handshakeTimeout = 60.0
    /// How long the guest may take to acknowledge a pause.
    public var pauseTimeout = 5.0
    /// After the postcopy commit, how long a broken migration keeps trying
    /// to reconnect (`--recover-timeout`; 0: no recovery).
    public var recoverTimeout = 60.0
    /// Told of a recovery's progress (paused, reconnecting, recovered).
    public var onNotice: (@Sendable (String) -> Void)?
    /// How long a switchover may take from the pause to the destination's
    /// `completed` (nil: 2 × the downtime limit, at least 1 s). Past it the
    /// source resumes its guest and fails (docs/PROTOCOL.md §7).
    public var switchoverTimeout: Double?

    /// The switchover deadline in force.
    public var switchoverDeadline: Double { switchoverTimeout ?? max(1, 2 * policy.downtimeLimit) }
    /// How long the destination may move no bytes during the data phase
    /// (`ProgressWatchdog`); also sets the TCP keepalive and user timeout
    /// of each connection (`Socket.setPeerTimeout`).
    public var peerTimeout = 10.0
    /// Convergence rules for a live guest.
    public var policy = ConvergencePolicy()
    /// Switch to postcopy (live only) after `postcopyAfterRounds` precopy
    /// rounds, unless precopy converges first (docs/PROTOCOL.md §8).
    public var postcopy = false
    public var postcopyAfterRounds = 1
    /// Answer page requests on the preempt channel (false: queue them
    /// into the multifd stream, for comparison).
    public var postcopyPreempt = true
    /// Scheduling of the request server, the source's thread on a fault's
    /// path (`--fault-path-priority`).
    public var faultPathPriority = FaultPathPriority.realtime
    /// Test hook: hold the guest paused this long before the final round,
    /// so a test can kill the source while it holds the pause.
    public var testHoldPause: Double?
    /// Test hook: stop this process at a named point (`TestHook`):
    /// setup, round1, round2, switchover, handover or commit.
    public var testStopAt: String?

    public init(address: SocketAddress, channels: Int) {
        self.address = address
        self.channels = channels
    }
}

/// Live figures for a progress display (relaxed; statistics only).
public final class LiveProgress: Sendable {
    public let round = Atomic<UInt64>(0)
    public let remainingBytes = Atomic<UInt64>(0)
    public let dirtyPagesRate = Atomic<UInt64>(0)
    public let throttle = Atomic<UInt32>(0)
    /// The postcopy phase runs (after the commit), and the page requests
    /// answered so far.
    public let postcopy = Atomic<Bool>(false)
    public let postcopyRequests = Atomic<UInt64>(0)
    public init() {}
}

/// The source side of a migration.
///
/// Without a guest it sends the RAM file once (one round). With a guest
/// (`GuestControl`) it runs iterative precopy: each round harvests the
/// guest's dirty bitmap, sends those pages and ends with the SYNC barrier and
/// an end-of-round marker; when the rest fits the downtime limit it pauses
/// the guest, sends the last dirty pages and the guest state, and succeeds
/// only when the destination confirms. On any failure the guest is resumed
/// (and unthrottled): the source guest keeps running with its RAM intact.
///
/// Threads: the caller of `run()` is the migration thread; one sender thread
/// per channel (`MultiFDSend`); one thread reads the main channel; with a
/// guest, `SourceGuest`'s thread renews the control lease. The RAM is
/// mapped read-only. Every access to the guest's control file goes through
/// `SourceGuest`; this type keeps the rounds and the switchover sequence.
public final class SourceMigration: Sendable {
    public let ram: RAMFile
    public let guest: GuestControl?
    public let config: SourceConfig
    public let counters = TransferCounters()
    public let progress = LiveProgress()
    /// The failure latch of the connections in use: the first set's, then
    /// each postcopy recovery attempt's (`SourceRecovery`), which starts
    /// from a fresh one. Threads take the latch of their own connections.
    public var latch: FailureLatch { latches.withLock { $0 } }
    private let latches: Mutex<FailureLatch>
    /// `cancel()` was called: no recovery attempt starts.
    let cancelled = Atomic<Bool>(false)
    /// Fails the migration when the destination stops moving bytes, or a
    /// live precopy overruns `policy.timeout` mid-round. Whoever begins
    /// switchover calls `watchdog.disarmDeadline()` first.
    public let watchdog: ProgressWatchdog
    /// Messages for the user (fallbacks taken), read after `run()`.
    public let warnings = Mutex<[String]>([])
    let onRound: (@Sendable (RoundRecord) -> Void)?
    /// Set by the main-channel reader when the destination committed.
    private let confirmed = Atomic<Bool>(false)
    /// The point of no return (live migration).
    private let switchover: Switchover
    /// Every access to the guest's control file (live migration).
    let sourceGuest: SourceGuest?
    /// `startPostcopy()` was called (SIGUSR1).
    private let postcopyRequested = Atomic<Bool>(false)
    /// After the postcopy commit a failure is *postcopy-paused*.
    let phase = Atomic<PostcopyPhase>(.none)
    /// The session of the first connections (a recovery names it).
    let firstSession = Mutex<SessionID?>(nil)
    /// What a postcopy recovery resumes from, set at the postcopy commit.
    let resumePoint = Mutex<SourceResumePoint?>(nil)
    /// The postcopy `complete` was sent (on the last connection set).
    let completeSent = Atomic<Bool>(false)
    /// The preempt channel's totals, apart from the multifd ones.
    let preemptCounters = TransferCounters()

    public init(ram: RAMFile, config: SourceConfig, guest: GuestControl? = nil, onRound: (@Sendable (RoundRecord) -> Void)? = nil) {
        self.ram = ram
        self.config = config
        self.guest = guest
        self.onRound = onRound
        watchdog = ProgressWatchdog(peerTimeout: config.peerTimeout)
        let switchover = Switchover(), latch = FailureLatch()
        self.switchover = switchover
        latches = Mutex(latch)
        sourceGuest = guest.map {
            SourceGuest(control: $0, switchover: switchover, latch: latch, pauseTimeout: config.pauseTimeout)
        }
    }

    /// Stops the migration from any thread (a signal handler's queue).
    public func cancel(_ reason: String) {
        cancelled.store(true, ordering: .relaxed)
        latch.fail(MigrationError(.cancelled, reason))
    }

    /// Starts a recovery attempt's connections on a fresh latch.
    func freshLatch() -> FailureLatch {
        let l = FailureLatch()
        latches.withLock { $0 = l }
        return l
    }

    /// Switches to postcopy at the end of the round in progress (QEMU's
    /// `migrate-start-postcopy`; SIGUSR1). Only with `config.postcopy`.
    public func startPostcopy() { postcopyRequested.store(true, ordering: .relaxed) }

    /// Whether a failure found the migration after the postcopy commit.
    public var postcopyPaused: Bool { latch.hasFailed && phase.load(ordering: .acquiring) == .postcopyActive }

    /// Runs the migration to completion. Throws the first failure of any
    /// thread; every thread has ended by the time this returns or throws.
    public func run() throws(MigrationError) -> MigrationStats {
        let start = Monotonic.now
        do {
            return try migrate(start: start)
        } catch {
            guard phase.load(ordering: .acquiring) == .postcopyActive else { throw error }
            return try recoverPostcopy(after: error, start: start)
        }
    }

    private func migrate(start: Double) throws(MigrationError) -> MigrationStats {
        var control: ControlChannel?
        var sockets: [Socket] = []
        var pool: MultiFDSend?
        var reader: WorkerThread?
        var preempt: PreemptChannel?
        defer {
            pool?.finish()
            preempt?.socket.shutdown()
            preempt?.source.join()
            for s in sockets { s.shutdown() }
            control?.socket.shutdown()
            reader?.join()
            sourceGuest?.stopLease()
        }
        do throws(MigrationError) {
            try sourceGuest?.claim(for: ram)
            let session = SessionID.random()
            firstSession.withLock { $0 = session }
            let main = try connect()
            let mainKeys = try openChannel(main, kind: .main, id: 0, session: session)
            let ctl = ControlChannel(socket: main, counters: counters, keys: mainKeys, isSource: true)
            control = ctl
            // First waker: tell the destination why, before any socket is
            // shut (a closed data channel would otherwise speak first). Then
            // wake our main-channel reader.
            latch.onFailure { [latch] in
                if let e = latch.error, e.kind != .peer { ctl.sendErrorBestEffort(e) }
                main.shutdownReceive()
            }
            try handshake(ctl)

            var sealers: [PacketSealer?] = []
            for id in 0..<config.channels {
                let s = try connect()
                sockets.append(s)
                latch.onFailure { [s] in s.shutdown() }
                let keys = try openChannel(s, kind: .multifd, id: id, session: session)
                // With postcopy, faults wait on these sockets' neighbours:
                // BBR's pacing timers fire every ~25 µs per busy socket and
                // their softirq work, pushed to ksoftirqd, held a page
                // request for 0.4 ms (traced). CUBIC sends without timers.
                if config.postcopy { s.preferUnpacedCongestionControl() }
                sealers.append(keys.map { PacketSealer(key: $0.toDestination, encrypts: config.trust.encrypt) })
            }
            let table = PageTable(pages: ram.block.pageCount)
            let transports = try makeTransports(sockets, sealers: sealers, table: table)
            if config.postcopy, guest != nil {
                preempt = try openPreempt(session: session, table: table)
            }

            let replies = DestinationReplies()
            latch.onFailure { replies.wakeAll() }
            reader = WorkerThread(name: "mig/src/main") { [self] in
                readDestination(ctl, replies: replies)
            }
            var stats = MigrationStats(status: .active)
            stats.setupTime = UInt64((Monotonic.now - start) * 1000)
            startWatchdog(main: main)
            defer { watchdog.stop() }
            TestHook.stop(at: "setup", ifRequested: config.testStopAt)

            let multifd = MultiFDSend(transports: transports, latch: latch, batchesPerJob: batchesPerJob)
            pool = multifd
            // Read after the sender threads are joined (`finish`), which
            // orders their last writes to the transports before our reads.
            let zeroCopyReport = { [config] () -> (UInt64, UInt64)? in
                guard config.zeroCopy else { return nil }
                multifd.finish()
                let r = transports.map(\.zeroCopyReport)
                return (r.reduce(0) { $0 + $1.sends }, r.reduce(0) { $0 + $1.copied })
            }
            if let g = sourceGuest {
                try migrateLive(g, ctl: ctl, multifd: multifd, table: table, replies: replies, preempt: preempt, stats: &stats)
            } else {
                let bitmap = DirtyBitmap(pageCount: ram.block.pageCount)
                bitmap.markAll()
                try sendRound(bitmap, through: multifd, limit: nil)
                try ctl.send(.endOfRound(round: 1))
                try ctl.send(.complete(summary(rounds: 1, guestStateBytes: 0, table: table)))
                try awaitReply(replies.prepared)
                try ctl.send(.commit)
                try awaitCommitted(replies)
                stats.ram.dirtySyncCount = 1
                stats.ram.precopyBytes = counters.read(counters.multifdBytes) + counters.read(counters.mainBytes)
            }
            stats.status = .completed
            finishStats(&stats, start: start)
            stats.sendMechanism = transports.first?.mechanism
            stats.fillCompression(
                counters, method: config.compression.method, level: transports.first?.compressionLevel, pageSize: ram.block.pageSize)
            if let (sends, copied) = zeroCopyReport() {
                stats.zeroCopySends = sends
                stats.zeroCopyCopied = copied
            }
            return stats
        } catch {
            latch.fail(error)
            // Lifts the pause and throttle of a guest it claimed, unless it
            // was handed over: the destination may run it then.
            sourceGuest?.restoreAfterFailure()
            // Postcopy-paused: `run` tries the recovery.
            throw latch.error ?? error
        }
    }

    /// Starts the watchdog for the data phase: the silence clock stands
    /// still while the guest has yet to acknowledge a pause (that wait has
    /// its own deadline), and a live precopy ends at `policy.timeout` even
    /// mid-round, until the pause request (switchover) disarms it. A guest
    /// process that dies before the hand-over ends it within a tick.
    ///
    /// Also registers a waker that shuts the main socket both ways: it runs
    /// after the error-frame waker (registered before the handshake), so
    /// the frame is queued first, and it releases a main-channel write
    /// blocked on a peer that stopped reading.
    func startWatchdog(main: Socket) {
        latch.onFailure { main.shutdown() }
        let counters = counters, progress = progress
        var deadline: ProgressWatchdog.Deadline?
        if let g = sourceGuest, let t = config.policy.timeout {
            deadline = ProgressWatchdog.Deadline(at: Monotonic.now + t) {
                guard g.isRunning else { return nil }
                let round = progress.round.load(ordering: .relaxed)
                return MigrationError(
                    .timeout,
                    "did not converge within \(t) s (round \(round) still running); the guest dirties pages faster than they can be sent: "
                        + "try --auto-converge, a higher --max-bandwidth or a longer --downtime-limit")
            }
        }
        let guest = sourceGuest
        watchdog.start(
            latch: latch, deadline: deadline,
            fault: { guest?.diedBeforeHandOver() },
            waitingLocally: { guest?.awaitsPauseAcknowledgement ?? false },
            progress: { counters.read(counters.multifdBytes) &+ counters.read(counters.mainBytes) })
    }

    // MARK: - live precopy

    private func migrateLive(
        _ g: SourceGuest, ctl: ControlChannel, multifd: MultiFDSend, table: PageTable,
        replies: DestinationReplies, preempt: PreemptChannel?, stats: inout MigrationStats
    ) throws(MigrationError) {
        let policy = config.policy
        var judge = ConvergenceJudge(policy: policy)
        var autoConverge = AutoConverge(initial: policy.throttleInitial, increment: policy.throttleIncrement)
        let pageSize = ram.block.pageSize
        let precopyStart = Monotonic.now
        var round = 0
        var expected = 0.0
        // Round 1 sends all of RAM: every page starts dirty (the bits the
        // guest set before we attached are included). With kernel tracking
        // the first sync write-protects every page, so that the writes made
        // from here on show in the next one.
        g.bitmap.markAll()
        try g.syncDirtyLog()
        while true {
            round += 1
            progress.round.store(UInt64(round), ordering: .relaxed)
            let t0 = Monotonic.now
            let bytes0 = counters.read(counters.multifdBytes)
            if round == 2 { TestHook.stop(at: "round2", ifRequested: config.testStopAt) }
            // With postcopy, the switch cuts the round in progress: at
            // once on SIGUSR1 (QEMU's migrate-start-postcopy), and before
            // round 1's first page with --postcopy-after-rounds 0.
            let switchNow: (() -> Bool)? =
                preempt == nil
                ? nil
                : { [self] in
                    postcopyRequested.load(ordering: .relaxed) || config.postcopyAfterRounds == 0
                }
            let (pages, cut) = try sendRound(
                g.bitmap, through: multifd, limit: policy.maxBandwidth, stopAfterFirstJob: round == 1 ? "round1" : nil,
                cutWhen: switchNow)
            try ctl.send(.endOfRound(round: UInt64(round)))
            let seconds = Monotonic.now - t0
            let bytes = counters.read(counters.multifdBytes) - bytes0
            try g.syncDirtyLog()
            let dirty = UInt64(g.bitmap.dirtyCount())
            let remaining = dirty * pageSize
            let verdict = judge.decide(
                round: round, bytes: bytes, seconds: seconds, remaining: remaining, elapsed: Monotonic.now - precopyStart)
            // A round cut before it sent a page (the postcopy switch)
            // measured no bandwidth: it predicts nothing.
            expected = cut && pages == 0 ? .nan : verdict.expectedDowntime
            if policy.autoConverge, round >= 2, case .nextRound = verdict.decision,
                let p = autoConverge.afterRound(dirtiedBytes: remaining, sentBytes: bytes)
            {
                g.throttle(p)
            }
            var record = RoundRecord(
                round: round, start: t0 - precopyStart, duration: seconds, bytes: bytes, pages: UInt64(pages),
                remaining: remaining, bandwidth: judge.bandwidth, dirtyPagesRate: seconds > 0 ? Double(dirty) / seconds : 0,
                expectedDowntime: expected.isFinite ? expected : -1, throttle: g.throttlePercent)
            progress.remainingBytes.store(remaining, ordering: .relaxed)
            progress.dirtyPagesRate.store(UInt64(record.dirtyPagesRate), ordering: .relaxed)
            progress.throttle.store(g.throttlePercent, ordering: .relaxed)
            stats.ram.dirtyPagesRate = UInt64(record.dirtyPagesRate)
            // A cut round switches; a whole one unless precopy converged.
            let switchToPostcopy =
                cut
                || (verdict.decision != .switchover
                    && (round >= config.postcopyAfterRounds || postcopyRequested.load(ordering: .relaxed)))
            if let preempt, switchToPostcopy {
                record.decision = "postcopy"
                onRound?(record)
                return try migratePostcopy(
                    g, ctl: ctl, multifd: multifd, table: table, replies: replies, preempt: preempt, round: round,
                    expected: expected, precopyStart: precopyStart, stats: &stats)
            }
            switch verdict.decision {
            case .nextRound:
                record.decision = "next-round"
                onRound?(record)
                continue
            case .switchover:
                record.decision = "switchover"
                onRound?(record)
            case .giveUp(let why):
                record.decision = "give-up"
                onRound?(record)
                throw MigrationError(
                    .timeout,
                    "\(why); the guest dirties pages faster than they can be sent: try --auto-converge, a higher --max-bandwidth or a longer --downtime-limit"
                )
            }
            break
        }

        // Switchover: downtime runs from the pause request to the
        // destination's `committed`; the deadline bounds the part up to its
        // `completed` (docs/PROTOCOL.md §7).
        let precopyBytes = counters.read(counters.multifdBytes) + counters.read(counters.mainBytes)
        let pauseStart = try beginSwitchover(g)
        TestHook.stop(at: "switchover", ifRequested: config.testStopAt)
        // Paused: every write is in the page tables; the last sync.
        try g.syncDirtyLog()
        round += 1
        try sendRound(g.bitmap, through: multifd, limit: nil)
        try ctl.send(.endOfRound(round: UInt64(round)))
        let state = try g.pausedState()
        try ctl.send(.guestState(state))
        try ctl.send(.complete(summary(rounds: UInt64(round), guestStateBytes: UInt64(state.count), table: table)))
        try awaitReply(replies.prepared)
        TestHook.stop(at: "handover", ifRequested: config.testStopAt)
        // The point of no return: stop this copy for good, then let the
        // destination take the guest. The deadline cannot fire in between
        // (both go through `switchover`'s lock), and a guest that left the
        // pause is not handed over.
        // Nor is it handed to a destination that already hung up, or for a
        // guest that died: nobody could run it then, and here it resumes.
        try g.handOver {
            guard ctl.socket.peerHungUp() else { return nil }
            return MigrationError(
                .peer, "the destination closed the main channel after it was prepared, before the hand-over; the guest was not handed over")
        }
        try ctl.send(.commit)
        TestHook.stop(at: "commit", ifRequested: config.testStopAt)
        try awaitCommitted(replies)
        let downtime = Monotonic.now - pauseStart
        // The destination committed: the guest lives there.
        g.markMigrated()

        stats.downtime = UInt64(downtime * 1000)
        stats.expectedDowntime = expected.isFinite ? UInt64(expected * 1000) : nil
        stats.cpuThrottlePercentage = Int(g.throttlePercent)
        stats.ram.dirtySyncCount = UInt64(round)
        stats.ram.precopyBytes = precopyBytes
        stats.ram.downtimeBytes = counters.read(counters.multifdBytes) + counters.read(counters.mainBytes) - precopyBytes
    }

    /// Pauses the guest for the switchover, under the switchover deadline
    /// (armed first: it bounds the pause too). Returns when it began.
    private func beginSwitchover(_ g: SourceGuest) throws(MigrationError) -> Double {
        let pauseStart = Monotonic.now
        let limit = config.switchoverDeadline
        switchover.begin()
        watchdog.arm(
            ProgressWatchdog.Deadline(at: pauseStart + limit) { [switchover] in
                guard switchover.expire() else { return nil }
                return MigrationError(
                    .timeout,
                    "the switchover did not complete within its deadline of \(formatSeconds(limit)) s (the destination did not confirm "
                        + "that it holds every page and the state); the guest resumes on the source. Raise --switchover-timeout or "
                        + "--downtime-limit, or check the destination")
            })
        try g.pause()
        if let hold = config.testHoldPause { usleep(UInt32(hold * 1e6)) }
        return pauseStart
    }

    // MARK: - postcopy

    /// The postcopy switch and phase (docs/PROTOCOL.md §8): pause, take
    /// every page still dirty as *unsent*, tell the destination they are
    /// stale, send the guest state, and once it is ready hand the guest
    /// over and commit: the point of no return. Then the request server
    /// answers page requests on the preempt channel while this thread
    /// pushes the rest of *unsent* on the multifd channels, from the last
    /// requested page on; SYNC everywhere, `complete`, `completed`.
    private func migratePostcopy(
        _ g: SourceGuest, ctl: ControlChannel, multifd: MultiFDSend, table: PageTable, replies: DestinationReplies,
        preempt: PreemptChannel, round: Int, expected: Double, precopyStart: Double, stats: inout MigrationStats
    ) throws(MigrationError) {
        let precopyBytes = counters.read(counters.multifdBytes) + counters.read(counters.mainBytes)
        // Before the pause, while the guest still runs: the pages dirtied
        // since their last copy are stale at the destination already, so
        // it drops them now, outside the downtime (dropping a page costs
        // about as much as copying it). Their bits stay set: the final
        // harvest takes them again, and dropping a hole is cheap. (The
        // round that just ended synced the dirty log.)
        var discarded = try sendDiscards(of: g.bitmap, ctl: ctl)
        try replies.awaitDiscarded(discarded, latch: latch)
        // The request server runs (real-time, blocked on the preempt
        // channel) before the destination can commit: its guest faults from
        // its first instruction, while this side may take milliseconds to
        // read `committed` (traced: 2.5 ms faults on a server started after
        // it). Nothing asks before the commit; a failure before it shuts
        // the socket, and the thread ends (`migrate`'s cleanup joins it).
        preempt.source.start()
        let pauseStart = try beginSwitchover(g)
        TestHook.stop(at: "switchover", ifRequested: config.testStopAt)
        // The guest is paused (every thread acknowledged, acquire): its
        // bitmap is final. Whatever is dirty is stale at the destination.
        let unsent = preempt.unsent
        try g.syncDirtyLog()
        g.bitmap.harvestAll { unsent.mark(page: $0) }
        let lacking = UInt64(unsent.dirtyCount())
        discarded += try sendDiscards(of: unsent, ctl: ctl)
        let state = try g.pausedState()
        try ctl.send(.guestState(state))
        try ctl.send(.postcopyStart(rounds: UInt64(round), discardedPages: discarded))
        try awaitReply(replies.postcopyReady)
        TestHook.stop(at: "handover", ifRequested: config.testStopAt)
        try g.handOver {
            guard ctl.socket.peerHungUp() else { return nil }
            return MigrationError(
                .peer,
                "the destination closed the main channel after it was ready for postcopy, before the hand-over; the guest was not handed over"
            )
        }
        try ctl.send(.commit)
        TestHook.stop(at: "commit", ifRequested: config.testStopAt)
        try awaitCommitted(replies)
        let downtime = Monotonic.now - pauseStart
        let switchBytes = counters.read(counters.multifdBytes)
        let postcopyStart = Monotonic.now
        stats.downtime = UInt64(downtime * 1000)
        stats.expectedDowntime = expected.isFinite ? UInt64(expected * 1000) : nil
        stats.cpuThrottlePercentage = Int(g.throttlePercent)
        stats.ram.dirtySyncCount = UInt64(round + 1)
        stats.ram.precopyBytes = precopyBytes
        resumePoint.withLock {
            $0 = SourceResumePoint(
                guest: g, round: round, stateBytes: UInt64(state.count), table: table, stats: stats, switchBytes: switchBytes,
                precopyStart: precopyStart, postcopyStart: postcopyStart, lacking: lacking, sources: [preempt.source])
        }
        // Release: pairs with the failure path's acquire load.
        phase.store(.postcopyActive, ordering: .releasing)
        progress.postcopy.store(true, ordering: .relaxed)
        onRound?(
            RoundRecord(
                round: round + 1, start: pauseStart - precopyStart, duration: postcopyStart - pauseStart, bytes: 0, pages: 0,
                remaining: lacking * ram.block.pageSize, bandwidth: 0, dirtyPagesRate: 0, expectedDowntime: -1,
                throttle: g.throttlePercent, decision: "postcopy-active"))
        TestHook.stop(at: "postcopy", ifRequested: config.testStopAt)
        try pushUnsent(unsent, through: multifd, source: preempt.source)
        try endPostcopy(multifd, source: preempt.source, ctl: ctl, round: round + 1)
        try ctl.send(.complete(summary(rounds: UInt64(round + 1), guestStateBytes: UInt64(state.count), table: table)))
        completeSent.store(true, ordering: .relaxed)
        try awaitReply(replies.prepared)
        stats = completePostcopy(resumePoint.withLock { $0 }!)
    }

    /// After the destination's `completed` in the postcopy phase: the
    /// migration is done, the source guest stops for good; the statistics.
    func completePostcopy(_ point: SourceResumePoint) -> MigrationStats {
        phase.store(.completed, ordering: .releasing)
        point.guest.markMigrated()
        let pushed = counters.read(counters.multifdBytes) - point.switchBytes + preemptCounters.read(preemptCounters.multifdBytes)
        onRound?(
            RoundRecord(
                round: point.round + 1, start: point.postcopyStart - point.precopyStart, duration: Monotonic.now - point.postcopyStart,
                bytes: pushed, pages: point.lacking, remaining: 0, bandwidth: 0, dirtyPagesRate: 0, expectedDowntime: -1,
                throttle: point.guest.throttlePercent, decision: "postcopy-completed"))
        var stats = point.stats
        stats.status = .completed
        var p = PostcopyStats()
        p.requests = point.sources.reduce(0) { $0 + $1.served.load(ordering: .relaxed) }
        p.postcopyBytes = pushed
        p.recoveries = UInt64(point.sources.count - 1)
        stats.postcopy = p
        return stats
    }

    /// Sends `postcopy-discard` for every page marked in `bitmap` (read
    /// only), in ranges of adjacent pages. Returns the pages named.
    /// Most ranges one run of adjacent pages splits into at block ends (the
    /// layout holds at most 1024 blocks):
    /// a message is sent before it could overflow.
    static let maxBlocksCrossed = 1024

    private func sendDiscards(of bitmap: DirtyBitmap, ctl: ControlChannel) throws(MigrationError) -> UInt64 {
        let pageCount = ram.block.pageCount, numbering = PageNumbering(ram)
        var ranges: [PageRange] = []
        var discarded: UInt64 = 0
        var page = 0
        while let w = bitmap.nextDirtyWord(from: page >> 6) {
            page = max(page, w << 6)
            while page < pageCount, !bitmap.isDirty(page: page) { page += 1 }
            guard page < pageCount else { break }
            var end = page + 1
            while end < pageCount, bitmap.isDirty(page: end) { end += 1 }
            ranges += numbering.wireRanges(first: page, end: end)
            discarded += UInt64(end - page)
            if ranges.count >= MainMessage.maxDiscardRanges - Self.maxBlocksCrossed {
                try ctl.send(.postcopyDiscard(ranges))
                ranges.removeAll(keepingCapacity: true)
            }
            page = end
        }
        if !ranges.isEmpty { try ctl.send(.postcopyDiscard(ranges)) }
        return discarded
    }

    /// The end of the postcopy round, once every unsent page was handed
    /// to the senders (docs/PROTOCOL.md §8.5): SYNC on every multifd
    /// channel, `end-of-round`, then the preempt channel's SYNC after the
    /// destination's `multifd-drained`; requests are answered until then.
    func endPostcopy(_ multifd: MultiFDSend, source: PostcopySource, ctl: ControlChannel, round: Int) throws(MigrationError) {
        try multifd.sync()
        try ctl.send(.endOfRound(round: UInt64(round)))
        try source.finishWhenDrained()
    }

    /// The background pusher: sends every page of `unsent` on the multifd
    /// channels, walking the bitmap from where the last page request
    /// pointed (wrapping around), until no page is left. With requests
    /// queued for it (`--no-preempt`) it sends those first.
    func pushUnsent(_ unsent: DirtyBitmap, through multifd: MultiFDSend, source: PostcopySource) throws(MigrationError) {
        // The destination guest waits for every page not moved yet: the
        // pusher and the senders outrank other work on a busy host.
        config.faultPathPriority.applyToTransfer()
        multifd.raiseForPostcopy(config.faultPathPriority)
        var pages = MultiFDPages()
        let pageSize = ram.block.pageSize
        let limiter = config.policy.maxBandwidth.map { RateLimiter(bytesPerSecond: $0, counters: counters, watchdog: watchdog) }
        var blocks = BlockCursor(ram)
        func add(_ page: Int) throws(MigrationError) {
            let block = blocks.block(ofPage: page)
            if !pages.accepts(block: block) {
                limiter?.wait()
                try multifd.send(&pages)
            }
            pages.append(offset: UInt64(page) &* pageSize, block: block)
        }
        var word = 0
        while true {
            try latch.check()
            for r in source.takeQueued() {
                for p in r.first..<(r.first + r.count) { try add(Int(p)) }
            }
            let c = source.cursor.exchange(-1, ordering: .relaxed)
            if c >= 0 {
                // Go on next to the request: flush what is batched first.
                if !pages.isEmpty { try multifd.send(&pages) }
                word = c >> 6
            }
            if word >= unsent.wordCount { word = 0 }
            progress.postcopyRequests.store(source.served.load(ordering: .relaxed), ordering: .relaxed)
            guard let i = unsent.nextDirtyWord(from: word) ?? unsent.nextDirtyWord(from: 0) else { break }
            var bits = unsent.harvest(word: i)
            while bits != 0 {
                try add(i << 6 | bits.trailingZeroBitCount)
                bits &= bits &- 1
            }
            word = i + 1
        }
        if !pages.isEmpty { try multifd.send(&pages) }
    }

    // MARK: - rounds

    /// One round: harvest every dirty word, batch the pages, hand the
    /// batches out (at most `limit` bytes/s), then the SYNC barrier.
    /// Returns the pages harvested and whether the round was cut.
    /// `stopAfterFirstJob` names a test
    /// point (`TestHook`) reached once the first job was handed out.
    ///
    /// `cutWhen` ends the round early (the postcopy switch, QEMU's
    /// migrate-start-postcopy): asked before the first page and before each
    /// full batch goes out. A cut round sends what it batched and the SYNC
    /// barrier as usual; the pages it did not harvest keep their bits, so
    /// the bitmap still names every page the destination lacks or holds
    /// stale.
    @discardableResult
    func sendRound(
        _ bitmap: DirtyBitmap, through multifd: MultiFDSend, limit: Double?, stopAfterFirstJob: String? = nil,
        cutWhen: (() -> Bool)? = nil
    ) throws(MigrationError) -> (pages: Int, cut: Bool) {
        struct RoundCut: Error {}
        var pages = MultiFDPages()
        let pageSize = ram.block.pageSize
        let limiter = limit.map { RateLimiter(bytesPerSecond: $0, counters: counters, watchdog: watchdog) }
        var count = 0
        var cut = false
        var blocks = BlockCursor(ram)
        do {
            if let cutWhen, cutWhen() { throw RoundCut() }
            try bitmap.harvestAll { page in
                let block = blocks.block(ofPage: page)
                // A batch holds pages of one block: a full one, or one of
                // the block before, goes out first.
                if !pages.accepts(block: block) {
                    // The page in hand goes back to the bitmap with the
                    // rest of its word (harvestAll restores them).
                    if let cutWhen, cutWhen() { throw RoundCut() }
                    limiter?.wait()
                    try multifd.send(&pages)
                    if count == MultiFDPages.capacity * batchesPerJob, let point = stopAfterFirstJob {
                        TestHook.stop(at: point, ifRequested: config.testStopAt)
                    }
                }
                pages.append(offset: UInt64(page) &* pageSize, block: block)
                count += 1
            }
        } catch is RoundCut {
            cut = true
        } catch {
            throw MigrationError(converting: error)
        }
        if !pages.isEmpty { try multifd.send(&pages) }
        try multifd.sync()
        return (count, cut)
    }

    /// What `complete` states. Called after the last round's SYNC barrier,
    /// which orders every sender's table entries before the digest.
    func summary(rounds: UInt64, guestStateBytes: UInt64, table: PageTable) -> CompletionSummary {
        CompletionSummary(
            rounds: rounds, normalPages: counters.read(counters.normalPages), zeroPages: counters.read(counters.zeroPages),
            packets: counters.read(counters.packets), guestStateBytes: guestStateBytes, pageDigest: table.digest())
    }

    /// Waits for a reply of the destination: the reader posts it when the
    /// reply arrives, and a failure posts it too (then the latch says why).
    func awaitReply(_ reply: DispatchSemaphore) throws(MigrationError) {
        reply.wait()
        try latch.check()
    }

    /// Waits for `committed`. Once the destination committed, it holds the
    /// guest: a failure racing in now (a late SIGINT) must not fail us.
    private func awaitCommitted(_ replies: DestinationReplies) throws(MigrationError) {
        replies.committed.wait()
        // Acquire: pairs with the store-release in `readDestination`.
        if confirmed.load(ordering: .acquiring) { return }
        try latch.check()
        throw MigrationError(.peer, "the destination did not confirm the commit")
    }

    // MARK: - setup

    func connect() throws(MigrationError) -> Socket {
        do {
            let s = try Socket.connect(to: config.address, timeout: config.connectTimeout)
            try s.setPeerTimeout(config.peerTimeout)
            return s
        } catch {
            throw MigrationError(error)
        }
    }

    /// The hello exchange of one channel (`ChannelHandshake`), under the
    /// handshake deadline. Returns the channel's keys (nil without a key).
    /// `timeout` bounds the replies (default `config.handshakeTimeout`).
    func openChannel(_ socket: Socket, kind: ChannelHello.Kind, id: Int, session: SessionID, recover: Bool = false, timeout: Double? = nil)
        throws(MigrationError) -> ChannelKeys?
    {
        var flags: ChannelHello.Flags = []
        if kind == .main, guest != nil { flags.insert(.guestState) }
        if kind == .main, guest != nil, config.postcopy { flags.insert(.postcopy) }
        if kind == .main, recover { flags.insert(.recover) }
        if config.trust.key != nil { flags.insert(.authenticated) }
        if config.trust.encrypt { flags.insert(.encrypted) }
        let hello = ChannelHello(
            session: session, kind: kind, channelID: UInt16(id), channelCount: UInt16(config.channels), flags: flags,
            compression: kind == .main ? config.compression.method : .none, nonce: randomBytes(ChannelHello.nonceSize))
        socket.setReceiveTimeout(timeout ?? config.handshakeTimeout)
        defer { socket.setReceiveTimeout(nil) }
        return try ChannelHandshake.open(socket, hello: hello, trust: config.trust, counters: counters)
    }

    /// Opens the preempt channel (id N, after the multifd channels) and
    /// builds the request server on it: its own sender (one batch per
    /// job, plain sendmsg: a request is small and wants no ring's
    /// batching), its own counters, the shared page table.
    func openPreempt(session: SessionID, table: PageTable) throws(MigrationError) -> PreemptChannel {
        let s = try connect()
        latch.onFailure { [s] in s.shutdown() }
        let keys = try openChannel(s, kind: .preempt, id: config.channels, session: session)
        // Pages it sends must leave at once, not in pacing slots.
        s.preferUnpacedCongestionControl()
        let (writer, _) = makeStreamWriter(for: s, useRing: false, zeroCopy: false)
        let sender = try PacketSender(
            channelID: config.channels, ram: ram, writer: writer, counters: preemptCounters, table: table,
            sealer: keys.map { PacketSealer(key: $0.toDestination, encrypts: config.trust.encrypt) }, jobCapacity: 1,
            compression: config.compression)
        let unsent = DirtyBitmap(pageCount: ram.block.pageCount)
        let source = PostcopySource(
            unsent: unsent, sender: sender, requests: ControlChannel(socket: s, keys: keys, isSource: true), latch: latch,
            answersOnPreempt: config.postcopyPreempt, pageSize: ram.block.pageSize, numbering: PageNumbering(ram),
            priority: FaultPathScheduling(config.faultPathPriority, notice: config.onNotice ?? { _ in }),
            wholeWindows: config.policy.maxBandwidth == nil)
        return PreemptChannel(socket: s, unsent: unsent, source: source)
    }

    /// After the main channel's hello: its acceptance, then the RAM layout's.
    private func handshake(_ ctl: ControlChannel) throws(MigrationError) {
        ctl.socket.setReceiveTimeout(config.handshakeTimeout)
        try expect(.helloAccepted, on: ctl, while: "waiting for the destination to accept the hello")
        try ctl.send(.ramLayout(ram.blocks.map { RAMBlockLayout(name: $0.name, size: $0.size, pageSize: $0.pageSize) }))
        try expect(.layoutAccepted, on: ctl, while: "waiting for the destination to accept the RAM layout")
        ctl.socket.setReceiveTimeout(nil)
    }

    func expect(_ wanted: MainMessage, on ctl: ControlChannel, while what: String) throws(MigrationError) {
        let m = try ctl.receive(what)
        if m == wanted { return }
        if case .error(let text) = m { throw MigrationError(.peer, "destination refused: \(text)") }
        throw MigrationError(.protocolViolation, "\(what): got '\(m.name)' instead of '\(wanted.name)'")
    }

    /// Batches per job: what `MultiFDSend` stages and what each
    /// `PacketSender` sizes its buffers (prefixes, staging slots, frames)
    /// for, and so how much one gather write sends.
    ///
    /// Four (2 MiB per write) without a key; one with a key. A sender
    /// stages a job's batches by pread, hashes them, seals each, then
    /// writes the job: with a key, sealing reads every batch once more
    /// (GMAC), and `--encrypt` writes each into a fresh AEAD output that
    /// swift-crypto copies once again, so four batches touch 4-6 MiB
    /// before the write, more than a core's 2 MiB L2, and the kernel's
    /// copy into the socket reads them back from L3. One batch per write
    /// keeps it hot from pread to sendmsg. Alternating runs, 1 GiB random,
    /// 2 channels, TCP, warm, send's wall time, medians of 6: `--psk-file`
    /// 0.47 -> 0.40 s, `--encrypt` 0.67 -> 0.54 s; without a key the two
    /// were alike (0.35 and 0.33 s), so it keeps the size it was tuned at.
    var batchesPerJob: Int { config.trust.key == nil ? MultiFDJob.defaultCapacity : 1 }

    func makeTransports(_ sockets: [Socket], sealers: [PacketSealer?], table: PageTable) throws(MigrationError) -> [PacketSender] {
        var transports: [PacketSender] = []
        for (id, s) in sockets.enumerated() {
            let (writer, warning) = makeStreamWriter(for: s, useRing: config.useRing, zeroCopy: config.zeroCopy)
            if let w = warning, id == 0 { warnings.withLock { $0.append(w) } }
            transports.append(
                try PacketSender(
                    channelID: id, ram: ram, writer: writer, counters: counters, table: table, sealer: sealers[id],
                    jobCapacity: batchesPerJob, compression: config.compression))
        }
        return transports
    }

    /// The main channel's reader thread: the only replies after the
    /// handshake are `completed` (prepared), then `committed`, and `error`;
    /// with postcopy `postcopy-ready`, `committed`, then `completed`.
    /// A recovery's reader (`resumed`) starts past `committed`: only
    /// `completed` comes.
    func readDestination(_ ctl: ControlChannel, replies: DestinationReplies, resumed: Bool = false) {
        do {
            var prepared = false, ready = resumed, committed = resumed
            while true {
                let m = try ctl.receive(prepared ? "waiting for the destination to commit" : "waiting for the destination")
                switch m {
                case .postcopyDiscarded(let pages) where !ready && !prepared:
                    replies.discarded(pages)
                case .postcopyReady where !ready && !prepared:
                    ready = true
                    replies.postcopyReady.signal()
                case .completed where !prepared && ready == committed:
                    prepared = true
                    replies.prepared.signal()
                    if committed { return }
                case .committed where (prepared || ready) && !committed:
                    committed = true
                    // Release: pairs with the acquiring load in `awaitCommitted`.
                    confirmed.store(true, ordering: .releasing)
                    replies.committed.signal()
                    if prepared { return }
                case .error(let text):
                    latch.fail(MigrationError(.peer, "destination failed: \(text)"))
                    return
                default:
                    latch.fail(MigrationError(.protocolViolation, "destination sent '\(m.name)' during the transfer"))
                    return
                }
            }
        } catch {
            if error.kind == .peer {
                latch.failDeferringToPeer(
                    MigrationError(.peer, "the destination closed the main channel before confirming completion (did it exit?)"))
            } else {
                latch.fail(error)
            }
        }
    }

    func finishStats(_ s: inout MigrationStats, start: Double) {
        s.fillTransfer(counters, block: ram.block, channels: config.channels, elapsed: Monotonic.now - start)
        s.ram.remaining = 0
    }
}

/// Keeps the byte rate of the multifd channels under a limit by making the
/// migration thread wait before handing out a batch.
struct RateLimiter {
    let bytesPerSecond: Double
    let counters: TransferCounters
    /// Held while we sleep: the silence is ours, not the peer's.
    let watchdog: ProgressWatchdog?
    let start = Monotonic.now
    let startBytes: UInt64

    init(bytesPerSecond: Double, counters: TransferCounters, watchdog: ProgressWatchdog? = nil) {
        self.bytesPerSecond = bytesPerSecond
        self.counters = counters
        self.watchdog = watchdog
        startBytes = counters.read(counters.multifdBytes)
    }

    func wait() {
        let sent = Double(counters.read(counters.multifdBytes) - startBytes)
        let due = start + sent / bytesPerSecond
        let now = Monotonic.now
        guard due > now else { return }
        watchdog?.hold()
        usleep(UInt32(min(1.0, due - now) * 1e6))
        watchdog?.release()
    }
}

/// The destination's two replies at the end, as the reader thread sees
/// them; a failure posts both so no waiter is left behind.
final class DestinationReplies: Sendable {
    /// `completed`: the destination holds and checked every page and the state.
    let prepared = DispatchSemaphore(value: 0)
    /// `committed`: the destination took the guest.
    let committed = DispatchSemaphore(value: 0)
    /// `postcopy-ready`: the destination dropped the stale pages and
    /// stored the state; it waits for `commit` to start the guest.
    let postcopyReady = DispatchSemaphore(value: 0)

    /// The pages the destination reported dropped (`postcopy-discarded`).
    private let dropped = Atomic<UInt64>(0)
    private let droppedPosted = DispatchSemaphore(value: 0)

    func wakeAll() {
        prepared.signal()
        committed.signal()
        postcopyReady.signal()
        droppedPosted.signal()
    }

    /// The reader: the destination dropped `pages` so far.
    func discarded(_ pages: UInt64) {
        dropped.store(pages, ordering: .relaxed)
        droppedPosted.signal()
    }

    /// Waits until the destination reported `pages` dropped (or a failure).
    func awaitDiscarded(_ pages: UInt64, latch: FailureLatch) throws(MigrationError) {
        while dropped.load(ordering: .relaxed) < pages {
            droppedPosted.wait()
            try latch.check()
        }
    }
}

/// The source's preempt channel: its socket, the pages the destination
/// lacks once postcopy began, and the request server.
struct PreemptChannel: Sendable {
    let socket: Socket
    let unsent: DirtyBitmap
    let source: PostcopySource
}
