import Dispatch
import Foundation
import GuestMemory
import MigrationWire
import SystemPackage
import TestSupport
import Testing
import Trust

@testable import Migration
@testable import URing

#if canImport(Glibc)
    import Glibc
#endif

/// The real sender's packets through a socketpair into the real receiver:
/// what verifies is placed, byte for byte, and recorded in the page table;
/// a packet that fails any check (prefix check, MAC, zero-page hash) fails
/// the channel before one byte of it reaches the mapping, and a page that
/// fails its hash (checked as it is copied) is zeroed again and recorded
/// nowhere.
@Suite("PacketReceiver")
struct PacketReceiverTests {
    static let pages = PacketSenderTests.pages, pageSize = PacketSenderTests.pageSize
    static let batches = PacketSenderTests.batches

    /// What one receive run left behind.
    struct Outcome {
        var error: MigrationError?
        var synced: Bool
        var ram: [UInt8]
        var table: PageTable
        var counters: TransferCounters
        /// The pages the receiver marked arrived.
        var arrived: DirtyBitmap
    }

    /// The sender's bytes for `batches` (one job) and a SYNC packet, with
    /// the sender's page table.
    static func sent(
        _ ram: RAMFile, sealer: PacketSealer? = nil, compression: CompressionSetting = .none
    ) throws -> (bytes: [UInt8], table: PageTable) {
        let (writer, _, table) = try PacketSenderTests.send(ram, sealer: sealer, compression: compression, thenSync: true)
        return (writer.bytes, table)
    }

