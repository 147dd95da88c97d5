/// One RAM block as the RAM layout message describes it.
public struct RAMBlockLayout: Equatable, Sendable {
    public var name: String
    public var size: UInt64
    public var pageSize: UInt64

    public init(name: String, size: UInt64, pageSize: UInt64) {
        self.name = name
        self.size = size
        self.pageSize = pageSize
    }
}

/// What the source says it sent, for the destination to check at completion.
public struct CompletionSummary: Equatable, Sendable {
    /// Rounds sent (each ended by SYNC packets and an end-of-round marker).
    public var rounds: UInt64
    /// Pages sent with their data, over all rounds and channels.
    public var normalPages: UInt64
    /// Pages sent as zero-page offsets.
    public var zeroPages: UInt64
    /// Page packets (not SYNC packets) over all channels.
    public var packets: UInt64
    /// Bytes of the guest-state message sent before this one (0: none).
    public var guestStateBytes: UInt64
    /// Digest of the source's page table: for every page of the block, in
    /// order, the content hash of the copy it sent last (docs/PROTOCOL.md §6).
    /// The destination compares it with the digest of what it placed.
    public var pageDigest: [UInt8]

    /// Bytes of `pageDigest`.
    public static let digestSize = 16

    public init(
        rounds: UInt64, normalPages: UInt64, zeroPages: UInt64, packets: UInt64, guestStateBytes: UInt64 = 0,
        pageDigest: [UInt8] = [UInt8](repeating: 0, count: CompletionSummary.digestSize)
    ) {
        precondition(pageDigest.count == Self.digestSize, "a page digest is \(Self.digestSize) bytes")
        self.rounds = rounds
        self.normalPages = normalPages
        self.zeroPages = zeroPages
        self.packets = packets
        self.guestStateBytes = guestStateBytes
        self.pageDigest = pageDigest
    }
}

/// A run of pages of one RAM block: `count` pages from page `first`.
public struct PageRange: Equatable, Sendable {
    public var block: UInt32
    public var first: UInt64
    public var count: UInt64

    public init(block: UInt32 = 0, first: UInt64, count: UInt64) {
        self.block = block
        self.first = first
        self.count = count
    }

    /// Encoded size: block u32, first u64, count u64.
    public static let encodedSize = 20
}

/// A message on the main channel (the control stream).
///
/// Framing: type u16, reserved u16 (0), length u32, then `length` payload
/// bytes, then a 16-byte tag (`frameTagSize`) that the control channel adds
/// and checks: a checksum, or with a pre-shared key a MAC, over the frame
/// and its sequence number (docs/PROTOCOL.md §3).
public enum MainMessage: Equatable, Sendable {
    /// Destination → source: the main channel's hello was accepted.
    case helloAccepted
    /// Source → destination: the RAM blocks to migrate.
    case ramLayout([RAMBlockLayout])
    /// Destination → source: RAM mapped and matching; open the multifd channels.
    case layoutAccepted
    /// Source → destination: every channel has sent its SYNC for round `round`.
    case endOfRound(round: UInt64)
    /// Source → destination: the paused guest's state, sent at switchover.
    case guestState([UInt8])
    /// Source → destination: the last round is done; here is what was sent.
    case complete(CompletionSummary)
    /// Destination → source: every page and the guest state arrived and
    /// were checked; the destination is prepared and waits for `commit`
    /// (docs/PROTOCOL.md §7).
    case completed
    /// Source → destination: the source stopped its copy for good; the
    /// destination may now take the guest. Nothing follows it but the
    /// destination's `committed`.
    case commit
    /// Destination → source: the destination committed: the guest is
    /// theirs.
    case committed
    /// Either way: the sender gives up for this reason; the stream ends.
    case error(String)
    /// Source → destination, at the postcopy switch (docs/PROTOCOL.md §8):
    /// pages the destination holds that are stale (dirtied since they were
    /// sent). It drops them so the guest faults on them. Several may follow
    /// one another; `postcopyStart` counts their pages.
    case postcopyDiscard([PageRange])
    /// Source → destination: the switch is prepared on this side (last
    /// precopy round synced, discards and guest state sent). The destination
    /// drops the discarded pages and every page it does not hold, stores the
    /// state and answers `postcopyReady`.
    case postcopyStart(rounds: UInt64, discardedPages: UInt64)
    /// Destination → source: ready to run the guest with missing pages;
    /// waits for `commit`, whose `committed` is the point of no return.
    case postcopyReady
    /// Destination → source on the preempt channel (the return path): a
    /// destination guest thread waits for these pages.
    case pageRequest(PageRange)
    /// Destination → source, after each `postcopyDiscard`: the pages it
    /// has dropped so far. The source waits for it before the pause, so the
    /// destination's catching up and dropping happen while the source
    /// guest still runs, not in the downtime.
    case postcopyDiscarded(pages: UInt64)
    /// Source → destination, first on the main channel of a recovery
    /// (hello flag `recover`; docs/PROTOCOL.md §8.6): the session of the
    /// migration to resume and the rounds it had ended before postcopy.
    case postcopyRecover(session: SessionID, rounds: UInt64)
    /// Destination → source, the answer to `postcopyRecover`: which pages
    /// the destination holds (one bit per page, set = arrived; 64 pages per
    /// word, page 0 in bit 0 of word 0). The source sends the others.
    case postcopyReceived(pageCount: UInt64, words: [UInt64])
    /// Destination → source on the preempt channel, at the end of postcopy
    /// (docs/PROTOCOL.md §8.5): every multifd channel delivered its SYNC,
    /// so every page pushed has arrived; the pages still missing are the
    /// ones requested before this frame. The source's request server
    /// answers until it reads this, then sends the preempt channel's SYNC.
    case multifdDrained

