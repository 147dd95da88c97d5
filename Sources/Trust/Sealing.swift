import Crypto

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Tags main-channel frames (docs/PROTOCOL.md §3): 16 bytes after each
/// frame, over an implicit per-direction sequence number and the frame.
/// Without a key the tag is an XXH3-128 checksum (corruption); with a key it
/// is HMAC-SHA-256 cut to 16 bytes (tampering, replay, reordering and
/// dropped frames: the sequence number is not sent, so any of them makes
/// the next tag fail). One sealer per direction; not thread-safe.
public struct FrameSealer: Sendable {
    private let key: SymmetricKey?
    /// Frames tagged so far in this direction.
    public private(set) var sequence: UInt64 = 0

    public init(key: SymmetricKey?) { self.key = key }

    /// Whether the tags are MACs (a key is in use).
    public var authenticated: Bool { key != nil }

    /// The tag of the next frame, and the sequence moves on.
    public mutating func tag(_ frame: UnsafeRawBufferPointer) -> [UInt8] {
        defer { sequence += 1 }
        var seq = sequence.bigEndian
        let seqBytes = withUnsafeBytes(of: &seq) { Array($0) }
        if let key {
            var h = HMAC<SHA256>(key: key)
            h.update(data: seqBytes)
            h.update(data: frame)
            return Array(Array(h.finalize()).prefix(16))
        }
        var joined = seqBytes
        joined.append(contentsOf: frame)
        return joined.withUnsafeBytes { ContentHash.digest($0) }
    }
}

/// Authenticates (and with `encrypt`, encrypts) the page packets of one
/// channel, source → destination (docs/PROTOCOL.md §4).
///
/// - Authenticated: a GMAC (AES-256-GCM with an empty message) over the
///   packet's header, entries and payload, which must lie contiguous in
///   memory. GMAC runs at about 18 GB/s here.
/// - Encrypted: AES-256-GCM seals the payload, with the header and
///   entries as associated data. Measured with swift-crypto on this
///   project's machines (512 KiB packets, warm allocator): seal 8.2 GB/s
///   and open 10.9 GB/s, against ChaCha20-Poly1305's 0.56 and 2.7 GB/s
///   (which `--encrypt` used until protocol 3). The AES instructions
///   (AES-NI, VAES) are what make the difference; a machine without them
///   would favour ChaCha20. An earlier note put AES-GCM at 1.0 GB/s: that
///   figure was the first pass, where every sealed box's fresh 512 KiB
///   output was an mmap of its own (glibc's dynamic threshold adapts after
///   the first free, and `lm_keep_freed_memory` keeps it so).
///
/// The nonce is the packet number: the channel's key is its own (see
/// `ChannelKeys`), so no nonce repeats under a key, and a replayed, dropped
/// or reordered packet fails its tag as well as the number check.
public struct PacketSealer: @unchecked Sendable {
    // @unchecked: SymmetricKey is immutable; one sealer per channel thread.
    private let key: SymmetricKey
    public let encrypts: Bool
    public static let tagSize = 16

    public init(key: SymmetricKey, encrypts: Bool) {
        self.key = key
        self.encrypts = encrypts
    }

    static func nonceBytes(_ packetNumber: UInt64) -> [UInt8] {
        var n = [UInt8](repeating: 0, count: 12)
        for i in 0..<8 { n[4 + i] = UInt8(truncatingIfNeeded: packetNumber >> (56 - 8 * UInt64(i))) }
        return n
    }

    /// The GMAC tag of `bytes` (header, entries, payload), into `out` (16 bytes).
    public func authenticate(_ bytes: UnsafeRawBufferPointer, packetNumber: UInt64, into out: UnsafeMutableRawPointer) throws(TrustError) {
        do {
            let nonce = try AES.GCM.Nonce(data: Self.nonceBytes(packetNumber))
            let box = try AES.GCM.seal(UnsafeRawBufferPointer(start: nil, count: 0), using: key, nonce: nonce, authenticating: bytes)
            box.tag.withUnsafeBytes { out.copyMemory(from: $0.baseAddress!, byteCount: Self.tagSize) }
        } catch {
            throw TrustError("cannot compute a packet MAC: \(error)")
        }
    }

    /// Whether `tag` is the GMAC of `bytes`.
    public func verify(_ bytes: UnsafeRawBufferPointer, packetNumber: UInt64, tag: UnsafeRawBufferPointer) -> Bool {
        let expected = UnsafeMutableRawPointer.allocate(byteCount: Self.tagSize, alignment: 16)
        defer { expected.deallocate() }
        guard (try? authenticate(bytes, packetNumber: packetNumber, into: expected)) != nil else { return false }
        var diff: UInt8 = 0
        for i in 0..<Self.tagSize { diff |= expected.load(fromByteOffset: i, as: UInt8.self) ^ tag[i] }
        return diff == 0
    }

    /// Encrypts `payload`; returns the ciphertext (same size) and the tag.
    public func seal(_ payload: UnsafeRawBufferPointer, prefix: UnsafeRawBufferPointer, packetNumber: UInt64) throws(TrustError) -> (
        ciphertext: Data, tag: Data
    ) {
        do {
            let nonce = try AES.GCM.Nonce(data: Self.nonceBytes(packetNumber))
            let box = try AES.GCM.seal(payload, using: key, nonce: nonce, authenticating: prefix)
            return (box.ciphertext, box.tag)
        } catch {
            throw TrustError("cannot encrypt a packet: \(error)")
        }
    }

    /// Bytes `open` writes just before the ciphertext (AES-GCM's nonce).
    public static let nonceRoom = 12

    /// Decrypts and authenticates the `count` bytes of ciphertext at
    /// `ciphertext`, whose 16-byte tag follows them; returns the plaintext,
    /// or nil when the tag does not verify. The `nonceRoom` bytes before
    /// `ciphertext` are overwritten (with the nonce), and `prefix` must not
    /// lie in them.
    ///
    /// Why: swift-crypto opens a `SealedBox`, which holds nonce, ciphertext
    /// and tag in one `Data`. Built from separate pieces it copies them all
    /// into a new one; built from a `Data` that wraps them where they lie
    /// (`bytesNoCopy`), nothing is copied but the decryption's output.
    /// That was two copies of every 512 KiB packet before.
    public func open(
        ciphertext: UnsafeMutableRawPointer, count: Int, prefix: UnsafeRawBufferPointer, packetNumber: UInt64
    ) -> Data? {
        let start = ciphertext - Self.nonceRoom
        Self.nonceBytes(packetNumber).withUnsafeBytes { start.copyMemory(from: $0.baseAddress!, byteCount: Self.nonceRoom) }
        let combined = Data(bytesNoCopy: start, count: Self.nonceRoom + count + Self.tagSize, deallocator: .none)
        guard let box = try? AES.GCM.SealedBox(combined: combined) else { return nil }
        return try? AES.GCM.open(box, using: key, authenticating: prefix)
    }
}
