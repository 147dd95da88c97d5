import Dispatch
import GuestMemory
import MigrationWire
import Synchronization
import URing

/// How the source connects and sends.
public struct SourceConfig: Sendable {
    public var address: SocketAddress
    /// Multifd channels; must equal the destination's.
    public var channels: Int
    /// Use io_uring for the page channels (falls back when unavailable).
    public var useRing = true
    /// How long to retry a refused connection.
    public var connectTimeout = 3.0
    /// How long to wait for each handshake reply (the destination may be
    /// creating and pre-faulting its RAM meanwhile).
    public var handshakeTimeout = 60.0

    public init(address: SocketAddress, channels: Int) {
        self.address = address
        self.channels = channels
    }
}

/// The source side of a migration: connects, hands every dirty page to the
/// sender channels round by round, and succeeds only when the destination
/// says it holds every page.
///
/// Threads: the caller of `run()` is the migration thread; one sender thread
/// per channel (`MultiFDSend`); one thread reads the main channel. The source
/// RAM is mapped read-only: `send` never writes guest memory.
public final class SourceMigration: Sendable {
    public let ram: RAMFile
    public let config: SourceConfig
    public let counters = TransferCounters()
    public let latch = FailureLatch()
    /// Messages for the user (fallbacks taken), read after `run()`.
    public let warnings = Mutex<[String]>([])
    private let cancelled = Atomic<Bool>(false)
    /// Set by the main-channel reader when the destination confirms.
    private let confirmed = Atomic<Bool>(false)

    public init(ram: RAMFile, config: SourceConfig) {
        self.ram = ram
        self.config = config
    }

    /// Stops the migration from any thread (a signal handler's queue).
    public func cancel(_ reason: String) {
        cancelled.store(true, ordering: .relaxed)
        latch.fail(MigrationError(.cancelled, reason))
    }

    /// Runs the migration to completion. Throws the first failure of any
    /// thread; every thread has ended by the time this returns or throws.
    public func run() throws(MigrationError) -> MigrationStats {
        let start = Monotonic.now
        var control: ControlChannel?
        var sockets: [Socket] = []
        var pool: MultiFDSend?
        var reader: WorkerThread?
        defer {
            pool?.finish()
            for s in sockets { s.shutdown() }
            control?.socket.shutdown()
            reader?.join()
        }
        do throws(MigrationError) {
            let session = SessionID.random()
            let main = try connect()
            let ctl = ControlChannel(socket: main, counters: counters)
            control = ctl
            // The main socket is only half shut on failure so the error text
            // can still be sent to the destination (see `reportFailure`).
            latch.onFailure { [main] in _ = shutdownRead(main) }
            try handshake(ctl, session: session)

            for id in 0..<config.channels {
                let s = try connect()
                sockets.append(s)
                latch.onFailure { [s] in s.shutdown() }
                try send(ChannelHello(session: session, kind: .multifd, channelID: UInt16(id), channelCount: UInt16(config.channels)).encoded(), on: s)
            }
            let transports = makeTransports(sockets)

            let completed = DispatchSemaphore(value: 0)
            latch.onFailure { completed.signal() }
            reader = WorkerThread(name: "mig/src/main") { [self] in
                readDestination(ctl, completed: completed)
            }
            let setupTime = Monotonic.now - start

            let multifd = MultiFDSend(transports: transports, latch: latch)
            pool = multifd
            let bitmap = DirtyBitmap(pageCount: ram.block.pageCount)
            // This migration has one round over the whole of RAM:
            // every page starts dirty.
            bitmap.markAll()
            try sendRound(bitmap, through: multifd)
            try ctl.send(.endOfRound(round: 1))
            try ctl.send(
                .complete(
                    CompletionSummary(
                        rounds: 1, normalPages: counters.read(counters.normalPages),
                        zeroPages: counters.read(counters.zeroPages), packets: counters.read(counters.packets))))
            completed.wait()
            try latch.check()
            // Acquire: pairs with the store-release in `readDestination`.
            guard confirmed.load(ordering: .acquiring) else {
                throw MigrationError(.peer, "the destination did not confirm completion")
            }
            return stats(start: start, setupTime: setupTime, status: .completed)
        } catch {
            latch.fail(error)
            reportFailure(control)
            throw latch.error ?? error
        }
    }

    /// One round: harvest every dirty word, batch the pages, hand the
    /// batches out, then the SYNC barrier.
    func sendRound(_ bitmap: DirtyBitmap, through multifd: MultiFDSend) throws(MigrationError) {
        var pages = MultiFDPages()
        let pageSize = ram.block.pageSize
        do {
            try bitmap.harvestAll { page in
                if pages.isFull { try multifd.send(&pages) }
                pages.append(offset: UInt64(page) &* pageSize, block: 0)
            }
        } catch let e as MigrationError {
            throw e
        } catch {
            throw MigrationError(.local, "\(error)")
        }
        if !pages.isEmpty { try multifd.send(&pages) }
        try multifd.sync()
    }

