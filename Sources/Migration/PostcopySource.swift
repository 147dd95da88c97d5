import Dispatch
import GuestMemory
import MigrationWire
import Synchronization
import URing
import WorkerThreads

/// The source's postcopy phase, next to the background pusher
/// (`SourceMigration.pushUnsent`): a request server thread
/// (`mig/src/requests`) reads the destination's page requests on the
/// preempt channel's return direction and answers each at once on the
/// preempt channel, so a requested page never waits behind background
/// packets (docs/PROTOCOL.md §8).
///
/// Who touches what:
/// - `unsent` holds the pages the destination lacks. The pusher harvests
///   whole words; this thread takes requested pages out bit by bit
///   (`DirtyBitmap.take`), so the pusher skips them. A requested page is
///   sent even when the pusher already took it: it may be queued behind
///   a whole job on a multifd channel, and the destination takes a second
///   copy for what it is (the source RAM no longer changes).
/// - `cursor` (the page after the last request) tells the pusher where to
///   go on (locality, as QEMU and CRIU do); it takes the value with an
///   exchange.
/// - The preempt sender is used by this thread only, under `preempt`'s
///   lock: for each request, and for the final SYNC once the destination's
///   `multifd-drained` arrived (`finishWhenDrained` waits for that), after
///   which nothing more is sent on it.
/// - Without a preempt channel for pages (`--no-preempt`, for
///   comparison), requests are queued for the pusher to send first on the
///   multifd channels.
final class PostcopySource: Sendable {
    private let unsent: DirtyBitmap
    private let requests: ControlChannel
    private let latch: FailureLatch
    private let answersOnPreempt: Bool
    private let wholeWindows: Bool
    private let pageSize: UInt64
    private let preempt: Mutex<Preempt>
    private let queue = Mutex<[PageRange]>([])
    private let thread = Mutex<WorkerThread?>(nil)
    private let priority: FaultPathScheduling
    /// How requests name pages (block id, page in the block).
    private let numbering: PageNumbering
    /// The page after the last requested range, or -1.
    let cursor = Atomic<Int>(-1)
    /// Signalled by the request server once it sent the preempt SYNC
    /// after `multifd-drained`.
    private let drained = DispatchSemaphore(value: 0)
    /// Page requests answered (QEMU's `postcopy-requests`).
    let served = Atomic<UInt64>(0)

    // @unchecked: lives in `preempt` and is used only under its lock.
    private struct Preempt: ~Copyable, @unchecked Sendable {
        let sender: PacketSender
        let job = MultiFDJob(capacity: 1)
        var pages = MultiFDPages()
        var closed = false
    }

    init(
        unsent: DirtyBitmap, sender: PacketSender, requests: ControlChannel, latch: FailureLatch, answersOnPreempt: Bool,
        pageSize: UInt64, numbering: PageNumbering, priority: FaultPathScheduling, wholeWindows: Bool
    ) {
        self.numbering = numbering
        self.wholeWindows = wholeWindows
        self.priority = priority
        self.unsent = unsent
        self.requests = requests
        self.latch = latch
        self.answersOnPreempt = answersOnPreempt
        self.pageSize = pageSize
        preempt = Mutex(Preempt(sender: sender))
    }

    func start() {
        let t = WorkerThread(name: "mig/src/requests", prologue: { [priority] in priority.apply(to: "the request server") }) {
            [self] in serve()
        }
        thread.withLock { $0 = t }
    }

    /// The requests queued for the pusher (`--no-preempt`), taken.
    func takeQueued() -> [PageRange] {
        queue.withLock { q in
            defer { q.removeAll(keepingCapacity: true) }
            return q
        }
    }

    /// Ends the preempt channel once the destination says every multifd
    /// channel has delivered its SYNC (`multifd-drained`): until then the
    /// request server answers, since the pages pushed last may still be in
    /// the sockets' buffers (megabytes: milliseconds for a guest thread
    /// that waits on one of them). The request server sends the SYNC; this
    /// waits for it. Call after the multifd SYNC of the last round.
    func finishWhenDrained() throws(MigrationError) {
        while drained.wait(timeout: .now() + .milliseconds(50)) == .timedOut {
            try latch.check()
        }
        try latch.check()
    }

    /// Ends the preempt channel: its SYNC, after which no page goes on it
    /// (requests that still come were answered by pages already sent).
    private func finish() throws(MigrationError) {
        let error: MigrationError? = preempt.withLock { p in
            p.closed = true
            do throws(MigrationError) {
                try p.sender.sendSync()
                return nil
            } catch {
                return error
            }
        }
        if let error { throw error }
    }

    /// Joins the thread; call after the preempt socket was shut down.
    func join() {
        if let t = thread.withLock({ t -> WorkerThread? in
            defer { t = nil }
            return t
        }) {
            t.join()
        }
    }

    private var isClosed: Bool { preempt.withLock { $0.closed } }

    private func serve() {
        do throws(MigrationError) {
            while true {
                let m = try requests.receive("waiting for page requests on the preempt channel")
                if case .multifdDrained = m {
                    // After the preempt SYNC this channel's work is done:
                    // what the destination sends after it (a hang-up, or a
                    // second 'multifd-drained' from a faulty peer) ends this
                    // thread and nothing else. The outcome is the main
                    // channel's (`complete`, `completed`): failing the latch
                    // here, with the last round over and the guest running
                    // on the destination, would only make that end less
                    // clear.
                    if isClosed { return }
                    try finish()
                    drained.signal()
                    continue
                }
                guard case .pageRequest(let asked) = m else {
                    if case .error(let text) = m { throw MigrationError(.peer, "destination failed: \(text)") }
                    throw MigrationError(.protocolViolation, "'\(m.name)' on the preempt channel; only page requests come there")
                }
                guard let local = numbering.local(asked) else {
                    throw MigrationError(.protocolViolation, "page request for \(numbering.describe(asked))")
                }
                // A request names the faulting page and a window after it
                // (`PostcopyFaults.requestWindow`). Under --max-bandwidth
                // only the faulting page bypasses the limit; the rest stays
                // with the limited pusher, whose cursor moves right there.
                let r = wholeWindows ? local : PageRange(block: local.block, first: local.first, count: 1)
                served.add(1, ordering: .relaxed)
                for p in r.first..<(r.first + r.count) { _ = unsent.take(page: Int(p)) }
                cursor.store(Int(r.first + r.count), ordering: .relaxed)
                if answersOnPreempt {
                    try send(r)
                } else {
                    queue.withLock { $0.append(r) }
                }
            }
        } catch {
            // After `finish` the destination may hang up: not a failure.
            if isClosed || latch.hasFailed { return }
            latch.fail(error)
        }
    }

    /// Sends the pages of `r` on the preempt channel: the first page (the
    /// one a guest thread waits on) in a packet of its own, then the rest,
    /// 128 per packet.
    private func send(_ r: PageRange) throws(MigrationError) {
        let pageSize = self.pageSize
        let error: MigrationError? = preempt.withLock { p in
            guard !p.closed else { return nil }
            var page = r.first
            let end = r.first + r.count
            do throws(MigrationError) {
                while page < end {
                    let batchEnd = page == r.first ? page + 1 : end
                    while page < batchEnd, !p.pages.isFull {
                        p.pages.append(offset: page * pageSize, block: r.block)
                        page += 1
                    }
                    // The batch goes into the job's slot, an empty one comes back.
                    p.job.take(&p.pages)
                    defer { p.job.reset() }
                    try p.sender.sendJob(p.job) {}
                }
                return nil
            } catch {
                return error
            }
        }
        if let error { throw error }
    }
}
