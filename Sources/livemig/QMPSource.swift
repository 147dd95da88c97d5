import FoundationEssentials
import GuestMemory
import Migration
import OSCall
import QMP
import Synchronization
import URing
import WorkerThreads

/// `livemig send --qmp`: the source as QEMU's monitor shows it. The RAM
/// file and the guest are opened (and the guest's source lock taken) at
/// start; each `migrate` then runs one `SourceMigration` on a thread of its
/// own, built from the settings the options and `migrate-set-*` share.
/// After a failed or cancelled migration a new `migrate` may start.
///
/// Threads: `migration` runs `SourceMigration.run()`; `qmp/status` moves
/// the status from the live counters while it runs; `qmp/dirtyrate` runs a
/// `calc-dirty-rate`. Commands run on the QMP client threads and only
/// start, cancel or read these.
final class SourceQMP: Sendable {
    let ram: RAMFile
    let guest: GuestControl?
    let useRing: Bool
    let settings: Mutex<SourceSettings>
    let events = EventSink()
    let board: MigrationStatusBoard
    /// The configuration for a destination address: the process's fixed
    /// choices (key, io_uring, timeouts) plus the settings.
    private let makeConfig: @Sendable (SocketAddress, SourceSettings) -> SourceConfig
    private let makeSource: @Sendable (SourceConfig, @escaping @Sendable (RoundRecord) -> Void) -> SourceMigration
    private let warnExposed: @Sendable (SocketAddress) -> Void
    private let current = Mutex<Run?>(nil)
    private let dirtyRate = DirtyRateJob()

    /// One `migrate`.
    final class Run: Sendable {
        let source: SourceMigration
        let address: SocketAddress
        let started = Monotonic.now
        let tally: RoundTally
        let cancelRequested = Atomic<Bool>(false)
        let final = Mutex<MigrationStats?>(nil)
        let watch = StatusWatch()
        let thread = Mutex<WorkerThread?>(nil)

        init(source: SourceMigration, address: SocketAddress, tally: RoundTally) {
            self.source = source
            self.address = address
            self.tally = tally
        }

        func join() {
            thread.withLock { t in
                t?.join()
                t = nil
            }
        }
    }

    /// Rounds completed and the last expected downtime, from `onRound`.
    final class RoundTally: Sendable {
        let rounds = Atomic<UInt64>(0)
        let expectedMicroseconds = Atomic<Int64>(-1)

        func add(_ r: RoundRecord) {
            switch r.decision {
            case "next-round", "switchover", "give-up", "postcopy":
                rounds.store(UInt64(r.round), ordering: .relaxed)
                expectedMicroseconds.store(r.expectedDowntime >= 0 ? Int64(r.expectedDowntime * 1e6) : -1, ordering: .relaxed)
            default: break
            }
        }

        var expectedDowntime: Double? {
            let e = expectedMicroseconds.load(ordering: .relaxed)
            return e >= 0 ? Double(e) / 1e6 : nil
        }
    }

    init(
        ram: RAMFile, guest: GuestControl?, useRing: Bool, settings: SourceSettings,
        makeConfig: @escaping @Sendable (SocketAddress, SourceSettings) -> SourceConfig,
        makeSource: @escaping @Sendable (SourceConfig, @escaping @Sendable (RoundRecord) -> Void) -> SourceMigration,
        warnExposed: @escaping @Sendable (SocketAddress) -> Void
    ) {
        self.ram = ram
        self.guest = guest
        self.useRing = useRing
        self.settings = Mutex(settings)
        self.makeConfig = makeConfig
        self.makeSource = makeSource
        self.warnExposed = warnExposed
        board = MigrationStatusBoard(events: events)
        events.migrationEvents.store(settings.events, ordering: .relaxed)
    }

