#if canImport(Glibc)
    import Glibc
#endif

/// A value behind a `pthread_mutex_t`, for code that ThreadSanitizer checks
/// (tools/test.sh).
///
/// `Synchronization.Mutex` is the default everywhere else, but TSan cannot
/// follow it when it is contended: its slow path hands the lock over in
/// the kernel (a priority-inheritance futex), where no instrumented atomic
/// shows the acquire, so two threads taking turns on one `Mutex` look like
/// a data race. Checked with two threads adding to one `Mutex<Int>` under
/// `-sanitize=thread`: "Swift access race" on every run. TSan intercepts
/// `pthread_mutex_lock`, so a `PosixMutex` is seen for what it is.
public final class PosixMutex<Value>: @unchecked Sendable {
    // @unchecked: `value` is touched only between lock and unlock.
    private let handle: UnsafeMutablePointer<pthread_mutex_t>
    private var value: Value

    public init(_ value: Value) {
        self.value = value
        handle = .allocate(capacity: 1)
        handle.initialize(to: pthread_mutex_t())
        let rc = pthread_mutex_init(handle, nil)
        precondition(rc == 0, "pthread_mutex_init: \(rc)")
    }

    deinit {
        pthread_mutex_destroy(handle)
        handle.deallocate()
    }

    public func withLock<R, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(handle)
        defer { pthread_mutex_unlock(handle) }
        return try body(&value)
    }
}
