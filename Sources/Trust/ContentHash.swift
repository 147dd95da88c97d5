import CShims

/// Content hashes for integrity checks (XXH3 from libxxhash, run-time
/// dispatched to the widest vector unit). They catch corruption and
/// misplaced pages; they do not stop an attacker, which is the MACs' job.
public enum ContentHash {
    /// XXH3-64 of `length` bytes at `p`: the hash a page entry carries.
    @inlinable public static func page(_ p: UnsafeRawPointer, length: Int) -> UInt64 { lm_hash64(p, length) }

    /// Copies `count` pages laid out one after the other at `pages` to
    /// `base + offsets[i]` with streaming stores (then a store fence), and
    /// returns in `hashes[i]` each page's `page(_:length:)` hash, computed
    /// from the copy's own loads in the same pass where the CPU allows
    /// (`placementIsFused`), else by a hash pass before the copy. The
    /// pages are in place on return, whether their hashes match or not.
    @inlinable public static func placeHashed(
        _ pages: UnsafeRawPointer, count: Int, pageSize: Int, into base: UnsafeMutableRawPointer,
        offsets: UnsafePointer<UInt64>, hashes: UnsafeMutablePointer<UInt64>
    ) {
        lm_place_pages_hashed(base, offsets, pages, count, pageSize, hashes)
    }

    /// Whether `placeHashed` into `base` takes the one-pass path (AVX-512,
    /// `base` 64-byte aligned, `pageSize` a multiple of 64 above 240).
    public static func placementIsFused(into base: UnsafeRawPointer, pageSize: Int) -> Bool {
        lm_place_hashing_is_fused(base, pageSize)
    }

    /// XXH3-128 of the bytes, in canonical byte order.
    public static func digest(_ bytes: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        out.withUnsafeMutableBufferPointer { o in lm_hash128(bytes.baseAddress, bytes.count, o.baseAddress!) }
        return out
    }

    /// The hash of a page of `pageSize` zero bytes (a zero page's entry).
    public static func zeroPage(_ pageSize: Int) -> UInt64 {
        let p = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: 64)
        defer { p.deallocate() }
        p.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
        return page(p, length: pageSize)
    }
}
