import OSCall
import SystemPackage
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("system-call conventions")
struct SystemCallTests {
    /// A stand-in for a call that a signal interrupts `times` times, then
    /// returns `result` (or fails with `error` when given).
    final class FlakyCall {
        var interruptions: Int
        let result: Int
        let error: Int32?
        var calls = 0

        init(interruptions: Int, result: Int = 7, error: Int32? = nil) {
            self.interruptions = interruptions
            self.result = result
            self.error = error
        }

        func callAsFunction() -> Int {
            calls += 1
            if interruptions > 0 {
                interruptions -= 1
                errno = EINTR
                return -1
            }
            if let error {
                errno = error
                return -1
            }
            return result
        }
    }

    @Test("retrying repeats a call while it fails with EINTR and returns its result")
    func retriesInterrupted() throws {
        let call = FlakyCall(interruptions: 3)
        #expect(try SystemCall.retrying { call() } == 7)
        #expect(call.calls == 4)
    }

    @Test("retrying throws any other errno at once, as an Errno")
    func throwsOtherErrors() {
        let call = FlakyCall(interruptions: 1, error: EBADF)
        #expect(throws: Errno.badFileDescriptor) { try SystemCall.retrying { call() } }
        #expect(call.calls == 2)
    }

    @Test("once does not repeat an interrupted call")
    func onceDoesNotRetry() {
        let call = FlakyCall(interruptions: 1)
        #expect(throws: Errno.interrupted) { try SystemCall.once { call() } }
        #expect(call.calls == 1)
    }

    @Test("retryingNegated reads -errno results (liburing's convention)")
    func negated() throws {
        var results: [Int32] = [-EINTR, -EINTR, 5]
        #expect(try SystemCall.retryingNegated { results.removeFirst() } == 5)
        #expect(results.isEmpty)
        #expect(throws: Errno.noSuchProcess) { try SystemCall.retryingNegated { -ESRCH } }
        #expect(SystemCall.error(negated: Int32(-EPIPE)) == .brokenPipe)
    }

    @Test("a real syscall: read from a closed pipe end fails with EBADF")
    func realCall() throws {
        var fds: [Int32] = [0, 0]
        #expect(pipe(&fds) == 0)
        close(fds[0])
        close(fds[1])
        var byte: UInt8 = 0
        #expect(throws: Errno.badFileDescriptor) { try SystemCall.retrying { read(fds[0], &byte, 1) } }
    }

    @Test("processExists: this process exists; a reaped child does not")
    func liveness() throws {
        #expect(SystemCall.processExists(getpid()))
        let child = fork()
        if child == 0 { _exit(0) }
        var status: Int32 = 0
        #expect(waitpid(child, &status, 0) == child)
        #expect(!SystemCall.processExists(child), "pid \(child) was reused already")
    }

    @Test("the monotonic clock runs forward in both units")
    func clock() {
        let s0 = Monotonic.now, n0 = Monotonic.nanoseconds
        usleep(2_000)
        #expect(Monotonic.now > s0)
        #expect(Monotonic.nanoseconds > n0)
        #expect(abs(Double(Monotonic.nanoseconds) / 1e9 - Monotonic.now) < 1)
    }
}
