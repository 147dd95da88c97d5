import Dispatch
import Synchronization

/// The destination's shared end-of-round barrier (docs/PROTOCOL.md §5).
///
/// Who waits on what, and who posts:
///
/// - A receiver (`PacketReceiver.run`) that reads a SYNC packet posts
///   `synced` once, then waits on its own channel's `resume[id]`. When it
///   wakes it leaves if the latch has failed or `quit` is set, and reads
///   the next round otherwise.
/// - The main thread (`DestinationMigration.serveControl`), on the
///   end-of-round marker, waits for N posts of `synced` (one per channel),
///   checking the latch after each, then posts every `resume` once. So no
///   receiver reads a page of round k+1 before every page of round k has
///   landed, and the semaphores order the receivers' plain stores (the
///   page table, `roundSeen`) before the main thread's reads.
/// - Only the main thread sets `quit` (release), before it replies
///   `completed`; receivers load it (acquire) and then treat the source
///   closing their channels as the end, not a failure.
/// - On failure, `wakeAll()` (the latch's waker) posts `synced` N times and
///   every `resume` once, so neither side stays blocked: the main thread's
///   next latch check throws, and a woken receiver sees the failed latch
///   and returns. A post that no one waits for yet is kept by its
///   semaphore, so a thread that reaches its wait later returns at once.
final class RoundBarrier: Sendable {
    /// Posted by each receiver at its SYNC; waited on by the main thread.
    let synced = DispatchSemaphore(value: 0)
    /// One per channel: posted by the main thread to release that
    /// channel's receiver into the next round.
    let resume: [DispatchSemaphore]
    /// Set by the main thread once the migration completed: receivers then
    /// leave quietly when their sockets close.
    let quit = Atomic<Bool>(false)

    init(channels: Int) {
        resume = (0..<channels).map { _ in DispatchSemaphore(value: 0) }
    }

    /// Releases every waiter after a failure: the main thread waiting on
    /// `synced` and every receiver waiting on its `resume`. Harmless to
    /// repeat, as a `FailureLatch` waker must be: extra posts only wake a
    /// thread that will see the failure.
    func wakeAll() {
        for _ in resume { synced.signal() }
        for s in resume { s.signal() }
    }
}
