import Histogram
import Synchronization

/// The destination's account of postcopy page faults: which guest thread
/// waits on which missing page since when, which pages have a page request
/// outstanding, and what the waits cost (latency, blocktime).
///
/// Who calls what, from which thread:
/// - `setGuestThreads(_:)`: once, before the fault thread starts. A later
///   call takes effect at the next fault or placement.
/// - `fault(page:thread:at:)`: the fault thread only, once per userfault it
///   reads for a page it did not find arrived. It sends a page request when
///   the call returns true.
/// - `hasWaits`, then `placed(page:at:)`: any receiver thread, after the page
///   was placed (UFFDIO_COPY / UFFDIO_ZEROPAGE returned, or EEXIST), with a
///   time read after the placement.
/// - `snapshot(at:)`: any thread, any time.
///
/// The race between the two sides: a receiver may place the page after the
/// fault thread found it missing but before `fault` recorded the wait; its
/// `hasWaits` check then sees no wait and the wait would stay open for good.
/// So the fault thread re-checks the page's arrived bit after `fault` and,
/// when it is set, calls `placed` itself (a second `placed` of a page is a
/// no-op). This closes the race only if neither side's store can pass its
/// later load: the receiver sets the arrived bit, then loads `hasWaits`; the
/// fault thread records the wait (a sequentially consistent increment in
/// `fault`), then loads the arrived bit. Both loads and both stores must be
/// sequentially consistent (`hasWaits` is; the arrived bit's store and load
/// are the engine's to make so).
///
/// Times are monotonic seconds as the callers read them; they are kept as
/// whole nanoseconds so that sums do not drift. A placement time a little
/// before the fault time (two threads' clocks read in the other order)
/// counts as a zero wait.
///
/// Cost: a placement with no open wait anywhere is one atomic load. While
/// some wait is open, `placed` takes the lock briefly for every page; that
/// is small beside the UFFDIO_COPY that precedes it. Nothing allocates per
/// placed page; a fault allocates at most its wait record.
public final class PostcopyFaultLog: Sendable {
    /// QEMU's `postcopy-latency-dist` length: the last bucket, [2^23, 2^24) µs
    /// (8 to 16 s), also takes every longer wait.
    static let latencyBuckets = 24

    private let pageCount: Int
    private let state: Mutex<State>
    /// Waits recorded and not yet ended. Incremented in `fault`, decremented
    /// in `placed`, both under the lock and sequentially consistent; the
    /// unlocked load in `hasWaits` pairs with the increment (see the race
    /// described on the type).
    private let openWaits = Atomic<Int>(0)

    /// - Parameter pageCount: pages of the guest's RAM; every `page` passed
    ///   in is below it.
    public init(pageCount: Int) {
        precondition(pageCount >= 0, "page count \(pageCount) is negative")
        self.pageCount = pageCount
        state = Mutex(State())
    }

    /// Tells how many guest threads exist. `postcopy-blocktime` counts the
    /// time during which that many distinct thread ids were blocked at once
    /// (QEMU's "all vCPUs blocked"); with 0 it stays 0.
    public func setGuestThreads(_ n: Int) {
        precondition(n >= 0, "guest thread count \(n) is negative")
        state.withLock { $0.guestThreads = n }
    }

    /// Records that `thread` (0: the kernel did not say) waits on `page`
    /// since `now`. Returns true when this is the first wait on the page,
    /// which then needs a page request unless one is on its way already
    /// (the caller knows; it counts what it sends with `requestSent`).
    /// Every call counts as one of `postcopy-faults`.
    public func fault(page: Int, thread: UInt32, at now: Double) -> Bool {
        precondition(page >= 0 && page < pageCount, "page \(page) is outside the guest's \(pageCount) pages")
        let t = Self.nanoseconds(now)
        return state.withLock { s in
            s.faults += 1
            // Sequentially consistent: pairs with the load in `hasWaits`
            // (a receiver's arrived-bit store, then that load).
            openWaits.add(1, ordering: .sequentiallyConsistent)
            if thread != 0 { s.block(thread, at: t) }
            if var waits = s.pages[page] {
                waits.waits.append(Wait(thread: thread, since: t))
                s.pages[page] = waits
                return false
            }
            s.pages[page] = PageWaits(waits: [Wait(thread: thread, since: t)])
            return true
        }
    }

