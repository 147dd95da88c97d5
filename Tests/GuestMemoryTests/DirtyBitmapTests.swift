import Foundation
import GuestMemory
import Synchronization
import TestSupport
import Testing

@Suite("DirtyBitmap")
struct DirtyBitmapTests {
    /// Every page `harvestAll` takes, in the order it takes them.
    static func harvested(_ bitmap: DirtyBitmap) -> [Int] {
        var pages: [Int] = []
        bitmap.harvestAll { pages.append($0) }
        return pages
    }

    static func dirtyPages(_ bitmap: DirtyBitmap) -> [Int] {
        (0..<bitmap.pageCount).filter { bitmap.isDirty(page: $0) }
    }

    @Test(arguments: [(1, 1), (63, 1), (64, 1), (65, 2), (128, 2), (130, 3), (1 << 20, 1 << 14)])
    func wordCount(pages: Int, words: Int) {
        #expect(DirtyBitmap.wordCount(pages: pages) == words)
        #expect(DirtyBitmap(pageCount: pages).wordCount == words)
        #expect(DirtyBitmap(pageCount: pages).pageCount == pages)
    }

    @Test func startsClean() {
        let bitmap = DirtyBitmap(pageCount: 200)
        #expect(bitmap.dirtyCount() == 0)
        #expect(bitmap.nextDirtyWord(from: 0) == nil)
        #expect(Self.dirtyPages(bitmap).isEmpty)
        #expect(Self.harvested(bitmap).isEmpty)
    }

    @Test func markSetsExactlyThatPage() {
        let bitmap = DirtyBitmap(pageCount: 130)
        let marked = [0, 1, 63, 64, 127, 128, 129]
        for page in marked {
            #expect(!bitmap.isDirty(page: page))
            bitmap.mark(page: page)
            #expect(bitmap.isDirty(page: page))
        }
        #expect(Self.dirtyPages(bitmap) == marked)
        #expect(bitmap.dirtyCount() == marked.count)
        // Marking twice is still one page.
        bitmap.mark(page: 64)
        #expect(bitmap.dirtyCount() == marked.count)
    }

    @Test func harvestReturnsTheWordsBitsAndClearsIt() {
        let bitmap = DirtyBitmap(pageCount: 130)
        for page in [0, 5, 63, 64, 100] { bitmap.mark(page: page) }
        #expect(bitmap.harvest(word: 0) == UInt64(1) | 1 << 5 | 1 << 63)
        #expect(bitmap.harvest(word: 0) == 0)
        #expect(!bitmap.isDirty(page: 0) && !bitmap.isDirty(page: 5) && !bitmap.isDirty(page: 63))
        // Other words are untouched.
        #expect(bitmap.isDirty(page: 64) && bitmap.isDirty(page: 100))
        #expect(bitmap.dirtyCount() == 2)
        #expect(bitmap.harvest(word: 1) == UInt64(1) | 1 << 36)
        #expect(bitmap.harvest(word: 2) == 0)
        #expect(bitmap.dirtyCount() == 0)
    }

    @Test(arguments: [1, 2, 63, 64, 65, 128, 130, 1000])
    func markAllSetsExactlyPageCountBits(pageCount: Int) {
        let bitmap = DirtyBitmap(pageCount: pageCount)
        bitmap.mark(page: pageCount - 1)  // an already-set bit stays one bit
        bitmap.markAll()
        #expect(bitmap.dirtyCount() == pageCount)
        #expect(Self.dirtyPages(bitmap).count == pageCount)
        // No bit past the last page: the last word holds exactly the tail.
        let tail = pageCount % 64
        let last = bitmap.harvest(word: bitmap.wordCount - 1)
        #expect(last == (tail == 0 ? UInt64.max : (UInt64(1) << UInt64(tail)) - 1))
        for w in 0..<bitmap.wordCount - 1 {
            #expect(bitmap.harvest(word: w) == UInt64.max)
        }
        #expect(bitmap.dirtyCount() == 0)
    }

    @Test func markAllHarvestsEveryPageOnce() {
        let bitmap = DirtyBitmap(pageCount: 130)
        bitmap.markAll()
        #expect(Self.harvested(bitmap) == Array(0..<130))
        #expect(bitmap.dirtyCount() == 0)
    }

    @Test func nextDirtyWordSkipsCleanWords() {
        let bitmap = DirtyBitmap(pageCount: 64 * 10)
        bitmap.mark(page: 3 * 64 + 17)
        bitmap.mark(page: 7 * 64)
        bitmap.mark(page: 9 * 64 + 63)
        #expect(bitmap.nextDirtyWord(from: 0) == 3)
        #expect(bitmap.nextDirtyWord(from: 3) == 3)
        #expect(bitmap.nextDirtyWord(from: 4) == 7)
        #expect(bitmap.nextDirtyWord(from: 8) == 9)
        #expect(bitmap.nextDirtyWord(from: 10) == nil)
        _ = bitmap.harvest(word: 9)
        #expect(bitmap.nextDirtyWord(from: 8) == nil)
        // Looking does not clear.
        #expect(bitmap.dirtyCount() == 2)
    }

