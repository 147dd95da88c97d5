import CShims
import GuestMemory
import MigrationWire
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// A sender channel's transport: turns a batch into one multifd packet and
/// writes it with a single gather write whose iovecs point into the guest
/// mapping.
///
/// Hot path: no allocation and no user-space copy of page data. The header,
/// offset array, zero-page scratch and iovec array are allocated once here.
/// Zero-page detection reads each page (until its first non-zero bytes).
public final class PacketSender: ChannelTransport {
    private let ram: RAMFile
    private let writer: any StreamWriter
    private let counters: TransferCounters
    private let pageSize: Int
    /// Header + offsets, encoded in place.
    private let prefix: UnsafeMutableRawPointer
    private let zeroScratch: UnsafeMutablePointer<UInt64>
    private let iov: UnsafeMutablePointer<iovec>
    private var packetNumber: UInt64 = 0
    public let channelID: Int

    public var mechanism: String { writer.mechanism }
    public var zeroCopyReport: (sends: UInt64, copied: UInt64) { writer.zeroCopyReport }

    public init(channelID: Int, ram: RAMFile, writer: any StreamWriter, counters: TransferCounters) {
        self.channelID = channelID
        self.ram = ram
        self.writer = writer
        self.counters = counters
        pageSize = Int(ram.block.pageSize)
        prefix = .allocate(byteCount: MultiFDPacketHeader.maxPrefixSize, alignment: 8)
        zeroScratch = .allocate(capacity: MultiFDPages.capacity)
        iov = .allocate(capacity: MultiFDPages.capacity + 1)
    }

    deinit {
        prefix.deallocate()
        zeroScratch.deallocate()
        iov.deallocate()
    }

    public func sendPages(_ pages: MultiFDPages) throws(MigrationError) {
        var normal = 0, zero = 0
        var iovCount = 1
        var payload = 0
        for i in 0..<pages.count {
            let off = pages.offsets[i]
            let page = ram.base + Int(off)
            if lm_buffer_is_zero(page, pageSize) {
                zeroScratch[zero] = off
                zero += 1
                continue
            }
            MultiFDPacketHeader.encodeOffset(off, index: normal, to: prefix)
            // Adjacent pages share one iovec: fewer segments for the kernel.
            let last = iov + (iovCount - 1)
            if iovCount > 1, last.pointee.iov_base! + last.pointee.iov_len == UnsafeMutableRawPointer(page) {
                last.pointee.iov_len += pageSize
            } else {
                iov[iovCount] = iovec(iov_base: page, iov_len: pageSize)
                iovCount += 1
            }
            normal += 1
            payload += pageSize
        }
        for z in 0..<zero {
            MultiFDPacketHeader.encodeOffset(zeroScratch[z], index: normal + z, to: prefix)
        }
        let header = MultiFDPacketHeader(
            flags: [], normalCount: UInt32(normal), zeroCount: UInt32(zero),
            payloadSize: UInt32(payload), packetNumber: packetNumber, blockID: pages.blockID)
        try write(header, iovCount: iovCount, payload: payload)
        counters.add(counters.normalPages, UInt64(normal))
        counters.add(counters.zeroPages, UInt64(zero))
        counters.add(counters.packets, 1)
    }

    public func sendSync() throws(MigrationError) {
        let header = MultiFDPacketHeader(
            flags: .sync, normalCount: 0, zeroCount: 0, payloadSize: 0, packetNumber: packetNumber, blockID: 0)
        try write(header, iovCount: 1, payload: 0)
    }

    private func write(_ header: MultiFDPacketHeader, iovCount: Int, payload: Int) throws(MigrationError) {
        header.encode(to: prefix)
        let prefixSize = MultiFDPacketHeader.size + header.offsetsSize
        iov[0] = iovec(iov_base: prefix, iov_len: prefixSize)
        do {
            try writer.writeAll(iov, count: iovCount, total: prefixSize + payload)
        } catch {
            throw MigrationError(error)
        }
        packetNumber += 1
        counters.add(counters.multifdBytes, UInt64(prefixSize + payload))
    }
}
