import Dispatch
import FoundationEssentials
import Testing

@testable import Migration

/// The fault log driven with made-up times: every time is a parameter, so
/// nothing here reads a clock.
@Suite("PostcopyFaultLog")
struct PostcopyFaultLogTests {
    @Test("two threads faulting on one page: only the first wait asks; after placement a new fault asks again")
    func oneRequestPerPage() {
        let log = PostcopyFaultLog(pageCount: 16)
        #expect(log.fault(page: 3, thread: 101, at: 1.0))
        log.requestSent()
        #expect(!log.fault(page: 3, thread: 102, at: 1.001))
        // Another page is its own request.
        #expect(log.fault(page: 4, thread: 102, at: 1.002))
        log.requestSent()
        var s = log.snapshot(at: 1.003)
        #expect(s.requests == 2)
        #expect(s.faults == 3)

        log.placed(page: 3, at: 1.004)
        log.placed(page: 4, at: 1.004)
        // The page left again (not in this engine, but the log must not
        // remember a request that was answered).
        #expect(log.fault(page: 3, thread: 101, at: 2.0))
        // A first wait whose page is on its way already (a request's
        // window) sends nothing: the count follows what was sent.
        #expect(log.fault(page: 5, thread: 101, at: 2.0))
        log.requestSent()
        s = log.snapshot(at: 2.0)
        #expect(s.requests == 3)
        #expect(s.faults == 5)
    }

    @Test("latency samples land in the average (ns), the 2^N µs buckets and the percentiles")
    func latencySamples() {
        let log = PostcopyFaultLog(pageCount: 8)
        _ = log.fault(page: 1, thread: 1, at: 10.0)
        log.placed(page: 1, at: 10.0003)  // 300 µs: bucket 8, [256, 512)
        _ = log.fault(page: 2, thread: 1, at: 11.0)
        log.placed(page: 2, at: 11.005)  // 5000 µs: bucket 12, [4096, 8192)
        _ = log.fault(page: 3, thread: 1, at: 12.0)
        log.placed(page: 3, at: 12.0000005)  // 0.5 µs: 0 µs, bucket 0
        let s = log.snapshot(at: 13.0)

        #expect(s.latency == (300_000 + 5_000_000 + 500) / 3)
        var dist = [UInt64](repeating: 0, count: 24)
        dist[0] = 1
        dist[8] = 1
        dist[12] = 1
        #expect(s.latencyDist == dist)
        #expect(s.latencyP50Us == 300)
        #expect(s.latencyP99Us == 5000)
        #expect(s.latencyMaxUs == 5000)
    }

    @Test("a second waiter on a page is a latency sample of its own, measured from its own fault")
    func everyWaitIsASample() {
        let log = PostcopyFaultLog(pageCount: 8)
        _ = log.fault(page: 5, thread: 1, at: 0.0)
        _ = log.fault(page: 5, thread: 2, at: 0.001)
        log.placed(page: 5, at: 0.003)
        let s = log.snapshot(at: 0.003)
        #expect(s.latency == (3_000_000 + 2_000_000) / 2)
        #expect(s.latencyDist[10] == 1)  // 2000 µs in [1024, 2048)
        #expect(s.latencyDist[11] == 1)  // 3000 µs in [2048, 4096)
        #expect(s.latencyMaxUs == 3000)
    }

    @Test("bucket edges: 2^N starts bucket N, 0 µs is bucket 0, very long waits share the last")
    func bucketEdges() {
        #expect(PostcopyFaultLog.bucket(microseconds: 0) == 0)
        #expect(PostcopyFaultLog.bucket(microseconds: 1) == 0)
        #expect(PostcopyFaultLog.bucket(microseconds: 2) == 1)
        #expect(PostcopyFaultLog.bucket(microseconds: 255) == 7)
        #expect(PostcopyFaultLog.bucket(microseconds: 256) == 8)
        #expect(PostcopyFaultLog.bucket(microseconds: 1 << 23) == 23)
        #expect(PostcopyFaultLog.bucket(microseconds: 1 << 30) == 23)
        #expect(PostcopyFaultLog.bucket(microseconds: .max) == 23)
    }

    @Test("blocktime counts only the time all guest threads were blocked at once")
    func blocktimeIsTheOverlap() {
        let log = PostcopyFaultLog(pageCount: 32)
        log.setGuestThreads(2)
        // Thread ids out of fault order, so the per-thread list's order is
        // the ids', not the faults'.
        let t1: UInt32 = 42
        let t2: UInt32 = 17
        _ = log.fault(page: 10, thread: t1, at: 0.000)
        _ = log.fault(page: 11, thread: t2, at: 0.005)

        // Both still blocked: the open overlap counts up to `now`.
        var s = log.snapshot(at: 0.008)
        #expect(s.blocktime == 3)
        #expect(s.vcpuBlocktime == [3, 8])

        log.placed(page: 10, at: 0.010)
        s = log.snapshot(at: 0.015)
        #expect(s.blocktime == 5)
        #expect(s.vcpuBlocktime == [10, 10])  // t2 still open: 5..15 ms

        log.placed(page: 11, at: 0.020)
        s = log.snapshot(at: 1.0)
        #expect(s.blocktime == 5)
        #expect(s.vcpuBlocktime == [15, 10])  // ids 17 (t2), 42 (t1)
    }

