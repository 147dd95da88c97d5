import CShims
import GuestMemory
import OSCall
import Synchronization
import SystemPackage
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// An incoming guest, QEMU's `-incoming` (`livemig stress --incoming`): a
/// guest process started on the destination before its migration, with
/// RAM that has not arrived yet.
///
/// It maps the RAM file, registers the whole mapping with a userfaultfd of
/// its own for MISSING faults, announces itself in the control file (run
/// state *waiting incoming*, the hand-off socket's path) and hands the
/// descriptor to any receiver that connects (`FaultHandoffServer`). A
/// receiver places the pages through that descriptor, stores the guest
/// state and sets *incoming*; `waitForStart()` then returns and the caller
/// runs the guest like `stress --resume`. While the mapping is registered a
/// guest thread that touches a page not yet placed sleeps until it is
/// (postcopy); once the receiver unregisters, the mapping is an ordinary one.
///
/// Descriptors and locks:
/// - The guest keeps its own `Userfault` for its whole life, also while the
///   guest runs. If the last copy of a userfaultfd closes, the kernel drops
///   the registration and a missing page silently reads as zeros: a
///   receiver that dies must not be able to cause that.
/// - It holds the *guest* lock of the control file (docs/GUEST-CONTROL.md
///   §10) for its whole life, like every stress guest.
/// - It does **not** hold the RAM file's *writer* lock while it waits: the
///   receiver takes that lock for the migration (it is the one writing the
///   RAM, through the descriptor). The guest holds it only while it
///   prepares the file, and takes it again once the guest runs and the
///   receiver has let go (`claimRAMWhenFree`); during postcopy that is
///   after the last page arrived.
public final class IncomingGuest: Sendable {
    /// How the wait for the receiver ended.
    public enum WaitEnd: Sendable, Equatable {
        /// A receiver stored the guest and set *incoming*: run it.
        case started
        /// `stop()` was called (SIGINT, SIGTERM) before that.
        case stopped
        /// The control file's run state became something no receiver sets
        /// for this guest.
        case abandoned(GuestControl.RunState)
    }

    public let ram: RAMFile
    public let control: GuestControl
    /// This process's own copy of the guest's userfaultfd (see above).
    public let userfault: Userfault
    /// The hand-off socket's absolute path, as stored in the control file.
    public let socketPath: String
    /// The hand-off server: how many receivers attached so far.
    public var handoffs: Int { server.handoffs }
    private let server: FaultHandoffServer
    private let guestLock: OwnerLock
    private let stopFlag = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let ramClaim = RAMClaim()
    private let ramClaimer = Mutex<WorkerThread?>(nil)

    /// The hand-off socket for `control` when none is given:
    /// "<CONTROL>.uffd", made absolute.
    public static func defaultSocketPath(control: FilePath) -> String {
        control.string + ".uffd"
    }

    /// Prepares the incoming guest and starts serving its hand-off; the
    /// guest waits from here on (`waitForStart`).
    ///
    /// - `size`: creates an absent RAM file of this size (a sparse file:
    ///   nothing is allocated or pre-faulted, every page stays missing). An
    ///   existing file keeps its size.
    /// - `socketPath`: where to serve the hand-off; default
    ///   `defaultSocketPath(control:)`. A relative path is made absolute,
    ///   and must then fit a Unix socket address (107 bytes).
    public convenience init(ram ramPath: FilePath, control controlPath: FilePath, size: UInt64?, socketPath: String?)
        throws(GuestMemoryError)
    {
        try self.init(blocks: [Block(name: RAMBlock.defaultName, path: ramPath, size: size)], control: controlPath, socketPath: socketPath)
    }

    /// One RAM block of an incoming guest: its name, file, and the size to
    /// create an absent file with.
    public struct Block: Sendable {
        public var name: String
        public var path: FilePath
        public var size: UInt64?
        public init(name: String, path: FilePath, size: UInt64?) {
            self.name = name
            self.path = path
            self.size = size
        }
    }

