import Foundation
import MigrationWire
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// No operator mistake destroys a guest, a failed migration leaves no file
/// that looks good, and bad numbers are refused with a message, never a
/// crash (issue 13).
@Suite("safety: ownership, incomplete files, bounds, bad state", .serialized)
struct SafetyTests {
    // MARK: - helpers

    /// A counter guest on `ram`/`ctl`, started and announced.
    func startGuest(_ ram: String, _ ctl: String, size: String = "4MiB", rate: String = "8MiB/s") throws -> LivemigProcess {
        let g = try LivemigProcess(["stress", "--ram", ram, "--control", ctl, "--size", size, "--pattern", "counter", "--rate", rate])
        #expect(g.waitForStderr("guest started"), "the guest did not start")
        return g
    }

    /// Stops a guest with SIGINT (it saves its state) and waits.
    func stop(_ g: LivemigProcess) -> (status: Int32, stdout: String, stderr: String, seconds: Double) {
        kill(g.pid, SIGINT)
        return g.wait(timeout: 10)
    }

    /// Whether `path` carries the incomplete mark (the extended attribute).
    func marked(_ path: String) -> Bool {
        // <sys/xattr.h> is not in Swift's Glibc module: look getxattr(2) up.
        typealias GetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
        guard let sym = dlsym(nil, "getxattr") else { return false }
        return unsafeBitCast(sym, to: GetXattr.self)(path, "user.livemig.incomplete", nil, 0) >= 0
    }

    /// The run state word (offset 64) of a control file.
    func runState(_ ctl: String) throws -> UInt32 {
        let d = try Data(contentsOf: URL(fileURLWithPath: ctl))
        return d.withUnsafeBytes { $0.load(fromByteOffset: 64, as: UInt32.self) }
    }

    /// A receiver on a Unix socket in `scratch`, and a fake source that got
    /// its hello accepted and announced a `size`-byte layout. Returns the
    /// receiver, the main channel and the reply to the layout.
    func fakeSource(
        scratch: Scratch, ram: String, size: UInt64, extra: [String] = [], live: Bool = false
    ) throws -> (receiver: LivemigProcess, main: SourceChannel, layoutReply: MainMessage?) {
        let addr = try SocketAddress(parsing: "unix:" + scratch.path("s"))
        let receiver = try LivemigProcess(["receive", "--ram", ram, "--listen", addr.description, "--channels", "1"] + extra)
        #expect(receiver.waitForStderr("listening"), "the receiver did not listen")
        let main = try SourceChannel(
            to: addr, hello: ChannelHello(session: .random(), kind: .main, channelID: 0, channelCount: 1, flags: live ? .guestState : []))
        #expect(try main.next() == .helloAccepted)
        try main.send(.ramLayout([RAMBlockLayout(name: "pc.ram", size: size, pageSize: 4096)]))
        return (receiver, main, try? main.next())
    }

    // MARK: - ownership

