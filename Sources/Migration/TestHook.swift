#if canImport(Glibc)
    import Glibc
#endif

/// Test hook, for the fault matrix (Tests/LivemigIntegrationTests/FaultMatrixTests.swift):
/// with `LIVEMIG_TEST_STOP_AT=<point>` in its environment, `send` or
/// `receive` stops itself (SIGSTOP) when it reaches `<point>`, after saying
/// `livemig: test: stopped at <point>` on stderr. The test waits for that
/// line, applies a fault at exactly that point, then continues (SIGCONT) or
/// kills the process. Points: docs/FAULTS.md. Not for production use.
enum TestHook {
    /// Stops this process if `requested` (the configured point) is `point`.
    static func stop(at point: String, ifRequested requested: String?) {
        guard requested == point else { return }
        let line = Array("livemig: test: stopped at \(point)\n".utf8)
        _ = line.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
        raise(SIGSTOP)
    }
}
