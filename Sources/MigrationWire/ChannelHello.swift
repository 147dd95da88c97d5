/// Identifies one migration session; every channel's hello carries it so the
/// destination never mixes channels of two sources.
public struct SessionID: Hashable, Sendable, CustomStringConvertible {
    public var high: UInt64
    public var low: UInt64

    public init(high: UInt64, low: UInt64) {
        self.high = high
        self.low = low
    }

    /// A random session id (version-4 UUID bits).
    public static func random() -> SessionID {
        var g = SystemRandomNumberGenerator()
        let h = (g.next() & ~0xF000) | 0x4000
        let l = (g.next() & ~(0xC << 60)) | (0x8 << 60)
        return SessionID(high: h, low: l)
    }

    public var description: String {
        let s = String(high, radix: 16).leftPadded(16) + String(low, radix: 16).leftPadded(16)
        let c = Array(s)
        return String(c[0..<8]) + "-" + String(c[8..<12]) + "-" + String(c[12..<16]) + "-"
            + String(c[16..<20]) + "-" + String(c[20..<32])
    }
}

extension String {
    fileprivate func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}

/// The first bytes on every channel, source to destination.
///
/// Layout (32 bytes, big-endian): magic u32, version u32, session 16 bytes,
/// kind u8, compression u8, channel-id u16, channel-count u16, flags u16.
public struct ChannelHello: Equatable, Sendable {
    /// Which stream this connection carries.
    public enum Kind: UInt8, Sendable {
        /// The control stream: layout, end-of-round markers, completion.
        case main = 1
        /// One of the N page channels.
        case multifd = 2
    }

    public static let magic: UInt32 = 0x4C4D_4947  // "LMIG"
    public static let version: UInt32 = 1
    public static let size = 32

    /// Hello flags; bits not named here are rejected.
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// Main channel: a live guest is migrated, its state follows at
        /// switchover (the destination must be able to store it).
        public static let guestState = Flags(rawValue: 1 << 0)
        public static let known: Flags = [.guestState]
    }

    public var session: SessionID
    public var kind: Kind
    /// For multifd channels, 0..<channelCount; 0 for the main channel.
    public var channelID: UInt16
    /// How many multifd channels the source opens.
    public var channelCount: UInt16
    public var flags: Flags
    /// Main channel: how every page packet of this migration carries its
    /// normal pages. Multifd hellos send `.none`; the main hello decides.
    public var compression: CompressionMethod

    public init(
        session: SessionID, kind: Kind, channelID: UInt16, channelCount: UInt16, flags: Flags = [],
        compression: CompressionMethod = .none
    ) {
        self.session = session
        self.kind = kind
        self.channelID = channelID
        self.channelCount = channelCount
        self.flags = flags
        self.compression = compression
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.u32(Self.magic)
        w.u32(Self.version)
        w.u64(session.high)
        w.u64(session.low)
        w.u8(kind.rawValue)
        w.u8(compression.rawValue)
        w.u16(channelID)
        w.u16(channelCount)
        w.u16(flags.rawValue)
        return w.bytes
    }

    /// Decodes and checks a hello on its own terms (magic, version, kind,
    /// id < count). Whether it fits the session is the destination's check.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> ChannelHello {
        let what = "channel hello"
        var r = ByteReader(bytes, message: what)
        let magic = try r.u32("magic")
        guard magic == Self.magic else {
            throw WireError(
                message: what, field: "magic", value: hex(magic),
                reason: "expected \(hex(Self.magic)) (\"LMIG\"); the peer is not a livemig source")
        }
        let version = try r.u32("version")
        guard version == Self.version else {
            throw WireError(
                message: what, field: "version", value: "\(version)",
                reason: "this livemig speaks version \(Self.version); use matching livemig builds on both sides")
        }
        let session = SessionID(high: try r.u64("session"), low: try r.u64("session"))
        let rawKind = try r.u8("kind")
        guard let kind = Kind(rawValue: rawKind) else {
            throw WireError(message: what, field: "kind", value: "\(rawKind)", reason: "known kinds are 1 (main) and 2 (multifd)")
        }
        let rawCompression = try r.u8("compression")
        let id = try r.u16("channel-id")
        let count = try r.u16("channel-count")
        guard count >= 1 else {
            throw WireError(message: what, field: "channel-count", value: "0", reason: "a migration uses at least one channel")
        }
        if kind == .multifd, id >= count {
            throw WireError(
                message: what, field: "channel-id", value: "\(id)",
                reason: "must be below the channel count \(count)")
        }
        let flags = Flags(rawValue: try r.u16("flags"))
        guard Flags.known.isSuperset(of: flags) else {
            throw WireError(
                message: what, field: "flags", value: hex(flags.rawValue),
                reason: "unknown bits \(hex(flags.rawValue & ~Flags.known.rawValue))")
        }
        // Checked last so a peer learns of a bad magic or version first.
        guard let compression = CompressionMethod(rawValue: rawCompression) else {
            throw WireError(
                message: what, field: "compression", value: "\(rawCompression)",
                reason:
                    "unknown compression method; this livemig knows \(CompressionMethod.knownList): use matching livemig builds or send with --compress none"
            )
        }
        return ChannelHello(
            session: session, kind: kind, channelID: id, channelCount: count, flags: flags, compression: compression)
    }
}
