import MigrationWire
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Keeps every gather write's bytes, as the socket would carry them. Used
/// by one thread at a time (the test's, or the sender it is handed to).
final class CapturingWriter: StreamWriter, @unchecked Sendable {
    var bytes: [UInt8] = []
    var mechanism: String { "capture" }

    func writeAll(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int) throws(SocketError) {
        var n = 0
        for i in 0..<count {
            bytes += UnsafeRawBufferPointer(start: iov[i].iov_base, count: iov[i].iov_len)
            n += iov[i].iov_len
        }
        precondition(n == total, "the iovecs hold \(n) bytes, the write says \(total)")
    }

    /// Decodes the header and offsets of the packet at byte `at` of what was
    /// written, checked as a receiver checks them, and moves `at` to the
    /// packet's payload.
    func decodePrefix(at: inout Int, limits: PacketLimits, packetNumber: UInt64) throws -> (MultiFDPacketHeader, [UInt64]) {
        let start = at
        let h = try bytes.withUnsafeBytes { raw in
            try MultiFDPacketHeader.decode(raw.baseAddress! + start, limits: limits, expectedPacketNumber: packetNumber)
        }
        var offsets = [UInt64](repeating: 0, count: Int(h.normalCount + h.zeroCount))
        try bytes.withUnsafeBytes { raw in
            try offsets.withUnsafeMutableBufferPointer {
                try h.decodeOffsets(raw.baseAddress! + start + MultiFDPacketHeader.size, into: $0.baseAddress!, limits: limits)
            }
        }
        at += MultiFDPacketHeader.size + h.offsetsSize
        return (h, offsets)
    }
}
