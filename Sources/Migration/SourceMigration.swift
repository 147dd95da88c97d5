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
/// guest, one thread renews the control lease. The RAM is mapped read-only.
public final class SourceMigration: Sendable {
    public let ram: RAMFile
    public let guest: GuestControl?
    public let config: SourceConfig
    public let counters = TransferCounters()
    public let progress = LiveProgress()
    public let latch = FailureLatch()
    /// Fails the migration when the destination stops moving bytes, or a
    /// live precopy overruns `policy.timeout` mid-round. Whoever begins
    /// switchover calls `watchdog.disarmDeadline()` first.
    public let watchdog: ProgressWatchdog
    /// Messages for the user (fallbacks taken), read after `run()`.
    public let warnings = Mutex<[String]>([])
    private let onRound: (@Sendable (RoundRecord) -> Void)?
    /// Set by the main-channel reader when the destination committed.
    private let confirmed = Atomic<Bool>(false)
    /// The point of no return (live migration).
    private let switchover = Switchover()
    /// The guest process ran when the migration began (`checkGuest`): if
    /// it dies before the hand-over, the migration fails. A guest that had
    /// already stopped is migrated as it lies.
    private let guestWasRunning = Atomic<Bool>(false)

    public init(ram: RAMFile, config: SourceConfig, guest: GuestControl? = nil, onRound: (@Sendable (RoundRecord) -> Void)? = nil) {
        self.ram = ram
        self.config = config
        self.guest = guest
        self.onRound = onRound
        watchdog = ProgressWatchdog(peerTimeout: config.peerTimeout)
    }

    /// Stops the migration from any thread (a signal handler's queue).
    public func cancel(_ reason: String) {
        latch.fail(MigrationError(.cancelled, reason))
    }