    /// The same for a guest of several RAM blocks, in the guest's order:
    /// their files are mapped side by side (`RAMFile.combining`), and the
    /// whole range is registered with one userfaultfd and handed over.
    public init(blocks: [Block], control controlPath: FilePath, socketPath: String?) throws(GuestMemoryError) {
        for b in blocks {
            if let refusal = RAMFile.postcopyRefusal(for: b.path) {
                throw GuestMemoryError("an incoming guest cannot use its RAM file: \(refusal)")
            }
        }
        let socket = Self.absolute(socketPath ?? Self.defaultSocketPath(control: controlPath))
        guard socket.utf8.count <= GuestControl.handoffSocketPathLimit else {
            throw GuestMemoryError(
                "the hand-off socket path \(socket) is \(socket.utf8.count) bytes, but a Unix socket path holds at most "
                    + "\(GuestControl.handoffSocketPathLimit): give a shorter --control path or --handoff-socket",
                errno: .fileNameTooLong)
        }

        // The RAM writer lock, held only while the file is prepared
        // (created, emptied, registered). It must not be held while the
        // guest waits: the receiver claims it for the migration, since it
        // is the receiver that writes the RAM then. Released before the run
        // state tells receivers to come.
        var prepareLocks: [OwnerLock] = []
        let ram: RAMFile
        var created: [FilePath] = []
        do throws(GuestMemoryError) {
            var files: [RAMFile] = []
            for b in blocks {
                if let size = b.size, access(b.path.string, F_OK) != 0 {
                    let lock = try OwnerLock.claimRAM(b.path, create: true)
                    prepareLocks.append(lock)
                    if lock.created { created.append(b.path) }
                    // Sized with ftruncate: a hole, not allocated, not faulted.
                    files.append(try RAMFile.create(path: b.path, size: size, blockName: b.name))
                } else {
                    files.append(try RAMFile(path: b.path, access: .readWrite, blockName: b.name))
                    prepareLocks.append(try OwnerLock.claimRAM(b.path))
                }
            }
            ram = try RAMFile.combining(files)
        } catch {
            for path in created { unlink(path.string) }
            throw error
        }
        let control: GuestControl
        let guestLock: OwnerLock
        let userfault: Userfault
        let server: FaultHandoffServer
        do throws(GuestMemoryError) {
            control = try GuestControl.openOrCreate(path: controlPath, for: ram.block, blocks: ram.blocks)
            guestLock = try OwnerLock.acquire(.guest, on: controlPath) { holder in
                "control file \(controlPath) belongs to a running guest, \(holder.named("livemig stress")); stop it first or give another path"
            }
            // Every page must be missing. A page the file still holds (an
            // existing file, a guest that ran here before) would never
            // fault, and a receiver's UFFDIO_COPY onto it would answer
            // EEXIST and keep the stale bytes. The writer lock says no other
            // livemig process writes this file.
            try ram.discard(offset: 0, length: ram.block.size)
            let base = UInt64(UInt(bitPattern: ram.base))
            userfault = try Userfault(pageSize: ram.block.pageSize)
            try userfault.registerMissing(address: base, length: ram.block.size)
            // The words a receiver reads when it finds us, before the run
            // state that tells it to look (release: pairs with its acquire
            // load of the run state).
            control.throttlePercent = 0
            control.sourcePID = 0
            control.resetPauseAcknowledgements()
            control.guestThreads = 0
            control.guestPID = getpid()
            control.handoffSocketPath = socket
            server = try FaultHandoffServer(
                path: socket, userfault: userfault, base: base, length: ram.block.size, pageSize: ram.block.pageSize)
            // Let go of the writer byte: the lock's deinit closes its
            // descriptor, and with it the kernel drops the lock.
            withExtendedLifetime(prepareLocks) {}
            prepareLocks = []
            control.setRunState(.waitingIncoming)
        } catch {
            for path in created { unlink(path.string) }
            throw error
        }
        self.ram = ram
        self.control = control
        self.guestLock = guestLock
        self.userfault = userfault
        self.server = server
        self.socketPath = socket
    }