    @Test func harvestAllVisitsMarkedPagesInAscendingOrderAndLeavesItClean() {
        var g = SplitMix64(seed: 42)
        for pageCount in [1, 64, 130, 4097, 50_000] {
            let bitmap = DirtyBitmap(pageCount: pageCount)
            var marked = Set<Int>()
            for _ in 0..<min(pageCount, 3000) {
                let page = Int.random(in: 0..<pageCount, using: &g)
                marked.insert(page)
                bitmap.mark(page: page)
            }
            marked.insert(pageCount - 1)
            bitmap.mark(page: pageCount - 1)
            #expect(bitmap.dirtyCount() == marked.count)

            let pages = Self.harvested(bitmap)
            #expect(pages == marked.sorted(), "pageCount \(pageCount)")
            #expect(bitmap.dirtyCount() == 0)
            #expect(bitmap.nextDirtyWord(from: 0) == nil)
            #expect(Self.harvested(bitmap).isEmpty)
        }
    }

    @Test func harvestAllTakesPagesMarkedAheadOfTheWalk() {
        let bitmap = DirtyBitmap(pageCount: 64 * 4)
        bitmap.mark(page: 1)
        var pages: [Int] = []
        bitmap.harvestAll { page in
            pages.append(page)
            // A write landing in a word not yet walked is taken this pass;
            // one in a word already walked waits for the next.
            if page == 1 {
                bitmap.mark(page: 3 * 64 + 5)
                bitmap.mark(page: 2)
            }
        }
        #expect(pages == [1, 3 * 64 + 5])
        #expect(Self.harvested(bitmap) == [2])
    }

    @Test func harvestAllRethrows() {
        struct Stop: Error {}
        let bitmap = DirtyBitmap(pageCount: 256)
        bitmap.mark(page: 10)
        bitmap.mark(page: 200)
        var seen: [Int] = []
        #expect(throws: Stop.self) {
            try bitmap.harvestAll { page in
                seen.append(page)
                throw Stop()
            }
        }
        #expect(seen == [10])
        // The word not yet reached is still dirty.
        #expect(bitmap.isDirty(page: 200))
    }

    @Test func borrowedWordsAreTheBitmap() {
        final class Owner {}
        let words = UnsafeMutablePointer<UInt64>.allocate(capacity: 3)
        defer { words.deallocate() }
        words.initialize(repeating: 0, count: 3)
        words[2] = 1 << 1  // page 129, set before the bitmap exists
        do {
            let bitmap = DirtyBitmap(borrowing: words, pageCount: 130, owner: Owner())
            #expect(bitmap.wordCount == 3)
            #expect(bitmap.isDirty(page: 129))
            bitmap.mark(page: 70)
            #expect(words[1] == UInt64(1) << 6)
            bitmap.markAll()
            #expect(words[0] == UInt64.max && words[1] == UInt64.max && words[2] == 0b11)
            #expect(bitmap.harvest(word: 1) == UInt64.max)
            #expect(words[1] == 0)
        }
        // The bitmap did not free memory it does not own.
        words[0] = 7
        #expect(words[0] == 7)
    }

    /// Four writers mark disjoint random pages (sharing words) while a
    /// harvester keeps harvesting; no page may be lost or taken twice.
    @Test func concurrentMarksAreNeverLost() {
        let pageCount = 1 << 16
        let writers = 4
        let perWriter = 12_000
        let bitmap = DirtyBitmap(pageCount: pageCount)

        final class Shared: Sendable {
            let writersDone = Atomic<Int>(0)
            let harvestPasses = Atomic<Int>(0)
            let marked = Mutex<[Int]>([])
            let harvested = Mutex<[Int]>([])

            /// Waits until the harvester has finished a pass that began after
            /// this call, so pages marked before the call were harvested
            /// concurrently with the writers.
            func waitForAFreshPass() {
                let seen = harvestPasses.load(ordering: .acquiring)
                while harvestPasses.load(ordering: .acquiring) < seen + 2 { sched_yield() }
            }
        }
        let shared = Shared()
        let group = DispatchGroup()

        group.enter()
        Thread {
            var mine: [Int] = []
            while shared.writersDone.load(ordering: .acquiring) < writers {
                bitmap.harvestAll { mine.append($0) }
                shared.harvestPasses.add(1, ordering: .releasing)
            }
            shared.harvested.withLock { $0.append(contentsOf: mine) }
            group.leave()
        }.start()

        for w in 0..<writers {
            group.enter()
            Thread {
                // Writer w owns the pages congruent to w mod 4, so every word
                // is written by all four writers at once.
                var g = SplitMix64(seed: 1000 + UInt64(w))
                var mine = Array(stride(from: w, to: pageCount, by: writers))
                mine.shuffle(using: &g)
                mine.removeLast(mine.count - perWriter)
                let half = perWriter / 2
                for page in mine[..<half] { bitmap.mark(page: page) }
                shared.waitForAFreshPass()
                for page in mine[half...] { bitmap.mark(page: page) }
                shared.marked.withLock { $0.append(contentsOf: mine) }
                shared.writersDone.add(1, ordering: .releasing)
                group.leave()
            }.start()
        }

        #expect(group.wait(timeout: .now() + 120) == .success)
        // The final harvest, after every writer and the harvester stopped.
        let byHarvester = shared.harvested.withLock { $0 }
        let harvested = byHarvester + Self.harvested(bitmap)
        let marked = shared.marked.withLock { $0 }

        #expect(marked.count == writers * perWriter)
        #expect(Set(marked).count == marked.count)
        // The harvester really ran alongside the writers: it took at least
        // every first half.
        #expect(byHarvester.count >= writers * perWriter / 2)
        // Each page was marked once, so it is taken exactly once.
        #expect(harvested.count == marked.count)
        #expect(Set(harvested) == Set(marked))
        #expect(bitmap.dirtyCount() == 0)
    }
}
