import CShims
import Dispatch
import GuestMemory
import MigrationWire
import OSCall
import Synchronization
import Trust
import URing
import WorkerThreads

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

#if canImport(Glibc)
    import Glibc
#endif

/// One destination channel: reads packets and checks each before it places
/// any page of it (docs/PROTOCOL.md §4, "Receiver validation"): the
/// header's fields, the prefix check over header and entries, every offset,
/// then the payload, read into this channel's own buffer, against its tag
/// (with a key: the GMAC, or the AEAD that decrypts it) and its zstd frame
/// (compressed). Last, each page's content hash, where the pages go:
/// - into the pre-faulted mapping of a precopy (the bulk of a migration):
///   the copy computes each page's hash as it moves it
///   (`placeChecked`); a page that does not match is zeroed again, never
///   marked arrived, and fails the migration. No guest runs on this
///   mapping before every page arrived and the completion check passed.
/// - into a running guest (postcopy, `placePostcopy`) or into the file by
///   pwrite (`writeThrough`, a destination that was not pre-faulted):
///   checked before the page is placed.
/// With a key the MAC has covered pages and hashes before any of this.
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
    /// Pages that arrived in this round: a page may come once per round
    /// (two copies in one round, on two channels, would race).
    private let roundSeen: DirtyBitmap
    private let table: PageTable
    private let sealer: PacketSealer?
    /// `[header | entries | payload | tag]` of the packet being read: the
    /// prefix right-aligned before `bodyOffset`, so a tag covers one
    /// contiguous range.
    private let packet: UnsafeMutableRawPointer
    /// Where the payload starts in `packet`: past the largest prefix, at a
    /// cache line, so that the placement's 64-byte loads never straddle two.
    private static let bodyOffset = (MultiFDPacketHeader.maxPrefixSize + 63) & ~63
    /// Per normal page of the packet: the hash of the bytes placed.
    private let placed: UnsafeMutablePointer<UInt64>
    private let header: UnsafeMutableRawPointer
    private let offsets: UnsafeMutablePointer<UInt64>
    private let hashes: UnsafeMutablePointer<UInt64>
    /// This channel's zstd context and buffers, when the source compresses.
    private let decompressor: PacketDecompressor?
    /// Page data goes into the file with pwrite, not through the mapping.
    private let writeThrough: Bool
    private let zeroHash: UInt64
    private var expectedPacket: UInt64 = 0
    /// The incoming guest's postcopy state, when an incoming guest waits:
    /// once it is active, pages go through the guest's userfaultfd
    /// (`placePostcopy`). Before, every page placed must be present in the
    /// file: a zero page is written even into a hole (a page marked arrived
    /// must never fault in the guest).
    private let postcopy: PostcopyTarget?
    /// Applied to this receiver's thread when it first places a page by
    /// postcopy (`FaultPathPriority.applyToTransfer`); the preempt
    /// channel's receiver has the fault path's priority from its start.
    var postcopyTransferPriority = FaultPathPriority.normal
    private var transferRaised = false
    /// The most bytes one `recv` takes: 0 (a whole payload) until this
    /// receiver first places a page by postcopy, then
    /// `postcopyBytesPerCall`, so that it never holds its CPU long while
    /// the fault path's real-time threads wait for one.
    private var bytesPerCall = 0
    /// With `--encrypt`: the current packet's decrypted payload, from `open`
    /// to `place`.
    private var opened: Data?
    /// With `--encrypt`: the packet's prefix, the AEAD's associated data,
    /// moved out of the nonce's way (`PacketSealer.open`).
    private let prefixCopy: UnsafeMutableRawPointer

    /// `writeThrough`: pwrite page data into the file instead of copying it
    /// into the mapping. For a destination that was not pre-faulted: a
    /// first touch through the mapping costs a fault, a zeroed page and a
    /// page-table entry to tear down, a pwrite into the hole only the copy
    /// (the issue measured 0.6–0.9 GB/s against 2.3 GB/s on /dev/shm), and a
    /// full file system is an error (ENOSPC) instead of a SIGBUS.
    init(
        id: Int, socket: Socket, ram: RAMFile, limits: PacketLimits, counters: TransferCounters, arrived: DirtyBitmap,
        roundSeen: DirtyBitmap, table: PageTable, sealer: PacketSealer? = nil, writeThrough: Bool = false,
        postcopy: PostcopyTarget? = nil
    ) throws(MigrationError) {
        self.postcopy = postcopy
        decompressor =
            limits.compression == .none ? nil : try PacketDecompressor(method: limits.compression, pageSize: Int(limits.pageSize))
        self.id = id
        self.socket = socket
        self.ram = ram
        self.limits = limits
        self.counters = counters
        self.arrived = arrived
        self.roundSeen = roundSeen
        self.table = table
        self.sealer = sealer
        let pageSize = Int(limits.pageSize)
        zeroHash = ContentHash.zeroPage(pageSize)
        let payloadCapacity = max(MultiFDPacketHeader.maxPages * pageSize, decompressor?.frameCapacity ?? 0)
        packet = .allocate(byteCount: Self.bodyOffset + payloadCapacity + PacketSealer.tagSize, alignment: 4096)
        placed = .allocate(capacity: MultiFDPacketHeader.maxPages)
        header = .allocate(byteCount: MultiFDPacketHeader.size, alignment: 8)
        prefixCopy = .allocate(byteCount: MultiFDPacketHeader.maxPrefixSize, alignment: 8)
        offsets = .allocate(capacity: MultiFDPacketHeader.maxPages)
        hashes = .allocate(capacity: MultiFDPacketHeader.maxPages)
        self.writeThrough = writeThrough
    }

    deinit {
        packet.deallocate()
        header.deallocate()
        prefixCopy.deallocate()
        offsets.deallocate()
        hashes.deallocate()
        placed.deallocate()
    }

    /// The receiver thread's loop.
    func run(barrier: RoundBarrier, latch: FailureLatch) {
        do throws(MigrationError) {
            while true {
                let h = try readPacket()
                if h.flags.contains(.sync) {
                    counters.add(counters.multifdBytes, UInt64(h.prefixSize + limits.tagSize))
                    barrier.synced.signal()
                    barrier.resume[id].wait()
                    if latch.hasFailed || barrier.quit.load(ordering: .acquiring) { return }
                    continue
                }
                if let plain = opened {
                    // Pages are placed straight from the decryption's output.
                    opened = nil
                    let failure: MigrationError? = plain.withUnsafeBytes { b in
                        do throws(MigrationError) {
                            try place(h, payload: b.baseAddress.map(UnsafeRawPointer.init) ?? UnsafeRawPointer(packet))
                            return nil
                        } catch {
                            return error
                        }
                    }
                    if let failure { throw failure }
                } else {
                    try place(h, payload: UnsafeRawPointer(packet + Self.bodyOffset))
                }
            }
        } catch {
            // After completion the source closes its channels: not a failure.
            if barrier.quit.load(ordering: .acquiring) { return }
            latch.failDeferringToPeer(error)
        }
    }

    private var what: String { "multifd packet \(expectedPacket) on channel \(id)" }

    /// For errors about a packet already read (`expectedPacket` moved on).
    private func what(_ h: MultiFDPacketHeader) -> String { "multifd packet \(h.packetNumber) on channel \(id)" }

    /// Reads one whole packet into `packet` and checks it (fields, prefix
    /// check, offsets, MAC or AEAD); returns its header. On return the
    /// payload is in the buffer; its pages' hashes are checked by `place`.
    private func readPacket() throws(MigrationError) -> MultiFDPacketHeader {
        let body = packet + Self.bodyOffset
        let h: MultiFDPacketHeader
        do {
            try socket.receiveExact(header, count: MultiFDPacketHeader.size, what: "reading a packet header on channel \(id)")
            // Fields first: every count is bounded before it sizes a read.
            h = try MultiFDPacketHeader.decode(header, limits: limits, expectedPacketNumber: expectedPacket)
            let start = body - h.prefixSize
            start.copyMemory(from: header, byteCount: MultiFDPacketHeader.size)
            try socket.receiveExact(
                start + MultiFDPacketHeader.size, count: h.entriesSize, what: "reading page entries on channel \(id)")
            try checkPrefix(h, at: start)
            if !h.flags.contains(.sync) {
                try h.decodeEntries(start + MultiFDPacketHeader.size, offsets: offsets, hashes: hashes, limits: limits)
            }
            try socket.receiveExact(
                body, count: Int(h.payloadSize) + limits.tagSize, bytesPerCall: bytesPerCall, what: "reading page data on channel \(id)")
            if let sealer { try open(h, with: sealer, start: start) }
        } catch {
            throw MigrationError(converting: error)
        }
        expectedPacket += 1
        return h
    }

    /// The prefix check: XXH3-64 of header and entries with the check
    /// field taken as zero. It names corruption before the payload is read.
    private func checkPrefix(_ h: MultiFDPacketHeader, at start: UnsafeMutableRawPointer) throws(MigrationError) {
        MultiFDPacketHeader.storeCheck(0, to: start)
        let computed = ContentHash.page(start, length: h.prefixSize)
        MultiFDPacketHeader.storeCheck(h.check, to: start)
        guard computed == h.check else {
            throw MigrationError(
                .integrity,
                "\(what): field 'prefix-check' is 0x\(String(h.check, radix: 16)): the header and entries hash to 0x\(String(computed, radix: 16)); the packet was corrupted in transit"
            )
        }
    }

    /// With a key: the GMAC over header, entries and payload, or the AEAD
    /// that decrypts the payload in place.
    private func open(_ h: MultiFDPacketHeader, with sealer: PacketSealer, start: UnsafeMutableRawPointer) throws(MigrationError) {
        let body = packet + Self.bodyOffset
        let payload = Int(h.payloadSize)
        let tag = UnsafeRawBufferPointer(start: body + payload, count: PacketSealer.tagSize)
        // Built only on failure: no allocation per packet.
        func fails() -> MigrationError {
            MigrationError(
                .integrity,
                "\(what): its MAC does not verify: the packet was tampered with, replayed, reordered or corrupted, or does not come from the source that proved the key"
            )
        }
        if sealer.encrypts {
            // The nonce goes just before the ciphertext, over the prefix's
            // end: the prefix (already decoded) moves aside first.
            prefixCopy.copyMemory(from: start, byteCount: h.prefixSize)
            guard
                let plain = sealer.open(
                    ciphertext: body, count: payload, prefix: UnsafeRawBufferPointer(start: prefixCopy, count: h.prefixSize),
                    packetNumber: h.packetNumber)
            else { throw fails() }
            opened = plain
        } else {
            guard
                sealer.verify(UnsafeRawBufferPointer(start: start, count: h.prefixSize + payload), packetNumber: h.packetNumber, tag: tag)
            else { throw fails() }
        }
    }

    /// Decodes (compressed), checks the zero pages' hashes and the round,
    /// places the normal pages with their hash check (before the copy, or
    /// in it: `placeChecked`), then records every page.
    private func place(_ h: MultiFDPacketHeader, payload: UnsafeRawPointer) throws(MigrationError) {
        let normal = Int(h.normalCount), total = normal + Int(h.zeroCount)
        let pageSize = Int(limits.pageSize)
        var pages = payload
        if h.flags.contains(.compressed), let decompressor {
            do {
                try decompressor.decode(h, limits: limits, from: pages)
            } catch {
                throw MigrationError(error)
            }
            pages = UnsafeRawPointer(decompressor.pages)
            counters.add(counters.compressedPages, UInt64(normal))
            counters.add(counters.compressedBytes, UInt64(h.payloadSize))
        }
        // Where the pages go decides when their hashes are checked:
        // - into the pre-faulted mapping of a precopy (the bulk of every
        //   migration): in the copy itself (`lm_place_pages_hashed`, one
        //   pass), see `placeChecked`;
        // - into a running guest (postcopy) or the file (pwrite): before,
        //   in a pass of their own. With a key the MAC (or the AEAD tag)
        //   already proved the payload and the entries to be the source's,
        //   bytes and hashes alike, so that pass is left out there (the
        //   issue: "with a key, a MAC instead").
        let intoGuest = postcopy?.active ?? false
        if sealer == nil && (intoGuest || writeThrough) { try checkPageHashes(h, pages: pages, normal: normal) }
        for i in normal..<total where hashes[i] != zeroHash {
            throw MigrationError(
                .integrity,
                "\(what(h)): zero page at offset 0x\(String(offsets[i], radix: 16)) (entry \(i)) carries hash 0x\(String(hashes[i], radix: 16)), not the zero page's 0x\(String(zeroHash, radix: 16))"
            )
        }
        if intoGuest, let postcopy {
            if !transferRaised {
                transferRaised = true
                postcopyTransferPriority.applyToTransfer()
                bytesPerCall = postcopyBytesPerCall
            }
            try placePostcopy(h, pages: pages, into: postcopy)
            return
        }
        for i in 0..<total where roundSeen.testAndMark(page: Int(offsets[i] / limits.pageSize)) {
            throw MigrationError(
                .protocolViolation,
                "\(what(h)): page at offset 0x\(String(offsets[i], radix: 16)) (entry \(i)) arrives a second time in this round; a source sends each page at most once per round"
            )
        }
        // Every check that needs no copy passed: only now does the
        // destination's memory change.
        if writeThrough {
            try writePages(from: pages, normal: normal)
        } else {
            try placeChecked(h, pages: pages, normal: normal)
        }
        // A zero page must end zero even over older content; reading first
        // avoids dirtying (and allocating) pages that already are. In a file
        // this migration created empty, a page no packet has reached yet is
        // still zero: nothing to read, nothing to allocate. (Rounds are
        // ordered by the SYNC barrier, so an earlier round's mark is seen;
        // within a round a page comes once.)
        let startsZero = ram.createdEmpty
        let materialize = postcopy != nil
        for i in normal..<total {
            let off = offsets[i]
            if startsZero && !arrived.isDirty(page: Int(off / limits.pageSize)) { continue }
            let p = ram.base + Int(off)
            if materialize || !lm_buffer_is_zero(p, pageSize) { p.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize) }
        }
        for i in 0..<total {
            let page = Int(offsets[i] / limits.pageSize)
            arrived.mark(page: page)
            table.record(page: page, hash: hashes[i])
        }
        counters.add(counters.normalPages, UInt64(normal))
        counters.add(counters.zeroPages, UInt64(total - normal))
        counters.add(counters.packets, 1)
        counters.add(counters.multifdBytes, UInt64(h.prefixSize + limits.tagSize) + UInt64(h.payloadSize))
    }

    /// Copies the normal pages into the pre-faulted mapping, hashing each as
    /// it is copied (`lm_place_pages_hashed`: streaming stores, since the
    /// packet buffer is hot and the mapping cold; the hash rides on the
    /// copy's loads at no measurable cost), then compares every hash with
    /// its entry's. A page that does not match is zeroed again and never
    /// marked arrived, and the packet fails the migration, so its bytes
    /// count for nothing: they were in a mapping no guest runs on (a
    /// precopy destination's guest starts only after every page arrived
    /// and the completion check passed; a running guest gets its pages by
    /// `placePostcopy`, checked first), and a failed destination is removed
    /// or marked incomplete. With a key the check runs too, for free: the
    /// MAC proved the bytes to be the source's, so a mismatch says the
    /// source hashed other bytes than it sent.
    private func placeChecked(_ h: MultiFDPacketHeader, pages: UnsafeRawPointer, normal: Int) throws(MigrationError) {
        let pageSize = Int(limits.pageSize)
        ContentHash.placeHashed(pages, count: normal, pageSize: pageSize, into: ram.base, offsets: offsets, hashes: placed)
        var firstBad: Int?
        for i in 0..<normal where placed[i] != hashes[i] {
            (ram.base + Int(offsets[i])).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
            firstBad = firstBad ?? i
        }
        if let bad = firstBad { throw hashMismatch(h, entry: bad, got: placed[bad]) }
    }

    /// A normal page whose hash is not its entry's. Without a key the
    /// bytes changed on the way; with one they passed the MAC, so the
    /// source hashed other bytes than it sent.
    private func hashMismatch(_ h: MultiFDPacketHeader, entry i: Int, got: UInt64) -> MigrationError {
        let cause =
            sealer == nil ? "the page was corrupted in transit" : "its bytes passed the MAC, so the source hashed other bytes than it sent"
        return MigrationError(
            .integrity,
            "\(what(h)): page at offset 0x\(String(offsets[i], radix: 16)) (entry \(i)) hashes to 0x\(String(got, radix: 16)) but its entry says 0x\(String(hashes[i], radix: 16)): \(cause); it was not kept"
        )
    }

    /// Without a key, before placing into a running guest or by pwrite:
    /// each normal page's XXH3-64 against its entry.
    private func checkPageHashes(_ h: MultiFDPacketHeader, pages: UnsafeRawPointer, normal: Int) throws(MigrationError) {
        let pageSize = Int(limits.pageSize)
        for i in 0..<normal {
            let got = ContentHash.page(pages + i * pageSize, length: pageSize)
            guard got == hashes[i] else { throw hashMismatch(h, entry: i, got: got) }
        }
    }

    /// Postcopy placement: the guest runs, so every page goes in through its
    /// userfaultfd, whole (`UFFDIO_COPY` from this channel's buffer,
    /// `UFFDIO_ZEROPAGE`), and wakes the guest threads waiting on it. A
    /// page may come twice (requested on the preempt channel and pushed on
    /// a multifd channel, or asked again): a page that arrived already is
    /// skipped once its hash equals the one recorded (the source RAM no
    /// longer changes, so any other hash is corruption), and a copy that
    /// finds the page present (EEXIST: the other channel won the race) is
    /// not an error. There is no per-round check here: postcopy is one
    /// round. Nothing touches the receiver's own mapping.
    private func placePostcopy(_ h: MultiFDPacketHeader, pages: UnsafeRawPointer, into target: PostcopyTarget) throws(MigrationError) {
        let normal = Int(h.normalCount), total = normal + Int(h.zeroCount)
        let pageSize = Int(limits.pageSize)
        let base = target.guestBase
        var i = 0
        do {
            while i < total {
                let page = Int(offsets[i] / limits.pageSize)
                // Acquire: pairs with the release of `mark` below (another
                // channel's), which follows its `record`: an arrived page's
                // entry is the hash of the copy placed, never a stale
                // precopy one (postcopy-discard clears the arrived bit and
                // leaves the entry).
                if arrived.isMarkedAcquire(page: page) {
                    let recorded = table.entry(page: page)
                    guard recorded == hashes[i] else {
                        throw MigrationError(
                            .integrity,
                            "\(what(h)): page at offset 0x\(String(offsets[i], radix: 16)) arrived again with hash 0x\(String(hashes[i], radix: 16)), but the copy placed holds 0x\(String(recorded, radix: 16)); in postcopy the source RAM does not change, so one of them is corrupt"
                        )
                    }
                    i += 1
                    continue
                }
                // A run of adjacent pages of one kind (normal or zero) that
                // have not arrived: one ioctl.
                // At most `postcopyBytesPerCall` per ioctl, like the reads.
                let zero = i >= normal, last = min(zero ? total : normal, i + max(1, postcopyBytesPerCall / pageSize))
                var end = i + 1
                while end < last, offsets[end] == offsets[end - 1] + limits.pageSize, !arrived.isDirty(page: page + (end - i)) {
                    end += 1
                }
                let address = base + offsets[i], length = (end - i) * pageSize
                if zero {
                    _ = try target.userfault.zeroPage(at: address, length: length)
                } else {
                    _ = try target.userfault.copy(to: address, from: pages + i * pageSize, length: length)
                }
                let log = target.faults
                // The entry first, then the arrived bit (release): see above.
                for k in i..<end {
                    table.record(page: page + (k - i), hash: hashes[k])
                    arrived.mark(page: page + (k - i))
                }
                if log.hasWaits {
                    let now = Monotonic.now
                    for k in i..<end { log.placed(page: page + (k - i), at: now) }
                }
                i = end
            }
        } catch let e as MigrationError {
            throw e
        } catch let e as GuestMemoryError {
            throw MigrationError(
                .local, "\(what(h)): cannot place pages into the incoming guest (pid \(target.guestPID)): \(e.description)")
        } catch {
            throw MigrationError(.local, "\(error)")
        }
        counters.add(counters.normalPages, UInt64(normal))
        counters.add(counters.zeroPages, UInt64(total - normal))
        counters.add(counters.packets, 1)
        counters.add(counters.multifdBytes, UInt64(h.prefixSize + limits.tagSize) + UInt64(h.payloadSize))
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
}
