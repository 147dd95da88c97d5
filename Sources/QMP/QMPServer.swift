import Dispatch
import OSCall
import Synchronization
import URing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// A QMP server: listens on a Unix socket or a loopback TCP port, greets
/// each client as QEMU does, negotiates capabilities, runs commands and
/// broadcasts events to every negotiated client.
///
/// Threads: `qmp/accept` accepts; each client has its own `qmp/client/N`
/// thread, which reads, runs the commands it receives (handlers must not
/// block) and writes the replies. An event is written by whichever thread
/// emits it, under each client's write lock, so replies and events never
/// interleave mid-message. A client that disconnects, or stops reading
/// for `writeTimeout`, is dropped; nothing else is affected.
///
/// The server knows nothing about migration: commands come from the
/// caller (`QMPCommand`), plus the built-ins `qmp_capabilities`,
/// `query-version`, `query-commands` and `quit`.
public final class QMPServer: Sendable {
    public let address: SocketAddress
    public let version: QMPVersion
    /// A client whose socket takes no bytes for this long is dropped, so a
    /// client that stops reading cannot hold up the thread emitting an event.
    public static let writeTimeout = 2.0

    private let listener: Listener
    private let commands: [String: QMPCommand]
    private let clients = PosixMutex<[Int: Client]>([:])
    private let nextClient = Atomic<Int>(0)
    private let closing = Atomic<Bool>(false)
    private let quitRequested = Atomic<Bool>(false)
    private let quitSignal = DispatchSemaphore(value: 0)
    private let acceptThread = PosixMutex<WorkerThread?>(nil)
    /// The Unix socket's file as bound, removed by `close()` if unchanged.
    private let socketFile: (path: String, device: UInt64, inode: UInt64)?

    /// Binds and listens. `tcp:` must be a loopback address: QMP has no
    /// authentication, and whoever reaches the socket controls migrations.
    /// A Unix path where another program accepts is refused; a stale socket
    /// file there (nobody accepting) is replaced.
    public init(address: SocketAddress, version: QMPVersion, commands: [QMPCommand]) throws(QMPError) {
        if case .tcp = address, !address.isLoopback {
            throw QMPError(
                "QMP has no authentication: listen on a Unix socket or on a loopback address (127.0.0.1, ::1, localhost), not \(address)"
            )
        }
        self.address = address
        self.version = version
        var table: [String: QMPCommand] = [:]
        for c in commands { table[c.name] = c }
        table["query-version"] = QMPCommand("query-version") { _ in version.json }
        table["quit"] = QMPCommand("quit") { _ in [:] }
        let names = Array(table.keys) + ["qmp_capabilities", "query-commands"]
        table["query-commands"] = QMPCommand("query-commands") { _ in
            .array(names.sorted().map { ["name": .string($0)] })
        }
        self.commands = table
        do {
            listener = try Listener(address)
        } catch {
            throw QMPError("cannot listen for QMP clients on \(address): \(error.description)")
        }
        var st = stat()
        if case .unix(let path) = address, lstat(path, &st) == 0 {
            socketFile = (path, UInt64(st.st_dev), UInt64(st.st_ino))
        } else {
            socketFile = nil
        }
    }

