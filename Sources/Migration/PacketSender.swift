import CShims
import GuestMemory
import MigrationWire
import Trust
import URing

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

#if canImport(Glibc)
    import Glibc
#endif

/// A sender channel's transport: turns each batch of a job into one multifd
/// packet and writes the job's packets with a single gather write.
///
/// Every page is sent from the private copy `BatchReader` made of it, and
/// its entry carries the XXH3-64 hash of that copy (docs/PROTOCOL.md §4):
/// the destination checks each page against it before placing it, and both
/// sides record it in their `PageTable` for the completion check. The
/// header and entries carry their own check. With a pre-shared key each
/// packet also ends with a tag: a GMAC over header, entries and payload,
/// which must lie contiguous, so the packet is laid out around its pages in
/// their reader slot (prefix in the slot's headroom, tag in its tailroom:
/// no copy of a page); with `--encrypt`, AES-256-GCM instead.
///
/// Hot path: no allocation without encryption. The headers, entry arrays,
/// zero-page scratch, copies, sealed slots and iovec array are allocated
/// once here, and so is the compressor's state (`PacketCompressor`). Zero
/// pages are never sent or compressed.
public final class PacketSender: ChannelTransport {
    private let writer: any StreamWriter
    private let counters: TransferCounters
    private let pageSize: Int
    /// Where each RAM block starts in the mapping (`RAMFile.blockStarts`).
    private let blockStarts: [UInt64]
    /// Header + entries of each packet of a job, encoded in place.
    private let prefixes: UnsafeMutableRawPointer
    private let jobCapacity: Int
    private let zeroScratch: UnsafeMutablePointer<UInt64>
    /// Slot positions of the batch's normal pages, in entry order.
    private let normalSlots: UnsafeMutablePointer<Int>
    private let reader: BatchReader
    private let iov: UnsafeMutablePointer<iovec>
    /// This channel's zstd context and buffers, when the migration compresses.
    private let compressor: PacketCompressor?
    /// With a key: the channel's MAC (and cipher).
    private let sealer: PacketSealer?
    /// With `--encrypt`: the ciphertexts of the job being written, each
    /// with the index of its iovec (`seal` appends, `write` sends them).
    private var ciphertexts: [(iov: Int, data: Data)] = []
    /// With a key: per packet of a job, `[prefix | payload | tag]` laid out
    /// contiguous (the prefix right-aligned before `maxPrefixSize`).
    private let sealed: UnsafeMutableRawPointer?
    private let sealedSlotSize: Int
    private let table: PageTable
    private let zeroHash: UInt64
    private var packetNumber: UInt64 = 0
    public let channelID: Int

    /// Postcopy: short send calls, so that the fault path's real-time
    /// threads get a CPU soon (`postcopyBytesPerCall`).
    public func enterPostcopy() { writer.bytesPerCall = postcopyBytesPerCall }

    public var mechanism: String { writer.mechanism }
    public var zeroCopyReport: (sends: UInt64, copied: UInt64) { writer.zeroCopyReport }

    init(
        channelID: Int, ram: RAMFile, writer: any StreamWriter, counters: TransferCounters, table: PageTable,
        sealer: PacketSealer? = nil, jobCapacity: Int = MultiFDJob.defaultCapacity, compression: CompressionSetting = .none
    ) throws(MigrationError) {
        self.channelID = channelID
        self.writer = writer
        self.counters = counters
        self.jobCapacity = jobCapacity
        self.table = table
        self.sealer = sealer
        pageSize = Int(ram.block.pageSize)
        blockStarts = ram.blockStarts
        zeroHash = ContentHash.zeroPage(pageSize)
        switch compression.method {
        case .none: compressor = nil
        case .zstd: compressor = try PacketCompressor(level: compression.level, pageSize: pageSize, jobCapacity: jobCapacity)
        }
        prefixes = .allocate(byteCount: jobCapacity * MultiFDPacketHeader.maxPrefixSize, alignment: 8)
        zeroScratch = .allocate(capacity: MultiFDPages.capacity)
        normalSlots = .allocate(capacity: MultiFDPages.capacity)
        // With a key the packet is sealed around its pages in their slot:
        // its prefix in the headroom, its tag in the tailroom (`seal`).
        reader = BatchReader(
            ram: ram, slots: jobCapacity, headroom: sealer == nil ? 0 : MultiFDPacketHeader.maxPrefixSize,
            tailroom: sealer == nil ? 0 : PacketSealer.tagSize)
        // Per packet: its prefix, at most one iovec per page, and a tag.
        iov = .allocate(capacity: jobCapacity * (MultiFDPages.capacity + 2))
        let payloadCapacity = max(MultiFDPages.capacity * pageSize, compressor?.frameCapacity ?? 0)
        sealedSlotSize = MultiFDPacketHeader.maxPrefixSize + payloadCapacity + PacketSealer.tagSize
        // Only a zstd frame is sealed in a buffer of its own.
        sealed = sealer == nil || compressor == nil ? nil : .allocate(byteCount: jobCapacity * sealedSlotSize, alignment: 64)
    }

