import CShims

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
