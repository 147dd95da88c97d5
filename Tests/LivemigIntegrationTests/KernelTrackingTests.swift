import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Kernel dirty tracking with real processes (issue 15, DESIGN.md §9): a
/// counter guest started with `--tracking kernel` never marks the bitmap;
/// `send` learns the mode from the control file and asks the kernel for the
/// written pages each round. `verify` proves no page was missed: a page
/// written after its last copy and not re-sent breaks the counter
/// invariant. Asynchronous write-protect takes any mapping: RAM files on
/// tmpfs (postcopy needs it) and on the temporary directory's file system.
@Suite("kernel dirty tracking", .serialized)
struct KernelTrackingTests {
    final class Rig {
        let scratch: Scratch
        let src, srcCtl, dst, dstCtl: String
        let addr: String
        var processes: [LivemigProcess] = []

        init(under parent: String = "/dev/shm/") throws {
            scratch = try Scratch(under: parent)
            src = scratch.path("src.ram")
            srcCtl = scratch.path("src.ctl")
            dst = scratch.path("dst.ram")
            dstCtl = scratch.path("dst.ctl")
            addr = "tcp:127.0.0.1:\(freePort())"
        }

        deinit {
            for p in processes where p.process.isRunning { kill(p.pid, SIGKILL) }
        }

        func start(_ args: [String]) throws -> LivemigProcess {
            let p = try LivemigProcess(args)
            processes.append(p)
            return p
        }

        func kernelGuest(rate: String) throws -> LivemigProcess {
            let g = try start([
                "stress", "--ram", src, "--control", srcCtl, "--size", "64MiB", "--pattern", "counter", "--threads", "2", "--rate", rate,
                "--tracking", "kernel",
            ])
            #expect(g.waitForStderr("tracking kernel"), "the guest did not start with kernel tracking")
            usleep(300_000)
            return g
        }
    }

    @Test(
        "a counter guest with --tracking kernel migrates live at 256 MiB/s and verifies", arguments: ["/dev/shm/", NSTemporaryDirectory()])
    func liveMigrationVerifies(under parent: String) throws {
        let rig = try Rig(under: parent)
        let g = try rig.kernelGuest(rate: "256MiB/s")
        let r = try rig.start(["receive", "--ram", rig.dst, "--listen", rig.addr, "--guest", rig.dstCtl, "--format", "json"])
        #expect(r.waitForStderr("listening"))
        let sent = try livemig(
            ["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--format", "json", "--downtime-limit", "100ms"],
            timeout: 60)
        let recv = r.wait(timeout: 30)
        let gone = g.wait(timeout: 20)
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(gone.status == 0 && gone.stdout.contains("migrated"), "\(gone.stdout) \(gone.stderr)")
        // The guest wrote during round 1: the kernel reported pages for a
        // second round (the bitmap alone, never marked, would report none).
        let ram = try #require(try stats(sent.stdout)["ram"] as? [String: Any])
        let rounds = try #require(ram["dirty-sync-count"] as? Int)
        let normal = try #require(ram["normal"] as? Int)
        #expect(rounds >= 2, "\(ram)")
        #expect(normal > 16384, "only \(normal) pages sent for 16384: no written page was found after round 1")
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("a kernel-tracked guest migrates through postcopy and verifies")
    func postcopyVerifies() throws {
        let rig = try Rig()
        let g = try rig.kernelGuest(rate: "unlimited")
        let inc = try rig.start([
            "stress", "--incoming", "--ram", rig.dst, "--control", rig.dstCtl, "--size", "64MiB", "--duration", "1s",
        ])
        #expect(inc.waitForStderr("incoming guest waiting"))
        let r = try rig.start(["receive", "--ram", rig.dst, "--listen", rig.addr, "--guest", rig.dstCtl, "--format", "json"])
        #expect(r.waitForStderr("listening"))
        let sent = try livemig(
            [
                "send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--format", "json", "--postcopy", "--max-bandwidth",
                "64MiB/s",
            ],
            timeout: 60)
        let recv = r.wait(timeout: 30)
        let gone = g.wait(timeout: 20)
        let dg = inc.wait(timeout: 30)
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(gone.status == 0 && gone.stdout.contains("migrated"), "\(gone.stdout) \(gone.stderr)")
        #expect(dg.status == 0, "\(dg.stdout) \(dg.stderr)")
        #expect(try stats(sent.stdout)["postcopy"] != nil, "no postcopy phase: \(sent.stdout)")
        let v = try livemig(["verify", "--ram", rig.dst, "--control", rig.dstCtl])
        #expect(v.status == 0, "\(v.stdout) \(v.stderr)")
    }

    @Test("--tracking kernel with --incoming is refused with the reason")
    func refusedWithIncoming() throws {
        let rig = try Rig()
        let inc = try livemig([
            "stress", "--incoming", "--ram", rig.dst, "--control", rig.dstCtl, "--size", "1MiB", "--tracking", "kernel",
        ])
        #expect(inc.status != 0)
        #expect(inc.stderr.contains("--tracking kernel does not go with --incoming"), "\(inc.stderr)")
        #expect(!FileManager.default.fileExists(atPath: rig.dst), "the refused guest created its RAM file")
    }

    @Test("a kernel-tracked guest whose process is gone is refused by send before any page; its RAM is untouched")
    func stoppedGuestIsRefused() throws {
        let rig = try Rig()
        let g = try rig.kernelGuest(rate: "64MiB/s")
        kill(g.pid, SIGINT)
        _ = g.wait(timeout: 20)
        let before = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        let r = try rig.start(["receive", "--ram", rig.dst, "--listen", rig.addr, "--guest", rig.dstCtl])
        #expect(r.waitForStderr("listening"))
        let sent = try livemig(["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl], timeout: 30)
        kill(r.pid, SIGTERM)
        _ = r.wait(timeout: 20)
        #expect(sent.status != 0)
        #expect(sent.stderr.contains("tracks its writes with the kernel"), "\(sent.stderr)")
        #expect(try Data(contentsOf: URL(fileURLWithPath: rig.src)) == before)
    }
}
