import MigrationWire
import TestSupport
import Testing

/// The compression parts of the wire format: the method in the main hello,
/// the COMPRESSED packet flag and the checks the receiver makes on it
/// before it reads a payload (docs/PROTOCOL.md §2 and §4).
@Suite("compression on the wire")
struct CompressionWireTests {
    typealias Header = MultiFDPacketHeader
    static let pageSize: UInt64 = 4096
    static let blocks = [RAMBlockLayout(name: "pc.ram", size: 0x10_0000, pageSize: pageSize)]
    static let plain = PacketLimits(channelID: 1, pageSize: pageSize, blocks: blocks)
    static let zstd = PacketLimits(channelID: 1, pageSize: pageSize, blocks: blocks, compression: .zstd)

    static func header(
        flags: Header.Flags = .compressed, normal: UInt32 = 2, zero: UInt32 = 1, payload: UInt32 = 100
    ) -> Header {
        Header(flags: flags, normalCount: normal, zeroCount: zero, payloadSize: payload, packetNumber: 9, blockID: 0)
    }

    static func decode(_ h: Header, limits: PacketLimits) throws(WireError) -> Header {
        var b = [UInt8](repeating: 0, count: Header.size)
        b.withUnsafeMutableBytes { h.encode(to: $0.baseAddress!) }
        return try withBytes(b) { raw throws(WireError) in
            try Header.decode(raw.baseAddress!, limits: limits, expectedPacketNumber: 9)
        }
    }

    // MARK: - hello

    @Test func helloCarriesTheMethodInByte25() throws {
        let session = SessionID(high: 1, low: 2)
        let hello = ChannelHello(session: session, kind: .main, channelID: 0, channelCount: 2, compression: .zstd)
        let bytes = hello.encoded()
        #expect(bytes[25] == 1)
        #expect(try bytes.withUnsafeBytes { try ChannelHello.decode($0) } == hello)
        // The default stays what every source sent before: 0, none.
        #expect(ChannelHello(session: session, kind: .main, channelID: 0, channelCount: 2).encoded()[25] == 0)
    }

    @Test func helloWithAnUnknownMethodIsRefusedNamingIt() {
        var bytes = ChannelHello(session: SessionID(high: 1, low: 2), kind: .main, channelID: 0, channelCount: 2).encoded()
        bytes[25] = 7
        let error = expectWireError(field: "compression", value: "7") {
            _ = try bytes.withUnsafeBytes { try ChannelHello.decode($0) }
        }
        #expect(error?.reason.contains("0 (none), 1 (zstd)") == true, "\(String(describing: error))")
        // A wrong magic is still what a stranger hears about first.
        let stranger = bytes.settingU32(0xDEAD_BEEF, at: 0)
        expectWireError(field: "magic", value: "0xdeadbeef") { _ = try stranger.withUnsafeBytes { try ChannelHello.decode($0) } }
    }

    // MARK: - bound

    @Test func zstdBoundIsZstdCompressBound() {
        // ZSTD_COMPRESSBOUND: n + n/256, plus (128 KiB - n)/2048 below 128 KiB.
        #expect(CompressionMethod.zstd.payloadBound(0) == 64)
        #expect(CompressionMethod.zstd.payloadBound(4096) == 4096 + 16 + 62)
        #expect(CompressionMethod.zstd.payloadBound(128 << 10) == (128 << 10) + 512)
        #expect(CompressionMethod.zstd.payloadBound(512 << 10) == (512 << 10) + 2048)
        #expect(CompressionMethod.none.payloadBound(12345) == 12345)
    }

    // MARK: - packet checks

    @Test func compressedPacketWithinTheBoundIsAccepted() throws {
        let bound = UInt32(CompressionMethod.zstd.payloadBound(2 * Self.pageSize))
        for payload in [1, 100, 8192, bound] {
            let h = Self.header(payload: payload)
            #expect(try Self.decode(h, limits: Self.zstd) == h)
        }
    }

    @Test func compressedFlagWithoutNegotiationIsRefused() {
        let error = expectWireError(field: "flags", value: "0x2") { _ = try Self.decode(Self.header(), limits: Self.plain) }
        #expect(error?.reason.contains("negotiated no compression") == true)
        // Even a payload that would fit the uncompressed rule.
        expectWireError(field: "flags", value: "0x2") {
            _ = try Self.decode(Self.header(payload: 8192), limits: Self.plain)
        }
    }

    @Test func compressedPayloadBeyondTheBoundIsRefusedBeforeTheRead() {
        let bound = UInt32(CompressionMethod.zstd.payloadBound(2 * Self.pageSize))
        let error = expectWireError(field: "payload-size", value: "\(bound + 1)") {
            _ = try Self.decode(Self.header(payload: bound + 1), limits: Self.zstd)
        }
        #expect(error?.reason.contains("1...\(bound)") == true, "\(String(describing: error))")
        expectWireError(field: "payload-size", value: "\(UInt32.max)") {
            _ = try Self.decode(Self.header(payload: .max), limits: Self.zstd)
        }
        expectWireError(field: "payload-size", value: "0") { _ = try Self.decode(Self.header(payload: 0), limits: Self.zstd) }
    }

    @Test func negotiatedCompressionRequiresTheFlagOnPageData() {
        let raw = Self.header(flags: [], payload: 2 * UInt32(Self.pageSize))
        let error = expectWireError(field: "flags", value: "0x0") { _ = try Self.decode(raw, limits: Self.zstd) }
        #expect(error?.reason.contains("must be COMPRESSED") == true)
    }

    @Test func zeroPagesAreNeverCompressed() throws {
        // A packet of zero pages only has no payload: no flag, payload 0.
        let zeros = Self.header(flags: [], normal: 0, zero: 5, payload: 0)
        #expect(try Self.decode(zeros, limits: Self.zstd) == zeros)
        let flagged = Self.header(normal: 0, zero: 5, payload: 20)
        let error = expectWireError(field: "flags", value: "0x2") { _ = try Self.decode(flagged, limits: Self.zstd) }
        #expect(error?.reason.contains("zero pages only") == true)
    }

    @Test func syncPacketIsNeverCompressed() {
        for payload: UInt32 in [0, 10] {
            let h = Header(
                flags: [.sync, .compressed], normalCount: 0, zeroCount: 0, payloadSize: payload, packetNumber: 9, blockID: 0)
            let error = expectWireError(field: "flags", value: "0x3") { _ = try Self.decode(h, limits: Self.zstd) }
            #expect(error?.reason.contains("SYNC") == true)
        }
    }

    @Test func randomValidCompressedHeadersRoundTrip() throws {
        var g = SplitMix64(seed: 0x2575_0001)
        for _ in 0..<2000 {
            let normal = UInt32.random(in: 0...128, using: &g)
            let zero = UInt32.random(in: (normal == 0 ? 1 : 0)...(128 - normal), using: &g)
            let bound = UInt32(CompressionMethod.zstd.payloadBound(UInt64(normal) * Self.pageSize))
            let h = Header(
                flags: normal > 0 ? .compressed : [], normalCount: normal, zeroCount: zero,
                payloadSize: normal > 0 ? UInt32.random(in: 1...bound, using: &g) : 0, packetNumber: 9, blockID: 0)
            #expect(try Self.decode(h, limits: Self.zstd) == h)
        }
    }
}
