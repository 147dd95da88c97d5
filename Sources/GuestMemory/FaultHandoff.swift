import CShims
import OSCall
import Synchronization
import SystemPackage
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

// The hand-off of an incoming guest's userfaultfd to its receiver, the way
// Firecracker hands its guest's descriptor to a page-fault handler: the
// guest serves a Unix stream socket, and every connection gets one message
// carrying the descriptor (SCM_RIGHTS) and a fixed payload that says which
// memory it covers. The socket's path is in the guest's control file
// (`GuestControl.handoffSocketPath`).
//
// Payload, 48 bytes, little-endian:
//
// | offset | size | field |
// |---:|---:|---|
// | 0 | 8 | magic "LMUFFD01" |
// | 8 | 4 | version (1) |
// | 12 | 4 | flags: bit 0 = faults carry thread ids (UFFD_FEATURE_THREAD_ID) |
// | 16 | 8 | guest base: the registered mapping's address in the guest |
// | 24 | 8 | length of the registered mapping, bytes |
// | 32 | 8 | page size |
// | 40 | 4 | guest pid |
// | 44 | 4 | reserved (0) |

/// What a receiver gets from an incoming guest (`FaultHandoff.attach`).
public struct IncomingAttachment: Sendable {
    /// The guest's userfaultfd, adopted: this process's copy, closed when
    /// the last reference goes. It acts on the guest's memory.
    public let userfault: Userfault
    /// The guest's registered mapping: its address in the guest's address
    /// space (for `UFFDIO_COPY` destinations) and its length.
    public let guestBase: UInt64
    public let length: UInt64
    public let pageSize: UInt64
    /// The guest process (in its own pid namespace).
    public let guestPID: Int32
    /// Whether faults carry thread ids.
    public let threadIDs: Bool
}

/// The hand-off payload's format.
enum HandoffPayload {
    static let magic = Array("LMUFFD01".utf8)
    static let version: UInt32 = 1
    static let size = 48
    static let flagThreadIDs: UInt32 = 1

    static func encode(base: UInt64, length: UInt64, pageSize: UInt64, pid: Int32, threadIDs: Bool) -> [UInt8] {
        var out = magic
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) } }
        put(version)
        put(threadIDs ? flagThreadIDs : 0)
        put(base)
        put(length)
        put(pageSize)
        put(pid)
        put(UInt32(0))
        return out
    }

    static func load<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, as: T.Type) -> T {
        var v = T.zero
        withUnsafeMutableBytes(of: &v) { dst in
            for i in 0..<MemoryLayout<T>.size { dst[i] = bytes[offset + i] }
        }
        return T(littleEndian: v)
    }

    /// Checks a geometry, with the text of what is wrong, or nil.
    static func geometryProblem(base: UInt64, length: UInt64, pageSize: UInt64) -> String? {
        guard pageSize >= 4096, pageSize <= 1 << 30, pageSize & (pageSize - 1) == 0 else {
            return "page size \(pageSize) is not a power of two from 4096 to 1 GiB"
        }
        guard length > 0, length % pageSize == 0, base % pageSize == 0, base <= UInt64.max - length else {
            return "\(Userfault.range(base, length)) is not a non-empty range of whole \(pageSize)-byte pages"
        }
        return nil
    }
}

/// Serves an incoming guest's userfaultfd on a Unix socket file until
/// `stop()`: every connection from a process of this user gets the
/// descriptor and the payload, then is closed. It runs its own accept
/// thread (`uffd/handoff`), so any number of receivers may attach over
/// time (a new one after a failed one).
///
/// The socket file has mode 0600, and a peer whose uid (SO_PEERCRED)
/// differs from this process's effective uid is closed without a word:
/// the descriptor gives full control over the guest's memory.
/// `stop()` (or deinit) removes the socket file, but only while it is still
/// the one this server made (same device and inode), never a successor's.
///
/// The server holds a reference to the `Userfault`; the guest keeps its own
/// too, for the guest's whole life (see `Userfault`).
public final class FaultHandoffServer: Sendable {
    /// The socket file's path.
    public let path: String
    private let loop: AcceptLoop
    private let thread: Mutex<WorkerThread?>
    private let identity: (device: UInt64, inode: UInt64)

    /// How many receivers got the descriptor, and how many peers were
    /// refused (another uid, or a failed send).
    public var handoffs: Int { loop.handoffs.load(ordering: .relaxed) }
    public var refusals: Int { loop.refusals.load(ordering: .relaxed) }

