import CShims
import Dispatch

#if canImport(Glibc)
    import Glibc
#endif

/// A joinable OS thread. The body is a `@Sendable` closure run by a C entry
/// point, so it never inherits an actor's isolation (a closure formed in a @MainActor context would assert that actor at run time).
public final class WorkerThread: Sendable {
    private final class Start {
        let name: String
        let body: @Sendable () -> Void
        init(name: String, body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    private let handle: pthread_t

    /// Starts a thread named `name` (first 15 bytes shown by `ps`/`top`).
    public init(name: String, _ body: @escaping @Sendable () -> Void) {
        let start = Unmanaged.passRetained(Start(name: name, body: body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, workerThreadEntry, start)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        handle = thread
    }

    /// Starts a thread that runs `prologue`, then `body`, and returns once
    /// the prologue has run. For a thread that sets its own scheduling
    /// (`FaultPathPriority.apply`): until it has, it is an ordinary thread,
    /// and on a host whose CPUs are busy with higher-priority work its
    /// first run (and so its priority) could wait for many milliseconds
    /// (traced: 21 ms behind the postcopy transfer threads at nice -19).
    public convenience init(name: String, prologue: @escaping @Sendable () -> Void, _ body: @escaping @Sendable () -> Void) {
        let ran = DispatchSemaphore(value: 0)
        self.init(name: name) {
            prologue()
            ran.signal()
            body()
        }
        ran.wait()
    }

    /// Threads for work the kernel spreads over CPUs (faulting a RAM file
    /// in, tearing its page tables down): one per online CPU, up to 8.
    public static var parallelism: Int { max(1, min(8, sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// Waits for the thread to end. Call once.
    public func join() { pthread_join(handle, nil) }

    fileprivate static func run(_ raw: UnsafeMutableRawPointer) {
        let start = Unmanaged<Start>.fromOpaque(raw).takeRetainedValue()
        lm_set_thread_name(String(start.name.prefix(15)))
        start.body()
    }
}

private func workerThreadEntry(_ raw: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    WorkerThread.run(raw!)
    return nil
}

/// Scheduling for the threads on a postcopy fault's path (the destination's
/// fault reader and preempt receiver, the source's request server).
///
/// Those threads block between short pieces of work, and each fault waits
/// on three of their wake-ups in turn. On a machine whose CPUs are busy
/// with the pusher, the receivers and the guest, an ordinary wake-up can
/// wait a scheduler slice (milliseconds) for a CPU; a real-time one runs at
/// once. Never give this to a thread that spins.
public enum FaultPathPriority: String, Sendable, CaseIterable {
    /// SCHED_FIFO at the lowest real-time level; nice -10 when the process
    /// may not use real time.
    case realtime
    /// Left as started.
    case normal

    /// What `apply()` did to the calling thread.
    public enum Outcome: Sendable, Equatable {
        case realtime
        /// Real time was refused (with this errno); the thread got nice -10.
        case nice(refused: Int32)
        /// Neither worked (the real-time attempt's errno); unchanged.
        case unchanged(refused: Int32)
        /// `.normal` asked for nothing.
        case asStarted
    }

    /// For a thread that moves postcopy's background pages (the source's
    /// pusher and senders, the destination's multifd receivers) once
    /// postcopy runs: nice -19 with `.realtime`, never real time (they run
    /// flat out). Every page they have not moved yet is a fault the guest
    /// may still take, so on a busy host they should not wait behind the
    /// guest's own threads. Returns whether the priority changed.
    @discardableResult
    public func applyToTransfer() -> Bool {
        guard self == .realtime else { return false }
        return lm_set_thread_nice(-19) == 0
    }

    /// Applies the priority to the calling thread.
    public func apply() -> Outcome {
        guard self == .realtime else { return .asStarted }
        let r = lm_set_thread_realtime(1)
        if r == 0 { return .realtime }
        return lm_set_thread_nice(-19) == 0 ? .nice(refused: -r) : .unchanged(refused: -r)
    }
}
