import Crypto

/// The mutual challenge–response of every channel's hello
/// (docs/PROTOCOL.md §2).
///
/// The source sends its hello (with its nonce); the destination answers with
/// its nonce and `destination(…)`, an HMAC-SHA-256 under the pre-shared key
/// of both; the source checks it and answers with `source(…)`, an HMAC over
/// the whole transcript. Each proof covers the session id, the channel id
/// and kind (inside the hello) and both nonces, and the two use different
/// labels, so a proof cannot be replayed on another connection, another
/// channel or in the other direction. Nothing is accepted on a channel
/// before its proof has verified.
public enum HelloProof {
    static let destinationLabel = Array("livemig/2 destination proof".utf8)
    static let sourceLabel = Array("livemig/2 source proof".utf8)

    /// The destination's proof: over the hello and the challenge's first 48
    /// bytes (its flags and nonce).
    public static func destination(key: PreSharedKey, hello: [UInt8], challenge: [UInt8]) -> [UInt8] {
        mac(key, destinationLabel, hello, challenge)
    }

    /// The source's proof: over the hello and the whole challenge, including
    /// the destination's proof.
    public static func source(key: PreSharedKey, hello: [UInt8], challenge: [UInt8]) -> [UInt8] {
        mac(key, sourceLabel, hello, challenge)
    }

    /// Compares two proofs in constant time.
    public static func matches(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in a.indices { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    private static func mac(_ key: PreSharedKey, _ label: [UInt8], _ parts: [UInt8]...) -> [UInt8] {
        var h = HMAC<SHA256>(key: key.key)
        h.update(data: label)
        for p in parts { h.update(data: p) }
        return Array(h.finalize())
    }
}

/// The keys of one authenticated channel, derived from the pre-shared key
/// and the transcript of its hello (HKDF-SHA-256, salt = both nonces, info =
/// the hello and the challenge). Every channel has keys of its own, so a
/// packet number never repeats under one key and a packet cannot be moved
/// to another channel or session.
public struct ChannelKeys: Sendable {
    /// Source → destination: page packets and the source's frames.
    public let toDestination: SymmetricKey
    /// Destination → source: the destination's frames.
    public let toSource: SymmetricKey

    static let info = Array("livemig/2 channel keys".utf8)

    public init(key: PreSharedKey, hello: [UInt8], challenge: [UInt8], sourceNonce: [UInt8], destinationNonce: [UInt8]) {
        let material = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: key.key, salt: sourceNonce + destinationNonce, info: Self.info + hello + challenge, outputByteCount: 64)
        let bytes = material.withUnsafeBytes { Array($0) }
        toDestination = SymmetricKey(data: bytes[0..<32])
        toSource = SymmetricKey(data: bytes[32..<64])
    }
}

/// Fresh random bytes for nonces.
public func randomBytes(_ count: Int) -> [UInt8] {
    var g = SystemRandomNumberGenerator()
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &g) }
}