    /// Binds `path` (mode 0600), listens and starts the accept thread. A
    /// stale socket file that nobody accepts on is replaced; a live one, or
    /// a file that is not a socket, is refused.
    public init(path: String, userfault: Userfault, base: UInt64, length: UInt64, pageSize: UInt64) throws(GuestMemoryError) {
        if let problem = HandoffPayload.geometryProblem(base: base, length: length, pageSize: pageSize) {
            throw GuestMemoryError("cannot serve a hand-off: \(problem)", errno: .invalidArgument)
        }
        let listenFD = try Self.bindListening(path)
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = SystemCall.lastError
            close(listenFD)
            throw GuestMemoryError("hand-off socket \(path) vanished right after it was made: \(e)", errno: e)
        }
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            let e = SystemCall.lastError
            close(listenFD)
            unlink(path)
            throw GuestMemoryError("cannot make the hand-off server's wake-up pair (socketpair): \(e)", errno: e)
        }
        self.path = path
        self.identity = (UInt64(st.st_dev), UInt64(st.st_ino))
        let payload = HandoffPayload.encode(
            base: base, length: length, pageSize: pageSize, pid: getpid(), threadIDs: userfault.reportsThreadID)
        let loop = AcceptLoop(listenFD: listenFD, wakeRead: pair[0], wakeWrite: pair[1], userfault: userfault, payload: payload)
        self.loop = loop
        self.thread = Mutex(WorkerThread(name: "uffd/handoff") { loop.run() })
    }

    deinit { stop() }

    /// Stops accepting, joins the accept thread, closes the listening
    /// socket and removes the socket file if it is still this server's.
    /// Idempotent. Receivers that attached keep their descriptors.
    public func stop() {
        guard
            let t = thread.withLock({ t -> WorkerThread? in
                defer { t = nil }
                return t
            })
        else { return }
        loop.wake()
        t.join()
        loop.closeAll()
        var st = stat()
        if lstat(path, &st) == 0, UInt64(st.st_dev) == identity.device, UInt64(st.st_ino) == identity.inode {
            unlink(path)
        }
    }

    /// socket, bind (replacing a stale socket file), chmod 0600, listen.
    private static func bindListening(_ path: String) throws(GuestMemoryError) -> Int32 {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= GuestControl.handoffSocketPathLimit else {
            throw GuestMemoryError(
                "hand-off socket path \(path) is \(bytes.count) bytes; a Unix socket path holds 1 to \(GuestControl.handoffSocketPathLimit): "
                    + "give a shorter path", errno: .fileNameTooLong)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot make the hand-off socket: \(e)", errno: e)
        }
        var replacedStale = false
        while true {
            let r = withUnixAddress(bytes) { bind(fd, $0, $1) }
            if r == 0 { break }
            let e = SystemCall.lastError
            if e == .addressInUse, !replacedStale {
                var st = stat()
                if lstat(path, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK {
                    if Self.someoneAccepts(bytes) {
                        close(fd)
                        throw GuestMemoryError(
                            "hand-off socket \(path) is served by another live process (another incoming guest?); give another path",
                            errno: e)
                    }
                    // A socket file left by a guest that died: nobody accepts.
                    unlink(path)
                    replacedStale = true
                    continue
                }
                close(fd)
                throw GuestMemoryError("\(path) exists and is not a socket; remove it or give another hand-off path", errno: e)
            }
            close(fd)
            throw GuestMemoryError("cannot bind the hand-off socket \(path): \(e)", errno: e)
        }
        // Before listen: until then a connect is refused, so no peer can
        // slip in while the file still has the umask's mode.
        guard chmod(path, 0o600) == 0, listen(fd, 16) == 0 else {
            let e = SystemCall.lastError
            close(fd)
            unlink(path)
            throw GuestMemoryError("cannot set up the hand-off socket \(path): \(e)", errno: e)
        }
        return fd
    }

    /// Whether a process accepts connections on the socket file (probe).
    private static func someoneAccepts(_ path: [UInt8]) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return withUnixAddress(path) { connect(fd, $0, $1) } == 0
    }
}

/// The accept thread's state. It holds no reference to the server, so the
/// server's deinit can stop it.
private final class AcceptLoop: Sendable {
    let listenFD: Int32
    let wakeRead: Int32
    let wakeWrite: Int32
    let userfault: Userfault
    let payload: [UInt8]
    let handoffs = Atomic<Int>(0)
    let refusals = Atomic<Int>(0)

    init(listenFD: Int32, wakeRead: Int32, wakeWrite: Int32, userfault: Userfault, payload: [UInt8]) {
        self.listenFD = listenFD
        self.wakeRead = wakeRead
        self.wakeWrite = wakeWrite
        self.userfault = userfault
        self.payload = payload
    }