    deinit { finish() }

    /// Waits until a receiver sets *incoming* (futex on the run state, in
    /// 50 ms slices so `stop()` is seen), `stop()`, or a run state that
    /// ends the wait. *incomplete* (a migration is writing the guest) keeps
    /// it waiting.
    public func waitForStart() -> WaitEnd {
        while true {
            if stopFlag.load(ordering: .relaxed) { return .stopped }
            let state = control.runState
            switch state {
            case .waitingIncoming, .incomplete:
                control.waitWhile(state, timeout: 0.05)
            case .incoming:
                return .started
            case .running, .pauseRequested, .migrated, .handedOver:
                return .abandoned(state)
            }
        }
    }

    /// Ends `waitForStart()` (from a signal watcher or another thread).
    public func stop() {
        stopFlag.store(true, ordering: .relaxed)
        control.wakeWaiters()
    }

    /// Whether `stop()` was called.
    public var stopRequested: Bool { stopFlag.load(ordering: .relaxed) }

    /// Once the guest runs: takes the RAM file's writer lock as soon as the
    /// receiver has let go of it (tried every 50 ms on a thread of its own,
    /// until taken or `finish()`), so that from then on no other livemig
    /// process writes this guest's RAM. Returns at once.
    public func claimRAMWhenFree() {
        let paths = ram.paths
        let claim = ramClaim
        ramClaimer.withLock { t in
            guard t == nil, !claim.done.load(ordering: .relaxed) else { return }
            t = WorkerThread(name: "guest/ramlock") {
                var held: [OwnerLock] = []
                while !claim.done.load(ordering: .relaxed) {
                    // Every block's file, one after another as each is free.
                    while held.count < paths.count, let l = try? OwnerLock.claimRAM(paths[held.count]) { held.append(l) }
                    if held.count == paths.count {
                        claim.lock.withLock { $0 = held }
                        return
                    }
                    var ts = timespec(tv_sec: 0, tv_nsec: 50_000_000)
                    nanosleep(&ts, nil)
                }
            }
        }
    }

    /// Whether this guest holds its RAM file's writer lock now.
    public var holdsRAMLock: Bool { ramClaim.lock.withLock { !$0.isEmpty } }

    /// Waits, in 50 ms slices, until the receiver let go of the RAM and this
    /// guest took its writer lock (`claimRAMWhenFree`), or `stop()`. A guest
    /// whose workload ended during postcopy calls it before exiting: its
    /// process owns the userfaultfd, and exiting would fail the receiver's
    /// placing of the pages still on their way. Returns whether it holds
    /// the lock.
    public func awaitReceiverDone() -> Bool {
        while !holdsRAMLock {
            if stopRequested { return false }
            var ts = timespec(tv_sec: 0, tv_nsec: 50_000_000)
            nanosleep(&ts, nil)
        }
        return true
    }

    /// Stops the hand-off server (removing its socket file), clears the
    /// socket path from the control file and stops claiming the RAM lock.
    /// Call it when the guest exits or gives up. The userfaultfd stays
    /// open until this object goes. Idempotent.
    public func finish() {
        guard !finished.exchange(true, ordering: .relaxed) else { return }
        ramClaim.done.store(true, ordering: .relaxed)
        if let t = ramClaimer.withLock({ $0 }) { t.join() }
        server.stop()
        control.handoffSocketPath = nil
    }

    /// The RAM writer lock once taken, and the claimer thread's stop flag
    /// (a box of its own, so the thread does not keep the guest alive).
    private final class RAMClaim: Sendable {
        let lock = Mutex<[OwnerLock]>([])
        let done = Atomic<Bool>(false)
    }

    /// `path` made absolute against the working directory.
    private static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return (cwd == "/" ? "" : cwd) + "/" + (path.hasPrefix("./") ? String(path.dropFirst(2)) : path)
    }
}
