import Foundation
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Postcopy with real processes (docs/PROTOCOL.md §8): a counter guest that
/// dirties memory as fast as it can (precopy cannot converge) moves to an
/// incoming guest (`stress --incoming`) that starts running before its RAM
/// has arrived. RAM files live on tmpfs (/dev/shm), as postcopy needs.
@Suite("postcopy", .serialized)
struct PostcopyTests {
    static let size = "64MiB"

    final class Rig {
        let scratch: Scratch
        let src, srcCtl, dst, dstCtl: String
        let addr: String
        var guest: LivemigProcess?
        var incoming: LivemigProcess?
        var receiver: LivemigProcess?

        init() throws {
            scratch = try Scratch(under: "/dev/shm/")
            src = scratch.path("src.ram")
            srcCtl = scratch.path("src.ctl")
            dst = scratch.path("dst.ram")
            dstCtl = scratch.path("dst.ctl")
            addr = "tcp:127.0.0.1:\(freePort())"
        }

        deinit {
            // A guest left waiting on a missing page would never end.
            for p in [guest, incoming, receiver] where p?.process.isRunning == true { kill(p!.pid, SIGKILL) }
        }

        func startGuest() throws {
            let g = try LivemigProcess([
                "stress", "--ram", src, "--control", srcCtl, "--size", PostcopyTests.size, "--pattern", "counter", "--threads", "2",
                "--rate", "unlimited",
            ])
            #expect(g.waitForStderr("guest started"), "the guest did not start")
            guest = g
            usleep(200_000)
        }

        func startIncoming(duration: String = "3s", extra: [String] = []) throws {
            let g = try LivemigProcess(
                [
                    "stress", "--incoming", "--ram", dst, "--control", dstCtl, "--size", PostcopyTests.size, "--duration", duration,
                ] + extra)
            #expect(g.waitForStderr("incoming guest waiting"), "the incoming guest did not start")
            incoming = g
        }

        func startReceiver(env: [String: String] = [:], extra: [String] = []) throws {
            let r = try LivemigProcess(
                ["receive", "--ram", dst, "--listen", addr, "--guest", dstCtl, "--format", "json", "--peer-timeout", "3s"] + extra, env: env
            )
            #expect(r.waitForStderr("listening"))
            receiver = r
        }

        func sendArgs(_ extra: [String]) -> [String] {
            ["send", "--ram", src, "--to", addr, "--guest", srcCtl, "--format", "json", "--peer-timeout", "3s"] + extra
        }

        typealias Output = (status: Int32, stdout: String, stderr: String, seconds: Double)

        /// Runs `send` with `extra`, waits for receive and both guests, and
        /// expects every one to end well: the source guest migrated away.
        func migrate(_ extra: [String]) throws -> (sent: Output, recv: Output, incoming: Output) {
            let sent = try livemig(sendArgs(extra), timeout: 60)
            let recv = receiver!.wait(timeout: 30)
            let g = guest!.wait(timeout: 20)
            let dg = incoming!.wait(timeout: 30)
            #expect(sent.status == 0, "\(sent.stderr)")
            #expect(recv.status == 0, "\(recv.stderr)")
            #expect(g.status == 0 && g.stdout.contains("migrated"), "\(g.stdout) \(g.stderr)")
            #expect(dg.status == 0, "\(dg.stdout) \(dg.stderr)")
            return (sent, recv, dg)
        }
    }

