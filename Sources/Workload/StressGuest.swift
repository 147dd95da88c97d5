import CShims
import GuestMemory
import OSCall
import Synchronization
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// How the stress guest runs.
public struct StressOptions: Sendable {
    public var pattern: StressPattern = .random
    public var threads = 1
    /// Target dirty rate in bytes/s over all threads; nil for unlimited.
    public var rate: UInt64?
    /// Stop after this many seconds; nil runs until migrated or stopped.
    public var duration: Double?
    /// Continue the workload stored in the control file.
    public var resume = false
    /// With `resume`: take back a guest in state *handed over* (a
    /// switchover whose commit was never confirmed), after the user checked
    /// that the destination does not run it.
    public var reclaim = false
    public var seed: UInt64 = 0x5EED
    /// How the source learns which pages were written: the guest marks the
    /// bitmap, or the kernel tracks the writes (the guest never touches the
    /// bitmap).
    public var tracking = DirtyTracking.bitmap

    public init() {}
}

/// Why the guest stopped.
public enum StressEnd: Sendable, Equatable {
    case duration
    case stopped
    /// The source switched it over: it now runs on the destination.
    case migrated
}

/// What the guest did.
public struct StressOutcome: Sendable {
    public var end: StressEnd
    public var pagesWritten: UInt64
    public var seconds: Double
    public var pattern: StressPattern
    public var threads: Int
    /// Times the guest resumed by itself because the pausing source vanished.
    public var selfResumes: Int
    public var pageSize: UInt64
    public var bytesPerSecond: Double { seconds > 0 ? Double(pagesWritten) * Double(pageSize) / seconds : 0 }
}

/// The stress guest: threads that write guest RAM, mark each written page
/// dirty (data first, then the bit with release order), and obey the control
/// file's pause, throttle, resume and migrated states.
public final class StressGuest: Sendable {
    public let ram: RAMFile
    public let control: GuestControl
    public let options: StressOptions
    private let state: StressState
    private let stopFlag = Atomic<Bool>(false)
    private let selfResumes = Atomic<Int>(0)
    /// With kernel tracking: the userfaultfd with the RAM mapping registered
    /// for asynchronous write-protect. Open for the guest's whole life: if
    /// it closed, the kernel would drop the registration and stop tracking.
    private let writeTracking: Userfault?

    /// Prepares a fresh workload, or loads the stored one with `resume`.
    public init(ram: RAMFile, control: GuestControl, options: StressOptions) throws(GuestMemoryError) {
        self.ram = ram
        self.control = control
        guard control.ramSize == ram.block.size, control.pageSize == ram.block.pageSize else {
            throw GuestMemoryError(
                "control file \(control.path) is for \(control.ramSize) bytes of RAM, the RAM file \(ram.path) has \(ram.block.size)")
        }
        if let why = control.blockMismatch(ram.blocks) { throw GuestMemoryError("control file \(control.path): \(why)") }
        var options = options
        if let r = options.rate, r == 0 {
            throw GuestMemoryError("a dirty rate of 0 bytes/s writes nothing; give a rate above 0, or none for unlimited")
        }
        if options.resume {
            switch control.runState {
            case .migrated:
                throw GuestMemoryError("the guest in \(control.path) migrated away; resume it on the destination")
            case .handedOver where !options.reclaim:
                throw GuestMemoryError(
                    "the guest in \(control.path) was handed over to a destination that never confirmed it took it (run state handed over): "
                        + "if that destination's `livemig receive` exited 0, the guest lives there; resume it there. Only if the destination "
                        + "failed, take the guest back here with --resume --reclaim (never both: two copies of one guest must not run)")
            case .incomplete:
                throw GuestMemoryError(
                    "the guest in \(control.path) cannot resume: the migration into it did not complete (run state incomplete), "
                        + "so its RAM and state do not belong together; migrate the guest here again")
            case .pauseRequested where !control.pauseHolderVanished:
                throw GuestMemoryError("the guest in \(control.path) is paused by a running migration (source pid \(control.sourcePID))")
            case .waitingIncoming:
                let pid = control.guestPID
                let who =
                    pid > 0 && SystemCall.processExists(pid)
                    ? "belongs to an incoming guest (livemig stress --incoming, pid \(pid)) that waits for a migration"
                    : "was left by an incoming guest (pid \(pid)) that ended before a migration reached it"
                throw GuestMemoryError(
                    "\(control.path) \(who): its RAM and state have not arrived, so there is nothing to resume; migrate a guest into it")
            default: break
            }
            let loaded: StressState
            switch StressState.decode(control.readState()) {
            case .success(let s): loaded = s
            case .failure(let e): throw e
            }
            guard loaded.pageCount == ram.block.pageCount else {
                throw GuestMemoryError("the stored guest state covers \(loaded.pageCount) pages, the RAM file has \(ram.block.pageCount)")
            }
            state = loaded
            options.pattern = loaded.pattern
            options.threads = loaded.threads
        } else {
            switch control.runState {
            case .incoming:
                throw GuestMemoryError(
                    "\(control.path) holds a migrated-in guest; continue it with --resume (or remove the file to start a new guest)")
            case .pauseRequested where !control.pauseHolderVanished:
                throw GuestMemoryError(
                    "the guest in \(control.path) is held paused by a running migration (source pid \(control.sourcePID))")
            case .running where control.guestThreads > 0 && control.guestPID > 0 && SystemCall.processExists(control.guestPID):
                throw GuestMemoryError("another guest (pid \(control.guestPID)) is running on \(control.path)")
            default: break
            }
            guard options.threads >= 1, options.threads <= ram.block.pageCount else {
                throw GuestMemoryError("\(options.threads) threads need at least as many pages; \(ram.path) has \(ram.block.pageCount)")
            }
            let s = StressState(pattern: options.pattern, threads: options.threads, pageCount: ram.block.pageCount, seed: options.seed)
            if s.pattern == .counter {
                // Counter invariant at (pass 0, position 0): every counter is 0.
                for p in 0..<ram.block.pageCount {
                    ram.pointer(at: UInt64(p) * ram.block.pageSize).storeBytes(of: UInt64(0), as: UInt64.self)
                    control.bitmap.mark(page: p)
                }
            }
            try control.writeState(s.encoded())
            state = s
        }
        if options.tracking == .kernel {
            let uffd = try Userfault(writeTrackingPageSize: ram.block.pageSize)
            try uffd.registerWriteProtect(address: UInt64(UInt(bitPattern: ram.base)), length: ram.block.size)
            writeTracking = uffd
        } else {
            writeTracking = nil
        }
        self.options = options
    }

