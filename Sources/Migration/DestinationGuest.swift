import GuestMemory
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// The destination's side of the guest-control protocol: every access
/// `livemig receive --guest CONTROL` makes to its control file goes
/// through here (docs/GUEST-CONTROL.md §10, docs/PROTOCOL.md §6–§7).
///
/// Its life: `init` claims the file's receiver byte and refuses a file
/// whose guest runs; `markIncomplete` marks an existing file *incomplete*
/// before any page is accepted; `store` writes the received state at
/// completion (the guest stays *incomplete*: prepared, not runnable);
/// `commit` makes it *incoming*, ready for `livemig stress --resume`.
/// A refusal by a running guest is checked again at each of these steps.
///
/// Threads: the destination's main thread only.
final class DestinationGuest: Sendable {
    let path: FilePath
    /// The control file's receiver byte, held until this process exits;
    /// nil when the file did not exist at `init` (it is created at
    /// completion).
    private let lock: OwnerLock?
    /// The incoming guest that waits on this control file
    /// (`livemig stress --incoming`), attached: its userfaultfd and its
    /// mapping. Nil for an ordinary destination.
    let incoming: IncomingAttachment?

    /// Claims the control file's receiver byte and refuses a control file
    /// whose guest runs (its guest byte is held), unless that guest is an
    /// incoming guest waiting for this migration: then attaches to it
    /// (`FaultHandoff`). Claims nothing when the file does not exist yet.
    init(path: FilePath) throws(MigrationError) {
        self.path = path
        do throws(GuestMemoryError) {
            if access(path.string, F_OK) == 0 {
                let control = try GuestControl(path: path)
                if let socket = try Self.waitingIncomingGuest(control, path: path) {
                    incoming = try FaultHandoff.attach(path: socket, timeout: 5)
                    guard incoming!.length == control.ramSize, incoming!.pageSize == control.pageSize else {
                        throw GuestMemoryError(
                            "the incoming guest on \(path) registered \(incoming!.length) bytes of RAM in pages of \(incoming!.pageSize), "
                                + "but its control file says \(control.ramSize) in pages of \(control.pageSize)")
                    }
                } else {
                    try Self.refuseLiveGuest(path)
                    incoming = nil
                }
                lock = try OwnerLock.acquire(.receiver, on: path) { holder in
                    "control file \(path) is in use by \(holder.named("livemig receive")); give another path"
                }
            } else {
                lock = nil
                incoming = nil
            }
        } catch {
            throw MigrationError(.mismatch, error.description)
        }
    }

    /// The hand-off socket of an incoming guest that waits on `control`:
    /// run state *waiting incoming* (or *incomplete*, after a migration
    /// into it failed before it ran), a hand-off path, and its guest byte
    /// held by a live process. Nil when no incoming guest waits.
    private static func waitingIncomingGuest(_ control: GuestControl, path: FilePath) throws(GuestMemoryError) -> String? {
        guard control.runState == .waitingIncoming || control.runState == .incomplete,
            let socket = control.handoffSocketPath,
            try OwnerLock.holder(of: .guest, on: path) != nil
        else { return nil }
        return socket
    }

    /// Marks an existing control file *incomplete* before the migration
    /// may overwrite it: until `commit`, no guest command takes it for a
    /// good guest.
    func markIncomplete() throws(MigrationError) {
        do throws(GuestMemoryError) {
            guard access(path.string, F_OK) == 0 else { return }
            if incoming == nil { try Self.refuseLiveGuest(path) }
            try GuestControl(path: path).setRunState(.incomplete)
        } catch {
            throw MigrationError(.mismatch, error.description)
        }
    }

    /// Writes the guest state into the control file (opened, or created
    /// for `ram`'s blocks); it stays *incomplete* (not resumable) until the
    /// source commits.
    func store(_ state: [UInt8], for ram: RAMFile) throws(MigrationError) {
        do throws(GuestMemoryError) {
            if incoming == nil { try Self.refuseLiveGuest(path) }
            let control = try GuestControl.openOrCreate(path: path, for: ram.block, blocks: ram.blocks)
            let pid = control.guestPID
            if control.runState == .running, pid > 0, SystemCall.processExists(pid), control.guestThreads > 0 {
                throw GuestMemoryError("control file \(path) belongs to a guest that is running (pid \(pid)); give another path")
            }
            try control.writeState(state)
            control.throttlePercent = 0
            control.sourcePID = 0
            control.setRunState(.incomplete)
        } catch {
            throw MigrationError(error)
        }
    }

    /// The point of no return on this side: the source stopped its copy
    /// for good, so the guest becomes *incoming*. An incoming guest that
    /// waits (`stress --incoming`) starts running at this store.
    func commit() throws(MigrationError) {
        do throws(GuestMemoryError) {
            try GuestControl(path: path).setRunState(.incoming)
        } catch {
            throw MigrationError(error)
        }
    }

    /// The control file, opened (nil when it cannot be): for reading the
    /// running guest's thread count during postcopy.
    func control() -> GuestControl? { try? GuestControl(path: path) }

    private static func refuseLiveGuest(_ path: FilePath) throws(GuestMemoryError) {
        if let holder = try OwnerLock.holder(of: .guest, on: path) {
            throw GuestMemoryError(
                "control file \(path) belongs to a running guest, \(holder.named("livemig stress")); "
                    + "receiving into it would overwrite that guest: give another path")
        }
    }
}
