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

/// The first bytes on every channel, source to destination (protocol
/// version 4, docs/PROTOCOL.md §2).
///
/// Layout (64 bytes, big-endian): magic u32, version u32, session 16 bytes,
/// kind u8, compression u8, channel-id u16, channel-count u16, flags u16,
/// source nonce 32 bytes. The destination answers with a `HelloChallenge`;
/// the source then sends its 32-byte proof (`HelloChallenge.proofSize`).
public struct ChannelHello: Equatable, Sendable {
    /// Which stream this connection carries.
    public enum Kind: UInt8, Sendable {
        /// The control stream: layout, end-of-round markers, completion.
        case main = 1
        /// One of the N page channels.
        case multifd = 2
        /// Postcopy's urgent channel (docs/PROTOCOL.md §8): pages a
        /// destination guest faulted on travel here, source to destination,
        /// never queued behind background packets; the destination's page
        /// requests travel the other way (the return path). Its channel id
        /// is the channel count (the multifd ids are below it).
        case preempt = 3
    }

    public static let magic: UInt32 = 0x4C4D_4947  // "LMIG"
    /// 4: postcopy ends with `multifd-drained` before the preempt
    /// channel's SYNC (docs/PROTOCOL.md §8.5). 3: ENCRYPTED seals with
    /// AES-256-GCM (2 sealed with ChaCha20-Poly1305). The packet header
    /// keeps its version 2.
    public static let version: UInt32 = 4
    public static let size = 64
    /// The first bytes of every hello: magic and version. A destination
    /// reads these first, so a peer of another version hears why at once
    /// instead of both sides waiting for bytes the other never sends.
    public static let preambleSize = 8
    /// Bytes of each side's random nonce.
    public static let nonceSize = 32

    /// Hello flags; bits not named here are rejected.
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// Main channel: a live guest is migrated, its state follows at
        /// switchover (the destination must be able to store it).
        public static let guestState = Flags(rawValue: 1 << 0)
        /// The source holds a pre-shared key and will prove it; every frame
        /// and packet then carries a MAC instead of a checksum.
        public static let authenticated = Flags(rawValue: 1 << 1)
        /// Page payloads travel encrypted (AEAD). Needs `authenticated`.
        public static let encrypted = Flags(rawValue: 1 << 2)
        /// Main channel: the source may switch to postcopy (`send
        /// --postcopy`). A destination that cannot take it (no incoming
        /// guest attached, RAM not on tmpfs or hugetlbfs) refuses the hello
        /// with the reason, before any page moves.
        public static let postcopy = Flags(rawValue: 1 << 3)
        /// Main channel, with `postcopy`: this connection recovers a
        /// postcopy migration whose connections broke (docs/PROTOCOL.md
        /// §8.6). Only a destination in *postcopy-paused* takes it, and only
        /// a recovering source sends it.
        public static let recover = Flags(rawValue: 1 << 4)
        public static let known: Flags = [.guestState, .authenticated, .encrypted, .postcopy, .recover]
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
    /// The source's fresh random bytes for this connection.
    public var nonce: [UInt8]

    public init(
        session: SessionID, kind: Kind, channelID: UInt16, channelCount: UInt16, flags: Flags = [],
        compression: CompressionMethod = .none, nonce: [UInt8] = [UInt8](repeating: 0, count: ChannelHello.nonceSize)
    ) {
        precondition(nonce.count == Self.nonceSize, "a hello nonce is \(Self.nonceSize) bytes")
        self.session = session
        self.kind = kind
        self.channelID = channelID
        self.channelCount = channelCount
        self.flags = flags
        self.compression = compression
        self.nonce = nonce
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
        w.raw(nonce)
        return w.bytes
    }

    /// Checks the first 8 bytes (magic, version) of any hello.
    public static func checkPreamble(_ bytes: UnsafeRawBufferPointer) throws(WireError) {
        var r = ByteReader(bytes, message: "channel hello")
        try checkMagicAndVersion(&r, magic: Self.magic, name: "LMIG", what: "channel hello", peer: "source")
    }

