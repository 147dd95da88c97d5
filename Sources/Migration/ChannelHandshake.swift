import MigrationWire
import Trust
import URing

/// What a migration trusts: the pre-shared key, if any, and whether page
/// payloads are encrypted (`--encrypt`, which needs a key).
public struct TrustSetting: Sendable {
    public var key: PreSharedKey?
    public var encrypt: Bool

    public init(key: PreSharedKey? = nil, encrypt: Bool = false) {
        precondition(!encrypt || key != nil, "encryption needs a pre-shared key")
        self.key = key
        self.encrypt = encrypt
    }

    /// No key: integrity checksums only.
    public static let none = TrustSetting()
}

/// The hello exchange every channel starts with (docs/PROTOCOL.md §2): the
/// source's hello, the destination's challenge, the source's proof. With a
/// pre-shared key both sides prove it before anything else is accepted,
/// and the channel's keys come out of the exchange; without one the same
/// three messages run with empty proofs, and frames and packets carry
/// checksums instead of MACs.
enum ChannelHandshake {
    /// Source side: says `hello` (its nonce included), checks the
    /// destination's challenge and proof, sends its own proof. Returns the
    /// channel's keys (nil without a key).
    static func open(_ socket: Socket, hello: ChannelHello, trust: TrustSetting, counters: TransferCounters) throws(MigrationError)
        -> ChannelKeys?
    {
        let helloBytes = hello.encoded()
        let what = hello.kind == .main ? "the main channel" : "multifd channel \(hello.channelID)"
        do {
            try socket.sendAll(helloBytes)
            counters.add(counters.mainBytes, UInt64(helloBytes.count))
            let raw = try receive(
                socket, HelloChallenge.size, what: "waiting for the destination's challenge on \(what)",
                ifClosed: MigrationError(
                    .peer,
                    "the destination closed \(what) instead of answering the hello; it refused it (see its error), or it speaks a protocol version other than \(ChannelHello.version)"
                ))
            counters.add(counters.mainBytes, UInt64(raw.count))
            let challenge = try raw.withUnsafeBytes { b throws(WireError) in try HelloChallenge.decode(b) }
            let destinationHasKey = challenge.flags.contains(.authenticated)
            guard let key = trust.key else {
                if destinationHasKey {
                    throw MigrationError(
                        .mismatch, "the destination requires a pre-shared key: pass --psk-file with the same key file the destination uses")
                }
                try socket.sendAll([UInt8](repeating: 0, count: HelloChallenge.proofSize))
                return nil
            }
            guard destinationHasKey else {
                // Never hand RAM to a peer that cannot prove the key: it may
                // be anyone listening on that address.
                throw MigrationError(
                    .mismatch,
                    "the destination has no pre-shared key, so it cannot prove who it is: start receive with --psk-file and the same key file"
                )
            }
            let expected = HelloProof.destination(key: key, hello: helloBytes, challenge: challenge.encodedWithoutProof())
            guard HelloProof.matches(expected, challenge.proof) else {
                throw MigrationError(
                    .mismatch,
                    "the destination's proof does not match our key on \(what): the two sides hold different keys (check --psk-file on both)"
                )
            }
            let proof = HelloProof.source(key: key, hello: helloBytes, challenge: raw)
            try socket.sendAll(proof)
            counters.add(counters.mainBytes, UInt64(proof.count))
            return ChannelKeys(key: key, hello: helloBytes, challenge: raw, sourceNonce: hello.nonce, destinationNonce: challenge.nonce)
        } catch {
            throw MigrationError(converting: error)
        }
    }

    /// Destination side, once `hello` (whose bytes are `helloBytes`) has been
    /// read and decoded: answers with a challenge and checks the source's
    /// proof. Returns the channel's keys (nil without a key). Nothing of the
    /// source is accepted before this returns.
    static func answer(_ socket: Socket, hello: ChannelHello, helloBytes: [UInt8], trust: TrustSetting, counters: TransferCounters)
        throws(MigrationError) -> ChannelKeys?
    {
        let nonce = randomBytes(ChannelHello.nonceSize)
        let sourceHasKey = hello.flags.contains(.authenticated)
        do {
            guard let key = trust.key else {
                let challenge = HelloChallenge(flags: [], nonce: nonce)
                try socket.sendAll(challenge.encoded())
                counters.add(counters.mainBytes, UInt64(HelloChallenge.size))
                if sourceHasKey {
                    throw MigrationError(
                        .mismatch,
                        "the source authenticates with a pre-shared key but this destination has none: start receive with --psk-file and the same key file"
                    )
                }
                let proof = try socket.receiveBytes(HelloChallenge.proofSize, what: "reading the source's proof")
                guard proof.allSatisfy({ $0 == 0 }) else {
                    throw MigrationError(
                        .protocolViolation, "the source sent a proof although neither side has a key (it must be 32 zero bytes)")
                }
                return nil
            }
            var challenge = HelloChallenge(flags: .authenticated, nonce: nonce)
            challenge.proof = HelloProof.destination(key: key, hello: helloBytes, challenge: challenge.encodedWithoutProof())
            let challengeBytes = challenge.encoded()
            try socket.sendAll(challengeBytes)
            counters.add(counters.mainBytes, UInt64(challengeBytes.count))
            guard sourceHasKey else {
                throw MigrationError(
                    .mismatch,
                    "the source has no pre-shared key, and this destination requires one: start send with --psk-file and the same key file")
            }
            let proof = try receive(
                socket, HelloChallenge.proofSize, what: "reading the source's proof",
                ifClosed: MigrationError(
                    .mismatch,
                    "the source closed the connection instead of proving the key: it holds another key (check --psk-file on both sides)"))
            counters.add(counters.mainBytes, UInt64(proof.count))
            guard HelloProof.matches(proof, HelloProof.source(key: key, hello: helloBytes, challenge: challengeBytes)) else {
                throw MigrationError(
                    .mismatch,
                    "the source's proof does not match this destination's key: the sides hold different keys (check --psk-file), or the hello was replayed"
                )
            }
            return ChannelKeys(key: key, hello: helloBytes, challenge: challengeBytes, sourceNonce: hello.nonce, destinationNonce: nonce)
        } catch {
            throw MigrationError(converting: error)
        }
    }

    /// Reads `count` bytes; a peer that closes instead gets `ifClosed`.
    private static func receive(_ socket: Socket, _ count: Int, what: String, ifClosed: MigrationError) throws(MigrationError) -> [UInt8] {
        do {
            return try socket.receiveBytes(count, what: what)
        } catch {
            throw error.code == .peerClosed ? ifClosed : MigrationError(error)
        }
    }
}
