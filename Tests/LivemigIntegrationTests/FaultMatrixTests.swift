import Foundation
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Issue 13 item 9, the fault matrix (docs/FAULTS.md): a live migration is
/// stopped at each state by the `LIVEMIG_TEST_STOP_AT` hook, one fault is
/// applied there, and the outcome must be the documented one: the guest
/// runnable on exactly one side (or stopped on both with a documented
/// recovery), its RAM verifying there, the exit statuses and the messages
/// as in the table. QEMU's migration-test cancel cases are the model.
@Suite("fault matrix", .serialized)
struct FaultMatrixTests {
    /// Where the migration is stopped; each names the hook point of the
    /// source and, in the completion hand-shake, of the destination.
    enum State: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// Handshake and channels done, before round 1.
        case setup
        /// Round 1, its first job handed out.
        case round1
        /// The start of precopy round 2.
        case round2
        /// The guest paused and acknowledged, before the final round.
        case switchover
        /// The destination is prepared (`completed` arrived); not handed over.
        case handover
        /// Handed over and `commit` sent; the destination has not read it.
        case commit
        /// The destination committed; `committed` not sent yet.
        case committed

        var sourcePoint: String { self == .committed ? "commit" : rawValue }
        var destinationPoint: String? {
            switch self {
            case .commit: "prepared"
            case .committed: "committed"
            default: nil
            }
        }
        var testDescription: String { rawValue }
    }

    enum Fault: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case killSource, killDestination, killGuest
        case stopSource, stopDestination, stopGuest
        case proxyReset, stray
        var testDescription: String { rawValue }
    }

    /// Where the guest can run afterwards.
    enum Home: Equatable {
        /// On the source, which kept (or took back) it; the destination
        /// holds nothing runnable.
        case source
        /// On the destination, which committed; the source copy is handed
        /// over or migrated and refuses to resume.
        case destination
        /// Handed over to a destination that failed before committing:
        /// stopped on both sides, RAM and state intact on the source, which
        /// takes it back with `stress --resume --reclaim`.
        case reclaim
        /// The guest process died (the fault killed it): nothing was
        /// started on the destination; its files are left on the source.
        case died
    }

    /// The documented outcome of one case (docs/FAULTS.md).
    struct Expected {
        var home: Home
        /// Exit statuses; nil for a process the fault killed.
        var send: Int32?
        var receive: Int32?
        var sendWords: [String] = []
        var receiveWords: [String] = []
    }

    static let keepsRunning = "The guest keeps running on the source"
    static let handedOver = "it was handed over"
    static let noProgress = "no progress from the peer for 2 s"

    static func expected(_ state: State, _ fault: Fault) -> Expected {
        let beforeHandOver = [.setup, .round1, .round2, .switchover, .handover].contains(state)
        if beforeHandOver {
            switch fault {
            case .killSource:
                return Expected(home: .source, send: nil, receive: 1, receiveWords: ["closed"])
            case .killDestination:
                let words = state == .handover ? ["before the hand-over", keepsRunning] : [keepsRunning]
                return Expected(home: .source, send: 1, receive: nil, sendWords: words)
            case .killGuest:
                let died = "the guest process (pid"
                return Expected(
                    home: .died, send: 1, receive: 1, sendWords: [died, "died; nothing was started on the destination"],
                    receiveWords: [died])
            case .stopSource:
                return Expected(home: .source, send: 1, receive: 1, sendWords: [keepsRunning], receiveWords: [noProgress])
            case .stopDestination:
                if state == .handover {
                    // Handed over before the stop was noticed; the destination
                    // commits once it runs again.
                    return Expected(home: .destination, send: 1, receive: 0, sendWords: [noProgress, handedOver])
                }
                return Expected(home: .source, send: 1, receive: 1, sendWords: [noProgress, keepsRunning])
            case .stopGuest:
                // Paused already from switchover on: a stopped guest changes nothing.
                if state == .switchover || state == .handover { return Expected(home: .destination, send: 0, receive: 0) }
                return Expected(home: .source, send: 1, receive: 1, sendWords: [keepsRunning])
            case .proxyReset:
                return Expected(home: .source, send: 1, receive: 1, sendWords: [keepsRunning])
            case .stray:
                return Expected(home: .destination, send: 0, receive: 0)
            }
        }
        // Handed over, `commit` sent.
        switch fault {
        case .killSource:
            return Expected(home: .destination, send: nil, receive: 0)
        case .killDestination:
            if state == .committed {
                return Expected(home: .destination, send: 1, receive: nil, sendWords: [handedOver])
            }
            return Expected(home: .reclaim, send: 1, receive: nil, sendWords: [handedOver, "--reclaim"])
        case .stopDestination:
            return Expected(home: .destination, send: 1, receive: 0, sendWords: [noProgress, handedOver])
        case .proxyReset:
            return Expected(home: .destination, send: 1, receive: 0, sendWords: [handedOver])
        case .killGuest, .stopSource, .stopGuest, .stray:
            return Expected(home: .destination, send: 0, receive: 0)
        }
    }

    @Test("fault matrix", arguments: State.allCases, Fault.allCases)
    func faultMatrix(_ state: State, _ fault: Fault) throws {
        try MatrixRun(state: state, fault: fault).run(expecting: Self.expected(state, fault))
    }
}

