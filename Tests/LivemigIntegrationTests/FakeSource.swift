import Foundation
import MigrationWire
import Testing
import Trust
import URing

/// The test side of protocol 2: a channel that ran the hello exchange as a
/// source (with or without a key) and frames main messages with their tags.
final class SourceChannel {
    let socket: Socket
    let keys: ChannelKeys?
    private var outgoing: FrameSealer
    private var incoming: FrameSealer

    /// Connects (retrying a refused connection for `connectTimeout`
    /// seconds), says `hello` (whose nonce is filled in here), answers the
    /// destination's challenge. Throws when the destination refuses.
    init(to addr: SocketAddress, hello: ChannelHello, key: PreSharedKey? = nil, connectTimeout: Double = 5) throws {
        socket = try Socket.connect(to: addr, timeout: connectTimeout)
        socket.setReceiveTimeout(15)
        var hello = hello
        hello.nonce = randomBytes(ChannelHello.nonceSize)
        if key != nil { hello.flags.insert(.authenticated) }
        let helloBytes = hello.encoded()
        try socket.sendAll(helloBytes)
        let raw = try socket.receiveBytes(HelloChallenge.size, what: "test: challenge")
        let challenge = try raw.withUnsafeBytes { try HelloChallenge.decode($0) }
        if let key {
            try socket.sendAll(HelloProof.source(key: key, hello: helloBytes, challenge: raw))
            keys = ChannelKeys(key: key, hello: helloBytes, challenge: raw, sourceNonce: hello.nonce, destinationNonce: challenge.nonce)
        } else {
            try socket.sendAll([UInt8](repeating: 0, count: HelloChallenge.proofSize))
            keys = nil
        }
        outgoing = FrameSealer(key: keys?.toDestination)
        incoming = FrameSealer(key: keys?.toSource)
    }

    /// A main message as it goes on the wire: frame and tag.
    func frame(_ m: MainMessage) -> [UInt8] {
        var bytes = m.encoded()
        bytes += bytes.withUnsafeBytes { outgoing.tag($0) }
        return bytes
    }

    func send(_ m: MainMessage) throws { try socket.sendAll(frame(m)) }

    /// The next main message; its tag must verify.
    func next() throws -> MainMessage {
        let head = try socket.receiveBytes(MainMessage.frameHeaderSize, what: "test")
        let f = try head.withUnsafeBytes { try MainMessage.decodeFrameHeader($0) }
        let rest = try socket.receiveBytes(f.length + MainMessage.frameTagSize, what: "test")
        let whole = head + rest[..<f.length]
        let tag = whole.withUnsafeBytes { incoming.tag($0) }
        #expect(Array(rest[f.length...]) == tag, "the destination's frame tag does not verify")
        return try rest.withUnsafeBytes { try MainMessage.decode(type: f.type, payload: UnsafeRawBufferPointer(rebasing: $0[..<f.length])) }
    }

    /// After `complete`: reads the destination's answer and, when it is
    /// `completed` (prepared), commits and returns the reply to that
    /// (`committed`); otherwise returns what came (an error), or nil.
    func commitSwitchover() -> MainMessage? {
        guard let reply = try? next() else { return nil }
        guard reply == .completed else { return reply }
        guard (try? send(.commit)) != nil else { return nil }
        return try? next()
    }

    /// The packet sealer of a multifd channel (with a key).
    func sealer(encrypts: Bool = false) -> PacketSealer? { keys.map { PacketSealer(key: $0.toDestination, encrypts: encrypts) } }
}

/// Builds protocol-2 packets the way a source does, with hooks to break them.
enum TestPacket {
    static let zeroHash = ContentHash.zeroPage(4096)

    /// Header, entries and `data`. Entry i carries `hashes[i]` when given,
    /// else the hash of page i of `data` (normal pages), or the zero page's
    /// hash (zero pages). The prefix check is correct unless `check` is
    /// given. With `sealer`, the GMAC tag follows.
    static func make(
        normal: UInt32, zero: UInt32, payload: UInt32? = nil, number: UInt64 = 0, offsets: [UInt64],
        flags: MultiFDPacketHeader.Flags = [], data: [UInt8] = [], hashes: [UInt64]? = nil, check: UInt64? = nil,
        sealer: PacketSealer? = nil
    ) -> [UInt8] {
        let payloadSize = payload ?? UInt32(data.count)
        let header = MultiFDPacketHeader(
            flags: flags, normalCount: normal, zeroCount: zero, payloadSize: payloadSize, packetNumber: number, blockID: 0)
        var buf = [UInt8](repeating: 0, count: MultiFDPacketHeader.size + offsets.count * MultiFDPacketHeader.entrySize)
        buf.withUnsafeMutableBytes { b in
            header.encode(to: b.baseAddress!)
            for (i, o) in offsets.enumerated() {
                let hash: UInt64
                if let hashes {
                    hash = hashes[i]
                } else if i < Int(normal), !flags.contains(.compressed), data.count >= (i + 1) * 4096 {
                    hash = data.withUnsafeBytes { ContentHash.page($0.baseAddress! + i * 4096, length: 4096) }
                } else {
                    hash = i < Int(normal) ? 0 : zeroHash
                }
                MultiFDPacketHeader.encodeEntry(offset: o, hash: hash, index: i, to: b.baseAddress!)
            }
            MultiFDPacketHeader.storeCheck(0, to: b.baseAddress!)
            MultiFDPacketHeader.storeCheck(check ?? ContentHash.page(b.baseAddress!, length: b.count), to: b.baseAddress!)
        }
        var packet = buf + data
        if let sealer {
            var tag = [UInt8](repeating: 0, count: PacketSealer.tagSize)
            packet.withUnsafeBytes { p in
                tag.withUnsafeMutableBytes { t in try! sealer.authenticate(p, packetNumber: number, into: t.baseAddress!) }
            }
            packet += tag
        }
        return packet
    }

    /// A SYNC packet.
    static func sync(number: UInt64, sealer: PacketSealer? = nil) -> [UInt8] {
        make(normal: 0, zero: 0, number: number, offsets: [], flags: .sync, sealer: sealer)
    }

    /// Hashes of `pages` decoded pages (for compressed packets).
    static func hashes(of pages: [UInt8]) -> [UInt64] {
        stride(from: 0, to: pages.count, by: 4096).map { o in pages.withUnsafeBytes { ContentHash.page($0.baseAddress! + o, length: 4096) }
        }
    }
}

/// A `complete` summary whose page digest is that of `hashes`, the content
/// hash of every page of the block in page order (docs/PROTOCOL.md §6).
func summary(rounds: UInt64, normal: UInt64, zero: UInt64, packets: UInt64, hashes: [UInt64], guestStateBytes: UInt64 = 0)
    -> CompletionSummary
{
    let le = hashes.map(\.littleEndian)
    let digest = le.withUnsafeBytes { ContentHash.digest($0) }
    return CompletionSummary(
        rounds: rounds, normalPages: normal, zeroPages: zero, packets: packets, guestStateBytes: guestStateBytes, pageDigest: digest)
}
