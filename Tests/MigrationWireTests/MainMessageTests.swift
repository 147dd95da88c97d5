import MigrationWire
import Testing

@Suite("MainMessage")
struct MainMessageTests {
    /// Decodes a whole frame the way the receiver does: header first, then
    /// exactly `length` payload bytes.
    static func decodeFrame(_ frame: [UInt8]) throws(WireError) -> MainMessage {
        let header = try withBytes(frame) { raw throws(WireError) in
            try MainMessage.decodeFrameHeader(UnsafeRawBufferPointer(rebasing: raw[0..<MainMessage.frameHeaderSize]))
        }
        #expect(header.length == frame.count - MainMessage.frameHeaderSize)
        return try decodePayload(type: header.type, Array(frame[MainMessage.frameHeaderSize...]))
    }

    static func decodePayload(type: UInt16, _ payload: [UInt8]) throws(WireError) -> MainMessage {
        try withBytes(payload) { raw throws(WireError) in try MainMessage.decode(type: type, payload: raw) }
    }

    static func decodeHeader(_ bytes: [UInt8]) throws(WireError) -> (type: UInt16, length: Int) {
        try withBytes(bytes) { raw throws(WireError) in try MainMessage.decodeFrameHeader(raw) }
    }

    /// A frame header: type, reserved 0, length.
    static func header(type: UInt16, length: UInt32) -> [UInt8] {
        be(type) + [0, 0] + be(length)
    }

    /// One ram-layout block as the encoder writes it.
    static func block(nameBytes: [UInt8], size: UInt64, pageSize: UInt64) -> [UInt8] {
        [UInt8(nameBytes.count)] + nameBytes + be(size) + be(pageSize)
    }

    static let ramLayoutType: UInt16 = 2

    /// 16 distinct bytes, so a digest written in the wrong place or order shows.
    static let digest: [UInt8] = (0..<16).map { UInt8(0xD0 + $0) }

    static let everyCase: [MainMessage] = [
        .helloAccepted,
        .ramLayout([RAMBlockLayout(name: "pc.ram", size: 4 << 30, pageSize: 4096)]),
        .ramLayout([
            RAMBlockLayout(name: "pc.ram", size: 1 << 20, pageSize: 4096),
            RAMBlockLayout(name: "vga.vram", size: 16 << 20, pageSize: 2 << 20),
            RAMBlockLayout(name: String(repeating: "x", count: 255), size: 1 << 30, pageSize: 1 << 30),
            RAMBlockLayout(name: "mémoire-é", size: 8192, pageSize: 8192),
        ]),
        .layoutAccepted,
        .endOfRound(round: 0),
        .endOfRound(round: 0x0102_0304_0506_0708),
        .endOfRound(round: .max),
        .guestState([]),
        .guestState([0, 1, 2, 0xFF]),
        .guestState((0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }),
        .complete(CompletionSummary(rounds: 3, normalPages: 1000, zeroPages: 24, packets: 9)),
        .complete(CompletionSummary(rounds: .max, normalPages: 0, zeroPages: .max - 1, packets: 1 << 40)),
        .complete(
            CompletionSummary(
                rounds: 7, normalPages: 1, zeroPages: 2, packets: 3, guestStateBytes: 4096, pageDigest: MainMessageTests.digest)),
        .complete(
            CompletionSummary(
                rounds: 1, normalPages: 1, zeroPages: 0, packets: 1, pageDigest: [UInt8](repeating: 0xFF, count: 16))),
        .completed,
        .commit,
        .committed,
        .error("the guest went away"),
        .error(""),
        .error("ünïcødé ✓"),
        .postcopyDiscard([PageRange(block: 0, first: 0, count: 1)]),
        .postcopyDiscard([PageRange(block: 3, first: 1 << 30, count: 77), PageRange(block: 0, first: 5, count: 1 << 40)]),
        .postcopyStart(rounds: 2, discardedPages: 0),
        .postcopyStart(rounds: .max, discardedPages: 1 << 33),
        .postcopyReady,
        .postcopyDiscarded(pages: 0),
        .postcopyDiscarded(pages: .max),
        .pageRequest(PageRange(block: 0, first: 12345, count: 1)),
        .pageRequest(PageRange(block: 1, first: .max - 1024, count: UInt64(MainMessage.maxRequestPages))),
        .postcopyRecover(session: SessionID(high: 0x0123_4567_89AB_CDEF, low: 0xFEDC_BA98_7654_3210), rounds: 3),
        .postcopyReceived(pageCount: 1, words: [1]),
        .postcopyReceived(pageCount: 64, words: [.max]),
        .postcopyReceived(pageCount: 130, words: [0x8000_0000_0000_0001, 0, 0b11]),
        .multifdDrained,
    ]

