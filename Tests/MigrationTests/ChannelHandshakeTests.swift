import Dispatch
import MigrationWire
import Synchronization
import Testing
import Trust

@testable import Migration
@testable import URing

/// The hello, challenge and proof of every channel, both ends for real
/// over a socketpair: with the same key both sides derive the same keys;
/// a missing or different key fails both sides, each naming what to do.
@Suite("ChannelHandshake")
struct ChannelHandshakeTests {
    static let key = try! PreSharedKey(bytes: [UInt8](repeating: 0x11, count: 32))
    static let otherKey = try! PreSharedKey(bytes: [UInt8](repeating: 0x12, count: 32))

    struct Outcome {
        var source: Result<ChannelKeys?, MigrationError>
        var destination: Result<ChannelKeys?, MigrationError>
        var sourceCounters: TransferCounters
    }

    /// Runs `open` (on another thread) against `answer` (on this one). Each
    /// side shuts its socket when it is done, as a failing side does by
    /// closing, so the other never waits forever.
    static func handshake(source: TrustSetting, destination: TrustSetting, kind: ChannelHello.Kind = .main) throws -> Outcome {
        let (a, b) = ControlChannelTests.socketPair()
        var flags: ChannelHello.Flags = []
        if source.key != nil { flags.insert(.authenticated) }
        if source.encrypt { flags.insert(.encrypted) }
        let hello = ChannelHello(
            session: .random(), kind: kind, channelID: kind == .main ? 0 : 1, channelCount: 2, flags: flags,
            nonce: randomBytes(ChannelHello.nonceSize))
        let counters = TransferCounters()
        let sourceResult = Mutex<Result<ChannelKeys?, MigrationError>?>(nil)
        let done = DispatchSemaphore(value: 0)
        DispatchQueue.global().async {
            let r = Result { () throws(MigrationError) in try ChannelHandshake.open(a, hello: hello, trust: source, counters: counters) }
            a.shutdown()
            sourceResult.withLock { $0 = r }
            done.signal()
        }
        let destinationResult: Result<ChannelKeys?, MigrationError>
        do {
            let bytes = try b.receiveBytes(ChannelHello.size, what: "test hello")
            let decoded = try bytes.withUnsafeBytes { try ChannelHello.decode($0) }
            #expect(decoded == hello)
            destinationResult = Result { () throws(MigrationError) in
                try ChannelHandshake.answer(b, hello: decoded, helloBytes: bytes, trust: destination, counters: TransferCounters())
            }
        }
        b.shutdown()
        #expect(done.wait(timeout: .now() + 30) == .success, "the source side ends")
        let s = try #require(sourceResult.withLock { $0 })
        return Outcome(source: s, destination: destinationResult, sourceCounters: counters)
    }

    static func failure(_ r: Result<ChannelKeys?, MigrationError>) -> MigrationError? {
        if case .failure(let e) = r { return e }
        return nil
    }

    @Test func withoutKeysBothSidesGoOnWithoutKeys() throws {
        let out = try Self.handshake(source: .none, destination: .none)
        #expect(try out.source.get() == nil)
        #expect(try out.destination.get() == nil)
        #expect(out.sourceCounters.read(out.sourceCounters.mainBytes) >= UInt64(ChannelHello.size + HelloChallenge.size))
    }

    @Test("with the same key both sides derive the same channel keys", arguments: [ChannelHello.Kind.main, .multifd])
    func sameKeyGivesTheSameChannelKeys(kind: ChannelHello.Kind) throws {
        for encrypt in [false, true] {
            let trust = TrustSetting(key: Self.key, encrypt: encrypt)
            let out = try Self.handshake(source: trust, destination: TrustSetting(key: Self.key), kind: kind)
            let s = try #require(try out.source.get()), d = try #require(try out.destination.get())
            // A packet the source seals opens at the destination, and frames
            // go through both ways.
            let bytes = [UInt8](repeating: 0x77, count: 100)
            let tag = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
            defer { tag.deallocate() }
            try bytes.withUnsafeBytes {
                try PacketSealer(key: s.toDestination, encrypts: false).authenticate($0, packetNumber: 3, into: tag.baseAddress!)
            }
            let verifies = bytes.withUnsafeBytes {
                PacketSealer(key: d.toDestination, encrypts: false).verify($0, packetNumber: 3, tag: UnsafeRawBufferPointer(tag))
            }
            #expect(verifies)
            let (x, y) = ControlChannelTests.socketPair()
            let source = ControlChannel(socket: x, keys: s, isSource: true)
            let destination = ControlChannel(socket: y, keys: d, isSource: false)
            try source.send(.endOfRound(round: 4))
            #expect(try destination.receive("test") == .endOfRound(round: 4))
            try destination.send(.completed)
            #expect(try source.receive("test") == .completed)
        }
    }