    private func connect() throws(MigrationError) -> Socket {
        do {
            return try Socket.connect(to: config.address, timeout: config.connectTimeout)
        } catch {
            throw MigrationError(error)
        }
    }

    private func send(_ bytes: [UInt8], on socket: Socket) throws(MigrationError) {
        do {
            try socket.sendAll(bytes)
        } catch {
            throw MigrationError(error)
        }
        counters.add(counters.mainBytes, UInt64(bytes.count))
    }

    /// Main hello, then the RAM layout; each must be accepted.
    private func handshake(_ ctl: ControlChannel, session: SessionID) throws(MigrationError) {
        ctl.socket.setReceiveTimeout(config.handshakeTimeout)
        try send(
            ChannelHello(session: session, kind: .main, channelID: 0, channelCount: UInt16(config.channels)).encoded(),
            on: ctl.socket)
        try expect(.helloAccepted, on: ctl, while: "waiting for the destination to accept the hello")
        let block = ram.block
        try ctl.send(.ramLayout([RAMBlockLayout(name: block.name, size: block.size, pageSize: block.pageSize)]))
        try expect(.layoutAccepted, on: ctl, while: "waiting for the destination to accept the RAM layout")
        ctl.socket.setReceiveTimeout(nil)
    }

    private func expect(_ wanted: MainMessage, on ctl: ControlChannel, while what: String) throws(MigrationError) {
        let m = try ctl.receive(what)
        if m == wanted { return }
        if case .error(let text) = m { throw MigrationError(.peer, "destination refused: \(text)") }
        throw MigrationError(.protocolViolation, "\(what): got '\(m.name)' instead of '\(wanted.name)'")
    }

    private func makeTransports(_ sockets: [Socket]) -> [any ChannelTransport] {
        sockets.enumerated().map { id, s in
            let (writer, warning) = makeStreamWriter(for: s, useRing: config.useRing)
            if let w = warning, id == 0 { warnings.withLock { $0.append(w) } }
            return PacketSender(channelID: id, ram: ram, writer: writer, counters: counters)
        }
    }

    /// The main channel's reader thread: the only replies after the
    /// handshake are `completed` and `error`.
    private func readDestination(_ ctl: ControlChannel, completed: DispatchSemaphore) {
        do {
            let m = try ctl.receive("waiting for the destination")
            switch m {
            case .completed:
                // Release: pairs with the acquiring load after `completed.wait()`.
                confirmed.store(true, ordering: .releasing)
                completed.signal()
            case .error(let text):
                latch.fail(MigrationError(.peer, "destination failed: \(text)"))
            default:
                latch.fail(MigrationError(.protocolViolation, "destination sent '\(m.name)' during the transfer"))
            }
        } catch {
            if error.kind == .peer {
                latch.fail(MigrationError(.peer, "the destination closed the main channel before confirming completion (did it exit?)"))
            } else {
                latch.fail(error)
            }
        }
    }

    /// Best effort: tell the destination why we stop, unless it told us.
    private func reportFailure(_ control: ControlChannel?) {
        guard let ctl = control, let e = latch.error, e.kind != .peer else { return }
        try? ctl.send(.error(e.description))
    }

    private func stats(start: Double, setupTime: Double, status: MigrationStats.Status) -> MigrationStats {
        let elapsed = Monotonic.now - start
        var s = MigrationStats(status: status)
        s.totalTime = UInt64(elapsed * 1000)
        s.setupTime = UInt64(setupTime * 1000)
        s.channels = config.channels
        s.ram.total = ram.block.size
        s.ram.pageSize = ram.block.pageSize
        s.ram.normal = counters.read(counters.normalPages)
        s.ram.duplicate = counters.read(counters.zeroPages)
        s.ram.normalBytes = s.ram.normal * ram.block.pageSize
        s.ram.multifdBytes = counters.read(counters.multifdBytes)
        s.ram.transferred = s.ram.multifdBytes + counters.read(counters.mainBytes)
        s.ram.precopyBytes = s.ram.transferred
        s.ram.dirtySyncCount = 1
        s.ram.computeRates(seconds: elapsed)
        return s
    }
}

/// Wakes a blocked reader without closing the write side.
@discardableResult
func shutdownRead(_ s: Socket) -> Int32 {
    #if canImport(Glibc)
    return Glibc.shutdown(s.fd, Int32(SHUT_RD))
    #else
    return 0
    #endif
}

#if canImport(Glibc)
import Glibc
#endif
