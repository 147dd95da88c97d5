import Foundation
import MigrationWire
import Testing
import Trust
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Every failure ends within seconds in a one-line error and exit status 1
/// (2 for usage), never a crash or a hang, and never touches the source file.
@Suite("failures end cleanly", .serialized)
struct FailureTests {
    /// A 128 MiB random source, 1 channel: long enough to be killed mid-way.
    @Test("receiver killed mid-transfer: send fails cleanly, source unchanged")
    func receiverKilled() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        let pages = 128 << 20 / pageSize
        try writeImage(src, pages: pages, seed: 42, isZero: { _ in false })
        let before = try Data(contentsOf: URL(fileURLWithPath: src))
        var sawMidTransferKill = false
        for _ in 0..<3 where !sawMidTransferKill {
            try writeFilled(dst, bytes: pages * pageSize, value: 0x11)
            let addr = "tcp:127.0.0.1:\(freePort())"
            let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--channels", "1"])
            #expect(receiver.waitForStderr("listening"))
            let sender = try LivemigProcess(["send", "--ram", src, "--to", addr, "--channels", "1"])
            // Kill as soon as the destination's first page holds source data:
            // the transfer is under way.
            let fd = open(dst, O_RDONLY)
            var page = [UInt8](repeating: 0x11, count: pageSize)
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                _ = pread(fd, &page, pageSize, 0)
                if page[0..<64] != [UInt8](repeating: 0x11, count: 64)[0..<64] { break }
                usleep(200)
            }
            close(fd)
            kill(receiver.pid, SIGKILL)
            receiver.wait()
            let send = sender.wait(timeout: 30)
            if send.status == 0 { continue }  // it finished before the kill: try again
            sawMidTransferKill = true
            #expect(send.status == 1, "\(send.stderr)")
            #expect(send.seconds < 10, "send must notice the vanished peer quickly")
            #expect(send.stderr.contains("failed") && send.stderr.contains("not modified"), "\(send.stderr)")
            #expect(send.stderr.split(separator: "\n").count == 1, "one-line error: \(send.stderr)")
        }
        #expect(sawMidTransferKill, "the receiver was never killed mid-transfer")
        #expect(try Data(contentsOf: URL(fileURLWithPath: src)) == before, "the source RAM file changed")
    }

    @Test("garbage on the listener is ignored with a notice naming the bad field; the real source still migrates")
    func garbageOnListener() throws {
        let receiver = try ListeningReceiver(size: 1 << 20, fill: 3)
        let s = try receiver.connect()
        try s.sendAll(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n-garbage-garbage".utf8))
        #expect(receiver.process.waitForStderr("not a livemig source", timeout: 10))
        let src = receiver.scratch.path("src.ram")
        try writeImage(src, pages: 256, seed: 5, isZero: { $0 % 3 == 0 })
        let send = try livemig(["send", "--ram", src, "--to", receiver.addr.description], timeout: 30)
        let r = receiver.process.wait(timeout: 15)
        #expect(send.status == 0 && r.status == 0, "\(send.stderr) \(r.stderr)")
        #expect(r.stderr.contains("field 'magic'"), "\(r.stderr)")
        #expect(try filesEqual(src, receiver.dst))
    }

    /// A receiver, and a fake source that completed the handshake with it
    /// (hello and RAM layout accepted) and holds the main channel.
    struct FakeSource {
        let listening: ListeningReceiver
        let session: SessionID
        let main: SourceChannel
        let key: PreSharedKey?

        var dst: String { listening.dst }
        var receiver: LivemigProcess { listening.process }
        var ctl: SourceChannel { main }

        /// Opens multifd channel `id` and runs its hello exchange.
        func channel(_ id: UInt16, of count: UInt16) throws -> SourceChannel {
            try SourceChannel(
                to: listening.addr, hello: ChannelHello(session: session, kind: .multifd, channelID: id, channelCount: count), key: key)
        }
    }

    /// `fill: nil` leaves the destination file absent: the receiver creates
    /// it when the layout arrives.
    func handshake(
        dstSize: Int, fill: UInt8? = 0x77, channels: Int, compression: CompressionMethod = .none, key: PreSharedKey? = nil,
        keyFile: String? = nil
    ) throws -> FakeSource {
        let listening = try ListeningReceiver(
            size: dstSize, fill: fill, channels: channels, extra: keyFile.map { ["--psk-file", $0] } ?? [])
        let session = SessionID.random()
        let main = try SourceChannel(
            to: listening.addr,
            hello: ChannelHello(session: session, kind: .main, channelID: 0, channelCount: UInt16(channels), compression: compression),
            key: key)
        #expect(try main.next() == .helloAccepted)
        try main.send(.ramLayout([RAMBlockLayout(name: "pc.ram", size: UInt64(dstSize), pageSize: 4096)]))
        #expect(try main.next() == .layoutAccepted)
        return FakeSource(listening: listening, session: session, main: main, key: key)
    }

    /// A fake source that does a valid handshake, then writes `packet` on
    /// multifd channel 0. Returns the receiver's result and what it said on
    /// the main channel.
    func fakeSource(dstSize: Int, packet: [UInt8], thenClose: Bool = false, compression: CompressionMethod = .none) throws -> (
        status: Int32, stderr: String, mainReply: MainMessage?, dst: Data
    ) {
        let f = try handshake(dstSize: dstSize, channels: 1, compression: compression)
        let ch = try f.channel(0, of: 1)
        try ch.socket.sendAll(packet)
        if thenClose { ch.socket.shutdown() }
        let reply = try? f.ctl.next()
        let r = f.receiver.wait(timeout: 15)
        return (r.status, r.stderr, reply, try Data(contentsOf: URL(fileURLWithPath: f.dst)))
    }

    /// A packet: header, entries (hashes of `data`'s pages), `data`.
    func header(
        normal: UInt32, zero: UInt32, payload: UInt32, number: UInt64 = 0, offsets: [UInt64], flags: MultiFDPacketHeader.Flags = [],
        data: [UInt8] = []
    ) -> [UInt8] {
        TestPacket.make(normal: normal, zero: zero, payload: payload, number: number, offsets: offsets, flags: flags, data: data)
    }

    @Test("a packet with too many pages fails the receiver, which tells the source why")
    func oversizedCount() throws {
        let r = try fakeSource(dstSize: 1 << 20, packet: header(normal: 999, zero: 0, payload: 999 * 4096, offsets: []))
        #expect(r.status == 1)
        #expect(r.stderr.contains("normal-count") && r.stderr.contains("999"), "\(r.stderr)")
        guard case .error(let text)? = r.mainReply else {
            Issue.record("expected an error message on the main channel, got \(String(describing: r.mainReply))")
            return
        }
        #expect(text.contains("normal-count"))
    }

    @Test("an offset beyond the block is refused before any memory is written")
    func offsetBeyondBlock() throws {
        let size = 1 << 20
        let packet = header(normal: 1, zero: 0, payload: 4096, offsets: [UInt64(size)], data: [UInt8](repeating: 0xAB, count: 4096))
        let r = try fakeSource(dstSize: size, packet: packet)
        #expect(r.status == 1)
        #expect(r.stderr.contains("offset[0]") && r.stderr.contains("beyond block 'pc.ram'"), "\(r.stderr)")
        #expect(r.dst == Data(repeating: 0x77, count: size), "the destination must be untouched")
    }

    @Test("a misaligned offset is refused")
    func misalignedOffset() throws {
        let packet = header(normal: 1, zero: 0, payload: 4096, offsets: [100], data: [UInt8](repeating: 0xAB, count: 4096))
        let r = try fakeSource(dstSize: 1 << 20, packet: packet)
        #expect(r.status == 1)
        #expect(r.stderr.contains("not a multiple of the page size"), "\(r.stderr)")
    }

    @Test("a peer that vanishes mid-packet fails the receiver")
    func truncatedPacket() throws {
        let packet = header(normal: 2, zero: 0, payload: 8192, offsets: [0, 4096]) + [UInt8](repeating: 1, count: 100)
        let r = try fakeSource(dstSize: 1 << 20, packet: packet, thenClose: true)
        #expect(r.status == 1)
        #expect(r.stderr.contains("closed the connection after 100 of 8192 bytes"), "\(r.stderr)")
    }

    @Test("the source fails while the destination waits for its channels: its reason arrives at once")
    func sourceFailsBeforeChannels() throws {
        let f = try handshake(dstSize: 1 << 20, fill: 0, channels: 2)
        let receiver = f.receiver, main = f.main
        try main.send(.error("disk on fire"))
        let r = receiver.wait(timeout: 20)
        #expect(r.status == 1)
        #expect(r.seconds < 5, "not the 10 s channel timeout")
        #expect(r.stderr.contains("source failed: disk on fire"), "\(r.stderr)")
    }

    @Test("end-of-round on main before the channels are accepted is kept, not refused")
    func earlyEndOfRound() throws {
        let f = try handshake(dstSize: 4096, fill: 0x42, channels: 1)
        let receiver = f.receiver, main = f.main, ctl = f.ctl, dst = f.dst
        // The whole (one-page) round is written before the destination gets
        // to accept the channel: the marker is on main first.
        try main.send(.endOfRound(round: 1))
        usleep(100_000)
        let ch = try f.channel(0, of: 1)
        try ch.socket.sendAll(header(normal: 0, zero: 1, payload: 0, number: 0, offsets: [0]))
        try ch.socket.sendAll(TestPacket.sync(number: 1))
        try main.send(.complete(summary(rounds: 1, normal: 0, zero: 1, packets: 1, hashes: [TestPacket.zeroHash])))
        #expect(try ctl.next() == .completed)
        try ctl.send(.commit)
        #expect(try ctl.next() == .committed)
        let r = receiver.wait(timeout: 15)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: dst)) == Data(count: 4096), "the zero page made the destination zero")
    }

    @Test("a page sent with data in round 1 and as zero in round 2 ends zero in a file the receiver created")
    func dataThenZeroIntoCreatedFile() throws {
        let f = try handshake(dstSize: 2 * 4096, fill: nil, channels: 2)
        let ch0 = try f.channel(0, of: 2), ch1 = try f.channel(1, of: 2)
        let page = [UInt8](repeating: 0xAB, count: 4096)
        // Round 1: page 0 with data on channel 0, page 1 zero on channel 1.
        try ch0.socket.sendAll(header(normal: 1, zero: 0, payload: 4096, number: 0, offsets: [0], data: page))
        try ch1.socket.sendAll(header(normal: 0, zero: 1, payload: 0, number: 0, offsets: [4096]))
        try ch0.socket.sendAll(TestPacket.sync(number: 1))
        try ch1.socket.sendAll(TestPacket.sync(number: 1))
        try f.main.send(.endOfRound(round: 1))
        // Round 2: page 0 is zero now, and comes on the other channel. The
        // receiver must not take it for a never-written hole.
        try ch1.socket.sendAll(header(normal: 0, zero: 1, payload: 0, number: 2, offsets: [0]))
        try ch0.socket.sendAll(TestPacket.sync(number: 2))
        try ch1.socket.sendAll(TestPacket.sync(number: 3))
        try f.main.send(.endOfRound(round: 2))
        try f.main.send(.complete(summary(rounds: 2, normal: 1, zero: 2, packets: 3, hashes: [TestPacket.zeroHash, TestPacket.zeroHash])))
        #expect(try f.ctl.next() == .completed)
        try f.ctl.send(.commit)
        #expect(try f.ctl.next() == .committed)
        let r = f.receiver.wait(timeout: 15)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: f.dst)) == Data(count: 2 * 4096), "page 0 kept round 1's data")
    }

    @Test("RAM size mismatch: both sides fail with the sizes")
    func sizeMismatch() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 1024, seed: 1, isZero: { _ in false })
        try writeFilled(dst, bytes: 512 * pageSize, value: 0)
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr], timeout: 20)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 1 && recv.status == 1)
        #expect(
            send.stderr.contains("RAM size mismatch") && send.stderr.contains("4194304") && send.stderr.contains("2097152"),
            "\(send.stderr)")
        #expect(recv.stderr.contains("RAM size mismatch"), "\(recv.stderr)")
    }

    @Test("channel count mismatch: a clear error on both sides, no hang")
    func channelMismatch() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 256, seed: 1, isZero: { _ in false })
        let addr = "tcp:127.0.0.1:\(freePort())"
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--channels", "2"])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--channels", "4"], timeout: 20)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 1 && recv.status == 1)
        #expect(send.seconds < 10)
        #expect(send.stderr.contains("--channels"), "\(send.stderr)")
        #expect(recv.stderr.contains("4 multifd channel(s)") && recv.stderr.contains("expects 2"), "\(recv.stderr)")
    }

    @Test("port in use: receive fails at once")
    func portInUse() throws {
        let scratch = try Scratch()
        let port = freePort()
        let holder = try Listener(try SocketAddress(parsing: "tcp:127.0.0.1:\(port)"))
        defer { _ = holder }
        let r = try livemig(
            ["receive", "--ram", scratch.path("d.ram"), "--size", "1MiB", "--listen", "tcp:127.0.0.1:\(port)"], timeout: 20)
        #expect(r.status == 1)
        #expect(r.stderr.contains("address already in use"), "\(r.stderr)")
    }

    @Test("missing RAM file: send fails naming the path")
    func missingRAMFile() throws {
        let r = try livemig(["send", "--ram", "/nonexistent/guest.ram", "--to", "tcp:127.0.0.1:1"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("/nonexistent/guest.ram") && r.stderr.contains("does not exist"), "\(r.stderr)")
    }

    @Test("RAM file that is not a whole number of pages is refused")
    func raggedRAMFile() throws {
        let scratch = try Scratch()
        let src = scratch.path("odd.ram")
        try writeFilled(src, bytes: 5000, value: 1)
        let r = try livemig(["send", "--ram", src, "--to", "tcp:127.0.0.1:1"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("not a multiple of the page size"), "\(r.stderr)")
    }

    @Test("nobody listening: send fails within seconds")
    func nobodyListening() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram")
        try writeFilled(src, bytes: 1 << 20, value: 1)
        let r = try livemig(["send", "--ram", src, "--to", "tcp:127.0.0.1:\(freePort())"], timeout: 20)
        #expect(r.status == 1)
        #expect(r.seconds < 10)
        #expect(r.stderr.contains("connection refused"), "\(r.stderr)")
    }

    @Test("--help prints help and exits 0", arguments: [["--help"], ["send", "--help"], ["stress", "--help"]])
    func help(_ args: [String]) throws {
        let r = try livemig(args)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("USAGE"), "\(r.stdout)")
    }

    @Test("SIGTERM stops a stress guest, which saves its state")
    func stressStopsOnSignal() throws {
        let scratch = try Scratch()
        let g = try LivemigProcess([
            "stress", "--ram", scratch.path("g.ram"), "--control", scratch.path("g.ctl"), "--size", "8MiB", "--rate", "1MiB/s",
        ])
        #expect(g.waitForStderr("guest started"))
        kill(g.pid, SIGTERM)
        let r = g.wait(timeout: 10)
        #expect(r.status == 0 && r.seconds < 5, "\(r.stderr)")
        #expect(r.stdout.contains("stopped by signal"), "\(r.stdout)")
    }

    @Test("SIGINT stops a receiver waiting for its source")
    func receiveStopsOnSignal() throws {
        let scratch = try Scratch()
        let r = try LivemigProcess(["receive", "--ram", scratch.path("d.ram"), "--size", "1MiB", "--listen", "unix:" + scratch.path("s")])
        #expect(r.waitForStderr("listening"))
        kill(r.pid, SIGINT)
        let out = r.wait(timeout: 10)
        #expect(out.status == 1 && out.seconds < 5)
        #expect(out.stderr.contains("cancelled by SIGINT"), "\(out.stderr)")
    }

    @Test(
        "usage errors exit with status 2",
        arguments: [
            ["send", "--ram", "x"],
            ["send", "--ram", "x", "--to", "ftp:host:1"],
            ["receive", "--ram", "x", "--listen", "tcp:127.0.0.1:notaport"],
            ["receive", "--ram", "x", "--listen", "unix:/tmp/x", "--channels", "0"],
            ["receive", "--ram", "x", "--listen", "unix:/tmp/x", "--size", "lots"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--compress", "lz4"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--compress", "zstd:99"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--compress", "zstd:fast"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--compress", "none:1"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--zerocopy"],
            // Negative numbers reach validate() and are refused with the range.
            ["receive", "--ram", "x", "--listen", "unix:/tmp/x", "--channels", "-1"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--channels", "-1"],
            ["stress", "--ram", "x", "--control", "y", "--threads", "-3"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--throttle-initial", "-5"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--throttle-increment", "100"],
            ["send", "--ram", "x", "--to", "unix:/tmp/x", "--guest", "c", "--max-rounds", "-1"],
            // Zero sizes and rates.
            ["stress", "--ram", "x", "--control", "y", "--size", "64KiB", "--rate", "0"],
            ["stress", "--ram", "x", "--control", "y", "--size", "0"],
            ["receive", "--ram", "x", "--listen", "unix:/tmp/x", "--size", "0"],
            ["receive", "--ram", "x", "--listen", "unix:/tmp/x", "--max-size", "0"],
        ])
    func usage(_ args: [String]) throws {
        let r = try livemig(args)
        #expect(r.status == 2, "\(args): \(r.stderr)")
        #expect(!r.stderr.isEmpty)
        #expect(!r.stderr.contains("Missing value"), "\(args): a negative number read as a flag: \(r.stderr)")
        // A refused number names its option.
        if let option = args.last(where: { $0.hasPrefix("--") }), ["-1", "-3", "-5", "0", "100"].contains(args.last!) {
            #expect(r.stderr.contains(option), "\(args): \(r.stderr)")
        }
    }
}
