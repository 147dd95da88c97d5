import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// Real `livemig receive` and `livemig send` processes moving a 64 MiB RAM
/// file of random and zero pages into a destination pre-filled with other
/// bytes; the files must end byte-identical and the statistics must count
/// the pages as they are.
@Suite("end-to-end migration", .serialized)
struct MigrationEndToEndTests {
    static let pages = 64 << 20 / pageSize

    /// Zero pages: every third page, plus a 1 MiB run, so both scattered
    /// and contiguous zero pages cross the wire.
    static func isZero(_ p: Int) -> Bool { p % 3 == 0 || (4096..<4352).contains(p) }

    enum Transport: String, CaseIterable, CustomTestStringConvertible {
        case tcp, unix
        var testDescription: String { rawValue }
    }

    func address(_ t: Transport, _ scratch: Scratch) -> String {
        switch t {
        case .tcp: "tcp:127.0.0.1:\(freePort())"
        case .unix: "unix:" + scratch.path("mig.sock")
        }
    }

    @Test("migrates 64 MiB byte-identical", arguments: Transport.allCases, [1, 2, 4])
    func migrates(_ transport: Transport, channels: Int) throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        let zeros = try writeImage(src, pages: Self.pages, seed: UInt64(channels) * 7 + 1, isZero: Self.isZero)
        try writeFilled(dst, bytes: Self.pages * pageSize, value: 0x5A)
        let addr = address(transport, scratch)

        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--channels", "\(channels)", "--format", "json"])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--channels", "\(channels)", "--format", "json"])
        let recv = receiver.wait()
        #expect(send.status == 0, "send: \(send.stderr)")
        #expect(recv.status == 0, "receive: \(recv.stderr)")
        #expect(try filesEqual(src, dst), "destination differs from source")

        let s = try stats(send.stdout), r = try stats(recv.stdout)
        #expect(s["status"] as? String == "completed")
        #expect(s["channels"] as? Int == channels)
        let ram = try #require(s["ram"] as? [String: Any])
        #expect(ram["total"] as? Int == Self.pages * pageSize)
        #expect(ram["duplicate"] as? Int == zeros)
        #expect(ram["normal"] as? Int == Self.pages - zeros)
        #expect(ram["normal-bytes"] as? Int == (Self.pages - zeros) * pageSize)
        #expect((ram["transferred"] as? Int ?? 0) > (Self.pages - zeros) * pageSize)
        #expect((ram["multifd-bytes"] as? Int ?? 0) > 0)
        #expect((ram["mbps"] as? Double ?? 0) > 0)
        #expect((ram["pages-per-second"] as? Int ?? 0) > 0)
        #expect(s["total-time"] != nil && s["setup-time"] != nil)
        let rram = try #require(r["ram"] as? [String: Any])
        #expect(rram["duplicate"] as? Int == zeros)
        #expect(rram["normal"] as? Int == Self.pages - zeros)
    }

    @Test("an absent destination file is created with the source's size")
    func createsDestination() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("new.ram")
        try writeImage(src, pages: 2048, seed: 99, isZero: { $0 % 2 == 0 })
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr])
        let recv = receiver.wait()
        #expect(send.status == 0, "\(send.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(try filesEqual(src, dst))
        #expect(send.stdout.contains("completed"))
    }

    @Test("zero pages into a file the destination creates are neither read nor allocated")
    func zeroPagesStaySparse() throws {
        // tmpfs counts a page in st_blocks once it is allocated, also by a
        // read fault through a shared mapping: the check needs /dev/shm.
        let dir = "/dev/shm/livemig-test-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let src = dir + "/src.ram", dst = dir + "/dst.ram"
        // 4096 pages, of which one in 64 carries data.
        try writeImage(src, pages: 4096, seed: 12, isZero: { $0 % 64 != 0 })
        let addr = "unix:" + dir + "/s"
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr])
        #expect(receiver.wait().status == 0)
        #expect(send.status == 0, "\(send.stderr)")
        #expect(try filesEqual(src, dst))
        var st = stat()
        #expect(stat(dst, &st) == 0)
        let allocatedPages = Int(st.st_blocks) * 512 / pageSize
        #expect(allocatedPages == 4096 / 64, "\(allocatedPages) pages allocated for 64 data pages")
    }

    @Test("without io_uring (seccomp filter) send falls back to sendmsg with a warning")
    func ioUringDenied() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 4096, seed: 5, isZero: { $0 % 5 == 0 })
        try writeFilled(dst, bytes: 4096 * pageSize, value: 0xEE)
        let addr = "tcp:127.0.0.1:\(freePort())"
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr, "--format", "json"])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(
            ["send", "--ram", src, "--to", addr, "--format", "json"], env: ["LIVEMIG_TEST_DENY_IO_URING": "1"])
        let recv = receiver.wait()
        #expect(send.status == 0, "\(send.stderr)")
        #expect(recv.status == 0, "\(recv.stderr)")
        #expect(send.stderr.contains("warning") && send.stderr.contains("io_uring"), "\(send.stderr)")
        #expect(try stats(send.stdout)["send-mechanism"] as? String == "plain sendmsg")
        #expect(try filesEqual(src, dst))
    }

    @Test("--zerocopy sends with SENDMSG_ZC and reports what the kernel copied")
    func zeroCopy() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 4096, seed: 8, isZero: { $0 % 4 == 0 })
        try writeFilled(dst, bytes: 4096 * pageSize, value: 0x31)
        let addr = "tcp:127.0.0.1:\(freePort())"
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--zerocopy", "--format", "json"])
        #expect(receiver.wait().status == 0)
        #expect(send.status == 0, "\(send.stderr)")
        #expect(try filesEqual(src, dst))
        let s = try stats(send.stdout)
        let sends = try #require(s["zerocopy-sends"] as? Int)
        let copied = try #require(s["zerocopy-copied"] as? Int)
        // One notification per gather write: 4096 pages in 128-page
        // packets, up to four packets per write, plus one SYNC per channel
        // (MultiFDJob.defaultCapacity).
        #expect(sends >= 4096 / (128 * 4) + 2)
        // Loopback always copies: the kernel says so for every send.
        #expect(copied == sends)
    }

    @Test("with io_uring allowed the senders use it")
    func ioUringUsed() throws {
        let scratch = try Scratch()
        let src = scratch.path("src.ram"), dst = scratch.path("dst.ram")
        try writeImage(src, pages: 1024, seed: 6, isZero: { _ in false })
        let addr = "unix:" + scratch.path("s")
        let receiver = try LivemigProcess(["receive", "--ram", dst, "--listen", addr])
        #expect(receiver.waitForStderr("listening"))
        let send = try livemig(["send", "--ram", src, "--to", addr, "--format", "json"])
        receiver.wait()
        #expect(send.status == 0)
        #expect(!send.stderr.contains("warning"), "\(send.stderr)")
        #expect(try stats(send.stdout)["send-mechanism"] as? String == "io_uring")
    }
}