    @Test("a counter guest at unlimited rate migrates with --postcopy; the destination guest runs during postcopy and verifies")
    func counterGuestPostcopy() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming()
        try rig.startReceiver()
        // The pusher is held to 32 MiB/s, so the running destination guest
        // must fault on pages that have not arrived.
        let events = rig.scratch.path("events.jsonl")
        let (sent, recv, _) = try rig.migrate(["--postcopy", "--max-bandwidth", "32MiB/s", "--events", events])
        let s = try stats(sent.stdout), r = try stats(recv.stdout)
        #expect(s["status"] as? String == "completed")
        let sp = try #require(s["postcopy"] as? [String: Any]), rp = try #require(r["postcopy"] as? [String: Any])
        // Faults were read from the destination guest before every page had
        // arrived: it ran during postcopy. Each one was asked for once.
        let faults = try #require(rp["postcopy-faults"] as? Int), requests = try #require(rp["postcopy-requests"] as? Int)
        #expect(faults > 0, "the destination guest never faulted: it did not run during postcopy")
        #expect(requests > 0 && requests <= faults)
        #expect(
            sp["postcopy-requests"] as? Int == requests, "source served \(sp["postcopy-requests"] ?? "-"), destination asked \(requests)")
        // One line per phase in --events, in order.
        let decisions = try String(contentsOfFile: events, encoding: .utf8).split(separator: "\n").compactMap { line in
            (try? JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])?["decision"] as? String
        }
        #expect(decisions.suffix(3) == ["postcopy", "postcopy-active", "postcopy-completed"], "\(decisions)")
        // Every page's counter agrees with the state the destination guest
        // saved when it stopped: no page was lost, stale or zero.
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("a guest that reads every page after the switch sees exactly the source's final content")
    func readEveryPageAfterTheSwitch() throws {
        let rig = try Rig()
        try rig.startGuest()
        let seen = rig.scratch.path("seen.ram")
        try rig.startIncoming(duration: "1s", extra: ["--read-every-page", seen])
        try rig.startReceiver()
        // At 32 MiB/s most pages are still on their way when the guest
        // starts reading: its loads fault and are served on demand.
        let (_, recv, dg) = try rig.migrate(["--postcopy", "--max-bandwidth", "32MiB/s"])
        #expect(dg.stderr.contains("read every page"), "\(dg.stderr)")
        let rp = try #require(try stats(recv.stdout)["postcopy"] as? [String: Any])
        #expect(rp["postcopy-faults"] as? Int ?? 0 > 0, "the reads never faulted: every page had arrived before them")
        // The source guest stopped at the pause and its RAM has not changed
        // since: it is the final content. Compare page by page.
        let source = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        let read = try Data(contentsOf: URL(fileURLWithPath: seen))
        #expect(read.count == source.count)
        let page = 4096
        var differing: [Int] = []
        var written = 0
        source.withUnsafeBytes { a in
            read.withUnsafeBytes { b in
                guard a.count == b.count else { return }
                for p in 0..<(a.count / page) {
                    let x = UnsafeRawBufferPointer(rebasing: a[(p * page)..<((p + 1) * page)])
                    let y = UnsafeRawBufferPointer(rebasing: b[(p * page)..<((p + 1) * page)])
                    if memcmp(x.baseAddress!, y.baseAddress!, page) != 0 { differing.append(p) }
                    if x.contains(where: { $0 != 0 }) { written += 1 }
                }
            }
        }
        #expect(differing.isEmpty, "\(differing.count) pages read differ from the source, first \(differing.prefix(8))")
        #expect(written > 0, "the source wrote no page: the comparison proves nothing")
    }

    @Test("SIGUSR1 to send switches to postcopy at once, cutting the round in progress")
    func switchOnSignal() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming(duration: "1s")
        try rig.startReceiver()
        // Round 1 takes about 2 s at 32 MiB/s; without the signal the
        // switch would wait for round 50.
        let send = try LivemigProcess(rig.sendArgs(["--postcopy", "--postcopy-after-rounds", "50", "--max-bandwidth", "32MiB/s"]))
        usleep(500_000)
        kill(send.pid, SIGUSR1)
        let sent = send.wait(timeout: 60)
        let recv = rig.receiver!.wait(timeout: 30)
        _ = rig.guest!.wait(timeout: 20)
        // Its 1 s workload ends while pages are still on their way: it
        // waits for the receiver instead of leaving (which would take the
        // userfaultfd with it and fail the migration).
        let dg = rig.incoming!.wait(timeout: 30)
        #expect(dg.status == 0, "\(dg.stdout) \(dg.stderr)")
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        let s = try stats(sent.stdout)
        #expect(s["postcopy"] != nil, "no postcopy phase: \(sent.stdout)")
        let ram = try #require(s["ram"] as? [String: Any])
        #expect(ram["dirty-sync-count"] as? Int == 2, "the switch came after round \(ram["dirty-sync-count"] ?? "-"), not round 1")
        // Round 1 was cut: at 32 MiB/s for about 0.5 s it sent far less
        // than the 64 MiB a whole round sends.
        let precopy = try #require(ram["precopy-bytes"] as? Int)
        #expect(precopy < 48 << 20, "precopy sent \(precopy) bytes: round 1 ran to its end")
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("--postcopy-after-rounds 0: no precopy page, every page moves by postcopy, and the guest verifies")
    func postcopyFromTheStart() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming(duration: "1s")
        try rig.startReceiver()
        let (sent, _, _) = try rig.migrate(["--postcopy", "--postcopy-after-rounds", "0"])
        let s = try stats(sent.stdout)
        let ram = try #require(s["ram"] as? [String: Any]), sp = try #require(s["postcopy"] as? [String: Any])
        // Before the switch only the handshake and control messages moved.
        let precopy = try #require(ram["precopy-bytes"] as? Int)
        #expect(precopy < 1 << 20, "precopy sent \(precopy) bytes")
        #expect(ram["dirty-sync-count"] as? Int == 2)
        // Every page went after the switch: pushed or requested.
        #expect(sp["postcopy-bytes"] as? Int ?? 0 >= 64 << 20, "\(sp)")
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("precopy into an incoming guest: it starts at completion and verifies")
    func precopyIntoIncomingGuest() throws {
        let rig = try Rig()
        let g = try LivemigProcess([
            "stress", "--ram", rig.src, "--control", rig.srcCtl, "--size", PostcopyTests.size, "--pattern", "counter", "--threads", "2",
            "--rate", "16MiB/s",
        ])
        #expect(g.waitForStderr("guest started"))
        rig.guest = g
        try rig.startIncoming(duration: "1s")
        try rig.startReceiver()
        let sent = try livemig(rig.sendArgs([]), timeout: 60)
        let recv = rig.receiver!.wait(timeout: 30)
        let dg = rig.incoming!.wait(timeout: 30)
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(dg.status == 0 && dg.stderr.contains("guest resumed"), "\(dg.stdout) \(dg.stderr)")
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("--postcopy to a destination that cannot take it fails before any page; the source guest runs on")
    func refusedWithoutIncomingGuest() throws {
        let rig = try Rig()
        try rig.startGuest()
        // An ordinary destination on ext4 (the temporary directory): no
        // incoming guest, a file system without missing-page faults.
        let plain = try Scratch()
        let r = try LivemigProcess([
            "receive", "--ram", plain.path("dst.ram"), "--listen", rig.addr, "--guest", plain.path("dst.ctl"), "--format", "json",
        ])
        #expect(r.waitForStderr("listening"))
        let sent = try livemig(rig.sendArgs(["--postcopy"]), timeout: 30)
        let recv = r.wait(timeout: 20)
        #expect(sent.status == 1)
        #expect(sent.stderr.contains("cannot take postcopy"), "\(sent.stderr)")
        #expect(sent.stderr.contains("/dev/shm") || sent.stderr.contains("stress --incoming"), "no fix named: \(sent.stderr)")
        #expect(recv.status != 0)
        #expect(!FileManager.default.fileExists(atPath: plain.path("dst.ram")), "the refused destination created its RAM file")
        #expect(rig.guest!.process.isRunning, "the source guest stopped")
        kill(rig.guest!.pid, SIGINT)
        let g = rig.guest!.wait(timeout: 20)
        #expect(g.status == 0)
        let v = try livemig(["verify", "--ram", rig.src, "--control", rig.srcCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")

        // And an incoming guest refuses a RAM file on such a file system.
        let inc = try livemig([
            "stress", "--incoming", "--ram", plain.path("in.ram"), "--control", plain.path("in.ctl"), "--size", "1MiB",
        ])
        #expect(inc.status != 0)
        #expect(inc.stderr.contains("/dev/shm"), "\(inc.stderr)")
    }

    @Test("the connections cut during postcopy (both processes alive): send reconnects, the migration completes and verifies")
    func cutConnectionRecovers() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming(duration: "2s")
        try rig.startReceiver()
        let proxy = try MiddleProxy(to: try SocketAddress(parsing: rig.addr))
        defer { proxy.stop() }
        // The pusher is held to 16 MiB/s: the cut lands while most pages
        // are still missing and the destination guest waits on some.
        let send = try LivemigProcess(
            [
                "send", "--ram", rig.src, "--to", proxy.address.description, "--guest", rig.srcCtl, "--format", "json",
                "--peer-timeout", "3s", "--postcopy", "--downtime-limit", "1ms", "--max-bandwidth", "16MiB/s",
            ], env: ["LIVEMIG_TEST_STOP_AT": "postcopy"])
        #expect(send.waitForStderr("stopped at postcopy"), "send never reached the postcopy phase")
        // The line comes just before raise(SIGSTOP): a SIGCONT sent in
        // between would be lost.
        #expect(waitStopped(send.pid), "send did not stop")
        let opened = proxy.connections
        kill(send.pid, SIGCONT)
        usleep(800_000)
        proxy.cutAll()
        let sent = send.wait(timeout: 60)
        let recv = rig.receiver!.wait(timeout: 30)
        _ = rig.guest!.wait(timeout: 20)
        let dg = rig.incoming!.wait(timeout: 30)
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(dg.status == 0, "\(dg.stdout) \(dg.stderr)")
        // Both sides saw the break and the recovery; a second set of
        // connections went through the proxy.
        #expect(sent.stderr.contains("postcopy-paused") && sent.stderr.contains("postcopy recovering"), "\(sent.stderr)")
        #expect(recv.stderr.contains("postcopy recovered"), "\(recv.stderr)")
        #expect(proxy.connections > opened, "no new connection after the cut")
        // The cut came mid-transfer: the destination held some pages, not all.
        let held = sent.stderr.firstMatch(of: /holds (\d+) of (\d+) pages/).map { (Int($0.1)!, Int($0.2)!) }
        #expect(held.map { $0.0 > 0 && $0.0 < $0.1 } == true, "\(sent.stderr)")
        let s = try stats(sent.stdout), r = try stats(recv.stdout)
        #expect(s["status"] as? String == "completed")
        let sp = try #require(s["postcopy"] as? [String: Any]), rp = try #require(r["postcopy"] as? [String: Any])
        #expect(sp["postcopy-recoveries"] as? Int ?? 0 >= 1, "\(sp)")
        #expect(rp["postcopy-recoveries"] as? Int ?? 0 >= 1, "\(rp)")
        // Every page's counter agrees with the state the destination guest
        // saved: nothing lost or stale across the break.
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("the destination killed during postcopy: send reports postcopy-paused and keeps the guest's RAM and state")
    func destinationKilledDuringPostcopy() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming(duration: "30s")
        try rig.startReceiver()
        // A downtime limit no round can meet: precopy must not converge first.
        let send = try LivemigProcess(
            rig.sendArgs(["--postcopy", "--downtime-limit", "1ms", "--recover-timeout", "2s"]), env: ["LIVEMIG_TEST_STOP_AT": "postcopy"])
        #expect(send.waitForStderr("stopped at postcopy"), "send never reached the postcopy phase")
        // The source guest was handed over: it stopped, its RAM frozen.
        let g = rig.guest!.wait(timeout: 20)
        #expect(g.stdout.contains("migrated") || g.stdout.contains("handed over"), "\(g.stdout) \(g.stderr)")
        let before = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        kill(rig.receiver!.pid, SIGKILL)
        _ = rig.receiver!.wait(timeout: 10)
        #expect(waitStopped(send.pid), "send did not stop")
        kill(send.pid, SIGCONT)
        let sent = send.wait(timeout: 30)
        #expect(sent.status == 1)
        // It tried to reconnect for the recover timeout, then gave up.
        #expect(sent.stderr.contains("postcopy-paused"), "\(sent.stderr)")
        #expect(sent.stderr.contains("reconnecting"), "\(sent.stderr)")
        #expect(sent.stderr.contains("not recovered within --recover-timeout 2 s"), "\(sent.stderr)")
        let s = try stats(sent.stdout)
        #expect(s["status"] as? String == "postcopy-paused")
        #expect(try Data(contentsOf: URL(fileURLWithPath: rig.src)) == before, "the source RAM changed")
        // The complete guest stays on the source, not running and not
        // resumable by mistake.
        let resume = try livemig(["stress", "--resume", "--ram", rig.src, "--control", rig.srcCtl, "--duration", "1s"])
        #expect(resume.status != 0, "the handed-over source guest resumed: \(resume.stdout)")
        kill(rig.incoming!.pid, SIGKILL)
        _ = rig.incoming!.wait(timeout: 10)
    }

    @Test("the source killed during postcopy: receive reports postcopy-paused; the destination guest lives on")
    func sourceKilledDuringPostcopy() throws {
        let rig = try Rig()
        try rig.startGuest()
        try rig.startIncoming(duration: "30s")
        try rig.startReceiver(extra: ["--recover-timeout", "2s"])
        let send = try LivemigProcess(
            rig.sendArgs(["--postcopy", "--downtime-limit", "1ms"]), env: ["LIVEMIG_TEST_STOP_AT": "postcopy"])
        #expect(send.waitForStderr("stopped at postcopy"), "send never reached the postcopy phase")
        kill(send.pid, SIGKILL)
        _ = send.wait(timeout: 10)
        let recv = rig.receiver!.wait(timeout: 30)
        #expect(recv.status == 1)
        #expect(recv.stderr.contains("postcopy-paused"), "\(recv.stderr)")
        #expect(recv.stderr.contains("no source recovered it within --recover-timeout 2 s"), "\(recv.stderr)")
        #expect(try stats(recv.stdout)["status"] as? String == "postcopy-paused")
        // The guest was started at the commit and is not ended by the
        // receiver's failure (its threads on missing pages wait).
        #expect(rig.incoming!.process.isRunning, "the destination guest ended with the receiver")
        kill(rig.incoming!.pid, SIGKILL)
        _ = rig.incoming!.wait(timeout: 10)
    }
}
