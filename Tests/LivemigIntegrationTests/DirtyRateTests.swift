import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// `livemig dirtyrate` (QEMU's calc-dirty-rate) against a `sequential`
/// stress guest, which writes each page once per pass: over a window
/// shorter than a pass, the pages dirtied per second are its write rate.
/// The guest reports the rate it achieved; each mode must agree with it.
/// The bound is loose (±35 %) because both figures come from a shared
/// machine; tools/bench-tracking.py checks the 10 % / 25 % at
/// 1 GiB.
@Suite("dirtyrate", .serialized)
struct DirtyRateTests {
    static func guest(_ s: Scratch, tracking: String, rate: String = "64MiB/s") throws -> LivemigProcess {
        let g = try LivemigProcess([
            "stress", "--ram", s.path("g.ram"), "--control", s.path("g.ctl"), "--size", "256MiB", "--pattern", "sequential",
            "--threads", "1", "--rate", rate, "--duration", "60s", "--tracking", tracking,
        ])
        #expect(g.waitForStderr("guest started"))
        usleep(300_000)
        return g
    }

    /// The guest's own figure, from its last line.
    static func achieved(_ stdout: String) -> Double? {
        stdout.firstMatch(of: /achieved ([0-9.]+) MiB\/s/).flatMap { Double($0.1) }
    }

    static func measure(_ s: Scratch, _ extra: [String]) throws -> [String: Any] {
        let r = try livemig(["dirtyrate", "--ram", s.path("g.ram"), "--format", "json", "--calc-time", "2s"] + extra, timeout: 30)
        #expect(r.status == 0, "\(r.stderr)")
        return try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
    }

    @Test("bitmap and page-sampling modes agree with a bitmap guest's own rate")
    func bitmapGuest() throws {
        let s = try Scratch(under: "/dev/shm/")
        let g = try Self.guest(s, tracking: "bitmap")
        let bitmap = try Self.measure(s, ["--guest", s.path("g.ctl"), "--mode", "bitmap"])
        // 2048 per GiB: 512 pages of the 256 MiB.
        let sampled = try Self.measure(s, ["--sample-pages", "2048"])
        // The guest runs until told: both windows fall in its run however
        // slow the machine is (a 256 MiB pass takes 4 s, longer than a window).
        kill(g.pid, SIGINT)
        let out = g.wait(timeout: 30)
        let rate = try #require(Self.achieved(out.stdout), "\(out.stdout)")
        for (name, m) in [("bitmap", bitmap), ("page-sampling", sampled)] {
            let got = try #require(m["dirty-rate"] as? Double)
            #expect(abs(got - rate) <= 0.35 * rate, "\(name): \(got) MiB/s against the guest's \(rate) MiB/s: \(m)")
            #expect(m["status"] as? String == "measured" && m["mode"] as? String == name)
        }
        #expect(sampled["sample-pages"] as? Int == 2048)
    }

    @Test("kernel mode agrees with a --tracking kernel guest's own rate")
    func kernelGuest() throws {
        let s = try Scratch(under: "/dev/shm/")
        let g = try Self.guest(s, tracking: "kernel")
        let kernel = try Self.measure(s, ["--guest", s.path("g.ctl"), "--mode", "kernel"])
        kill(g.pid, SIGINT)
        let out = g.wait(timeout: 30)
        let rate = try #require(Self.achieved(out.stdout), "\(out.stdout)")
        let got = try #require(kernel["dirty-rate"] as? Double)
        #expect(abs(got - rate) <= 0.35 * rate, "kernel: \(got) MiB/s against the guest's \(rate) MiB/s: \(kernel)")
    }

    @Test("a quiet guest measures 0 in every mode")
    func quietGuest() throws {
        let s = try Scratch(under: "/dev/shm/")
        let g = try LivemigProcess([
            "stress", "--ram", s.path("g.ram"), "--control", s.path("g.ctl"), "--size", "16MiB", "--rate", "1MiB/s",
            "--tracking", "kernel", "--duration", "30s",
        ])
        defer { kill(g.pid, SIGKILL) }
        #expect(g.waitForStderr("guest started"))
        usleep(300_000)  // the line comes before the guest's words are set
        kill(g.pid, SIGSTOP)
        defer { kill(g.pid, SIGCONT) }
        for extra in [["--guest", s.path("g.ctl"), "--mode", "kernel"], []] {
            let r = try livemig(["dirtyrate", "--ram", s.path("g.ram"), "--calc-time", "200ms", "--format", "json"] + extra)
            #expect(r.status == 0, "\(r.stderr)")
            #expect(r.stdout.contains("\"dirty-rate\":0"), "\(extra): \(r.stdout)")
        }
    }

    @Test("modes that cannot read the guest are refused with what to use instead")
    func refusals() throws {
        let s = try Scratch(under: "/dev/shm/")
        let g = try Self.guest(s, tracking: "kernel")
        defer { kill(g.pid, SIGINT) }
        let bitmap = try livemig(["dirtyrate", "--ram", s.path("g.ram"), "--guest", s.path("g.ctl"), "--mode", "bitmap"])
        #expect(bitmap.status != 0 && bitmap.stderr.contains("use --mode kernel"), "\(bitmap.stderr)")
        let noGuest = try livemig(["dirtyrate", "--ram", s.path("g.ram"), "--mode", "kernel"])
        #expect(noGuest.status != 0 && noGuest.stderr.contains("--guest CONTROL"), "\(noGuest.stderr)")
        let other = try livemig(["dirtyrate", "--ram", s.path("g.ram"), "--pid", "\(getpid())"])
        #expect(other.status != 0 && other.stderr.contains("does not map"), "\(other.stderr)")
        let missing = try livemig(["dirtyrate", "--ram", s.path("none.ram")])
        #expect(missing.status != 0, "\(missing.stderr)")
    }
}