    public static let frameHeaderSize = 8
    /// Bytes of the tag after every frame's payload.
    public static let frameTagSize = 16
    /// Bound on any payload; a larger length means a corrupt stream.
    public static let maxPayload = 64 << 20
    /// Longest error text carried (longer texts are cut).
    public static let maxErrorText = 4096
    /// Most ranges in one `postcopyDiscard` (a sender splits longer lists).
    public static let maxDiscardRanges = 65536
    /// Most pages one `pageRequest` asks for.
    public static let maxRequestPages: UInt64 = 1024
    /// The most pages a `postcopy-received` bitmap covers: just under 2^29 (2 TiB of
    /// 4 KiB pages, a 64 MiB frame).
    public static let maxReceivedPages: UInt64 = (UInt64(maxPayload) - 8) * 8

    enum Tag: UInt16 {
        case helloAccepted = 1, ramLayout, layoutAccepted, endOfRound, guestState, complete, completed, error, commit, committed
        case postcopyDiscard, postcopyStart, postcopyReady, pageRequest, postcopyDiscarded, postcopyRecover, postcopyReceived
        case multifdDrained
    }

    var tag: Tag {
        switch self {
        case .helloAccepted: .helloAccepted
        case .ramLayout: .ramLayout
        case .layoutAccepted: .layoutAccepted
        case .endOfRound: .endOfRound
        case .guestState: .guestState
        case .complete: .complete
        case .completed: .completed
        case .error: .error
        case .commit: .commit
        case .committed: .committed
        case .postcopyDiscard: .postcopyDiscard
        case .postcopyStart: .postcopyStart
        case .postcopyReady: .postcopyReady
        case .pageRequest: .pageRequest
        case .postcopyDiscarded: .postcopyDiscarded
        case .postcopyRecover: .postcopyRecover
        case .postcopyReceived: .postcopyReceived
        case .multifdDrained: .multifdDrained
        }
    }

    /// A short name for messages ("end-of-round").
    public var name: String { Self.name(of: tag) }

    /// The name of a frame's `type`, or "type N" when there is none.
    public static func name(type: UInt16) -> String { Tag(rawValue: type).map { name(of: $0) } ?? "type \(type)" }

    static func name(of tag: Tag) -> String {
        switch tag {
        case .helloAccepted: "hello-accepted"
        case .ramLayout: "ram-layout"
        case .layoutAccepted: "layout-accepted"
        case .endOfRound: "end-of-round"
        case .guestState: "guest-state"
        case .complete: "complete"
        case .completed: "completed"
        case .error: "error"
        case .commit: "commit"
        case .committed: "committed"
        case .postcopyDiscard: "postcopy-discard"
        case .postcopyStart: "postcopy-start"
        case .postcopyReady: "postcopy-ready"
        case .pageRequest: "page-request"
        case .postcopyDiscarded: "postcopy-discarded"
        case .postcopyRecover: "postcopy-recover"
        case .postcopyReceived: "postcopy-received"
        case .multifdDrained: "multifd-drained"
        }
    }

