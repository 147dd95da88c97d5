import Foundation
import GuestMemory
import MigrationWire
import SystemPackage
import TestSupport
import Testing
import Trust

@testable import Migration

/// The uncompressed sender end to end, through a capturing writer: a job
/// whose batches are staged in their slots and one copied through the
/// mapping goes out as packets whose payload is exactly the normal pages, in
/// the order of the entries, each entry carrying the hash of its page, and
/// each prefix carrying its check.
@Suite("PacketSender")
struct PacketSenderTests {
    static let pages = 512, pageSize = 4096
    static func isZero(_ p: Int) -> Bool { p % 5 == 2 }
    static let limits = PacketLimits(
        channelID: 0, pageSize: UInt64(pageSize),
        blocks: [RAMBlockLayout(name: "pc.ram", size: UInt64(pages * pageSize), pageSize: UInt64(pageSize))], compression: .none)
    static let keys = ChannelKeys(
        key: try! PreSharedKey(bytes: [UInt8](repeating: 0x42, count: 32)), hello: [1], challenge: [2], sourceNonce: [3],
        destinationNonce: [4])

    // Batch 0: two runs (a gap at 60), staged in slot 0. Batch 1: one
    // run, staged in slot 1; were it staged over slot 0, batch 0's
    // payload would carry batch 1's bytes. Batch 2: 16 single pages,
    // copied through the mapping into slot 2.
    static let batches = [
        Array(0..<60) + Array(61..<128),
        Array(128..<256),
        (0..<16).map { 300 + 7 * $0 },
    ]

