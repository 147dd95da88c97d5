import MigrationWire
import TestSupport
import Testing

@Suite("MultiFDPacketHeader")
struct MultiFDPacketTests {
    static let pageSize: UInt64 = 4096
    /// 1 MiB "pc.ram" (0x100000) and a 64 KiB "vga.vram" (0x10000).
    static let blocks = [
        RAMBlockLayout(name: "pc.ram", size: 0x10_0000, pageSize: pageSize),
        RAMBlockLayout(name: "vga.vram", size: 0x1_0000, pageSize: pageSize),
    ]
    static let limits = PacketLimits(channelID: 3, pageSize: pageSize, blocks: blocks)

    typealias Header = MultiFDPacketHeader

    /// A valid page packet: `normal` pages with data, `zero` zero pages.
    static func pages(
        normal: UInt32 = 2, zero: UInt32 = 1, number: UInt64 = 5, block: UInt32 = 0
    ) -> Header {
        Header(
            flags: [], normalCount: normal, zeroCount: zero, payloadSize: normal * UInt32(pageSize),
            packetNumber: number, blockID: block)
    }

    static func sync(number: UInt64 = 5) -> Header {
        Header(flags: .sync, normalCount: 0, zeroCount: 0, payloadSize: 0, packetNumber: number, blockID: 0)
    }

    /// The 48 header bytes: `encode(to:)` then `storeCheck(h.check)`, written
    /// over a buffer of 0xAA so that every byte the two fail to write shows.
    static func bytes(_ h: Header) -> [UInt8] {
        var b = [UInt8](repeating: 0xAA, count: Header.size)
        b.withUnsafeMutableBytes {
            h.encode(to: $0.baseAddress!)
            Header.storeCheck(h.check, to: $0.baseAddress!)
        }
        return b
    }

    static func decode(
        _ b: [UInt8], limits: PacketLimits = limits, expected: UInt64 = 5
    ) throws(WireError) -> Header {
        precondition(b.count >= Header.size)
        return try withBytes(b) { raw throws(WireError) in
            try Header.decode(raw.baseAddress!, limits: limits, expectedPacketNumber: expected)
        }
    }

    /// A made-up content hash for the page at `offset` (the wire format does
    /// not check hashes; the receiver compares them with the pages).
    static func hash(_ offset: UInt64) -> UInt64 { ~offset &* 0x9E37_79B9_7F4A_7C15 }

    /// Header and entries (offset, `hash(offset)` unless given) and room for
    /// nothing else, as the sender lays them out; the check field is left as
    /// `h.check`.
    static func prefix(_ h: Header, offsets: [UInt64], hashes: [UInt64]? = nil) -> [UInt8] {
        let hashes = hashes ?? offsets.map(hash)
        var b = [UInt8](repeating: 0xAA, count: Header.size + offsets.count * Header.entrySize)
        b.withUnsafeMutableBytes { raw in
            h.encode(to: raw.baseAddress!)
            Header.storeCheck(h.check, to: raw.baseAddress!)
            for (i, o) in offsets.enumerated() { Header.encodeEntry(offset: o, hash: hashes[i], index: i, to: raw.baseAddress!) }
        }
        return b
    }

    static func decodeEntries(
        _ h: Header, _ b: [UInt8], limits: PacketLimits = limits
    ) throws(WireError) -> (offsets: [UInt64], hashes: [UInt64]) {
        let count = Int(h.normalCount + h.zeroCount)
        var offsets = [UInt64](repeating: .max, count: count)
        var hashes = [UInt64](repeating: .max, count: count)
        try withBytes(b) { raw throws(WireError) in
            let result = offsets.withUnsafeMutableBufferPointer { o in
                hashes.withUnsafeMutableBufferPointer { hs in
                    Result { () throws(WireError) in
                        try h.decodeEntries(
                            raw.baseAddress! + Header.size, offsets: o.baseAddress!, hashes: hs.baseAddress!, limits: limits)
                    }
                }
            }
            try result.get()
        }
        return (offsets, hashes)
    }

