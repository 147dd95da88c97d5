import FoundationEssentials
import GuestMemory
import Migration
import OSCall
import QMP
import Synchronization
import SystemPackage
import URing
import WorkerThreads

/// `livemig receive --qmp`: the destination as QEMU started with
/// `-incoming defer` shows it. `migrate-incoming` builds the
/// `DestinationMigration` (which maps the RAM and listens, so its errors
/// are the command's) and runs it on a thread of its own. A failed or
/// cancelled incoming migration may be followed by another
/// `migrate-incoming`; a completed one may not.
///
/// Threads: `migration` runs `DestinationMigration.run()`; `qmp/status`
/// moves the status from the counters while it runs.
final class DestinationQMP: Sendable, QMPController {
    let settings: Mutex<DestinationSettings>
    let events = EventSink()
    let board: MigrationStatusBoard
    let guestPath: FilePath?
    private let makeConfig: @Sendable (SocketAddress, DestinationSettings) -> DestinationConfig
    private let warnExposed: @Sendable (SocketAddress) -> Void
    private let current = Mutex<Run?>(nil)
    /// Serialises `migrate-incoming`: building a destination binds and maps.
    private let incoming = Mutex<Void>(())

    final class Run: Sendable {
        let destination: DestinationMigration
        let address: SocketAddress
        let started = Monotonic.now
        let cancelRequested = Atomic<Bool>(false)
        let final = Mutex<MigrationStats?>(nil)
        let watch = StatusWatch()
        let thread = Mutex<WorkerThread?>(nil)

        init(destination: DestinationMigration, address: SocketAddress) {
            self.destination = destination
            self.address = address
        }

        func join() {
            thread.withLock { t in
                t?.join()
                t = nil
            }
        }
    }

    init(
        settings: DestinationSettings, guestPath: FilePath?,
        makeConfig: @escaping @Sendable (SocketAddress, DestinationSettings) -> DestinationConfig,
        warnExposed: @escaping @Sendable (SocketAddress) -> Void
    ) {
        self.settings = Mutex(settings)
        self.guestPath = guestPath
        self.makeConfig = makeConfig
        self.warnExposed = warnExposed
        board = MigrationStatusBoard(events: events)
        events.migrationEvents.store(settings.events, ordering: .relaxed)
    }

    var commands: [QMPCommand] {
        [
            QMPCommand("migrate-incoming", arguments: ["uri", "exit-on-error"]) { [self] a throws(QMPError) in
                try migrateIncoming(a)
                return [:]
            },
            QMPCommand("migrate-recover", arguments: ["uri"]) { _ throws(QMPError) in
                throw QMPError(
                    "livemig's destination recovers by itself: after a postcopy break it keeps listening on its migrate-incoming "
                        + "address for the source to reconnect (for --recover-timeout); migrate-recover is not needed")
            },
            QMPCommand("migrate_cancel") { [self] _ in
                cancel("cancelled by migrate_cancel")
                return [:]
            },
            QMPCommand("query-migrate") { [self] _ in queryMigrate() },
            QMPCommand("query-status") { [self] _ in queryStatus() },
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
        ]
    }

    private func migrateIncoming(_ a: QMPArguments) throws(QMPError) {
        let uri = try a.string("uri")
        // QEMU's exit-on-error: this process never exits on its own; the
        // client sees `failed` and decides.
        _ = try a.optionalBool("exit-on-error")
        let address: SocketAddress
        do {
            address = try SocketAddress(parsing: uri)
        } catch {
            throw QMPError("uri: \(error.description)")
        }
        try incoming.withLock { _ throws(QMPError) in
            switch board.current {
            case .completed: throw QMPError("The incoming migration has completed; start a new livemig receive for another one")
            case let s where s.isRunning: throw QMPError("The incoming migration has already been started")
            default: break
            }
            // The last run's listener must close before the address is
            // bound again: drop it now.
            let last = current.withLock { r in
                defer { r = nil }
                return r
            }
            last?.join()
            let config = makeConfig(address, settings.withLock { $0 })
            warnExposed(address)
            let destination: DestinationMigration
            do throws(MigrationError) {
                destination = try DestinationMigration(config: config) { FileHandleStderr.write("livemig: notice: \($0)\n") }
            } catch {
                throw QMPError(error.description)
            }
            try board.begin()
            FileHandleStderr.write("livemig: listening on \(address)\n")
            let run = Run(destination: destination, address: address)
            current.withLock { $0 = run }
            run.watch.start { [weak self] in self?.observe() }
            let thread = WorkerThread(name: "migration") { [weak self] in self?.runMigration(run) }
            run.thread.withLock { $0 = thread }
        }
    }