    /// Asks the threads to finish their current batch and stop.
    public func stop() {
        stopFlag.store(true, ordering: .relaxed)
        // Threads sleeping for pacing or throttle wait on the run-state word.
        control.wakeWaiters()
    }

    /// Runs the threads until the duration passes, `stop()`, or migration.
    public func run() -> StressOutcome {
        control.throttlePercent = 0
        control.resetPauseAcknowledgements()
        control.guestPID = getpid()
        control.guestThreads = UInt32(options.threads)
        control.setGuestKind(.cooperative)
        control.clearTrackingBlindness()
        control.setTracking(options.tracking, mappingAddress: UInt64(UInt(bitPattern: ram.base)))
        control.setRunState(.running)
        let start = monotonicNanoseconds()
        let ends = Mutex<[StressEnd]>([])
        let threads = (0..<options.threads).map { t in
            WorkerThread(name: "guest/\(t)") { [self] in
                let end = runThread(t, start: start)
                ends.withLock { $0.append(end) }
            }
        }
        for th in threads { th.join() }
        let seconds = Double(monotonicNanoseconds() - start) / 1e9
        let final = StressState.decode(control.readState())
        // Each count is below 2^62 (decode refuses more) and grows by one per
        // page, but 256 of them could still overflow a plain sum.
        let written = (try? final.get()).map { Self.total($0) } ?? 0
        let startWritten = Self.total(state)
        let all = ends.withLock { $0 }
        let end: StressEnd = all.contains(.migrated) ? .migrated : (all.contains(.stopped) ? .stopped : .duration)
        return StressOutcome(
            end: end, pagesWritten: written >= startWritten ? written - startWritten : 0, seconds: seconds, pattern: options.pattern,
            threads: options.threads, selfResumes: selfResumes.load(ordering: .relaxed), pageSize: ram.block.pageSize)
    }

    /// Pages written by all threads of `s`, saturating at `UInt64.max`.
    private static func total(_ s: StressState) -> UInt64 {
        s.slots.reduce(UInt64(0)) { sum, slot in
            let (v, overflow) = sum.addingReportingOverflow(slot.pagesWritten)
            return overflow ? .max : v
        }
    }

