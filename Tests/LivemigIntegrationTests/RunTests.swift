import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `livemig run` (issue 15, part 2): an unmodified program, here a Python
/// script that keeps writing counters into its mmap of the RAM file and
/// knows nothing of livemig, migrates live. Its writes are found by kernel
/// tracking (the preload library registered its mapping); the launcher
/// freezes it at switchover and ends it, still frozen, after the commit.
@Suite("livemig run", .serialized)
struct RunTests {
    /// Writes an increasing counter into the first 8 bytes of every page,
    /// pass after pass; with FORK set it forks once after its first pass.
    static let script = """
        import mmap, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR)
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        n = 0
        forked = False
        while True:
            for p in range(size // 4096):
                n += 1
                m[p * 4096:p * 4096 + 8] = n.to_bytes(8, "little")
            if os.environ.get("FORK") and not forked:
                forked = True
                if os.fork() == 0:
                    # Let go of the test's pipes at once; end soon.
                    os.closerange(0, 3)
                    time.sleep(5)
                    os._exit(0)
            time.sleep(0.002)
        """

    final class Rig {
        let scratch: Scratch
        let src, srcCtl, dst, dstCtl, app, addr: String
        var processes: [LivemigProcess] = []

        init() throws {
            scratch = try Scratch(under: "/dev/shm/")
            src = scratch.path("src.ram")
            srcCtl = scratch.path("src.ctl")
            dst = scratch.path("dst.ram")
            dstCtl = scratch.path("dst.ctl")
            app = scratch.path("app.py")
            addr = "tcp:127.0.0.1:\(freePort())"
            try RunTests.script.write(toFile: app, atomically: true, encoding: .utf8)
        }

        deinit {
            for p in processes where p.process.isRunning { kill(p.pid, SIGKILL) }
        }

        func start(_ args: [String], env: [String: String] = [:]) throws -> LivemigProcess {
            let p = try LivemigProcess(args, env: env)
            processes.append(p)
            return p
        }

        func runApp(env: [String: String] = [:]) throws -> LivemigProcess {
            let r = try start(
                ["run", "--ram", src, "--control", srcCtl, "--size", "16MiB", "--", "python3", app, src], env: env)
            #expect(r.waitForStderr("tracked by the kernel"), "the program was not attached")
            usleep(300_000)
            return r
        }

        func receiver() throws -> LivemigProcess {
            let r = try start(["receive", "--ram", dst, "--listen", addr, "--guest", dstCtl, "--format", "json"])
            #expect(r.waitForStderr("listening"))
            return r
        }
    }

    @Test("a Python script that knows nothing of livemig migrates live; the destination RAM equals the source RAM at the freeze")
    func unmodifiedProgramMigrates() throws {
        let rig = try Rig()
        let run = try rig.runApp()
        let r = try rig.receiver()
        let sent = try livemig(["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl, "--format", "json"], timeout: 60)
        let recv = r.wait(timeout: 30)
        let ran = run.wait(timeout: 30)
        #expect(sent.status == 0, "\(sent.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(ran.status == 0 && ran.stdout.contains("ended while frozen"), "\(ran.stdout) \(ran.stderr)")
        // Frozen by the cgroup v2 freezer where a unified hierarchy is
        // mounted writable (as here), else by SIGSTOP; it says which.
        #expect(ran.stderr.contains("frozen with"), "\(ran.stderr)")
        if FileManager.default.isWritableFile(atPath: "/sys/fs/cgroup/unified") {
            #expect(ran.stderr.contains("cgroup v2 freezer"), "\(ran.stderr)")
        }
        // The program was ended while frozen: its RAM file is the content at
        // the freeze, which the destination must hold exactly.
        let source = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        let dest = try Data(contentsOf: URL(fileURLWithPath: rig.dst))
        #expect(source == dest, "the destination RAM differs from the source RAM at the freeze")
        // It was writing: the counters are neither zero nor all alike.
        let counters = Set(stride(from: 0, to: source.count, by: 4096).map { source[$0..<($0 + 8)] })
        #expect(counters.count > 1000, "only \(counters.count) distinct counters: the program wrote little")
        let ram = try #require(try stats(sent.stdout)["ram"] as? [String: Any])
        #expect(ram["dirty-sync-count"] as? Int ?? 0 >= 2)
    }

    @Test("a program that forks is refused at the next sync; it is thawed and runs on, its RAM untouched by us")
    func forkFailsTheMigration() throws {
        let rig = try Rig()
        let run = try rig.runApp(env: ["FORK": "1"])
        let r = try rig.receiver()
        let sent = try livemig(["send", "--ram", rig.src, "--to", rig.addr, "--guest", rig.srcCtl], timeout: 60)
        kill(r.pid, SIGTERM)
        _ = r.wait(timeout: 20)
        #expect(sent.status != 0)
        #expect(sent.stderr.contains("forked"), "\(sent.stderr)")
        // Runs on: its counters keep changing.
        #expect(run.process.isRunning, "the launcher ended")
        let a = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        usleep(300_000)
        let b = try Data(contentsOf: URL(fileURLWithPath: rig.src))
        #expect(a != b, "the program did not run on after the failed migration")
        kill(run.pid, SIGTERM)
        _ = run.wait(timeout: 20)
    }

    @Test("a program that never maps the RAM file is a clear error within the attach timeout, and is ended")
    func programThatNeverMaps() throws {
        let rig = try Rig()
        let out = try livemig(
            ["run", "--ram", rig.src, "--control", rig.srcCtl, "--size", "1MiB", "--attach-timeout", "1s", "--", "sleep", "30"],
            timeout: 20)
        #expect(out.status != 0)
        #expect(out.stderr.contains("did not map all of"), "\(out.stderr)")
        #expect(out.seconds < 15, "took \(out.seconds) s")
    }

    @Test("a statically linked program is refused before it starts")
    func staticBinaryIsRefused() throws {
        // ldconfig is statically linked on Debian and Ubuntu.
        let candidates = ["/sbin/ldconfig", "/usr/sbin/ldconfig"].filter { FileManager.default.isExecutableFile(atPath: $0) }
        let file = try #require(candidates.first, "no static binary to test with")
        let rig = try Rig()
        let out = try livemig(["run", "--ram", rig.src, "--control", rig.srcCtl, "--size", "1MiB", "--", file])
        #expect(out.status != 0)
        #expect(out.stderr.contains("statically linked"), "\(out.stderr)")
    }
}
