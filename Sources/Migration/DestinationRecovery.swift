import GuestMemory
import MigrationWire
import OSCall
import Synchronization
import Trust
import URing
import WorkerThreads

/// Postcopy recovery, destination side (docs/PROTOCOL.md §8.6).
///
/// After the postcopy commit neither side holds the whole guest: the guest
/// runs here with pages missing, the source keeps the only copy of them.
/// When the connections break then, this side is *postcopy-paused*: the
/// guest runs on (threads that touch a missing page wait in the kernel),
/// every thread of the broken connections has ended, and the listener
/// stays open. The source reconnects with the hello flag `recover`, names
/// the migration (`postcopy-recover`: session and rounds), hears which
/// pages arrived (`postcopy-received`), opens its channels again and sends
/// the rest. The fault thread asks again for every page a guest thread
/// still waits on.
///
/// Who touches what: the resume point's bitmaps, page table and
/// userfaultfd outlive the connections; each attempt has its own latch
/// (`freshLatch`), receivers, barrier and fault thread, all ended before
/// the next attempt or the return. A connection that is not this
/// migration's recovery (another source, a stale session) gets an error
/// frame and the wait goes on. The wait ends at `recoverTimeout` after the
/// last break, or on `cancel`.
extension DestinationMigration {
    func recoverPostcopy(after error: MigrationError) throws(MigrationError) -> MigrationStats {
        var last = error
        var deadline = Monotonic.now + config.recoverTimeout
        while config.recoverTimeout > 0, !cancelled.load(ordering: .relaxed), Monotonic.now < deadline,
            let point = resumePoint.withLock({ $0 })
        {
            notice(
                "postcopy-paused: \(last.description); waiting up to \(formatSeconds((max(0, deadline - Monotonic.now) * 10).rounded() / 10)) s "
                    + "for the source to reconnect (--recover-timeout)")
            var connected = false
            do throws(MigrationError) {
                return try recoveryAttempt(point, deadline: deadline, connected: &connected)
            } catch {
                last = error
                // A source reached us and broke again: the clock restarts.
                if connected { deadline = Monotonic.now + config.recoverTimeout }
            }
            if last.kind == .timeout, !connected { break }
        }
        let why =
            cancelled.load(ordering: .relaxed)
            ? "cancelled while paused"
            : config.recoverTimeout > 0
                ? "no source recovered it within --recover-timeout \(formatSeconds(config.recoverTimeout)) s"
                : "recovery is off (--recover-timeout 0)"
        throw MigrationError(
            last.kind,
            "postcopy-paused: \(last.description); \(why). The guest runs here, but some of its pages never arrived: its "
                + "threads that touch them wait. Its complete copy (RAM and state as at the switch) stays on the source, stopped "
                + "(run state handed over). End this guest, then take the guest back on the source with livemig stress --resume --reclaim")
    }

