import MigrationWire
import Testing
import Trust
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Keeps every gather write's bytes, as the socket would carry them. Used
/// by one thread at a time (the test's, or the sender it is handed to).
final class CapturingWriter: StreamWriter, @unchecked Sendable {
    var bytes: [UInt8] = []
    var mechanism: String { "capture" }
    var bytesPerCall = 0

    func writeAll(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int) throws(SocketError) {
        var n = 0
        for i in 0..<count {
            bytes += UnsafeRawBufferPointer(start: iov[i].iov_base, count: iov[i].iov_len)
            n += iov[i].iov_len
        }
        precondition(n == total, "the iovecs hold \(n) bytes, the write says \(total)")
    }

    /// One packet's prefix as a receiver reads it.
    struct Prefix {
        var header: MultiFDPacketHeader
        var offsets: [UInt64]
        var hashes: [UInt64]
        /// Where the packet starts in `bytes`.
        var start: Int
        /// Whether the prefix check (bytes 40..<48) is the XXH3-64 of header
        /// and entries taken with the check field zero.
        var checkVerifies: Bool
    }

    /// The XXH3-64 of a prefix with its check field taken as zero: what the
    /// check field must hold.
    static func prefixCheck(_ prefix: ArraySlice<UInt8>) -> UInt64 {
        var copy = Array(prefix)
        for i in MultiFDPacketHeader.checkedSize..<MultiFDPacketHeader.size { copy[i] = 0 }
        return copy.withUnsafeBytes { ContentHash.page($0.baseAddress!, length: $0.count) }
    }

    /// Decodes the header and entries of the packet at byte `at` of what was
    /// written, checked as a receiver checks them, and moves `at` to the
    /// packet's payload.
    func decodePrefix(at: inout Int, limits: PacketLimits, packetNumber: UInt64) throws -> Prefix {
        let start = at
        let h = try bytes.withUnsafeBytes { raw in
            try MultiFDPacketHeader.decode(raw.baseAddress! + start, limits: limits, expectedPacketNumber: packetNumber)
        }
        var offsets = [UInt64](repeating: 0, count: Int(h.normalCount + h.zeroCount))
        var hashes = offsets
        if !h.flags.contains(.sync) {
            try bytes.withUnsafeBytes { raw in
                try offsets.withUnsafeMutableBufferPointer { o in
                    try hashes.withUnsafeMutableBufferPointer {
                        try h.decodeEntries(
                            raw.baseAddress! + start + MultiFDPacketHeader.size, offsets: o.baseAddress!, hashes: $0.baseAddress!,
                            limits: limits)
                    }
                }
            }
        }
        at += h.prefixSize
        let verifies = Self.prefixCheck(bytes[start..<at]) == h.check
        return Prefix(header: h, offsets: offsets, hashes: hashes, start: start, checkVerifies: verifies)
    }
}

/// A failed expectation shows the packet's header, not all its entries.
extension CapturingWriter.Prefix: CustomTestStringConvertible {
    var testDescription: String {
        "packet \(header.packetNumber) at byte \(start) (\(header.normalCount)+\(header.zeroCount) pages, check "
            + (checkVerifies ? "verifies)" : "fails)")
    }
}

/// XXH3-64 of `bytes`, as a page entry carries it.
func contentHash(_ bytes: ArraySlice<UInt8>) -> UInt64 {
    Array(bytes).withUnsafeBytes { ContentHash.page($0.baseAddress!, length: $0.count) }
}
