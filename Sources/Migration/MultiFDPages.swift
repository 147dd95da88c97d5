import MigrationWire

/// A batch of up to 128 pages of one RAM block, by offset: what the migration
/// thread hands to one sender (QEMU's `MultiFDPages_t`).
///
/// Ownership moves with the hand-off: the migration thread fills its own
/// batch, swaps it with an idle channel's empty one, and publishes with
/// `pending_job` (see `MultiFDSend`). Whoever owns a batch is the only one
/// touching it, so the class is `@unchecked Sendable`: the release/acquire
/// pair on `pending_job` is the synchronisation, not Swift's checker.
public final class MultiFDPages: @unchecked Sendable {
    public static let capacity = MultiFDPacketHeader.maxPages
    /// Page offsets in the block, in the order they were added.
    public let offsets: UnsafeMutablePointer<UInt64>
    public private(set) var count = 0
    /// The block these pages belong to.
    public private(set) var blockID: UInt32 = 0

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
