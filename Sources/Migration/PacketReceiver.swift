import CShims
import Dispatch
import GuestMemory
import MigrationWire
import Synchronization
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// The destination's shared end-of-round barrier (docs/PROTOCOL.md, rounds).
///
/// A receiver that reads a SYNC packet posts `synced` and then waits on its
/// channel's `resume`. The main thread, on the end-of-round marker, waits for
/// N `synced` posts and then posts every `resume`. So no receiver reads a
/// page of round k+1 before every page of round k has landed.
final class RoundBarrier: Sendable {
    let synced = DispatchSemaphore(value: 0)
    let resume: [DispatchSemaphore]
    /// Set by the main thread once the migration completed: receivers then
    /// leave quietly when their sockets close.
    let quit = Atomic<Bool>(false)

    init(channels: Int) {
        resume = (0..<channels).map { _ in DispatchSemaphore(value: 0) }
    }
}

/// One destination channel: reads packets, validates all of each header and
/// offset array before touching memory, then receives page data straight
/// into the destination mapping (no intermediate buffer) when it was
/// pre-faulted, or into a buffer of this channel and from there into the
/// file with pwrite (`writeThrough`). A compressed packet is read into this
/// channel's frame buffer and decoded into its page buffer first; its pages
/// are copied into the mapping (or written into the file) only once the
/// frame has decoded to exactly the packet's pages (`PacketDecompressor`).
final class PacketReceiver: @unchecked Sendable {
    // @unchecked: used by its own receiver thread only, after being built on
    // the main thread (thread start orders the two).
    let id: Int
    let socket: Socket
    private let ram: RAMFile
    private let limits: PacketLimits
    private let counters: TransferCounters
    /// Pages that arrived at least once, for the completion check.
    private let arrived: DirtyBitmap
    private let header: UnsafeMutableRawPointer
    private let rawOffsets: UnsafeMutableRawPointer
    private let offsets: UnsafeMutablePointer<UInt64>
    private let iov: UnsafeMutablePointer<iovec>
    /// This channel's zstd context and buffers, when the source compresses.
    private let decompressor: PacketDecompressor?
    /// Page data goes into the file with pwrite, not through the mapping.
    private let writeThrough: Bool
    /// With `writeThrough` and no compression: 128 pages where page data
    /// lands before pwrite.
    private let bounce: UnsafeMutableRawPointer?
    private var expectedPacket: UInt64 = 0

    /// `writeThrough`: receive page data into a buffer of this channel and
    /// pwrite it into the file, instead of straight into the mapping. For a
    /// destination that was not pre-faulted: a first touch through the
    /// mapping costs a fault, a zeroed page and a page-table entry to tear
    /// down, a pwrite into the hole only the copy (the issue measured 0.6–0.9
    /// GB/s against 2.3 GB/s on /dev/shm), and a full file system is an
    /// error (ENOSPC) instead of a SIGBUS.
    init(
        id: Int, socket: Socket, ram: RAMFile, limits: PacketLimits, counters: TransferCounters, arrived: DirtyBitmap,
        writeThrough: Bool = false
    ) throws(MigrationError) {
        decompressor =
            limits.compression == .none ? nil : try PacketDecompressor(method: limits.compression, pageSize: Int(limits.pageSize))
        self.id = id
        self.socket = socket
        self.ram = ram
        self.limits = limits
        self.counters = counters
        self.arrived = arrived
        header = .allocate(byteCount: MultiFDPacketHeader.size, alignment: 8)
        rawOffsets = .allocate(byteCount: MultiFDPacketHeader.maxPages * 8, alignment: 8)
        offsets = .allocate(capacity: MultiFDPacketHeader.maxPages)
        iov = .allocate(capacity: MultiFDPacketHeader.maxPages)
        self.writeThrough = writeThrough
        // A compressed packet decodes into the decompressor's pages, which
        // serve as the buffer: no bounce buffer then.
        bounce =
            writeThrough && decompressor == nil
            ? .allocate(byteCount: MultiFDPacketHeader.maxPages * Int(limits.pageSize), alignment: 4096) : nil
    }

    deinit {
        header.deallocate()
        rawOffsets.deallocate()
        offsets.deallocate()
        iov.deallocate()
        bounce?.deallocate()
    }

    /// The receiver thread's loop.
    func run(barrier: RoundBarrier, latch: FailureLatch) {
        do {
            while true {
                let h = try readHeader()
                if h.flags.contains(.sync) {
                    counters.add(counters.multifdBytes, UInt64(MultiFDPacketHeader.size))
                    barrier.synced.signal()
                    barrier.resume[id].wait()
                    if latch.hasFailed || barrier.quit.load(ordering: .acquiring) { return }
                    continue
                }
                try receivePages(h)
            }
        } catch {
            // After completion the source closes its channels: not a failure.
            if barrier.quit.load(ordering: .acquiring) { return }
            latch.failDeferringToPeer(error)
        }
    }

