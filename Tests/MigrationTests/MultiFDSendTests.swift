import Foundation
import Synchronization
import Testing

@testable import Migration

/// Records what one channel was handed, in order. Used by that channel's
/// sender thread only while the migration runs; read after `finish()`
/// (thread join orders the reads after the writes).
final class RecordingTransport: ChannelTransport, @unchecked Sendable {
    enum Event: Equatable {
        case batch([UInt64])
        case sync
    }

    var events: [Event] = []
    let jitter: Bool
    let failAfter: Int?
    /// Fail like a real write does: after releasing the job, with this kind.
    let failAfterRelease: (events: Int, kind: MigrationError.Kind)?
    private var rng: UInt64

    init(seed: UInt64, jitter: Bool = true, failAfter: Int? = nil, failAfterRelease: (events: Int, kind: MigrationError.Kind)? = nil) {
        self.jitter = jitter
        self.failAfter = failAfter
        self.failAfterRelease = failAfterRelease
        rng = seed | 1
    }

    func sendJob(_ job: MultiFDJob, release: () -> Void) throws(MigrationError) {
        for b in 0..<job.count {
            if let n = failAfter, events.count >= n {
                throw MigrationError(.peer, "test transport fails after \(n) events")
            }
            let pages = job.batches[b]
            events.append(.batch(Array(UnsafeBufferPointer(start: pages.offsets, count: pages.count))))
        }
        release()
        if let f = failAfterRelease, events.count >= f.events {
            throw MigrationError(f.kind, "test transport's write fails after \(f.events) events")
        }
        // Stalling after the release lets the next job queue behind this one.
        maybeStall()
    }

    func sendSync() throws(MigrationError) {
        events.append(.sync)
        maybeStall()
    }

    private func maybeStall() {
        guard jitter else { return }
        rng ^= rng << 13
        rng ^= rng >> 7
        rng ^= rng << 17
        // Stalls shuffle which channel is idle when, exercising the scan.
        if rng % 16 == 0 { usleep(UInt32(rng % 200)) }
    }
}