    /// Runs the migration to completion. Throws the first failure of any
    /// thread; every thread has ended by the time this returns or throws.
    public func run() throws(MigrationError) -> MigrationStats {
        let start = Monotonic.now
        var control: ControlChannel?
        var sockets: [Socket] = []
        var pool: MultiFDSend?
        var reader: WorkerThread?
        let lease = guest.map { LeaseKeeper(control: $0) }
        // Set once `checkGuest` accepted the guest: only then may a failure
        // touch its run state and throttle.
        var ownsGuest = false
        defer {
            pool?.finish()
            for s in sockets { s.shutdown() }
            control?.socket.shutdown()
            reader?.join()
            lease?.stop()
        }
        do throws(MigrationError) {
            if let g = guest {
                try checkGuest(g)
                ownsGuest = true
            }
            let session = SessionID.random()
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
                sealers.append(keys.map { PacketSealer(key: $0.toDestination, encrypts: config.trust.encrypt) })
            }
            let table = PageTable(pages: ram.block.pageCount)
            let transports = try makeTransports(sockets, sealers: sealers, table: table)

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

            let multifd = MultiFDSend(transports: transports, latch: latch, batchesPerJob: Self.batchesPerJob)
            pool = multifd
            // Read after the sender threads are joined (`finish`), which
            // orders their last writes to the transports before our reads.
            let zeroCopyReport = { [config] () -> (UInt64, UInt64)? in
                guard config.zeroCopy else { return nil }
                multifd.finish()
                let r = transports.map(\.zeroCopyReport)
                return (r.reduce(0) { $0 + $1.sends }, r.reduce(0) { $0 + $1.copied })
            }
            if let g = guest, let lease {
                try migrateLive(g, lease: lease, ctl: ctl, multifd: multifd, table: table, replies: replies, stats: &stats)
            } else {
                let bitmap = DirtyBitmap(pageCount: ram.block.pageCount)
                bitmap.markAll()
                _ = try sendRound(bitmap, through: multifd, limit: nil)
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
            // Once handed over, the destination may run the guest: never
            // resume this copy then (docs/PROTOCOL.md §7).
            if let g = guest, ownsGuest, !switchover.isHandedOver { restore(g) }
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
    private func startWatchdog(main: Socket) {
        latch.onFailure { main.shutdown() }
        let counters = counters, progress = progress
        var deadline: ProgressWatchdog.Deadline?
        if let g = guest, let t = config.policy.timeout {
            deadline = ProgressWatchdog.Deadline(at: Monotonic.now + t) {
                guard g.runState == .running else { return nil }
                let round = progress.round.load(ordering: .relaxed)
                return MigrationError(
                    .timeout,
                    "did not converge within \(t) s (round \(round) still running); the guest dirties pages faster than they can be sent: "
                        + "try --auto-converge, a higher --max-bandwidth or a longer --downtime-limit")
            }
        }
        let guest = guest
        watchdog.start(
            latch: latch, deadline: deadline,
            fault: { [self] in
                guard let g = guest, guestWasRunning.load(ordering: .relaxed) else { return nil }
                return switchover.unlessHandedOver { Self.guestDied(g) }
            },
            waitingLocally: { guest.map { $0.runState == .pauseRequested && $0.pausedThreads < $0.guestThreads } ?? false },
            progress: { counters.read(counters.multifdBytes) &+ counters.read(counters.mainBytes) })
    }

    // MARK: - live precopy

    private func migrateLive(
        _ g: GuestControl, lease: LeaseKeeper, ctl: ControlChannel, multifd: MultiFDSend, table: PageTable,
        replies: DestinationReplies, stats: inout MigrationStats
    ) throws(MigrationError) {
        let policy = config.policy
        var judge = ConvergenceJudge(policy: policy)
        var autoConverge = AutoConverge(initial: policy.throttleInitial, increment: policy.throttleIncrement)
        let pageSize = ram.block.pageSize
        let precopyStart = Monotonic.now
        var round = 0
        var expected = 0.0
        // Round 1 sends all of RAM: every page starts dirty (the bits the
        // guest set before we attached are included).
        g.bitmap.markAll()
        while true {
            round += 1
            progress.round.store(UInt64(round), ordering: .relaxed)
            let t0 = Monotonic.now
            let bytes0 = counters.read(counters.multifdBytes)
            if round == 2 { TestHook.stop(at: "round2", ifRequested: config.testStopAt) }
            let pages = try sendRound(
                g.bitmap, through: multifd, limit: policy.maxBandwidth, stopAfterFirstJob: round == 1 ? "round1" : nil)
            try ctl.send(.endOfRound(round: UInt64(round)))
            let seconds = Monotonic.now - t0
            let bytes = counters.read(counters.multifdBytes) - bytes0
            let dirty = UInt64(g.bitmap.dirtyCount())
            let remaining = dirty * pageSize
            let verdict = judge.decide(
                round: round, bytes: bytes, seconds: seconds, remaining: remaining, elapsed: Monotonic.now - precopyStart)
            expected = verdict.expectedDowntime
            if policy.autoConverge, round >= 2, case .nextRound = verdict.decision,
                let p = autoConverge.afterRound(dirtiedBytes: remaining, sentBytes: bytes)
            {
                // The lease also bounds the throttle: a guest whose source
                // vanished drops it (see StressGuest).
                g.renewLease()
                lease.start()
                g.throttlePercent = p
            }
            var record = RoundRecord(
                round: round, start: t0 - precopyStart, duration: seconds, bytes: bytes, pages: UInt64(pages),
                remaining: remaining, bandwidth: judge.bandwidth, dirtyPagesRate: seconds > 0 ? Double(dirty) / seconds : 0,
                expectedDowntime: expected.isFinite ? expected : -1, throttle: g.throttlePercent)
            progress.remainingBytes.store(remaining, ordering: .relaxed)
            progress.dirtyPagesRate.store(UInt64(record.dirtyPagesRate), ordering: .relaxed)
            progress.throttle.store(g.throttlePercent, ordering: .relaxed)
            stats.ram.dirtyPagesRate = UInt64(record.dirtyPagesRate)
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
        try pause(g, lease: lease)
        if let hold = config.testHoldPause { usleep(UInt32(hold * 1e6)) }
        TestHook.stop(at: "switchover", ifRequested: config.testStopAt)
        round += 1
        _ = try sendRound(g.bitmap, through: multifd, limit: nil)
        try ctl.send(.endOfRound(round: UInt64(round)))
        // Every guest thread acknowledged the pause (acquire), so the state
        // bytes are complete and stable.
        let state = g.readState()
        // The lease keeps the guest paused only while we renew it; if this
        // process stalled past it, the guest resumed and the copy is stale.
        guard g.runState == .pauseRequested else {
            throw MigrationError(.local, "the guest left the pause during switchover (lease expired); not completing")
        }
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
        var refusal: MigrationError?
        let handed = switchover.handOver {
            refusal = handOverRefusal(g, main: ctl.socket)
            return refusal == nil && g.exchangeRunState(from: .pauseRequested, to: .handedOver)
        }
        guard handed else {
            try latch.check()
            throw refusal ?? MigrationError(.local, "the guest left the pause during switchover (lease expired); not completing")
        }
        try ctl.send(.commit)
        TestHook.stop(at: "commit", ifRequested: config.testStopAt)
        try awaitCommitted(replies)
        let downtime = Monotonic.now - pauseStart
        // The destination committed: the guest lives there.
        g.setRunState(.migrated)
        g.sourcePID = 0
        lease.stop()

        stats.downtime = UInt64(downtime * 1000)
        stats.expectedDowntime = expected.isFinite ? UInt64(expected * 1000) : nil
        stats.cpuThrottlePercentage = Int(g.throttlePercent)
        stats.ram.dirtySyncCount = UInt64(round)
        stats.ram.precopyBytes = precopyBytes
        stats.ram.downtimeBytes = counters.read(counters.multifdBytes) + counters.read(counters.mainBytes) - precopyBytes
    }

    private func checkGuest(_ g: GuestControl) throws(MigrationError) {
        guard g.ramSize == ram.block.size, g.pageSize == ram.block.pageSize else {
            throw MigrationError(
                .mismatch,
                "control file \(g.path) is for \(g.ramSize) bytes of RAM but \(ram.path) is \(ram.block.size) bytes; give the guest's own control file"
            )
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
        g.sourcePID = getpid()
        let pid = g.guestPID
        guestWasRunning.store(pid > 0 && g.guestThreads > 0 && SystemCall.processExists(pid), ordering: .relaxed)
    }

    /// Asks the guest to pause and waits until every guest thread has
    /// acknowledged. A guest that ran when the migration began and whose
    /// process is gone fails it; one that had stopped before writes nothing.
    private func pause(_ g: GuestControl, lease: LeaseKeeper) throws(MigrationError) {
        g.renewLease()
        lease.start()
        g.setRunState(.pauseRequested)
        let deadline = Monotonic.now + config.pauseTimeout
        var spins = 0
        // Acquire (in `pausedThreads`): pairs with each guest thread's
        // acknowledgement, published after its last page, bit and state.
        while g.pausedThreads < g.guestThreads {
            try latch.check()
            if guestWasRunning.load(ordering: .relaxed) {
                if let died = Self.guestDied(g) { throw died }
            } else if g.guestPID > 0, !SystemCall.processExists(g.guestPID) {
                break
            }
            if Monotonic.now > deadline {
                throw MigrationError(.timeout, "the guest did not acknowledge the pause within \(config.pauseTimeout) s")
            }
            spins += 1
            if spins > 100 { usleep(50) }
        }
    }

    /// The failure for a guest process that is gone, or nil while it lives.
    /// Its last state may be mid-write, and it is nobody's to run: the
    /// migration must not hand it to the destination.
    static func guestDied(_ g: GuestControl) -> MigrationError? {
        let pid = g.guestPID
        guard pid > 0, !SystemCall.processExists(pid) else { return nil }
        return MigrationError(.local, "the guest process (pid \(pid)) died; nothing was started on the destination")
    }

    /// Why the guest must not be handed over now, or nil: the migration
    /// failed meanwhile, the guest died, or the destination hung up (it
    /// could never commit, so the guest would be stopped on both sides).
    private func handOverRefusal(_ g: GuestControl, main: Socket) -> MigrationError? {
        if latch.hasFailed { return latch.error }
        if guestWasRunning.load(ordering: .relaxed), let died = Self.guestDied(g) { return died }
        if main.peerHungUp() {
            return MigrationError(
                .peer, "the destination closed the main channel after it was prepared, before the hand-over; the guest was not handed over")
        }
        return nil
    }

    /// Undoes what a failed migration did to the guest: throttle off, pause
    /// lifted. Its RAM was never written by us.
    private func restore(_ g: GuestControl) {
        g.throttlePercent = 0
        g.exchangeRunState(from: .pauseRequested, to: .running)
        g.sourcePID = 0
    }

    // MARK: - rounds

    /// One round: harvest every dirty word, batch the pages, hand the
    /// batches out (at most `limit` bytes/s), then the SYNC barrier.
    /// Returns the pages harvested. `stopAfterFirstJob` names a test
    /// point (`TestHook`) reached once the first job was handed out.
    func sendRound(_ bitmap: DirtyBitmap, through multifd: MultiFDSend, limit: Double?, stopAfterFirstJob: String? = nil)
        throws(MigrationError) -> Int
    {
        var pages = MultiFDPages()
        let pageSize = ram.block.pageSize
        let limiter = limit.map { RateLimiter(bytesPerSecond: $0, counters: counters, watchdog: watchdog) }
        var count = 0
        do {
            try bitmap.harvestAll { page in
                if pages.isFull {
                    limiter?.wait()
                    try multifd.send(&pages)
                    if count == MultiFDPages.capacity * Self.batchesPerJob, let point = stopAfterFirstJob {
                        TestHook.stop(at: point, ifRequested: config.testStopAt)
                    }
                }
                pages.append(offset: UInt64(page) &* pageSize, block: 0)
                count += 1
            }
        } catch {
            throw MigrationError(converting: error)
        }
        if !pages.isEmpty { try multifd.send(&pages) }
        try multifd.sync()
        return count
    }

    /// What `complete` states. Called after the last round's SYNC barrier,
    /// which orders every sender's table entries before the digest.
    private func summary(rounds: UInt64, guestStateBytes: UInt64, table: PageTable) -> CompletionSummary {
        CompletionSummary(
            rounds: rounds, normalPages: counters.read(counters.normalPages), zeroPages: counters.read(counters.zeroPages),
            packets: counters.read(counters.packets), guestStateBytes: guestStateBytes, pageDigest: table.digest())
    }

    /// Waits for a reply of the destination: the reader posts it when the
    /// reply arrives, and a failure posts it too (then the latch says why).
    private func awaitReply(_ reply: DispatchSemaphore) throws(MigrationError) {
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

    private func connect() throws(MigrationError) -> Socket {
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
    private func openChannel(_ socket: Socket, kind: ChannelHello.Kind, id: Int, session: SessionID) throws(MigrationError)
        -> ChannelKeys?
    {
        var flags: ChannelHello.Flags = []
        if kind == .main, guest != nil { flags.insert(.guestState) }
        if config.trust.key != nil { flags.insert(.authenticated) }
        if config.trust.encrypt { flags.insert(.encrypted) }
        let hello = ChannelHello(
            session: session, kind: kind, channelID: UInt16(id), channelCount: UInt16(config.channels), flags: flags,
            compression: kind == .main ? config.compression.method : .none, nonce: randomBytes(ChannelHello.nonceSize))
        socket.setReceiveTimeout(config.handshakeTimeout)
        defer { socket.setReceiveTimeout(nil) }
        return try ChannelHandshake.open(socket, hello: hello, trust: config.trust, counters: counters)
    }

    /// After the main channel's hello: its acceptance, then the RAM layout's.
    private func handshake(_ ctl: ControlChannel) throws(MigrationError) {
        ctl.socket.setReceiveTimeout(config.handshakeTimeout)
        try expect(.helloAccepted, on: ctl, while: "waiting for the destination to accept the hello")
        let block = ram.block
        try ctl.send(.ramLayout([RAMBlockLayout(name: block.name, size: block.size, pageSize: block.pageSize)]))
        try expect(.layoutAccepted, on: ctl, while: "waiting for the destination to accept the RAM layout")
        ctl.socket.setReceiveTimeout(nil)
    }

    private func expect(_ wanted: MainMessage, on ctl: ControlChannel, while what: String) throws(MigrationError) {
        let m = try ctl.receive(what)
        if m == wanted { return }
        if case .error(let text) = m { throw MigrationError(.peer, "destination refused: \(text)") }
        throw MigrationError(.protocolViolation, "\(what): got '\(m.name)' instead of '\(wanted.name)'")
    }

    /// Batches per job: what `MultiFDSend` stages and what each
    /// `PacketSender` sizes its buffers (prefixes, staging slots, frames) for.
    static let batchesPerJob = MultiFDJob.defaultCapacity

    private func makeTransports(_ sockets: [Socket], sealers: [PacketSealer?], table: PageTable) throws(MigrationError) -> [PacketSender] {
        var transports: [PacketSender] = []
        for (id, s) in sockets.enumerated() {
            let (writer, warning) = makeStreamWriter(for: s, useRing: config.useRing, zeroCopy: config.zeroCopy)
            if let w = warning, id == 0 { warnings.withLock { $0.append(w) } }
            transports.append(
                try PacketSender(
                    channelID: id, ram: ram, writer: writer, counters: counters, table: table, sealer: sealers[id],
                    jobCapacity: Self.batchesPerJob, compression: config.compression))
        }
        return transports
    }

    /// The main channel's reader thread: the only replies after the
    /// handshake are `completed` (prepared), then `committed`, and `error`.
    private func readDestination(_ ctl: ControlChannel, replies: DestinationReplies) {
        do {
            var prepared = false
            while true {
                let m = try ctl.receive(prepared ? "waiting for the destination to commit" : "waiting for the destination")
                switch m {
                case .completed where !prepared:
                    prepared = true
                    replies.prepared.signal()
                case .committed where prepared:
                    // Release: pairs with the acquiring load in `awaitCommitted`.
                    confirmed.store(true, ordering: .releasing)
                    replies.committed.signal()
                    return
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

    private func finishStats(_ s: inout MigrationStats, start: Double) {
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

/// Renews the guest's pause lease while a pause or throttle is in force, so
/// the guest resumes by itself only when this process is gone.
final class LeaseKeeper: Sendable {
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

/// The destination's two replies at the end, as the reader thread sees
/// them; a failure posts both so no waiter is left behind.
final class DestinationReplies: Sendable {
    /// `completed`: the destination holds and checked every page and the state.
    let prepared = DispatchSemaphore(value: 0)
    /// `committed`: the destination took the guest.
    let committed = DispatchSemaphore(value: 0)

    func wakeAll() {
        prepared.signal()
        committed.signal()
    }
}
