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

/// What a postcopy recovery resumes from on the source, set at the commit:
/// the handed-over guest, the rounds ended before postcopy, the state's
/// size, the page table (the digest of every page's last copy; the source
/// RAM no longer changes, so a page sent again hashes the same), the
/// statistics of the switch, and each connection set's request server.
struct SourceResumePoint: @unchecked Sendable {
    // @unchecked: the guest, table and servers are thread-safe classes;
    // the point itself lives under a Mutex.
    let guest: SourceGuest
    let round: Int
    let stateBytes: UInt64
    let table: PageTable
    let stats: MigrationStats
    let switchBytes: UInt64
    let precopyStart: Double
    let postcopyStart: Double
    let lacking: UInt64
    var sources: [PostcopySource]
}

/// Postcopy recovery, source side (docs/PROTOCOL.md §8.6).
///
/// When the connections break after the commit, this side is
/// *postcopy-paused*: every thread of the broken set has ended, the RAM
/// and the guest state are intact (the guest is handed over and never runs
/// here again by itself). It reconnects with back-off (0.2 s doubling to
/// 2 s) until `recoverTimeout` after the break: a main channel with the
/// hello flag `recover`, `postcopy-recover` naming the first session and
/// its rounds, then the destination's `postcopy-received` bitmap; every
/// page not in it is *unsent* again. New multifd and preempt channels,
/// the request server and the pusher as in §8.4, SYNC, `end-of-round`,
/// `complete`, `completed`.
///
/// A refusal that another try cannot change (the destination is not paused
/// in this migration, the layout differs) ends the attempts at once.
extension SourceMigration {
    func recoverPostcopy(after error: MigrationError, start: Double) throws(MigrationError) -> MigrationStats {
        var last = error
        var deadline = Monotonic.now + config.recoverTimeout
        var delay = 0.2
        while config.recoverTimeout > 0, !cancelled.load(ordering: .relaxed), Monotonic.now < deadline,
            let session = firstSession.withLock({ $0 }), resumePoint.withLock({ $0 }) != nil
        {
            config.onNotice?(
                "postcopy-paused: \(last.description); reconnecting (--recover-timeout, \(formatSeconds((max(0, deadline - Monotonic.now) * 10).rounded() / 10)) s left)"
            )
            var connected = false
            do throws(MigrationError) {
                var stats = try recoveryAttempt(session: session, deadline: deadline, connected: &connected)
                finishStats(&stats, start: start)
                return stats
            } catch {
                last = error
            }
            if connected {
                // The destination took us back, then it broke again.
                deadline = Monotonic.now + config.recoverTimeout
                delay = 0.2
            } else if [.mismatch, .protocolViolation, .integrity].contains(last.kind) {
                break
            }
            let pause = min(delay, max(0, deadline - Monotonic.now))
            usleep(UInt32(pause * 1e6))
            delay = min(delay * 2, 2)
        }
        let why =
            cancelled.load(ordering: .relaxed)
            ? "cancelled while paused"
            : config.recoverTimeout > 0
                ? "not recovered within --recover-timeout \(formatSeconds(config.recoverTimeout)) s"
                : "recovery is off (--recover-timeout 0)"
        // Every page and `complete` went out before the break: the
        // destination may have read them all and completed without us
        // hearing it (its `completed` was lost with the connection).
        let maybeDone =
            completeSent.load(ordering: .relaxed)
            ? " Every page and the completion were sent before the break: if receive reported the migration completed, the "
                + "guest is whole on the destination."
            : ""
        throw MigrationError(
            last.kind,
            "postcopy-paused: \(last.description); \(why). The guest runs on the destination, which lacks some of its pages; this "
                + "side keeps the complete guest as it was at the switch (RAM and state, run state handed over, not running). Do not "
                + "resume it here while the destination's guest runs.\(maybeDone)")
    }