    @Test("with more guest threads than blocked ones, blocktime stays 0")
    func notAllBlocked() {
        let log = PostcopyFaultLog(pageCount: 32)
        log.setGuestThreads(3)
        _ = log.fault(page: 1, thread: 1, at: 0.0)
        _ = log.fault(page: 2, thread: 2, at: 0.0)
        // Same thread twice is still one thread; id 0 (unknown) is none.
        _ = log.fault(page: 3, thread: 2, at: 0.001)
        _ = log.fault(page: 4, thread: 0, at: 0.001)
        log.placed(page: 1, at: 0.010)
        log.placed(page: 2, at: 0.010)
        log.placed(page: 3, at: 0.010)
        log.placed(page: 4, at: 0.010)
        let s = log.snapshot(at: 0.010)
        #expect(s.blocktime == 0)
        #expect(s.vcpuBlocktime == [10, 10])
        #expect(s.latencyDist.reduce(0, +) == 4)  // the unknown thread's wait is still a sample
    }

    @Test("a thread waiting on two pages is blocked until both are placed")
    func threadWithTwoWaits() {
        let log = PostcopyFaultLog(pageCount: 8)
        log.setGuestThreads(1)
        _ = log.fault(page: 1, thread: 7, at: 0.000)
        _ = log.fault(page: 2, thread: 7, at: 0.002)
        log.placed(page: 1, at: 0.004)
        #expect(log.snapshot(at: 0.005).blocktime == 5)  // still blocked on page 2
        log.placed(page: 2, at: 0.006)
        let s = log.snapshot(at: 0.100)
        #expect(s.blocktime == 6)
        #expect(s.vcpuBlocktime == [6])
    }

    @Test("hasWaits follows the open waits")
    func hasWaitsToggles() {
        let log = PostcopyFaultLog(pageCount: 8)
        #expect(!log.hasWaits)
        _ = log.fault(page: 1, thread: 1, at: 0)
        #expect(log.hasWaits)
        _ = log.fault(page: 1, thread: 2, at: 0)
        _ = log.fault(page: 2, thread: 3, at: 0)
        log.placed(page: 1, at: 0.001)
        #expect(log.hasWaits)  // page 2 still waited on
        log.placed(page: 2, at: 0.001)
        #expect(!log.hasWaits)
    }

    @Test("placing a page no one waits on changes nothing")
    func placedWithoutWaiterIsANoop() {
        let log = PostcopyFaultLog(pageCount: 8)
        log.placed(page: 5, at: 1.0)
        #expect(log.snapshot(at: 2.0) == PostcopyFaultLog(pageCount: 8).snapshot(at: 2.0))

        // With a wait open elsewhere (the locked path): still no sample,
        // and that other wait and its request stay.
        _ = log.fault(page: 6, thread: 1, at: 3.0)
        log.placed(page: 5, at: 3.001)
        var s = log.snapshot(at: 3.002)
        #expect(s.latencyDist.reduce(0, +) == 0)
        #expect(log.hasWaits)
        #expect(!log.fault(page: 6, thread: 2, at: 3.002))
        #expect(log.fault(page: 5, thread: 2, at: 3.002))
        log.placed(page: 6, at: 3.004)
        log.placed(page: 5, at: 3.004)
        // A second placement of an answered page: no-op as well.
        log.placed(page: 6, at: 3.010)
        s = log.snapshot(at: 3.010)
        #expect(s.latencyDist.reduce(0, +) == 3)
        #expect(s.requests == 0, "the log counts only what requestSent reports")
        #expect(!log.hasWaits)
    }

    @Test("concurrent faults and placements leave no wait open and lose no sample")
    func concurrentUse() {
        let log = PostcopyFaultLog(pageCount: 4096)
        let threads = 4
        let pagesPerThread = 1024
        DispatchQueue.concurrentPerform(iterations: threads) { i in
            for k in 0..<pagesPerThread {
                let page = i * pagesPerThread + k
                if log.fault(page: page, thread: UInt32(i + 1), at: Double(k)) { log.requestSent() }
                if log.hasWaits { log.placed(page: page, at: Double(k) + 0.001) }
            }
        }
        let s = log.snapshot(at: 1e6)
        #expect(!log.hasWaits)
        #expect(s.requests == UInt64(threads * pagesPerThread))
        #expect(s.latencyDist.reduce(0, +) == UInt64(threads * pagesPerThread))
    }

    @Test("MigrationStats encodes the postcopy block with QEMU's names")
    func encodesQEMUNames() throws {
        var stats = MigrationStats(status: .postcopyActive)
        var p = PostcopyStats()
        p.requests = 2
        p.postcopyBytes = 8192
        p.latencyDist = [1, 2]
        stats.postcopy = p
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let text = String(decoding: try encoder.encode(stats), as: UTF8.self)
        #expect(text.contains(#""status":"postcopy-active""#))
        for key in [
            "postcopy-requests", "postcopy-bytes", "postcopy-faults", "postcopy-blocktime", "postcopy-vcpu-blocktime",
            "postcopy-latency", "postcopy-latency-dist", "postcopy-latency-p50-us", "postcopy-latency-p99-us",
            "postcopy-latency-max-us",
        ] {
            #expect(text.contains("\"\(key)\":"), "missing \(key) in \(text)")
        }
        #expect(text.contains(#""postcopy":{"#))
        #expect(text.contains(#""postcopy-latency-dist":[1,2]"#))
    }
}