    func run() {
        while true {
            var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0), pollfd(fd: wakeRead, events: Int16(POLLIN), revents: 0)]
            let n = poll(&fds, 2, -1)
            if n < 0 {
                if SystemCall.lastError == .interrupted { continue }
                return
            }
            if fds[1].revents != 0 { return }
            guard fds[0].revents & Int16(POLLIN) != 0 else { continue }
            let conn = lm_accept_cloexec(listenFD)
            guard conn >= 0 else { continue }  // the peer gave up already, or EMFILE: next one
            serve(conn)
            close(conn)
        }
    }

    /// One receiver: checks its uid, sends the descriptor and the payload.
    private func serve(_ conn: Int32) {
        var pid: Int32 = 0
        var uid: UInt32 = 0
        guard lm_peer_credentials(conn, &pid, &uid) == 0, uid == geteuid() else {
            refusals.add(1, ordering: .relaxed)
            return
        }
        // A peer that never reads must not hold the accept thread: 48 bytes
        // fit any socket buffer, but bound the send anyway.
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let sent = payload.withUnsafeBytes { lm_send_fd(conn, userfault.fd, $0.baseAddress, $0.count) }
        if sent == Int64(payload.count) {
            handoffs.add(1, ordering: .relaxed)
        } else {
            refusals.add(1, ordering: .relaxed)
        }
    }

    func wake() {
        var b: UInt8 = 1
        _ = write(wakeWrite, &b, 1)
    }

    func closeAll() {
        close(listenFD)
        close(wakeRead)
        close(wakeWrite)
    }
}

