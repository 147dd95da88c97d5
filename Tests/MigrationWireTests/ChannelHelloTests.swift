import MigrationWire
import TestSupport
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

    /// 32 distinct bytes, so a nonce written in the wrong place or order shows.
    static let nonce: [UInt8] = (0..<32).map { UInt8(0xA0 + $0) }

    @Test func encodesTheDocumentedLayout() {
        let hello = ChannelHello(
            session: Self.session, kind: .multifd, channelID: 0x0102, channelCount: 0x0304, flags: [.authenticated, .encrypted],
            nonce: Self.nonce)
        let expected: [UInt8] =
            [0x4C, 0x4D, 0x49, 0x47]  // "LMIG"
            + [0, 0, 0, 4]  // version
            + [0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF]  // session high
            + [0xFE, 0xDC, 0xBA, 0x98, 0x76, 0x54, 0x32, 0x10]  // session low
            + [2, 0]  // kind, compression (none)
            + [0x01, 0x02]  // channel-id
            + [0x03, 0x04]  // channel-count
            + [0, 0b110]  // flags: AUTHENTICATED | ENCRYPTED
            + Self.nonce  // source nonce, bytes 32..<64
        #expect(hello.encoded() == expected)
        #expect(hello.encoded().count == ChannelHello.size)
        #expect(ChannelHello.size == 64)
        #expect(ChannelHello.version == 4)
        #expect(ChannelHello.nonceSize == 32)
        #expect(ChannelHello.preambleSize == 8)
    }

    @Test func flagsHaveTheDocumentedBits() {
        #expect(ChannelHello.Flags.guestState.rawValue == 1 << 0)
        #expect(ChannelHello.Flags.authenticated.rawValue == 1 << 1)
        #expect(ChannelHello.Flags.encrypted.rawValue == 1 << 2)
        #expect(ChannelHello.Flags.postcopy.rawValue == 1 << 3)
        #expect(ChannelHello.Flags.recover.rawValue == 1 << 4)
        #expect(ChannelHello.Flags.known.rawValue == 0b1_1111)
        // The default nonce is 32 zero bytes, at the end of the hello.
        let plain = ChannelHello(session: Self.session, kind: .main, channelID: 0, channelCount: 1, flags: .guestState)
        #expect(Array(plain.encoded()[30..<32]) == [0, 1])
        #expect(Array(plain.encoded()[32...]) == [UInt8](repeating: 0, count: 32))
    }

    @Test(arguments: [
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 1),
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 16),
        ChannelHello(session: SessionID(high: 0, low: 0), kind: .multifd, channelID: 0, channelCount: 1),
        ChannelHello(session: SessionID(high: .max, low: .max), kind: .multifd, channelID: 7, channelCount: 8),
        ChannelHello(session: SessionID(high: 1, low: 2), kind: .multifd, channelID: 0xFFFE, channelCount: 0xFFFF),
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 2, flags: .guestState),
        ChannelHello(session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 2, flags: .authenticated),
        ChannelHello(
            session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 2, flags: [.authenticated, .encrypted]),
        ChannelHello(
            session: ChannelHelloTests.session, kind: .main, channelID: 0, channelCount: 2, flags: .known, compression: .zstd,
            nonce: ChannelHelloTests.nonce),
        ChannelHello(
            session: ChannelHelloTests.session, kind: .multifd, channelID: 1, channelCount: 2, flags: .authenticated,
            nonce: [UInt8](repeating: 0xFF, count: 32)),
    ])
    func roundTrips(_ hello: ChannelHello) throws {
        let bytes = hello.encoded()
        #expect(bytes.count == ChannelHello.size)
        #expect(try Self.decode(bytes) == hello)
    }

    @Test func randomSessionsAndNoncesRoundTrip() throws {
        var g = SplitMix64(seed: 0x4E0C_E001)
        let flagSets: [ChannelHello.Flags] = [[], .guestState, .authenticated, [.authenticated, .encrypted], .known.subtracting(.recover)]
        for i in 0..<64 {
            let nonce = (0..<32).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let hello = ChannelHello(
                session: .random(), kind: i.isMultiple(of: 2) ? .main : .multifd,
                channelID: UInt16(i % 8), channelCount: 8, flags: flagSets[i % flagSets.count], nonce: nonce)
            let bytes = hello.encoded()
            #expect(Array(bytes[32..<64]) == nonce)
            #expect(try Self.decode(bytes) == hello)
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
        // A protocol-1 source: its hello is 32 bytes, and it hears about the version first.
        let old = Array(Self.valid().settingU32(1, at: 4)[0..<32])
        let error = expectWireError(field: "version", value: "1") { _ = try Self.decode(old) }
        #expect(error?.reason.contains("speaks version 4") == true)
    }

    @Test func rejectsRecoverWithoutPostcopy() {
        // RECOVER alone (0x10), and RECOVER + POSTCOPY on a multifd channel.
        let bytes = Self.valid(kind: .main, id: 0).settingU16(0x0010, at: 30)
        let error = expectWireError(field: "flags", value: "0x10") { _ = try Self.decode(bytes) }
        #expect(error?.reason.contains("POSTCOPY") == true)
        expectWireError(field: "flags", value: "0x18") { _ = try Self.decode(Self.valid().settingU16(0x0018, at: 30)) }
        let main = Self.valid(kind: .main, id: 0).settingU16(0x0018, at: 30)
        #expect((try? Self.decode(main))?.flags == [.postcopy, .recover])
    }

    @Test func rejectsUnknownFlagBits() {
        for (raw, unknown) in [(UInt16(0x0020), "0x20"), (0x8000, "0x8000"), (0x003B, "0x20"), (0xFFFF, "0xffe0")] {
            let bytes = Self.valid().settingU16(raw, at: 30)
            let error = expectWireError(field: "flags", value: "0x" + String(raw, radix: 16)) { _ = try Self.decode(bytes) }
            #expect(error?.reason.contains("unknown bits \(unknown)") == true, "\(String(describing: error))")
        }
    }

    @Test func rejectsEncryptedWithoutAuthenticated() throws {
        for raw: UInt16 in [0b100, 0b101] {
            let bytes = Self.valid().settingU16(raw, at: 30)
            let error = expectWireError(field: "flags", value: "0x" + String(raw, radix: 16)) { _ = try Self.decode(bytes) }
            #expect(error?.reason.contains("ENCRYPTED needs AUTHENTICATED") == true, "\(String(describing: error))")
        }
        // With AUTHENTICATED it is fine, with or without GUEST_STATE.
        for raw: UInt16 in [0b110, 0b111] {
            #expect(try Self.decode(Self.valid().settingU16(raw, at: 30)).flags.rawValue == raw)
        }
    }

    @Test func checkPreambleChecksMagicAndVersionOnly() throws {
        let hello = Self.valid()
        func check(_ bytes: [UInt8]) throws(WireError) {
            try withBytes(bytes) { raw throws(WireError) in try ChannelHello.checkPreamble(raw) }
        }
        // The first 8 bytes are enough; whatever follows is not looked at.
        try check(Array(hello[0..<ChannelHello.preambleSize]))
        try check(hello)
        try check(Array(hello[0..<8]) + [UInt8](repeating: 0xFF, count: 56))

        let magic = expectWireError(field: "magic", value: "0xdeadbeef") { try check(Array(hello.settingU32(0xDEAD_BEEF, at: 0)[0..<8])) }
        #expect(magic?.message == "channel hello")
        #expect(magic?.reason.contains("not a livemig source") == true)
        // A challenge is not a hello.
        let challenge = HelloChallenge(flags: [], nonce: Self.nonce).encoded()
        expectWireError(field: "magic", value: "0x4c4d4952") { try check(challenge) }
        // A protocol-1 peer hears about the version from the first 8 bytes.
        let version = expectWireError(field: "version", value: "1") { try check(Array(hello.settingU32(1, at: 4)[0..<8])) }
        #expect(version?.reason.contains("matching livemig builds") == true)
        // A protocol-2 peer (ChaCha20-Poly1305 for ENCRYPTED) is another version too.
        expectWireError(field: "version", value: "2") { try check(Array(hello.settingU32(2, at: 4)[0..<8])) }
        // A protocol-3 peer (the preempt SYNC without multifd-drained) too.
        expectWireError(field: "version", value: "3") { try check(Array(hello.settingU32(3, at: 4)[0..<8])) }
        expectWireError(field: "version", value: "5") { try check(Array(hello.settingU32(5, at: 4)[0..<8])) }
        // Fewer than 8 bytes.
        expectWireError(field: "magic", value: "missing") { try check(Array(hello[0..<3])) }
        expectWireError(field: "version", value: "missing") { try check(Array(hello[0..<7])) }
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
            case 30..<32: "flags"
            default: "nonce"
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

@Suite("HelloChallenge")
struct HelloChallengeTests {
    static let nonce: [UInt8] = (0..<32).map { UInt8(0x10 + $0) }
    static let proof: [UInt8] = (0..<32).map { UInt8(0xC0 + $0) }

    static func decode(_ bytes: [UInt8]) throws(WireError) -> HelloChallenge {
        try withBytes(bytes) { raw throws(WireError) in try HelloChallenge.decode(raw) }
    }

    @Test func encodesTheDocumentedLayout() {
        let c = HelloChallenge(flags: .authenticated, nonce: Self.nonce, proof: Self.proof)
        let unproven: [UInt8] =
            [0x4C, 0x4D, 0x49, 0x52]  // "LMIR"
            + [0, 0, 0, 4]  // version
            + [0, 1]  // flags: AUTHENTICATED
            + [0, 0]  // reserved u16
            + [0, 0, 0, 0]  // reserved u32
            + Self.nonce  // destination nonce, bytes 16..<48
        #expect(c.encodedWithoutProof() == unproven)
        #expect(c.encoded() == unproven + Self.proof)
        #expect(HelloChallenge.size == 80 && c.encoded().count == HelloChallenge.size)
        #expect(HelloChallenge.unprovenSize == 48 && unproven.count == HelloChallenge.unprovenSize)
        #expect(HelloChallenge.proofSize == 32)
        // Without a key: no flag, a proof of zeros.
        let plain = HelloChallenge(flags: [], nonce: Self.nonce).encoded()
        #expect(Array(plain[8..<10]) == [0, 0])
        #expect(Array(plain[48...]) == [UInt8](repeating: 0, count: 32))
    }

    @Test(arguments: [
        HelloChallenge(flags: [], nonce: [UInt8](repeating: 0, count: 32)),
        HelloChallenge(flags: [], nonce: HelloChallengeTests.nonce),
        HelloChallenge(flags: .authenticated, nonce: HelloChallengeTests.nonce, proof: HelloChallengeTests.proof),
        HelloChallenge(flags: .authenticated, nonce: [UInt8](repeating: 0xFF, count: 32), proof: [UInt8](repeating: 0xFF, count: 32)),
    ])
    func roundTrips(_ c: HelloChallenge) throws {
        #expect(try Self.decode(c.encoded()) == c)
        // Bytes after the challenge (the source's proof, say) are not its own.
        #expect(try Self.decode(c.encoded() + [1, 2, 3]) == c)
    }

    @Test func randomChallengesRoundTrip() throws {
        var g = SplitMix64(seed: 0xC4A1_0001)
        for i in 0..<64 {
            let nonce = (0..<32).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let proof = (0..<32).map { _ in UInt8(truncatingIfNeeded: g.next()) }
            let c = HelloChallenge(flags: i.isMultiple(of: 2) ? [] : .authenticated, nonce: nonce, proof: proof)
            #expect(Array(c.encoded()[16..<48]) == nonce && Array(c.encoded()[48..<80]) == proof)
            #expect(try Self.decode(c.encoded()) == c)
        }
    }

    @Test func rejectsWrongMagic() {
        let good = HelloChallenge(flags: [], nonce: Self.nonce).encoded()
        let error = expectWireError(field: "magic", value: "0xdeadbeef") { _ = try Self.decode(good.settingU32(0xDEAD_BEEF, at: 0)) }
        #expect(error?.message == "hello challenge")
        #expect(error?.reason.contains("0x4c4d4952") == true)
        #expect(error?.reason.contains("not a livemig destination") == true)
        // A hello is not a challenge (a source connected to a source, say).
        let hello = ChannelHello(session: SessionID(high: 1, low: 2), kind: .main, channelID: 0, channelCount: 1).encoded()
        expectWireError(field: "magic", value: "0x4c4d4947") { _ = try Self.decode(hello + [UInt8](repeating: 0, count: 16)) }
    }

    @Test func rejectsNonZeroReserved() {
        let good = HelloChallenge(flags: [], nonce: Self.nonce).encoded()
        #expect(throws: Never.self) { _ = try Self.decode(good) }
        expectWireError(field: "reserved", value: "0x1") { _ = try Self.decode(good.settingU16(1, at: 10)) }
        expectWireError(field: "reserved", value: "0xabcd") { _ = try Self.decode(good.settingU32(0xABCD, at: 12)) }
    }

    @Test func rejectsWrongVersion() {
        let good = HelloChallenge(flags: [], nonce: Self.nonce).encoded()
        expectWireError(field: "version", value: "1") { _ = try Self.decode(good.settingU32(1, at: 4)) }
        expectWireError(field: "version", value: "4242") { _ = try Self.decode(good.settingU32(4242, at: 4)) }
    }

    @Test func rejectsUnknownFlagBits() {
        let good = HelloChallenge(flags: .authenticated, nonce: Self.nonce, proof: Self.proof).encoded()
        for (raw, unknown) in [(UInt16(0x0002), "0x2"), (0x0003, "0x2"), (0x8001, "0x8000"), (0xFFFF, "0xfffe")] {
            let error = expectWireError(field: "flags", value: "0x" + String(raw, radix: 16)) {
                _ = try Self.decode(good.settingU16(raw, at: 8))
            }
            #expect(error?.reason.contains("unknown bits \(unknown)") == true, "\(String(describing: error))")
        }
    }

    @Test func rejectsTruncatedChallenge() {
        let bytes = HelloChallenge(flags: .authenticated, nonce: Self.nonce, proof: Self.proof).encoded()
        func field(at length: Int) -> String {
            switch length {
            case 0..<4: "magic"
            case 4..<8: "version"
            case 8..<10: "flags"
            case 10..<16: "reserved"
            case 16..<48: "nonce"
            default: "proof"
            }
        }
        for length in 0..<HelloChallenge.size {
            let error = expectWireError(field: field(at: length), value: "missing") { _ = try Self.decode(Array(bytes[0..<length])) }
            #expect(error?.message == "hello challenge")
        }
    }
}