    /// The offsets `decodeEntries` returns (the hashes must come back too).
    static func decodeOffsets(_ h: Header, _ b: [UInt8], limits: PacketLimits = limits) throws(WireError) -> [UInt64] {
        let (offsets, hashes) = try decodeEntries(h, b, limits: limits)
        let sent = (0..<offsets.count).map { i in
            b.withUnsafeBytes {
                UInt64(bigEndian: $0.loadUnaligned(fromByteOffset: Header.size + i * Header.entrySize + 8, as: UInt64.self))
            }
        }
        #expect(hashes == sent, "hashes come back as sent")
        return offsets
    }

    // MARK: - layout and round trips

    @Test func encodesTheDocumentedLayout() {
        let h = Header(
            flags: .sync, normalCount: 0x0102_0304, zeroCount: 0x0506_0708, payloadSize: 0x090A_0B0C,
            packetNumber: 0x1112_1314_1516_1718, blockID: 0x2122_2324, check: 0x3132_3334_3536_3738)
        let expected: [UInt8] =
            [0x4C, 0x4D, 0x50, 0x46]  // "LMPF"
            + [0, 0, 0, 2]  // version
            + [0, 0, 0, 1]  // flags
            + [1, 2, 3, 4] + [5, 6, 7, 8] + [9, 10, 11, 12]
            + [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
            + [0x21, 0x22, 0x23, 0x24]
            + [0, 0, 0, 0]  // reserved
            + [0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, 0x38]  // prefix check
        #expect(Self.bytes(h) == expected)
        #expect(Header.size == 48)
        #expect(Header.checkedSize == 40)
        #expect(Header.entrySize == 16)
        #expect(Header.maxPrefixSize == 48 + 128 * 16)
        #expect(h.entriesSize == Int(0x0102_0304 + 0x0506_0708) * 16)
        #expect(h.prefixSize == 48 + h.entriesSize)
        #expect(Self.pages(normal: 2, zero: 1).prefixSize == 48 + 3 * 16)
        #expect(Self.sync().prefixSize == 48)
    }

    @Test func encodeWritesTheFirst40BytesOnly() {
        // The check is the sender's to store once the entries are in place.
        var b = [UInt8](repeating: 0xAA, count: Header.size)
        b.withUnsafeMutableBytes { Self.pages().encode(to: $0.baseAddress!) }
        #expect(Array(b[40..<48]) == [UInt8](repeating: 0xAA, count: 8))
        #expect(b[36..<40].allSatisfy { $0 == 0 })
    }

    @Test func storeCheckWritesBytes40To48Only() {
        var b = [UInt8](repeating: 0xAA, count: Header.size + 16)
        b.withUnsafeMutableBytes { Header.storeCheck(0x0102_0304_0506_0708, to: $0.baseAddress!) }
        #expect(Array(b[40..<48]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(b[0..<40].allSatisfy { $0 == 0xAA } && b[48...].allSatisfy { $0 == 0xAA })
        // Zero, as the check is taken.
        b.withUnsafeMutableBytes { Header.storeCheck(0, to: $0.baseAddress!) }
        #expect(b[40..<48].allSatisfy { $0 == 0 })
    }

    @Test func decodeReturnsTheCheckAsReceived() throws {
        for check: UInt64 in [0, 1, 0x8000_0000_0000_0001, .max] {
            var h = Self.pages()
            h.check = check
            #expect(try Self.decode(Self.bytes(h)).check == check)
        }
    }

    @Test func encodeEntryWritesBigEndianOffsetAndHashAfterTheHeader() {
        let b = Self.prefix(
            Self.pages(normal: 1, zero: 1), offsets: [0x0102_0304_0506_0708, 0x1000],
            hashes: [0x1112_1314_1516_1718, 0x2122_2324_2526_2728])
        #expect(b.count == 48 + 2 * 16)
        #expect(Array(b[48..<56]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(Array(b[56..<64]) == [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18])
        #expect(Array(b[64..<72]) == [0, 0, 0, 0, 0, 0, 0x10, 0])
        #expect(Array(b[72..<80]) == [0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28])
    }

    @Test(arguments: [
        pages(normal: 1, zero: 0, number: 5, block: 0),
        pages(normal: 0, zero: 1, number: 5, block: 1),
        pages(normal: 128, zero: 0, number: 5, block: 0),
        pages(normal: 0, zero: 128, number: 5, block: 0),
        pages(normal: 100, zero: 28, number: 5, block: 1),
        sync(number: 5),
    ])
    func headerRoundTrips(_ h: Header) throws {
        #expect(try Self.decode(Self.bytes(h), expected: 5) == h)
    }

    @Test func headerRoundTripsAtExtremePacketNumbers() throws {
        for n: UInt64 in [0, 1, UInt64(UInt32.max) + 1, .max] {
            let h = Self.pages(number: n)
            #expect(try Self.decode(Self.bytes(h), expected: n) == h)
        }
    }

    @Test func entriesRoundTrip() throws {
        let h = Self.pages(normal: 3, zero: 2, block: 0)
        let offsets: [UInt64] = [0, 0x1000, 0xF_F000, 0x8_0000, 0x4_2000]
        let hashes: [UInt64] = [0, .max, 0x0123_4567_89AB_CDEF, 1, 0x8000_0000_0000_0000]
        let b = Self.prefix(h, offsets: offsets, hashes: hashes)
        let decoded = try Self.decode(b)
        #expect(decoded == h)
        #expect(decoded.entriesSize == offsets.count * 16)
        let entries = try Self.decodeEntries(decoded, b)
        #expect(entries.offsets == offsets)
        #expect(entries.hashes == hashes)
    }

    @Test func offsetsAreCheckedAgainstTheirOwnBlock() throws {
        // 0x10000 is inside pc.ram but is the end of vga.vram.
        let inSecond = Self.pages(normal: 1, zero: 0, block: 1)
        // Offsets come back in the whole range: vga.vram starts after pc.ram.
        #expect(Self.limits.blockStarts == [0, 0x10_0000])
        #expect(try Self.decodeOffsets(inSecond, Self.prefix(inSecond, offsets: [0xF000])) == [0x10_F000])
        let error = expectWireError(field: "offset[0]", value: "0x10000") {
            _ = try Self.decodeOffsets(inSecond, Self.prefix(inSecond, offsets: [0x1_0000]))
        }
        #expect(error?.description.contains("'vga.vram'") == true)
        #expect(error?.description.contains("size 0x10000") == true)
    }

    // MARK: - header validation: one test per rule

    @Test func rejectsWrongMagic() {
        let b = Self.bytes(Self.pages()).settingU32(0xDEAD_BEEF, at: 0)
        let error = expectWireError(field: "magic", value: "0xdeadbeef") { _ = try Self.decode(b) }
        #expect(error?.message == "multifd packet 5 on channel 3")
    }

    @Test func rejectsWrongVersion() {
        let b = Self.bytes(Self.pages()).settingU32(4242, at: 4)
        expectWireError(field: "version", value: "4242") { _ = try Self.decode(b) }
    }

    @Test func rejectsUnknownFlagBits() {
        var h = Self.pages()
        h.flags = Header.Flags(rawValue: 0x8000_0000)
        let error = expectWireError(field: "flags", value: "0x80000000") { _ = try Self.decode(Self.bytes(h)) }
        #expect(error?.reason.contains("unknown bits 0x80000000") == true)

        // A known bit next to an unknown one: only the unknown one is named.
        let s = Self.sync()
        let b = Self.bytes(s).settingU32(0x0000_0005, at: 8)
        let mixed = expectWireError(field: "flags", value: "0x5") { _ = try Self.decode(b) }
        #expect(mixed?.reason.contains("unknown bits 0x4") == true)
    }

    @Test func rejectsNormalCountOver128() {
        let h = Self.pages(normal: 129, zero: 0)
        let error = expectWireError(field: "normal-count", value: "129") { _ = try Self.decode(Self.bytes(h)) }
        #expect(error?.reason.contains("128") == true)
        // A count that would overflow a sum is caught before any sum is made.
        let huge = Self.bytes(Self.pages()).settingU32(.max, at: 12)
        expectWireError(field: "normal-count", value: "\(UInt32.max)") { _ = try Self.decode(huge) }
    }

    @Test func rejectsZeroCountOver128() {
        let h = Self.pages(normal: 0, zero: 200)
        expectWireError(field: "zero-count", value: "200") { _ = try Self.decode(Self.bytes(h)) }
        let huge = Self.bytes(Self.pages()).settingU32(.max, at: 16)
        expectWireError(field: "zero-count", value: "\(UInt32.max)") { _ = try Self.decode(huge) }
    }

    @Test func rejectsNormalPlusZeroOver128() {
        let h = Self.pages(normal: 100, zero: 29)
        let error = expectWireError(field: "normal-count + zero-count", value: "129") {
            _ = try Self.decode(Self.bytes(h))
        }
        #expect(error?.reason.contains("128") == true)
        // 128 exactly is fine.
        #expect(throws: Never.self) { try Self.decode(Self.bytes(Self.pages(normal: 100, zero: 28))) }
    }

    @Test func rejectsPayloadSizeNotNormalTimesPageSize() {
        var h = Self.pages(normal: 2, zero: 1)
        h.payloadSize = 8193
        let error = expectWireError(field: "payload-size", value: "8193") { _ = try Self.decode(Self.bytes(h)) }
        #expect(error?.reason.contains("8192") == true)

        // Zero pages carry no data.
        var zeros = Self.pages(normal: 0, zero: 3)
        zeros.payloadSize = 4096
        expectWireError(field: "payload-size", value: "4096") { _ = try Self.decode(Self.bytes(zeros)) }
    }

    @Test func rejectsUnexpectedPacketNumber() {
        let h = Self.pages(number: 123_456)
        let error = expectWireError(field: "packet-number", value: "123456") {
            _ = try Self.decode(Self.bytes(h), expected: 5)
        }
        #expect(error?.reason.contains("expected 5") == true)
        // Off by one either way is just as wrong.
        expectWireError(field: "packet-number", value: "4") {
            _ = try Self.decode(Self.bytes(Self.pages(number: 4)), expected: 5)
        }
        expectWireError(field: "packet-number", value: "6") {
            _ = try Self.decode(Self.bytes(Self.sync(number: 6)), expected: 5)
        }
    }

    @Test func rejectsSyncPacketCarryingPages() {
        var h = Self.sync()
        h.normalCount = 2
        h.zeroCount = 3
        h.payloadSize = 2 * 4096
        let error = expectWireError(field: "normal-count + zero-count", value: "5") {
            _ = try Self.decode(Self.bytes(h))
        }
        #expect(error?.reason.contains("SYNC") == true)

        var zeroOnly = Self.sync()
        zeroOnly.zeroCount = 1
        expectWireError(field: "normal-count + zero-count", value: "1") { _ = try Self.decode(Self.bytes(zeroOnly)) }
    }

    @Test func rejectsPagePacketWithoutPages() {
        let h = Self.pages(normal: 0, zero: 0)
        let error = expectWireError(field: "normal-count + zero-count", value: "0") {
            _ = try Self.decode(Self.bytes(h))
        }
        #expect(error?.reason.contains("at least one page") == true)
    }

    @Test func rejectsBlockIDOutOfRange() {
        let error = expectWireError(field: "block-id", value: "77") {
            _ = try Self.decode(Self.bytes(Self.pages(block: 77)))
        }
        #expect(error?.reason.contains("2 block(s)") == true)
        // The first id past the end.
        expectWireError(field: "block-id", value: "2") { _ = try Self.decode(Self.bytes(Self.pages(block: 2))) }
        // A SYNC packet names no block, so its block-id is not checked.
        var s = Self.sync()
        s.blockID = 77
        #expect(throws: Never.self) { try Self.decode(Self.bytes(s)) }
    }

    @Test func rejectsNonZeroReservedBytes() throws {
        let h = Self.pages()
        #expect(try Self.decode(Self.bytes(h)) == h)
        for v: UInt32 in [1, 0x8000_0000, 0xFFFF_FFFF] {
            expectWireError(field: "reserved", value: "0x" + String(v, radix: 16)) {
                _ = try Self.decode(Self.bytes(h).settingU32(v, at: 36))
            }
        }
    }

    // MARK: - entry validation: one test per rule (hashes are the receiver's to check)

    @Test func rejectsOffsetNotPageAligned() {
        let h = Self.pages(normal: 2, zero: 1)
        let b = Self.prefix(h, offsets: [0x2000, 0x3008, 0x4000])
        let error = expectWireError(field: "offset[1]", value: "0x3008") { _ = try Self.decodeOffsets(h, b) }
        #expect(error?.reason.contains("page size 4096") == true)
        #expect(error?.message == "multifd packet 5 on channel 3")
    }

    @Test func rejectsOffsetAtOrBeyondBlockSize() {
        let h = Self.pages(normal: 1, zero: 2)
        let beyond = Self.prefix(h, offsets: [0, 0x1000, 0x10_5000])
        let error = expectWireError(field: "offset[2]", value: "0x105000") { _ = try Self.decodeOffsets(h, beyond) }
        #expect(error?.description.contains("'pc.ram'") == true)
        #expect(error?.description.contains("size 0x100000") == true)

        // The block size itself is one past the last page.
        let atEnd = Self.prefix(h, offsets: [0x10_0000, 0, 0])
        let end = expectWireError(field: "offset[0]", value: "0x100000") { _ = try Self.decodeOffsets(h, atEnd) }
        #expect(end?.description.contains("'pc.ram'") == true)

        // The last page is inside.
        let last = Self.prefix(h, offsets: [0xF_F000, 0, 0x1000])
        #expect(throws: Never.self) { try Self.decodeOffsets(h, last) }
    }

    @Test func hashesAreNotCheckedAsOffsets() throws {
        // Each entry is offset then hash: a hash that would be a bad offset
        // passes, an offset that is bad fails whatever its hash.
        let h = Self.pages(normal: 1, zero: 1)
        let odd = Self.prefix(h, offsets: [0x1000, 0x2000], hashes: [0x3008, .max])
        let entries = try Self.decodeEntries(h, odd)
        #expect(entries.offsets == [0x1000, 0x2000] && entries.hashes == [0x3008, .max])
        let bad = Self.prefix(h, offsets: [0x1000, 0x2008], hashes: [0x1000, 0x2000])
        expectWireError(field: "offset[1]", value: "0x2008") { _ = try Self.decodeEntries(h, bad) }
    }

    // MARK: - properties

    @Test func randomValidHeadersRoundTrip() throws {
        var g = SplitMix64(seed: 0x5EED_0001)
        for _ in 0..<2000 {
            let pageSize: UInt64 = [4096, 8192, 65536, 2 << 20].randomElement(using: &g)!
            let blockCount = Int.random(in: 1...4, using: &g)
            let blocks = (0..<blockCount).map {
                RAMBlockLayout(
                    name: "b\($0)", size: pageSize * UInt64.random(in: 1...4096, using: &g), pageSize: pageSize)
            }
            let limits = PacketLimits(channelID: Int.random(in: 0..<64, using: &g), pageSize: pageSize, blocks: blocks)
            let isSync = Int.random(in: 0..<8, using: &g) == 0
            let normal = isSync ? 0 : UInt32.random(in: 0...128, using: &g)
            let zero = isSync ? 0 : UInt32.random(in: (normal == 0 ? 1 : 0)...(128 - normal), using: &g)
            let h = Header(
                flags: isSync ? .sync : [], normalCount: normal, zeroCount: zero,
                payloadSize: UInt32(UInt64(normal) * pageSize), packetNumber: g.next(),
                blockID: isSync ? 0 : UInt32.random(in: 0..<UInt32(blockCount), using: &g), check: g.next())
            let blockSize = blocks[Int(h.blockID)].size
            let offsets = (0..<Int(h.normalCount + h.zeroCount)).map { _ in
                UInt64.random(in: 0..<blockSize / pageSize, using: &g) * pageSize
            }
            let hashes = offsets.map { _ in g.next() }
            let b = Self.prefix(h, offsets: offsets, hashes: hashes)
            let decoded = try Self.decode(b, limits: limits, expected: h.packetNumber)
            #expect(decoded == h)
            let entries = try Self.decodeEntries(decoded, b, limits: limits)
            // Offsets come back in the whole range: the block's start added.
            let start = blocks[..<Int(h.blockID)].reduce(0) { $0 + $1.size }
            #expect(entries.offsets == offsets.map { $0 + start } && entries.hashes == hashes)
        }
    }

    @Test func randomGarbageDecodesToAValidHeaderOrThrows() throws {
        var g = SplitMix64(seed: 0x5EED_0002)
        let limits = Self.limits
        var accepted = 0
        var fields = Set<String>()
        for _ in 0..<20_000 {
            var b = (0..<Header.size).map { _ in UInt8.random(in: 0...255, using: &g) }
            let expected = UInt64.random(in: 0...3, using: &g)
            // Push most buffers past the early checks so every later check is reached.
            func chance(_ n: Int) -> Bool { Int.random(in: 0..<n, using: &g) != 0 }
            if chance(8) { b = b.settingU32(Header.magic, at: 0) }
            if chance(8) { b = b.settingU32(Header.version, at: 4) }
            if chance(4) { b = b.settingU32(UInt32.random(in: 0...1, using: &g), at: 8) }
            if chance(4) { b = b.settingU32(UInt32.random(in: 0...130, using: &g), at: 12) }
            if chance(4) { b = b.settingU32(UInt32.random(in: 0...130, using: &g), at: 16) }
            if chance(3) {
                let normal = UInt32(bigEndian: b.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 12, as: UInt32.self) })
                b = b.settingU32(normal &* 4096 &+ (chance(10) ? 0 : 1), at: 20)
            }
            if chance(3) { b = b.settingU64(expected &+ (chance(10) ? 0 : 1), at: 24) }
            if chance(2) { b = b.settingU32(UInt32.random(in: 0...3, using: &g), at: 32) }
            if chance(8) { b = b.settingU32(0, at: 36) }

            let h: Header
            do {
                h = try Self.decode(b, limits: limits, expected: expected)
            } catch {
                fields.insert(error.field)
                #expect(error.message == "multifd packet \(expected) on channel 3")
                continue
            }
            accepted += 1
            // Everything the receiver relies on holds.
            #expect(Header.Flags.known.isSuperset(of: h.flags))
            #expect(h.normalCount <= 128 && h.zeroCount <= 128 && h.normalCount + h.zeroCount <= 128)
            #expect(UInt64(h.payloadSize) == UInt64(h.normalCount) * limits.pageSize)
            #expect(h.packetNumber == expected)
            #expect(h.entriesSize <= Header.maxPrefixSize - Header.size)
            #expect(h.prefixSize <= Header.maxPrefixSize)
            if h.flags.contains(.sync) {
                #expect(h.normalCount == 0 && h.zeroCount == 0)
            } else {
                #expect(h.normalCount + h.zeroCount > 0)
                #expect(Int(h.blockID) < limits.blockSizes.count)
                // Garbage offsets are either inside the block and aligned, or rejected.
                let offsets = (0..<Int(h.normalCount + h.zeroCount)).map { _ in
                    chance(2) ? g.next() : UInt64.random(in: 0...0x10_1000, using: &g)
                }
                let hashes = offsets.map { _ in g.next() }
                let withEntries = b + zip(offsets, hashes).flatMap { be($0) + be($1) }
                do {
                    let out = try Self.decodeEntries(h, withEntries, limits: limits)
                    let start = limits.blockStarts[Int(h.blockID)]
                    #expect(out.offsets == offsets.map { $0 + start } && out.hashes == hashes)
                    for o in out.offsets {
                        #expect(o % limits.pageSize == 0 && o - start < limits.blockSizes[Int(h.blockID)])
                    }
                } catch {
                    #expect(error.field.hasPrefix("offset["))
                }
            }
            // Re-encoding gives the same bytes (the reserved word is 0).
            #expect(Array(Self.bytes(h)[0..<48]) == Array(b[0..<48]))
        }
        // The generator reaches both outcomes and every check.
        #expect(accepted > 100)
        #expect(
            fields == [
                "magic", "version", "flags", "normal-count", "zero-count", "normal-count + zero-count",
                "payload-size", "packet-number", "block-id", "reserved",
            ])
    }
}
