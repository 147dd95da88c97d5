import CShims
import Foundation
import GuestMemory
import Synchronization
import SystemPackage
import Testing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// A Unix socket server that is not a livemig guest: it accepts one
/// connection and answers with `reply` (with `/dev/null` attached when
/// `descriptor`), or, with `reply == nil`, says nothing until `close()`.
final class FakeHandoffServer: Sendable {
    let path: String
    private let listenFD: Int32
    private let thread: WorkerThread
    private let release = DispatchSemaphore(value: 0)

    init(path: String, reply: [UInt8]?, descriptor: Bool = true) throws {
        self.path = path
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        try #require(fd >= 0)
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { dst in
            for (i, b) in path.utf8.enumerated() { dst[i] = b }
        }
        let r = withUnsafePointer(to: &sun) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        try #require(r == 0 && listen(fd, 4) == 0)
        listenFD = fd
        let release = release
        thread = WorkerThread(name: "test/fake") {
            let conn = lm_accept_cloexec(fd)
            guard conn >= 0 else { return }
            defer { Glibc.close(conn) }
            guard let reply else {
                release.wait()
                return
            }
            if descriptor {
                let null = open("/dev/null", O_RDONLY | O_CLOEXEC)
                _ = reply.withUnsafeBytes { lm_send_fd(conn, null, $0.baseAddress, $0.count) }
                Glibc.close(null)
            } else {
                _ = reply.withUnsafeBytes { send(conn, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            }
        }
    }

    func close() {
        release.signal()
        thread.join()
        Glibc.close(listenFD)
        unlink(path)
    }
}

/// A hand-off payload as the guest sends it, with fields to spoil.
func handoffPayload(magic: String = "LMUFFD01", version: UInt32 = 1, base: UInt64 = 0x7f00_0000_0000, length: UInt64 = 65536) -> [UInt8] {
    var out = Array(magic.utf8)
    func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
    put(version)
    put(UInt32(1))
    put(base)
    put(length)
    put(UInt64(4096))
    put(Int32(1234))
    put(UInt32(0))
    return out
}

func socketPath(_ name: String) -> String { "/dev/shm/livemig-\(name)-\(UUID().uuidString.prefix(8)).sock" }

@Suite("FaultHandoff")
struct FaultHandoffTests {
    static let pageSize = RegisteredRAM.pageSize

    @Test func receiversAttachOneAfterAnotherAndPlacePages() throws {
        let ram = try RegisteredRAM(pages: 16)
        defer { ram.close() }
        let path = socketPath("handoff")
        let server = try FaultHandoffServer(
            path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        defer { server.stop() }
        var st = stat()
        try #require(lstat(path, &st) == 0)
        #expect(st.st_mode & S_IFMT == S_IFSOCK)
        #expect(st.st_mode & 0o777 == 0o600)

        for round in 0..<3 {
            // Each receiver's copy closes at the end of its round, as a
            // failed receiver's would; the next one attaches anew.
            let attachment = try FaultHandoff.attach(path: path, timeout: 5)
            #expect(attachment.guestBase == ram.address(0))
            #expect(attachment.length == ram.a.block.size)
            #expect(attachment.pageSize == UInt64(Self.pageSize))
            #expect(attachment.guestPID == getpid())
            #expect(attachment.threadIDs == ram.userfault.reportsThreadID)
            #expect(attachment.userfault.reportsThreadID == ram.userfault.reportsThreadID)
            #expect(attachment.userfault.fd != ram.userfault.fd)

            // A fault on the guest's mapping is read and served through the
            // received descriptor.
            let reader = PageReader(address: ram.address(round), length: Self.pageSize)
            let faults = try nextFaults(attachment.userfault)
            #expect(faults.map(\.address) == [ram.address(round)])
            let page = pattern(seed: UInt64(100 + round))
            let placed = try page.withUnsafeBytes {
                try attachment.userfault.copy(to: ram.address(round), from: $0.baseAddress!, length: Self.pageSize)
            }
            #expect(placed == .placed)
            #expect(reader.result(within: 10) == page)
            reader.join()
        }
        #expect(server.handoffs == 3)
        #expect(server.refusals == 0)
        server.stop()
        #expect(access(path, F_OK) != 0, "stop() must remove the socket file")
        // The guest's own copy still works after every receiver closed theirs.
        #expect(try ram.userfault.zeroPage(at: ram.address(9), length: Self.pageSize) == .placed)
    }

    @Test(
        .enabled(
            if: geteuid() == 0 && access("/usr/bin/setpriv", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0,
            "needs root, setpriv and python3 to connect as another user"))
    func aPeerOfAnotherUserGetsNothing() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let path = socketPath("otheruid")
        let server = try FaultHandoffServer(
            path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        defer { server.stop() }
        // Widen the file's mode so that the peer reaches the uid check.
        try #require(chmod(path, 0o666) == 0)
        let script = """
            import array, socket, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sys.argv[1])
            data, anc, flags, addr = s.recvmsg(64, socket.CMSG_SPACE(16))
            print("bytes=%d fds=%d" % (len(data), len(anc)))
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", script, path]
        let out = Pipe()
        p.standardOutput = out
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(text.trimmingCharacters(in: .whitespacesAndNewlines) == "bytes=0 fds=0")
        #expect(server.refusals == 1)
        #expect(server.handoffs == 0)
    }

    @Test func anAbsentSocketSaysNoGuestWaits() throws {
        let path = socketPath("absent")
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: path, timeout: 1) }
        #expect(e?.errno == .noSuchFileOrDirectory)
        #expect(e?.description.contains("no hand-off socket at \(path)") == true)
        #expect(e?.description.contains("stress --incoming") == true)
    }

    @Test func aFileThatIsNoSocketIsNoHandoff() throws {
        let path = socketPath("regular")
        #expect(FileManager.default.createFile(atPath: path, contents: Data("hello".utf8)))
        defer { unlink(path) }
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: path, timeout: 1) }
        #expect(e?.description.contains("not a socket") == true)
    }

    @Test func aStaleSocketIsRefusedAtAttachAndReplacedByAServer() throws {
        let path = socketPath("stale")
        // A socket file nobody accepts on: a guest that died.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var sun = sockaddr_un()
        sun.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sun.sun_path) { dst in
            for (i, b) in path.utf8.enumerated() { dst[i] = b }
        }
        let r = withUnsafePointer(to: &sun) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        close(fd)
        try #require(r == 0)
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: path, timeout: 1) }
        #expect(e?.description.contains("nobody accepts") == true)

        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let server = try FaultHandoffServer(
            path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        defer { server.stop() }
        _ = try FaultHandoff.attach(path: path, timeout: 5)
        // A second server on a live socket is refused, and the first keeps it.
        let busy = #expect(throws: GuestMemoryError.self) {
            _ = try FaultHandoffServer(
                path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        }
        #expect(busy?.description.contains("another live process") == true)
        _ = try FaultHandoff.attach(path: path, timeout: 5)
    }

    @Test func stopRemovesOnlyItsOwnSocketFile() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let path = socketPath("successor")
        let first = try FaultHandoffServer(
            path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        // Someone removed the file and a successor serves the path now.
        unlink(path)
        let second = try FaultHandoffServer(
            path: path, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        first.stop()
        #expect(access(path, F_OK) == 0, "the first server removed its successor's socket file")
        _ = try FaultHandoff.attach(path: path, timeout: 5)
        second.stop()
        #expect(access(path, F_OK) != 0)
        second.stop()  // idempotent
    }

    @Test(arguments: [
        ("a wrong magic", handoffPayload(magic: "NOTLMUF0"), "is not a livemig hand-off (magic \"NOTLMUF0\""),
        ("another version", handoffPayload(version: 2), "version 2; this livemig speaks version 1"),
        ("an empty range", handoffPayload(length: 0), "describes no usable memory"),
        ("a short payload", Array(handoffPayload().prefix(20)), "ends after 20 of 48 bytes"),
        ("no reply at all", [], "closed without a hand-off"),
    ])
    func aPeerThatIsNoGuestIsRefused(_ case_: (String, [UInt8], String)) throws {
        let (what, reply, expected) = case_
        let fake = try FakeHandoffServer(path: socketPath("fake"), reply: reply)
        defer { fake.close() }
        let e = #expect(throws: GuestMemoryError.self, "\(what)") { try FaultHandoff.attach(path: fake.path, timeout: 5) }
        #expect(e?.description.contains(expected) == true, "\(what): \(e?.description ?? "no error")")
    }

    @Test func aDescriptorThatIsNoUserfaultfdIsRefused() throws {
        // Right magic, version and geometry, but /dev/null attached.
        let fake = try FakeHandoffServer(path: socketPath("devnull"), reply: handoffPayload())
        defer { fake.close() }
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: fake.path, timeout: 5) }
        #expect(e?.description.contains("is not a userfaultfd") == true)
    }

    @Test func aPayloadWithoutDescriptorIsRefused() throws {
        let fake = try FakeHandoffServer(path: socketPath("nofd"), reply: handoffPayload(), descriptor: false)
        defer { fake.close() }
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: fake.path, timeout: 5) }
        #expect(e?.description.contains("carried no descriptor") == true)
    }

    @Test func aSilentPeerTimesOut() throws {
        let fake = try FakeHandoffServer(path: socketPath("silent"), reply: nil)
        defer { fake.close() }
        let e = #expect(throws: GuestMemoryError.self) { try FaultHandoff.attach(path: fake.path, timeout: 0.2) }
        #expect(e?.errno == .timedOut)
        #expect(e?.description.contains("within 0.2 s") == true)
    }

    @Test func aPathTooLongForASocketIsRefused() throws {
        let ram = try RegisteredRAM(pages: 4)
        defer { ram.close() }
        let long = "/dev/shm/" + String(repeating: "x", count: 120)
        let e = #expect(throws: GuestMemoryError.self) {
            _ = try FaultHandoffServer(
                path: long, userfault: ram.userfault, base: ram.address(0), length: ram.a.block.size, pageSize: UInt64(Self.pageSize))
        }
        #expect(e?.description.contains("at most") == true || e?.description.contains("1 to 107") == true)
    }
}