    /// Counts a page request sent (`postcopy-requests`).
    public func requestSent() {
        state.withLock { $0.requests += 1 }
    }

    /// Ends every wait on `page` at `now`: one latency sample per wait, the
    /// waiting threads' blocked time, and the page's outstanding request is
    /// cleared. A page no one waits on is a no-op (and takes no lock while
    /// no wait is open anywhere).
    public func placed(page: Int, at now: Double) {
        guard hasWaits else { return }
        let t = Self.nanoseconds(now)
        state.withLock { s in
            guard let entry = s.pages.removeValue(forKey: page) else { return }
            for w in entry.waits {
                s.recordLatency(max(0, t - w.since))
                if w.thread != 0 { s.unblock(w.thread, at: t) }
            }
            // Under the lock, so it never runs ahead of the increments it
            // undoes; sequentially consistent like them.
            openWaits.subtract(entry.waits.count, ordering: .sequentiallyConsistent)
        }
    }

    /// The pages with a request outstanding (a wait recorded, the page not
    /// placed yet), in order. A recovery asks for them again: their requests
    /// may have been lost with the connection.
    public func outstandingPages() -> [Int] {
        state.withLock { $0.pages.keys.sorted() }
    }

    /// True while some wait is open: receivers check this before `placed`.
    /// Sequentially consistent; pairs with the increment in `fault`.
    public var hasWaits: Bool { openWaits.load(ordering: .sequentiallyConsistent) > 0 }

    /// The statistics so far. Open waits count as blocked time up to `now`;
    /// they are not latency samples (a sample is a wait that ended).
    /// `postcopyBytes` is left 0 for the engine to fill.
    public func snapshot(at now: Double) -> PostcopyStats {
        let t = Self.nanoseconds(now)
        return state.withLock { s in
            var stats = PostcopyStats()
            stats.requests = s.requests
            stats.faults = s.faults
            var all = s.allBlockedTotal
            if let since = s.allBlockedSince { all += max(0, t - since) }
            stats.blocktime = Self.milliseconds(all)
            stats.vcpuBlocktime = s.threads.sorted { $0.key < $1.key }.map { _, b in
                var total = b.total
                if b.waiting > 0 { total += max(0, t - b.since) }
                return Self.milliseconds(total)
            }
            stats.latency = s.samples > 0 ? UInt64(s.latencySum / Int64(s.samples)) : 0
            stats.latencyDist = s.buckets
            if s.histogram.totalCount > 0 {
                stats.latencyP50Us = s.histogram.valueAtPercentile(50)
                stats.latencyP99Us = s.histogram.valueAtPercentile(99)
                stats.latencyMaxUs = s.histogram.maxRecorded
            }
            return stats
        }
    }

    static func nanoseconds(_ seconds: Double) -> Int64 { Int64((seconds * 1e9).rounded()) }

    /// Whole milliseconds, truncated as QEMU does.
    static func milliseconds(_ ns: Int64) -> UInt64 { UInt64(max(0, ns) / 1_000_000) }

    /// The bucket of a latency: N for [2^N, 2^(N+1)) µs; 0 also takes 0 µs,
    /// the last bucket everything above it (as QEMU's).
    static func bucket(microseconds us: UInt64) -> Int {
        let n = us == 0 ? 0 : 63 - us.leadingZeroBitCount
        return min(n, latencyBuckets - 1)
    }

    private struct Wait {
        var thread: UInt32
        var since: Int64
    }

    /// The waits on one page; its presence means a request is outstanding.
    private struct PageWaits {
        var waits: [Wait]
    }

    /// One guest thread's blocked state. `waiting` can exceed 1: the thread
    /// may fault again (on the same page, or on the next one before the
    /// previous page's `placed` ran); it is blocked until all are placed.
    private struct ThreadBlock {
        var waiting = 0
        var since: Int64 = 0
        var total: Int64 = 0
    }