    /// The TCP port actually bound (for `tcp:HOST:0`), else nil.
    public var boundPort: UInt16? {
        guard case .tcp = address else { return nil }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &ss) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener.fd, $0, &len) }
        }
        guard rc == 0 else { return nil }
        let family = ss.ss_family
        return withUnsafePointer(to: &ss) { p -> UInt16 in
            if family == sa_family_t(AF_INET6) {
                return p.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin6_port) }
            }
            return p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
    }

    /// Starts accepting clients.
    public func start() {
        let thread = WorkerThread(name: "qmp/accept") { [self] in acceptLoop() }
        acceptThread.withLock { $0 = thread }
    }

    /// Blocks until a client ran `quit` or `requestQuit()` was called.
    public func waitForQuit() {
        quitSignal.wait()
        quitSignal.signal()  // later waiters return too
    }

    /// Ends `waitForQuit()` (a signal, or the caller's own reason).
    public func requestQuit() {
        if !quitRequested.exchange(true, ordering: .acquiringAndReleasing) { quitSignal.signal() }
    }

    /// Whether `quit` was asked for.
    public var isQuitting: Bool { quitRequested.load(ordering: .acquiring) }

    /// Sends `{"event": name, "data": data, "timestamp": ...}` to every
    /// client that finished negotiation.
    public func emit(_ name: String, data: JSONValue? = nil) {
        var o: [String: JSONValue] = ["event": .string(name), "timestamp": Self.timestamp()]
        if let data { o["data"] = data }
        let bytes = JSONValue.object(o).serialized + [UInt8(ascii: "\n")]
        let targets = clients.withLock { Array($0.values) }
        for c in targets where c.negotiated.load(ordering: .acquiring) { c.write(bytes) }
    }

    /// Stops accepting, disconnects every client, joins every thread and
    /// removes the Unix socket's file (if it is still the one bound).
    public func close() {
        guard !closing.exchange(true, ordering: .acquiringAndReleasing) else { return }
        listener.shutdown()
        acceptThread.withLock { $0 }?.join()
        let all = clients.withLock { c -> [Client] in
            defer { c.removeAll() }
            return Array(c.values)
        }
        for c in all { c.socket.shutdown() }
        for c in all { c.thread.withLock { $0 }?.join() }
        if let f = socketFile {
            var st = stat()
            if lstat(f.path, &st) == 0, UInt64(st.st_dev) == f.device, UInt64(st.st_ino) == f.inode { unlink(f.path) }
        }
    }

    static func timestamp() -> JSONValue {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return ["seconds": .int(Int64(ts.tv_sec)), "microseconds": .int(Int64(ts.tv_nsec / 1000))]
    }

    private func acceptLoop() {
        while !closing.load(ordering: .acquiring) {
            let socket: Socket
            do {
                socket = try listener.accept(timeout: nil)
            } catch {
                if closing.load(ordering: .acquiring) { return }
                usleep(50_000)  // EMFILE and the like: try again shortly
                continue
            }
            reapFinished()
            let id = nextClient.add(1, ordering: .relaxed).newValue
            let client = Client(socket: socket)
            clients.withLock { $0[id] = client }
            let thread = WorkerThread(name: "qmp/client/\(id)") { [self] in
                serve(client)
                client.finished.store(true, ordering: .releasing)
            }
            // `close()` takes the client list only after this thread has
            // ended, so every client added here is shut and joined there.
            client.thread.withLock { $0 = thread }
        }
    }

    /// Joins the threads of clients that have gone, so a long-lived
    /// server does not collect them.
    private func reapFinished() {
        let gone = clients.withLock { c -> [Client] in
            let done = c.filter { $0.value.finished.load(ordering: .acquiring) }
            for k in done.keys { c.removeValue(forKey: k) }
            return Array(done.values)
        }
        for c in gone { c.thread.withLock { $0 }?.join() }
    }

    private func serve(_ client: Client) {
        client.socket.setSendTimeout(Self.writeTimeout)
        let greeting: JSONValue = ["QMP": ["version": version.json, "capabilities": []]]
        guard client.write(greeting.serialized + [UInt8(ascii: "\n")]) else { return }
        var session = QMPSession(commands: commands)
        var framer = QMPInputFramer()
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let n = buffer.withUnsafeMutableBytes { b in
                (try? SystemCall.retrying { recv(client.socket.fd, b.baseAddress, b.count, 0) }) ?? -1
            }
            guard n > 0 else { return }
            for piece in framer.feed(buffer[0..<n]) {
                let (reply, after) = session.handle(piece)
                if session.negotiated { client.negotiated.store(true, ordering: .releasing) }
                guard client.write(reply.serialized + [UInt8(ascii: "\n")]) else { return }
                if after == .quit {
                    emit("SHUTDOWN", data: ["guest": false, "reason": "host-qmp-quit"])
                    requestQuit()
                }
            }
        }
    }

    /// One connection.
    private final class Client: Sendable {
        let socket: Socket
        let negotiated = Atomic<Bool>(false)
        let finished = Atomic<Bool>(false)
        let thread = PosixMutex<WorkerThread?>(nil)
        private let writeLock = PosixMutex<Bool>(true)

        init(socket: Socket) { self.socket = socket }

        /// Writes one whole message, or drops the client (false) when it
        /// cannot take it.
        @discardableResult
        func write(_ bytes: [UInt8]) -> Bool {
            writeLock.withLock { alive in
                guard alive else { return false }
                do {
                    try socket.sendAll(bytes)
                    return true
                } catch {
                    alive = false
                    socket.shutdown()
                    return false
                }
            }
        }
    }
}

extension Socket {
    /// Bounds each blocking send (`SO_SNDTIMEO`).
    fileprivate func setSendTimeout(_ seconds: Double) {
        var tv = timeval(tv_sec: Int(seconds), tv_usec: Int((seconds - Double(Int(seconds))) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }
}
