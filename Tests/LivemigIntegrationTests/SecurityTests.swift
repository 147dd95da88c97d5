import Foundation
import MigrationWire
import Testing
import Trust
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Issue 13's trust bullets, end to end: who may write a destination's RAM
/// (the pre-shared key), what a bit flipped on the wire does (checksums and
/// MACs), what the completion digest catches, and that stray connections
/// never fail a migration in progress.
@Suite("security: authentication, integrity, completion digest, stray connections", .serialized)
struct SecurityTests {
    let fake = FailureTests()

    /// Bytes on each connection before its first frame or packet: the
    /// source's hello (64) and its proof (32); the destination's 80-byte
    /// challenge flows the other way.
    static let handshakeBytes = ChannelHello.size + HelloChallenge.proofSize
    /// A full packet of the 4 MiB random image: header, 128 entries, 128 pages.
    static let fullPrefix = MultiFDPacketHeader.size + 128 * MultiFDPacketHeader.entrySize
    static let fullPacket = fullPrefix + 128 * pageSize

    // MARK: - helpers

    /// A new key file from `livemig keygen`.
    func keygen(_ scratch: Scratch, _ name: String) throws -> String {
        let path = scratch.path(name)
        let r = try livemig(["keygen", path])
        #expect(r.status == 0, "keygen: \(r.stderr)")
        return path
    }

    /// Whether `path` carries the incomplete mark (`user.livemig.incomplete`).
    func marked(_ path: String) -> Bool {
        // <sys/xattr.h> is not in Swift's Glibc module: look getxattr(2) up.
        typealias GetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
        guard let sym = dlsym(nil, "getxattr") else { return false }
        return unsafeBitCast(sym, to: GetXattr.self)(path, "user.livemig.incomplete", nil, 0) >= 0
    }

    func exists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

    func contents(_ path: String) throws -> Data { try Data(contentsOf: URL(fileURLWithPath: path)) }

    func mode(_ path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o777 : 0
    }

    // MARK: - 1. authentication