    var commands: [QMPCommand] {
        [
            QMPCommand("migrate", arguments: ["uri", "resume", "detach", "blk", "inc"]) { [self] a throws(QMPError) in
                try migrate(a)
                return [:]
            },
            QMPCommand("migrate_cancel") { [self] _ in
                cancel("cancelled by migrate_cancel")
                return [:]
            },
            QMPCommand("migrate-start-postcopy") { [self] _ throws(QMPError) in
                try startPostcopy()
                return [:]
            },
            QMPCommand("query-migrate") { [self] _ in queryMigrate() },
            QMPCommand("query-status") { [self] _ in guestRunStatus(guest) },
            QMPCommand("query-migrate-capabilities") { [self] _ in capabilityReply(settings.withLock { $0 }.capabilities) },
            QMPCommand("migrate-set-capabilities", arguments: ["capabilities"]) { [self] a throws(QMPError) in
                try setCapabilities(capabilityList(a))
                return [:]
            },
            QMPCommand("query-migrate-parameters") { [self] _ in settings.withLock { $0 }.parameters },
            QMPCommand("migrate-set-parameters", arguments: SourceSettings.parameterNames) { [self] a throws(QMPError) in
                try setParameters(a)
                return [:]
            },
            QMPCommand("calc-dirty-rate", arguments: ["calc-time", "calc-time-unit", "sample-pages", "mode"]) {
                [self] a throws(QMPError) in
                try dirtyRate.start(a, ram: ram, guest: guest, migrating: board.current.isRunning)
                return [:]
            },
            QMPCommand("query-dirty-rate", arguments: ["calc-time-unit"]) { [self] _ in dirtyRate.query() },
        ]
    }

    // MARK: - migrate

    private func migrate(_ a: QMPArguments) throws(QMPError) {
        let uri = try a.string("uri")
        if try a.optionalBool("resume") == true {
            throw QMPError(
                "livemig recovers a broken postcopy migration by itself: send reconnects to the same destination for --recover-timeout; "
                    + "migrate with resume is not needed")
        }
        let blk = try a.optionalBool("blk"), inc = try a.optionalBool("inc")
        if blk == true || inc == true {
            throw QMPError("livemig migrates RAM only: block migration (blk, inc) is not supported")
        }
        _ = try a.optionalBool("detach")  // QEMU ignores it too: migrate always returns at once
        let address: SocketAddress
        do {
            address = try SocketAddress(parsing: uri)
        } catch {
            throw QMPError("uri: \(error.description)")
        }
        let s = settings.withLock { $0 }
        try checkCombination(s)
        if dirtyRate.readsGuestTracking {
            throw QMPError("the dirty rate is being measured from the guest's tracking, which a migration needs; wait for query-dirty-rate")
        }
        if s.zeroCopySend, case .unix = address {
            throw QMPError("zero-copy-send needs a TCP destination; Unix sockets do not support zero-copy sends")
        }
        try board.begin()
        // The previous run's thread ended before its final status showed.
        current.withLock { $0 }?.join()
        warnExposed(address)
        let tally = RoundTally()
        let source = makeSource(makeConfig(address, s)) { [weak self] record in
            tally.add(record)
            guard let self else { return }
            observe()
            switch record.decision {
            case "next-round", "switchover", "give-up", "postcopy":
                events.emitMigration("MIGRATION_PASS", data: ["pass": .int(Int64(record.round))])
            default: break
            }
        }
        let run = Run(source: source, address: address, tally: tally)
        current.withLock { $0 = run }
        run.watch.start { [weak self] in self?.observe() }
        let thread = WorkerThread(name: "migration") { [weak self] in self?.runMigration(run) }
        run.thread.withLock { $0 = thread }
    }

    /// The `migration` thread.
    private func runMigration(_ run: Run) {
        let result: Result<MigrationStats, MigrationError>
        do throws(MigrationError) {
            result = .success(try run.source.run())
        } catch {
            result = .failure(error)
        }
        run.watch.stop()
        for w in run.source.warnings.withLock({ $0 }) { FileHandleStderr.write("livemig: warning: \(w)\n") }
        switch result {
        case .success(let stats):
            run.final.withLock { $0 = stats }
            board.move(to: .completed)
            FileHandleStderr.write("livemig: migration to \(run.address) completed\n")
        case .failure(let e):
            var stats = snapshot(run)
            stats.status = .failed
            stats.errorDesc = e.description
            let cancelled = e.kind == .cancelled && run.cancelRequested.load(ordering: .relaxed)
            if cancelled { stats.status = .cancelled }
            run.final.withLock { $0 = stats }
            board.move(to: cancelled ? .cancelled : .failed)
            let kept = guest.map(guestAfterFailure) ?? "The source RAM file was not modified."
            FileHandleStderr.write(
                "livemig: migration to \(run.address) \(cancelled ? "cancelled" : "failed"): \(e.description). \(kept)\n")
        }
    }

