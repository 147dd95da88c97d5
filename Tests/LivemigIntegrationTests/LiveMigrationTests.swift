import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Live migration with real processes: a `livemig stress` guest keeps
/// writing while `send --guest` migrates it; the destination must end with
/// exactly the memory the guest had when paused, and resume it.
@Suite("live migration", .serialized)
struct LiveMigrationTests {
    static let size = "64MiB"
    static let bytes = 64 << 20

    /// A guest, a receiver and their files in one scratch directory.
    final class Rig {
        let scratch: Scratch
        let src, srcCtl, dst, dstCtl, events: String
        let addr: String
        var guest: LivemigProcess?
        var receiver: LivemigProcess?

        init() throws {
            scratch = try Scratch()
            src = scratch.path("src.ram")
            srcCtl = scratch.path("src.ctl")
            dst = scratch.path("dst.ram")
            dstCtl = scratch.path("dst.ctl")
            events = scratch.path("events.jsonl")
            addr = "tcp:127.0.0.1:\(freePort())"
        }

        func startGuest(pattern: String, rate: String, threads: Int = 2) throws {
            let g = try LivemigProcess([
                "stress", "--ram", src, "--control", srcCtl, "--size", LiveMigrationTests.size, "--pattern", pattern,
                "--threads", "\(threads)", "--rate", rate,
            ])
            #expect(g.waitForStderr("guest started"), "the guest did not start")
            guest = g
            usleep(200_000)  // let it dirty some pages first
        }

        func startReceiver(extra: [String] = []) throws {
            let r = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--guest", dstCtl, "--format", "json"] + extra)
            #expect(r.waitForStderr("listening"))
            receiver = r
        }

        func send(_ extra: [String] = [], timeout: Double = 120) throws -> (status: Int32, stdout: String, stderr: String, seconds: Double)
        {
            try livemig(
                ["send", "--ram", src, "--to", addr, "--guest", srcCtl, "--format", "json", "--events", events] + extra, timeout: timeout)
        }

        /// The whole successful live migration: starts a guest writing
        /// `pattern` at `rate` and a receiver, runs `send` with `options`,
        /// and expects send, receive and the source guest to succeed and the
        /// destination RAM to equal the source RAM at the pause (both guests
        /// are stopped then). Returns what `send` printed.
        func migrateLive(pattern: String, rate: String, _ options: [String] = []) throws -> (
            status: Int32, stdout: String, stderr: String, seconds: Double
        ) {
            try startGuest(pattern: pattern, rate: rate)
            try startReceiver()
            let sent = try send(options)
            let recv = receiver!.wait()
            let g = guest!.wait(timeout: 20)
            #expect(sent.status == 0, "\(sent.stderr)")
            #expect(recv.status == 0, "\(recv.stderr)")
            #expect(g.status == 0 && g.stdout.contains("migrated"), "\(g.stdout) \(g.stderr)")
            #expect(try filesEqual(src, dst), "destination RAM differs from the source RAM at the pause")
            return sent
        }

        /// Stops the source guest (SIGINT: it saves its state) and waits.
        func stopGuest() -> (status: Int32, stdout: String, stderr: String, seconds: Double)? {
            guard let g = guest else { return nil }
            if g.process.isRunning { kill(g.pid, SIGINT) }
            return g.wait(timeout: 20)
        }

        deinit {
            for p in [guest, receiver].compactMap({ $0 }) where p.process.isRunning { kill(p.pid, SIGKILL) }
        }
    }

    func verify(_ ram: String, _ ctl: String) throws -> (status: Int32, stdout: String, stderr: String, seconds: Double) {
        try livemig(["verify", "--ram", ram, "--control", ctl])
    }

