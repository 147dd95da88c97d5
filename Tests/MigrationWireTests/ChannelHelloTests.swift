import MigrationWire
import Testing

@Suite("ChannelHello")
struct ChannelHelloTests {
    static let session = SessionID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210)

    static func decode(_ bytes: [UInt8]) throws -> ChannelHello {
        try bytes.withUnsafeBytes { try ChannelHello.decode($0) }
    }

    static func valid(kind: ChannelHello.Kind = .multifd, id: UInt16 = 1, count: UInt16 = 4) -> [UInt8] {
        ChannelHello(session: session, kind: kind, channelID: id, channelCount: count).encoded()
    }

    // MARK: - encoding and round trips

    @Test func encodesTheDocumentedLayout() {
        let hello = ChannelHello(session: Self.session, kind: .multifd, channelID: 0x0102, channelCount: 0x0304)
        let expected: [UInt8] =
            [0x4C, 0x4D, 0x49, 0x47]  // "LMIG"
            + [0, 0, 0, 1]  // version
            + [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]  // session high
            + [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10]  // session low
            + [2, 0]  // kind, compression (none)
            + [0x01, 0x02]  // channel-id
            + [0x03, 0x04]  // channel-count
            + [0, 0]  // flags
        #expect(hello.encoded() == expected)
        #expect(hello.encoded().count == ChannelHello.size)
        #expect(ChannelHello.size == 32)
    }

    @Test(arguments: [
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 1),
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 16),
        ChannelHello(session: SessionID(high: 0, low: 0), kind: .multifd, channelID: 0, channelCount: 1),
        ChannelHello(session: SessionID(high: .max, low: .max), kind: .multifd, channelID: 7, channelCount: 8),
        ChannelHello(session: SessionID(high: 1, low: 2), kind: .multifd, channelID: 0xFFFE, channelCount: 0xFFFF),
    ])
    func roundTrips(_ hello: ChannelHello) throws {
        let bytes = hello.encoded()
        #expect(bytes.count == ChannelHello.size)
        #expect(try Self.decode(bytes) == hello)
    }

    @Test func randomSessionsRoundTrip() throws {
        for i in 0..<64 {
            let hello = ChannelHello(
                session: .random(), kind: i.isMultiple(of: 2) ? .main : .multifd,
                channelID: UInt16(i % 8), channelCount: 8)
            #expect(try Self.decode(hello.encoded()) == hello)
        }
    }

    @Test func decodeIgnoresBytesAfterTheHello() throws {
        let hello = ChannelHello(session: Self.session, kind: .multifd, channelID: 2, channelCount: 3)
        #expect(try Self.decode(hello.encoded() + [0xFF, 0xFF, 0xFF]) == hello)
    }

    @Test func lastMultiFDChannelIDIsAccepted() throws {
        let hello = try Self.decode(Self.valid(kind: .multifd, id: 3, count: 4))
        #expect(hello.channelID == 3)
        #expect(hello.channelCount == 4)
    }

    // MARK: - one test per validation rule

    @Test func rejectsWrongMagic() {
        let bytes = Self.valid().settingU32(0xDEAD_BEEF, at: 0)
        let error = expectWireError(field: "magic", value: "0xdeadbeef") { _ = try Self.decode(bytes) }
        #expect(error?.message == "channel hello")
        #expect(error?.reason.contains("0x4c4d4947") == true)
    }

    @Test func rejectsWrongVersion() {
        let bytes = Self.valid().settingU32(4242, at: 4)
        expectWireError(field: "version", value: "4242") { _ = try Self.decode(bytes) }
    }

    @Test func rejectsUnknownKind() {
        var bytes = Self.valid()
        bytes[24] = 0xEE
        expectWireError(field: "kind", value: "238") { _ = try Self.decode(bytes) }
        bytes[24] = 0
        expectWireError(field: "kind", value: "0") { _ = try Self.decode(bytes) }
    }

    @Test func rejectsZeroChannelCount() {
        for kind in [ChannelHello.Kind.main, .multifd] {
            let bytes = Self.valid(kind: kind, id: 0).settingU16(0, at: 28)
            let error = expectWireError(field: "channel-count", value: "0") { _ = try Self.decode(bytes) }
            #expect(error?.reason.contains("at least one") == true)
        }
    }

    @Test func rejectsMultiFDChannelIDAtOrAboveCount() {
        let above = Self.valid(kind: .multifd, id: 0).settingU16(901, at: 26).settingU16(12, at: 28)
        let error = expectWireError(field: "channel-id", value: "901") { _ = try Self.decode(above) }
        #expect(error?.reason.contains("12") == true)

        let equal = Self.valid(kind: .multifd, id: 0, count: 5).settingU16(5, at: 26)
        expectWireError(field: "channel-id", value: "5") { _ = try Self.decode(equal) }
    }

    @Test func rejectsTruncatedHello() {
        let bytes = Self.valid()
        // The field each prefix length runs out in.
        func field(at length: Int) -> String {
            switch length {
            case 0..<4: "magic"
            case 4..<8: "version"
            case 8..<24: "session"
            case 24: "kind"
            case 25: "compression"
            case 26..<28: "channel-id"
            case 28..<30: "channel-count"
            default: "flags"
            }
        }
        for length in 0..<ChannelHello.size {
            let prefix = Array(bytes[0..<length])
            let error = expectWireError(field: field(at: length), value: "missing") { _ = try Self.decode(prefix) }
            #expect(error?.message == "channel hello")
        }
    }

    // MARK: - session ids

    @Test func sessionDescriptionIsUUIDShaped() {
        #expect(Self.session.description == "01234567-89ab-cdef-fedc-ba9876543210")
        #expect(SessionID(high: 1, low: 2).description == "00000000-0000-0001-0000-000000000002")
        #expect(SessionID(high: .max, low: .max).description == "ffffffff-ffff-ffff-ffff-ffffffffffff")
    }

    @Test func randomSessionsAreVersion4UUIDs() {
        var seen = Set<SessionID>()
        for _ in 0..<100 {
            let id = SessionID.random()
            #expect((id.high >> 12) & 0xF == 4, "version nibble of \(id)")
            #expect(id.low >> 62 == 0b10, "variant bits of \(id)")
            seen.insert(id)
        }
        #expect(seen.count == 100)
    }
}
