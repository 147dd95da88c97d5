/// The fixed header in front of every multifd packet (its layout is
/// version 2; protocol 3 changed only the cipher of ENCRYPTED).
///
/// Wire layout (48 bytes, big-endian), then `normal-count + zero-count` page
/// entries (16 bytes each: the page's offset u64 and the XXH3-64 hash of its
/// content u64; normal pages first, then zero pages), then the payload
/// (`normal-count` whole pages, in entry order; with COMPRESSED, one zstd
/// frame that decodes to those pages), then, when the migration is
/// authenticated, a 16-byte tag (docs/PROTOCOL.md §4):
///
/// | bytes | field          |
/// |-------|----------------|
/// | 0..4  | magic "LMPF"   |
/// | 4..8  | version        |
/// | 8..12 | flags          |
/// | 12..16| normal-count   |
/// | 16..20| zero-count     |
/// | 20..24| payload-size   |
/// | 24..32| packet-number  |
/// | 32..36| block-id       |
/// | 36..40| reserved (0)   |
/// | 40..48| prefix-check: XXH3-64 of the header and the entries, with these 8 bytes taken as zero |
public struct MultiFDPacketHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x4C4D_5046  // "LMPF"
    public static let version: UInt32 = 2
    public static let size = 48
    /// Header bytes the prefix check covers (all but the check itself).
    public static let checkedSize = 40
    /// Bytes of one page entry: offset and content hash.
    public static let entrySize = 16
    /// Pages one packet may carry (QEMU's multifd default, 128 × 4 KiB = 512 KiB).
    public static let maxPages = 128
    /// Bytes of header plus the largest entry array.
    public static let maxPrefixSize = size + maxPages * entrySize

    /// Packet flags. Bits not named here are rejected by the receiver.
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// End of this channel's share of a round; carries no pages.
        public static let sync = Flags(rawValue: 1 << 0)
        /// The payload is the normal pages compressed with the method the
        /// main hello negotiated (one zstd frame).
        public static let compressed = Flags(rawValue: 1 << 1)
        /// Every flag this version understands.
        public static let known: Flags = [.sync, .compressed]
    }

    public var flags: Flags
    public var normalCount: UInt32
    public var zeroCount: UInt32
    public var payloadSize: UInt32
    /// Per channel: 0, 1, 2, ... with no gap.
    public var packetNumber: UInt64
    /// Index into the RAM layout sent on the main channel.
    public var blockID: UInt32
    /// The prefix check as received (`decode`); the sender stores it with
    /// `storeCheck` once the entries are in place.
    public var check: UInt64

    public init(
        flags: Flags, normalCount: UInt32, zeroCount: UInt32, payloadSize: UInt32,
        packetNumber: UInt64, blockID: UInt32, check: UInt64 = 0
    ) {
        self.flags = flags
        self.normalCount = normalCount
        self.zeroCount = zeroCount
        self.payloadSize = payloadSize
        self.packetNumber = packetNumber
        self.blockID = blockID
        self.check = check
    }

    /// The bytes of entries that follow the header.
    @inlinable public var entriesSize: Int { Int(normalCount + zeroCount) * Self.entrySize }

    /// Header plus entries: the bytes before the payload.
    @inlinable public var prefixSize: Int { Self.size + entriesSize }

    /// Writes header bytes 0..<40 at `p` (no allocation; the sender's hot
    /// path). The check (bytes 40..<48) follows with `storeCheck` once the
    /// entries are written.
    @inlinable public func encode(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: Self.magic.bigEndian, toByteOffset: 0, as: UInt32.self)
        p.storeBytes(of: Self.version.bigEndian, toByteOffset: 4, as: UInt32.self)
        p.storeBytes(of: flags.rawValue.bigEndian, toByteOffset: 8, as: UInt32.self)
        p.storeBytes(of: normalCount.bigEndian, toByteOffset: 12, as: UInt32.self)
        p.storeBytes(of: zeroCount.bigEndian, toByteOffset: 16, as: UInt32.self)
        p.storeBytes(of: payloadSize.bigEndian, toByteOffset: 20, as: UInt32.self)
        p.storeBytes(of: packetNumber.bigEndian, toByteOffset: 24, as: UInt64.self)
        p.storeBytes(of: blockID.bigEndian, toByteOffset: 32, as: UInt32.self)
        p.storeBytes(of: UInt32(0), toByteOffset: 36, as: UInt32.self)
    }

    /// Stores the prefix check into bytes 40..<48 of the header at `p`.
    @inlinable public static func storeCheck(_ check: UInt64, to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: check.bigEndian, toByteOffset: checkedSize, as: UInt64.self)
    }

    /// Writes entry `index` (host order in, big-endian out) after the header at `p`.
    @inlinable public static func encodeEntry(offset: UInt64, hash: UInt64, index: Int, to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: offset.bigEndian, toByteOffset: size + index * entrySize, as: UInt64.self)
        p.storeBytes(of: hash.bigEndian, toByteOffset: size + index * entrySize + 8, as: UInt64.self)
    }

    /// Decodes and validates the 48 bytes at `p` against `limits`. Nothing
    /// here trusts the peer: every count is bounded before it sizes a read.
    public static func decode(
        _ p: UnsafeRawPointer, limits: PacketLimits, expectedPacketNumber: UInt64
    ) throws(WireError) -> MultiFDPacketHeader {
        func be32(_ o: Int) -> UInt32 { UInt32(bigEndian: p.loadUnaligned(fromByteOffset: o, as: UInt32.self)) }
        // The message text is built only when a check fails: no allocation
        // per packet on the receive path.
        func bad(_ field: String, _ value: String, _ reason: String) -> WireError {
            WireError(
                message: "multifd packet \(expectedPacketNumber) on channel \(limits.channelID)", field: field, value: value,
                reason: reason)
        }
        let magic = be32(0)
        guard magic == Self.magic else {
            throw bad("magic", hex(magic), "expected \(hex(Self.magic)) (\"LMPF\"); the stream is corrupt or not livemig")
        }
        let version = be32(4)
        guard version == Self.version else {
            throw bad("version", "\(version)", "this livemig speaks version \(Self.version)")
        }
        let flags = Flags(rawValue: be32(8))
        guard Flags.known.isSuperset(of: flags) else {
            throw bad("flags", hex(flags.rawValue), "unknown bits \(hex(flags.rawValue & ~Flags.known.rawValue))")
        }
        let compressed = flags.contains(.compressed)
        if compressed, limits.compression == .none {
            throw bad("flags", hex(flags.rawValue), "a COMPRESSED packet, but the main hello negotiated no compression")
        }
        if compressed, flags.contains(.sync) {
            throw bad("flags", hex(flags.rawValue), "a SYNC packet carries no pages to compress")
        }
        let normal = be32(12), zero = be32(16), payload = be32(20)
        let number = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
        let block = be32(32)
        let check = UInt64(bigEndian: p.loadUnaligned(fromByteOffset: Self.checkedSize, as: UInt64.self))
        let cap = UInt32(Self.maxPages)
        guard normal <= cap else { throw bad("normal-count", "\(normal)", "a packet holds at most \(cap) pages") }
        guard zero <= cap else { throw bad("zero-count", "\(zero)", "a packet holds at most \(cap) pages") }
        guard normal + zero <= cap else {
            throw bad("normal-count + zero-count", "\(normal + zero)", "a packet holds at most \(cap) pages")
        }
        let pagesSize = UInt64(normal) * limits.pageSize
        if compressed {
            // Bounds the read before it happens: never more than the method's
            // worst case for these pages (and so never more than the
            // receiver's per-channel buffer).
            let bound = limits.compression.payloadBound(pagesSize)
            guard payload > 0, UInt64(payload) <= bound else {
                throw bad(
                    "payload-size", "\(payload)",
                    "\(limits.compression) frames of \(normal) normal pages of \(limits.pageSize) bytes take 1...\(bound) bytes")
            }
        } else {
            guard UInt64(payload) == pagesSize else {
                throw bad(
                    "payload-size", "\(payload)",
                    "\(normal) normal pages of \(limits.pageSize) bytes make \(pagesSize)")
            }
        }
        guard number == expectedPacketNumber else {
            throw bad("packet-number", "\(number)", "expected \(expectedPacketNumber): packets on a channel are numbered 0, 1, 2, ...")
        }
        if flags.contains(.sync) {
            guard normal == 0, zero == 0 else {
                throw bad("normal-count + zero-count", "\(normal + zero)", "a SYNC packet carries no pages")
            }
        } else {
            guard normal + zero > 0 else { throw bad("normal-count + zero-count", "0", "a page packet carries at least one page") }
            guard Int(block) < limits.blockSizes.count else {
                throw bad("block-id", "\(block)", "the RAM layout has \(limits.blockSizes.count) block(s)")
            }
            // With a method negotiated, exactly the packets that carry page
            // data are compressed: zero pages never are.
            if limits.compression != .none, compressed != (normal > 0) {
                throw bad(
                    "flags", hex(flags.rawValue),
                    normal > 0
                        ? "the migration compresses with \(limits.compression): a packet with normal pages must be COMPRESSED"
                        : "a packet of zero pages only has no payload to compress")
            }
        }
        let reserved = be32(36)
        guard reserved == 0 else { throw bad("reserved", hex(reserved), "must be 0; the stream is corrupt or from another livemig") }
        return MultiFDPacketHeader(
            flags: flags, normalCount: normal, zeroCount: zero, payloadSize: payload,
            packetNumber: number, blockID: block, check: check)
    }

    /// Decodes the big-endian entries at `raw` into `offsets` and `hashes`
    /// (host order), checking each offset is page-aligned and inside the
    /// block. `offsets` come out in the whole RAM: the block's start in
    /// `limits.blockStarts` added (the blocks lie side by side in layout
    /// order). The hashes are checked against the pages by the receiver.
    @inlinable public func decodeEntries(
        _ raw: UnsafeRawPointer, offsets: UnsafeMutablePointer<UInt64>, hashes: UnsafeMutablePointer<UInt64>,
        limits: PacketLimits
    ) throws(WireError) {
        let blockSize = limits.blockSizes[Int(blockID)]
        let blockStart = limits.blockStarts[Int(blockID)]
        let mask = limits.pageSize - 1
        let count = Int(normalCount + zeroCount)
        for i in 0..<count {
            let off = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * Self.entrySize, as: UInt64.self))
            if off & mask != 0 || off >= blockSize {
                throw offsetError(off, index: i, blockSize: blockSize, limits: limits)
            }
            offsets[i] = blockStart &+ off
            hashes[i] = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: i * Self.entrySize + 8, as: UInt64.self))
        }
    }

    /// The error for a compressed payload that does not decode to this
    /// packet's pages (the receiver's checks after the read, see
    /// docs/PROTOCOL.md §4). Built only on failure.
    public func payloadError(field: String, value: String, reason: String, limits: PacketLimits) -> WireError {
        WireError(
            message: "multifd packet \(packetNumber) on channel \(limits.channelID)", field: field, value: value, reason: reason)
    }

    /// Bytes of normal pages this packet carries once decompressed.
    @inlinable public func pagesSize(limits: PacketLimits) -> Int { Int(normalCount) * Int(limits.pageSize) }

    @usableFromInline func offsetError(_ off: UInt64, index: Int, blockSize: UInt64, limits: PacketLimits) -> WireError {
        let name = limits.blockNames.indices.contains(Int(blockID)) ? limits.blockNames[Int(blockID)] : "#\(blockID)"
        let reason =
            off & (limits.pageSize - 1) != 0
            ? "not a multiple of the page size \(limits.pageSize)"
            : "beyond block '\(name)' (size \(hex(blockSize)))"
        return WireError(
            message: "multifd packet \(packetNumber) on channel \(limits.channelID)",
            field: "offset[\(index)]", value: hex(off), reason: reason)
    }
}

/// What the receiver checks packets against: learnt from the main hello
/// (compression) and the RAM layout.
public struct PacketLimits: Sendable {
    public var channelID: Int
    public var pageSize: UInt64
    public var blockSizes: [UInt64]
    public var blockNames: [String]
    /// Where each block starts when the blocks lie side by side in layout
    /// order: the sum of the sizes before it.
    public var blockStarts: [UInt64]
    /// The method the main hello negotiated: whether COMPRESSED packets are
    /// allowed (and then required for page data) and their payload bound.
    public var compression: CompressionMethod
    /// Bytes of the tag after each page packet's payload: 16 when the
    /// migration is authenticated, else 0. SYNC packets carry one too.
    public var tagSize: Int

    public init(
        channelID: Int, pageSize: UInt64, blocks: [RAMBlockLayout], compression: CompressionMethod = .none, tagSize: Int = 0
    ) {
        self.channelID = channelID
        self.pageSize = pageSize
        self.blockSizes = blocks.map(\.size)
        self.blockNames = blocks.map(\.name)
        var start: UInt64 = 0
        self.blockStarts = blocks.map { b in
            defer { start &+= b.size }
            return start
        }
        self.compression = compression
        self.tagSize = tagSize
    }
}
