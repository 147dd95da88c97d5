import CShims
import GuestMemory
import MigrationWire
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// A sender channel's transport: turns each batch of a job into one multifd
/// packet and writes the job's packets with a single gather write whose
/// iovecs point at the pages where `BatchReader` read them (its staging
/// slots for runs of adjacent pages, the guest mapping for scattered
/// pages), or, with compression, into this channel's frame slots.
///
/// Hot path: no allocation. The headers, offset arrays, zero-page scratch,
/// staging slots and iovec array are allocated once here, and so is the
/// compressor's state (`PacketCompressor`). Each page is read once, by the
/// `BatchReader`, which also finds the zero pages; zero pages are never
/// sent or compressed. With compression each normal page is copied once
/// more into the compressor's buffer (see `PacketCompressor.stage`).
public final class PacketSender: ChannelTransport {
    private let writer: any StreamWriter
    private let counters: TransferCounters
    private let pageSize: Int
    /// Header + offsets of each packet of a job, encoded in place.
    private let prefixes: UnsafeMutableRawPointer
    private let jobCapacity: Int
    private let zeroScratch: UnsafeMutablePointer<UInt64>
    private let reader: BatchReader
    private let iov: UnsafeMutablePointer<iovec>
    /// This channel's zstd context and buffers, when the migration compresses.
    private let compressor: PacketCompressor?
    private var packetNumber: UInt64 = 0
    public let channelID: Int

    public var mechanism: String { writer.mechanism }
    public var zeroCopyReport: (sends: UInt64, copied: UInt64) { writer.zeroCopyReport }

    public init(
        channelID: Int, ram: RAMFile, writer: any StreamWriter, counters: TransferCounters,
        jobCapacity: Int = MultiFDJob.defaultCapacity, compression: CompressionSetting = .none
    ) throws(MigrationError) {
        self.channelID = channelID
        self.writer = writer
        self.counters = counters
        self.jobCapacity = jobCapacity
        pageSize = Int(ram.block.pageSize)
        switch compression.method {
        case .none: compressor = nil
        case .zstd: compressor = try PacketCompressor(level: compression.level, pageSize: pageSize, jobCapacity: jobCapacity)
        }
        prefixes = .allocate(byteCount: jobCapacity * MultiFDPacketHeader.maxPrefixSize, alignment: 8)
        zeroScratch = .allocate(capacity: MultiFDPages.capacity)
        reader = BatchReader(ram: ram, slots: jobCapacity)
        // Per packet: its prefix and at most one iovec per page.
        iov = .allocate(capacity: jobCapacity * (MultiFDPages.capacity + 1))
    }

    deinit {
        prefixes.deallocate()
        zeroScratch.deallocate()
        iov.deallocate()
    }

    public func sendJob(_ job: MultiFDJob, release: () -> Void) throws(MigrationError) {
        precondition(job.count <= jobCapacity, "a job of \(job.count) batches exceeds this sender's \(jobCapacity)")
        var iovCount = 0, total = 0
        var normalPages = 0, zeroPages = 0, compressedBytes = 0, inPlace = 0
        for b in 0..<job.count {
            let pages = job.batches[b]
            // Slot b: the job's staged batches must all live until its write.
            do {
                try reader.read(pages, slot: b)
            } catch {
                throw MigrationError(error)
            }
            if !reader.isStaged { inPlace += pages.count }
            let prefix = prefixes + b * MultiFDPacketHeader.maxPrefixSize
            let prefixSlot = iovCount
            iovCount += 1
            var normal = 0, zero = 0, payload = 0
            for i in 0..<pages.count {
                let off = pages.offsets[i]
                let page = reader.page(i, offset: off)
                if reader.isZero[i] {
                    zeroScratch[zero] = off
                    zero += 1
                    continue
                }
                MultiFDPacketHeader.encodeOffset(off, index: normal, to: prefix)
                if let compressor {
                    // Copied, never compressed in place (see `stage`).
                    compressor.stage(page, index: normal)
                    normal += 1
                    continue
                }
                normal += 1
                // Adjacent pages share one iovec: fewer segments for the kernel.
                let last = iov + (iovCount - 1)
                if iovCount > prefixSlot + 1, last.pointee.iov_base! + last.pointee.iov_len == UnsafeMutableRawPointer(page) {
                    last.pointee.iov_len += pageSize
                } else {
                    iov[iovCount] = iovec(iov_base: page, iov_len: pageSize)
                    iovCount += 1
                }
                payload += pageSize
            }
            for z in 0..<zero {
                MultiFDPacketHeader.encodeOffset(zeroScratch[z], index: normal + z, to: prefix)
            }
            var flags: MultiFDPacketHeader.Flags = []
            if let compressor, normal > 0 {
                // All normal pages of the packet become one frame, in slot b:
                // the frames of a job live until its gather write is done.
                let frame = try compressor.compress(count: normal, slot: b)
                iov[iovCount] = iovec(iov_base: UnsafeMutableRawPointer(mutating: frame.baseAddress), iov_len: frame.count)
                iovCount += 1
                payload = frame.count
                compressedBytes += payload
                flags = .compressed
            }
            let header = MultiFDPacketHeader(
                flags: flags, normalCount: UInt32(normal), zeroCount: UInt32(zero),
                payloadSize: UInt32(payload), packetNumber: packetNumber, blockID: pages.blockID)
            let prefixSize = encodePrefix(header, at: prefix)
            iov[prefixSlot] = iovec(iov_base: prefix, iov_len: prefixSize)
            total += prefixSize + payload
            normalPages += normal
            zeroPages += zero
        }
        // Everything the write needs is in our own prefixes, slots and iovecs now.
        let packets = job.count
        release()
        try write(iovCount: iovCount, total: total)
        counters.add(counters.normalPages, UInt64(normalPages))
        counters.add(counters.zeroPages, UInt64(zeroPages))
        counters.add(counters.packets, UInt64(packets))
        if inPlace > 0 { counters.add(counters.pagesReadInPlace, UInt64(inPlace)) }
        if compressor != nil {
            counters.add(counters.compressedPages, UInt64(normalPages))
            counters.add(counters.compressedBytes, UInt64(compressedBytes))
        }
    }

    /// The zstd level, when this channel compresses.
    var compressionLevel: Int32? { compressor?.level }

    public func sendSync() throws(MigrationError) {
        let header = MultiFDPacketHeader(
            flags: .sync, normalCount: 0, zeroCount: 0, payloadSize: 0, packetNumber: packetNumber, blockID: 0)
        let prefixSize = encodePrefix(header, at: prefixes)
        iov[0] = iovec(iov_base: prefixes, iov_len: prefixSize)
        try write(iovCount: 1, total: prefixSize)
    }

    /// Encodes a header (its offsets are already in place) and numbers the
    /// packet. Returns the prefix size (header + offsets).
    private func encodePrefix(_ header: MultiFDPacketHeader, at prefix: UnsafeMutableRawPointer) -> Int {
        header.encode(to: prefix)
        packetNumber += 1
        return MultiFDPacketHeader.size + header.offsetsSize
    }

    private func write(iovCount: Int, total: Int) throws(MigrationError) {
        do {
            try writer.writeAll(iov, count: iovCount, total: total)
        } catch {
            throw MigrationError(error)
        }
        counters.add(counters.multifdBytes, UInt64(total))
    }
}