    /// One recovery: waits for the source's main channel until `deadline`,
    /// checks it names this migration, tells it which pages arrived, takes
    /// its channels and serves it to completion. `connected` turns true once
    /// our source is back.
    private func recoveryAttempt(_ point: PostcopyResumePoint, deadline: Double, connected: inout Bool) throws(MigrationError)
        -> MigrationStats
    {
        let latch = freshLatch()
        var control: ControlChannel?
        var receivers: [PacketReceiver] = []
        var threads: [WorkerThread] = []
        var faultThread: PostcopyFaults?
        defer {
            faultThread?.stop()
            for r in receivers { r.socket.shutdown() }
            control?.socket.shutdown()
            for t in threads { t.join() }
        }
        do throws(MigrationError) {
            let (ctl, hello) = try acceptMain(deadline: deadline)
            control = ctl
            latch.onFailure { [latch] in
                if let e = latch.error, e.kind != .peer { ctl.sendErrorBestEffort(e) }
                ctl.socket.shutdownReceive()
            }
            guard hello.flags.contains(.recover) else {
                throw MigrationError(
                    .mismatch,
                    "this destination is postcopy-paused: it waits for its source to recover the migration and takes no other")
            }
            try acceptHello(hello, on: ctl)
            let m = try ctl.receive("waiting for the source to name the migration it recovers")
            guard case .postcopyRecover(let session, let rounds) = m else {
                throw MigrationError(.protocolViolation, "expected postcopy-recover after the hello, got '\(m.name)'")
            }
            guard session == point.session, rounds == point.rounds else {
                throw MigrationError(
                    .mismatch,
                    "the source recovers session \(session) after \(rounds) rounds; this destination is paused in session "
                        + "\(point.session) after \(point.rounds)")
            }
            connected = true
            let ram = point.ram, arrived = point.arrived
            var words = [UInt64](repeating: 0, count: arrived.wordCount)
            for page in 0..<ram.block.pageCount where arrived.isDirty(page: page) { words[page >> 6] |= 1 << UInt64(page & 63) }
            try ctl.send(.postcopyReceived(pageCount: UInt64(ram.block.pageCount), words: words))
            ctl.socket.setReceiveTimeout(nil)

            let trust = TrustSetting(key: config.key, encrypt: hello.flags.contains(.encrypted))
            let barrier = RoundBarrier(channels: config.channels + 1)
            let (channels, early) = try acceptChannels(session: hello.session, main: ctl, trust: trust, preempt: true)
            for (id, (s, keys)) in channels.enumerated() {
                let limits = PacketLimits(
                    channelID: id, pageSize: ram.block.pageSize,
                    blocks: ram.blocks.map { RAMBlockLayout(name: $0.name, size: $0.size, pageSize: $0.pageSize) },
                    compression: hello.compression, tagSize: trust.key == nil ? 0 : PacketSealer.tagSize)
                receivers.append(
                    try PacketReceiver(
                        id: id, socket: s, ram: ram, limits: limits, counters: id < config.channels ? counters : preemptCounters,
                        arrived: arrived, roundSeen: point.roundSeen, table: point.table,
                        sealer: keys.map { PacketSealer(key: $0.toDestination, encrypts: trust.encrypt) }, writeThrough: !prefaulted,
                        postcopy: point.target))
            }
            guard let (s, keys) = channels.last else { fatalError("no preempt channel") }
            let faults = PostcopyFaults(
                target: point.target, arrived: arrived, requests: ControlChannel(socket: s, keys: keys, isSource: false), latch: latch,
                priority: faultPathScheduling)
            faultThread = faults
            let control = guest?.control()
            faults.start(resend: point.target.faults.outstandingPages()) { control.map { Int($0.guestThreads) } ?? 0 }
            latch.onFailure { [receivers, barrier] in
                for r in receivers { r.socket.shutdown() }
                barrier.wakeAll()
            }
            watchdog.start(latch: latch) { [counters, preemptCounters] in
                counters.read(counters.multifdBytes) &+ counters.read(counters.mainBytes)
                    &+ preemptCounters.read(preemptCounters.multifdBytes)
            }
            defer { watchdog.stop() }
            for r in receivers {
                let scheduling = r.id == config.channels ? faultPathScheduling : nil
                r.postcopyTransferPriority = config.faultPathPriority
                threads.append(
                    WorkerThread(name: "mig/recv/\(r.id)", prologue: { scheduling?.apply(to: "the preempt receiver") }) {
                        r.run(barrier: barrier, latch: latch)
                    })
            }
            notice("postcopy recovered: the source reconnected; \(arrived.dirtyCount()) of \(ram.block.pageCount) pages had arrived")
            let ended = try serveControl(
                ctl, barrier: barrier, arrived: arrived, roundSeen: point.roundSeen, table: point.table, ram: ram, first: early,
                postcopy: (faults, point.target), resumed: true)
            var stats = completedStats(
                rounds: ended, ram: ram, compression: hello.compression, start: point.start, setupTime: point.setupTime,
                postcopy: point.target)
            stats.postcopy?.recoveries = recoveries.add(1, ordering: .relaxed).newValue
            return stats
        } catch {
            latch.fail(error)
            throw latch.error ?? error
        }
    }
}