    /// A RAM file of `pages` pages, zero where `isZero`, else random; the
    /// image is handed to `body` with it.
    static func withRAM(_ body: (RAMFile, [UInt8]) throws -> Void) throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-psend-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        var image = [UInt8](repeating: 0, count: pages * pageSize)
        var g = SplitMix64(seed: 99)
        for p in 0..<pages where !isZero(p) {
            for w in 0..<(pageSize / 8) {
                let v = g.next() | 1
                for k in 0..<8 { image[p * pageSize + w * 8 + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
            }
        }
        let path = dir.appendingPathComponent("ram").path
        try Data(image).write(to: URL(fileURLWithPath: path))
        try body(try RAMFile(path: FilePath(path), access: .readOnly), image)
    }

    /// Sends `batches` as one job through a fresh sender (then a SYNC packet
    /// when `thenSync`).
    static func send(
        _ ram: RAMFile, sealer: PacketSealer? = nil, compression: CompressionSetting = .none, thenSync: Bool = false
    ) throws -> (writer: CapturingWriter, counters: TransferCounters, table: PageTable) {
        let job = MultiFDJob(capacity: batches.count)
        for b in batches {
            var batch = MultiFDPages()
            for p in b { batch.append(offset: UInt64(p * pageSize), block: 0) }
            job.take(&batch)
        }
        let writer = CapturingWriter()
        let counters = TransferCounters()
        let table = PageTable(pages: pages)
        let sender = try PacketSender(
            channelID: 0, ram: ram, writer: writer, counters: counters, table: table, sealer: sealer, jobCapacity: batches.count,
            compression: compression)
        var released = 0
        try sender.sendJob(job) { released += 1 }
        #expect(released == 1)
        if thenSync { try sender.sendSync() }
        return (writer, counters, table)
    }

    /// Checks a packet's entries against the batch it came from and the
    /// image; `payload` is the plain normal pages (decrypted if need be).
    static func expectPacket(_ p: CapturingWriter.Prefix, sent: [Int], payload: ArraySlice<UInt8>, image: [UInt8], number: Int) {
        let h = p.header
        #expect(p.checkVerifies, "packet \(number): the prefix check does not verify")
        // Every page of the batch once: normal ones first, then zero ones.
        #expect(Set(p.offsets.map { Int($0) / pageSize }) == Set(sent))
        #expect(Int(h.normalCount) == sent.filter { !isZero($0) }.count)
        #expect(payload.count == Int(h.normalCount) * pageSize)
        let zeroHash = ContentHash.zeroPage(pageSize)
        for (i, off) in p.offsets.enumerated() {
            let page = Int(off) / pageSize
            if i < Int(h.normalCount) {
                #expect(!isZero(page), "page \(page) sent with data")
                let start = payload.startIndex + i * pageSize
                let sentPage = payload[start..<start + pageSize]
                let same = sentPage.elementsEqual(image[page * pageSize..<(page + 1) * pageSize])
                #expect(same, "packet \(number), page \(page): payload bytes differ from the file's")
                #expect(p.hashes[i] == contentHash(sentPage), "packet \(number), page \(page): entry hash is not the payload's")
            } else {
                #expect(isZero(page), "page \(page) sent as zero")
                #expect(p.hashes[i] == zeroHash, "zero page \(page): entry hash is not the zero page's")
            }
        }
    }

    /// Every page sent is in the table with the hash its entry carried;
    /// pages not sent are still 0.
    static func expectTable(_ table: PageTable, image: [UInt8]) {
        let sent = Set(batches.joined())
        for page in 0..<pages {
            let expected = sent.contains(page) ? contentHash(image[page * pageSize..<(page + 1) * pageSize]) : 0
            #expect(table.hashes[page] == expected, "table entry of page \(page)")
        }
    }

    @Test("staged and copied batches of one job: every payload page is the file's page, in entry order, with its hash")
    func stagedAndCopiedPayloads() throws {
        try Self.withRAM { ram, image in
            let (writer, counters, table) = try Self.send(ram)
            let bytes = writer.bytes
            var at = 0
            for (number, sent) in Self.batches.enumerated() {
                let p = try writer.decodePrefix(at: &at, limits: Self.limits, packetNumber: UInt64(number))
                #expect(p.header.flags == [])
                #expect(Int(p.header.payloadSize) == Int(p.header.normalCount) * Self.pageSize)
                Self.expectPacket(p, sent: sent, payload: bytes[at..<at + Int(p.header.payloadSize)], image: image, number: number)
                at += Int(p.header.payloadSize)
            }
            #expect(at == bytes.count, "nothing after the job's packets")
            #expect(counters.read(counters.multifdBytes) == UInt64(bytes.count))
            // Only batch 2 went through the mapping.
            #expect(counters.read(counters.pagesReadInPlace) == UInt64(Self.batches[2].count))
            #expect(counters.read(counters.packets) == 3)
            Self.expectTable(table, image: image)
        }
    }

    @Test("a corrupted prefix fails its check")
    func prefixCheckSeesCorruption() throws {
        try Self.withRAM { ram, _ in
            let (writer, _, _) = try Self.send(ram)
            var at = 0
            let p = try writer.decodePrefix(at: &at, limits: Self.limits, packetNumber: 0)
            #expect(p.checkVerifies)
            // One bit of an entry's hash, or of the reserved word, changes the check.
            for byte in [MultiFDPacketHeader.size + 8, MultiFDPacketHeader.size + 16 * 100 + 3, 37] {
                var prefix = writer.bytes[0..<p.header.prefixSize]
                prefix[byte] ^= 0x01
                #expect(CapturingWriter.prefixCheck(prefix) != p.header.check, "byte \(byte)")
            }
        }
    }

    @Test("a SYNC packet is a 48-byte prefix with its check and the next packet number")
    func syncPacket() throws {
        try Self.withRAM { ram, _ in
            let writer = CapturingWriter()
            let sender = try PacketSender(
                channelID: 0, ram: ram, writer: writer, counters: TransferCounters(), table: PageTable(pages: Self.pages))
            try sender.sendSync()
            try sender.sendSync()
            #expect(writer.bytes.count == 2 * MultiFDPacketHeader.size)
            var at = 0
            for n: UInt64 in [0, 1] {
                let p = try writer.decodePrefix(at: &at, limits: Self.limits, packetNumber: n)
                #expect(p.header.flags == .sync)
                #expect(p.checkVerifies)
            }
        }
    }

    @Test(
        "authenticated: each packet ends with a GMAC over [prefix | payload] that fails after one payload bit flips",
        arguments: [CompressionMethod.none, .zstd])
    func authenticatedPackets(method: CompressionMethod) throws {
        try Self.withRAM { ram, image in
            let sealer = PacketSealer(key: Self.keys.toDestination, encrypts: false)
            let (writer, counters, table) = try Self.send(ram, sealer: sealer, compression: CompressionSetting(method: method))
            var limits = Self.limits
            limits.compression = method
            limits.tagSize = PacketSealer.tagSize
            let verifier = PacketSealer(key: Self.keys.toDestination, encrypts: false)
            let d = method == .zstd ? try PacketDecompressor(method: .zstd, pageSize: Self.pageSize) : nil
            var bytes = writer.bytes
            var at = 0
            for (number, sent) in Self.batches.enumerated() {
                let p = try writer.decodePrefix(at: &at, limits: limits, packetNumber: UInt64(number))
                let payload = Int(p.header.payloadSize)
                let covered = p.start..<at + payload
                let tag = at + payload..<at + payload + PacketSealer.tagSize
                // Reads `bytes` as it is now (the log shows a Bool, not the packet).
                func verifies(number n: UInt64 = UInt64(number)) -> Bool {
                    bytes.withUnsafeBytes { raw in
                        verifier.verify(
                            UnsafeRawBufferPointer(rebasing: raw[covered]), packetNumber: n, tag: UnsafeRawBufferPointer(rebasing: raw[tag])
                        )
                    }
                }
                #expect(verifies(), "packet \(number): the tag does not verify")
                #expect(!verifies(number: UInt64(number) + 1), "packet \(number): the tag verifies under another number")
                // One payload bit, or one prefix bit, and the tag fails.
                for flip in [at + payload / 2, p.start + 20] {
                    bytes[flip] ^= 0x01
                    #expect(!verifies(), "packet \(number): the tag still verifies after byte \(flip - p.start) flipped")
                    bytes[flip] ^= 0x01
                }
                if let d {
                    #expect(p.header.flags == .compressed)
                    let payloadAt = at
                    try bytes.withUnsafeBytes { try d.decode(p.header, limits: limits, from: $0.baseAddress! + payloadAt) }
                    let pages = Array(UnsafeRawBufferPointer(start: d.pages, count: Int(p.header.normalCount) * Self.pageSize))
                    Self.expectPacket(p, sent: sent, payload: pages[...], image: image, number: number)
                } else {
                    Self.expectPacket(p, sent: sent, payload: bytes[at..<at + payload], image: image, number: number)
                }
                at += payload + PacketSealer.tagSize
            }
            #expect(at == bytes.count, "nothing after the job's packets")
            #expect(counters.read(counters.multifdBytes) == UInt64(bytes.count))
            Self.expectTable(table, image: image)
        }
    }

    @Test("encrypted: the payload on the wire is not the pages, and opens back to them")
    func encryptedPackets() throws {
        try Self.withRAM { ram, image in
            let sealer = PacketSealer(key: Self.keys.toDestination, encrypts: true)
            let (writer, _, table) = try Self.send(ram, sealer: sealer)
            var limits = Self.limits
            limits.tagSize = PacketSealer.tagSize
            let opener = PacketSealer(key: Self.keys.toDestination, encrypts: true)
            let bytes = writer.bytes
            var at = 0
            for (number, sent) in Self.batches.enumerated() {
                let p = try writer.decodePrefix(at: &at, limits: limits, packetNumber: UInt64(number))
                let payload = Int(p.header.payloadSize)
                #expect(payload == Int(p.header.normalCount) * Self.pageSize)
                let ciphertext = bytes[at..<at + payload]
                // Not one page of the payload is in the clear.
                for i in 0..<Int(p.header.normalCount) {
                    let page = Int(p.offsets[i]) / Self.pageSize
                    let start = at + i * Self.pageSize
                    let clear = bytes[start..<start + Self.pageSize].elementsEqual(image[page * Self.pageSize..<(page + 1) * Self.pageSize])
                    #expect(!clear, "packet \(number), page \(page) travels in the clear")
                }
                func open(_ c: ArraySlice<UInt8>, prefix: ArraySlice<UInt8>, number n: Int = number) -> Data? {
                    let tag = Array(bytes[at + payload..<at + payload + PacketSealer.tagSize])
                    // As the receiver holds it: room for the nonce, ciphertext, tag.
                    var wire = [UInt8](repeating: 0, count: PacketSealer.nonceRoom) + Array(c) + tag
                    return wire.withUnsafeMutableBytes { w in
                        Array(prefix).withUnsafeBytes { pr in
                            opener.open(
                                ciphertext: w.baseAddress! + PacketSealer.nonceRoom, count: c.count, prefix: pr, packetNumber: UInt64(n))
                        }
                    }
                }
                let prefix = bytes[p.start..<at]
                let plain = try #require(open(ciphertext, prefix: prefix), "packet \(number) does not open")
                Self.expectPacket(p, sent: sent, payload: Array(plain)[...], image: image, number: number)
                // The prefix is authenticated too, and so is the number.
                var badPrefix = prefix
                badPrefix[badPrefix.startIndex + 60] ^= 1
                #expect(open(ciphertext, prefix: badPrefix) == nil)
                #expect(open(ciphertext, prefix: prefix, number: number + 1) == nil)
                if payload > 0 {
                    var bad = ciphertext
                    bad[bad.startIndex + payload / 3] ^= 0x80
                    #expect(open(bad, prefix: prefix) == nil)
                }
                at += payload + PacketSealer.tagSize
            }
            #expect(at == bytes.count, "nothing after the job's packets")
            Self.expectTable(table, image: image)
        }
    }

    @Test("a sealed SYNC packet carries a tag over its prefix")
    func sealedSync() throws {
        try Self.withRAM { ram, _ in
            for encrypts in [false, true] {
                let writer = CapturingWriter()
                let sender = try PacketSender(
                    channelID: 0, ram: ram, writer: writer, counters: TransferCounters(), table: PageTable(pages: Self.pages),
                    sealer: PacketSealer(key: Self.keys.toDestination, encrypts: encrypts))
                try sender.sendSync()
                #expect(writer.bytes.count == MultiFDPacketHeader.size + PacketSealer.tagSize)
                var at = 0
                let p = try writer.decodePrefix(at: &at, limits: Self.limits, packetNumber: 0)
                #expect(p.header.flags == .sync && p.checkVerifies)
                let prefix = Array(writer.bytes[0..<at]), tag = Array(writer.bytes[at...])
                let s = PacketSealer(key: Self.keys.toDestination, encrypts: encrypts)
                // An empty ciphertext: the nonce's room, then the tag.
                var wire = [UInt8](repeating: 0, count: PacketSealer.nonceRoom) + tag
                let ok =
                    encrypts
                    ? wire.withUnsafeMutableBytes { w in
                        prefix.withUnsafeBytes { pr in
                            s.open(ciphertext: w.baseAddress! + PacketSealer.nonceRoom, count: 0, prefix: pr, packetNumber: 0)
                        }
                    } != nil
                    : prefix.withUnsafeBytes { pr in tag.withUnsafeBytes { s.verify(pr, packetNumber: 0, tag: $0) } }
                #expect(ok, "encrypts: \(encrypts)")
            }
        }
    }
}

@Suite("PageTable")
struct PageTableTests {
    static func table(_ hashes: [UInt64]) -> PageTable {
        let t = PageTable(pages: hashes.count)
        for (i, h) in hashes.enumerated() { t.record(page: i, hash: h) }
        return t
    }

