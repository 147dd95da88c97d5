import GuestMemory
import MigrationWire
import OSCall
import Synchronization
import WorkerThreads

/// The destination's postcopy state shared by its threads: the incoming
/// guest's userfaultfd and mapping, whether postcopy placement is on, and
/// the fault log.
///
/// Who does what:
/// - The main thread turns `active` on (release) at `postcopy-start`, after
///   it dropped the stale pages and before it replies `postcopy-ready`. The
///   source sends no page of the postcopy phase before that reply, so every
///   receiver that loads `active` (acquire) for such a packet sees it on.
/// - Receivers place postcopy pages only through the guest's userfaultfd
///   (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`: the kernel fills a page before it
///   maps it, so the guest never sees half of one), never through their own
///   mapping: a missing page touched there would be allocated as zeros
///   and never fault in the guest.
/// - `PostcopyFaults` (one thread) reads the guest's faults and asks for
///   the pages.
final class PostcopyTarget: Sendable {
    let userfault: Userfault
    /// The guest's mapping of the RAM, in the guest's address space.
    let guestBase: UInt64
    let pageSize: UInt64
    let guestPID: Int32
    let faults: PostcopyFaultLog
    /// Pages across the RAM blocks, and how requests name them.
    let numbering: PageNumbering
    private let on = Atomic<Bool>(false)

    init(_ attachment: IncomingAttachment, numbering: PageNumbering) {
        self.numbering = numbering
        let pageCount = numbering.pageCount
        userfault = attachment.userfault
        guestBase = attachment.guestBase
        pageSize = attachment.pageSize
        guestPID = attachment.guestPID
        faults = PostcopyFaultLog(pageCount: pageCount)
    }

    /// Postcopy placement is on (acquire).
    var active: Bool { on.load(ordering: .acquiring) }

    /// Turns postcopy placement on (release); see the type's comment.
    func activate() { on.store(true, ordering: .releasing) }
}

/// The destination's fault thread (`mig/faults`): reads the incoming
/// guest's page faults and, for a page that has not arrived, sends a page
/// request on the preempt channel's return direction. A fault on a page
/// that arrived meanwhile only wakes its thread (the placement woke the
/// threads that waited then; this one faulted just before it).
///
/// A page is requested once (`PostcopyFaultLog.fault` says when); its
/// arrival on either channel ends every wait on it (the receivers call
/// `PostcopyFaultLog.placed`). A request lost with a broken connection
/// fails the migration (postcopy-paused).
final class PostcopyFaults: Sendable {
    private let target: PostcopyTarget
    private let arrived: DirtyBitmap
    private let requests: ControlChannel
    private let latch: FailureLatch
    private let stopping = Atomic<Bool>(false)
    private let thread = Mutex<WorkerThread?>(nil)
    /// Faults read, and faults outside the registered range (ignored).
    let faultsRead = Atomic<UInt64>(0)
    /// Pages asked for on this connection set (only this thread touches
    /// it). A request is answered whole, so a fault on a page set here
    /// waits for it without asking again. A new attempt after a break
    /// starts empty: what was asked on the broken connections is asked
    /// again (`start(resend:)`) or pushed.
    private let requested: DirtyBitmap

    private let priority: FaultPathScheduling

    init(target: PostcopyTarget, arrived: DirtyBitmap, requests: ControlChannel, latch: FailureLatch, priority: FaultPathScheduling) {
        self.priority = priority
        requested = DirtyBitmap(pageCount: arrived.pageCount)
        self.target = target
        self.arrived = arrived
        self.requests = requests
        self.latch = latch
    }

    /// Starts the thread; `guestThreads` says how many threads the guest
    /// runs (read once per poll slice, for the blocktime).
    /// A recovery passes `resend`: pages whose requests went out on the
    /// broken connections and that have not arrived; the thread asks for
    /// them again first.
    func start(resend: [Int] = [], guestThreads: @escaping @Sendable () -> Int) {
        let t = WorkerThread(name: "mig/faults", prologue: { [priority] in priority.apply(to: "the fault thread") }) { [self] in
            run(resend: resend, guestThreads: guestThreads)
        }
        thread.withLock { $0 = t }
    }

    /// Ends the thread (within one poll slice) and joins it. Idempotent.
    func stop() {
        stopping.store(true, ordering: .relaxed)
        if let t = thread.withLock({ t -> WorkerThread? in
            defer { t = nil }
            return t
        }) {
            t.join()
        }
    }