    // MARK: - round trips

    @Test(arguments: everyCase)
    func roundTrips(_ message: MainMessage) throws {
        let frame = message.encoded()
        #expect(frame.count >= MainMessage.frameHeaderSize)
        #expect(try Self.decodeFrame(frame) == message)
    }

    @Test func framesCarryTheDocumentedTypes() throws {
        let expected: [(MainMessage, UInt16, String)] = [
            (.helloAccepted, 1, "hello-accepted"),
            (.ramLayout([RAMBlockLayout(name: "pc.ram", size: 4096, pageSize: 4096)]), 2, "ram-layout"),
            (.layoutAccepted, 3, "layout-accepted"),
            (.endOfRound(round: 1), 4, "end-of-round"),
            (.guestState([1]), 5, "guest-state"),
            (.complete(CompletionSummary(rounds: 1, normalPages: 1, zeroPages: 1, packets: 1)), 6, "complete"),
            (.completed, 7, "completed"),
            (.error("x"), 8, "error"),
        ]
        for (message, type, name) in expected {
            let frame = message.encoded()
            #expect(Array(frame[0..<2]) == be(type), "type of \(name)")
            #expect(Array(frame[2..<4]) == [0, 0], "reserved of \(name)")
            #expect(Array(frame[4..<8]) == be(UInt32(frame.count - 8)), "length of \(name)")
            #expect(try Self.decodeHeader(frame).type == type)
            #expect(message.name == name)
        }
    }