    /// The whole frame: header and payload.
    public func encoded() -> [UInt8] {
        var p = ByteWriter()
        switch self {
        case .helloAccepted, .layoutAccepted, .completed, .commit, .committed, .postcopyReady, .multifdDrained: break
        case .postcopyDiscard(let ranges):
            p.u32(UInt32(ranges.count))
            for r in ranges { Self.encode(r, into: &p) }
        case .postcopyStart(let rounds, let discarded):
            p.u64(rounds)
            p.u64(discarded)
        case .pageRequest(let r): Self.encode(r, into: &p)
        case .postcopyDiscarded(let pages): p.u64(pages)
        case .postcopyRecover(let session, let rounds):
            p.u64(session.high)
            p.u64(session.low)
            p.u64(rounds)
        case .postcopyReceived(let pageCount, let words):
            p.u64(pageCount)
            for w in words { p.u64(w) }
        case .ramLayout(let blocks):
            p.u32(UInt32(blocks.count))
            for b in blocks {
                // At most 255 bytes, cut on a character boundary so the
                // receiver's UTF-8 check accepts what we send.
                var name = Array(b.name.utf8)
                if name.count > 255 {
                    var cut = 255
                    while cut > 0, name[cut] & 0xC0 == 0x80 { cut -= 1 }
                    name = Array(name[..<cut])
                }
                p.u8(UInt8(name.count))
                p.raw(name)
                p.u64(b.size)
                p.u64(b.pageSize)
            }
        case .endOfRound(let round): p.u64(round)
        case .guestState(let bytes): p.raw(bytes)
        case .complete(let s):
            p.u64(s.rounds)
            p.u64(s.normalPages)
            p.u64(s.zeroPages)
            p.u64(s.packets)
            p.u64(s.guestStateBytes)
            p.raw(s.pageDigest)
        case .error(let text): p.raw(text.utf8.prefix(Self.maxErrorText))
        }
        var f = ByteWriter(capacity: Self.frameHeaderSize + p.bytes.count)
        f.u16(tag.rawValue)
        f.u16(0)
        f.u32(UInt32(p.bytes.count))
        f.raw(p.bytes)
        return f.bytes
    }

    private static func encode(_ r: PageRange, into p: inout ByteWriter) {
        p.u32(r.block)
        p.u64(r.first)
        p.u64(r.count)
    }

    /// Reads one range; `count` must be at least 1 and at most `maxCount`,
    /// and `first + count` must not overflow (the receiver checks it against
    /// its block).
    private static func decodeRange(_ r: inout ByteReader, _ what: String, _ field: String, maxCount: UInt64) throws(WireError)
        -> PageRange
    {
        let block = try r.u32("\(field).block")
        let first = try r.u64("\(field).first")
        let count = try r.u64("\(field).count")
        guard count >= 1, count <= maxCount, first <= UInt64.max - count else {
            throw WireError(
                message: what, field: "\(field).count", value: "\(count)",
                reason: "a range holds 1...\(maxCount) pages and ends below 2^64 (first page \(first))")
        }
        return PageRange(block: block, first: first, count: count)
    }

