import CShims
import GuestMemory
import OSCall

#if canImport(Glibc)
    import Glibc
#endif

/// QEMU's `calc-dirty-rate` (`livemig dirtyrate`): how fast a guest dirties
/// its RAM, measured over a window of `calcTime` seconds, in one of three
/// modes:
///
/// - **page-sampling** needs nothing of the guest: it hashes `samplePages`
///   random pages per GiB of the RAM file (read through a read-only
///   mapping), waits, hashes them again, and scales the fraction that
///   changed to the whole RAM. It sees any writer (any process, `write(2)`),
///   but counts a page once however often it changed, and is a sample.
/// - **bitmap** reads a cooperative guest's dirty bitmap: it clears the
///   bitmap, waits, and counts the pages marked.
/// - **kernel** asks the kernel for a `--tracking kernel` guest's written
///   pages (`WrittenPageScan`): one scan to start the window, one to end it.
///
/// The bitmap and kernel modes count every page written in the window; all
/// modes count a page once. The bitmap and kernel modes take the state a
/// migration would use, so they refuse a guest that is being migrated.
public struct DirtyRate: Sendable {
    public enum Mode: String, Sendable, CaseIterable {
        case pageSampling = "page-sampling"
        case bitmap
        case kernel
    }

    /// The result, with QEMU's `query-dirty-rate` names.
    public struct Result: Sendable, Encodable {
        public var status = "measured"
        /// MiB/s.
        public var dirtyRate: UInt64
        /// When the window began: seconds since boot (CLOCK_BOOTTIME), as QEMU.
        public var startTime: Int64
        /// The window, in seconds (QEMU's unit when `calc-time-unit` is s).
        public var calcTime: Double
        /// Pages sampled per GiB (page-sampling), else 0.
        public var samplePages: UInt64
        public var mode: String
        /// Pages found dirty in the window (sampled ones for page-sampling).
        public var dirtyPages: UInt64
        /// Pages looked at: the sample, or the whole RAM.
        public var pagesChecked: UInt64
        /// bitmap and kernel: how long the harvest that closed the window
        /// took (µs), i.e. what a round's harvest costs for `dirtyPages`.
        public var harvestMicroseconds: UInt64?

        enum CodingKeys: String, CodingKey {
            case status, mode
            case dirtyRate = "dirty-rate"
            case startTime = "start-time"
            case calcTime = "calc-time"
            case samplePages = "sample-pages"
            case dirtyPages = "dirty-pages"
            case pagesChecked = "pages-checked"
            case harvestMicroseconds = "harvest-us"
        }
    }

    public var mode: Mode
    public var calcTime: Double
    public var samplePagesPerGiB: UInt64 = 512

    public init(mode: Mode, calcTime: Double) {
        self.mode = mode
        self.calcTime = calcTime
    }

