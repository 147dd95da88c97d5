import Foundation
import GuestMemory
import MigrationWire
import SystemPackage
import TestSupport
import Testing
import Trust
import URing

@testable import Migration

#if canImport(Glibc)
    import Glibc
#endif

/// The zstd codec of the multifd channels: what the sender's compressor
/// writes, the receiver's decompressor accepts and decodes to the same
/// pages, and every way a payload can be wrong is refused by name.
@Suite("page compression")
struct PageCompressionTests {
    static let pageSize = 4096
    static let limits = PacketLimits(
        channelID: 0, pageSize: UInt64(pageSize), blocks: [RAMBlockLayout(name: "pc.ram", size: 1 << 20, pageSize: 4096)],
        compression: .zstd)

    /// `count` pages: text-like, random and repeated ones, deterministic.
    static func samplePages(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SplitMix64(seed: seed)
        let words = Array("guest kernel page cache dirty migrate channel socket buffer ".utf8)
        var out = [UInt8]()
        out.reserveCapacity(count * pageSize)
        for p in 0..<count {
            switch p % 3 {
            case 0: out += (0..<pageSize).map { i in words[(i + Int(rng.next() % 7)) % words.count] }
            case 1: out += (0..<pageSize).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            default: out += [UInt8](repeating: UInt8(p), count: pageSize)
            }
        }
        return out
    }

    /// Compresses `pages` (whole pages) with a fresh compressor; returns the frame.
    static func frame(of pages: [UInt8], level: Int32 = 1) throws -> [UInt8] {
        let c = try PacketCompressor(level: level, pageSize: pageSize, jobCapacity: 1)
        let n = pages.count / pageSize
        pages.withUnsafeBytes { raw in
            for i in 0..<n { c.stage(raw.baseAddress! + i * pageSize, index: i) }
        }
        return Array(try c.compress(count: n, slot: 0))
    }

    static func header(normal: Int, payload: Int) -> MultiFDPacketHeader {
        MultiFDPacketHeader(
            flags: .compressed, normalCount: UInt32(normal), zeroCount: 0, payloadSize: UInt32(payload), packetNumber: 4, blockID: 0)
    }