    /// Feeds `bytes` to a receiver on a fresh, empty destination file and
    /// waits for its SYNC (success) or its failure.
    static func receive(
        _ bytes: [UInt8], limits: PacketLimits, sealer: PacketSealer? = nil, writeThrough: Bool = false
    ) throws -> Outcome {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-precv-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        let ram = try RAMFile.create(
            path: FilePath(dir.appendingPathComponent("dst").path), size: UInt64(pages * pageSize), pageSize: UInt64(pageSize))
        let (a, b) = ControlChannelTests.socketPair()
        let counters = TransferCounters()
        let table = PageTable(pages: pages)
        let arrived = DirtyBitmap(pageCount: pages)
        let receiver = try PacketReceiver(
            id: 0, socket: b, ram: ram, limits: limits, counters: counters, arrived: arrived,
            roundSeen: DirtyBitmap(pageCount: pages), table: table,
            sealer: sealer, writeThrough: writeThrough)
        let barrier = RoundBarrier(channels: 1)
        let latch = FailureLatch()
        let done = DispatchSemaphore(value: 0), written = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            receiver.run(barrier: barrier, latch: latch)
            done.signal()
        }
        DispatchQueue.global().async {
            try? a.sendAll(bytes)
            written.signal()
        }
        var synced = false
        let deadline = DispatchTime.now() + 30
        while DispatchTime.now() < deadline, !latch.hasFailed {
            if barrier.synced.wait(timeout: .now() + .milliseconds(10)) == .success {
                synced = true
                break
            }
        }
        barrier.quit.store(true, ordering: .releasing)
        barrier.resume[0].signal()
        #expect(done.wait(timeout: .now() + 30) == .success, "the receiver thread ends")
        a.shutdown()
        b.shutdown()
        _ = written.wait(timeout: .now() + 30)
        let image = Array(UnsafeRawBufferPointer(start: ram.base, count: pages * pageSize))
        return Outcome(error: latch.error, synced: synced, ram: image, table: table, counters: counters, arrived: arrived)
    }

    /// The image with only the pages of `batches[0..<upTo]` (what a
    /// receiver placed once those packets verified); the rest zero.
    static func expected(_ image: [UInt8], packets upTo: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: image.count)
        for p in batches[0..<upTo].joined() { out[p * pageSize..<(p + 1) * pageSize] = image[p * pageSize..<(p + 1) * pageSize] }
        return out
    }

    /// Byte offsets of each packet in `bytes` (job packets, then the SYNC).
    static func packetStarts(_ bytes: [UInt8], limits: PacketLimits) throws -> [Int] {
        let writer = CapturingWriter()
        writer.bytes = bytes
        var at = 0, starts: [Int] = []
        for n in 0...batches.count {
            let p = try writer.decodePrefix(at: &at, limits: limits, packetNumber: UInt64(n))
            starts.append(p.start)
            at += Int(p.header.payloadSize) + limits.tagSize
        }
        #expect(at == bytes.count)
        return starts
    }

    /// Recomputes and stores the prefix check of the packet at `start`, as
    /// a forger (or a bug) that keeps header and entries consistent would.
    static func reseal(_ bytes: inout [UInt8], packetAt start: Int, prefixSize: Int) {
        let check = CapturingWriter.prefixCheck(bytes[start..<start + prefixSize])
        withUnsafeBytes(of: check.bigEndian) { bytes.replaceSubrange(start + 40..<start + 48, with: $0) }
    }

    static func limits(_ method: CompressionMethod = .none, tagSize: Int = 0) -> PacketLimits {
        var l = PacketSenderTests.limits
        l.compression = method
        l.tagSize = tagSize
        return l
    }

    @Test("what the sender sends is placed byte for byte and recorded as the sender recorded it", arguments: [false, true])
    func placesWhatWasSent(writeThrough: Bool) throws {
        try PacketSenderTests.withRAM { ram, image in
            for method in [CompressionMethod.none, .zstd] {
                let (bytes, sourceTable) = try Self.sent(ram, compression: CompressionSetting(method: method))
                let out = try Self.receive(bytes, limits: Self.limits(method), writeThrough: writeThrough)
                #expect(out.error == nil, "\(String(describing: out.error))")
                #expect(out.synced)
                #expect(out.ram == Self.expected(image, packets: Self.batches.count) ? true : false, "\(method): the placed pages")
                #expect(out.table.digest() == sourceTable.digest(), "\(method): the page tables agree")
                #expect(out.counters.read(out.counters.packets) == UInt64(Self.batches.count))
                #expect(out.counters.read(out.counters.multifdBytes) == UInt64(bytes.count))
            }
        }
    }

    @Test("sealed packets (authenticated or encrypted) are opened and placed", arguments: [false, true])
    func placesSealedPackets(encrypts: Bool) throws {
        try PacketSenderTests.withRAM { ram, image in
            let key = PacketSenderTests.keys.toDestination
            let (bytes, sourceTable) = try Self.sent(ram, sealer: PacketSealer(key: key, encrypts: encrypts))
            let out = try Self.receive(
                bytes, limits: Self.limits(tagSize: PacketSealer.tagSize), sealer: PacketSealer(key: key, encrypts: encrypts))
            #expect(out.error == nil, "\(String(describing: out.error))")
            #expect(out.synced)
            #expect(out.ram == Self.expected(image, packets: Self.batches.count) ? true : false)
            #expect(out.table.digest() == sourceTable.digest())
        }
    }

    @Test(
        "a flipped bit in a page fails its entry's hash; that page is not kept, no page of the packet counts as arrived",
        arguments: [false, true])
    func corruptPageIsRefused(writeThrough: Bool) throws {
        try PacketSenderTests.withRAM { ram, image in
            let (sent, _) = try Self.sent(ram)
            let starts = try Self.packetStarts(sent, limits: Self.limits())
            var bytes = sent
            // Packet 1's third payload page.
            let prefixSize = MultiFDPacketHeader.size + Self.batches[1].count * MultiFDPacketHeader.entrySize
            bytes[starts[1] + prefixSize + 2 * Self.pageSize + 100] ^= 0x20
            let out = try Self.receive(bytes, limits: Self.limits(), writeThrough: writeThrough)
            #expect(out.error?.kind == .integrity, "\(String(describing: out.error))")
            #expect(out.error?.description.contains("multifd packet 1 on channel 0") == true, "\(String(describing: out.error))")
            #expect(out.error?.description.contains("(entry 2) hashes to") == true, "\(String(describing: out.error))")
            #expect(out.error?.description.contains("it was not kept") == true, "\(String(describing: out.error))")
            #expect(!out.synced)
            // By pwrite every page is checked before the write: nothing of
            // packet 1. Into the mapping the copy checks the hashes
            // (PROTOCOL.md §4, check 24): packet 1's good pages were copied,
            // its bad page was zeroed again.
            var want = Self.expected(image, packets: writeThrough ? 1 : 2)
            let bad = Self.batches[1].filter { !PacketSenderTests.isZero($0) }[2]
            want.replaceSubrange(bad * Self.pageSize..<(bad + 1) * Self.pageSize, with: repeatElement(0, count: Self.pageSize))
            let differ = (0..<Self.pages).filter { p in
                out.ram[p * Self.pageSize..<(p + 1) * Self.pageSize] != want[p * Self.pageSize..<(p + 1) * Self.pageSize]
            }
            #expect(differ.isEmpty, "pages that differ from what should be there (bad page \(bad)): \(differ)")
            // Either way, nothing of packet 1 counts: not arrived, not recorded.
            for page in Self.batches[1] {
                #expect(!out.arrived.isDirty(page: page), "page \(page) marked arrived")
                #expect(out.table.entry(page: page) == 0, "page \(page) recorded")
            }
            for page in Self.batches[0] { #expect(out.arrived.isDirty(page: page), "packet 0's page \(page) arrived") }
            #expect(out.counters.read(out.counters.packets) == 1, "only packet 0 counted")
        }
    }

    @Test("with a key, a page whose entry hash is wrong under a valid MAC is not kept: the source hashed other bytes")
    func keyedHashMismatchIsRefused() throws {
        try PacketSenderTests.withRAM { ram, image in
            let key = PacketSenderTests.keys.toDestination
            let limits = Self.limits(tagSize: PacketSealer.tagSize)
            let (sent, _) = try Self.sent(ram, sealer: PacketSealer(key: key, encrypts: false))
            let starts = try Self.packetStarts(sent, limits: limits)
            var bytes = sent
            // Packet 0, entry 0's hash: changed, then the prefix check and
            // the GMAC computed again, as a source with a hashing bug would.
            let batch = Self.batches[0]
            let prefixSize = MultiFDPacketHeader.size + batch.count * MultiFDPacketHeader.entrySize
            let normal = batch.filter { !PacketSenderTests.isZero($0) }.count
            bytes[starts[0] + MultiFDPacketHeader.size + 15] ^= 0x01
            Self.reseal(&bytes, packetAt: starts[0], prefixSize: prefixSize)
            let covered = prefixSize + normal * Self.pageSize
            let tag = try bytes.withUnsafeBytes { b in
                var t = [UInt8](repeating: 0, count: PacketSealer.tagSize)
                try t.withUnsafeMutableBytes { o in
                    try PacketSealer(key: key, encrypts: false).authenticate(
                        UnsafeRawBufferPointer(rebasing: b[starts[0]..<starts[0] + covered]), packetNumber: 0, into: o.baseAddress!)
                }
                return t
            }
            bytes.replaceSubrange(starts[0] + covered..<starts[0] + covered + PacketSealer.tagSize, with: tag)
            let out = try Self.receive(bytes, limits: limits, sealer: PacketSealer(key: key, encrypts: false))
            #expect(out.error?.kind == .integrity, "\(String(describing: out.error))")
            #expect(
                out.error?.description.contains("(entry 0) hashes to") == true
                    && out.error?.description.contains("the source hashed other bytes than it sent") == true,
                "\(String(describing: out.error))")
            let first = batch.first { !PacketSenderTests.isZero($0) }!
            #expect(!out.arrived.isDirty(page: first))
            let want = Self.expected(image, packets: 1).enumerated().map { i, b in i / Self.pageSize == first ? 0 : b }
            #expect(out.ram == want ? true : false, "packet 0's other pages copied, its first page zeroed again")
        }
    }

    @Test("a flipped bit in header or entries fails the prefix check before the payload is read")
    func corruptPrefixIsRefused() throws {
        try PacketSenderTests.withRAM { ram, image in
            let (sent, _) = try Self.sent(ram)
            let starts = try Self.packetStarts(sent, limits: Self.limits())
            // The reserved word is refused by its own field check (it must
            // be 0), before any page of the packet is placed.
            var reserved = sent
            reserved[starts[2] + 37] ^= 0x01
            let refused = try Self.receive(reserved, limits: Self.limits())
            #expect(refused.error?.description.contains("'reserved'") == true, "\(String(describing: refused.error))")
            #expect(refused.ram == Self.expected(image, packets: 2) ? true : false, "only packets 0 and 1 were placed")
            // An entry's hash and the check itself: no field check sees them.
            for byte in [MultiFDPacketHeader.size + 16 * 5 + 12, 44] {
                var bytes = sent
                bytes[starts[2] + byte] ^= 0x01
                let out = try Self.receive(bytes, limits: Self.limits())
                #expect(out.error?.kind == .integrity, "byte \(byte): \(String(describing: out.error))")
                #expect(out.error?.description.contains("'prefix-check'") == true, "\(String(describing: out.error))")
                #expect(out.ram == Self.expected(image, packets: 2) ? true : false, "byte \(byte): only packets 0 and 1 were placed")
            }
        }
    }

    @Test("a page hash changed with a consistent prefix check still fails: against the page, or the zero page's hash")
    func forgedHashIsRefused() throws {
        try PacketSenderTests.withRAM { ram, image in
            let (sent, _) = try Self.sent(ram)
            let starts = try Self.packetStarts(sent, limits: Self.limits())
            let batch = Self.batches[0]
            let normal = batch.filter { !PacketSenderTests.isZero($0) }.count
            let prefixSize = MultiFDPacketHeader.size + batch.count * MultiFDPacketHeader.entrySize
            // A normal page's hash is checked as the copy places it: packet
            // 0's other pages are in the mapping, entry 0's page is zeroed
            // again. A zero page's is checked before anything is placed.
            let firstNormal = batch.first { !PacketSenderTests.isZero($0) }!
            let placedButFirst = Self.expected(image, packets: 1).enumerated().map { i, b in i / Self.pageSize == firstNormal ? 0 : b }
            for (entry, words) in [(0, "(entry 0) hashes to"), (normal, "zero page at offset")] {
                var bytes = sent
                bytes[starts[0] + MultiFDPacketHeader.size + entry * 16 + 15] ^= 0x01
                Self.reseal(&bytes, packetAt: starts[0], prefixSize: prefixSize)
                let out = try Self.receive(bytes, limits: Self.limits())
                #expect(out.error?.kind == .integrity, "\(String(describing: out.error))")
                #expect(out.error?.description.contains(words) == true, "\(String(describing: out.error))")
                #expect(out.error?.description.contains("multifd packet 0 on channel 0") == true, "\(String(describing: out.error))")
                let want = entry == 0 ? placedButFirst : Self.expected(image, packets: 0)
                #expect(out.ram == want ? true : false, "entry \(entry): the mapping holds other pages than expected")
            }
        }
    }

    @Test("a page moved to another offset passes every packet check; the page tables' digests tell")
    func movedPageShowsInTheDigest() throws {
        try PacketSenderTests.withRAM { ram, _ in
            let (sent, sourceTable) = try Self.sent(ram)
            let starts = try Self.packetStarts(sent, limits: Self.limits())
            var bytes = sent
            // Packet 0's entries 0 and 1 (pages 0 and 1) trade offsets.
            let e0 = starts[0] + MultiFDPacketHeader.size, e1 = e0 + 16
            let first = Array(bytes[e0..<e0 + 8]), second = Array(bytes[e1..<e1 + 8])
            bytes.replaceSubrange(e0..<e0 + 8, with: second)
            bytes.replaceSubrange(e1..<e1 + 8, with: first)
            Self.reseal(&bytes, packetAt: starts[0], prefixSize: MultiFDPacketHeader.size + Self.batches[0].count * 16)
            let out = try Self.receive(bytes, limits: Self.limits())
            #expect(out.error == nil && out.synced)
            #expect(out.table.digest() != sourceTable.digest())
        }
    }

    @Test("with a key, one flipped payload bit fails the MAC (or the AEAD) before any page check", arguments: [false, true])
    func tamperedSealedPacketIsRefused(encrypts: Bool) throws {
        try PacketSenderTests.withRAM { ram, image in
            let key = PacketSenderTests.keys.toDestination
            let limits = Self.limits(tagSize: PacketSealer.tagSize)
            let (sent, _) = try Self.sent(ram, sealer: PacketSealer(key: key, encrypts: encrypts))
            let starts = try Self.packetStarts(sent, limits: limits)
            let prefixSize = MultiFDPacketHeader.size + Self.batches[1].count * MultiFDPacketHeader.entrySize
            for at in [starts[1] + prefixSize + 5000, starts[2] - 1] {  // a payload byte, a tag byte
                var bytes = sent
                bytes[at] ^= 0x01
                let out = try Self.receive(bytes, limits: limits, sealer: PacketSealer(key: key, encrypts: encrypts))
                #expect(out.error?.kind == .integrity, "\(String(describing: out.error))")
                #expect(out.error?.description.contains("its MAC does not verify") == true, "\(String(describing: out.error))")
                #expect(out.ram == Self.expected(image, packets: 1) ? true : false, "only packet 0 was placed")
            }
            // Another key: the first packet already fails.
            let other = ChannelKeys(
                key: try PreSharedKey(bytes: [UInt8](repeating: 0x43, count: 32)), hello: [1], challenge: [2], sourceNonce: [3],
                destinationNonce: [4])
            let out = try Self.receive(sent, limits: limits, sealer: PacketSealer(key: other.toDestination, encrypts: encrypts))
            #expect(out.error?.kind == .integrity)
            #expect(out.ram == Self.expected(image, packets: 0) ? true : false, "nothing placed")
        }
    }
}
