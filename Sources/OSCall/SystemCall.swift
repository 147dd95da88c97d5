import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// The one place where livemig's Swift code meets the C error convention of
/// system calls: a call that fails returns -1 (or, for liburing, `-errno`)
/// and leaves the reason in the thread's `errno`.
///
/// Every raw call whose failure matters goes through one of these, so EINTR
/// is retried the same way everywhere and `errno` is read once, right after
/// the call that set it, as an `Errno` (swift-system keeps its own helpers
/// for this internal). Modelled on swift-system's `Internals/Syscalls.swift`.
public enum SystemCall {
    /// The calling thread's `errno` as an `Errno`. Read it right after the
    /// call that failed: almost any later call may overwrite it.
    @inlinable public static var lastError: Errno { Errno(rawValue: errno) }

    /// Calls `call` again while it fails with EINTR (a signal arrived before
    /// it could finish), and returns its result, or throws the `errno` of
    /// any other failure. For calls that return -1 on failure: `read`,
    /// `pread`, `send`, `recv`, `poll`, `accept`, `ftruncate`, `madvise`...
    ///
    /// Not for `connect` or `close`: after EINTR those go on (or are done)
    /// in the kernel, and a second call fails differently. Use `once`.
    @inlinable
    public static func retrying<R: SignedInteger & FixedWidthInteger>(_ call: () -> R) throws(Errno) -> R {
        while true {
            let r = call()
            if r >= 0 { return r }
            let e = lastError
            if e != .interrupted { throw e }
        }
    }

    /// Calls `call` once and returns its result, or throws its `errno` when
    /// it returned a negative value. For calls that must not be repeated
    /// after EINTR (`connect`) and calls that cannot be interrupted.
    @inlinable
    public static func once<R: SignedInteger & FixedWidthInteger>(_ call: () -> R) throws(Errno) -> R {
        let r = call()
        if r >= 0 { return r }
        throw lastError
    }

    /// `retrying` for calls that return `-errno` instead of setting `errno`
    /// (liburing, and the CShims wrappers around it).
    @inlinable
    public static func retryingNegated<R: SignedInteger & FixedWidthInteger>(_ call: () -> R) throws(Errno) -> R {
        while true {
            let r = call()
            if r >= 0 { return r }
            let e = error(negated: r)
            if e != .interrupted { throw e }
        }
    }

    /// The `Errno` of a negative result that carries `-errno` (an io_uring
    /// completion's `res`, a liburing return value).
    @inlinable
    public static func error<R: SignedInteger & FixedWidthInteger>(negated result: R) -> Errno {
        Errno(rawValue: CInt(truncatingIfNeeded: -result))
    }

    /// Whether process `pid` exists: `kill(pid, 0)` succeeds, or fails only
    /// because we may not signal it (EPERM). False when it fails with ESRCH
    /// (no such process, or a zombie that was reaped).
    /// The whole contents of a small file (a /proc file: its size is not
    /// known before reading), or nil when it cannot be read.
    public static func readSmallFile(_ path: String, limit: Int = 1 << 22) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while out.count < limit {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0, errno == EINTR { continue }
            guard n >= 0 else { return nil }
            if n == 0 { break }
            out.append(contentsOf: chunk[..<n])
        }
        return out
    }

    public static func processExists(_ pid: pid_t) -> Bool {
        kill(pid, 0) == 0 || lastError != .noSuchProcess
    }
}

/// The monotonic clock (`CLOCK_MONOTONIC`): never set back, and the same
/// clock for every process of one host (the guest's pause lease is a
/// deadline on it that two processes read). It does not advance while the
/// machine is suspended.
public enum Monotonic {
    /// Nanoseconds on the clock.
    public static var nanoseconds: UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Seconds on the clock.
    public static var now: Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
