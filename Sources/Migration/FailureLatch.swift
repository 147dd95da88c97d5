import Synchronization
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// The migration's one shared error: the first failure wins, and tripping
/// the latch wakes everything that could be blocked (sockets are shut down,
/// semaphores posted), so no thread is left waiting. See docs/ARCHITECTURE.md.
public final class FailureLatch: Sendable {
    // PosixMutex, not Mutex: these locks are taken by many threads at
    // once in the TSan pass (tools/test.sh), which cannot follow a
    // contended Synchronization.Mutex (see PosixMutex).
    private let first = PosixMutex<MigrationError?>(nil)
    private let tripped = Atomic<Bool>(false)
    private let wakers = PosixMutex<[@Sendable () -> Void]>([])

    public init() {}

    /// Records `error` if it is the first; then runs every waker once.
    /// Returns whether this call was the first.
    @discardableResult
    public func fail(_ error: MigrationError) -> Bool {
        let won = first.withLock { e -> Bool in
            if e != nil { return false }
            e = error
            return true
        }
        guard won else { return false }
        // Release: whoever sees `hasFailed` also sees `error`.
        tripped.store(true, ordering: .releasing)
        for wake in wakers.withLock({ $0 }) { wake() }
        return true
    }

    /// True once any thread failed (acquire; pairs with the store in `fail`).
    public var hasFailed: Bool { tripped.load(ordering: .acquiring) }

    /// The first failure, if any.
    public var error: MigrationError? { first.withLock { $0 } }

    /// Registers something to run when the latch trips (at once if it has).
    /// A waker may run twice when registration races the trip, so wakers
    /// must be harmless to repeat (shutdown, a semaphore post).
    public func onFailure(_ wake: @escaping @Sendable () -> Void) {
        wakers.withLock { $0.append(wake) }
        if hasFailed { wake() }
    }

    /// How long a thread that saw its peer close waits before claiming the
    /// failure: the peer's explanation on the main channel, if one is on its
    /// way, then wins (first failure wins) and the user reads the real reason.
    public static let peerExplanationGrace: UInt32 = 200_000

    /// Fails with `error`; a bare "peer closed" first gives the main channel
    /// a moment to deliver the peer's own reason.
    public func failDeferringToPeer(_ error: MigrationError) {
        if error.kind == .peer, !hasFailed { usleep(Self.peerExplanationGrace) }
        fail(error)
    }

    /// Throws the recorded failure, if any.
    public func check() throws(MigrationError) {
        if hasFailed, let e = error { throw e }
    }
}
