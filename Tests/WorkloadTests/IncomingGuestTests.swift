import Foundation
import GuestMemory
import Synchronization
import SystemPackage
import Testing
import Workload

#if canImport(Glibc)
    import Glibc
#endif

/// The `livemig` binary `swift test` built next to the test bundle
/// (override with LIVEMIG_BIN).
private let livemigBinary: String = {
    if let p = ProcessInfo.processInfo.environment["LIVEMIG_BIN"] { return p }
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    return exe.deletingLastPathComponent().appendingPathComponent("livemig").path
}()

/// A `livemig` child process with its output collected.
private final class Child: @unchecked Sendable {
    // @unchecked: the buffers are filled by the reader threads under `lock`
    // and read under it.
    let process = Process()
    private let out = Pipe(), err = Pipe()
    private let lock = NSLock()
    private var outText = "", errText = ""
    private let readers = DispatchGroup()

    init(_ args: [String]) throws {
        process.executableURL = URL(fileURLWithPath: livemigBinary)
        process.arguments = args
        process.standardOutput = out
        process.standardError = err
        try process.run()
        for (pipe, isErr) in [(out, false), (err, true)] {
            let handle = pipe.fileHandleForReading
            readers.enter()
            Thread.detachNewThread { [self] in
                while true {
                    let d = handle.availableData
                    if d.isEmpty { break }
                    lock.withLock {
                        if isErr { errText += String(decoding: d, as: UTF8.self) } else { outText += String(decoding: d, as: UTF8.self) }
                    }
                }
                readers.leave()
            }
        }
    }

    var pid: Int32 { process.processIdentifier }
    var stderr: String { lock.withLock { errText } }
    var stdout: String { lock.withLock { outText } }

    /// Waits until stderr contains `text`, or the process ended, or `seconds` passed.
    func waitForStderr(_ text: String, within seconds: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if stderr.contains(text) { return true }
            if !process.isRunning {
                readers.wait()
                return stderr.contains(text)
            }
            usleep(5000)
        }
        return false
    }

    /// Waits for the exit (SIGKILL after `seconds`); the exit status.
    @discardableResult
    func wait(within seconds: Double = 30) -> Int32 {
        let deadline = Date().addingTimeInterval(seconds)
        while process.isRunning && Date() < deadline { usleep(5000) }
        if process.isRunning { Glibc.kill(pid, SIGKILL) }
        process.waitUntilExit()
        readers.wait()
        return process.terminationStatus
    }

    /// Ends it for good if it still runs (a failed test must leave nothing behind).
    func terminate() {
        if process.isRunning { Glibc.kill(pid, SIGKILL) }
        wait()
    }
}

/// Runs `livemig` to completion: (status, stdout, stderr).
private func livemig(_ args: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
    let c = try Child(args)
    let status = c.wait(within: 60)
    return (status, c.stdout, c.stderr)
}

/// Paths of an incoming guest's files on /dev/shm, removed afterwards.
private struct ShmFiles {
    let ram: String
    let control: String
    var socket: String { control + ".uffd" }

    init() {
        let tag = UUID().uuidString.prefix(8)
        ram = "/dev/shm/livemig-incoming-\(tag).ram"
        control = "/dev/shm/livemig-incoming-\(tag).ctl"
    }

    func remove() {
        for p in [ram, control, socket] { unlink(p) }
    }
}

/// `livemig stress --incoming`, run as the real binary, and a receiver
/// played by this test through `FaultHandoff`.
@Suite("IncomingGuest")
struct IncomingGuestTests {
    static let pageSize = 4096
    static let ramSize = 1 << 20

    @Test func aRAMFileOffTmpfsIsRefused() throws {
        try withTempDir { dir in
            let ram = dir.appendingPathComponent("guest.ram").path
            guard RAMFile.postcopyRefusal(for: FilePath(ram)) != nil else { return }  // the temp dir is on tmpfs here
            let r = try livemig([
                "stress", "--incoming", "--ram", ram, "--control", dir.appendingPathComponent("guest.ctl").path, "--size", "1MiB",
            ])
            #expect(r.status == 1)
            #expect(r.stderr.contains("where a userfaultfd cannot report missing pages"), "\(r.stderr)")
            #expect(r.stderr.contains("f_type 0x"))
            #expect(r.stderr.contains("/dev/shm"))
            #expect(!FileManager.default.fileExists(atPath: ram), "a refused incoming guest created its RAM file")
            #expect(!FileManager.default.fileExists(atPath: dir.appendingPathComponent("guest.ctl").path))
        }
    }

