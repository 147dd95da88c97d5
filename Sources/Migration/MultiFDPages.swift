import MigrationWire

/// A batch of up to 128 pages of one RAM block, by offset: what the migration
/// thread hands to one sender (QEMU's `MultiFDPages_t`).
///
/// Ownership moves with the hand-off: the migration thread fills its own
/// batch, swaps it with an idle channel's empty one, and publishes with
/// `pending_job` (see `MultiFDSend`). Whoever owns a batch is the only one
/// touching it, so the class is `@unchecked Sendable`: the release/acquire
/// pair on `pending_job` is the synchronisation, not Swift's checker.
///
/// For the same reason `count` and `blockID` opt out of Swift's run-time
/// exclusivity check. That check only catches overlapping accesses on one
/// thread, which these two plain fields cannot have, yet it cost three
/// calls into the runtime's per-thread access set for every page `append`ed:
/// 786,432 calls per GiB, on the migration thread that feeds every sender.
public final class MultiFDPages: @unchecked Sendable {
    public static let capacity = MultiFDPacketHeader.maxPages
    /// Page offsets in the block, in the order they were added.
    public let offsets: UnsafeMutablePointer<UInt64>
    @exclusivity(unchecked) public private(set) var count = 0
    /// The block these pages belong to.
    @exclusivity(unchecked) public private(set) var blockID: UInt32 = 0

    public init() {
        offsets = .allocate(capacity: Self.capacity)
    }

    deinit { offsets.deallocate() }

    public var isEmpty: Bool { count == 0 }
    public var isFull: Bool { count == Self.capacity }

    /// Adds a page. The caller flushes first when full or the block changes.
    @inlinable public func append(offset: UInt64, block: UInt32) {
        precondition(count < Self.capacity && (count == 0 || block == blockID))
        if count == 0 { setBlock(block) }
        offsets[count] = offset
        setCount(count + 1)
    }

    /// Whether a page of `block` can join this batch.
    @inlinable public func accepts(block: UInt32) -> Bool {
        count < Self.capacity && (count == 0 || block == blockID)
    }

    public func reset() { count = 0 }

    @usableFromInline func setCount(_ n: Int) { count = n }
    @usableFromInline func setBlock(_ b: UInt32) { blockID = b }
}

/// What one hand-off gives a sender: up to `capacity` batches, one packet
/// each, which the sender writes with a single gather write.
///
/// Why several: on this machine a loopback TCP stream moves 1 GiB in about
/// 0.21 s with 512 KiB writes and 0.17 s with 2 MiB writes (tools/rawsock
/// built both ways, same run), and every hand-off costs the sender and the
/// migration thread a wake-up. Packets stay at QEMU's 128 pages.
///
/// Ownership is the hand-off's: the migration thread fills its staging job,
/// then moves the batches into an idle channel's job under `pending_job`.
public final class MultiFDJob: @unchecked Sendable {
    /// Batches per job by default: 4 × 128 pages × 4 KiB = 2 MiB per write.
    public static let defaultCapacity = 4
    /// Most batches a job may hold: one gather write must stay within
    /// IOV_MAX (1024) iovecs, and a batch needs up to 129 (prefix + pages).
    public static let maxCapacity = 7

    public let capacity: Int
    /// Slots 0..<count are in use; the rest are empty batches.
    public private(set) var batches: [MultiFDPages]
    public private(set) var count = 0

    public init(capacity: Int = MultiFDJob.defaultCapacity) {
        precondition((1...Self.maxCapacity).contains(capacity), "a job holds 1...\(Self.maxCapacity) batches")
        self.capacity = capacity
        batches = (0..<capacity).map { _ in MultiFDPages() }
    }

    public var isEmpty: Bool { count == 0 }
    public var isFull: Bool { count == capacity }

    /// Takes a filled batch into the next slot; `pages` comes back as the
    /// slot's empty batch.
    public func take(_ pages: inout MultiFDPages) {
        precondition(count < capacity)
        swap(&pages, &batches[count])
        count += 1
    }

    /// Moves all batches into `other` (empty), leaving this job empty.
    func move(to other: MultiFDJob) {
        precondition(other.isEmpty && other.capacity >= count)
        for i in 0..<count { swap(&batches[i], &other.batches[i]) }
        other.count = count
        count = 0
    }

    /// Empties every used batch.
    public func reset() {
        for i in 0..<count { batches[i].reset() }
        count = 0
    }
}

/// The maximal runs of adjacent pages in an offset array, in order: each
/// run is a range of indices whose offsets follow one another page by page.
/// What a single pread, pwrite or madvise can cover.
struct PageRuns: Sequence, IteratorProtocol {
    private let offsets: UnsafePointer<UInt64>
    private let count: Int
    private let pageSize: UInt64
    private var start = 0

    init(_ offsets: UnsafePointer<UInt64>, count: Int, pageSize: UInt64) {
        self.offsets = offsets
        self.count = count
        self.pageSize = pageSize
    }

    mutating func next() -> Range<Int>? {
        guard start < count else { return nil }
        var end = start + 1
        while end < count, offsets[end] == offsets[end - 1] + pageSize { end += 1 }
        defer { start = end }
        return start..<end
    }
}