    @Test func digestIsXXH3Of128TheLittleEndianEntriesInPageOrder() {
        let hashes: [UInt64] = [0x0102_0304_0506_0708, 0, .max, 42]
        let bytes = hashes.flatMap { h in (0..<8).map { UInt8(truncatingIfNeeded: h >> (8 * $0)) } }
        #expect(Self.table(hashes).digest() == bytes.withUnsafeBytes { ContentHash.digest($0) })
        #expect(Self.table(hashes).digest().count == CompletionSummary.digestSize)
        // A fresh table is all zeros.
        #expect(PageTable(pages: 4).digest() == Self.table([0, 0, 0, 0]).digest())
    }

    @Test func digestSeesOrderAndEveryBitOfContent() {
        var g = SplitMix64(seed: 0x7AB1_E001)
        let hashes = (0..<1000).map { _ in g.next() }
        let digest = Self.table(hashes).digest()
        #expect(Self.table(hashes).digest() == digest, "the same table, the same digest")
        // Two pages swapped (a page placed at the other's offset).
        var swapped = hashes
        swapped.swapAt(10, 11)
        #expect(Self.table(swapped).digest() != digest)
        var swappedFar = hashes
        swappedFar.swapAt(0, 999)
        #expect(Self.table(swappedFar).digest() != digest)
        // One bit of one entry (an older round's copy of a page).
        for (page, bit) in [(0, 0), (500, 63), (999, 17)] {
            var changed = hashes
            changed[page] ^= 1 << UInt64(bit)
            #expect(Self.table(changed).digest() != digest, "page \(page), bit \(bit)")
        }
        // A lost page (entry left at 0).
        var lost = hashes
        lost[321] = 0
        #expect(Self.table(lost).digest() != digest)
        // The same entries in a table one page longer.
        #expect(Self.table(hashes + [0]).digest() != digest)
    }

    @Test func recordOverwritesThePage() {
        let t = PageTable(pages: 3)
        t.record(page: 1, hash: 5)
        t.record(page: 1, hash: 6)
        #expect(t.digest() == Self.table([0, 6, 0]).digest())
        #expect(t.digest() != Self.table([0, 5, 0]).digest())
    }
}