    /// Moves the status as the running migration's counters show.
    private func observe() {
        guard let run = current.withLock({ $0 }) else { return }
        let source = run.source
        let started =
            source.counters.read(source.counters.multifdBytes) > 0 || source.progress.round.load(ordering: .relaxed) > 0
        if started { board.move(to: .active) { $0 == .setup } }
        if source.progress.postcopy.load(ordering: .relaxed) { board.move(to: .postcopyActive) { $0 == .active } }
        if source.postcopyPaused {
            board.move(to: .postcopyPaused) { $0 == .postcopyActive }
        } else if source.progress.postcopy.load(ordering: .relaxed) {
            board.move(to: .postcopyActive) { $0 == .postcopyPaused }
        }
    }

    /// Cancels the running migration, if any (`migrate_cancel`, a signal,
    /// `quit`). The guest keeps running on the source.
    func cancel(_ reason: String) {
        guard let run = current.withLock({ $0 }) else { return }
        run.cancelRequested.store(true, ordering: .relaxed)
        guard board.move(to: .cancelling, when: { $0.isRunning }) else { return }
        run.source.cancel(reason)
    }

    private func startPostcopy() throws(QMPError) {
        guard board.current.isRunning, let run = current.withLock({ $0 }) else {
            throw QMPError("Postcopy must be started after migration has been started")
        }
        guard run.source.config.postcopy else {
            throw QMPError("Enable postcopy with migrate-set-capabilities before the start of migration")
        }
        run.source.startPostcopy()
    }

    func startPostcopyFromSignal() { try? startPostcopy() }

    // MARK: - queries

    private func snapshot(_ run: Run) -> MigrationStats {
        liveStats(
            counters: run.source.counters, block: ram.block, channels: run.source.config.channels, started: run.started,
            rounds: run.tally.rounds.load(ordering: .relaxed), progress: guest == nil ? nil : run.source.progress,
            expectedDowntime: run.tally.expectedDowntime)
    }

    private func queryMigrate() -> JSONValue {
        let status = board.current
        guard status != .none, let run = current.withLock({ $0 }) else { return [:] }
        if !status.isRunning, let final = run.final.withLock({ $0 }) {
            // Only a completed migration has the engine's own figures.
            return migrationInfo(final, status: status, live: status != .completed)
        }
        return migrationInfo(snapshot(run), status: status, live: true)
    }

    // MARK: - settings

    private func setCapabilities(_ list: [(String, Bool)]) throws(QMPError) {
        let running = board.current.isRunning
        try settings.withLock { s throws(QMPError) in
            let next: SourceSettings
            do throws(SettingError) {
                next = try s.settingCapabilities(list)
            } catch {
                throw QMPError(error.description)
            }
            var withoutEvents = next
            withoutEvents.events = s.events
            if running, withoutEvents != s {
                let changed = zip(s.capabilities, next.capabilities).filter { $0.0.1 != $0.1.1 }.map(\.0.0)
                throw QMPError(
                    "cannot change \(changed.joined(separator: ", ")) while a migration is running; only events applies at once")
            }
            try checkCombination(next)
            s = next
        }
        events.migrationEvents.store(settings.withLock { $0.events }, ordering: .relaxed)
    }

    /// The checks that need the whole set and this process (a guest or
    /// not, io_uring or not), at each set and again at `migrate`.
    private func checkCombination(_ s: SourceSettings) throws(QMPError) {
        do throws(SettingError) {
            try s.checkCombination(live: guest != nil, useRing: useRing, qmp: true)
        } catch {
            throw QMPError(error.description)
        }
    }

    private func setParameters(_ a: QMPArguments) throws(QMPError) {
        let running = board.current.isRunning
        try settings.withLock { s throws(QMPError) in
            let next = try s.settingParameters(a)
            if running, next != s {
                throw QMPError(
                    "cannot change \(a.values.keys.sorted().joined(separator: ", ")) while a migration is running; set it before migrate")
            }
            try checkCombination(next)
            s = next
        }
    }

    // MARK: - the end

    /// After `quit` or a signal: cancels a running migration, waits for its
    /// thread and a dirty-rate measurement, and gives the exit status: 0 if
    /// the last migration completed or none ran, 1 otherwise.
    func finish() -> Int32 {
        cancel("cancelled: the process is quitting")
        current.withLock { $0 }?.join()
        dirtyRate.join()
        switch board.current {
        case .none, .completed: return 0
        default: return exitFailure
        }
    }
}

