import Crypto
import Foundation
import Testing

@testable import Trust

@Suite("Trust")
struct TrustTests {
    static let key = try! PreSharedKey(bytes: [UInt8](repeating: 7, count: 32))
    static let otherKey = try! PreSharedKey(bytes: [UInt8](repeating: 8, count: 32))

    func scratchPath(_ name: String) -> String {
        NSTemporaryDirectory() + "livemig-trust-\(UUID().uuidString)-\(name)"
    }

    @Test func keygenWritesAPrivateKeyThatLoads() throws {
        let path = scratchPath("k")
        defer { unlink(path) }
        try PreSharedKey.generate(path: path)
        var st = stat()
        #expect(stat(path, &st) == 0)
        #expect(st.st_mode & 0o777 == 0o600)
        let text = try String(contentsOfFile: path, encoding: .utf8)
        #expect(text.count == 65 && text.hasSuffix("\n"))
        _ = try PreSharedKey.load(path: path)
        // Never overwrites a key.
        #expect(throws: TrustError.self) { try PreSharedKey.generate(path: path) }
    }

    @Test func keyFilesThatAreNotKeysAreRefused() throws {
        let path = scratchPath("bad")
        defer { unlink(path) }
        for (content, mode, words) in [
            ("abcd\n", 0o600, "at least 32 bytes"),
            (String(repeating: "zz", count: 32), 0o600, "hexadecimal"),
            (String(repeating: "ab", count: 32), 0o644, "chmod 600"),
        ] {
            unlink(path)
            try content.write(toFile: path, atomically: false, encoding: .utf8)
            chmod(path, mode_t(mode))
            let error = #expect(throws: TrustError.self) { try PreSharedKey.load(path: path) }
            #expect(error?.description.contains(words) == true, "\(String(describing: error))")
        }
        #expect(throws: TrustError.self) { try PreSharedKey.load(path: "/nonexistent/key") }
    }

    @Test func proofsBindTheTranscriptAndTheDirection() {
        let hello = [UInt8](repeating: 1, count: 64), challenge = [UInt8](repeating: 2, count: 48)
        let d = HelloProof.destination(key: Self.key, hello: hello, challenge: challenge)
        #expect(HelloProof.matches(d, HelloProof.destination(key: Self.key, hello: hello, challenge: challenge)))
        #expect(!HelloProof.matches(d, HelloProof.destination(key: Self.otherKey, hello: hello, challenge: challenge)))
        #expect(!HelloProof.matches(d, HelloProof.source(key: Self.key, hello: hello, challenge: challenge)))
        var other = hello
        other[30] ^= 1
        #expect(!HelloProof.matches(d, HelloProof.destination(key: Self.key, hello: other, challenge: challenge)))
    }