    deinit {
        prefixes.deallocate()
        zeroScratch.deallocate()
        normalSlots.deallocate()
        iov.deallocate()
        sealed?.deallocate()
    }

    public func sendJob(_ job: MultiFDJob, release: () -> Void) throws(MigrationError) {
        precondition(job.count <= jobCapacity, "a job of \(job.count) batches exceeds this sender's \(jobCapacity)")
        ciphertexts.removeAll(keepingCapacity: true)
        var iovCount = 0, total = 0
        var normalPages = 0, zeroPages = 0, compressedBytes = 0, inPlace = 0
        let pageSize = self.pageSize
        for b in 0..<job.count {
            let pages = job.batches[b]
            // Slot b: the job's copies must all live until its write.
            do {
                try reader.read(pages, slot: b)
            } catch {
                throw MigrationError(error)
            }
            if !reader.isStaged { inPlace += pages.count }
            let prefix = prefixes + b * MultiFDPacketHeader.maxPrefixSize
            var normal = 0, zero = 0
            // Offsets are of the whole RAM; entries name them in the block.
            let blockStart = blockStarts[Int(pages.blockID)]
            for i in 0..<pages.count {
                let off = pages.offsets[i]
                let pageIndex = Int(off / UInt64(pageSize))
                if reader.isZero[i] {
                    zeroScratch[zero] = off &- blockStart
                    zero += 1
                    table.record(page: pageIndex, hash: zeroHash)
                    continue
                }
                let hash = ContentHash.page(reader.page(i), length: pageSize)
                MultiFDPacketHeader.encodeEntry(offset: off &- blockStart, hash: hash, index: normal, to: prefix)
                table.record(page: pageIndex, hash: hash)
                normalSlots[normal] = i
                normal += 1
            }
            for z in 0..<zero {
                MultiFDPacketHeader.encodeEntry(offset: zeroScratch[z], hash: zeroHash, index: normal + z, to: prefix)
            }
            var flags: MultiFDPacketHeader.Flags = []
            var frame: UnsafeRawBufferPointer?
            if let compressor, normal > 0 {
                // Copied, never compressed in place (see `stage`); all normal
                // pages of the packet become one frame, in slot b.
                for k in 0..<normal { compressor.stage(reader.page(normalSlots[k]), index: k) }
                frame = try compressor.compress(count: normal, slot: b)
                compressedBytes += frame!.count
                flags = .compressed
            }
            let payload = frame?.count ?? normal * pageSize
            let header = MultiFDPacketHeader(
                flags: flags, normalCount: UInt32(normal), zeroCount: UInt32(zero),
                payloadSize: UInt32(payload), packetNumber: packetNumber, blockID: pages.blockID)
            let prefixSize = encodePrefix(header, at: prefix)
            if let sealer {
                let bytes = try seal(
                    sealer, prefix: prefix, prefixSize: prefixSize, payload: payload, frame: frame, normal: normal, slot: b,
                    packetNumber: header.packetNumber, iovAt: &iovCount)
                total += bytes
            } else {
                iov[iovCount] = iovec(iov_base: prefix, iov_len: prefixSize)
                iovCount += 1
                if let frame {
                    iov[iovCount] = iovec(iov_base: UnsafeMutableRawPointer(mutating: frame.baseAddress), iov_len: frame.count)
                    iovCount += 1
                } else {
                    appendPages(normal: normal, iovAt: &iovCount)
                }
                total += prefixSize + payload
            }
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

    /// iovecs for the batch's normal pages in their slot; pages next to each
    /// other in the slot share one.
    private func appendPages(normal: Int, iovAt iovCount: inout Int) {
        let first = iovCount
        for k in 0..<normal {
            let page = reader.page(normalSlots[k])
            let last = iov + (iovCount - 1)
            if iovCount > first, last.pointee.iov_base! + last.pointee.iov_len == page {
                last.pointee.iov_len += pageSize
            } else {
                iov[iovCount] = iovec(iov_base: page, iov_len: pageSize)
                iovCount += 1
            }
        }
    }

    /// Lays the packet out contiguous and adds its tag, with one iovec for
    /// all of it; or encrypts its payload, with three iovecs: prefix,
    /// ciphertext (where the AEAD wrote it), tag. Returns the bytes it adds
    /// to the write. Pages are sealed where they lie, in reader slot
    /// `slot`: the normal ones are moved down over the zero ones (a page
    /// moves only when a zero page precedes it: none in a batch of random
    /// pages), the prefix goes into the slot's headroom and the tag into
    /// its tailroom. This overwrites the slot's zero pages, which nothing
    /// reads after this. A zstd frame is copied into the sealed buffer.
    private func seal(
        _ sealer: PacketSealer, prefix: UnsafeMutableRawPointer, prefixSize: Int, payload: Int, frame: UnsafeRawBufferPointer?,
        normal: Int, slot: Int, packetNumber: UInt64, iovAt iovCount: inout Int
    ) throws(MigrationError) -> Int {
        let body: UnsafeMutableRawPointer
        if let frame {
            body = sealed! + slot * sealedSlotSize + MultiFDPacketHeader.maxPrefixSize
            if frame.count > 0 { body.copyMemory(from: frame.baseAddress!, byteCount: frame.count) }
        } else {
            body = reader.slotStart(slot)
            // normalSlots is increasing, so normalSlots[k] >= k: each page
            // moves down to a place already read.
            for k in 0..<normal where normalSlots[k] != k {
                (body + k * pageSize).copyMemory(from: body + normalSlots[k] * pageSize, byteCount: pageSize)
            }
        }
        let start = body - prefixSize
        start.copyMemory(from: prefix, byteCount: prefixSize)
        let tag = body + payload
        do {
            if sealer.encrypts {
                let (ciphertext, mac) = try sealer.seal(
                    UnsafeRawBufferPointer(start: body, count: payload), prefix: UnsafeRawBufferPointer(start: start, count: prefixSize),
                    packetNumber: packetNumber)
                mac.withUnsafeBytes { tag.copyMemory(from: $0.baseAddress!, byteCount: PacketSealer.tagSize) }
                if payload > 0 {
                    // The ciphertext is sent from where the AEAD wrote it
                    // (its iovec is filled in by `write`, which holds it):
                    // copying it back over the plaintext cost a pass over
                    // every page.
                    iov[iovCount] = iovec(iov_base: start, iov_len: prefixSize)
                    iov[iovCount + 1] = iovec(iov_base: nil, iov_len: payload)
                    iov[iovCount + 2] = iovec(iov_base: tag, iov_len: PacketSealer.tagSize)
                    ciphertexts.append((iovCount + 1, ciphertext))
                    iovCount += 3
                    return prefixSize + payload + PacketSealer.tagSize
                }
            } else {
                try sealer.authenticate(
                    UnsafeRawBufferPointer(start: start, count: prefixSize + payload), packetNumber: packetNumber, into: tag)
            }
        } catch {
            throw MigrationError(error)
        }
        let bytes = prefixSize + payload + PacketSealer.tagSize
        iov[iovCount] = iovec(iov_base: start, iov_len: bytes)
        iovCount += 1
        return bytes
    }

    /// The zstd level, when this channel compresses.
    var compressionLevel: Int32? { compressor?.level }

    public func sendSync() throws(MigrationError) {
        let header = MultiFDPacketHeader(
            flags: .sync, normalCount: 0, zeroCount: 0, payloadSize: 0, packetNumber: packetNumber, blockID: 0)
        let prefixSize = encodePrefix(header, at: prefixes)
        var count = 0, total = prefixSize
        if let sealer {
            total = try seal(
                sealer, prefix: prefixes, prefixSize: prefixSize, payload: 0, frame: nil, normal: 0, slot: 0,
                packetNumber: header.packetNumber, iovAt: &count)
        } else {
            iov[0] = iovec(iov_base: prefixes, iov_len: prefixSize)
            count = 1
        }
        try write(iovCount: count, total: total)
    }

    /// Encodes a header in front of its entries (already in place), stores
    /// the prefix check, and numbers the packet. Returns the prefix size.
    private func encodePrefix(_ header: MultiFDPacketHeader, at prefix: UnsafeMutableRawPointer) -> Int {
        header.encode(to: prefix)
        MultiFDPacketHeader.storeCheck(0, to: prefix)
        let size = header.prefixSize
        MultiFDPacketHeader.storeCheck(ContentHash.page(prefix, length: size), to: prefix)
        packetNumber += 1
        return size
    }

    private func write(iovCount: Int, total: Int) throws(MigrationError) {
        let pending = ciphertexts
        ciphertexts.removeAll(keepingCapacity: true)
        if let failure = writePinning(pending[...], iovCount: iovCount, total: total) { throw MigrationError(failure) }
        counters.add(counters.multifdBytes, UInt64(total))
    }

    /// Writes once every ciphertext in `pending` is pinned, its iovec
    /// pointing at its bytes (one `withUnsafeBytes` each, nested).
    private func writePinning(_ pending: ArraySlice<(iov: Int, data: Data)>, iovCount: Int, total: Int) -> SocketError? {
        guard let first = pending.first else {
            do {
                try writer.writeAll(iov, count: iovCount, total: total)
                return nil
            } catch {
                return error
            }
        }
        return first.data.withUnsafeBytes { bytes in
            iov[first.iov].iov_base = UnsafeMutableRawPointer(mutating: bytes.baseAddress)
            return writePinning(pending.dropFirst(), iovCount: iovCount, total: total)
        }
    }
}