    @Test func namesOfFrameTypes() {
        let names = [
            "hello-accepted", "ram-layout", "layout-accepted", "end-of-round", "guest-state", "complete", "completed", "error", "commit",
            "committed", "postcopy-discard", "postcopy-start", "postcopy-ready", "page-request", "postcopy-discarded", "postcopy-recover",
            "postcopy-received", "multifd-drained",
        ]
        for (i, name) in names.enumerated() { #expect(MainMessage.name(type: UInt16(i + 1)) == name) }
        // A type no message has is named by its number (for error texts).
        #expect(MainMessage.name(type: 0) == "type 0")
        #expect(MainMessage.name(type: 19) == "type 19")
        #expect(MainMessage.name(type: 0x1234) == "type 4660")
    }

    @Test func theTagIsNotPartOfTheEncodedFrame() throws {
        // The control channel adds (and checks) the 16-byte tag; a frame is
        // header and payload only, and its length counts the payload only.
        #expect(MainMessage.frameTagSize == 16)
        for message in Self.everyCase {
            let frame = message.encoded()
            let length = try Self.decodeHeader(frame).length
            #expect(frame.count == MainMessage.frameHeaderSize + length, "\(message.name)")
        }
        #expect(MainMessage.completed.encoded().count == 8)
    }

    @Test func completionSummaryCarriesADigestOf16Bytes() {
        #expect(CompletionSummary.digestSize == 16)
        let s = CompletionSummary(rounds: 1, normalPages: 2, zeroPages: 3, packets: 4)
        #expect(s.pageDigest == [UInt8](repeating: 0, count: 16))
        #expect(s.guestStateBytes == 0)
        // Digests are compared: two summaries differing in one digest byte differ.
        var t = s
        t.pageDigest[15] = 1
        #expect(s != t)
    }

    @Test func payloadLayouts() {
        #expect(MainMessage.helloAccepted.encoded() == Self.header(type: 1, length: 0))
        #expect(MainMessage.endOfRound(round: 0x0102).encoded() == Self.header(type: 4, length: 8) + be(UInt64(0x0102)))
        #expect(
            MainMessage.ramLayout([RAMBlockLayout(name: "ab", size: 0x2000, pageSize: 0x1000)]).encoded()
                == Self.header(type: 2, length: 4 + 1 + 2 + 16) + be(UInt32(1)) + [2, 0x61, 0x62]
                + be(UInt64(0x2000)) + be(UInt64(0x1000)))
        #expect(
            MainMessage.complete(CompletionSummary(rounds: 1, normalPages: 2, zeroPages: 3, packets: 4)).encoded()
                == Self.header(type: 6, length: 56) + be(UInt64(1)) + be(UInt64(2)) + be(UInt64(3)) + be(UInt64(4))
                + be(UInt64(0)) + [UInt8](repeating: 0, count: 16))
        #expect(
            MainMessage.complete(
                CompletionSummary(rounds: 1, normalPages: 2, zeroPages: 3, packets: 4, guestStateBytes: 5, pageDigest: Self.digest)
            ).encoded()
                == Self.header(type: 6, length: 56) + be(UInt64(1)) + be(UInt64(2)) + be(UInt64(3)) + be(UInt64(4))
                + be(UInt64(5)) + Self.digest)
        #expect(MainMessage.error("hi").encoded() == Self.header(type: 8, length: 2) + [0x68, 0x69])
    }

    @Test func longBlockNameIsCutOnACharacterBoundary() throws {
        // 150 two-byte characters: 300 bytes, cut to 254 (not 255, which
        // would split a character and fail the receiver's UTF-8 check).
        let name = String(repeating: "é", count: 150)
        let frame = MainMessage.ramLayout([RAMBlockLayout(name: name, size: 4096, pageSize: 4096)]).encoded()
        guard case .ramLayout(let blocks) = try Self.decodeFrame(frame) else {
            Issue.record("not a layout")
            return
        }
        #expect(blocks.first?.name == String(repeating: "é", count: 127))
    }

    @Test func longErrorTextIsCut() throws {
        let text = String(repeating: "e", count: MainMessage.maxErrorText + 100)
        let frame = MainMessage.error(text).encoded()
        #expect(frame.count == MainMessage.frameHeaderSize + MainMessage.maxErrorText)
        #expect(try Self.decodeFrame(frame) == .error(String(text.prefix(MainMessage.maxErrorText))))
    }

    @Test func lengthAtTheBoundIsAccepted() throws {
        let h = try Self.decodeHeader(Self.header(type: 5, length: UInt32(MainMessage.maxPayload)))
        #expect(h.type == 5)
        #expect(h.length == MainMessage.maxPayload)
    }

    // MARK: - one test per validation rule

    @Test func rejectsBadPostcopyRanges() {
        // A page request beyond the bound, a zero count, a discard whose
        // count disagrees with its bytes.
        for message in [
            MainMessage.pageRequest(PageRange(block: 0, first: 0, count: UInt64(MainMessage.maxRequestPages) + 1)),
            .pageRequest(PageRange(block: 0, first: 0, count: 0)),
            .postcopyDiscard([PageRange(block: 0, first: 0, count: 0)]),
        ] {
            #expect(throws: WireError.self, "\(message)") { _ = try Self.decodeFrame(message.encoded()) }
        }
        var frame = MainMessage.postcopyDiscard([PageRange(block: 0, first: 0, count: 1)]).encoded()
        frame[MainMessage.frameHeaderSize] = 2  // range-count 2, one range's bytes
        #expect(throws: WireError.self) { _ = try Self.decodeFrame(frame) }
    }

    @Test func rejectsBadReceivedBitmaps() {
        // A page count the words do not match, no pages, a bit past the last page.
        var frame = MainMessage.postcopyReceived(pageCount: 65, words: [0, 0]).encoded()
        frame[MainMessage.frameHeaderSize + 7] = 129  // 129 pages need 3 words
        expectWireError(field: "page-count", value: "129") { _ = try Self.decodeFrame(frame) }
        expectWireError(field: "page-count", value: "0") {
            _ = try Self.decodeFrame(MainMessage.postcopyReceived(pageCount: 0, words: []).encoded())
        }
        expectWireError(field: "words[1]", value: "0x2") {
            _ = try Self.decodeFrame(MainMessage.postcopyReceived(pageCount: 65, words: [0, 2]).encoded())
        }
        // A page count near UInt64.max once overflowed the word count
        // (fuzz-main-message); it is a plain error now.
        for huge in [UInt64.max, UInt64.max - 62] {
            var frame = MainMessage.postcopyReceived(pageCount: 1, words: [1]).encoded()
            for i in 0..<8 { frame[MainMessage.frameHeaderSize + i] = UInt8(truncatingIfNeeded: huge >> (56 - 8 * i)) }
            expectWireError(field: "page-count", value: "\(huge)") { _ = try Self.decodeFrame(frame) }
        }
    }

    @Test func rejectsUnknownType() {
        expectWireError(field: "type", value: "4660") { _ = try Self.decodeHeader(Self.header(type: 0x1234, length: 0)) }
        expectWireError(field: "type", value: "19") { _ = try Self.decodeHeader(Self.header(type: 19, length: 0)) }
        expectWireError(field: "type", value: "0") { _ = try Self.decodeHeader(Self.header(type: 0, length: 0)) }
        // decode checks on its own too.
        expectWireError(field: "type", value: "4660") { _ = try Self.decodePayload(type: 0x1234, []) }
    }

    @Test func rejectsNonZeroReserved() {
        #expect(throws: Never.self) { _ = try Self.decodeHeader(Self.header(type: 5, length: 0)) }
        expectWireError(field: "reserved", value: "0x1") { _ = try Self.decodeHeader(be(UInt16(5)) + [0, 1] + be(UInt32(0))) }
        expectWireError(field: "reserved", value: "0xff00") { _ = try Self.decodeHeader(be(UInt16(5)) + [0xFF, 0] + be(UInt32(0))) }
    }

    @Test func rejectsLengthOverMaxPayload() {
        let over = UInt32(MainMessage.maxPayload + 1)
        let error = expectWireError(field: "length", value: "\(over)") {
            _ = try Self.decodeHeader(Self.header(type: 5, length: over))
        }
        #expect(error?.reason.contains("\(MainMessage.maxPayload)") == true)
        expectWireError(field: "length", value: "\(UInt32.max)") {
            _ = try Self.decodeHeader(Self.header(type: 5, length: .max))
        }
    }

    @Test func rejectsRAMLayoutWithoutBlocks() {
        let error = expectWireError(field: "block-count", value: "0") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, be(UInt32(0)))
        }
        #expect(error?.message.hasPrefix("main message") == true)
        // The encoder does not stop an empty layout; the decoder does.
        expectWireError(field: "block-count", value: "0") { _ = try Self.decodeFrame(MainMessage.ramLayout([]).encoded()) }
        // Nor an absurd count, before reading any block.
        expectWireError(field: "block-count", value: "1025") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, be(UInt32(1025)))
        }
    }

    @Test func rejectsBadPageSize() {
        for bad: UInt64 in [0, 2048, 4097, 12288, 2 << 30] {
            let payload =
                be(UInt32(2)) + Self.block(nameBytes: Array("pc.ram".utf8), size: 1 << 20, pageSize: 4096)
                + Self.block(nameBytes: Array("rom".utf8), size: 1 << 20, pageSize: bad)
            expectWireError(field: "page-size[1]", value: "\(bad)") {
                _ = try Self.decodePayload(type: Self.ramLayoutType, payload)
            }
        }
    }

    @Test func rejectsSizeNotAMultipleOfPageSize() {
        let payload = be(UInt32(1)) + Self.block(nameBytes: Array("pc.ram".utf8), size: 12_388, pageSize: 4096)
        let error = expectWireError(field: "size[0]", value: "12388") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, payload)
        }
        #expect(error?.reason.contains("4096") == true)
        // Zero is a multiple of everything but still not a block.
        let empty = be(UInt32(1)) + Self.block(nameBytes: Array("pc.ram".utf8), size: 0, pageSize: 4096)
        expectWireError(field: "size[0]", value: "0") { _ = try Self.decodePayload(type: Self.ramLayoutType, empty) }
    }

    @Test func rejectsEmptyBlockName() {
        let payload = be(UInt32(1)) + Self.block(nameBytes: [], size: 4096, pageSize: 4096)
        expectWireError(field: "name[0]", value: "[]") { _ = try Self.decodePayload(type: Self.ramLayoutType, payload) }
        let encoded = MainMessage.ramLayout([RAMBlockLayout(name: "", size: 4096, pageSize: 4096)]).encoded()
        expectWireError(field: "name[0]", value: "[]") { _ = try Self.decodeFrame(encoded) }
    }

    @Test func rejectsBlockNameThatIsNotUTF8() {
        let payload =
            be(UInt32(2)) + Self.block(nameBytes: [0x61], size: 4096, pageSize: 4096)
            + Self.block(nameBytes: [0xFF, 0xFE], size: 4096, pageSize: 4096)
        expectWireError(field: "name[1]", value: "[255, 254]") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, payload)
        }
    }

    @Test func rejectsTrailingBytes() {
        let round = be(UInt64(7)) + [0xAB]
        let error = expectWireError(field: "length", value: "9") { _ = try Self.decodePayload(type: 4, round) }
        #expect(error?.reason.contains("1 bytes left over") == true)

        expectWireError(field: "length", value: "3") { _ = try Self.decodePayload(type: 1, [1, 2, 3]) }
        expectWireError(field: "length", value: "1") { _ = try Self.decodePayload(type: 3, [0]) }
        expectWireError(field: "length", value: "1") { _ = try Self.decodePayload(type: 7, [0]) }
        expectWireError(field: "length", value: "57") { _ = try Self.decodePayload(type: 6, [UInt8](repeating: 1, count: 57)) }
        let layout = be(UInt32(1)) + Self.block(nameBytes: [0x61], size: 4096, pageSize: 4096) + [0, 0]
        expectWireError(field: "length", value: "\(layout.count)") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, layout)
        }
    }

    @Test func rejectsTruncatedPayload() {
        expectWireError(field: "round", value: "missing") { _ = try Self.decodePayload(type: 4, Array(be(UInt64(7)).dropLast())) }
        expectWireError(field: "round", value: "missing") { _ = try Self.decodePayload(type: 4, []) }

        let summary = MainMessage.complete(CompletionSummary(rounds: 1, normalPages: 2, zeroPages: 3, packets: 4))
        let full = Array(summary.encoded()[MainMessage.frameHeaderSize...])
        #expect(full.count == 56)
        for (cut, field) in [
            (55, "page-digest"), (41, "page-digest"), (40, "page-digest"), (39, "guest-state-bytes"), (31, "packets"),
            (24, "packets"), (23, "zero-pages"), (9, "normal-pages"), (0, "rounds"),
        ] {
            expectWireError(field: field, value: "missing") { _ = try Self.decodePayload(type: 6, Array(full[0..<cut])) }
        }

        let layout = Array(
            MainMessage.ramLayout([RAMBlockLayout(name: "pc.ram", size: 1 << 20, pageSize: 4096)])
                .encoded()[MainMessage.frameHeaderSize...])
        // count(4) name-length(1) name(6) size(8) page-size(8)
        for (cut, field) in [
            (3, "block-count"), (4, "name-length[0]"), (5, "name[0]"), (10, "name[0]"), (11, "size[0]"),
            (18, "size[0]"), (19, "page-size[0]"), (26, "page-size[0]"),
        ] {
            let error = expectWireError(field: field, value: "missing") {
                _ = try Self.decodePayload(type: Self.ramLayoutType, Array(layout[0..<cut]))
            }
            #expect(error?.message.hasPrefix("main message") == true)
        }
        // A layout announcing two blocks but carrying one.
        let short = be(UInt32(2)) + Array(layout[4...])
        expectWireError(field: "name-length[1]", value: "missing") {
            _ = try Self.decodePayload(type: Self.ramLayoutType, short)
        }
    }

    @Test func rejectsTruncatedFrameHeader() {
        let frame = MainMessage.endOfRound(round: 1).encoded()
        for (cut, field) in [(0, "type"), (1, "type"), (2, "reserved"), (4, "length"), (7, "length")] {
            expectWireError(field: field, value: "missing") { _ = try Self.decodeHeader(Array(frame[0..<cut])) }
        }
    }
}

/// Keeps the test log readable: a guest state shows its size, not its bytes.
extension MainMessage: CustomTestStringConvertible {
    public var testDescription: String {
        switch self {
        case .guestState(let bytes): ".guestState(\(bytes.count) bytes)"
        default: String(describing: self)
        }
    }
}