    @Test func eachHandshakeDerivesFreshKeys() throws {
        let trust = TrustSetting(key: Self.key)
        let one = try #require(try Self.handshake(source: trust, destination: trust).source.get())
        let two = try #require(try Self.handshake(source: trust, destination: trust).source.get())
        // A tag from one channel does not verify on the other (nonces differ).
        let bytes = [UInt8](repeating: 1, count: 64)
        let tag = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
        defer { tag.deallocate() }
        try bytes.withUnsafeBytes {
            try PacketSealer(key: one.toDestination, encrypts: false).authenticate($0, packetNumber: 0, into: tag.baseAddress!)
        }
        let verifies = bytes.withUnsafeBytes {
            PacketSealer(key: two.toDestination, encrypts: false).verify($0, packetNumber: 0, tag: UnsafeRawBufferPointer(tag))
        }
        #expect(!verifies)
    }

    @Test func differentKeysFailBothSides() throws {
        let out = try Self.handshake(source: TrustSetting(key: Self.key), destination: TrustSetting(key: Self.otherKey))
        let s = Self.failure(out.source), d = Self.failure(out.destination)
        #expect(
            s?.kind == .mismatch && s?.description.contains("destination's proof does not match our key") == true,
            "\(String(describing: s))")
        #expect(d?.kind == .mismatch, "\(String(describing: d))")
        #expect(d?.description.contains("check --psk-file") == true, "\(String(describing: d))")
    }

    @Test("the destination checks the source's proof: another key's, or one for another challenge, is refused")
    func destinationChecksTheSourcesProof() throws {
        for replay in [false, true] {
            let (a, b) = ControlChannelTests.socketPair()
            let hello = ChannelHello(
                session: .random(), kind: .main, channelID: 0, channelCount: 1, flags: .authenticated,
                nonce: randomBytes(ChannelHello.nonceSize))
            let helloBytes = hello.encoded()
            // A source that proves with another key, or replays a proof made
            // for another challenge (another destination nonce) with the right key.
            DispatchQueue.global().async {
                _ = try? a.sendAll(helloBytes)
                guard let challenge = try? a.receiveBytes(HelloChallenge.size, what: "test challenge") else { return }
                var other = challenge
                other[20] ^= 1
                let proof =
                    replay
                    ? HelloProof.source(key: Self.key, hello: helloBytes, challenge: other)
                    : HelloProof.source(key: Self.otherKey, hello: helloBytes, challenge: challenge)
                _ = try? a.sendAll(proof)
            }
            let e = #expect(throws: MigrationError.self) {
                try ChannelHandshake.answer(
                    b, hello: hello, helloBytes: helloBytes, trust: TrustSetting(key: Self.key), counters: TransferCounters())
            }
            #expect(e?.kind == .mismatch)
            #expect(e?.description.contains("the source's proof does not match") == true, "\(String(describing: e))")
            a.shutdown()
        }
    }

    @Test func aKeyOnOneSideOnlyFailsBothSides() throws {
        let sourceOnly = try Self.handshake(source: TrustSetting(key: Self.key), destination: .none)
        let s1 = Self.failure(sourceOnly.source), d1 = Self.failure(sourceOnly.destination)
        #expect(s1?.description.contains("the destination has no pre-shared key") == true, "\(String(describing: s1))")
        #expect(d1?.description.contains("this destination has none") == true, "\(String(describing: d1))")

        let destinationOnly = try Self.handshake(source: .none, destination: TrustSetting(key: Self.key))
        let s2 = Self.failure(destinationOnly.source), d2 = Self.failure(destinationOnly.destination)
        #expect(s2?.description.contains("the destination requires a pre-shared key") == true, "\(String(describing: s2))")
        #expect(d2?.description.contains("the source has no pre-shared key") == true, "\(String(describing: d2))")
        for e in [s1, d1, s2, d2] { #expect(e?.kind == .mismatch, "\(String(describing: e))") }
    }
}