    private func runMigration(_ run: Run) {
        let result: Result<MigrationStats, MigrationError>
        do throws(MigrationError) {
            result = .success(try run.destination.run())
        } catch {
            result = .failure(error)
        }
        run.destination.removeSocketFile()
        run.watch.stop()
        switch result {
        case .success(let stats):
            run.final.withLock { $0 = stats }
            board.move(to: .completed)
            FileHandleStderr.write("livemig: incoming migration on \(run.address) completed\n")
        case .failure(let e):
            var stats = snapshot(run)
            let cancelled = e.kind == .cancelled && run.cancelRequested.load(ordering: .relaxed)
            stats.status = cancelled ? .cancelled : .failed
            stats.errorDesc = e.description
            run.final.withLock { $0 = stats }
            board.move(to: cancelled ? .cancelled : .failed)
            FileHandleStderr.write("livemig: receiving on \(run.address) \(cancelled ? "cancelled" : "failed"): \(e.description)\n")
        }
    }

    private func observe() {
        guard let run = current.withLock({ $0 }) else { return }
        let c = run.destination.counters
        if c.read(c.mainBytes) > 0 || c.read(c.multifdBytes) > 0 { board.move(to: .active) { $0 == .setup } }
        if run.destination.postcopyActive { board.move(to: .postcopyActive) { $0 == .active || $0 == .postcopyPaused } }
        if run.destination.postcopyPaused { board.move(to: .postcopyPaused) { $0 == .active || $0 == .postcopyActive } }
    }

    func cancel(_ reason: String) {
        guard let run = current.withLock({ $0 }) else { return }
        run.cancelRequested.store(true, ordering: .relaxed)
        guard board.move(to: .cancelling, when: { $0.isRunning }) else { return }
        run.destination.cancel(reason)
    }

    private func snapshot(_ run: Run) -> MigrationStats {
        var s = liveStats(
            counters: run.destination.counters, block: run.destination.ram?.block, channels: run.destination.config.channels,
            started: run.started, rounds: 0, progress: nil, expectedDowntime: nil)
        // The destination does not know what the source still has to send.
        s.ram.remaining = 0
        return s
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

    private func queryStatus() -> JSONValue {
        guard board.current == .completed else { return ["status": "inmigrate", "running": false] }
        guard let path = guestPath, let control = try? GuestControl(path: path) else { return ["status": "paused", "running": false] }
        return guestRunStatus(control)
    }

    private func setCapabilities(_ list: [(String, Bool)]) throws(QMPError) {
        let running = board.current.isRunning
        try settings.withLock { s throws(QMPError) in
            let next: DestinationSettings
            do throws(SettingError) {
                next = try s.settingCapabilities(list)
            } catch {
                throw QMPError(error.description)
            }
            var withoutEvents = next
            withoutEvents.events = s.events
            if running, withoutEvents != s {
                throw QMPError("cannot change capabilities while a migration is running; only events applies at once")
            }
            s = next
        }
        events.migrationEvents.store(settings.withLock { $0.events }, ordering: .relaxed)
    }

    private func setParameters(_ a: QMPArguments) throws(QMPError) {
        let running = board.current.isRunning
        try settings.withLock { s throws(QMPError) in
            let next = try s.settingParameters(a)
            if running, next != s {
                throw QMPError("cannot change multifd-channels while a migration is running; set it before migrate-incoming")
            }
            s = next
        }
    }

    func finish() -> Int32 {
        cancel("cancelled: the process is quitting")
        current.withLock { $0 }?.join()
        switch board.current {
        case .none, .completed: return 0
        default: return exitFailure
        }
    }
}