    /// One guest thread. Writes in batches of `batch` pages; between batches
    /// it obeys the control file and paces itself.
    private func runThread(_ t: Int, start: UInt64) -> StressEnd {
        defer { control.threadExited() }
        let batch = 16
        let slice = StressState.slice(t, threads: options.threads, pageCount: ram.block.pageCount)
        let n = UInt64(slice.count)
        let slot = control.stateBytes + StressState.headerSize + t * StressState.slotSize
        var pass = UInt64(littleEndian: slot.load(fromByteOffset: 0, as: UInt64.self))
        var pos = UInt64(littleEndian: slot.load(fromByteOffset: 8, as: UInt64.self))
        var rng = UInt64(littleEndian: slot.load(fromByteOffset: 16, as: UInt64.self))
        var written = UInt64(littleEndian: slot.load(fromByteOffset: 24, as: UInt64.self))
        let pageSize = ram.block.pageSize
        let kernelTracked = options.tracking == .kernel
        let perThreadRate = options.rate.map { Double($0) / Double(options.threads) / Double(pageSize) }
        // Times are compared as Double nanoseconds: no conversion of a
        // duration or a rate to an integer can trap, however large or small.
        let deadline = options.duration.map { Double(start) + $0 * 1e9 }
        /// Nanoseconds left before the deadline (infinite without one).
        func untilDeadline() -> Double { deadline.map { $0 - Double(monotonicNanoseconds()) } ?? .infinity }
        var paceStart = monotonicNanoseconds(), pacedPages = 0.0
        var busySince = paceStart

        func save() {
            slot.storeBytes(of: pass.littleEndian, toByteOffset: 0, as: UInt64.self)
            slot.storeBytes(of: pos.littleEndian, toByteOffset: 8, as: UInt64.self)
            slot.storeBytes(of: rng.littleEndian, toByteOffset: 16, as: UInt64.self)
            slot.storeBytes(of: written.littleEndian, toByteOffset: 24, as: UInt64.self)
        }
        func nextRandom() -> UInt64 {
            rng ^= rng << 13
            rng ^= rng >> 7
            rng ^= rng << 17
            return rng
        }

        while true {
            switch control.runState {
            case .running: break
            case .pauseRequested:
                // Every write of the last batch, its dirty bit and the state
                // slot are stored: acknowledge (release), then wait.
                control.acknowledgePause()
                while control.runState == .pauseRequested {
                    control.waitWhile(.pauseRequested, timeout: 0.05)
                    if control.runState == .pauseRequested, control.pauseHolderVanished,
                        control.exchangeRunState(from: .pauseRequested, to: .running)
                    {
                        selfResumes.add(1, ordering: .relaxed)
                    }
                }
                control.leavePause()
                paceStart = monotonicNanoseconds()
                pacedPages = 0
                busySince = paceStart
                continue
            case .migrated, .incoming, .incomplete, .handedOver, .waitingIncoming:
                return .migrated
            }
            if stopFlag.load(ordering: .relaxed) { return .stopped }
            if untilDeadline() <= 0 { return .duration }

            for _ in 0..<batch {
                let page: Int
                switch options.pattern {
                case .counter, .sequential:
                    page = slice.lowerBound + Int(pos)
                case .random:
                    page = slice.lowerBound + Int(nextRandom() % n)
                case .hotset(let f):
                    let hot = max(1, UInt64(Double(n) * f))
                    let r = nextRandom()
                    page = slice.lowerBound + Int(r % 10 < 9 ? (r >> 8) % hot : (r >> 8) % n)
                }
                let p = ram.pointer(at: UInt64(page) &* pageSize)
                switch options.pattern {
                case .counter:
                    // The page's counter goes from `pass` to `pass + 1`.
                    p.storeBytes(of: pass &+ 1, as: UInt64.self)
                case .sequential:
                    p.storeBytes(of: pass &+ 1, toByteOffset: 8, as: UInt64.self)
                default:
                    p.storeBytes(of: rng, toByteOffset: Int(rng >> 55) * 8, as: UInt64.self)
                }
                // Data first, then the bit (release): docs/GUEST-CONTROL.md.
                // With kernel tracking the store itself is what is tracked.
                if !kernelTracked { control.bitmap.mark(page: page) }
                written &+= 1
                if options.pattern == .counter || options.pattern == .sequential {
                    pos += 1
                    if pos == n {
                        pos = 0
                        pass += 1
                    }
                }
            }
            save()
            pacedPages += Double(batch)

            // Throttle: sleep so that sleeping takes `percent`% of the time,
            // in slices of at least 10 ms of work (as QEMU throttles vCPUs).
            let now = monotonicNanoseconds()
            // The setter clamps to 99, but the word lives in a file anyone can write.
            var percent = min(control.throttlePercent, 99)
            if percent > 0, now - busySince >= 10_000_000, control.pauseHolderVanished {
                // The source that throttled us is gone: run at full speed
                // (unless a newer source set a new throttle meanwhile).
                if control.exchangeThrottle(from: percent, to: 0) { percent = 0 }
            }
            if percent > 0, now - busySince >= 10_000_000 {
                let busy = Double(now - busySince)
                sleepInterruptibly(min(busy * Double(percent) / Double(100 - percent), untilDeadline()))
                busySince = monotonicNanoseconds()
                // Time asleep for the throttle is not time the rate pacing
                // may catch up on, or the throttle would be undone in a burst.
                paceStart += busySince - now
            } else if percent == 0 {
                busySince = now
            }
            // Pacing: sleep until this thread is back on its rate, in slices
            // of at most 1 s, and never past the deadline (a low rate may be
            // many seconds ahead after one batch).
            while let r = perThreadRate, control.runState == .running, !stopFlag.load(ordering: .relaxed) {
                let ahead = Double(paceStart) + pacedPages / r * 1e9 - Double(monotonicNanoseconds())
                let nap = min(ahead, 1e9, untilDeadline())
                guard nap >= 1000 else { break }
                sleepInterruptibly(nap)
            }
        }
    }

    /// Sleeps `ns` nanoseconds, waking early when the run state changes.
    private func sleepInterruptibly(_ ns: Double) {
        guard ns >= 1000 else { return }
        control.waitWhile(.running, timeout: min(ns, 3600e9) / 1e9)
    }
}