    @Test("receive pointed at a running guest's RAM fails at once and leaves the guest intact")
    func receiveRefusesRunningGuestRAM() throws {
        let scratch = try Scratch()
        let ram = scratch.path("g.ram"), ctl = scratch.path("g.ctl")
        let g = try startGuest(ram, ctl)
        let r = try livemig(["receive", "--ram", ram, "--listen", "unix:" + scratch.path("s")], timeout: 20)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.seconds < 5)
        #expect(!r.stderr.contains("listening"), "refused before listening: \(r.stderr)")
        #expect(
            r.stderr.contains("RAM file \(ram) is in use by another livemig process (pid \(g.pid)"), "\(r.stderr)")
        #expect(g.process.isRunning)
        #expect(stop(g).status == 0)
        // Every page still agrees with the guest's own state: nothing was written.
        let v = try livemig(["verify", "--ram", ram, "--control", ctl])
        #expect(v.status == 0, "\(v.stdout)\(v.stderr)")
    }

    @Test("a second receiver on one RAM file, and a second guest on it, are refused")
    func secondReceiverRefused() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram")
        try writeFilled(dst, bytes: 1 << 20, value: 0x5A)
        let first = try LivemigProcess(["receive", "--ram", dst, "--listen", "unix:" + scratch.path("s1")])
        #expect(first.waitForStderr("listening"))
        let second = try livemig(["receive", "--ram", dst, "--listen", "unix:" + scratch.path("s2")], timeout: 20)
        #expect(second.status == 1, "\(second.stderr)")
        #expect(second.stderr.contains("is in use by another livemig process (pid \(first.pid)"), "\(second.stderr)")
        let guest = try livemig(["stress", "--ram", dst, "--control", scratch.path("c.ctl"), "--duration", "100ms"], timeout: 20)
        #expect(guest.status == 1, "\(guest.stderr)")
        #expect(guest.stderr.contains("is in use by another livemig process"), "\(guest.stderr)")
        kill(first.pid, SIGINT)
        first.wait(timeout: 10)
        #expect(try Data(contentsOf: URL(fileURLWithPath: dst)) == Data(repeating: 0x5A, count: 1 << 20))
    }

    @Test("receive --guest refuses, before listening, a control file whose guest runs")
    func receiveRefusesLiveControl() throws {
        let scratch = try Scratch()
        let ram = scratch.path("g.ram"), ctl = scratch.path("g.ctl")
        let g = try startGuest(ram, ctl)
        let r = try livemig(
            ["receive", "--ram", scratch.path("other.ram"), "--guest", ctl, "--listen", "unix:" + scratch.path("s")], timeout: 20)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(!r.stderr.contains("listening"), "\(r.stderr)")
        #expect(r.stderr.contains("belongs to a running guest") && r.stderr.contains("pid \(g.pid)"), "\(r.stderr)")
        #expect(stop(g).status == 0)
    }

    @Test("two send --guest on one guest: the second is refused, the first goes on")
    func secondSenderRefused() throws {
        let scratch = try Scratch()
        let ram = scratch.path("g.ram"), ctl = scratch.path("g.ctl"), events = scratch.path("events")
        let g = try startGuest(ram, ctl)
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", scratch.path("d.ram"), "--guest", scratch.path("d.ctl"), "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        // The first source holds the paused guest for 3 s at switchover
        // (within its switchover deadline).
        let first = try LivemigProcess(
            ["send", "--ram", ram, "--guest", ctl, "--to", addr, "--events", events, "--switchover-timeout", "10s"],
            env: ["LIVEMIG_TEST_HOLD_PAUSE": "3"])
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline, (try? String(contentsOfFile: events, encoding: .utf8))?.contains("switchover") != true {
            usleep(10_000)
        }
        let second = try livemig(["send", "--ram", ram, "--guest", ctl, "--to", addr], timeout: 20)
        #expect(second.status == 1, "\(second.stderr)")
        #expect(second.stderr.contains("already being migrated by another livemig process (pid \(first.pid)"), "\(second.stderr)")
        #expect(first.process.isRunning, "the first migration must go on")
        let f = first.wait(timeout: 30)
        #expect(f.status == 0, "\(f.stderr)")
        #expect(receiver.wait(timeout: 20).status == 0)
        #expect(g.wait(timeout: 20).stdout.contains("migrated"))
        #expect(try livemig(["verify", "--ram", scratch.path("d.ram"), "--control", scratch.path("d.ctl")]).status == 0)
    }

    // MARK: - a failed migration leaves no file that looks good

    @Test("a RAM file the receiver created is removed when the migration fails")
    func createdFileRemovedOnFailure() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram")
        let f = try fakeSource(scratch: scratch, ram: dst, size: 1 << 20)
        #expect(f.layoutReply == .layoutAccepted)
        #expect(FileManager.default.fileExists(atPath: dst), "created when the layout arrived")
        try f.main.send(.error("disk on fire"))
        let r = f.receiver.wait(timeout: 20)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst), "the partial RAM file is still there")

        // --size: created before listening, removed on a cancel too.
        let sized = scratch.path("sized.ram")
        let p = try LivemigProcess(["receive", "--ram", sized, "--size", "1MiB", "--listen", "unix:" + scratch.path("s2")])
        #expect(p.waitForStderr("listening"))
        #expect(FileManager.default.fileExists(atPath: sized))
        kill(p.pid, SIGTERM)
        #expect(p.wait(timeout: 10).status == 1)
        #expect(!FileManager.default.fileExists(atPath: sized))
    }

    @Test("a RAM file that existed is marked incomplete on failure; guest commands refuse it; success clears it")
    func existingFileMarkedIncomplete() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram"), ctl = scratch.path("d.ctl")
        // A guest lived here: a valid counter RAM and state.
        let made = try livemig(["stress", "--ram", dst, "--control", ctl, "--size", "1MiB", "--pattern", "counter", "--duration", "200ms"])
        #expect(made.status == 0, "\(made.stderr)")
        let f = try fakeSource(scratch: scratch, ram: dst, size: 1 << 20)
        #expect(f.layoutReply == .layoutAccepted)
        #expect(marked(dst), "marked before the first page can arrive")
        try f.main.send(.error("link lost"))
        #expect(f.receiver.wait(timeout: 20).status == 1)
        #expect(FileManager.default.fileExists(atPath: dst))
        #expect(marked(dst))
        for args in [
            ["stress", "--ram", dst, "--control", ctl, "--resume", "--duration", "100ms"],
            ["stress", "--ram", dst, "--control", ctl, "--duration", "100ms"],
            ["verify", "--ram", dst, "--control", ctl],
            ["send", "--ram", dst, "--to", "unix:" + scratch.path("nobody")],
        ] {
            let r = try livemig(args, timeout: 20)
            #expect(r.status == 1, "\(args): \(r.stderr)")
            #expect(r.stderr.contains("did not complete"), "\(args): \(r.stderr)")
        }
        // A migration that completes into it clears the mark.
        let src = scratch.path("src.ram")
        try writeImage(src, pages: 256, seed: 7, isZero: { $0 % 3 == 0 })
        let addr = "unix:" + scratch.path("s3")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr], timeout: 30)
        #expect(send.status == 0, "\(send.stderr)")
        #expect(receiver.wait(timeout: 20).status == 0)
        #expect(!marked(dst))
        #expect(try filesEqual(src, dst))
    }

    @Test("a control file from an earlier migration is marked incomplete by a failed one and cannot resume")
    func controlMarkedIncomplete() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram"), ctl = scratch.path("d.ctl")
        let made = try livemig(["stress", "--ram", dst, "--control", ctl, "--size", "1MiB", "--pattern", "counter", "--duration", "200ms"])
        #expect(made.status == 0, "\(made.stderr)")
        let f = try fakeSource(scratch: scratch, ram: dst, size: 1 << 20, extra: ["--guest", ctl], live: true)
        #expect(f.layoutReply == .layoutAccepted)
        #expect(try runState(ctl) == 4, "the control file is marked incomplete when the layout is accepted")
        f.main.socket.shutdown()
        #expect(f.receiver.wait(timeout: 20).status == 1)
        #expect(try runState(ctl) == 4)
        let r = try livemig(["stress", "--ram", dst, "--control", ctl, "--resume", "--duration", "100ms"], timeout: 20)
        #expect(r.status == 1)
        #expect(r.stderr.contains("did not complete"), "\(r.stderr)")
    }

    // MARK: - bounds

    @Test("a layout announcing 1 TiB is refused, naming the size and the bound, and nothing is created")
    func hugeLayoutRefused() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram")
        let f = try fakeSource(scratch: scratch, ram: dst, size: 1 << 40)
        guard case .error(let text)? = f.layoutReply else {
            Issue.record("expected an error reply, got \(String(describing: f.layoutReply))")
            return
        }
        #expect(text.contains("1099511627776") && text.contains("--max-size"), "\(text)")
        let r = f.receiver.wait(timeout: 20)
        #expect(r.status == 1)
        #expect(r.stderr.contains("1099511627776"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst))
    }

    @Test("--max-size bounds a layout and --size; free space bounds both")
    func maxSizeAndFreeSpace() throws {
        let scratch = try Scratch()
        let dst = scratch.path("d.ram")
        let f = try fakeSource(scratch: scratch, ram: dst, size: 2 << 20, extra: ["--max-size", "1MiB"])
        guard case .error(let text)? = f.layoutReply else {
            Issue.record("expected an error reply, got \(String(describing: f.layoutReply))")
            return
        }
        #expect(text.contains("2097152") && text.contains("1048576"), "\(text)")
        #expect(f.receiver.wait(timeout: 20).status == 1)
        #expect(!FileManager.default.fileExists(atPath: dst))

        let r = try livemig(["receive", "--ram", dst, "--size", "2MiB", "--max-size", "1MiB", "--listen", "unix:" + scratch.path("s2")])
        #expect(r.status == 1 && r.stderr.contains("--max-size"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dst))

        try withSmallTmpfs(scratch) { dir in
            let r = try livemig(["receive", "--ram", dir + "/d.ram", "--size", "16MiB", "--listen", "unix:" + scratch.path("s3")])
            #expect(r.status == 1 && r.stderr.contains("does not fit") && r.stderr.contains("bytes free"), "\(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/d.ram"))
        }
    }

    /// Runs `body` with an 8 MiB tmpfs mounted in `scratch`; skips it when
    /// mounting is not allowed (not root).
    func withSmallTmpfs(_ scratch: Scratch, _ body: (String) throws -> Void) throws {
        let dir = scratch.path("small")
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        guard run("/bin/mount", ["-t", "tmpfs", "-o", "size=8M", "tmpfs", dir]) else { return }
        defer { _ = run("/bin/umount", [dir]) }
        try body(dir)
    }

    /// Runs a program quietly; true when it exited 0.
    func run(_ program: String, _ args: [String]) -> Bool {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return false }
        p.waitUntilExit()
        return p.terminationStatus == 0
    }

    @Test("stress on a full file system says it is full, and removes the RAM file it created")
    func fullFileSystem() throws {
        let scratch = try Scratch()
        try withSmallTmpfs(scratch) { dir in
            let r = try livemig(["stress", "--ram", dir + "/g.ram", "--control", dir + "/g.ctl", "--size", "16MiB"], timeout: 20)
            #expect(r.status == 1)
            #expect(r.stderr.contains("file system is full") && !r.stderr.contains("Bad address"), "\(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir + "/g.ram"))
        }
    }

    // MARK: - bad state never crashes

    @Test("a stored pass near 2^64 is refused by verify and stress --resume, not a crash")
    func absurdPassRefused() throws {
        let scratch = try Scratch()
        let ram = scratch.path("g.ram"), ctl = scratch.path("g.ctl")
        let made = try livemig(["stress", "--ram", ram, "--control", ctl, "--size", "1MiB", "--pattern", "counter", "--duration", "100ms"])
        #expect(made.status == 0, "\(made.stderr)")
        // 1 MiB = 256 pages: one bitmap word, so the state is at 4096 + 4096.
        let fd = open(ctl, O_RDWR)
        var huge = UInt64.max.littleEndian
        #expect(pwrite(fd, &huge, 8, 8192 + 40) == 8)  // thread 0's pass
        close(fd)
        for args in [["verify", "--ram", ram, "--control", ctl], ["stress", "--ram", ram, "--control", ctl, "--resume"]] {
            let r = try livemig(args, timeout: 20)
            #expect(r.status == 1, "\(args): \(r.stderr)")
            #expect(r.stderr.contains("2^62") && r.stderr.contains("corrupt"), "\(args): \(r.stderr)")
        }
    }

    @Test("a low rate stops within its duration")
    func lowRateHonoursDuration() throws {
        let scratch = try Scratch()
        let r = try livemig(
            [
                "stress", "--ram", scratch.path("g.ram"), "--control", scratch.path("g.ctl"), "--size", "1MiB", "--rate", "4KiB/s",
                "--duration", "300ms",
            ], timeout: 30)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.seconds < 3, "the guest ran \(r.seconds) s for a 300 ms duration")
        #expect(r.stdout.contains("duration reached"), "\(r.stdout)")
    }

    @Test("receive removes its Unix socket file on success and on a signal")
    func socketFileRemoved() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), sock = scratch.path("s")
        try writeImage(src, pages: 64, seed: 3, isZero: { _ in false })
        let receiver = try LivemigProcess(["receive", "--ram", scratch.path("d.ram"), "--listen", "unix:" + sock])
        #expect(receiver.waitForStderr("listening"))
        #expect(FileManager.default.fileExists(atPath: sock))
        #expect(try livemig(["send", "--ram", src, "--to", "unix:" + sock], timeout: 30).status == 0)
        #expect(receiver.wait(timeout: 20).status == 0)
        #expect(!FileManager.default.fileExists(atPath: sock), "left behind after success")

        let again = try LivemigProcess(["receive", "--ram", scratch.path("e.ram"), "--listen", "unix:" + sock])
        #expect(again.waitForStderr("listening"))
        kill(again.pid, SIGINT)
        #expect(again.wait(timeout: 10).status == 1)
        #expect(!FileManager.default.fileExists(atPath: sock), "left behind after SIGINT")
    }
}