    @Test func frameTagsDependOnTheSequence() {
        for key in [nil, ChannelKeys(key: Self.key, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4]).toDestination] {
            var a = FrameSealer(key: key), b = FrameSealer(key: key)
            let frame: [UInt8] = [0, 4, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]
            let t0 = frame.withUnsafeBytes { a.tag($0) }
            #expect(t0 == frame.withUnsafeBytes { b.tag($0) })
            // The same frame again (a replay) gets another tag.
            #expect(t0 != frame.withUnsafeBytes { a.tag($0) })
            #expect(t0.count == 16)
        }
    }

    @Test func packetMACsCatchAnyChange() throws {
        let keys = ChannelKeys(key: Self.key, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4])
        let sealer = PacketSealer(key: keys.toDestination, encrypts: false)
        var bytes = [UInt8](repeating: 0x5A, count: 8192)
        let tag = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
        defer { tag.deallocate() }
        try bytes.withUnsafeBytes { try sealer.authenticate($0, packetNumber: 9, into: tag.baseAddress!) }
        #expect(bytes.withUnsafeBytes { sealer.verify($0, packetNumber: 9, tag: UnsafeRawBufferPointer(tag)) })
        #expect(!bytes.withUnsafeBytes { sealer.verify($0, packetNumber: 10, tag: UnsafeRawBufferPointer(tag)) })
        bytes[4000] ^= 0x10
        #expect(!bytes.withUnsafeBytes { sealer.verify($0, packetNumber: 9, tag: UnsafeRawBufferPointer(tag)) })
        let other = ChannelKeys(key: Self.otherKey, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4])
        bytes[4000] ^= 0x10
        #expect(
            !bytes.withUnsafeBytes {
                PacketSealer(key: other.toDestination, encrypts: false).verify($0, packetNumber: 9, tag: UnsafeRawBufferPointer(tag))
            })
    }

    @Test func encryptedPacketsRoundTripAndRefuseTampering() throws {
        let keys = ChannelKeys(key: Self.key, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4])
        let sealer = PacketSealer(key: keys.toDestination, encrypts: true)
        let payload = [UInt8]((0..<4096).map { UInt8(truncatingIfNeeded: $0) }), prefix = [UInt8](repeating: 3, count: 64)
        let (ct, tag) = try payload.withUnsafeBytes { p in try prefix.withUnsafeBytes { try sealer.seal(p, prefix: $0, packetNumber: 1) } }
        #expect(Array(ct) != payload)
        // As a receiver holds it: room for the nonce, ciphertext, tag.
        func open(_ prefix: [UInt8], tag: Data, number: UInt64 = 1) -> [UInt8]? {
            var wire = [UInt8](repeating: 0xEE, count: PacketSealer.nonceRoom) + Array(ct) + Array(tag)
            return wire.withUnsafeMutableBytes { w in
                prefix.withUnsafeBytes {
                    sealer.open(
                        ciphertext: w.baseAddress! + PacketSealer.nonceRoom, count: ct.count, prefix: $0, packetNumber: number)
                }
            }.map(Array.init)
        }
        #expect(open(prefix, tag: tag) == payload)
        var badPrefix = prefix
        badPrefix[0] ^= 1
        #expect(open(badPrefix, tag: tag) == nil)
        #expect(open(prefix, tag: tag, number: 2) == nil, "another packet number is another nonce")
        var badTag = Array(tag)
        badTag[15] ^= 0x80
        #expect(open(prefix, tag: Data(badTag)) == nil)
    }

    /// The wire says AES-256-GCM with the packet number as the nonce
    /// (docs/PROTOCOL.md §4): a plain swift-crypto AES.GCM opener with that
    /// key and nonce must read what the sealer wrote, and a ChaCha20-Poly1305
    /// one (protocol 2) must not.
    @Test func encryptionIsAES256GCMWithThePacketNumberAsNonce() throws {
        let keys = ChannelKeys(key: Self.key, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4])
        let sealer = PacketSealer(key: keys.toDestination, encrypts: true)
        let payload = [UInt8]((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31) }), prefix = [UInt8](repeating: 5, count: 48)
        let number: UInt64 = 0x0102_0304_0506_0708
        let (ct, tag) = try payload.withUnsafeBytes { p in
            try prefix.withUnsafeBytes { try sealer.seal(p, prefix: $0, packetNumber: number) }
        }
        let nonce: [UInt8] = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        let box = try AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: nonce), ciphertext: ct, tag: tag)
        #expect(try Array(AES.GCM.open(box, using: keys.toDestination, authenticating: prefix)) == payload)
        let chacha = try ChaChaPoly.SealedBox(nonce: ChaChaPoly.Nonce(data: nonce), ciphertext: ct, tag: tag)
        #expect(throws: (any Error).self) { try ChaChaPoly.open(chacha, using: keys.toDestination, authenticating: prefix) }
    }

    /// The receiver's one-pass placement must give libxxhash's XXH3-64 of
    /// every page, bit for bit, and copy every byte: on the fused path
    /// (64-byte aligned destination, when the CPU has AVX-512) and on the
    /// fallback (a destination that is not 64-byte aligned), for several
    /// page sizes (XXH3 takes 16 stripes per block, so 4 KiB is 3 blocks
    /// and a partial one) and from a source that is not cache-line aligned.
    /// Sizes: no whole block (256, 320, 1024), a block and a stripe (1088),
    /// 4 KiB (three blocks and 15 stripes), 4 KiB and a stripe (4160), and
    /// larger pages.
    @Test(arguments: [256, 320, 1024, 1088, 4096, 4160, 8192, 16384, 65536])
    func placementHashesEqualLibxxhash(pageSize: Int) {
        let count = 5
        var generator = SystemRandomNumberGenerator()
        let source = UnsafeMutableRawPointer.allocate(byteCount: count * pageSize + 16, alignment: 64)
        defer { source.deallocate() }
        for i in 0..<(count * pageSize + 16) {
            source.storeBytes(of: UInt8.random(in: 0...255, using: &generator), toByteOffset: i, as: UInt8.self)
        }
        // Page 1 all zero, page 2 one bit in its last byte: edge contents.
        for misaligned in [0, 16] {
            let pages = UnsafeRawPointer(source + misaligned)
            (source + misaligned + pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
            (source + misaligned + 2 * pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
            (source + misaligned + 3 * pageSize - 1).storeBytes(of: 0x80, as: UInt8.self)
            let want = (0..<count).map { ContentHash.page(pages + $0 * pageSize, length: pageSize) }
            // Destination pages in reverse order, as offsets in a region.
            let offsets = (0..<count).map { UInt64((count - 1 - $0) * pageSize) }
            for shift in [0, 16] {
                let region = UnsafeMutableRawPointer.allocate(byteCount: count * pageSize + 64, alignment: 4096)
                defer { region.deallocate() }
                region.initializeMemory(as: UInt8.self, repeating: 0xEE, count: count * pageSize + 64)
                defer {
                    // Nothing written outside the pages: the bytes before a
                    // shifted base and after the last page are untouched.
                    let outside = (0..<shift).map { $0 } + ((shift + count * pageSize)..<(count * pageSize + 64)).map { $0 }
                    let touched = outside.filter { region.load(fromByteOffset: $0, as: UInt8.self) != 0xEE }
                    #expect(touched.isEmpty, "bytes written outside the pages, page size \(pageSize), destination +\(shift)")
                }
                let base = region + shift
                let fused = ContentHash.placementIsFused(into: base, pageSize: pageSize)
                #expect(fused == (shift == 0 && Self.cpuHasAVX512), "fused path for destination +\(shift)")
                var got = [UInt64](repeating: 0, count: count)
                offsets.withUnsafeBufferPointer { o in
                    got.withUnsafeMutableBufferPointer { h in
                        ContentHash.placeHashed(
                            pages, count: count, pageSize: pageSize, into: base, offsets: o.baseAddress!, hashes: h.baseAddress!)
                    }
                }
                #expect(got == want, "page size \(pageSize), source +\(misaligned), destination +\(shift)")
                for i in 0..<count {
                    let copied = memcmp(base + Int(offsets[i]), pages + i * pageSize, pageSize) == 0
                    #expect(copied, "page \(i) copied, page size \(pageSize), destination +\(shift)")
                }
            }
        }
    }

    static let cpuHasAVX512: Bool = {
        let info = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
        return info.split(separator: "\n").contains { $0.hasPrefix("flags") && $0.split(separator: " ").contains("avx512f") }
    }()

    @Test func contentHashesSeeEveryByte() {
        var page = [UInt8](repeating: 0, count: 4096)
        let zero = ContentHash.zeroPage(4096)
        #expect(page.withUnsafeBytes { ContentHash.page($0.baseAddress!, length: 4096) } == zero)
        page[4095] = 1
        #expect(page.withUnsafeBytes { ContentHash.page($0.baseAddress!, length: 4096) } != zero)
    }
}