    private func run(resend: [Int], guestThreads: @Sendable () -> Int) {
        let pageSize = target.pageSize, base = target.guestBase
        let pages = UInt64(arrived.pageCount)
        do throws(MigrationError) {
            for page in resend where !arrived.isDirty(page: page) {
                try requests.send(.pageRequest(target.numbering.wire(first: page, count: 1)))
                target.faults.requestSent()
            }
            while !stopping.load(ordering: .relaxed), !latch.hasFailed {
                target.faults.setGuestThreads(guestThreads())
                let faults: [Userfault.Fault]
                do {
                    faults = try target.userfault.readFaults(timeout: 0.05)
                } catch {
                    throw MigrationError(error)
                }
                for f in faults {
                    faultsRead.add(1, ordering: .relaxed)
                    guard f.address >= base, (f.address - base) / pageSize < pages else { continue }
                    let page = Int((f.address - base) / pageSize)
                    let now = Monotonic.now
                    if arrived.isDirty(page: page) {
                        try wake(page)
                        continue
                    }
                    // The first wait on a page asks for it, unless an earlier
                    // request's window holds it: then it is on its way.
                    if target.faults.fault(page: page, thread: f.threadID, at: now), !requested.isDirty(page: page) {
                        let count = window(from: page)
                        for p in page..<(page + count) { requested.mark(page: p) }
                        try requests.send(.pageRequest(target.numbering.wire(first: page, count: count)))
                        target.faults.requestSent()
                    }
                    // Placed between the check and the wait's record: the
                    // placement woke the thread, but may not have seen the
                    // wait (it looks only when one is open); end it here.
                    if arrived.isDirty(page: page) {
                        target.faults.placed(page: page, at: Monotonic.now)
                        try wake(page)
                    }
                }
            }
        } catch {
            latch.fail(error)
        }
    }

    /// Tells the source, after every page request sent so far, that every
    /// multifd channel delivered its end-of-postcopy SYNC (`multifd-drained`,
    /// docs/PROTOCOL.md §8.5). Any thread; sends are serialised.
    func sendMultifdDrained() throws(MigrationError) {
        try requests.send(.multifdDrained)
    }

    /// Pages asked for with one fault: the faulting page and the ones after
    /// it that have neither arrived nor been asked for, up to this many.
    ///
    /// A guest thread that walks its memory (a copy, a scan, a zeroing)
    /// then finds the next pages placed, or on their way, instead of asking
    /// for each. The source sends the faulting page in a packet of its own
    /// first (its latency is that of one page), then the rest; they would
    /// have been pushed anyway (the source takes them out of its unsent
    /// set), only later.
    static let requestWindow = 16

    /// The pages a fault on `page` asks for: it and the adjacent pages after
    /// it in its block that have not arrived and were not asked for, at
    /// most `requestWindow`.
    private func window(from page: Int) -> Int {
        let end = target.numbering.block(of: page).pages.upperBound
        var count = 1
        while count < Self.requestWindow, page + count < end, !arrived.isDirty(page: page + count),
            !requested.isDirty(page: page + count)
        {
            count += 1
        }
        return count
    }

    private func wake(_ page: Int) throws(MigrationError) {
        do {
            try target.userfault.wake(address: target.guestBase + UInt64(page) * target.pageSize, length: target.pageSize)
        } catch {
            throw MigrationError(error)
        }
    }
}

/// Where a migration stands with respect to postcopy (either side).
enum PostcopyPhase: UInt8, AtomicRepresentable, Sendable {
    /// Precopy, or no postcopy at all.
    case none
    /// After the point of no return (the destination committed): a
    /// failure now is *postcopy-paused*.
    case postcopyActive
    /// Every page arrived.
    case completed
}

/// What a postcopy recovery resumes from (docs/PROTOCOL.md §8.6): the
/// destination's state that outlives its connections. Set when the
/// postcopy migration's channels are set up; `rounds` and `guestState`
/// when `postcopy-start` arrives.
struct PostcopyResumePoint: @unchecked Sendable {
    // @unchecked: RAMFile, the bitmaps and the table are shared by design
    // (their own atomics); the point itself lives under a Mutex.
    let session: SessionID
    let ram: RAMFile
    let arrived: DirtyBitmap
    let roundSeen: DirtyBitmap
    let table: PageTable
    let target: PostcopyTarget
    let start: Double
    let setupTime: Double
    var rounds: UInt64 = 0
    var guestState: [UInt8]?
}