/// One case: the processes, their files, and the checks.
final class MatrixRun {
    typealias Exit = (status: Int32, stdout: String, stderr: String, seconds: Double)
    typealias State = FaultMatrixTests.State
    typealias Fault = FaultMatrixTests.Fault

    let state: State
    let fault: Fault
    let scratch: Scratch
    let src, srcCtl, dst, dstCtl: String
    var processes: [LivemigProcess] = []
    var proxy: ResettingProxy?
    var stray: Socket?

    init(state: State, fault: Fault) throws {
        self.state = state
        self.fault = fault
        scratch = try Scratch()
        src = scratch.path("src.ram")
        srcCtl = scratch.path("src.ctl")
        dst = scratch.path("dst.ram")
        dstCtl = scratch.path("dst.ctl")
    }

    deinit {
        for p in processes where p.process.isRunning { kill(p.pid, SIGKILL) }
        proxy?.resetAll()
        stray?.shutdown()
    }

    func start(_ args: [String], env: [String: String] = [:]) throws -> LivemigProcess {
        let p = try LivemigProcess(args, env: env)
        processes.append(p)
        return p
    }

    func run(expecting e: FaultMatrixTests.Expected) throws {
        let tag = "\(state.rawValue)/\(fault.rawValue)"
        // Round 2 must be a precopy round: a rate limit keeps round 1 from
        // converging (16 MiB at 32 MiB/s while the guest dirties 16 MiB/s
        // leaves about 100 ms of pages, far above the 1 ms limit, even when a
        // loaded machine slows the guest down).
        let rounds = state == .round2 ? ["--max-bandwidth", "32MiB/s", "--downtime-limit", "1ms"] : []
        let guest = try start([
            "stress", "--ram", src, "--control", srcCtl, "--size", "16MiB", "--pattern", "counter", "--threads", "2", "--rate", "16MiB/s",
        ])
        try #require(guest.waitForStderr("guest started"), "\(tag): the guest did not start")
        // For round 2, one pass over the RAM first: zero pages cost nothing
        // to send, and round 1 would converge.
        if state == .round2 { usleep(2_100_000) }

        let listen: String, to: String
        if fault == .proxyReset {
            let port = freePort()
            listen = "tcp:127.0.0.1:\(port)"
            let p = try ResettingProxy(to: port)
            proxy = p
            to = "tcp:127.0.0.1:\(p.port)"
        } else {
            listen = "unix:" + scratch.path("s")
            to = listen
        }
        // A killed source must be seen as a closed connection. Between its
        // stop and the kill the receiver sees no bytes; on a loaded machine
        // that can take longer than 2 s, and the watchdog would win.
        let receiverPeerTimeout = fault == .killSource ? "10s" : "2s"
        let receiver = try start(
            ["receive", "--ram", dst, "--guest", dstCtl, "--listen", listen, "--peer-timeout", receiverPeerTimeout],
            env: state.destinationPoint.map { ["LIVEMIG_TEST_STOP_AT": $0] } ?? [:])
        try #require(receiver.waitForStderr("listening"), "\(tag): the receiver did not listen")
        let sender = try start(
            ["send", "--ram", src, "--guest", srcCtl, "--to", to, "--peer-timeout", "2s", "--switchover-timeout", "10s"] + rounds,
            env: ["LIVEMIG_TEST_STOP_AT": state.sourcePoint])
        try #require(
            sender.waitForStderr("livemig: test: stopped at \(state.sourcePoint)"),
            "\(tag): send never reached \(state.sourcePoint): \(sender.wait(timeout: 1))")
        if let point = state.destinationPoint {
            try #require(receiver.waitForStderr("livemig: test: stopped at \(point)"), "\(tag): receive never reached \(point)")
        }
        // The line comes just before raise(SIGSTOP): a SIGCONT sent in
        // between would be lost.
        try #require(waitStopped(sender.pid), "\(tag): send did not stop")
        if state.destinationPoint != nil { try #require(waitStopped(receiver.pid), "\(tag): receive did not stop") }

        // The fault, then everything that is stopped runs again.
        let faultAt = Date()
        switch fault {
        // A killed process is reaped before the others go on: it died at
        // this point, its connections closed.
        case .killSource:
            kill(sender.pid, SIGKILL)
            sender.wait(timeout: 10)
            kill(receiver.pid, SIGCONT)
        case .killDestination:
            kill(receiver.pid, SIGKILL)
            receiver.wait(timeout: 10)
            kill(sender.pid, SIGCONT)
        case .killGuest:
            kill(guest.pid, SIGKILL)
            guest.wait(timeout: 10)  // reaped: its pid is gone
            kill(receiver.pid, SIGCONT)
            kill(sender.pid, SIGCONT)
        case .stopSource:
            kill(receiver.pid, SIGCONT)
            // Longer than the destination's peer timeout and the guest's lease.
            usleep(3_000_000)
            kill(sender.pid, SIGCONT)
        case .stopDestination:
            kill(receiver.pid, SIGSTOP)
            kill(sender.pid, SIGCONT)
            _ = sender.wait(timeout: 20)
            kill(receiver.pid, SIGCONT)
        case .stopGuest:
            kill(guest.pid, SIGSTOP)
            kill(receiver.pid, SIGCONT)
            kill(sender.pid, SIGCONT)
            _ = sender.wait(timeout: 20)
            kill(guest.pid, SIGCONT)
        case .proxyReset:
            usleep(200_000)  // what was sent has been forwarded
            proxy?.resetAll()
            kill(receiver.pid, SIGCONT)
            kill(sender.pid, SIGCONT)
        case .stray:
            let s = try Socket.connect(to: SocketAddress(parsing: listen), timeout: 5)
            try s.sendAll(Array("GET / HTTP/1.0\r\n\r\n".utf8))
            stray = s
            kill(receiver.pid, SIGCONT)
            kill(sender.pid, SIGCONT)
        }
        let send = sender.wait(timeout: 30)
        let recv = receiver.wait(timeout: 30)
        let since = Date().timeIntervalSince(faultAt)
        let report = "\(tag)\nsend (\(send.status)): \(send.stderr)\nreceive (\(recv.status)): \(recv.stderr)"
        #expect(since < 20, "\(report)\nthe migration took \(since) s to end after the fault")
        if let s = e.send { #expect(send.status == s, "\(report)") }
        if let r = e.receive { #expect(recv.status == r, "\(report)") }
        for w in e.sendWords { #expect(send.stderr.contains(w), "\(report)\nsend should say '\(w)'") }
        for w in e.receiveWords { #expect(recv.stderr.contains(w), "\(report)\nreceive should say '\(w)'") }

        switch e.home {
        case .source:
            try expectDestinationNotRunnable(report)
            #expect(guest.process.isRunning, "\(report)\nthe source guest should run")
            kill(guest.pid, SIGTERM)
            let g = guest.wait(timeout: 10)
            #expect(g.status == 0, "\(report)\nguest: \(g.stderr)")
            try expectVerifies(src, srcCtl, report)
        case .destination:
            #expect(matrixRunState(dstCtl) == 3, "\(report)\nthe destination control file should be incoming")
            #expect(!matrixMarked(dst), "\(report)\nthe destination RAM is still marked incomplete")
            let g = guest.wait(timeout: 10)
            #expect(g.status == 0 || fault == .killGuest, "\(report)\nguest: \(g.stderr)")
            #expect([2, 5].contains(matrixRunState(srcCtl)), "\(report)\nthe source copy should be migrated or handed over")
            let stale = try livemig(["stress", "--ram", src, "--control", srcCtl, "--resume", "--duration", "100ms"], timeout: 20)
            #expect(stale.status == 1, "\(report)\nthe source copy resumed: \(stale.stderr)")
            try expectVerifies(dst, dstCtl, report)
            try expectResumes(dst, dstCtl, [], report)
        case .reclaim:
            try expectDestinationNotRunnable(report)
            #expect(guest.wait(timeout: 10).status == 0)
            #expect(matrixRunState(srcCtl) == 5, "\(report)\nthe source copy should be handed over")
            let plain = try livemig(["stress", "--ram", src, "--control", srcCtl, "--resume", "--duration", "100ms"], timeout: 20)
            #expect(plain.status == 1 && plain.stderr.contains("--reclaim"), "\(report)\n\(plain.stderr)")
            try expectVerifies(src, srcCtl, report)
            try expectResumes(src, srcCtl, ["--reclaim"], report)
        case .died:
            try expectDestinationNotRunnable(report)
            #expect(matrixRunState(srcCtl) == 0, "\(report)\nthe dead guest's control file should say running")
            // Paused when it was killed, its RAM and state belong together.
            if state == .switchover || state == .handover { try expectVerifies(src, srcCtl, report) }
            let again = try livemig(["stress", "--ram", src, "--control", srcCtl, "--resume", "--duration", "100ms"], timeout: 20)
            #expect(again.status == 0, "\(report)\nthe dead guest does not restart: \(again.stderr)")
        }
    }

    /// Nothing on the destination can be taken for the guest: the RAM file
    /// is gone or marked incomplete, the control file absent or incomplete.
    func expectDestinationNotRunnable(_ report: String) throws {
        let ramOK = !FileManager.default.fileExists(atPath: dst) || matrixMarked(dst)
        #expect(ramOK, "\(report)\nthe destination RAM is left unmarked")
        let ctlOK = !FileManager.default.fileExists(atPath: dstCtl) || matrixRunState(dstCtl) == 4
        #expect(ctlOK, "\(report)\nthe destination control file is in state \(matrixRunState(dstCtl))")
    }

    func expectVerifies(_ ram: String, _ ctl: String, _ report: String) throws {
        let v = try livemig(["verify", "--ram", ram, "--control", ctl], timeout: 20)
        #expect(v.status == 0, "\(report)\nverify \(ram): \(v.stdout) \(v.stderr)")
    }

    /// The guest continues there, and still verifies after it ran.
    func expectResumes(_ ram: String, _ ctl: String, _ extra: [String], _ report: String) throws {
        let r = try livemig(
            ["stress", "--ram", ram, "--control", ctl, "--resume", "--duration", "200ms", "--rate", "16MiB/s"] + extra, timeout: 20)
        #expect(r.status == 0 && r.stderr.contains("resumed"), "\(report)\nresume \(ram): \(r.stderr)")
        try expectVerifies(ram, ctl, report)
    }
}

/// Waits until `pid` is stopped (state T in /proc/PID/stat).
func waitStopped(_ pid: Int32, timeout: Double = 10) -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        // The state follows the command name, which ends with ")".
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
            let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] == "T"
        {
            return true
        }
        usleep(1000)
    }
    return false
}

/// The run state word (offset 64) of a control file; -1 when unreadable.
func matrixRunState(_ ctl: String) -> Int {
    guard let d = try? Data(contentsOf: URL(fileURLWithPath: ctl)), d.count >= 68 else { return -1 }
    return Int(d.withUnsafeBytes { $0.load(fromByteOffset: 64, as: UInt32.self) })
}

/// Whether `path` carries the incomplete mark (`user.livemig.incomplete`).
func matrixMarked(_ path: String) -> Bool {
    // <sys/xattr.h> is not in Swift's Glibc module: look getxattr(2) up.
    typealias GetXattr = @convention(c) (UnsafePointer<CChar>, UnsafePointer<CChar>, UnsafeMutableRawPointer?, Int) -> Int
    guard let sym = dlsym(nil, "getxattr") else { return false }
    return unsafeBitCast(sym, to: GetXattr.self)(path, "user.livemig.incomplete", nil, 0) >= 0
}

/// A TCP forwarder between `send` and `receive` that can reset every
/// connection at once (SO_LINGER 0, then close: the kernel sends RST), as
/// a middlebox or a failing link does. One thread polls every socket; the
/// sockets are non-blocking, so a stopped peer never blocks the others.
final class ResettingProxy: @unchecked Sendable {
    // @unchecked: the sockets and buffers belong to the proxy thread; the
    // reset request crosses threads under `lock`, the answer by semaphore.
    let port: UInt16
    private let target: UInt16
    private let listener: Int32
    private let lock = NSLock()
    private var resetRequested = false
    private var finished = false
    private let resetDone = DispatchSemaphore(value: 0)