    @Test("counter guest: destination equals the source at the pause, verifies, and resumes")
    func counterGuest() throws {
        let rig = try Rig()
        // Both guests are stopped after it: the source at the pause, the
        // destination not resumed yet; their RAM was compared.
        let send = try rig.migrateLive(pattern: "counter", rate: "256MiB/s")
        let vd = try verify(rig.dst, rig.dstCtl)
        #expect(vd.status == 0, "\(vd.stdout) \(vd.stderr)")
        #expect(try verify(rig.src, rig.srcCtl).status == 0)

        let s = try stats(send.stdout)
        #expect(s["status"] as? String == "completed")
        #expect(s["downtime"] != nil)
        let ram = try #require(s["ram"] as? [String: Any])
        #expect((ram["dirty-sync-count"] as? Int ?? 0) >= 2, "a live migration takes a precopy round and the final one")
        #expect((ram["precopy-bytes"] as? Int ?? 0) >= Self.bytes)
        #expect(ram["downtime-bytes"] != nil)
        let lines = try String(contentsOfFile: rig.events, encoding: .utf8).split(separator: "\n")
        #expect(!lines.isEmpty, "one event line per precopy round")
        #expect(lines.last?.contains("\"decision\":\"switchover\"") == true)

        // The guest continues on the destination and still verifies.
        let resumed = try livemig([
            "stress", "--ram", rig.dst, "--control", rig.dstCtl, "--resume", "--duration", "300ms", "--rate", "128MiB/s",
        ])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(resumed.stderr.contains("resumed: pattern counter"))
        let again = try verify(rig.dst, rig.dstCtl)
        #expect(again.status == 0, "\(again.stdout) \(again.stderr)")
        #expect(again.stdout != vd.stdout, "the resumed guest made progress")
        // The migrated-away source refuses to resume.
        let stale = try livemig(["stress", "--ram", rig.src, "--control", rig.srcCtl, "--resume", "--duration", "100ms"])
        #expect(stale.status == 1 && stale.stderr.contains("migrated away"), "\(stale.stderr)")
    }

    @Test("random and hotset guests at a converging rate", arguments: ["random", "hotset:0.1"])
    func otherPatterns(_ pattern: String) throws {
        _ = try Rig().migrateLive(pattern: pattern, rate: "128MiB/s")
    }