@Suite("MultiFDSend hand-off")
struct MultiFDSendTests {
    /// Hands `rounds` × `batchesPerRound` batches of distinct pages to
    /// `channels` senders with a sync after each round; checks every page
    /// is handed over exactly once, in-round ordering holds and each channel
    /// writes its batches in the order they were handed out.
    func runStress(
        channels: Int, rounds: Int, batchesPerRound: Int, partialLast: Bool, batchesPerJob: Int = MultiFDJob.defaultCapacity
    ) throws {
        let transports = (0..<channels).map { RecordingTransport(seed: UInt64($0 + 1) * 0x9E37_79B9) }
        let latch = FailureLatch()
        let pool = MultiFDSend(transports: transports, latch: latch, batchesPerJob: batchesPerJob)
        var pages = MultiFDPages()
        var next: UInt64 = 0
        var expected = Set<UInt64>()
        for _ in 0..<rounds {
            for b in 0..<batchesPerRound {
                let n = (partialLast && b == batchesPerRound - 1) ? 37 : MultiFDPages.capacity
                for _ in 0..<n {
                    pages.append(offset: next * 4096, block: 0)
                    expected.insert(next * 4096)
                    next += 1
                }
                try pool.send(&pages)
                #expect(pages.isEmpty, "send must give back an empty batch")
            }
            try pool.sync()
        }
        pool.finish()
        #expect(!latch.hasFailed)

        var seen = [UInt64: Int]()
        for t in transports {
            var round = 0
            var previous: UInt64?
            for e in t.events {
                switch e {
                case .batch(let offsets):
                    #expect(!offsets.isEmpty)
                    // Offsets grow in hand-off order, so a channel that wrote
                    // a job out of order shows a step back.
                    if let p = previous, let first = offsets.first { #expect(first > p, "channel order kept") }
                    previous = offsets.last
                    for o in offsets {
                        seen[o, default: 0] += 1
                        // Pages of round r are numbered in [r*per, (r+1)*per):
                        // a batch after sync r-1 and before sync r belongs to round r.
                        let perRound = UInt64(batchesPerRound * MultiFDPages.capacity)
                        if !partialLast { #expect(o / 4096 / perRound == UInt64(round)) }
                    }
                case .sync:
                    round += 1
                }
            }
            #expect(round == rounds, "every channel writes one SYNC per round")
        }
        #expect(Set(seen.keys) == expected, "every page handed over")
        #expect(seen.values.allSatisfy { $0 == 1 }, "no page handed over twice")
    }

    @Test("many batches, one channel", arguments: [1, MultiFDJob.defaultCapacity])
    func oneChannel(batchesPerJob: Int) throws {
        try runStress(channels: 1, rounds: 20, batchesPerRound: 50, partialLast: false, batchesPerJob: batchesPerJob)
    }

    @Test("many batches, two channels", arguments: [1, MultiFDJob.defaultCapacity, MultiFDJob.maxCapacity])
    func twoChannels(batchesPerJob: Int) throws {
        try runStress(channels: 2, rounds: 30, batchesPerRound: 64, partialLast: false, batchesPerJob: batchesPerJob)
    }

    @Test("many batches, eight channels, partial final batches", arguments: [1, 3])
    func eightChannels(batchesPerJob: Int) throws {
        try runStress(channels: 8, rounds: 25, batchesPerRound: 40, partialLast: true, batchesPerJob: batchesPerJob)
    }

    @Test("rounds shorter than a job still reach every channel's SYNC")
    func shortRounds() throws { try runStress(channels: 2, rounds: 40, batchesPerRound: 3, partialLast: true) }

    @Test("a sync with nothing sent still completes on every channel")
    func emptyRounds() throws { try runStress(channels: 4, rounds: 10, batchesPerRound: 0, partialLast: false) }

    @Test("a failing channel stops the migration thread without a hang")
    func failingChannel() throws {
        let transports = [RecordingTransport(seed: 1), RecordingTransport(seed: 2, failAfter: 3)]
        let latch = FailureLatch()
        let pool = MultiFDSend(transports: transports, latch: latch)
        var pages = MultiFDPages()
        var thrown: MigrationError?
        do {
            for i in 0..<10_000 {
                pages.append(offset: UInt64(i) * 4096, block: 0)
                try pool.send(&pages)
            }
            try pool.sync()
        } catch {
            thrown = error
        }
        pool.finish()
        #expect(thrown != nil, "the failure reaches the migration thread")
        #expect(thrown?.description.contains("fails after 3") == true)
        #expect(latch.hasFailed)
    }

    @Test("a write failing after its job was released stops the migration thread without a hang", arguments: [false, true])
    func failingAfterRelease(peer: Bool) throws {
        // A peer error makes the sender wait for the peer's own report
        // first (FailureLatch): meanwhile the migration thread may hand the
        // dead channel more work, or sit in sync().
        let kind: MigrationError.Kind = peer ? .peer : .local
        let transports = [RecordingTransport(seed: 1), RecordingTransport(seed: 2, failAfterRelease: (5, kind))]
        let latch = FailureLatch()
        let pool = MultiFDSend(transports: transports, latch: latch)
        var pages = MultiFDPages()
        var thrown: MigrationError?
        do {
            for round in 0..<50 {
                for i in 0..<64 {
                    pages.append(offset: UInt64(round * 64 + i) * 4096, block: 0)
                    if pages.isFull || i == 63 { try pool.send(&pages) }
                }
                try pool.sync()
            }
        } catch {
            thrown = error
        }
        pool.finish()
        #expect(thrown?.description.contains("fails after 5") == true, "\(String(describing: thrown))")
        #expect(latch.hasFailed)
    }

    @Test("a job takes batches in order and moves them whole")
    func jobTakeAndMove() {
        let job = MultiFDJob(capacity: 3)
        var pages = MultiFDPages()
        for b in 0..<3 {
            for i in 0..<(b + 1) { pages.append(offset: UInt64(b * 10 + i) * 4096, block: 7) }
            job.take(&pages)
            #expect(pages.isEmpty)
        }
        #expect(job.isFull)
        let other = MultiFDJob(capacity: 3)
        job.move(to: other)
        #expect(job.isEmpty && other.count == 3)
        #expect((0..<3).map { other.batches[$0].count } == [1, 2, 3])
        #expect(other.batches[2].offsets[1] == 21 * 4096 && other.batches[2].blockID == 7)
        other.reset()
        #expect(other.isEmpty && other.batches.allSatisfy(\.isEmpty))
    }
}
