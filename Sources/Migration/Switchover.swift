import Synchronization

/// The source's side of the point of no return (docs/PROTOCOL.md §7).
///
/// At switchover the source pauses its guest, sends the last pages and the
/// guest state, and the destination answers `completed` once it holds and
/// has checked all of it: it is *prepared*, but runs nothing until the
/// source sends `commit`. Before sending it the source hands its guest over
/// (run state *handed over*: its threads exit for good). So the destination
/// can only start the guest after the source copy stopped: at no instant
/// can both run.
///
/// The switchover deadline races the hand-over: the watchdog calls
/// `expire()` when the deadline passes, the migration thread calls
/// `handOver(_:)` when the destination is prepared, and whichever comes
/// first under the lock decides. An expired switchover resumes the source
/// guest (the destination never got `commit`); a handed-over one never
/// does, whatever fails afterwards.
final class Switchover: Sendable {
    enum Phase: Sendable {
        /// Precopy: no switchover yet.
        case precopy
        /// The guest is paused; the deadline runs.
        case paused
        /// `commit` may be on its way: the source copy is stopped for good.
        case handedOver
        /// The deadline passed before the destination was prepared.
        case expired
    }

    private let phase = Mutex(Phase.precopy)

    /// The pause begins.
    func begin() { phase.withLock { $0 = .paused } }

    /// The watchdog's deadline: true when this call expired the switchover
    /// (the caller fails the migration); false once handed over.
    func expire() -> Bool {
        phase.withLock { p in
            guard case .paused = p else { return false }
            p = .expired
            return true
        }
    }

    /// The destination is prepared: runs `stop` (stop the source copy) and
    /// moves to *handed over*, unless the deadline expired first or `stop`
    /// returns false (then nothing changes and the caller fails).
    func handOver(_ stop: () -> Bool) -> Bool {
        phase.withLock { p in
            guard case .paused = p, stop() else { return false }
            p = .handedOver
            return true
        }
    }

    /// Runs `check` unless the source copy was handed over, under the
    /// lock `handOver` takes: a check that the guest process lives cannot
    /// race the hand-over, after which the guest exits by design.
    func unlessHandedOver(_ check: () -> MigrationError?) -> MigrationError? {
        phase.withLock { p in
            if case .handedOver = p { return nil }
            return check()
        }
    }

    /// Whether the source copy was handed over: a failure must not resume it.
    var isHandedOver: Bool {
        phase.withLock { p in
            if case .handedOver = p { return true }
            return false
        }
    }
}