    /// One direction of one connection: bytes read from `from` wait in
    /// `pending` until written to `to`.
    private struct Direction {
        var from: Int32
        var to: Int32
        var pending: [UInt8] = []
        var open = true
    }

    init(to target: UInt16) throws {
        self.target = target
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = Self.loopback(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 16) == 0 else {
            close(fd)
            throw POSIXError(.EADDRINUSE)
        }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        listener = fd
        port = UInt16(bigEndian: addr.sin_port)
        let t = Thread { [self] in loop() }
        t.start()
    }

    static func loopback(port: UInt16) -> sockaddr_in {
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        a.sin_port = port.bigEndian
        return a
    }

    /// Resets every connection and stops accepting; returns once done.
    func resetAll() {
        let wait = lock.withLock { () -> Bool in
            if finished { return false }
            resetRequested = true
            return true
        }
        if wait { _ = resetDone.wait(timeout: .now() + 5) }
    }

    private func loop() {
        var dirs: [Direction] = []
        var sockets: [Int32] = []
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            if lock.withLock({ resetRequested }) {
                var hardClose = linger(l_onoff: 1, l_linger: 0)
                for fd in sockets {
                    setsockopt(fd, SOL_SOCKET, SO_LINGER, &hardClose, socklen_t(MemoryLayout<linger>.size))
                    close(fd)
                }
                close(listener)
                lock.withLock { finished = true }
                resetDone.signal()
                return
            }
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0)]
            var owners: [Int] = [-1]
            for (i, d) in dirs.enumerated() where d.open {
                fds.append(pollfd(fd: d.pending.isEmpty ? d.from : d.to, events: Int16(d.pending.isEmpty ? POLLIN : POLLOUT), revents: 0))
                owners.append(i)
            }
            guard poll(&fds, nfds_t(fds.count), 20) > 0 else { continue }
            if fds[0].revents != 0 {
                let client = accept(listener, nil, nil)
                if client >= 0 {
                    let server = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                    var addr = Self.loopback(port: target)
                    let ok = withUnsafePointer(to: &addr) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            connect(server, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                        }
                    }
                    if ok == 0 {
                        for fd in [client, server] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
                        sockets += [client, server]
                        dirs.append(Direction(from: client, to: server))
                        dirs.append(Direction(from: server, to: client))
                    } else {
                        close(server)
                        close(client)
                    }
                }
            }
            for (k, i) in owners.enumerated() where k > 0 && fds[k].revents != 0 {
                if dirs[i].pending.isEmpty {
                    let n = read(dirs[i].from, &buffer, buffer.count)
                    if n > 0 {
                        dirs[i].pending = Array(buffer[0..<n])
                    } else if n == 0 || (errno != EAGAIN && errno != EINTR) {
                        // The peer closed its side (or reset): pass the close on.
                        shutdown(dirs[i].to, Int32(SHUT_WR))
                        dirs[i].open = false
                    }
                }
                if !dirs[i].pending.isEmpty {
                    let n = dirs[i].pending.withUnsafeBytes { send(dirs[i].to, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                    if n > 0 {
                        dirs[i].pending.removeFirst(n)
                    } else if n < 0, errno != EAGAIN, errno != EINTR {
                        dirs[i].open = false
                    }
                }
            }
        }
    }
}