    /// Measures `ram`; the bitmap and kernel modes need the guest's
    /// `control`, which must not be under migration.
    public func measure(ram: RAMFile, control: GuestControl?, seed: UInt64 = UInt64(Monotonic.now * 1e9)) throws(MigrationError)
        -> Result
    {
        let block = ram.block
        let start = Self.bootSeconds()
        var dirty: UInt64 = 0
        var checked: UInt64 = 0
        var elapsed = calcTime
        var harvest = 0.0
        switch mode {
        case .pageSampling:
            let wanted = max(1, (block.size * samplePagesPerGiB + (1 << 30) - 1) >> 30)
            let pages = Self.sample(count: Int(min(wanted, UInt64(block.pageCount))), of: block.pageCount, seed: seed)
            let pageSize = Int(block.pageSize)
            let before = pages.map { lm_hash64(ram.pointer(at: block.offset(ofPage: $0)), pageSize) }
            let t0 = Monotonic.now
            Self.sleep(calcTime)
            elapsed = Monotonic.now - t0
            for (i, p) in pages.enumerated() where lm_hash64(ram.pointer(at: block.offset(ofPage: p)), pageSize) != before[i] {
                dirty += 1
            }
            checked = UInt64(pages.count)
            // Scale the changed fraction of the sample to the whole RAM.
            let rate = Double(dirty) / Double(checked) * Double(block.size) / elapsed / Double(1 << 20)
            return Result(
                dirtyRate: UInt64(rate.rounded()), startTime: start, calcTime: elapsed, samplePages: samplePagesPerGiB,
                mode: mode.rawValue, dirtyPages: dirty, pagesChecked: checked)
        case .bitmap, .kernel:
            guard let control else {
                throw MigrationError(.mismatch, "the \(mode.rawValue) mode reads the guest's dirty tracking: give --guest CONTROL")
            }
            try Self.checkNotMigrating(control)
            let bitmap = control.bitmap
            var scan: WrittenPageScan?
            if mode == .kernel {
                guard control.tracking == .kernel else {
                    throw MigrationError(
                        .mismatch,
                        "the guest in \(control.path) does not track its writes with the kernel (start it with --tracking kernel), "
                            + "so the kernel mode has nothing to read; use --mode bitmap or page-sampling")
                }
                do {
                    scan = try WrittenPageScan(guest: control, ram: ram)
                } catch {
                    throw MigrationError(error)
                }
            } else if control.tracking == .kernel {
                throw MigrationError(
                    .mismatch,
                    "the guest in \(control.path) tracks its writes with the kernel and never marks the bitmap; use --mode kernel")
            }
            // Start the window: forget what was marked (or written) before.
            do {
                if let scan { try scan.sync { _ in } } else { bitmap.harvestAll { _ in } }
                let t0 = Monotonic.now
                Self.sleep(calcTime)
                let h0 = Monotonic.now
                if let scan {
                    // What a round does: the sync marks the bitmap, then
                    // the round harvests it.
                    let marks = DirtyBitmap(pageCount: block.pageCount)
                    dirty = UInt64(try scan.sync { marks.mark(page: $0) })
                    marks.harvestAll { _ in }
                } else {
                    bitmap.harvestAll { _ in dirty += 1 }
                }
                harvest = Monotonic.now - h0
                elapsed = h0 - t0
            } catch {
                throw MigrationError(.local, "cannot read the guest's written pages: \(error.description)")
            }
            checked = UInt64(block.pageCount)
            let rate = Double(dirty) * Double(block.pageSize) / elapsed / Double(1 << 20)
            return Result(
                dirtyRate: UInt64(rate.rounded()), startTime: start, calcTime: elapsed, samplePages: 0, mode: mode.rawValue,
                dirtyPages: dirty, pagesChecked: checked, harvestMicroseconds: UInt64(harvest * 1e6))
        }
    }

    /// A migration harvests the same bitmap (or page tables): measuring
    /// then would steal its pages.
    private static func checkNotMigrating(_ control: GuestControl) throws(MigrationError) {
        let source = control.sourcePID
        if source > 0, source != getpid(), SystemCall.processExists(source) {
            throw MigrationError(
                .mismatch,
                "the guest in \(control.path) is being migrated (send, pid \(source)); measuring now would take the pages that migration "
                    + "must send. Use --mode page-sampling, or wait until it ends")
        }
        guard control.runState == .running || control.runState == .pauseRequested else {
            throw MigrationError(
                .mismatch, "the guest in \(control.path) is not running (run state \(control.runState)); nothing to measure")
        }
    }

    /// `count` distinct pages of `pageCount`, chosen by a xorshift generator.
    static func sample(count: Int, of pageCount: Int, seed: UInt64) -> [Int] {
        var rng = seed | 1
        var chosen = Set<Int>()
        while chosen.count < count {
            rng ^= rng << 13
            rng ^= rng >> 7
            rng ^= rng << 17
            chosen.insert(Int(rng % UInt64(pageCount)))
        }
        return chosen.sorted()
    }

    private static func sleep(_ seconds: Double) {
        var left = timespec(tv_sec: Int(seconds), tv_nsec: Int((seconds - seconds.rounded(.down)) * 1e9))
        var rest = timespec()
        while nanosleep(&left, &rest) != 0, errno == EINTR { left = rest }
    }

    private static func bootSeconds() -> Int64 {
        var t = timespec()
        clock_gettime(CLOCK_BOOTTIME, &t)
        return Int64(t.tv_sec)
    }
}
