import Foundation
import GuestMemory
import Synchronization
import Testing
import Workload

#if canImport(Glibc)
    import Glibc
#endif

/// The stress guest in this process, driven through its control file the way
/// a source process drives it.
@Suite("StressGuest pause handshake", .serialized)
struct StressGuestTests {
    static let ramSize: UInt64 = 4 << 20

    /// `run()` on a background thread; `wait` returns its outcome.
    final class Runner: Sendable {
        let guest: StressGuest
        private let outcome = Mutex<StressOutcome?>(nil)
        private let done = DispatchSemaphore(value: 0)

        init(_ guest: StressGuest) {
            self.guest = guest
            Thread.detachNewThread { [self] in
                let o = guest.run()
                outcome.withLock { $0 = o }
                done.signal()
            }
        }

        /// The outcome, or nil when `run()` has not returned within `seconds`.
        func wait(_ seconds: Double) -> StressOutcome? {
            guard done.wait(timeout: .now() + seconds) == .success else { return nil }
            done.signal()
            return outcome.withLock { $0 }
        }

        /// Ends the guest whatever state it is in, so the test never leaves a
        /// thread writing files it is about to delete.
        func shutDown() {
            guest.stop()
            if wait(0) == nil {
                guest.control.setRunState(.migrated)
                // (Deleting the files under a guest that still runs is safe:
                // its mappings keep them alive.)
                if wait(30) == nil { Issue.record("the stress guest did not stop within 30 s of .migrated") }
            }
        }
    }

    /// A 4 MiB RAM file and its control file in a temp dir, and a guest over them.
    static func withGuest(
        threads: Int = 2, rate: UInt64? = 64 << 20, duration: Double? = nil,
        _ body: (StressGuest) throws -> Void
    ) throws {
        try withTempDir { dir in
            let ram = try RAMFile.create(path: filePath(dir.appendingPathComponent("ram")), size: ramSize, pageSize: 4096)
            let control = try GuestControl.create(path: filePath(dir.appendingPathComponent("control")), for: ram.block)
            var options = StressOptions()
            options.pattern = .counter
            options.threads = threads
            options.rate = rate
            options.duration = duration
            let guest = try StressGuest(ram: ram, control: control, options: options)
            try body(guest)
        }
    }

    static func decodeState(_ control: GuestControl) throws -> StressState {
        try StressState.decode(control.readState()).get()
    }