    @Test("a guest faster than --max-bandwidth: fails cleanly without auto-converge, the guest keeps running")
    func doesNotConverge() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "counter", rate: "256MiB/s")
        try rig.startReceiver()
        let send = try rig.send(["--max-bandwidth", "64MiB/s", "--max-rounds", "3"])
        #expect(send.status == 1)
        #expect(send.stderr.contains("did not converge after 3 rounds") && send.stderr.contains("keeps running"), "\(send.stderr)")
        #expect(rig.guest!.process.isRunning, "the source guest must keep running")
        // It is still writing: its RAM changes.
        let a = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        usleep(100_000)
        #expect(try Data(contentsOf: URL(fileURLWithPath: rig.src)) != a, "the source guest is not writing")
        let recv = rig.receiver!.wait(timeout: 20)
        #expect(recv.status == 1, "the destination must not report success: \(recv.stderr)")
        let g = rig.stopGuest()
        #expect(g?.status == 0)
        let v = try verify(rig.src, rig.srcCtl)
        #expect(v.status == 0, "source RAM damaged: \(v.stdout) \(v.stderr)")
    }

    @Test("the same guest completes with --auto-converge")
    func autoConverges() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "counter", rate: "256MiB/s")
        try rig.startReceiver()
        let send = try rig.send([
            "--max-bandwidth", "64MiB/s", "--auto-converge", "--throttle-initial", "80", "--throttle-increment", "10", "--max-rounds", "40",
        ])
        let recv = rig.receiver!.wait()
        #expect(send.status == 0, "\(send.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(rig.guest!.wait(timeout: 20).stdout.contains("migrated"))
        let s = try stats(send.stdout)
        #expect((s["cpu-throttle-percentage"] as? Int ?? 0) >= 80, "\(send.stdout)")
        #expect(try filesEqual(rig.src, rig.dst))
        #expect(try verify(rig.dst, rig.dstCtl).status == 0)
    }

    /// Waits until the events file has `n` lines (rounds finished).
    func waitForRounds(_ path: String, _ n: Int, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let t = try? String(contentsOfFile: path, encoding: .utf8), t.split(separator: "\n").count >= n { return true }
            usleep(10_000)
        }
        return false
    }

    @Test("destination killed during round 2: the source guest keeps running and verifies")
    func destinationKilled() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "counter", rate: "256MiB/s")
        try rig.startReceiver()
        let sender = try LivemigProcess(
            ["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--events", rig.events, "--max-bandwidth", "64MiB/s"])
        #expect(waitForRounds(rig.events, 1), "round 1 never finished")
        usleep(100_000)  // well into round 2 (a round takes about a second)
        kill(rig.receiver!.pid, SIGKILL)
        let send = sender.wait(timeout: 30)
        #expect(send.status == 1)
        #expect(send.seconds < 10)
        #expect(send.stderr.contains("keeps running"), "\(send.stderr)")
        #expect(rig.guest!.process.isRunning)
        #expect(rig.stopGuest()?.status == 0)
        let v = try verify(rig.src, rig.srcCtl)
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("SIGINT to send during precopy cancels it; the guest keeps running unthrottled")
    func cancelled() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "counter", rate: "256MiB/s")
        try rig.startReceiver()
        let sender = try LivemigProcess(
            [
                "send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--events", rig.events, "--max-bandwidth", "64MiB/s",
                "--auto-converge", "--throttle-initial", "50",
            ])
        #expect(waitForRounds(rig.events, 3), "three rounds never finished")
        kill(sender.pid, SIGINT)
        let send = sender.wait(timeout: 30)
        #expect(send.status == 1)
        #expect(send.stderr.contains("cancelled by SIGINT") && send.stderr.contains("keeps running"), "\(send.stderr)")
        #expect(rig.guest!.process.isRunning)
        let recv = rig.receiver!.wait(timeout: 20)
        #expect(recv.status == 1)
        #expect(recv.stderr.contains("cancelled by SIGINT"), "the destination learns why: \(recv.stderr)")
        let g = rig.stopGuest()
        #expect(g?.status == 0)
        // Unthrottled after the cancel: it reached its target rate again.
        #expect(try verify(rig.src, rig.srcCtl).status == 0)
    }

    @Test("the source dies while the guest is paused: the guest resumes by itself after the lease")
    func sourceDiesDuringPause() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "counter", rate: "128MiB/s")
        try rig.startReceiver()
        let sender = try LivemigProcess(
            ["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--events", rig.events],
            env: ["LIVEMIG_TEST_HOLD_PAUSE": "30"])
        // The switchover event is written just before the pause request.
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, (try? String(contentsOfFile: rig.events, encoding: .utf8))?.contains("switchover") != true {
            usleep(10_000)
        }
        usleep(300_000)
        // Paused: the RAM does not change.
        let a = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        usleep(200_000)
        #expect(try Data(contentsOf: URL(fileURLWithPath: rig.src)) == a, "the guest should be paused now")
        kill(sender.pid, SIGKILL)
        sender.wait()
        // Within the 2 s lease (plus slack) the guest writes again.
        var resumed = false
        let until = Date().addingTimeInterval(6)
        while Date() < until, !resumed {
            usleep(200_000)
            resumed = try Data(contentsOf: URL(fileURLWithPath: rig.src)) != a
        }
        #expect(resumed, "the guest stayed paused after its source died")
        #expect(rig.guest!.process.isRunning)
        let g = rig.stopGuest()
        #expect(g?.stdout.contains("resumed by itself") == true, "\(g?.stdout ?? "")")
        #expect(try verify(rig.src, rig.srcCtl).status == 0)
        _ = rig.receiver!.wait(timeout: 20)
    }

    @Test("a live source and a destination without --guest disagree clearly")
    func guestFlagMismatch() throws {
        let rig = try Rig()
        try rig.startGuest(pattern: "random", rate: "64MiB/s")
        let r = try LivemigProcess(["receive", "--ram", rig.dst, "--listen", rig.addr])
        #expect(r.waitForStderr("listening"))
        let send = try rig.send()
        let recv = r.wait(timeout: 20)
        #expect(send.status == 1 && recv.status == 1)
        #expect(send.stderr.contains("--guest"), "\(send.stderr)")
        #expect(rig.guest!.process.isRunning)
        _ = rig.stopGuest()
    }
}