    /// One reconnection, to completion or failure. `connected` turns true
    /// once the destination accepted the recovery.
    /// Its handshake replies must come before `deadline` (a stopped
    /// destination must not hold the attempt past the recover timeout).
    private func recoveryAttempt(session first: SessionID, deadline: Double, connected: inout Bool) throws(MigrationError)
        -> MigrationStats
    {
        let latch = freshLatch()
        guard let point = resumePoint.withLock({ $0 }) else { fatalError("recovery without a resume point") }
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
        }
        do throws(MigrationError) {
            let session = SessionID.random()
            let main = try connect()
            let replyTimeout = max(0.1, min(config.handshakeTimeout, deadline - Monotonic.now))
            let mainKeys = try openChannel(main, kind: .main, id: 0, session: session, recover: true, timeout: replyTimeout)
            let ctl = ControlChannel(socket: main, counters: counters, keys: mainKeys, isSource: true)
            control = ctl
            latch.onFailure { [latch] in
                if let e = latch.error, e.kind != .peer { ctl.sendErrorBestEffort(e) }
                main.shutdownReceive()
            }
            main.setReceiveTimeout(replyTimeout)
            try expect(.helloAccepted, on: ctl, while: "waiting for the destination to accept the recovery")
            try ctl.send(.postcopyRecover(session: first, rounds: UInt64(point.round)))
            let m = try ctl.receive("waiting for the destination's received pages")
            let pageCount = ram.block.pageCount
            guard case .postcopyReceived(let count, let words) = m, count == UInt64(pageCount) else {
                if case .error(let text) = m { throw MigrationError(.peer, "destination refused the recovery: \(text)") }
                throw MigrationError(.protocolViolation, "expected postcopy-received for \(pageCount) pages, got '\(m.name)'")
            }
            main.setReceiveTimeout(nil)
            connected = true

            var sealers: [PacketSealer?] = []
            for id in 0..<config.channels {
                let s = try connect()
                sockets.append(s)
                latch.onFailure { [s] in s.shutdown() }
                let keys = try openChannel(s, kind: .multifd, id: id, session: session)
                s.preferUnpacedCongestionControl()  // as in `migrate`: postcopy
                sealers.append(keys.map { PacketSealer(key: $0.toDestination, encrypts: config.trust.encrypt) })
            }
            let transports = try makeTransports(sockets, sealers: sealers, table: point.table)
            let channel = try openPreempt(session: session, table: point.table)
            preempt = channel
            resumePoint.withLock { $0?.sources.append(channel.source) }
            // Unsent again: every page the destination does not hold.
            var missing: UInt64 = 0
            for page in 0..<pageCount where words[page >> 6] & (1 << UInt64(page & 63)) == 0 {
                channel.unsent.mark(page: page)
                missing += 1
            }
            config.onNotice?(
                "postcopy recovering: the destination holds \(UInt64(pageCount) - missing) of \(pageCount) pages; sending \(missing)")

            let replies = DestinationReplies()
            latch.onFailure { replies.wakeAll() }
            reader = WorkerThread(name: "mig/src/main") { [self] in
                readDestination(ctl, replies: replies, resumed: true)
            }
            startWatchdog(main: main)
            defer { watchdog.stop() }
            let multifd = MultiFDSend(transports: transports, latch: latch, batchesPerJob: batchesPerJob)
            pool = multifd
            channel.source.start()
            try pushUnsent(channel.unsent, through: multifd, source: channel.source)
            try endPostcopy(multifd, source: channel.source, ctl: ctl, round: point.round + 1)
            try ctl.send(
                .complete(summary(rounds: UInt64(point.round + 1), guestStateBytes: point.stateBytes, table: point.table)))
            completeSent.store(true, ordering: .relaxed)
            try awaitReply(replies.prepared)
            return completePostcopy(resumePoint.withLock { $0 }!)
        } catch {
            latch.fail(error)
            throw latch.error ?? error
        }
    }
}