    static func snapshot(_ ram: RAMFile) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: ram.base, count: Int(ram.block.size)))
    }

    @Test("a fresh counter guest starts with every counter 0 and every page dirty")
    func freshCounterGuest() throws {
        try Self.withGuest { guest in
            #expect(guest.control.bitmap.dirtyCount() == 1024)
            let state = try Self.decodeState(guest.control)
            #expect(state.pattern == .counter)
            #expect(state.threads == 2)
            #expect(state.pageCount == 1024)
            #expect(CounterVerifier.verify(ram: guest.ram, state: state).passed)
        }
    }

    @Test("pause: every thread acknowledges, nothing changes, the RAM verifies; migrated ends run()")
    func pauseHandshake() throws {
        try Self.withGuest { guest in
            let control = guest.control
            // The initial all-dirty marks: take them, so new marks mean new writes.
            control.bitmap.harvestAll { _ in }
            let runner = Runner(guest)
            defer { runner.shutDown() }

            #expect(waitUntil(5) { control.bitmap.dirtyCount() > 0 }, "the guest wrote nothing in 5 s")
            #expect(control.guestThreads == 2)

            control.sourcePID = getpid()
            control.renewLease()
            control.setRunState(.pauseRequested)
            let paused = waitUntil(5) {
                control.renewLease()
                return control.pausedThreads == control.guestThreads
            }
            try #require(paused, "only \(control.pausedThreads) of \(control.guestThreads) threads acknowledged within 5 s")
            control.renewLease()
            #expect(control.runState == .pauseRequested)

            let ram1 = Self.snapshot(guest.ram)
            let state1 = control.readState()
            let dirty1 = control.bitmap.dirtyCount()
            usleep(50_000)
            #expect(Self.snapshot(guest.ram) == ram1, "the RAM changed while the guest was paused")
            #expect(control.readState() == state1, "the guest state changed while the guest was paused")
            #expect(control.bitmap.dirtyCount() == dirty1)

            let state = try StressState.decode(state1).get()
            #expect(state.slots.reduce(0) { $0 + $1.pagesWritten } > 0)
            for t in 0..<2 {
                // The counter workload: pagesWritten = pass × slice + position.
                let slot = state.slots[t]
                let n = UInt64(StressState.slice(t, threads: 2, pageCount: 1024).count)
                #expect(slot.pagesWritten == slot.pass * n + slot.position, "thread \(t): \(slot)")
            }
            let report = CounterVerifier.verify(ram: guest.ram, state: state)
            #expect(report.passed, "\(report.badCount) bad pages, first \(report.firstBad)")

            control.setRunState(.migrated)
            let outcome = try #require(runner.wait(2), "run() did not return within 2 s of .migrated")
            #expect(outcome.end == .migrated)
            #expect(outcome.selfResumes == 0)
            #expect(outcome.threads == 2)
            #expect(outcome.pattern == .counter)
            #expect(outcome.pagesWritten == state.slots.reduce(0) { $0 + $1.pagesWritten })
            #expect(control.guestThreads == 0)
            #expect(control.pausedThreads == 0)
            // Nothing was written after the pause.
            #expect(Self.snapshot(guest.ram) == ram1)
        }
    }

    @Test("a pause whose lease runs out ends by itself")
    func selfResumeAfterLeaseExpiry() throws {
        try Self.withGuest { guest in
            let control = guest.control
            control.bitmap.harvestAll { _ in }
            let runner = Runner(guest)
            defer { runner.shutDown() }
            #expect(waitUntil(5) { control.bitmap.dirtyCount() > 0 }, "the guest wrote nothing in 5 s")

            control.sourcePID = getpid()
            control.leaseDeadline = monotonicNanoseconds() + 300_000_000
            control.setRunState(.pauseRequested)
            // Never renewed: the guest must take the pause back by itself.
            let resumed = waitUntil(3) { control.runState == .running }
            try #require(resumed, "still \(control.runState) 3 s after a 0.3 s lease")

            // And keep writing.
            control.bitmap.harvestAll { _ in }
            #expect(waitUntil(3) { control.bitmap.dirtyCount() > 0 }, "no page written after the self-resume")

            guest.stop()
            let outcome = try #require(runner.wait(5), "run() did not return within 5 s of stop()")
            #expect(outcome.end == .stopped)
            #expect(outcome.selfResumes >= 1)
            #expect(control.pausedThreads == 0)
            let report = CounterVerifier.verify(ram: guest.ram, state: try Self.decodeState(control))
            #expect(report.passed, "\(report.badCount) bad pages, first \(report.firstBad)")
        }
    }

    @Test("a pause held by a live source with a fresh lease does not end by itself")
    func noSelfResumeWhileTheLeaseHolds() throws {
        try Self.withGuest { guest in
            let control = guest.control
            let runner = Runner(guest)
            defer { runner.shutDown() }
            #expect(waitUntil(5) { control.guestThreads == 2 })
            control.sourcePID = getpid()
            control.renewLease()
            control.setRunState(.pauseRequested)
            #expect(
                waitUntil(5) {
                    control.renewLease()
                    return control.pausedThreads == 2
                })
            control.renewLease()
            usleep(200_000)
            #expect(control.runState == .pauseRequested)
            control.setRunState(.running)
            guest.stop()
            let outcome = try #require(runner.wait(5))
            #expect(outcome.selfResumes == 0)
            #expect(outcome.end == .stopped)
        }
    }

    @Test("more threads than pages is refused")
    func moreThreadsThanPages() throws {
        try withTempDir { dir in
            let ram = try RAMFile.create(path: filePath(dir.appendingPathComponent("ram")), size: 4096, pageSize: 4096)
            let control = try GuestControl.create(path: filePath(dir.appendingPathComponent("control")), for: ram.block)
            var options = StressOptions()
            options.threads = 2
            // Never run() it: thread 0 gets an empty slice (random: division
            // by zero; counter: writes past the RAM).
            #expect(throws: GuestMemoryError.self) { try StressGuest(ram: ram, control: control, options: options) }
        }
    }

    @Test("a new run starts with no stale pause acknowledgements")
    func staleAcknowledgementsAreCleared() throws {
        try Self.withGuest { guest in
            let control = guest.control
            // A guest killed while paused leaves its acknowledgements behind.
            control.acknowledgePause()
            control.acknowledgePause()
            control.bitmap.harvestAll { _ in }
            let runner = Runner(guest)
            defer { runner.shutDown() }
            #expect(waitUntil(5) { control.bitmap.dirtyCount() > 0 })
            // Else the next source sees every thread "paused" while all write.
            #expect(control.pausedThreads == 0)
        }
    }

    @Test("a duration ends the run with RAM that verifies")
    func durationEndsTheRun() throws {
        try Self.withGuest(rate: nil, duration: 0.2) { guest in
            let outcome = try #require(Runner(guest).wait(10), "a 0.2 s run did not end within 10 s")
            #expect(outcome.end == .duration)
            #expect(outcome.seconds >= 0.2)
            let state = try Self.decodeState(guest.control)
            #expect(outcome.pagesWritten == state.slots.reduce(0) { $0 + $1.pagesWritten })
            for t in 0..<2 {
                let slot = state.slots[t]
                #expect(slot.pagesWritten == slot.pass * 512 + slot.position, "thread \(t): \(slot)")
                #expect(slot.position < 512)
            }
            let report = CounterVerifier.verify(ram: guest.ram, state: state)
            #expect(report.passed, "\(report.badCount) bad pages, first \(report.firstBad)")
            #expect(guest.control.guestThreads == 0)
        }
    }

    @Test("resume continues the stored workload and still verifies")
    func resumeContinues() throws {
        try withTempDir { dir in
            let ramPath = filePath(dir.appendingPathComponent("ram"))
            let controlPath = filePath(dir.appendingPathComponent("control"))
            var options = StressOptions()
            options.pattern = .counter
            options.threads = 2
            options.rate = 64 << 20
            options.duration = 0.1
            let firstWritten: UInt64
            do {
                let ram = try RAMFile.create(path: ramPath, size: Self.ramSize, pageSize: 4096)
                let control = try GuestControl.create(path: controlPath, for: ram.block)
                let first = try StressGuest(ram: ram, control: control, options: options)
                let firstOutcome = try #require(Runner(first).wait(10), "a 0.1 s run did not end within 10 s")
                #expect(firstOutcome.end == .duration)
                firstWritten = try Self.decodeState(control).slots.reduce(0) { $0 + $1.pagesWritten }
            }
            let ram = try RAMFile(path: ramPath, access: .readWrite, pageSize: 4096)
            let control = try GuestControl.openOrCreate(path: controlPath, for: ram.block)
            var again = options
            again.resume = true
            again.threads = 5  // ignored: the stored state has 2
            again.pattern = .random  // ignored too
            let second = try StressGuest(ram: ram, control: control, options: again)
            #expect(second.options.threads == 2)
            #expect(second.options.pattern == .counter)
            let outcome = try #require(Runner(second).wait(10))
            #expect(outcome.end == .duration)
            let state = try Self.decodeState(control)
            #expect(state.slots.reduce(0) { $0 + $1.pagesWritten } == firstWritten + outcome.pagesWritten)
            let report = CounterVerifier.verify(ram: ram, state: state)
            #expect(report.passed, "\(report.badCount) bad pages, first \(report.firstBad)")

            // A guest that migrated away cannot be resumed here.
            control.setRunState(.migrated)
            let error = #expect(throws: GuestMemoryError.self) { try StressGuest(ram: ram, control: control, options: again) }
            #expect(error?.description.contains("migrated away") == true, "\(String(describing: error))")
        }
    }
    @Test("a guest whose migration did not complete refuses to resume")
    func incompleteRefusesResume() throws {
        try withTempDir { dir in
            let ram = try RAMFile.create(path: filePath(dir.appendingPathComponent("ram")), size: 1 << 20, pageSize: 4096)
            let control = try GuestControl.create(path: filePath(dir.appendingPathComponent("control")), for: ram.block)
            var options = StressOptions()
            options.pattern = .counter
            _ = try StressGuest(ram: ram, control: control, options: options)
            control.setRunState(.incomplete)
            options.resume = true
            do {
                _ = try StressGuest(ram: ram, control: control, options: options)
                Issue.record("an incomplete guest resumed")
            } catch {
                #expect("\(error)".contains("did not complete"), "\(error)")
            }
        }
    }

    @Test("a rate of 0 is refused instead of trapping")
    func zeroRateRefused() throws {
        #expect(throws: GuestMemoryError.self) { try Self.withGuest(rate: 0) { _ in } }
    }

    @Test("a low rate does not outlast the duration")
    func durationBoundsPacing() throws {
        // 4 KiB/s over 2 threads: one 16-page batch puts a thread 32 s ahead.
        try Self.withGuest(rate: 4096, duration: 0.3) { guest in
            let start = Date()
            let outcome = guest.run()
            #expect(outcome.end == .duration)
            #expect(Date().timeIntervalSince(start) < 2, "the pacing sleep ran past the duration")
        }
    }
}