    /// Runs the receiver's checks on `payload` for a packet of `normal` pages.
    static func decode(_ payload: [UInt8], normal: Int, into d: PacketDecompressor? = nil) throws -> PacketDecompressor {
        let d = try d ?? PacketDecompressor(method: .zstd, pageSize: pageSize)
        precondition(payload.count <= d.frameCapacity)
        payload.withUnsafeBytes { d.frame.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try d.decode(header(normal: normal, payload: payload.count), limits: limits)
        return d
    }

    @Test func wireBoundIsLibzstdsBound() {
        var g = SplitMix64(seed: 3)
        let sizes =
            [0, 1, 4095, 4096, (128 << 10) - 1, 128 << 10, (128 << 10) + 1, 512 << 10] + (0..<64).map { _ in Int(g.next() % (1 << 20)) }
        for n in sizes {
            #expect(UInt64(Zstd.compressBound(n)) == CompressionMethod.zstd.payloadBound(UInt64(n)), "size \(n)")
        }
    }

    @Test func levelsComeFromLibzstd() {
        #expect(Zstd.levels.contains(1) && Zstd.levels.contains(3) && Zstd.levels.contains(19))
        #expect(Zstd.levels.lowerBound < 0)
        #expect(throws: MigrationError.self) { _ = try PacketCompressor(level: Zstd.levels.upperBound + 1, pageSize: 4096, jobCapacity: 1) }
    }

    @Test(arguments: [1, 64, 128], [Int32(1), 3, -5])
    func roundTrips(pages: Int, level: Int32) throws {
        let data = Self.samplePages(pages, seed: UInt64(pages) &* 31 &+ UInt64(bitPattern: Int64(level)))
        let f = try Self.frame(of: data, level: level)
        #expect(UInt64(f.count) <= CompressionMethod.zstd.payloadBound(UInt64(data.count)))
        let d = try Self.decode(f, normal: pages)
        for i in 0..<pages {
            let page = UnsafeRawBufferPointer(start: d.page(i), count: Self.pageSize)
            #expect(Array(page) == Array(data[i * Self.pageSize..<(i + 1) * Self.pageSize]), "page \(i)")
        }
    }

    @Test func contextsAreReusedNotRegrown() throws {
        let c = try PacketCompressor(level: 1, pageSize: Self.pageSize, jobCapacity: 4)
        let data = Self.samplePages(128, seed: 9)
        var sizes: [Int] = []
        for round in 0..<40 {
            data.withUnsafeBytes { raw in
                for i in 0..<128 { c.stage(raw.baseAddress! + ((i + round) % 128) * Self.pageSize, index: i) }
            }
            _ = try c.compress(count: 128 - round % 7, slot: round % 4)
            sizes.append(c.contextBytes)
        }
        // The first packet sizes the workspace; no later one grows it.
        #expect(Set(sizes.dropFirst()).count == 1, "\(sizes)")
    }

    @Test func corruptFrameIsRefusedNamingThePayload() throws {
        var f = try Self.frame(of: Self.samplePages(8, seed: 1))
        for i in stride(from: 20, to: f.count - 4, by: 7) { f[i] ^= 0x5A }
        let e = #expect(throws: WireError.self) { _ = try Self.decode(f, normal: 8) }
        #expect(e?.field == "payload", "\(String(describing: e))")
        #expect(e?.description.contains("multifd packet 4 on channel 0") == true)
    }

    @Test func notAFrameIsRefused() {
        let e = #expect(throws: WireError.self) { _ = try Self.decode(Array("definitely not zstd".utf8), normal: 1) }
        #expect(e?.field == "payload")
        #expect(e?.reason.contains("not a zstd frame") == true, "\(String(describing: e))")
    }

    @Test func legacyFormatFramesAreRefusedBeforeLibzstdSeesThem() throws {
        // A valid frame with its magic turned into v0.7's (0xFD2FB527, the
        // legacy decoders libzstd 1.5 still carries) and v0.5's.
        let f = try Self.frame(of: Self.samplePages(2, seed: 9))
        for legacy: UInt8 in [0x27, 0x25] {
            var old = f
            old[0] = legacy
            let e = #expect(throws: WireError.self) { _ = try Self.decode(old, normal: 2) }
            #expect(e?.reason.contains("magic number") == true, "\(String(describing: e))")
        }
        // A frame shorter than the magic itself.
        let e = #expect(throws: WireError.self) { _ = try Self.decode([0x28, 0xB5], normal: 1) }
        #expect(e?.field == "payload")
    }

    @Test func truncatedFrameIsRefused() throws {
        let f = try Self.frame(of: Self.samplePages(4, seed: 2))
        let e = #expect(throws: WireError.self) { _ = try Self.decode(Array(f.dropLast(5)), normal: 4) }
        #expect(e?.field == "payload", "\(String(describing: e))")
    }

    @Test func bytesAfterTheFrameAreRefused() throws {
        let f = try Self.frame(of: Self.samplePages(2, seed: 3))
        // A second frame behind the first: one packet, one frame.
        let e = #expect(throws: WireError.self) { _ = try Self.decode(f + f, normal: 4) }
        #expect(e?.field == "payload-size", "\(String(describing: e))")
        #expect(e?.value == "\(2 * f.count)")
        #expect(e?.reason.contains("ends after \(f.count) bytes") == true)
    }

    @Test func sizeMismatchIsRefusedNamingTheDecompressedSize() throws {
        let f = try Self.frame(of: Self.samplePages(3, seed: 4))
        for normal in [2, 4] {
            let e = #expect(throws: WireError.self) { _ = try Self.decode(f, normal: normal) }
            #expect(e?.field == "decompressed-size", "\(String(describing: e))")
            #expect(e?.value == "\(3 * Self.pageSize)")
            #expect(e?.reason.contains("\(normal * Self.pageSize)") == true)
        }
    }

    @Test func framesCarryAContentChecksum() throws {
        for pages in [1, 64, 128] {
            let f = try Self.frame(of: Self.samplePages(pages, seed: UInt64(pages)))
            // RFC 8878: bit 2 of the frame header descriptor, after the magic.
            #expect(f[4] & 0x04 != 0, "\(pages) pages: no checksum flag")
        }
    }

    @Test func frameWithoutAContentChecksumIsRefused() throws {
        // The same frame with its checksum flag cleared and its 4-byte
        // checksum cut: a valid zstd frame that libzstd would decode.
        let data = Self.samplePages(4, seed: 12)
        var f = try Self.frame(of: data)
        f[4] &= ~0x04
        f.removeLast(4)
        let e = #expect(throws: WireError.self) { _ = try Self.decode(f, normal: 4) }
        #expect(e?.field == "payload", "\(String(describing: e))")
        #expect(e?.reason.contains("no content checksum") == true, "\(String(describing: e))")
    }

    @Test func theChecksumCatchesAChangedLiteral() throws {
        // Random pages do not compress: zstd stores them as raw blocks, and
        // a flipped byte in one still decodes, to the wrong bytes. Only the
        // content checksum sees it.
        var rng = SplitMix64(seed: 13)
        let data = (0..<2 * Self.pageSize).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        var f = try Self.frame(of: data)
        _ = try Self.decode(f, normal: 2)
        f[f.count / 2] ^= 0x01
        let e = #expect(throws: WireError.self) { _ = try Self.decode(f, normal: 2) }
        #expect(e?.field == "payload", "\(String(describing: e))")
        #expect(e?.reason.contains("checksum") == true, "\(String(describing: e))")
    }

    @Test func decodeReadsTheFrameFromTheGivenSource() throws {
        let d = try PacketDecompressor(method: .zstd, pageSize: Self.pageSize)
        let data = Self.samplePages(3, seed: 14)
        let f = try Self.frame(of: data)
        // The channel's own frame buffer holds garbage; the source pointer is what counts.
        d.frame.initializeMemory(as: UInt8.self, repeating: 0xEE, count: d.frameCapacity)
        try f.withUnsafeBytes { try d.decode(Self.header(normal: 3, payload: f.count), limits: Self.limits, from: $0.baseAddress!) }
        #expect(Array(UnsafeRawBufferPointer(start: d.pages, count: 3 * Self.pageSize)) == data)
        // Without one, the frame buffer is read (and refused).
        let e = #expect(throws: WireError.self) { try d.decode(Self.header(normal: 3, payload: f.count), limits: Self.limits) }
        #expect(e?.reason.contains("not a zstd frame") == true, "\(String(describing: e))")
    }

    @Test func aDecompressorSurvivesABadPacket() throws {
        let d = try PacketDecompressor(method: .zstd, pageSize: Self.pageSize)
        _ = try? Self.decode(Array("garbage garbage".utf8), normal: 1, into: d)
        let data = Self.samplePages(5, seed: 5)
        _ = try Self.decode(try Self.frame(of: data), normal: 5, into: d)
        #expect(Array(UnsafeRawBufferPointer(start: d.page(4), count: Self.pageSize)) == Array(data[4 * 4096..<5 * 4096]))
    }

    /// The real sender with a capturing writer: zero pages go as offsets
    /// only, every packet with normal pages is COMPRESSED and its frame
    /// decodes to exactly those pages, in offset order.
    @Test func senderPacketsDecodeToTheRAM() throws {
        let dir = NSTemporaryDirectory() + "livemig-zstd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let pages = 256
        let path = FilePath(dir + "/ram")
        let content = Self.samplePages(pages, seed: 11)
        let isZero = { (p: Int) in p % 4 == 1 || (40..<60).contains(p) }
        var image = content
        for p in 0..<pages where isZero(p) {
            image.replaceSubrange(p * 4096..<(p + 1) * 4096, with: repeatElement(0, count: 4096))
        }
        try Data(image).write(to: URL(fileURLWithPath: dir + "/ram"))
        let ram = try RAMFile(path: path, access: .readOnly, pageSize: 4096)
        let writer = CapturingWriter()
        let counters = TransferCounters()
        let table = PageTable(pages: pages)
        let sender = try PacketSender(
            channelID: 0, ram: ram, writer: writer, counters: counters, table: table, jobCapacity: 2,
            compression: CompressionSetting(method: .zstd, level: 1))
        let job = MultiFDJob(capacity: 2)
        for b in 0..<2 {
            var batch = MultiFDPages()
            for p in (b * 128)..<((b + 1) * 128) { batch.append(offset: UInt64(p * 4096), block: 0) }
            job.take(&batch)
        }
        var released = 0
        try sender.sendJob(job) { released += 1 }
        #expect(released == 1)

        let limits = PacketLimits(
            channelID: 0, pageSize: 4096, blocks: [RAMBlockLayout(name: "pc.ram", size: UInt64(pages * 4096), pageSize: 4096)],
            compression: .zstd)
        let d = try PacketDecompressor(method: .zstd, pageSize: 4096)
        var at = 0, seenNormal = 0, seenZero = 0, payloadBytes = 0
        let bytes = writer.bytes
        for number in 0..<2 {
            let prefix = try writer.decodePrefix(at: &at, limits: limits, packetNumber: UInt64(number))
            let h = prefix.header, offsets = prefix.offsets
            #expect(h.flags == .compressed)
            #expect(prefix.checkVerifies, "packet \(number): the prefix check does not verify")
            bytes.withUnsafeBytes { raw in d.frame.copyMemory(from: raw.baseAddress! + at, byteCount: Int(h.payloadSize)) }
            at += Int(h.payloadSize)
            payloadBytes += Int(h.payloadSize)
            try d.decode(h, limits: limits)
            for (i, off) in offsets.enumerated() {
                let p = Int(off) / 4096
                if i < Int(h.normalCount) {
                    #expect(!isZero(p), "page \(p) sent with data")
                    let got = Array(UnsafeRawBufferPointer(start: d.page(i), count: 4096))
                    #expect(got == Array(image[p * 4096..<(p + 1) * 4096]), "page \(p)")
                    // The entry hashes the page, not the frame.
                    #expect(prefix.hashes[i] == contentHash(got[...]), "page \(p): entry hash")
                    #expect(table.hashes[p] == prefix.hashes[i], "page \(p): table entry")
                    seenNormal += 1
                } else {
                    #expect(isZero(p), "page \(p) sent as zero")
                    #expect(prefix.hashes[i] == ContentHash.zeroPage(4096), "zero page \(p): entry hash")
                    #expect(table.hashes[p] == prefix.hashes[i], "zero page \(p): table entry")
                    seenZero += 1
                }
            }
        }
        #expect(at == bytes.count, "nothing after the job's packets")
        let zeros = (0..<pages).filter(isZero).count
        #expect(seenZero == zeros && seenNormal == pages - zeros)
        #expect(counters.read(counters.compressedPages) == UInt64(pages - zeros))
        #expect(counters.read(counters.compressedBytes) == UInt64(payloadBytes))
        #expect(counters.read(counters.multifdBytes) == UInt64(bytes.count))
        #expect(payloadBytes < (pages - zeros) * 4096, "text and repeated pages shrink")
    }
}
