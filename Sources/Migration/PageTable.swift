import CShims
import Trust

/// One content hash per page of the block: what the source sent last, or
/// what the destination placed last (docs/PROTOCOL.md §6). At completion
/// the source sends the digest of its table and the destination compares it
/// with the digest of its own, so a page placed at a wrong offset, a page
/// of an older round applied after a newer one, or a lost page cannot pass.
///
/// Who writes: on the source, the sender threads as they encode a packet;
/// on the destination, the receiver threads once a packet verified. A page
/// is sent at most once per round, and the rounds are ordered by the SYNC
/// barrier (its semaphores order one round's writes of an entry before the
/// next round's), so no entry is written by two threads at once, except in
/// postcopy, where the two writers store the same value (see `record`).
/// The digest is taken after the last round's barrier.
final class PageTable: @unchecked Sendable {
    // @unchecked: plain memory whose entries the round barrier orders
    // (above); read only after the last barrier.
    let hashes: UnsafeMutablePointer<UInt64>
    let count: Int

    init(pages: Int) {
        count = pages
        hashes = .allocate(capacity: pages)
        hashes.initialize(repeating: 0, count: pages)
    }

    deinit { hashes.deallocate() }

    /// A relaxed atomic store (a plain store on x86-64): in postcopy a page
    /// may be sent or placed by two channels at once (requested and
    /// pushed); both carry the same bytes, since the source RAM no longer
    /// changes, so both store the same hash.
    @inline(__always) func record(page: Int, hash: UInt64) { lm_atomic_store_relaxed_u64(hashes + page, hash) }

    /// Postcopy: the entry of a page that arrived already (atomic, see
    /// `record`).
    @inline(__always) func entry(page: Int) -> UInt64 { lm_atomic_load_relaxed_u64(hashes + page) }

    /// XXH3-128 of the table, entries as little-endian u64 in page order.
    func digest() -> [UInt8] {
        #if _endian(big)
            let le = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
            defer { le.deallocate() }
            for i in 0..<count { le[i] = hashes[i].littleEndian }
            return ContentHash.digest(UnsafeRawBufferPointer(start: le, count: count * 8))
        #else
            return ContentHash.digest(UnsafeRawBufferPointer(start: hashes, count: count * 8))
        #endif
    }
}
