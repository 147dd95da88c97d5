import CShims

/// One bit per guest page, in 64-bit words: set means "the destination's copy
/// of this page may be stale".
///
/// The ordering contract (docs/GUEST-CONTROL.md):
/// - A writer stores the page data first, then sets the bit with a
///   **release** `fetch_or` (`mark(page:)`).
/// - The source takes a whole word with an **acquire** `exchange(0)`
///   (`harvest(word:)`) and only then reads the pages whose bits it took.
/// So either the source saw the bit and reads data at least as new as the
/// write that set it, or the bit stays set for the next round.
///
/// Every word is touched only through the CShims atomics, never plainly; the
/// words may live in a file shared with the guest process. That is why this
/// class is `@unchecked Sendable`: Swift cannot see the atomics on raw memory.
public final class DirtyBitmap: @unchecked Sendable {
    /// Pages covered.
    public let pageCount: Int
    /// 64-bit words in the bitmap: `ceil(pageCount / 64)`.
    public let wordCount: Int
    @usableFromInline let words: UnsafeMutablePointer<UInt64>
    /// Keeps alive whatever holds `words` when they are borrowed (a mapping).
    private let owner: AnyObject?

    /// The number of words needed for `pageCount` pages.
    public static func wordCount(pages pageCount: Int) -> Int { (pageCount + 63) / 64 }

    /// A private, all-clean bitmap.
    public init(pageCount: Int) {
        precondition(pageCount > 0, "a bitmap covers at least one page")
        self.pageCount = pageCount
        self.wordCount = Self.wordCount(pages: pageCount)
        self.words = .allocate(capacity: wordCount)
        self.words.initialize(repeating: 0, count: wordCount)
        self.owner = nil
    }

    /// A bitmap over words that live elsewhere (the guest-control mapping).
    /// `owner` is retained for as long as the bitmap lives.
    public init(borrowing words: UnsafeMutablePointer<UInt64>, pageCount: Int, owner: AnyObject) {
        self.pageCount = pageCount
        self.wordCount = Self.wordCount(pages: pageCount)
        self.words = words
        self.owner = owner
    }

    deinit {
        if owner == nil { words.deallocate() }
    }

    /// Marks `page` dirty: call after the page's data is written
    /// (release; pairs with the acquire exchange in `harvest(word:)`).
    @inlinable public func mark(page: Int) {
        _ = lm_atomic_fetch_or_release_u64(words + (page >> 6), 1 << UInt64(page & 63))
    }

    /// Marks `page` and says whether it was marked already (relaxed: the
    /// destination's per-round duplicate check, whose rounds the SYNC
    /// barrier orders).
    @inlinable public func testAndMark(page: Int) -> Bool {
        let bit: UInt64 = 1 << UInt64(page & 63)
        return lm_atomic_fetch_or_release_u64(words + (page >> 6), bit) & bit != 0
    }

    /// Clears every page. Only while nobody marks (between rounds).
    public func clearAll() {
        for i in 0..<wordCount { _ = lm_atomic_exchange_acquire_u64(words + i, 0) }
    }

    /// Marks every page dirty: the first round sends everything.
    public func markAll() {
        for i in 0..<wordCount {
            _ = lm_atomic_fetch_or_release_u64(words + i, Self.fullMask(word: i, pageCount: pageCount))
        }
    }

    /// Takes word `index`, leaving it clean, and returns the bits that were
    /// set (acquire; pairs with the release `fetch_or` in `mark(page:)`).
    /// Read the pages of the returned bits only after this call.
    @inlinable public func harvest(word index: Int) -> UInt64 {
        lm_atomic_exchange_acquire_u64(words + index, 0)
    }

    /// Clears `page` and says whether it was marked (acquire, like a
    /// harvest: whoever clears a set bit owns sending that page). Postcopy's
    /// request server takes requested pages from the unsent set with it.
    @inlinable public func take(page: Int) -> Bool {
        let bit: UInt64 = 1 << UInt64(page & 63)
        return lm_atomic_fetch_and_acquire_u64(words + (page >> 6), ~bit) & bit != 0
    }

    /// Clears `page` (relaxed: for bitmaps whose readers a barrier orders,
    /// like the destination's arrived set at the postcopy switch).
    @inlinable public func clear(page: Int) {
        _ = lm_atomic_fetch_and_acquire_u64(words + (page >> 6), ~(1 << UInt64(page & 63)))
    }

    /// Whether `page` is marked, with acquire order: pairs with the release
    /// in `mark(page:)`, so what the marker wrote before marking (a page
    /// table entry) is seen. Postcopy's duplicate check needs it.
    @inlinable public func isMarkedAcquire(page: Int) -> Bool {
        lm_atomic_load_acquire_u64(words + (page >> 6)) & (1 << UInt64(page & 63)) != 0
    }

    /// Whether `page` is marked (relaxed: a hint, not a hand-off).
    @inlinable public func isDirty(page: Int) -> Bool {
        lm_atomic_load_relaxed_u64(words + (page >> 6)) & (1 << UInt64(page & 63)) != 0
    }

    /// The first word at or after `start` with any bit set, skipping clean
    /// words with relaxed loads (no writes, so no cache-line ping-pong with
    /// the guest on clean words). Nil when none.
    @inlinable public func nextDirtyWord(from start: Int) -> Int? {
        var i = start
        while i < wordCount {
            if lm_atomic_load_relaxed_u64(words + i) != 0 { return i }
            i += 1
        }
        return nil
    }

    /// Pages currently marked (relaxed loads; a snapshot while writers run).
    public func dirtyCount() -> Int {
        var n = 0
        for i in 0..<wordCount { n += lm_atomic_load_relaxed_u64(words + i).nonzeroBitCount }
        return n
    }

    /// Harvests every dirty word and calls `body` with each page taken, in
    /// ascending order. Pages marked during the walk are taken if their word
    /// has not been passed yet, else they wait for the next harvest. When
    /// `body` throws, the pages of the current word it did not take are
    /// marked again, so nothing harvested is lost.
    @inlinable public func harvestAll(_ body: (Int) throws -> Void) rethrows {
        var w = 0
        while let i = nextDirtyWord(from: w) {
            var bits = harvest(word: i)
            do {
                while bits != 0 {
                    try body(i << 6 | bits.trailingZeroBitCount)
                    bits &= bits &- 1
                }
            } catch {
                _ = lm_atomic_fetch_or_release_u64(words + i, bits)
                throw error
            }
            w = i + 1
        }
    }

    /// The bits of word `i` that correspond to real pages.
    static func fullMask(word i: Int, pageCount: Int) -> UInt64 {
        let first = i << 6
        let n = min(64, pageCount - first)
        return n == 64 ? ~0 : (1 << UInt64(n)) - 1
    }
}