/// The receiver's side of the hand-off.
public enum FaultHandoff {
    /// Connects to the incoming guest's hand-off socket at `path` and takes
    /// its userfaultfd and geometry, waiting at most `timeout` seconds.
    /// Refuses a socket served by another user (only this user or root may
    /// hand out guest memory here), a peer that speaks something else, and
    /// a descriptor that is not a userfaultfd.
    public static func attach(path: String, timeout: Double) throws(GuestMemoryError) -> IncomingAttachment {
        let bytes = Array(path.utf8)
        guard !bytes.isEmpty, bytes.count <= GuestControl.handoffSocketPathLimit else {
            throw GuestMemoryError(
                "hand-off socket path \(path) is \(bytes.count) bytes; a Unix socket path holds 1 to \(GuestControl.handoffSocketPathLimit)",
                errno: .fileNameTooLong)
        }
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = SystemCall.lastError
            if e == .noSuchFileOrDirectory {
                throw GuestMemoryError(
                    "no hand-off socket at \(path): no incoming guest waits there; start one with livemig stress --incoming", errno: e)
            }
            throw GuestMemoryError("cannot look at hand-off socket \(path): \(e)", errno: e)
        }
        guard st.st_mode & S_IFMT == S_IFSOCK else {
            throw GuestMemoryError("\(path) is not a socket, so not a livemig hand-off", errno: .notSocket)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot make a socket to attach to \(path): \(e)", errno: e)
        }
        defer { close(fd) }
        // Bounds a connect to a full backlog (SO_SNDTIMEO applies to Unix
        // connects) and each read.
        let seconds = max(timeout, 0.001)
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - seconds.rounded(.down)) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        if withUnixAddress(bytes, { connect(fd, $0, $1) }) != 0 {
            let e = SystemCall.lastError
            switch e {
            case .connectionRefused:
                throw GuestMemoryError(
                    "nobody accepts on hand-off socket \(path): the incoming guest that made it has exited; start it again", errno: e)
            case .permissionDenied:
                throw GuestMemoryError(
                    "hand-off socket \(path) is not accessible (permission denied): it belongs to another user; run as the guest's user",
                    errno: e)
            case .resourceTemporarilyUnavailable, .timedOut, .wouldBlock:
                throw GuestMemoryError("the incoming guest at \(path) did not accept within \(seconds) s", errno: .timedOut)
            default:
                throw GuestMemoryError("cannot connect to hand-off socket \(path): \(e)", errno: e)
            }
        }
        var pid: Int32 = 0
        var uid: UInt32 = 0
        let cr = lm_peer_credentials(fd, &pid, &uid)
        guard cr == 0 else {
            let e = SystemCall.error(negated: cr)
            throw GuestMemoryError("cannot tell who serves hand-off socket \(path) (SO_PEERCRED): \(e)", errno: e)
        }
        guard uid == geteuid() || uid == 0 else {
            throw GuestMemoryError(
                "hand-off socket \(path) is served by uid \(uid), not by this user (uid \(geteuid())) or root; refusing to place "
                    + "guest memory into another user's process", errno: .permissionDenied)
        }

        let deadline = Monotonic.now + seconds
        var payload = [UInt8](repeating: 0, count: HandoffPayload.size)
        var received = 0
        var handed: Int32 = -1
        var ok = false
        defer { if !ok, handed >= 0 { close(handed) } }
        while received < payload.count {
            let left = deadline - Monotonic.now
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let n = left <= 0 ? 0 : poll(&pfd, 1, Int32((left * 1000).rounded(.up)))
            if n < 0, SystemCall.lastError == .interrupted { continue }
            if n <= 0 {
                throw GuestMemoryError(
                    "the peer at hand-off socket \(path) sent no complete hand-off within \(seconds) s (\(received) of "
                        + "\(payload.count) bytes); is it a livemig incoming guest?", errno: .timedOut)
            }
            var got: Int32 = -1
            let r = payload.withUnsafeMutableBytes { lm_recv_fd(fd, $0.baseAddress! + received, $0.count - received, &got) }
            if got >= 0 {
                if handed >= 0 { close(got) } else { handed = got }
            }
            if r < 0 {
                let e = SystemCall.error(negated: r)
                if e == .resourceTemporarilyUnavailable || e == .wouldBlock { continue }
                throw GuestMemoryError("cannot read the hand-off from \(path): \(e)", errno: e)
            }
            if r == 0 {
                throw GuestMemoryError(
                    received == 0
                        ? "the peer at hand-off socket \(path) closed without a hand-off (it refused this user, or it is not a livemig incoming guest)"
                        : "the hand-off from \(path) ends after \(received) of \(payload.count) bytes: not a livemig hand-off",
                    errno: .connectionReset)
            }
            received += Int(r)
        }

        guard Array(payload[0..<8]) == HandoffPayload.magic else {
            let shown = payload[0..<8].map { (0x20..<0x7F).contains($0) ? String(UnicodeScalar($0)) : "." }.joined()
            throw GuestMemoryError(
                "\(path) is not a livemig hand-off (magic \"\(shown)\", expected \"LMUFFD01\")", errno: .protocolNotSupported)
        }
        let version = HandoffPayload.load(payload, 8, as: UInt32.self)
        guard version == HandoffPayload.version else {
            throw GuestMemoryError(
                "the hand-off at \(path) is version \(version); this livemig speaks version \(HandoffPayload.version): "
                    + "run the same livemig on both sides", errno: .protocolNotSupported)
        }
        let flags = HandoffPayload.load(payload, 12, as: UInt32.self)
        let base = HandoffPayload.load(payload, 16, as: UInt64.self)
        let length = HandoffPayload.load(payload, 24, as: UInt64.self)
        let pageSize = HandoffPayload.load(payload, 32, as: UInt64.self)
        let guestPID = HandoffPayload.load(payload, 40, as: Int32.self)
        if let problem = HandoffPayload.geometryProblem(base: base, length: length, pageSize: pageSize) {
            throw GuestMemoryError("the hand-off at \(path) describes no usable memory: \(problem)", errno: .protocolNotSupported)
        }
        guard handed >= 0 else {
            throw GuestMemoryError("the hand-off at \(path) carried no descriptor", errno: .protocolNotSupported)
        }
        guard isUserfaultfd(handed) else {
            throw GuestMemoryError("the descriptor handed over at \(path) is not a userfaultfd", errno: .protocolNotSupported)
        }
        ok = true
        let threadIDs = flags & HandoffPayload.flagThreadIDs != 0
        return IncomingAttachment(
            userfault: Userfault(adopting: handed, threadIDs: threadIDs, pageSize: pageSize), guestBase: base, length: length,
            pageSize: pageSize, guestPID: guestPID, threadIDs: threadIDs)
    }

    /// Whether `fd` is a userfaultfd: its /proc link names the anonymous
    /// inode "[userfaultfd]".
    private static func isUserfaultfd(_ fd: Int32) -> Bool {
        var buf = [CChar](repeating: 0, count: 64)
        let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
        guard n > 0 else { return false }
        return String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) == "anon_inode:[userfaultfd]"
    }
}

/// Calls `body` with a `sockaddr_un` for `path` (at most 107 bytes) and its length.
private func withUnixAddress(_ path: [UInt8], _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32) -> Int32 {
    var sun = sockaddr_un()
    sun.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &sun.sun_path) { dst in
        for (i, b) in path.enumerated() { dst[i] = b }
    }
    let len = socklen_t(MemoryLayout<sa_family_t>.size + path.count + 1)
    return withUnsafePointer(to: &sun) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, len) }
    }
}