    @Test func aSocketPathTooLongIsRefusedBeforeAnyFileIsMade() throws {
        let files = ShmFiles()
        defer { files.remove() }
        let control = "/dev/shm/" + String(repeating: "c", count: 100) + ".ctl"
        defer { unlink(control) }
        let r = try livemig(["stress", "--incoming", "--ram", files.ram, "--control", control, "--size", "1MiB"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("a Unix socket path holds at most 107"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: files.ram))
        #expect(!FileManager.default.fileExists(atPath: control))
    }

    @Test func itWaitsOnItsSocketUntilSIGTERM() throws {
        let files = ShmFiles()
        defer { files.remove() }
        let guest = try Child(["stress", "--incoming", "--ram", files.ram, "--control", files.control, "--size", "1MiB"])
        defer { guest.terminate() }
        try #require(guest.waitForStderr("stress: incoming guest waiting on"), "\(guest.stderr)")
        #expect(guest.stderr.contains("hand-off socket \(files.socket)"))

        var st = stat()
        try #require(lstat(files.socket, &st) == 0)
        #expect(st.st_mode & S_IFMT == S_IFSOCK)
        #expect(st.st_mode & 0o777 == 0o600)
        // The RAM file is a hole: nothing allocated, every page missing.
        try #require(stat(files.ram, &st) == 0)
        #expect(st.st_size == Self.ramSize)
        #expect(st.st_blocks == 0)

        let control = try GuestControl(path: FilePath(files.control))
        #expect(control.runState == .waitingIncoming)
        #expect(control.handoffSocketPath == files.socket)
        #expect(control.guestPID == guest.pid)
        #expect(control.guestThreads == 0)
        // It holds the guest lock, not the RAM writer lock (the receiver's).
        #expect(try OwnerLock.holder(of: .guest, on: FilePath(files.control))?.pid == guest.pid)
        #expect(try OwnerLock.holder(of: .ramWriter, on: FilePath(files.ram)) == nil)

        // Nothing else takes it for a guest to run or check (resume meets
        // the guest lock first).
        let resume = try livemig(["stress", "--resume", "--ram", files.ram, "--control", files.control])
        #expect(resume.status == 1)
        #expect(resume.stderr.contains("belongs to a running guest"), "\(resume.stderr)")
        let verify = try livemig(["verify", "--ram", files.ram, "--control", files.control])
        #expect(verify.status == 1)
        #expect(verify.stderr.contains("waits for a migration"), "\(verify.stderr)")

        kill(guest.pid, SIGTERM)
        #expect(guest.wait(within: 10) == 0, "\(guest.stderr)")
        #expect(guest.stdout.contains("stopped by signal while waiting"))
        #expect(access(files.socket, F_OK) != 0, "the socket file outlived the guest")
        #expect(control.handoffSocketPath == nil)
        #expect(try OwnerLock.holder(of: .guest, on: FilePath(files.control)) == nil)
    }

    /// The receiver's side, as the migration protocol will do it, against
    /// the real `stress --incoming` process: attach, place pages through
    /// the guest's descriptor, store a counter guest's state and set
    /// *incoming*. With `postcopy` the guest is started first and the
    /// test serves its faults as they come; otherwise every page is placed
    /// and the range unregistered first (precopy). Either way the guest
    /// runs, takes its RAM lock once the receiver let go, stops on SIGTERM,
    /// and `livemig verify` agrees with its RAM.
    @Test(arguments: [false, true])
    func aReceiverInAnotherProcessFillsAndStartsTheGuest(postcopy: Bool) throws {
        let files = ShmFiles()
        defer { files.remove() }
        let guest = try Child([
            "stress", "--incoming", "--ram", files.ram, "--control", files.control, "--size", "1MiB", "--rate", "64MiB/s",
        ])
        // (A modest rate: the suites run in parallel, and two guest threads
        // at full speed would take both CPUs from timing-sensitive tests.)
        defer { guest.terminate() }  // a guest thread blocked on a fault dies only by SIGKILL
        try #require(guest.waitForStderr("stress: incoming guest waiting on"), "\(guest.stderr)")

        let control = try GuestControl(path: FilePath(files.control))
        try #require(control.runState == .waitingIncoming)
        let socket = try #require(control.handoffSocketPath)
        let attachment = try FaultHandoff.attach(path: socket, timeout: 5)
        #expect(attachment.guestPID == guest.pid)
        #expect(attachment.length == UInt64(Self.ramSize))
        #expect(attachment.pageSize == UInt64(Self.pageSize))
        #expect(attachment.threadIDs, "this kernel grants thread ids")
        // The receiver holds the RAM writer lock while it writes the RAM.
        var receiverLock: OwnerLock? = try OwnerLock.claimRAM(FilePath(files.ram))

        // Page 0: counter 0, then recognisable bytes, placed in the other
        // process and read back from the file.
        var page = [UInt8](repeating: 0, count: Self.pageSize)
        for i in 8..<Self.pageSize { page[i] = UInt8(truncatingIfNeeded: i &* 31 &+ 7) }
        let uf = attachment.userfault
        let base = attachment.guestBase
        #expect(try page.withUnsafeBytes { try uf.copy(to: base, from: $0.baseAddress!, length: Self.pageSize) } == .placed)
        let handle = try #require(FileHandle(forReadingAtPath: files.ram))
        #expect(Array(try handle.read(upToCount: Self.pageSize) ?? Data()) == page, "the page placed in the guest is not in its file")
        try handle.close()
        #expect(try page.withUnsafeBytes { try uf.copy(to: base, from: $0.baseAddress!, length: Self.pageSize) } == .alreadyPresent)

        // A fresh counter guest: every counter 0, which zero pages are.
        let pages = Self.ramSize / Self.pageSize
        let state = StressState(pattern: .counter, threads: 2, pageCount: pages, seed: 7)
        if !postcopy {
            #expect(try uf.zeroPage(at: base + UInt64(Self.pageSize), length: Self.ramSize - Self.pageSize) == .placed)
            try uf.unregister(address: base, length: UInt64(Self.ramSize))
        }
        try control.writeState(state.encoded())
        control.setRunState(.incoming)

        // Serve faults until the guest exits. Let go of the RAM lock once
        // the guest runs, as a receiver does when it finishes; stop the
        // guest once it took that lock and (postcopy) touched every page.
        var faults: [Userfault.Fault] = []
        var guestTookRAMLock = false
        var stopped = false
        let deadline = Date().addingTimeInterval(30)
        while guest.process.isRunning, Date() < deadline {
            for f in try uf.readFaults(timeout: 0.02) {
                faults.append(f)
                _ = try uf.zeroPage(at: f.address, length: Self.pageSize)
            }
            if receiverLock != nil, guest.stderr.contains("guest resumed (incoming)") { receiverLock = nil }
            if receiverLock == nil, !guestTookRAMLock {
                guestTookRAMLock = try OwnerLock.holder(of: .ramWriter, on: FilePath(files.ram))?.pid == guest.pid
            }
            if !stopped, guestTookRAMLock, !postcopy || Set(faults.map(\.address)).count == pages - 1 {
                kill(guest.pid, SIGTERM)
                stopped = true
            }
        }
        #expect(stopped, "the guest did not take its RAM lock or touch every page within 30 s")
        #expect(guestTookRAMLock)
        #expect(guest.wait(within: 10) == 0, "\(guest.stderr)")
        #expect(
            guest.stderr.contains("stress: guest resumed (incoming): pattern counter, 2 thread(s), target 64.0 MiB/s"), "\(guest.stderr)")
        #expect(guest.stdout.contains("stopped by signal; guest state saved"), "\(guest.stdout)")
        #expect(access(socket, F_OK) != 0, "the socket file outlived the guest")

        if postcopy {
            // The guest ran before its pages were there: every page but
            // page 0 faulted, once, when its thread reached it.
            #expect(!faults.isEmpty)
            #expect(faults.allSatisfy { $0.address >= base && $0.address < base + UInt64(Self.ramSize) })
            #expect(faults.allSatisfy { $0.threadID != 0 })
            #expect(faults.contains { $0.write }, "the counter guest writes its pages")
            #expect(Set(faults.map(\.address)).count == faults.count, "a page faulted twice after it was placed")
            #expect(!faults.contains { $0.address == base }, "page 0 was placed before the start and must not fault")
        } else {
            #expect(faults.isEmpty, "an unregistered guest reported faults")
        }
        let verify = try livemig(["verify", "--ram", files.ram, "--control", files.control])
        #expect(verify.status == 0, "\(verify.stderr)")
        #expect(verify.stdout.contains("verify: OK"))
    }

    @Test func theDefaultSocketIsBesideTheControlFile() {
        #expect(IncomingGuest.defaultSocketPath(control: FilePath("/dev/shm/vm.ctl")) == "/dev/shm/vm.ctl.uffd")
    }
}