/// `calc-dirty-rate` and `query-dirty-rate`: one measurement at a time, on
/// its own thread (`DirtyRate`, the engine of `livemig dirtyrate`).
final class DirtyRateJob: Sendable {
    private enum State: Sendable {
        case unstarted
        case measuring(mode: String, calcTime: Double, samplePages: UInt64)
        case measured(JSONValue)
        case failed(String)
    }

    private let state = Mutex(State.unstarted)
    /// A bitmap or kernel measurement runs: it takes the guest's dirty
    /// tracking, which a migration must not share.
    private let guestTracking = Atomic<Bool>(false)

    var readsGuestTracking: Bool { guestTracking.load(ordering: .acquiring) }
    private let thread = Mutex<WorkerThread?>(nil)

    func start(_ a: QMPArguments, ram: RAMFile, guest: GuestControl?, migrating: Bool) throws(QMPError) {
        let value = try a.int("calc-time")
        let unit = try a.optionalString("calc-time-unit") ?? "second"
        let seconds: Double
        switch unit {
        case "second": seconds = Double(value)
        case "millisecond": seconds = Double(value) / 1000
        default: throw QMPError("calc-time-unit: '\(unit)' is not a unit; use second or millisecond")
        }
        guard seconds >= 0.01, seconds <= 3600 else {
            throw QMPError("calc-time: \(value) \(unit)(s) is not a duration from 10ms to 1h")
        }
        let samplePages = try a.optionalInt("sample-pages") ?? 512
        guard (1...1 << 20).contains(samplePages) else { throw QMPError("sample-pages must be from 1 to 1048576 per GiB") }
        let modeName = try a.optionalString("mode") ?? "page-sampling"
        let mode: DirtyRate.Mode
        switch modeName {
        case "page-sampling": mode = .pageSampling
        case "dirty-bitmap", "bitmap": mode = .bitmap
        case "kernel": mode = .kernel
        case "dirty-ring": throw QMPError("mode dirty-ring: livemig has no dirty ring; use page-sampling, dirty-bitmap or kernel")
        default: throw QMPError("mode: '\(modeName)' is not a mode; use page-sampling, dirty-bitmap or kernel")
        }
        if mode != .pageSampling {
            guard guest != nil else {
                throw QMPError("mode \(modeName) reads the guest's dirty tracking: start livemig send with --guest CONTROL")
            }
            if migrating { throw QMPError("mode \(modeName) needs the guest's dirty tracking, which the running migration uses") }
        }
        let busy = state.withLock { s -> Bool in
            if case .measuring = s { return true }
            s = .measuring(mode: modeName, calcTime: seconds, samplePages: mode == .pageSampling ? UInt64(samplePages) : 0)
            return false
        }
        if busy { throw QMPError("The dirty rate is already being measured") }
        guestTracking.store(mode != .pageSampling, ordering: .releasing)
        join()
        var m = DirtyRate(mode: mode, calcTime: seconds)
        m.samplePagesPerGiB = UInt64(samplePages)
        let meter = m
        let t = WorkerThread(name: "qmp/dirtyrate") { [self] in
            do throws(MigrationError) {
                let result = try meter.measure(ram: ram, control: guest)
                var v = (try? JSONValue(encoding: result)) ?? [:]
                if case .object(var o) = v {
                    o["mode"] = .string(modeName)
                    v = .object(o)
                }
                state.withLock { $0 = .measured(v) }
            } catch {
                state.withLock { $0 = .failed(error.description) }
            }
            guestTracking.store(false, ordering: .releasing)
        }
        thread.withLock { $0 = t }
    }

    func query() -> JSONValue {
        switch state.withLock({ $0 }) {
        case .unstarted: return ["status": "unstarted"]
        case .measuring(let mode, let calcTime, let samplePages):
            return ["status": "measuring", "mode": .string(mode), "calc-time": .double(calcTime), "sample-pages": .int(Int64(samplePages))]
        case .measured(let v): return v
        case .failed(let why): return ["status": "unstarted", "error-desc": .string(why)]
        }
    }

    func join() {
        thread.withLock { t in
            t?.join()
            t = nil
        }
    }
}
