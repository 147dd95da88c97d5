import Dispatch
import Synchronization
import WorkerThreads

/// What a sender thread does with work: the real one writes packets to its
/// socket; tests plug in recorders. Each channel has its own instance, used
/// only by that channel's thread.
public protocol ChannelTransport: AnyObject {
    /// Sends the job's batches in order, one packet each, and calls
    /// `release` exactly once, as soon as it no longer reads the job (before
    /// the write when it can): the migration thread may then queue this
    /// channel's next job while the write runs. The job is read-only here.
    /// A transport that throws before releasing does not release.
    func sendJob(_ job: MultiFDJob, release: () -> Void) throws(MigrationError)
    /// Sends this channel's SYNC for the current round.
    func sendSync() throws(MigrationError)
    /// Postcopy runs from now on; called by the sender thread between jobs.
    func enterPostcopy()
}

extension ChannelTransport {
    public func enterPostcopy() {}
}

/// One sender channel's hand-off state (QEMU's `MultiFDSendParams`).
///
/// Who may touch what:
/// - `job`: the migration thread while `pendingJob` is false (it moves its
///   filled batches in), the sender thread while `pendingJob` is true.
/// - `pendingJob`: set to true only by the migration thread (release), set to
///   false only by the sender thread (release) once it is done with `job`.
/// - `pendingSync`: set by the migration thread, cleared by the sender.
final class SendChannel: @unchecked Sendable {
    // @unchecked: `job` is a plain object handed over through `pendingJob`'s
    // release/acquire pairs, which Swift cannot check; every other field is
    // an atomic or a semaphore.
    let id: Int
    let pendingJob = Atomic<Bool>(false)
    let pendingSync = Atomic<Bool>(false)
    /// Work posted (a batch or a sync): one post per unit of work.
    let sem = DispatchSemaphore(value: 0)
    /// Sync done: posted by the sender after its SYNC packet is written.
    let semSync = DispatchSemaphore(value: 0)
    let job: MultiFDJob

    init(id: Int, jobCapacity: Int) {
        self.id = id
        job = MultiFDJob(capacity: jobCapacity)
    }
}

/// The lockless hand-off between the migration thread and N sender threads,
/// after QEMU's multifd (docs/ARCHITECTURE.md). One migration thread calls `send` and
/// `sync`; each sender thread runs `senderLoop`.
///
/// Batches are handed out a job at a time (`MultiFDJob`, several packets per
/// gather write); `send` fills the migration thread's staging job and hands
/// it over when full, `sync` hands over the partial one first.
///
/// Counting on `channelsReady`: every sender posts it once idle at start,
/// then once per job it releases and once per SYNC it wrote; the migration
/// thread waits once per job it hands out and once per channel per sync. So
/// a successful wait guarantees at least one channel has `pendingJob == false`.
public final class MultiFDSend: Sendable {
    let channels: [SendChannel]
    /// The job being filled; migration thread only.
    private let staging: MultiFDJob
    private let channelsReady = DispatchSemaphore(value: 0)
    private let quitting = Atomic<Bool>(false)
    /// Set once postcopy runs: each sender raises its own priority at its
    /// next wake-up (`raiseForPostcopy`).
    private let postcopyRaise = Atomic<Bool>(false)
    /// Whether the postcopy raise includes the transfer priority.
    private let postcopyPriority = Atomic<Bool>(false)
    /// Round-robin start for the next search; migration thread only.
    private let nextChannel = Atomic<Int>(0)
    public let latch: FailureLatch
    private let threads = PosixMutex<[WorkerThread]>([])

    public var channelCount: Int { channels.count }

    /// Starts one sender thread per transport. `batchesPerJob` is how many
    /// 128-page batches go out in one gather write (1...7).
    public init(transports: [any ChannelTransport], latch: FailureLatch, batchesPerJob: Int = MultiFDJob.defaultCapacity) {
        self.latch = latch
        staging = MultiFDJob(capacity: batchesPerJob)
        channels = transports.indices.map { SendChannel(id: $0, jobCapacity: batchesPerJob) }
        // Waking everything on failure: each waiter re-checks the latch after
        // every wait, so one extra post per semaphore is enough.
        let channels = self.channels, ready = channelsReady
        latch.onFailure {
            for c in channels {
                c.sem.signal()
                c.semSync.signal()
            }
            ready.signal()
        }
        for (i, t) in transports.enumerated() {
            let box = TransportBox(t)
            let channel = channels[i]
            let thread = WorkerThread(name: "mig/send/\(i)") { [self] in
                senderLoop(channel, box.transport)
            }
            threads.withLock { $0.append(thread) }
        }
    }

    /// Queues a full (or final partial) batch; hands the staging job to an
    /// idle channel once it is full. On return `pages` is an empty batch the
    /// caller may fill again. Migration thread only.
    public func send(_ pages: inout MultiFDPages) throws(MigrationError) {
        try latch.check()
        staging.take(&pages)
        if staging.isFull { try handOff() }
    }

