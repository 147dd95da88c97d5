import Foundation
import MigrationWire
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// `send --compress zstd[:LEVEL]` with real processes: byte-identical
/// results and honest statistics, a live guest, and a destination that
/// refuses every malformed compressed packet by name without writing guest
/// memory.
@Suite("compression end to end", .serialized)
struct CompressionTests {
    /// 32 MiB of zero, text-like and random pages.
    static let pages = 32 << 20 / pageSize

    @Test("a mixed image migrates byte-identical, and the statistics show compression", arguments: ["zstd", "zstd:3"])
    func migratesMixedImage(_ method: String) throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        let kinds = try writeMixedImage(src, pages: Self.pages, seed: method == "zstd" ? 1 : 3)
        // Older, non-zero content: zero pages must be zeroed over it.
        try writeFilled(dst, bytes: Self.pages * pageSize, value: 0x5A)
        let addr = "tcp:127.0.0.1:\(freePort())"
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--format", "json"])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--compress", method, "--format", "json"])
        let recv = receiver.wait()
        #expect(send.status == 0, "send: \(send.stderr)")
        #expect(recv.status == 0, "receive: \(recv.stderr)")
        #expect(try filesEqual(src, dst), "destination differs from source")

        let normal = kinds.text + kinds.random
        for (side, out) in [("send", send.stdout), ("receive", recv.stdout)] {
            let s = try stats(out)
            let ram = try #require(s["ram"] as? [String: Any], "\(side)")
            #expect(ram["duplicate"] as? Int == kinds.zero, "\(side): zero pages stay offsets only")
            #expect(ram["normal"] as? Int == normal, "\(side)")
            let c = try #require(s["compression"] as? [String: Any], "\(side) reports no compression: \(out)")
            #expect(c["method"] as? String == "zstd", "\(side)")
            #expect(c["pages"] as? Int == normal, "\(side): every normal page is compressed")
            let size = try #require(c["compressed-size"] as? Int)
            // Random pages do not shrink, text pages do: the wire carries
            // less than the pages, more than the random ones alone.
            #expect(size < normal * pageSize && size > kinds.random * pageSize, "\(side): \(size)")
            let rate = try #require(c["compression-rate"] as? Double)
            #expect(abs(rate - Double(normal * pageSize) / Double(size)) < 0.01, "\(side): \(rate)")
            #expect((ram["multifd-bytes"] as? Int ?? 0) > size)
            #expect((ram["multifd-bytes"] as? Int ?? .max) < normal * pageSize, "\(side): the wire carries the frames, not the pages")
        }
        let level = try #require(try stats(send.stdout)["compression"] as? [String: Any])["level"] as? Int
        #expect(level == (method == "zstd" ? 1 : 3))
        #expect(
            try #require(try stats(recv.stdout)["compression"] as? [String: Any])["level"] == nil,
            "the destination does not learn the level")
        // The two ends count the same frames.
        let sc = try #require(try stats(send.stdout)["compression"] as? [String: Any])
        let rc = try #require(try stats(recv.stdout)["compression"] as? [String: Any])
        #expect(sc["compressed-size"] as? Int == rc["compressed-size"] as? Int)
    }

    @Test("without --compress the statistics have no compression part")
    func uncompressedHasNoCompressionStats() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeMixedImage(src, pages: 1024, seed: 5)
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--format", "json"])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--compress", "none", "--format", "json"])
        let recv = receiver.wait()
        #expect(send.status == 0 && recv.status == 0, "\(send.stderr) \(recv.stderr)")
        #expect(try stats(send.stdout)["compression"] == nil)
        #expect(try stats(recv.stdout)["compression"] == nil)
        #expect(try filesEqual(src, dst))
    }

    @Test("a live counter guest migrates compressed and verifies")
    func liveGuestCompressed() throws {
        let rig = try LiveMigrationTests.Rig()
        // The guest wrote its pages while they were being compressed; the
        // copy-first rule keeps every frame consistent, and the rounds send
        // torn pages again: the destination equals the source at the pause
        // (migrateLive checks it).
        let send = try rig.migrateLive(pattern: "counter", rate: "128MiB/s", ["--compress", "zstd"])
        let vd = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(vd.status == 0, "\(vd.stdout) \(vd.stderr)")
        let c = try #require(try stats(send.stdout)["compression"] as? [String: Any])
        #expect((c["pages"] as? Int ?? 0) > 0)
    }

    // MARK: - the destination's checks, against a fake source

    let fake = FailureTests()

    /// A zstd frame (from the zstd CLI, level 1, with checksum) of one
    /// 4096-byte page of "A"s.
    static let onePageFrame: [UInt8] = [
        0x28, 0xB5, 0x2F, 0xFD, 0x64, 0x00, 0x0F, 0x4D, 0x00, 0x00, 0x10, 0x41,
        0x41, 0x01, 0x00, 0xFB, 0xF7, 0x01, 0x16, 0xC3, 0x58, 0x2B, 0x6D,
    ]

    func expectRefused(
        _ r: (status: Int32, stderr: String, mainReply: MainMessage?, dst: Data), size: Int, naming texts: [String],
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        #expect(r.status == 1, "\(r.stderr)", sourceLocation: sourceLocation)
        for t in texts { #expect(r.stderr.contains(t), "'\(t)' missing from: \(r.stderr)", sourceLocation: sourceLocation) }
        guard case .error(let text)? = r.mainReply else {
            Issue.record("expected an error on the main channel, got \(String(describing: r.mainReply))", sourceLocation: sourceLocation)
            return
        }
        #expect(text.contains(texts[0]), sourceLocation: sourceLocation)
        #expect(r.dst == Data(repeating: 0x77, count: size), "the destination must be untouched", sourceLocation: sourceLocation)
    }

    @Test("the fake frame is a real one: a compressed source that sends it is accepted up to the totals")
    func fakeFrameDecodes() throws {
        // One compressed packet, then SYNC and end-of-round: the receiver
        // places the page, so the test's frame is valid zstd.
        let size = 1 << 20
        let f = try fake.handshake(dstSize: size, channels: 1, compression: .zstd)
        let ch = try f.channel(0, of: 1)
        let frame = Self.onePageFrame
        try ch.socket.sendAll(
            TestPacket.make(
                normal: 1, zero: 0, offsets: [8192], flags: .compressed, data: frame,
                hashes: TestPacket.hashes(of: [UInt8](repeating: 0x41, count: 4096))))
        try ch.socket.sendAll(TestPacket.sync(number: 1))
        try f.main.send(.endOfRound(round: 1))
        try f.main.send(.complete(summary(rounds: 1, normal: 1, zero: 0, packets: 1, hashes: [])))
        // Only one page of 256 arrived: the completion check refuses, after
        // the page was placed.
        let reply = try? f.ctl.next()
        let r = f.receiver.wait(timeout: 15)
        #expect(r.status == 1)
        #expect(r.stderr.contains("only 1 of 256 pages arrived"), "\(r.stderr)")
        if case .error(let text)? = reply { #expect(text.contains("only 1 of 256")) } else { Issue.record("no error reply") }
        let dst = try Data(contentsOf: URL(fileURLWithPath: f.dst))
        #expect(dst[8192..<12288] == Data(repeating: 0x41, count: 4096), "the decoded page landed")
        #expect(dst[0..<8192] == Data(repeating: 0x77, count: 8192))
    }

    @Test("a COMPRESSED packet when the hello negotiated none is refused")
    func compressedWithoutNegotiation() throws {
        let frame = Self.onePageFrame
        let packet = fake.header(normal: 1, zero: 0, payload: UInt32(frame.count), offsets: [0], flags: .compressed, data: frame)
        let r = try fake.fakeSource(dstSize: 1 << 20, packet: packet)
        expectRefused(r, size: 1 << 20, naming: ["'flags'", "negotiated no compression"])
    }

    @Test("a payload that is not a zstd frame is refused before memory is written")
    func corruptFrame() throws {
        let junk = [UInt8](repeating: 0xC3, count: 64)
        let packet = fake.header(normal: 2, zero: 0, payload: UInt32(junk.count), offsets: [0, 4096], flags: .compressed, data: junk)
        let r = try fake.fakeSource(dstSize: 1 << 20, packet: packet, compression: .zstd)
        expectRefused(r, size: 1 << 20, naming: ["'payload'", "not a zstd frame"])
    }

    @Test("a frame of the wrong size is refused naming the decompressed size")
    func sizeMismatch() throws {
        // One page's frame in a packet that announces two pages.
        let frame = Self.onePageFrame
        let packet = fake.header(normal: 2, zero: 0, payload: UInt32(frame.count), offsets: [0, 4096], flags: .compressed, data: frame)
        let r = try fake.fakeSource(dstSize: 1 << 20, packet: packet, compression: .zstd)
        expectRefused(r, size: 1 << 20, naming: ["'decompressed-size'", "4096", "8192"])
    }

    @Test("a payload-size beyond the bound is refused before it is read")
    func beyondBound() throws {
        let bound = CompressionMethod.zstd.payloadBound(4096)
        let packet = fake.header(normal: 1, zero: 0, payload: UInt32(bound + 1), offsets: [0], flags: .compressed)
        let r = try fake.fakeSource(dstSize: 1 << 20, packet: packet, compression: .zstd)
        expectRefused(r, size: 1 << 20, naming: ["'payload-size'", "\(bound + 1)"])
    }

    @Test("uncompressed page data when zstd was negotiated is refused")
    func uncompressedUnderZstd() throws {
        let packet = fake.header(normal: 1, zero: 0, payload: 4096, offsets: [0], data: [UInt8](repeating: 1, count: 4096))
        let r = try fake.fakeSource(dstSize: 1 << 20, packet: packet, compression: .zstd)
        expectRefused(r, size: 1 << 20, naming: ["'flags'", "must be COMPRESSED"])
    }

    @Test("a main hello with an unknown compression method is refused naming the field")
    func unknownMethod() throws {
        let receiver = try ListeningReceiver(size: 1 << 20)
        var hello = ChannelHello(session: .random(), kind: .main, channelID: 0, channelCount: 2).encoded()
        hello[25] = 9  // compression
        let s = try receiver.connect()
        try s.sendAll(hello)
        let r = receiver.process.wait(timeout: 15)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("'compression' is 9") && r.stderr.contains("1 (zstd)"), "\(r.stderr)")
    }
}