    /// Reads a frame header: returns the tag and payload length, both checked.
    public static func decodeFrameHeader(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> (type: UInt16, length: Int) {
        var r = ByteReader(bytes, message: "main message")
        let type = try r.u16("type")
        guard Tag(rawValue: type) != nil else {
            throw WireError(
                message: "main message", field: "type", value: "\(type)",
                reason: "no such message type (1...\(Tag.postcopyReceived.rawValue))")
        }
        let reserved = try r.u16("reserved")
        guard reserved == 0 else {
            throw WireError(
                message: "main message", field: "reserved", value: hex(reserved), reason: "must be 0; the stream is corrupt")
        }
        let length = try r.u32("length")
        guard Int(length) <= maxPayload else {
            throw WireError(
                message: "main message", field: "length", value: "\(length)",
                reason: "larger than the \(maxPayload)-byte bound; the stream is corrupt")
        }
        return (type, Int(length))
    }

    /// Decodes a payload whose header `decodeFrameHeader` accepted.
    public static func decode(type: UInt16, payload: UnsafeRawBufferPointer) throws(WireError) -> MainMessage {
        guard let tag = Tag(rawValue: type) else {
            throw WireError(message: "main message", field: "type", value: "\(type)", reason: "no such message type")
        }
        let what = "main message '\(Self.name(of: tag))'"
        var r = ByteReader(payload, message: what)
        let message: MainMessage
        switch tag {
        case .helloAccepted: message = .helloAccepted
        case .layoutAccepted: message = .layoutAccepted
        case .completed: message = .completed
        case .commit: message = .commit
        case .committed: message = .committed
        case .postcopyReady: message = .postcopyReady
        case .multifdDrained: message = .multifdDrained
        case .postcopyDiscard:
            let count = try r.u32("range-count")
            guard count >= 1, count <= UInt32(Self.maxDiscardRanges), Int(count) * PageRange.encodedSize == r.remaining else {
                throw WireError(
                    message: what, field: "range-count", value: "\(count)",
                    reason: "must be 1...\(Self.maxDiscardRanges) and match the \(r.remaining) bytes that follow")
            }
            var ranges: [PageRange] = []
            ranges.reserveCapacity(Int(count))
            for i in 0..<Int(count) { ranges.append(try decodeRange(&r, what, "range[\(i)]", maxCount: 1 << 40)) }
            message = .postcopyDiscard(ranges)
        case .postcopyStart:
            message = .postcopyStart(rounds: try r.u64("rounds"), discardedPages: try r.u64("discarded-pages"))
        case .postcopyDiscarded: message = .postcopyDiscarded(pages: try r.u64("pages"))
        case .postcopyRecover:
            let session = SessionID(high: try r.u64("session.high"), low: try r.u64("session.low"))
            message = .postcopyRecover(session: session, rounds: try r.u64("rounds"))
        case .postcopyReceived:
            let pageCount = try r.u64("page-count")
            // Rounded up without `pageCount + 63`, which overflows near
            // UInt64.max (found by fuzz-main-message).
            let wordCount = pageCount / 64 + (pageCount % 64 == 0 ? 0 : 1)
            guard pageCount >= 1, pageCount <= Self.maxReceivedPages, UInt64(r.remaining) == wordCount * 8 else {
                throw WireError(
                    message: what, field: "page-count", value: "\(pageCount)",
                    reason: "must be 1...\(Self.maxReceivedPages) and match the \(r.remaining) bytes of bitmap that follow (8 per 64 pages)"
                )
            }
            var words: [UInt64] = []
            words.reserveCapacity(Int(wordCount))
            for i in 0..<Int(wordCount) { words.append(try r.u64("words[\(i)]")) }
            let tail = pageCount % 64
            if tail != 0, words[words.count - 1] >> tail != 0 {
                throw WireError(
                    message: what, field: "words[\(words.count - 1)]", value: "0x\(String(words[words.count - 1], radix: 16))",
                    reason: "bits past page \(pageCount - 1) must be 0")
            }
            message = .postcopyReceived(pageCount: pageCount, words: words)
        case .pageRequest:
            message = .pageRequest(try decodeRange(&r, what, "range", maxCount: Self.maxRequestPages))
        case .ramLayout:
            let count = try r.u32("block-count")
            guard count >= 1, count <= 1024 else {
                throw WireError(message: what, field: "block-count", value: "\(count)", reason: "must be 1...1024")
            }
            var blocks: [RAMBlockLayout] = []
            for i in 0..<Int(count) {
                let n = Int(try r.u8("name-length[\(i)]"))
                let nameBytes = try r.raw(n, "name[\(i)]")
                guard n > 0, let name = String(validating: nameBytes, as: UTF8.self) else {
                    throw WireError(
                        message: what, field: "name[\(i)]", value: "\(nameBytes)", reason: "a block name is 1-255 bytes of UTF-8")
                }
                let size = try r.u64("size[\(i)]")
                let pageSize = try r.u64("page-size[\(i)]")
                guard pageSize >= 4096, pageSize <= 1 << 30, pageSize & (pageSize - 1) == 0 else {
                    throw WireError(
                        message: what, field: "page-size[\(i)]", value: "\(pageSize)", reason: "must be a power of two from 4096 to 1 GiB")
                }
                guard size > 0, size % pageSize == 0 else {
                    throw WireError(
                        message: what, field: "size[\(i)]", value: "\(size)",
                        reason: "must be a non-zero multiple of the page size \(pageSize)")
                }
                blocks.append(RAMBlockLayout(name: name, size: size, pageSize: pageSize))
            }
            message = .ramLayout(blocks)
        case .endOfRound: message = .endOfRound(round: try r.u64("round"))
        case .guestState: message = .guestState(try r.raw(r.remaining, "state"))
        case .complete:
            message = .complete(
                CompletionSummary(
                    rounds: try r.u64("rounds"), normalPages: try r.u64("normal-pages"),
                    zeroPages: try r.u64("zero-pages"), packets: try r.u64("packets"),
                    guestStateBytes: try r.u64("guest-state-bytes"),
                    pageDigest: try r.raw(CompletionSummary.digestSize, "page-digest")))
        case .error:
            let bytes = try r.raw(r.remaining, "text")
            message = .error(String(decoding: bytes, as: UTF8.self))
        }
        guard r.remaining == 0 else {
            throw WireError(
                message: what, field: "length", value: "\(payload.count)", reason: "\(r.remaining) bytes left over after the message")
        }
        return message
    }
}