    private struct State {
        var guestThreads = 0
        var faults: UInt64 = 0
        var requests: UInt64 = 0
        /// Pages with open waits (and so an outstanding request).
        var pages: [Int: PageWaits] = [:]
        /// Every thread id seen in a fault, blocked or not.
        var threads: [UInt32: ThreadBlock] = [:]
        /// Thread ids with `waiting > 0`.
        var blockedThreads = 0
        var allBlockedSince: Int64?
        var allBlockedTotal: Int64 = 0
        var samples: UInt64 = 0
        var latencySum: Int64 = 0
        var buckets = [UInt64](repeating: 0, count: PostcopyFaultLog.latencyBuckets)
        /// Latencies in µs. Sized for a minute at three significant digits
        /// and growing past that, so no sample is lost.
        var histogram: Histogram<UInt64> = {
            var h = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
            h.autoResize = true
            return h
        }()

        mutating func block(_ thread: UInt32, at t: Int64) {
            var b = threads[thread] ?? ThreadBlock()
            if b.waiting == 0 {
                b.since = t
                blockedThreads += 1
            }
            b.waiting += 1
            threads[thread] = b
            updateAllBlocked(at: t)
        }

        mutating func unblock(_ thread: UInt32, at t: Int64) {
            guard var b = threads[thread], b.waiting > 0 else { return }
            b.waiting -= 1
            if b.waiting == 0 {
                b.total += max(0, t - b.since)
                blockedThreads -= 1
            }
            threads[thread] = b
            updateAllBlocked(at: t)
        }

        /// Opens or closes the all-threads-blocked interval after a change.
        mutating func updateAllBlocked(at t: Int64) {
            let all = guestThreads > 0 && blockedThreads >= guestThreads
            if all, allBlockedSince == nil {
                allBlockedSince = t
            } else if !all, let since = allBlockedSince {
                allBlockedTotal += max(0, t - since)
                allBlockedSince = nil
            }
        }

        mutating func recordLatency(_ ns: Int64) {
            samples += 1
            latencySum += ns
            let us = UInt64(ns / 1000)
            buckets[PostcopyFaultLog.bucket(microseconds: us)] += 1
            histogram.record(us)
        }
    }
}

/// The postcopy part of the statistics, with QEMU's `query-migrate` names
/// (`postcopy-requests`, `postcopy-bytes`, `postcopy-blocktime`,
/// `postcopy-vcpu-blocktime`, `postcopy-latency`, `postcopy-latency-dist`),
/// plus percentiles from an HdrHistogram. Only the destination has faults;
/// the source fills `requests` and `postcopyBytes` from what it served.
public struct PostcopyStats: Encodable, Sendable, Equatable {
    /// Page requests sent (one per page, however many threads fault on it).
    public var requests: UInt64 = 0
    /// Bytes of pages sent or received after the switch to postcopy; the
    /// engine fills it.
    public var postcopyBytes: UInt64 = 0
    /// Every fault read, including those on a page whose request was
    /// already outstanding.
    public var faults: UInt64 = 0
    /// Milliseconds during which every guest thread was blocked at once.
    public var blocktime: UInt64 = 0
    /// Milliseconds each guest thread was blocked, one entry per thread id
    /// seen, in thread id order.
    public var vcpuBlocktime: [UInt64] = []
    /// Average wait, in nanoseconds as QEMU (10.1 and later) reports
    /// `postcopy-latency`, over the waits that ended. Every wait is on a
    /// missing page that needed a remote request (its own or an earlier
    /// one), QEMU's definition.
    public var latency: UInt64 = 0
    /// Waits per latency bucket: bucket N counts [2^N, 2^(N+1)) µs, the
    /// first also 0 µs, the last (of 24) everything longer, as QEMU's.
    public var latencyDist: [UInt64] = []
    /// Median, 99th percentile and longest wait in microseconds.
    public var latencyP50Us: UInt64 = 0
    public var latencyP99Us: UInt64 = 0
    public var latencyMaxUs: UInt64 = 0
    /// Times the connections broke after the commit and the migration
    /// recovered (docs/PROTOCOL.md §8.6).
    public var recoveries: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case requests = "postcopy-requests"
        case postcopyBytes = "postcopy-bytes"
        case faults = "postcopy-faults"
        case blocktime = "postcopy-blocktime"
        case vcpuBlocktime = "postcopy-vcpu-blocktime"
        case latency = "postcopy-latency"
        case latencyDist = "postcopy-latency-dist"
        case latencyP50Us = "postcopy-latency-p50-us"
        case latencyP99Us = "postcopy-latency-p99-us"
        case latencyMaxUs = "postcopy-latency-max-us"
        case recoveries = "postcopy-recoveries"
    }
}
