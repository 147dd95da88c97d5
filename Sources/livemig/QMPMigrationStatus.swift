import FoundationEssentials
import GuestMemory
import Migration
import OSCall
import QMP
import Synchronization
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// QEMU's `MigrationStatus` values a livemig process goes through.
enum QMPMigrationStatus: String, Sendable {
    case none, setup, active, cancelling, cancelled, completed, failed
    case postcopyActive = "postcopy-active"
    case postcopyPaused = "postcopy-paused"

    /// A migration is under way: settings that shape it cannot change,
    /// and no second one may start.
    var isRunning: Bool {
        switch self {
        case .setup, .active, .postcopyActive, .postcopyPaused, .cancelling: return true
        case .none, .cancelled, .completed, .failed: return false
        }
    }
}

/// Where QMP events go, once the server exists (the server is made from
/// the commands, and the commands emit events: this breaks the circle).
final class EventSink: Sendable {
    private let server = Mutex<QMPServer?>(nil)
    /// The `events` capability: QEMU sends MIGRATION and MIGRATION_PASS
    /// only while it is on.
    let migrationEvents = Atomic<Bool>(false)

    func attach(_ s: QMPServer) { server.withLock { $0 = s } }

    func emitMigration(_ name: String, data: JSONValue) {
        guard migrationEvents.load(ordering: .relaxed) else { return }
        server.withLock { $0 }?.emit(name, data: data)
    }
}

/// The status of this process's migration, and the MIGRATION event on
/// each change. Changes and their events happen under one lock, so every
/// client sees them in order (setup, active, ..., completed).
final class MigrationStatusBoard: Sendable {
    private let status = Mutex(QMPMigrationStatus.none)
    let events: EventSink

    init(events: EventSink) { self.events = events }

    var current: QMPMigrationStatus { status.withLock { $0 } }

    /// Moves to `next` (emitting MIGRATION) when `allowed` accepts the
    /// current status; returns whether it moved.
    @discardableResult
    func move(to next: QMPMigrationStatus, when allowed: (QMPMigrationStatus) -> Bool = { _ in true }) -> Bool {
        status.withLock { s in
            guard allowed(s), s != next else { return false }
            // A migration that ends before anyone saw it start still went
            // through active, as in QEMU.
            if s == .setup, next == .completed {
                events.emitMigration("MIGRATION", data: ["status": .string(QMPMigrationStatus.active.rawValue)])
            }
            s = next
            events.emitMigration("MIGRATION", data: ["status": .string(next.rawValue)])
            return true
        }
    }

    /// Starts a new migration: `setup`, unless one is under way.
    func begin() throws(QMPError) {
        let began = move(to: .setup) { !$0.isRunning }
        guard began else { throw QMPError("There's a migration process in progress") }
    }
}

/// A migration's statistics as QMP's `query-migrate` returns them
/// (QEMU's `MigrationInfo`): the engine's `MigrationStats`, which uses
/// QEMU's names, with `status` replaced by the board's (which knows
/// `cancelling` and friends).
///
/// `live`: the figures come from the running counters, where the setup
/// time is not known (the engine reports it at the end), so it is left out.
func migrationInfo(_ stats: MigrationStats, status: QMPMigrationStatus, live: Bool = false) -> JSONValue {
    guard case .object(var o) = (try? JSONValue(encoding: stats)) ?? [:] else { return ["status": .string(status.rawValue)] }
    o["status"] = .string(status.rawValue)
    if live { o["setup-time"] = nil }
    return .object(o)
}

/// Statistics from the live counters, while a migration runs (and for one
/// that failed: what moved before it did).
func liveStats(
    counters: TransferCounters, block: RAMBlock?, channels: Int, started: Double, rounds: UInt64, progress: LiveProgress?,
    expectedDowntime: Double?
) -> MigrationStats {
    var s = MigrationStats(status: .active)
    let elapsed = Monotonic.now - started
    s.totalTime = UInt64(max(0, elapsed) * 1000)
    s.channels = channels
    let pageSize = block?.pageSize ?? 0
    s.ram.total = block?.size ?? 0
    s.ram.pageSize = pageSize
    s.ram.normal = counters.read(counters.normalPages)
    s.ram.duplicate = counters.read(counters.zeroPages)
    s.ram.normalBytes = s.ram.normal &* pageSize
    s.ram.multifdBytes = counters.read(counters.multifdBytes)
    s.ram.transferred = s.ram.multifdBytes &+ counters.read(counters.mainBytes)
    s.ram.dirtySyncCount = rounds
    if let progress, rounds > 0 {
        s.ram.remaining = progress.remainingBytes.load(ordering: .relaxed)
        s.ram.dirtyPagesRate = progress.dirtyPagesRate.load(ordering: .relaxed)
        let t = progress.throttle.load(ordering: .relaxed)
        if t > 0 { s.cpuThrottlePercentage = Int(t) }
    } else {
        // The first pass sends every page once: what it has not reached.
        let sent = (s.ram.normal &+ s.ram.duplicate) &* pageSize
        s.ram.remaining = s.ram.total > sent ? s.ram.total - sent : 0
    }
    if let e = expectedDowntime, e.isFinite, e >= 0 { s.expectedDowntime = UInt64(e * 1000) }
    s.ram.computeRates(seconds: elapsed)
    return s
}

/// QEMU's `query-status` for a guest seen through its control file.
func guestRunStatus(_ control: GuestControl?) -> JSONValue {
    guard let g = control else { return ["status": "paused", "running": false] }
    let pid = g.guestPID
    let alive = pid > 0 && SystemCall.processExists(pid)
    switch g.runState {
    case .running where alive: return ["status": "running", "running": true]
    case .running: return ["status": "shutdown", "running": false]
    case .pauseRequested, .handedOver: return ["status": "finish-migrate", "running": false]
    case .migrated: return ["status": "postmigrate", "running": false]
    case .incoming: return ["status": "paused", "running": false]
    case .incomplete, .waitingIncoming: return ["status": "inmigrate", "running": false]
    }
}

/// A thread that watches a running migration's counters and moves the
/// board (setup to active, postcopy) as they change. `observe` is also
/// called from the engine's round callback, so a pass never shows before
/// the status it belongs to.
final class StatusWatch: Sendable {
    private let stopFlag = StopFlag()
    private let thread: Mutex<WorkerThread?> = Mutex(nil)

    func start(every microseconds: UInt32 = 20_000, _ observe: @escaping @Sendable () -> Void) {
        let stop = stopFlag
        let t = WorkerThread(name: "qmp/status") {
            while !stop.isSet {
                observe()
                usleep(microseconds)
            }
        }
        thread.withLock { $0 = t }
    }

    func stop() {
        stopFlag.set()
        thread.withLock { t in
            t?.join()
            t = nil
        }
    }
}