    /// Decodes and checks a hello on its own terms (magic, version, kind,
    /// id < count). Whether it fits the session is the destination's check.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> ChannelHello {
        let what = "channel hello"
        var r = ByteReader(bytes, message: what)
        try checkMagicAndVersion(&r, magic: Self.magic, name: "LMIG", what: what, peer: "source")
        let session = SessionID(high: try r.u64("session"), low: try r.u64("session"))
        let rawKind = try r.u8("kind")
        guard let kind = Kind(rawValue: rawKind) else {
            throw WireError(
                message: what, field: "kind", value: "\(rawKind)", reason: "known kinds are 1 (main), 2 (multifd) and 3 (preempt)")
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
        if kind == .preempt, id != count {
            throw WireError(
                message: what, field: "channel-id", value: "\(id)",
                reason: "the preempt channel's id is the channel count \(count)")
        }
        let flags = Flags(rawValue: try r.u16("flags"))
        guard Flags.known.isSuperset(of: flags) else {
            throw WireError(
                message: what, field: "flags", value: hex(flags.rawValue),
                reason: "unknown bits \(hex(flags.rawValue & ~Flags.known.rawValue))")
        }
        if flags.contains(.encrypted), !flags.contains(.authenticated) {
            throw WireError(
                message: what, field: "flags", value: hex(flags.rawValue),
                reason: "ENCRYPTED needs AUTHENTICATED: encryption keys come from the pre-shared key")
        }
        if flags.contains(.recover), kind != .main || !flags.contains(.postcopy) {
            throw WireError(
                message: what, field: "flags", value: hex(flags.rawValue),
                reason: "RECOVER goes on a main channel with POSTCOPY: only a postcopy migration recovers")
        }
        let nonce = try r.raw(Self.nonceSize, "nonce")
        // Checked last so a peer learns of a bad magic or version first.
        guard let compression = CompressionMethod(rawValue: rawCompression) else {
            throw WireError(
                message: what, field: "compression", value: "\(rawCompression)",
                reason:
                    "unknown compression method; this livemig knows \(CompressionMethod.knownList): use matching livemig builds or send with --compress none"
            )
        }
        return ChannelHello(
            session: session, kind: kind, channelID: id, channelCount: count, flags: flags, compression: compression, nonce: nonce)
    }
}

/// The destination's answer to a hello (docs/PROTOCOL.md §2): its own nonce
/// and, when it holds a key, its proof of that key over the transcript.
///
/// Layout (80 bytes, big-endian): magic u32 "LMIR", version u32, flags u16,
/// reserved u16 (0), reserved u32 (0), destination nonce 32 bytes, proof 32
/// bytes (zero without a key).
public struct HelloChallenge: Equatable, Sendable {
    public static let magic: UInt32 = 0x4C4D_4952  // "LMIR"
    public static let size = 80
    /// Bytes of the challenge that its own proof covers (all but the proof).
    public static let unprovenSize = 48
    /// Bytes of every proof (HMAC-SHA-256).
    public static let proofSize = 32

    /// Challenge flags; bits not named here are rejected.
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        /// The destination holds a pre-shared key; `proof` proves it.
        public static let authenticated = Flags(rawValue: 1 << 0)
        public static let known: Flags = [.authenticated]
    }

    public var flags: Flags
    /// The destination's fresh random bytes for this connection.
    public var nonce: [UInt8]
    /// HMAC over the transcript with the key, or zeros without a key.
    public var proof: [UInt8]

    public init(flags: Flags, nonce: [UInt8], proof: [UInt8] = [UInt8](repeating: 0, count: HelloChallenge.proofSize)) {
        precondition(nonce.count == ChannelHello.nonceSize && proof.count == Self.proofSize)
        self.flags = flags
        self.nonce = nonce
        self.proof = proof
    }

    /// The first 48 bytes: what the destination's proof covers.
    public func encodedWithoutProof() -> [UInt8] {
        var w = ByteWriter(capacity: Self.size)
        w.u32(Self.magic)
        w.u32(ChannelHello.version)
        w.u16(flags.rawValue)
        w.u16(0)
        w.u32(0)
        w.raw(nonce)
        return w.bytes
    }

    public func encoded() -> [UInt8] { encodedWithoutProof() + proof }

    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(WireError) -> HelloChallenge {
        let what = "hello challenge"
        var r = ByteReader(bytes, message: what)
        try checkMagicAndVersion(&r, magic: Self.magic, name: "LMIR", what: what, peer: "destination")
        let flags = Flags(rawValue: try r.u16("flags"))
        guard Flags.known.isSuperset(of: flags) else {
            throw WireError(
                message: what, field: "flags", value: hex(flags.rawValue),
                reason: "unknown bits \(hex(flags.rawValue & ~Flags.known.rawValue))")
        }
        let reserved16 = try r.u16("reserved")
        let reserved32 = try r.u32("reserved")
        guard reserved16 == 0, reserved32 == 0 else {
            throw WireError(
                message: what, field: "reserved", value: reserved16 != 0 ? hex(reserved16) : hex(reserved32),
                reason: "must be 0; the peer is not a livemig destination of this version")
        }
        let nonce = try r.raw(ChannelHello.nonceSize, "nonce")
        let proof = try r.raw(Self.proofSize, "proof")
        return HelloChallenge(flags: flags, nonce: nonce, proof: proof)
    }
}

/// Reads magic and version, the two checks every hello and challenge starts with.
private func checkMagicAndVersion(
    _ r: inout ByteReader, magic expected: UInt32, name: String, what: String, peer: String
) throws(WireError) {
    let magic = try r.u32("magic")
    guard magic == expected else {
        throw WireError(
            message: what, field: "magic", value: hex(magic),
            reason: "expected \(hex(expected)) (\"\(name)\"); the peer is not a livemig \(peer)")
    }
    let version = try r.u32("version")
    guard version == ChannelHello.version else {
        throw WireError(
            message: what, field: "version", value: "\(version)",
            reason: "this livemig speaks version \(ChannelHello.version); use matching livemig builds on both sides")
    }
}
