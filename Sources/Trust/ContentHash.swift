import CShims

/// Content hashes for integrity checks (XXH3 from libxxhash, run-time
/// dispatched to the widest vector unit). They catch corruption and
/// misplaced pages; they do not stop an attacker, which is the MACs' job.
public enum ContentHash {
    /// XXH3-64 of `length` bytes at `p`: the hash a page entry carries.
    @inlinable public static func page(_ p: UnsafeRawPointer, length: Int) -> UInt64 { lm_hash64(p, length) }

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
