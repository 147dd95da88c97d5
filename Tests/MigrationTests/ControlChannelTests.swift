import MigrationWire
import Testing
import Trust

@testable import Migration
@testable import URing

#if canImport(Glibc)
    import Glibc
#endif

/// The main channel over a socketpair: frames with their 16-byte tags go
/// through, and a frame that was corrupted, forged, replayed or reflected
/// is refused before it is decoded (docs/PROTOCOL.md §3).
@Suite("ControlChannel")
struct ControlChannelTests {
    static let keys = ChannelKeys(
        key: try! PreSharedKey(bytes: [UInt8](repeating: 0x5C, count: 32)), hello: [1, 2], challenge: [3, 4],
        sourceNonce: [UInt8](repeating: 5, count: 32), destinationNonce: [UInt8](repeating: 6, count: 32))

    static let messages: [MainMessage] = [
        .helloAccepted,
        .ramLayout([RAMBlockLayout(name: "pc.ram", size: 1 << 20, pageSize: 4096)]),
        .layoutAccepted,
        .endOfRound(round: 0),
        .endOfRound(round: 1),
        .guestState((0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 13) }),
        .complete(
            CompletionSummary(
                rounds: 2, normalPages: 3, zeroPages: 4, packets: 5, guestStateBytes: 10_000,
                pageDigest: (0..<16).map { UInt8($0) })),
        .completed,
        .error("stop"),
    ]

    /// A connected pair of Unix stream sockets.
    static func socketPair() -> (Socket, Socket) {
        var fds: [Int32] = [-1, -1]
        let rc = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        precondition(rc == 0, "socketpair: \(errno)")
        return (Socket(fd: fds[0], peer: "pair[0]"), Socket(fd: fds[1], peer: "pair[1]"))
    }

    /// A source and a destination channel connected to each other.
    static func channels(keys: ChannelKeys?) -> (source: ControlChannel, destination: ControlChannel) {
        let (a, b) = socketPair()
        return (ControlChannel(socket: a, keys: keys, isSource: true), ControlChannel(socket: b, keys: keys, isSource: false))
    }

    /// The bytes `send` puts on the wire for `messages`, in order, read raw
    /// from the other end.
    static func wireBytes(_ messages: [MainMessage], keys: ChannelKeys?, isSource: Bool = true) throws -> [[UInt8]] {
        let (a, b) = socketPair()
        let channel = ControlChannel(socket: a, keys: keys, isSource: isSource)
        return try messages.map { m in
            try channel.send(m)
            return try b.receiveBytes(m.encoded().count + MainMessage.frameTagSize, what: "test")
        }
    }

    /// Delivers raw `frames` to a fresh channel and returns what its
    /// receives give, in order (a thrown error ends the list).
    static func deliver(
        _ frames: [[UInt8]], keys: ChannelKeys?, isSource: Bool = false
    ) throws -> (received: [MainMessage], error: MigrationError?) {
        let (a, b) = socketPair()
        let channel = ControlChannel(socket: b, keys: keys, isSource: isSource)
        for f in frames { try a.sendAll(f) }
        var received: [MainMessage] = []
        for _ in frames {
            do {
                received.append(try channel.receive("test"))
            } catch {
                return (received, error)
            }
        }
        return (received, nil)
    }

    @Test("messages arrive in order, both ways", arguments: [false, true])
    func roundTrip(keyed: Bool) throws {
        let (source, destination) = Self.channels(keys: keyed ? Self.keys : nil)
        for m in Self.messages { try source.send(m) }
        for m in Self.messages { #expect(try destination.receive("test") == m) }
        for m in Self.messages.reversed() { try destination.send(m) }
        for m in Self.messages.reversed() { #expect(try source.receive("test") == m) }
    }

    @Test("without a key, each frame is followed by XXH3-128 of its sequence number and the frame")
    func checksumTagLayout() throws {
        let frames = try Self.wireBytes(Self.messages, keys: nil)
        for (seq, (m, wire)) in zip(Self.messages, frames).enumerated() {
            let frame = m.encoded()
            #expect(Array(wire[..<frame.count]) == frame, "\(m.name): the frame goes as encoded")
            let expected = (be(UInt64(seq)) + frame).withUnsafeBytes { ContentHash.digest($0) }
            #expect(Array(wire[frame.count...]) == expected, "\(m.name): tag of frame \(seq)")
        }
        // With a key the tag is another (a MAC), and the frame is the same.
        let keyed = try Self.wireBytes(Self.messages, keys: Self.keys)
        for (plain, mac) in zip(frames, keyed) {
            #expect(plain.dropLast(16) == mac.dropLast(16))
            #expect(plain.suffix(16) != mac.suffix(16))
        }
    }

    @Test("one flipped bit anywhere in a frame or its tag is refused before decoding", arguments: [false, true])
    func corruptionIsRefused(keyed: Bool) throws {
        let keys = keyed ? Self.keys : nil
        let frames = try Self.wireBytes([.endOfRound(round: 7), .endOfRound(round: 8)], keys: keys)
        #expect(try Self.deliver(frames, keys: keys).received == [.endOfRound(round: 7), .endOfRound(round: 8)])
        // Every byte of the payload and the tag (the header's type and
        // length would make another frame, checked by the wire format).
        for byte in MainMessage.frameHeaderSize..<frames[1].count {
            var bad = frames
            bad[1][byte] ^= 0x04
            let (received, error) = try Self.deliver(bad, keys: keys)
            #expect(received == [.endOfRound(round: 7)])
            #expect(error?.kind == .integrity, "byte \(byte): \(String(describing: error))")
            let words = keyed ? "frame 1 (end-of-round) fails its MAC" : "frame 1 (end-of-round) fails its checksum"
            #expect(error?.description.contains(words) == true, "\(String(describing: error))")
        }
    }

    @Test("a replayed, dropped or reordered frame fails its tag", arguments: [false, true])
    func sequenceIsBound(keyed: Bool) throws {
        let keys = keyed ? Self.keys : nil
        let f = try Self.wireBytes([.endOfRound(round: 1), .endOfRound(round: 2), .endOfRound(round: 3)], keys: keys)
        for (frames, good) in [([f[0], f[0]], 1), ([f[0], f[2]], 1), ([f[1], f[0]], 0)] {
            let (received, error) = try Self.deliver(frames, keys: keys)
            #expect(received.count == good)
            #expect(error?.kind == .integrity, "\(String(describing: error))")
        }
    }

    @Test("a MAC needs the key: a forged, keyless or reflected frame is refused")
    func macNeedsTheKey() throws {
        let message = MainMessage.endOfRound(round: 1)
        // Forged without the key (a checksum tag), sent to a keyed channel.
        let keyless = try Self.wireBytes([message], keys: nil)
        #expect(try Self.deliver(keyless, keys: Self.keys).error?.kind == .integrity)
        // A keyed frame to a channel without a key.
        let keyed = try Self.wireBytes([message], keys: Self.keys)
        #expect(try Self.deliver(keyed, keys: nil).error?.kind == .integrity)
        // Another key.
        let other = ChannelKeys(
            key: try PreSharedKey(bytes: [UInt8](repeating: 0x5D, count: 32)), hello: [1, 2], challenge: [3, 4],
            sourceNonce: [UInt8](repeating: 5, count: 32), destinationNonce: [UInt8](repeating: 6, count: 32))
        #expect(try Self.deliver(keyed, keys: other).error?.kind == .integrity)
        // The source's own frame sent back to it: each direction has its key.
        #expect(try Self.deliver(keyed, keys: Self.keys, isSource: true).error?.kind == .integrity)
        #expect(try Self.deliver(keyed, keys: Self.keys, isSource: false).received == [message])
    }
}

/// Big-endian bytes of `v`.
private func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    withUnsafeBytes(of: v.bigEndian) { Array($0) }
}