    @Test(
        "keys from two keygens: send and receive both exit 1 naming different keys; the destination is untouched", arguments: [true, false])
    func wrongKey(destinationExists: Bool) throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 256, seed: 11, isZero: { _ in false })
        if destinationExists { try writeFilled(dst, bytes: 256 * pageSize, value: 0x77) }
        let k1 = try keygen(scratch, "k1"), k2 = try keygen(scratch, "k2")
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--psk-file", k1])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--psk-file", k2], timeout: 30)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 1, "send: \(send.stderr)")
        #expect(send.stderr.contains("the two sides hold different keys"), "\(send.stderr)")
        #expect(recv.status == 1, "receive: \(recv.stderr)")
        #expect(recv.stderr.contains("it holds another key"), "\(recv.stderr)")
        if destinationExists {
            #expect(try contents(dst) == Data(repeating: 0x77, count: 256 * pageSize), "the destination changed")
            #expect(!marked(dst), "nothing was accepted, so nothing was marked")
        } else {
            #expect(!exists(dst), "receive created a RAM file for a source that did not prove the key")
        }
    }

    enum KeySide: String, CaseIterable, CustomTestStringConvertible {
        case destinationOnly, sourceOnly
        var testDescription: String { rawValue }
    }

    @Test("a key on one side only: both exit 1 saying which side lacks it", arguments: KeySide.allCases)
    func keyOnOneSide(_ side: KeySide) throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 256, seed: 12, isZero: { _ in false })
        let key = try keygen(scratch, "k")
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(
            ["receive", "--ram", dst, "--listen", addr] + (side == .destinationOnly ? ["--psk-file", key] : []))
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr] + (side == .sourceOnly ? ["--psk-file", key] : []), timeout: 30)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 1 && recv.status == 1, "send: \(send.stderr) receive: \(recv.stderr)")
        switch side {
        case .destinationOnly:
            #expect(send.stderr.contains("the destination requires a pre-shared key: pass --psk-file"), "\(send.stderr)")
            #expect(recv.stderr.contains("the source has no pre-shared key, and this destination requires one"), "\(recv.stderr)")
        case .sourceOnly:
            #expect(send.stderr.contains("the destination has no pre-shared key, so it cannot prove who it is"), "\(send.stderr)")
            #expect(
                recv.stderr.contains("the source authenticates with a pre-shared key but this destination has none"), "\(recv.stderr)")
        }
        #expect(!exists(dst), "no RAM file may be created")
    }

    @Test("a recorded hello and proof replayed to another receive with the same key are refused; nothing is written")
    func replayedHello() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), first = scratch.path("first.ram"), second = scratch.path("second.ram")
        try writeImage(src, pages: 256, seed: 13, isZero: { $0 % 5 == 0 })
        let key = try keygen(scratch, "k")
        // A real authenticated migration through a recording proxy.
        let port = freePort()
        let r1 = try LivemigProcess(["receive", "--ram", first, "--listen", "tcp:127.0.0.1:\(port)", "--psk-file", key])
        #expect(r1.waitForStderr("listening"))
        let proxy = try MiddleProxy(to: try SocketAddress(parsing: "tcp:127.0.0.1:\(port)"))
        defer { proxy.stop() }
        let send = try livemig(["send", "--ram", src, "--to", proxy.address.description, "--psk-file", key], timeout: 30)
        let recv1 = r1.wait(timeout: 20)
        #expect(send.status == 0 && recv1.status == 0, "send: \(send.stderr) receive: \(recv1.stderr)")
        #expect(try filesEqual(src, first), "the recorded migration itself must succeed")
        let recorded = proxy.sourceBytes(0)
        try #require(recorded.count > Self.handshakeBytes, "nothing recorded on the main channel")
        #expect(Array(recorded[0..<4]) == Array("LMIG".utf8), "connection 0 is not the main channel's hello")

        // Replay everything the source wrote on main (hello, proof, frames)
        // to a second receive holding the same key.
        try writeFilled(second, bytes: 256 * pageSize, value: 0x77)
        let addr2 = try SocketAddress(parsing: "unix:" + scratch.path("s2"))
        let r2 = try LivemigProcess(["receive", "--ram", second, "--listen", addr2.description, "--psk-file", key])
        #expect(r2.waitForStderr("listening"))
        let s = try Socket.connect(to: addr2, timeout: 5)
        s.setReceiveTimeout(15)
        try? s.sendAll(recorded)
        let challenge = try? s.receiveBytes(HelloChallenge.size, what: "test: challenge")
        let recv2 = r2.wait(timeout: 20)
        #expect(challenge != nil, "the destination answers a well-formed hello with a fresh challenge")
        #expect(recv2.status == 1, "\(recv2.stderr)")
        #expect(recv2.stderr.contains("the source's proof does not match") && recv2.stderr.contains("replayed"), "\(recv2.stderr)")
        #expect(try contents(second) == Data(repeating: 0x77, count: 256 * pageSize), "the replay wrote to the destination")
        #expect(!marked(second))
    }

    enum ScriptKey: String, CaseIterable, CustomTestStringConvertible {
        /// The script holds no key (the issue's 40-line script as it was).
        case none
        /// The script claims a key and proves a random one.
        case wrong
        var testDescription: String { rawValue }
    }

    /// The issue's "40-line script": a hand-made layout and packets that
    /// replace every page with 0xEE bytes, end-of-round and a correct
    /// `complete`. Every step is tried whatever the receiver did before.
    /// True when the receiver answered `completed`.
    func scriptedMigration(to addr: SocketAddress, size: Int, key: PreSharedKey?) -> Bool {
        let pages = size / pageSize
        let session = SessionID.random()
        guard
            let main = try? SourceChannel(
                to: addr, hello: ChannelHello(session: session, kind: .main, channelID: 0, channelCount: 1), key: key,
                connectTimeout: 0)
        else { return false }
        _ = try? main.next()
        try? main.send(.ramLayout([RAMBlockLayout(name: "pc.ram", size: UInt64(size), pageSize: 4096)]))
        _ = try? main.next()
        let data = [UInt8](repeating: 0xEE, count: pageSize)
        let hash = data.withUnsafeBytes { ContentHash.page($0.baseAddress!, length: pageSize) }
        var packets: UInt64 = 0
        if let ch = try? SourceChannel(
            to: addr, hello: ChannelHello(session: session, kind: .multifd, channelID: 0, channelCount: 1), key: key,
            connectTimeout: 0)
        {
            for first in stride(from: 0, to: pages, by: 128) {
                let n = min(128, pages - first)
                let packet = TestPacket.make(
                    normal: UInt32(n), zero: 0, number: packets, offsets: (first..<first + n).map { UInt64($0 * pageSize) },
                    data: Array([[UInt8]](repeating: data, count: n).joined()), sealer: ch.sealer())
                try? ch.socket.sendAll(packet)
                packets += 1
            }
            try? ch.socket.sendAll(TestPacket.sync(number: packets, sealer: ch.sealer()))
        }
        try? main.send(.endOfRound(round: 1))
        try? main.send(
            .complete(
                summary(
                    rounds: 1, normal: UInt64(pages), zero: 0, packets: packets, hashes: [UInt64](repeating: hash, count: pages))))
        return main.commitSwitchover() == .committed
    }

    @Test("the 40-line script cannot write a page into a receive with --psk-file", arguments: ScriptKey.allCases)
    func scriptAgainstKeyedReceive(_ scriptKey: ScriptKey) throws {
        let size = 1 << 20
        let scratch = try Scratch()
        let dst = scratch.path("dst.ram")
        try writeFilled(dst, bytes: size, value: 0x77)
        let key = try keygen(scratch, "k")
        let addr = try SocketAddress(parsing: "unix:" + scratch.path("s"))
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr.description, "--channels", "1", "--psk-file", key])
        #expect(receiver.waitForStderr("listening"))
        let completed = scriptedMigration(
            to: addr, size: size, key: scriptKey == .wrong ? try PreSharedKey(bytes: randomBytes(32)) : nil)
        let r = receiver.wait(timeout: 20)
        #expect(!completed)
        #expect(r.status == 1, "\(r.stderr)")
        switch scriptKey {
        case .none: #expect(r.stderr.contains("the source has no pre-shared key"), "\(r.stderr)")
        case .wrong: #expect(r.stderr.contains("the source's proof does not match this destination's key"), "\(r.stderr)")
        }
        #expect(try contents(dst) == Data(repeating: 0x77, count: size), "the script wrote into the destination")
        #expect(!marked(dst))
    }

    @Test("control: without a key on either side the same script is a correct migration (by design)")
    func scriptWithoutKeysMigrates() throws {
        let size = 1 << 20
        let listening = try ListeningReceiver(size: size, fill: 0x77, channels: 1)
        let completed = scriptedMigration(to: listening.addr, size: size, key: nil)
        let r = listening.process.wait(timeout: 20)
        #expect(completed && r.status == 0, "\(r.stderr)")
        #expect(try contents(listening.dst) == Data(repeating: 0xEE, count: size))
    }

    @Test("control: a script holding the receiver's key also migrates, so the refusals above are the key's doing")
    func scriptWithTheKeyMigrates() throws {
        let size = 1 << 20
        let scratch = try Scratch()
        let keyFile = scratch.path("k")
        let raw = randomBytes(32)
        let hex = raw.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined() + "\n"
        #expect(FileManager.default.createFile(atPath: keyFile, contents: Data(hex.utf8), attributes: [.posixPermissions: 0o600]))
        let listening = try ListeningReceiver(size: size, fill: 0x77, channels: 1, extra: ["--psk-file", keyFile])
        let completed = scriptedMigration(to: listening.addr, size: size, key: try PreSharedKey(bytes: raw))
        let r = listening.process.wait(timeout: 20)
        #expect(completed && r.status == 0, "\(r.stderr)")
        #expect(try contents(listening.dst) == Data(repeating: 0xEE, count: size))
    }

    @Test("keygen writes mode 0600 and never overwrites; unsafe or short key files and --encrypt without a key are refused")
    func keyFiles() throws {
        let scratch = try Scratch()
        let key = try keygen(scratch, "k")
        #expect(mode(key) == 0o600, "mode \(String(mode(key), radix: 8))")
        let text = try contents(key)
        #expect(text.count == 65 && text.last == UInt8(ascii: "\n"), "64 hex digits and a newline: \(text.count) bytes")
        let again = try livemig(["keygen", key])
        #expect(again.status == 1 && again.stderr.contains("exists") && again.stderr.contains("never overwritten"), "\(again.stderr)")
        #expect(try contents(key) == text, "keygen overwrote a key")

        let src = scratch.path("src.ram")
        try writeFilled(src, bytes: 1 << 20, value: 1)
        let open = scratch.path("open")
        try text.write(to: URL(fileURLWithPath: open))
        chmod(open, 0o640)
        let short = scratch.path("short")
        #expect(
            FileManager.default.createFile(
                atPath: short, contents: Data(String(repeating: "ab", count: 16).utf8), attributes: [.posixPermissions: 0o600]))
        let refusals: [(file: String, says: String)] = [
            (open, "may be read by other users (mode 640)"),
            (short, "a pre-shared key is at least 32 bytes; this one has 16"),
        ]
        for (file, says) in refusals {
            let r = try livemig(
                ["receive", "--ram", scratch.path("dst.ram"), "--listen", "unix:" + scratch.path("s"), "--psk-file", file], timeout: 20)
            #expect(r.status == 1 && r.stderr.contains(says), "receive with \(file): \(r.stderr)")
            #expect(!r.stderr.contains("listening"), "refused before listening")
            let s = try livemig(["send", "--ram", src, "--to", "unix:" + scratch.path("none"), "--psk-file", file], timeout: 20)
            #expect(s.status == 1 && s.stderr.contains(says), "send with \(file): \(s.stderr)")
        }
        #expect(!exists(scratch.path("dst.ram")))

        let encrypt = try livemig(["send", "--ram", src, "--to", "unix:" + scratch.path("none"), "--encrypt"])
        #expect(encrypt.status == 2 && encrypt.stderr.contains("--encrypt needs --psk-file"), "\(encrypt.stderr)")
    }

    enum Listening: String, CaseIterable, CustomTestStringConvertible {
        case noKey, insecure, withKey
        var testDescription: String { rawValue }
    }

    @Test("receive on a non-loopback address without a key warns loudly; --insecure or a key silence it", arguments: Listening.allCases)
    func nonLoopbackWarning(_ how: Listening) throws {
        let scratch = try Scratch()
        var extra: [String] = []
        switch how {
        case .noKey: break
        case .insecure: extra = ["--insecure"]
        case .withKey: extra = ["--psk-file", try keygen(scratch, "k")]
        }
        let r = try LivemigProcess(
            ["receive", "--ram", scratch.path("dst.ram"), "--listen", "tcp:0.0.0.0:\(freePort())"] + extra)
        #expect(r.waitForStderr("listening on"))
        kill(r.pid, SIGINT)
        let out = r.wait(timeout: 10)
        #expect(out.status == 1 && out.stderr.contains("cancelled by SIGINT"), "\(out.stderr)")
        let warned = out.stderr.contains("WARNING") && out.stderr.contains("without a pre-shared key")
        #expect(warned == (how == .noKey), "\(out.stderr)")
    }

    // MARK: - 2. integrity on the wire

    enum WireTrust: String, Sendable, CustomTestStringConvertible {
        case plain, key, encrypt
        var testDescription: String { rawValue }
    }

    /// One migration of a 4 MiB random image over 1 channel through a
    /// `MiddleProxy` (flipping `flip`, if any).
    struct ProxiedRun {
        var send: (status: Int32, stdout: String, stderr: String, seconds: Double)
        var recv: (status: Int32, stdout: String, stderr: String, seconds: Double)
        var proxy: MiddleProxy
        var srcUnchanged: Bool
        var src: String
        var dst: String
        var scratch: Scratch
    }

    func proxied(flip: MiddleProxy.Flip?, trust: WireTrust, destinationExists: Bool, send extra: [String] = []) throws -> ProxiedRun {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        let pages = 1024
        try writeImage(src, pages: pages, seed: 21, isZero: { _ in false })
        let before = try contents(src)
        if destinationExists { try writeFilled(dst, bytes: pages * pageSize, value: 0x77) }
        let keyArgs = trust == .plain ? [] : ["--psk-file", try keygen(scratch, "k")]
        let port = freePort()
        let receiver = try LivemigProcess(
            ["receive", "--ram", dst, "--listen", "tcp:127.0.0.1:\(port)", "--channels", "1"] + keyArgs)
        #expect(receiver.waitForStderr("listening"))
        let proxy = try MiddleProxy(to: try SocketAddress(parsing: "tcp:127.0.0.1:\(port)"), flip: flip)
        let send = try livemig(
            ["send", "--ram", src, "--to", proxy.address.description, "--channels", "1"] + keyArgs
                + (trust == .encrypt ? ["--encrypt"] : []) + extra, timeout: 40)
        let recv = receiver.wait(timeout: 20)
        proxy.stop()
        return ProxiedRun(
            send: send, recv: recv, proxy: proxy, srcUnchanged: try contents(src) == before, src: src, dst: dst, scratch: scratch)
    }

    /// The header fields of the packet that starts at `at` in a recorded
    /// multifd stream: magic, flags, normal-count, zero-count.
    func packetHeader(_ stream: [UInt8], at: Int) -> (magic: UInt32, flags: UInt32, normal: UInt32, zero: UInt32)? {
        guard stream.count >= at + MultiFDPacketHeader.size else { return nil }
        func u32(_ o: Int) -> UInt32 { stream[at + o..<at + o + 4].reduce(0) { $0 << 8 | UInt32($1) } }
        return (u32(0), u32(8), u32(12), u32(16))
    }

    enum Where: String, Sendable {
        /// A byte of page data in packet 0 of the multifd channel.
        case pageData
        /// A bit of the offset of entry 0 of packet 1 (0x80000 → 0x81000).
        case entryOffset
        /// A byte of the RAM-layout frame's payload on the main channel.
        case mainFrame
    }

    struct FlipCase: Sendable, CustomTestStringConvertible {
        var at: Where
        var trust: WireTrust
        var destinationExists: Bool
        var receiveSays: [String]
        var testDescription: String {
            "\(at.rawValue), \(trust.rawValue), \(destinationExists ? "existing destination" : "destination created by receive")"
        }

        var flip: MiddleProxy.Flip {
            let tag = trust == .plain ? 0 : PacketSealer.tagSize
            switch at {
            case .pageData:
                return MiddleProxy.Flip(connection: 1, offset: SecurityTests.handshakeBytes + SecurityTests.fullPrefix + 5000, mask: 0x20)
            case .entryOffset:
                let packet1 = SecurityTests.handshakeBytes + SecurityTests.fullPacket + tag
                return MiddleProxy.Flip(connection: 1, offset: packet1 + MultiFDPacketHeader.size + 6, mask: 0x10)
            case .mainFrame:
                return MiddleProxy.Flip(connection: 0, offset: SecurityTests.handshakeBytes + MainMessage.frameHeaderSize + 4, mask: 0x01)
            }
        }
    }

    static let flipCases: [FlipCase] = [
        FlipCase(at: .pageData, trust: .plain, destinationExists: true, receiveSays: ["hashes to", "corrupted in transit"]),
        // A destination receive creates is written by pwrite: checked before.
        FlipCase(at: .pageData, trust: .plain, destinationExists: false, receiveSays: ["hashes to", "corrupted in transit"]),
        FlipCase(at: .entryOffset, trust: .plain, destinationExists: false, receiveSays: ["'prefix-check'", "corrupted in transit"]),
        FlipCase(at: .mainFrame, trust: .plain, destinationExists: true, receiveSays: ["(ram-layout) fails its checksum"]),
        FlipCase(at: .pageData, trust: .key, destinationExists: false, receiveSays: ["its MAC does not verify"]),
        FlipCase(at: .entryOffset, trust: .key, destinationExists: true, receiveSays: ["'prefix-check'"]),
        FlipCase(at: .mainFrame, trust: .key, destinationExists: false, receiveSays: ["(ram-layout) fails its MAC"]),
        FlipCase(at: .pageData, trust: .encrypt, destinationExists: true, receiveSays: ["its MAC does not verify"]),
    ]

    @Test(
        "one bit flipped between send and receive fails both; the source is unchanged; the destination is not complete",
        arguments: flipCases)
    func flippedBit(_ c: FlipCase) throws {
        let run = try proxied(flip: c.flip, trust: c.trust, destinationExists: c.destinationExists)
        #expect(run.proxy.flipped, "the stream never reached byte \(c.flip.offset)")
        if c.at != .mainFrame {
            // The offsets above assume full 128-page packets on channel 0.
            let stream = run.proxy.sourceBytes(1)
            let h = packetHeader(stream, at: Self.handshakeBytes)
            #expect(h?.magic == MultiFDPacketHeader.magic && h?.normal == 128, "packet 0 is not where the test expects it")
        }
        #expect(run.recv.status == 1, "receive: \(run.recv.stderr)")
        for text in c.receiveSays { #expect(run.recv.stderr.contains(text), "'\(text)' missing from: \(run.recv.stderr)") }
        #expect(run.send.status == 1, "send: \(run.send.stderr)")
        #expect(run.send.stderr.split(separator: "\n").count == 1, "one-line error: \(run.send.stderr)")
        #expect(run.srcUnchanged, "the source RAM file changed")
        if !c.destinationExists {
            #expect(!exists(run.dst), "a RAM file receive created must be removed after a failure")
        } else if c.at == .mainFrame {
            #expect(try contents(run.dst) == Data(repeating: 0x77, count: 1024 * pageSize), "refused before any page")
            #expect(!marked(run.dst))
        } else {
            #expect(marked(run.dst), "the destination must carry the incomplete mark")
        }
    }

    @Test(
        "unflipped through the proxy: plain, keyed and encrypted migrations are byte-identical; encrypted pages are not on the wire",
        arguments: [WireTrust.plain, .key, .encrypt])
    func proxiedControl(_ trust: WireTrust) throws {
        let run = try proxied(flip: nil, trust: trust, destinationExists: false)
        #expect(run.send.status == 0 && run.recv.status == 0, "send: \(run.send.stderr) receive: \(run.recv.stderr)")
        #expect(try filesEqual(run.src, run.dst))
        #expect(!marked(run.dst))
        // Page 0's bytes where packet 0's payload starts: in clear without
        // --encrypt, ciphertext with it.
        let stream = run.proxy.sourceBytes(1)
        let at = Self.handshakeBytes + Self.fullPrefix
        try #require(stream.count >= at + pageSize)
        let page0 = [UInt8](try contents(run.src)[0..<pageSize])
        let onWire = Array(stream[at..<at + pageSize])
        #expect(
            (onWire == page0) == (trust != .encrypt), "trust \(trust): page 0 \(onWire == page0 ? "is" : "is not") on the wire in clear")
        if trust == .encrypt {
            let snippet = page0[0..<32]
            let found = stream.indices.dropLast(31).contains { stream[$0..<$0 + 32] == snippet }
            #expect(!found, "page 0's bytes appear somewhere in the encrypted stream")
        }
    }

    // MARK: - 3. completion digest

    static let pageA = [UInt8](repeating: 0xAA, count: 4096)
    static let pageB = [UInt8](repeating: 0xBB, count: 4096)
    static func hash(_ page: [UInt8]) -> UInt64 { page.withUnsafeBytes { ContentHash.page($0.baseAddress!, length: 4096) } }

    @Test("pages A and B swapped in valid packets fail the completion digest; placed right they pass", arguments: [true, false])
    func swappedPages(swapped: Bool) throws {
        let f = try fake.handshake(dstSize: 2 * 4096, fill: 0x77, channels: 1)
        let ch = try f.channel(0, of: 1)
        // Each entry's hash is its own payload's: every packet check passes.
        let offsets: [UInt64] = swapped ? [4096, 0] : [0, 4096]
        try ch.socket.sendAll(TestPacket.make(normal: 2, zero: 0, number: 0, offsets: offsets, data: Self.pageA + Self.pageB))
        try ch.socket.sendAll(TestPacket.sync(number: 1))
        try f.main.send(.endOfRound(round: 1))
        // The true table: page 0 = A, page 1 = B.
        try f.main.send(
            .complete(summary(rounds: 1, normal: 2, zero: 0, packets: 1, hashes: [Self.hash(Self.pageA), Self.hash(Self.pageB)])))
        let reply = f.ctl.commitSwitchover()
        let r = f.receiver.wait(timeout: 15)
        if swapped {
            #expect(r.status == 1, "\(r.stderr)")
            #expect(r.stderr.contains("differs from the source's") && r.stderr.contains("refusing to report success"), "\(r.stderr)")
            if case .error(let text)? = reply {
                #expect(text.contains("digest"))
            } else {
                Issue.record("no error reply: \(String(describing: reply))")
            }
            #expect(marked(f.dst), "a destination that failed the digest must stay marked incomplete")
        } else {
            #expect(r.status == 0 && reply == .committed, "\(r.stderr)")
            #expect(try contents(f.dst) == Data(Self.pageA + Self.pageB))
            #expect(!marked(f.dst))
        }
    }

    @Test("an older round's copy claimed as the last one fails the digest; the newer one passes", arguments: [true, false])
    func olderRoundCopy(claimOlder: Bool) throws {
        // Round 1: page 0 = A on channel 0. Round 2: page 0 = B on channel 1.
        let f = try fake.handshake(dstSize: 4096, fill: 0x77, channels: 2)
        let ch0 = try f.channel(0, of: 2), ch1 = try f.channel(1, of: 2)
        try ch0.socket.sendAll(TestPacket.make(normal: 1, zero: 0, number: 0, offsets: [0], data: Self.pageA))
        try ch0.socket.sendAll(TestPacket.sync(number: 1))
        try ch1.socket.sendAll(TestPacket.sync(number: 0))
        try f.main.send(.endOfRound(round: 1))
        try ch1.socket.sendAll(TestPacket.make(normal: 1, zero: 0, number: 1, offsets: [0], data: Self.pageB))
        try ch0.socket.sendAll(TestPacket.sync(number: 2))
        try ch1.socket.sendAll(TestPacket.sync(number: 2))
        try f.main.send(.endOfRound(round: 2))
        let last = claimOlder ? Self.pageA : Self.pageB
        try f.main.send(.complete(summary(rounds: 2, normal: 2, zero: 0, packets: 2, hashes: [Self.hash(last)])))
        let reply = f.ctl.commitSwitchover()
        let r = f.receiver.wait(timeout: 15)
        if claimOlder {
            #expect(r.status == 1, "\(r.stderr)")
            #expect(r.stderr.contains("some page holds another copy than the one the source sent last"), "\(r.stderr)")
            #expect(reply != .committed)
            #expect(marked(f.dst))
        } else {
            #expect(r.status == 0 && reply == .committed, "\(r.stderr)")
            #expect(try contents(f.dst) == Data(Self.pageB), "round 2's copy is the one in place")
        }
    }

    // MARK: - 4. stray connections

    @Test("an idle connection before send is dropped with a notice; idle ones during the migration do not fail it")
    func idleConnections() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 1024, seed: 31, isZero: { $0 % 7 == 0 })
        let port = freePort()
        let target = try SocketAddress(parsing: "tcp:127.0.0.1:\(port)")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", target.description, "--channels", "1"])
        #expect(receiver.waitForStderr("listening"))
        let idle = try Socket.connect(to: target, timeout: 5)
        // The hello deadline is 10 s.
        #expect(receiver.waitForStderr("sent no hello within", timeout: 14), "no notice about the idle connection")
        _ = idle
        // More idle connections: one before send, one between the main
        // channel and the multifd channel (the proxy opens it), and one once
        // pages flow.
        let strays = Strays(target)
        strays.open()
        let proxy = try MiddleProxy(
            to: target, onConnection: { index in if index == 1 { strays.open() } },
            onProgress: { connection, position in
                if connection == 1, position > 1 << 20 { strays.open(once: "mid-transfer") }
            })
        defer { proxy.stop() }
        let send = try livemig(["send", "--ram", src, "--to", proxy.address.description, "--channels", "1"], timeout: 40)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 0 && recv.status == 0, "send: \(send.stderr) receive: \(recv.stderr)")
        #expect(try filesEqual(src, dst))
        #expect(strays.count == 3)
    }

    @Test(
        "garbage, a multifd hello of another session and a second main hello during the multifd phase are dropped with notices; the migration completes",
        arguments: [false, true])
    func strayDuringMultifdPhase(keyed: Bool) throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 1024, seed: 32, isZero: { $0 % 3 == 0 })
        try writeFilled(dst, bytes: 1024 * pageSize, value: 0x77)
        let keyArgs = keyed ? ["--psk-file", try keygen(scratch, "k")] : []
        let port = freePort()
        let target = try SocketAddress(parsing: "tcp:127.0.0.1:\(port)")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", target.description, "--channels", "1"] + keyArgs)
        #expect(receiver.waitForStderr("listening"))
        let strays = Strays(target)
        let foreign = ChannelHello(session: .random(), kind: .multifd, channelID: 0, channelCount: 1).encoded()
        let secondMain = ChannelHello(session: .random(), kind: .main, channelID: 0, channelCount: 1).encoded()
        let heard = Flag()
        // When send's multifd channel reaches the proxy, the destination is
        // in its multifd phase: the strays arrive first, and the real channel
        // is forwarded once the destination has dropped them all.
        let proxy = try MiddleProxy(to: target) { index in
            guard index == 1 else { return }
            strays.open(sending: Array("GET / HTTP/1.1\r\nHost: livemig\r\n\r\n".utf8))
            strays.open(sending: foreign)
            strays.open(sending: secondMain)
            let ok =
                receiver.waitForStderr("not a livemig source", timeout: 5)
                && receiver.waitForStderr("(session ", timeout: 5)
                && receiver.waitForStderr("(a second main channel)", timeout: 5)
            heard.set(ok)
        }
        defer { proxy.stop() }
        let send = try livemig(
            ["send", "--ram", src, "--to", proxy.address.description, "--channels", "1"] + keyArgs, timeout: 40)
        let recv = receiver.wait(timeout: 20)
        #expect(heard.value, "the destination did not drop the strays with notices: \(recv.stderr)")
        #expect(send.status == 0 && recv.status == 0, "send: \(send.stderr) receive: \(recv.stderr)")
        #expect(recv.stderr.contains("field 'magic'"), "\(recv.stderr)")
        #expect(try filesEqual(src, dst))
    }

    @Test("a stray that sends the first bytes of a hello and stalls during the multifd phase does not hold up the real channel")
    func stalledHelloDuringMultifdPhase() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 256, seed: 33, isZero: { _ in false })
        let port = freePort()
        let target = try SocketAddress(parsing: "tcp:127.0.0.1:\(port)")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", target.description, "--channels", "1"])
        #expect(receiver.waitForStderr("listening"))
        let strays = Strays(target)
        // Three bytes of a hello's magic, then silence: the destination has
        // read them (poll says readable) before the real channel arrives.
        let proxy = try MiddleProxy(to: target) { index in
            guard index == 1 else { return }
            strays.open(sending: Array("LMI".utf8))
            usleep(300_000)
        }
        defer { proxy.stop() }
        let send = try livemig(["send", "--ram", src, "--to", proxy.address.description, "--channels", "1"], timeout: 40)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 0 && recv.status == 0, "send: \(send.stderr) receive: \(recv.stderr)")
        #expect(send.seconds < 8, "the real channel waited for the stray's hello deadline")
        #expect(try filesEqual(src, dst))
    }

    // MARK: - 5. zstd frames carry their checksum

    /// The zstd CLI's frame (`zstd -1 --no-check`) of one page of "A"s: no
    /// content checksum (frame header descriptor 0x00).
    static let frameWithoutChecksum: [UInt8] = [
        0x28, 0xB5, 0x2F, 0xFD, 0x00, 0x48, 0x4D, 0x00, 0x00, 0x10, 0x41, 0x41, 0x01, 0x00, 0xFB, 0xF7, 0x01, 0x16,
    ]
    /// The same with the checksum (`zstd -1`): descriptor 0x04, 4 more bytes.
    static let frameWithChecksum: [UInt8] = [
        0x28, 0xB5, 0x2F, 0xFD, 0x04, 0x48, 0x4D, 0x00, 0x00, 0x10, 0x41, 0x41, 0x01, 0x00, 0xFB, 0xF7, 0x01, 0x16, 0xC3, 0x58,
        0x2B, 0x6D,
    ]

    @Test("a correctly MACed compressed packet whose zstd frame has no checksum is refused naming it", arguments: [false, true])
    func zstdFrameWithoutChecksum(checksum: Bool) throws {
        let scratch = try Scratch()
        let keyFile = scratch.path("k")
        let raw = randomBytes(32)
        let hex = raw.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        #expect(FileManager.default.createFile(atPath: keyFile, contents: Data(hex.utf8), attributes: [.posixPermissions: 0o600]))
        let key = try PreSharedKey(bytes: raw)
        let f = try fake.handshake(dstSize: 4096, fill: 0x77, channels: 1, compression: .zstd, key: key, keyFile: keyFile)
        let ch = try f.channel(0, of: 1)
        let frame = checksum ? Self.frameWithChecksum : Self.frameWithoutChecksum
        let page = [UInt8](repeating: 0x41, count: 4096)
        try ch.socket.sendAll(
            TestPacket.make(
                normal: 1, zero: 0, offsets: [0], flags: .compressed, data: frame, hashes: [Self.hash(page)], sealer: ch.sealer()))
        try? ch.socket.sendAll(TestPacket.sync(number: 1, sealer: ch.sealer()))
        try? f.main.send(.endOfRound(round: 1))
        try? f.main.send(.complete(summary(rounds: 1, normal: 1, zero: 0, packets: 1, hashes: [Self.hash(page)])))
        let reply = f.ctl.commitSwitchover()
        let r = f.receiver.wait(timeout: 15)
        if checksum {
            #expect(r.status == 0 && reply == .committed, "the control frame must pass: \(r.stderr)")
            #expect(try contents(f.dst) == Data(page))
        } else {
            #expect(r.status == 1, "\(r.stderr)")
            #expect(r.stderr.contains("its zstd frame has no content checksum"), "\(r.stderr)")
            #expect(try contents(f.dst) == Data(repeating: 0x77, count: 4096), "the page was placed")
        }
    }

    @Test("send --compress zstd writes frames with the content-checksum flag")
    func sentFramesCarryChecksums() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeMixedImage(src, pages: 1024, seed: 41)
        let port = freePort()
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", "tcp:127.0.0.1:\(port)", "--channels", "1"])
        #expect(receiver.waitForStderr("listening"))
        let proxy = try MiddleProxy(to: try SocketAddress(parsing: "tcp:127.0.0.1:\(port)"))
        defer { proxy.stop() }
        let send = try livemig(
            ["send", "--ram", src, "--to", proxy.address.description, "--channels", "1", "--compress", "zstd"], timeout: 40)
        let recv = receiver.wait(timeout: 20)
        #expect(send.status == 0 && recv.status == 0, "send: \(send.stderr) receive: \(recv.stderr)")
        #expect(try filesEqual(src, dst))
        // Walk the recorded packets of channel 0 and look at every frame.
        let stream = proxy.sourceBytes(1)
        var at = Self.handshakeBytes, frames = 0
        while let h = packetHeader(stream, at: at), h.magic == MultiFDPacketHeader.magic {
            let payloadSize = Int(stream[at + 20..<at + 24].reduce(0) { $0 << 8 | UInt32($1) })
            let payload = at + MultiFDPacketHeader.size + Int(h.normal + h.zero) * MultiFDPacketHeader.entrySize
            if h.flags & MultiFDPacketHeader.Flags.compressed.rawValue != 0 {
                guard stream.count >= payload + 5 else { break }
                #expect(Array(stream[payload..<payload + 4]) == [0x28, 0xB5, 0x2F, 0xFD], "packet at \(at): not a zstd frame")
                #expect(stream[payload + 4] & 0x04 != 0, "packet at \(at): frame without a content checksum")
                frames += 1
            }
            at = payload + payloadSize
        }
        #expect(frames > 0, "no compressed packet was recorded")
    }
}

/// Idle connections to a destination, kept open until the test ends.
final class Strays: @unchecked Sendable {
    // @unchecked: `sockets` is under `lock`.
    private let target: SocketAddress
    private let lock = NSLock()
    private var sockets: [Socket] = []

    init(_ target: SocketAddress) { self.target = target }

    var count: Int { lock.withLock { sockets.count } }

    private var labels: Set<String> = []

    /// Opens one (writing `sending`, if any) and keeps it. With `once`, only
    /// the first call with that label opens one.
    func open(sending: [UInt8] = [], once label: String? = nil) {
        if let label, !lock.withLock({ labels.insert(label).inserted }) { return }
        guard let s = try? Socket.connect(to: target, timeout: 5) else { return }
        if !sending.isEmpty { try? s.sendAll(sending) }
        lock.withLock { sockets.append(s) }
    }
}

/// A flag one thread sets and another reads.
final class Flag: @unchecked Sendable {
    // @unchecked: `stored` is under `lock`.
    private let lock = NSLock()
    private var stored = false

    var value: Bool { lock.withLock { stored } }
    func set(_ v: Bool) { lock.withLock { stored = v } }
}