    private func readHeader() throws(MigrationError) -> MultiFDPacketHeader {
        do {
            try socket.receiveExact(header, count: MultiFDPacketHeader.size, what: "reading a packet header on channel \(id)")
            let h = try MultiFDPacketHeader.decode(header, limits: limits, expectedPacketNumber: expectedPacket)
            expectedPacket += 1
            return h
        } catch {
            throw MigrationError(converting: error)
        }
    }

    private func receivePages(_ h: MultiFDPacketHeader) throws(MigrationError) {
        let normal = Int(h.normalCount), total = normal + Int(h.zeroCount)
        let pageSize = Int(limits.pageSize)
        do {
            try socket.receiveExact(rawOffsets, count: total * 8, what: "reading page offsets on channel \(id)")
            try h.decodeOffsets(rawOffsets, into: offsets, limits: limits)
            if h.flags.contains(.compressed), let decompressor {
                // The header check bounded payload-size by the frame buffer.
                try socket.receiveExact(decompressor.frame, count: Int(h.payloadSize), what: "reading compressed pages on channel \(id)")
                try decompressor.decode(h, limits: limits)
                // Decoded and checked: only now does the file change.
                if writeThrough {
                    try writePages(from: decompressor.pages, normal: normal)
                } else {
                    for i in 0..<normal {
                        (ram.base + Int(offsets[i])).copyMemory(from: decompressor.page(i), byteCount: pageSize)
                    }
                }
                counters.add(counters.compressedPages, UInt64(normal))
                counters.add(counters.compressedBytes, UInt64(h.payloadSize))
            } else if normal > 0, let bounce {
                try socket.receiveExact(bounce, count: Int(h.payloadSize), what: "reading page data on channel \(id)")
                try writePages(from: bounce, normal: normal)
            } else if normal > 0 {
                try receivePageData(h, normal: normal)
            }
        } catch {
            throw MigrationError(converting: error)
        }
        // A zero page must end zero even over older content; reading first
        // avoids dirtying (and allocating) pages that already are. In a file
        // this migration created empty, a page no packet has reached yet is
        // still zero: nothing to read, nothing to allocate. (Rounds are
        // ordered by the SYNC barrier, so an earlier round's mark is seen;
        // within a round a page comes once.)
        let startsZero = ram.createdEmpty
        for i in normal..<total {
            let off = offsets[i]
            if startsZero && !arrived.isDirty(page: Int(off / limits.pageSize)) { continue }
            let p = ram.base + Int(off)
            if !lm_buffer_is_zero(p, pageSize) { p.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize) }
        }
        for i in 0..<total { arrived.mark(page: Int(offsets[i] / limits.pageSize)) }
        counters.add(counters.normalPages, UInt64(normal))
        counters.add(counters.zeroPages, UInt64(total - normal))
        counters.add(counters.packets, 1)
        counters.add(counters.multifdBytes, UInt64(MultiFDPacketHeader.size + total * 8) + UInt64(h.payloadSize))
    }

    /// Writes the packet's normal pages, laid out one after the other in
    /// `buffer`, into the file: one pwrite per run of adjacent pages (the
    /// offsets are validated).
    private func writePages(from buffer: UnsafeRawPointer, normal: Int) throws(MigrationError) {
        let pageSize = Int(limits.pageSize)
        for run in PageRuns(offsets, count: normal, pageSize: limits.pageSize) {
            do {
                try ram.write(from: buffer + run.lowerBound * pageSize, offset: offsets[run.lowerBound], length: run.count * pageSize)
            } catch {
                throw MigrationError(error)
            }
        }
    }

    /// Uncompressed pages: every offset is known to be page-aligned and
    /// inside the block, so the payload is read straight into the mapping
    /// through a gather list.
    private func receivePageData(_ h: MultiFDPacketHeader, normal: Int) throws(SocketError) {
        let pageSize = Int(limits.pageSize)
        var n = 0
        for i in 0..<normal {
            let p = ram.base + Int(offsets[i])
            if n > 0, iov[n - 1].iov_base! + iov[n - 1].iov_len == p {
                iov[n - 1].iov_len += pageSize
            } else {
                iov[n] = iovec(iov_base: p, iov_len: pageSize)
                n += 1
            }
        }
        try socket.receiveExact(iov, count: n, total: Int(h.payloadSize), what: "reading page data on channel \(id)")
    }
}
