import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Every wait has an end: a peer that stops moving bytes (SIGSTOP here; a
/// dead host or a cut link alike) ends the migration after --peer-timeout,
/// and --timeout bounds a live precopy round that is still running.
@Suite("deadlines", .serialized)
struct DeadlineTests {
    static let pages = 64 << 20 / pageSize

    /// Which process the test stops while pages flow.
    enum Stopped { case receiver, sender }

    /// Starts a 64 MiB migration over TCP with `--peer-timeout 2s` on both
    /// sides and SIGSTOPs `stopped` as soon as the destination's first page
    /// holds source data. Tries again (up to three times) when the copy
    /// finished before the stop. Returns the stopped side's peer's result,
    /// the seconds it took from the stop, and the stopped process (still
    /// stopped), or nil when every copy finished first.
    func stopMidTransfer(_ stopped: Stopped, src: String, dst: String) throws -> (
        peer: (status: Int32, stdout: String, stderr: String, seconds: Double), stoppedProcess: LivemigProcess
    )? {
        for _ in 0..<3 {
            try writeFilled(dst, bytes: Self.pages * pageSize, value: 0x11)
            let addr = "tcp:127.0.0.1:\(freePort())"
            let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--peer-timeout", "2s"])
            #expect(receiver.waitForStderr("listening"))
            let sender = try LivemigProcess(["send", "--ram", src, "--to", addr, "--peer-timeout", "2s"])
            let fd = open(dst, O_RDONLY)
            var page = [UInt8](repeating: 0x11, count: 64)
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                _ = pread(fd, &page, page.count, 0)
                if page != [UInt8](repeating: 0x11, count: 64) { break }
                usleep(200)
            }
            close(fd)
            let (victim, peer) = stopped == .receiver ? (receiver, sender) : (sender, receiver)
            kill(victim.pid, SIGSTOP)
            let result = peer.wait(timeout: 30)
            if result.status == 0 {  // it finished before the stop: try again
                kill(victim.pid, SIGCONT)
                victim.wait(timeout: 20)
                continue
            }
            return (result, victim)
        }
        return nil
    }

    @Test("receiver stopped mid-transfer: send ends with the no-progress message, source unchanged")
    func receiverStopped() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: Self.pages, seed: 7, isZero: { _ in false })
        let before = try Data(contentsOf: URL(fileURLWithPath: src))
        let r = try #require(try stopMidTransfer(.receiver, src: src, dst: dst), "the receiver was never stopped mid-transfer")
        #expect(r.peer.status == 1, "\(r.peer.stderr)")
        #expect(r.peer.seconds < 10, "send must give up on a stopped receiver after its 2 s peer timeout")
        #expect(r.peer.stderr.contains("no progress from the peer for 2 s"), "\(r.peer.stderr)")
        #expect(r.peer.stderr.contains("not modified"), "\(r.peer.stderr)")
        // Resumed, the receiver finds its source gone and fails too.
        kill(r.stoppedProcess.pid, SIGCONT)
        let recv = r.stoppedProcess.wait(timeout: 20)
        #expect(recv.status == 1, "\(recv.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: src)) == before, "the source RAM file changed")
    }

    @Test("sender stopped mid-transfer: receive ends with the no-progress message")
    func senderStopped() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: Self.pages, seed: 8, isZero: { _ in false })
        let before = try Data(contentsOf: URL(fileURLWithPath: src))
        let r = try #require(try stopMidTransfer(.sender, src: src, dst: dst), "the sender was never stopped mid-transfer")
        #expect(r.peer.status == 1, "\(r.peer.stderr)")
        #expect(r.peer.seconds < 10, "receive must give up on a stopped sender after its 2 s peer timeout")
        #expect(r.peer.stderr.contains("no progress from the peer for 2 s"), "\(r.peer.stderr)")
        kill(r.stoppedProcess.pid, SIGCONT)
        let send = r.stoppedProcess.wait(timeout: 20)
        #expect(send.status == 1, "\(send.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: src)) == before, "the source RAM file changed")
    }

    @Test("--timeout ends a live round still in progress; the guest keeps running")
    func timeoutMidRound() throws {
        let rig = try LiveMigrationTests.Rig()
        try rig.startGuest(pattern: "counter", rate: "64MiB/s")
        try rig.startReceiver()
        // Round 1 alone would take about a minute at 1 MiB/s.
        let send = try rig.send(["--timeout", "1s", "--max-bandwidth", "1MiB/s"], timeout: 60)
        #expect(send.status == 1, "\(send.stderr)")
        #expect(send.seconds < 10, "the 1 s timeout must not wait for the round to end")
        #expect(send.stderr.contains("did not converge within 1.0 s (round 1 still running)"), "\(send.stderr)")
        #expect(send.stderr.contains("keeps running"), "\(send.stderr)")
        #expect(rig.guest!.process.isRunning)
        let recv = rig.receiver!.wait(timeout: 20)
        #expect(recv.status == 1, "\(recv.stderr)")
        let g = rig.stopGuest()
        #expect(g?.status == 0, "\(g?.stderr ?? "")")
        let v = try livemig(["verify", "--ram", rig.src, "--control", rig.srcCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("--peer-timeout below 1s or not a duration is a usage error")
    func peerTimeoutUsage() throws {
        for bad in ["500ms", "ten", "0s"] {
            let r = try livemig(["send", "--ram", "/nonexistent", "--to", "tcp:127.0.0.1:1", "--peer-timeout", bad])
            #expect(r.status == 2, "\(bad): \(r.stderr)")
            #expect(r.stderr.contains("--peer-timeout"), "\(r.stderr)")
            let q = try livemig(["receive", "--ram", "/nonexistent", "--listen", "tcp:127.0.0.1:1", "--peer-timeout", bad])
            #expect(q.status == 2, "\(bad): \(q.stderr)")
        }
    }
}