    /// Hands the staging job to an idle channel (QEMU's
    /// `multifd_send_pages`). Migration thread only.
    private func handOff() throws(MigrationError) {
        channelsReady.wait()
        try latch.check()
        let n = channels.count
        var i = nextChannel.load(ordering: .relaxed)
        var chosen: SendChannel?
        for _ in 0..<n {
            // Relaxed scan: only the sender can flip pendingJob to false and
            // only we flip it to true, so a false we see stays false.
            if !channels[i].pendingJob.load(ordering: .relaxed) {
                chosen = channels[i]
                break
            }
            i = (i + 1) % n
        }
        guard let p = chosen else {
            // channelsReady promised an idle channel; its absence is a bug.
            preconditionFailure("channels_ready was posted but no channel is idle")
        }
        nextChannel.store((i + 1) % n, ordering: .relaxed)
        // Acquire: we may touch p.job only after the sender's last use of
        // it. Pairs with the store-release of `pendingJob = false` in
        // `senderLoop`. (QEMU uses a fence after a relaxed scan; an acquiring
        // load of the chosen channel is the same on x86 and ThreadSanitizer
        // understands it, which it does not for standalone fences.)
        _ = p.pendingJob.load(ordering: .acquiring)
        staging.move(to: p.job)
        // Release: the batches' contents are visible before the sender sees
        // the job. Pairs with the load-acquire of `pendingJob` in `senderLoop`.
        p.pendingJob.store(true, ordering: .releasing)
        p.sem.signal()
    }

    /// The end-of-round barrier, source side: every channel writes a SYNC
    /// packet after all the batches handed to it. Returns when all have.
    /// Migration thread only; flush the partial batch with `send` first.
    public func sync() throws(MigrationError) {
        if !staging.isEmpty { try handOff() }
        for c in channels {
            try latch.check()
            precondition(!c.pendingSync.load(ordering: .relaxed), "a sync is already pending")
            // Relaxed is enough: `sem.signal()` orders it before the
            // sender's `sem.wait()` returns.
            c.pendingSync.store(true, ordering: .relaxed)
            c.sem.signal()
        }
        for c in channels {
            channelsReady.wait()
            c.semSync.wait()
            try latch.check()
        }
    }

    /// Stops the sender threads (after the last sync) and joins them.
    /// Idempotent: the threads are taken out before they are joined.
    public func finish() {
        let running = threads.withLock { t -> [WorkerThread] in
            let r = t
            t = []
            return r
        }
        guard !running.isEmpty else { return }
        quitting.store(true, ordering: .releasing)
        for c in channels { c.sem.signal() }
        for t in running { t.join() }
    }

    /// One sender thread's life.
    ///
    /// The job is released (`pendingJob = false`, then `channelsReady`) as
    /// soon as the transport has encoded it, before its write completes: the
    /// migration thread can queue this channel's next job meanwhile, so the
    /// sender finds work waiting instead of sleeping on `sem` after every
    /// write. A channel's packets still leave in hand-off order: this one
    /// thread writes them one job after the other.
    /// Postcopy runs: before its next job every sender thread sends in
    /// system calls of at most `postcopyBytesPerCall` bytes
    /// (`ChannelTransport.enterPostcopy`) and, with `.realtime`, takes the
    /// transfer priority (`FaultPathPriority.applyToTransfer`).
    public func raiseForPostcopy(_ priority: FaultPathPriority) {
        postcopyPriority.store(priority == .realtime, ordering: .relaxed)
        postcopyRaise.store(true, ordering: .releasing)
    }

    func senderLoop(_ p: SendChannel, _ transport: any ChannelTransport) {
        channelsReady.signal()
        var raised = false
        while true {
            p.sem.wait()
            if latch.hasFailed || quitting.load(ordering: .acquiring) { return }
            // Acquire: pairs with the release in `raiseForPostcopy`, so
            // `postcopyPriority` is the one stored before it.
            if !raised, postcopyRaise.load(ordering: .acquiring) {
                raised = true
                transport.enterPostcopy()
                if postcopyPriority.load(ordering: .relaxed) { FaultPathPriority.realtime.applyToTransfer() }
            }
            // Acquire: pairs with the store-release of `pendingJob = true` in
            // `handOff`, so the batches' offsets are visible here.
            if p.pendingJob.load(ordering: .acquiring) {
                var released = false
                do {
                    try transport.sendJob(p.job) { [channelsReady] in
                        released = true
                        p.job.reset()
                        // Release: our reads of the job happen before the
                        // migration thread reuses it. Pairs with the
                        // acquiring load in `handOff`.
                        p.pendingJob.store(false, ordering: .releasing)
                        channelsReady.signal()
                    }
                } catch {
                    latch.failDeferringToPeer(error)
                    return
                }
                // A transport that returns without releasing would lose this
                // channel for good (and, with every channel, hang `handOff`).
                precondition(released, "transport for channel \(p.id) returned without releasing its job")
            } else if p.pendingSync.load(ordering: .relaxed) {
                do {
                    try transport.sendSync()
                } catch {
                    latch.failDeferringToPeer(error)
                    return
                }
                p.pendingSync.store(false, ordering: .relaxed)
                // The SYNC packet is written after every batch of this
                // channel: the semaphore orders it before `sync()` resumes.
                // channelsReady first: once `sync()` has its N semSync
                // posts, every channel's ready post for its SYNC is in too.
                channelsReady.signal()
                p.semSync.signal()
            } else {
                preconditionFailure("sender \(p.id) woke with neither a job nor a sync")
            }
        }
    }
}

/// Carries a transport into its thread. The transport is used by that
/// thread alone from then on, hence `@unchecked`.
private final class TransportBox: @unchecked Sendable {
    let transport: any ChannelTransport
    init(_ t: any ChannelTransport) { transport = t }
}
