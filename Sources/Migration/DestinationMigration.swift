import GuestMemory
import MigrationWire
import OSCall
import Synchronization
import SystemPackage
import Trust
import URing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// Where one named RAM block goes on the destination (`--ram NAME=PATH`).
public struct RAMBlockPath: Sendable, Equatable {
    public var name: String
    public var path: FilePath
    public init(name: String, path: FilePath) {
        self.name = name
        self.path = path
    }
}

/// How the destination listens and where it puts the RAM.
public struct DestinationConfig: Sendable {
    public var address: SocketAddress
    public var channels: Int
    public var ramPath: FilePath
    /// Several RAM blocks (`--ram NAME=PATH` repeated): the file of each
    /// block, by name, matched against the source's layout. Empty: the one
    /// file at `ramPath` takes the source's one block, whatever its name.
    public var ramBlocks: [RAMBlockPath] = []
    /// Create the RAM file with this size before listening when it is absent.
    public var size: UInt64?
    /// How long each multifd channel may take to connect and say hello.
    public var channelTimeout = 10.0
    /// How long the hello on any new connection may take.
    public var helloTimeout = 10.0
    /// Where to store a live guest's state (created when absent).
    public var guestControl: FilePath?
    /// The pre-shared key every channel must prove (nil: integrity
    /// checksums only). Whether to encrypt is the source's choice.
    public var key: PreSharedKey?
    /// How long the source may move no bytes during the data phase
    /// (`ProgressWatchdog`); also sets the TCP keepalive and user timeout
    /// of each accepted connection (`Socket.setPeerTimeout`).
    public var peerTimeout = 10.0
    /// The largest RAM file this destination creates, for `size` or for a
    /// size the source announces (default: the host's physical memory).
    public var maxSize: UInt64 = FileSystemSpace.physicalMemory
    /// Called with a warning that does not stop the migration (a file
    /// system without user extended attributes).
    public var onWarning: (@Sendable (String) -> Void)?
    /// Test hook: stop this process at a named point (`TestHook`):
    /// setup, prepared or committed.
    public var testStopAt: String?
    /// After the postcopy commit, how long a broken migration waits for its
    /// source to reconnect (`--recover-timeout`; 0: no recovery).
    public var recoverTimeout = 60.0
    /// Scheduling of the fault thread and the preempt channel's receiver,
    /// the destination's threads on a fault's path (`--fault-path-priority`).
    public var faultPathPriority = FaultPathPriority.realtime

    public init(address: SocketAddress, channels: Int, ramPath: FilePath) {
        self.address = address
        self.channels = channels
        self.ramPath = ramPath
    }
}

/// The destination side: accepts a source, checks everything it is sent,
/// places pages into its own RAM file, and reports success only when every
/// page arrived and the source's totals match what it counted.
///
/// Threads: the caller of `run()` is the main thread (control stream and
/// end-of-round barrier); one receiver thread per channel.
public final class DestinationMigration: Sendable {
    public let config: DestinationConfig
    public let counters = TransferCounters()
    /// The failure latch of the connections in use: the first set's, then
    /// each postcopy recovery's (`DestinationRecovery`), which starts from
    /// a fresh one. Threads take the latch of their own connections.
    public var latch: FailureLatch { latches.withLock { $0 } }
    private let latches = Mutex(FailureLatch())
    /// `cancel()` was called: no recovery starts, a waiting one ends.
    let cancelled = Atomic<Bool>(false)
    /// Told of connections the listener ignored or dropped (a stranger, an
    /// idle port probe, a channel of another session): they never fail
    /// the migration, but the user should know.
    let notice: @Sendable (String) -> Void
    /// The fault path's threads (fault thread, preempt receiver) apply it.
    var faultPathScheduling: FaultPathScheduling { FaultPathScheduling(config.faultPathPriority, notice: notice) }
    /// Fails the migration when the source stops moving bytes.
    public let watchdog: ProgressWatchdog
    let listener: Listener
    private let ramFile = Mutex<RAMFile?>(nil)
    /// The RAM was mapped and pre-faulted before listening: receivers write
    /// into the mapping. Otherwise (created when the layout arrives) they
    /// pwrite into the file (`PacketReceiver.writeThrough`).
    let prefaulted: Bool
    /// This process's claim on the RAM file (the writer byte), from before
    /// it writes anything until it exits: a running guest's RAM or another
    /// receiver's is refused (`OwnerLock`).
    private let ramLocks = Mutex<[OwnerLock]>([])
    /// With several RAM blocks: the files that existed before listening,
    /// by block name (mapped, not pre-faulted), until the layout orders them.
    private let blockFiles = Mutex<[String: RAMFile]>([:])
    /// Every access to the destination's control file (`--guest`); holds
    /// its receiver byte from `init`.
    let guest: DestinationGuest?
    /// The preempt channel's totals (postcopy), apart from the multifd ones.
    let preemptCounters = TransferCounters()
    /// The multifd bytes that had arrived at the postcopy switch.
    let bytesAtSwitch = Atomic<UInt64>(0)
    /// Where the migration stands, for the failure message: after the
    /// postcopy commit a failure leaves the guest running here without all
    /// of its pages (postcopy-paused).
    let phase = Atomic<PostcopyPhase>(.none)
    /// What a postcopy recovery resumes from: set up when the postcopy
    /// migration's channels are, completed at `postcopy-start`.
    let resumePoint = Mutex<PostcopyResumePoint?>(nil)
    /// Recoveries that reached this side (counted when one completes).
    let recoveries = Atomic<UInt64>(0)
    /// The listening socket's file (a Unix address), to remove at exit.
    private let socketFile: (path: String, device: UInt64, inode: UInt64)?

    /// Maps (and pre-faults) the RAM file if it exists or `size` is given,
    /// then listens. The source may connect once this returns.
    ///
    /// Before anything is created: a `size` beyond `maxSize` or the free
    /// space is refused, and so are a RAM file another livemig process
    /// writes and a control file whose guest runs.
    public init(config: DestinationConfig, notice: @escaping @Sendable (String) -> Void = { _ in }) throws(MigrationError) {
        self.config = config
        self.notice = notice
        watchdog = ProgressWatchdog(peerTimeout: config.peerTimeout)
        guest = try config.guestControl.map { path throws(MigrationError) in try DestinationGuest(path: path) }
        var created = false
        if !config.ramBlocks.isEmpty {
            // Several blocks: each file that exists is claimed and checked
            // now; the rest are created when the layout gives their sizes.
            // Received by pwrite, like a file created then.
            if let incoming = guest?.incoming, let guest {
                // The incoming guest's blocks, in its order: its mapping is
                // registered as one range, so this is the layout it takes.
                let (ram, locks) = try Self.incomingBlocks(guest.blocks, given: config.ramBlocks)
                ramLocks.withLock { $0 += locks }
                try Self.checkIncoming(incoming, ram: ram, size: nil)
                do {
                    try ram.discard(offset: 0, length: ram.block.size)
                } catch {
                    throw MigrationError(error)
                }
                ramFile.withLock { $0 = ram }
            }
            var files: [String: RAMFile] = [:]
            for b in config.ramBlocks where guest?.incoming == nil && access(b.path.string, F_OK) == 0 {
                let lock = try Self.claim(b.path, create: false)
                ramLocks.withLock { $0.append(lock) }
                files[b.name] = try Self.mapped(prefault: false) { () throws(GuestMemoryError) in
                    try RAMFile(path: b.path, access: .readWrite, blockName: b.name)
                }
            }
            blockFiles.withLock { $0 = files }
            prefaulted = false
        } else if let incoming = guest?.incoming {
            // An incoming guest waits: its RAM file exists (it made it) and
            // is registered in its process. Never pre-faulted: a page this
            // process faults in could never fault in the guest.
            let lock = try Self.claim(config.ramPath, create: false)
            ramLocks.withLock { $0.append(lock) }
            let ram = try Self.mapped(prefault: false) { () throws(GuestMemoryError) in
                try RAMFile(path: config.ramPath, access: .readWrite)
            }
            try Self.checkIncoming(incoming, ram: ram, size: config.size)
            do {
                // Every page missing again: a migration into this guest that
                // failed before it ran may have left pages (the writer byte
                // says nobody else writes the file now).
                try ram.discard(offset: 0, length: ram.block.size)
            } catch {
                throw MigrationError(error)
            }
            ramFile.withLock { $0 = ram }
            prefaulted = false
        } else if let size = config.size {
            let exists = access(config.ramPath.string, F_OK) == 0
            if !exists {
                try Self.checkBounds(
                    size, for: config, what: "--size \(size)",
                    fix: "give a smaller --size, or a larger --max-size if this host should hold it")
            }
            do {
                let lock = try Self.claim(config.ramPath, create: true)
                created = lock.created
                ramLocks.withLock { $0.append(lock) }
                let ram = try Self.mapped { () throws(GuestMemoryError) in try RAMFile.create(path: config.ramPath, size: size) }
                ramFile.withLock { $0 = ram }
            } catch {
                if created { unlink(config.ramPath.string) }
                throw error
            }
            prefaulted = true
        } else if (try? FileDescriptor.open(config.ramPath, .readOnly).close()) != nil {
            let lock = try Self.claim(config.ramPath, create: false)
            ramLocks.withLock { $0.append(lock) }
            let ram = try Self.mapped { () throws(GuestMemoryError) in try RAMFile(path: config.ramPath, access: .readWrite) }
            ramFile.withLock { $0 = ram }
            prefaulted = true
        } else {
            prefaulted = false
        }
        do {
            listener = try Listener(config.address, peerTimeout: config.peerTimeout)
        } catch {
            if created { unlink(config.ramPath.string) }
            throw MigrationError(error)
        }
        var st = stat()
        if case .unix(let path) = config.address, lstat(path, &st) == 0 {
            socketFile = (path, UInt64(st.st_dev), UInt64(st.st_ino))
        } else {
            socketFile = nil
        }
    }

    /// An incoming guest of several RAM blocks: opens the `--ram NAME=PATH`
    /// files in the order of the guest's block table (`listed`), claiming
    /// each (returned, to hold), and maps them side by side as the guest
    /// does. The names given must be the guest's.
    private static func incomingBlocks(
        _ listed: [RAMBlock], given: [RAMBlockPath]
    ) throws(MigrationError) -> (RAMFile, [OwnerLock]) {
        let guestNames = listed.map(\.name)
        let givenNames = given.map(\.name)
        guard listed.isEmpty ? given.count == 1 : Set(guestNames) == Set(givenNames) else {
            throw MigrationError(
                .mismatch,
                "the incoming guest has the RAM blocks \(listed.isEmpty ? "(one block)" : guestNames.joined(separator: ", ")) but receive was given "
                    + "\(givenNames.joined(separator: ", ")); give one --ram NAME=PATH per block of the guest")
        }
        var files: [RAMFile] = []
        var locks: [OwnerLock] = []
        for name in listed.isEmpty ? givenNames : guestNames {
            let path = given.first { $0.name == name }!.path
            locks.append(try claim(path, create: false))
            do {
                files.append(try RAMFile(path: path, access: .readWrite, blockName: name))
            } catch {
                throw MigrationError(error)
            }
        }
        do {
            return (try RAMFile.combining(files), locks)
        } catch {
            throw MigrationError(error)
        }
    }

    /// Checks that the incoming guest mapped these very RAM files at the
    /// address it registered, each block where it lies in the range
    /// (`/proc/PID/maps`): pages placed through its userfaultfd and pages
    /// written into `--ram` must be the same memory.
    private static func checkIncoming(_ incoming: IncomingAttachment, ram: RAMFile, size: UInt64?) throws(MigrationError) {
        guard ram.block.size == incoming.length else {
            throw MigrationError(
                .mismatch,
                "the incoming guest registered \(incoming.length) bytes of RAM but \(ram.path) has \(ram.block.size): give receive the guest's own RAM file"
            )
        }
        if let size, size != ram.block.size {
            throw MigrationError(
                .mismatch, "--size \(size) differs from the incoming guest's RAM of \(ram.block.size) bytes; leave --size out")
        }
        let maps = String(decoding: SystemCall.readSmallFile("/proc/\(incoming.guestPID)/maps") ?? [], as: UTF8.self)
        for (path, offset) in zip(ram.paths, ram.blockStarts) {
            var st = stat()
            guard stat(path.string, &st) == 0 else {
                throw MigrationError(.local, "cannot stat RAM file \(path): \(SystemCall.lastError)")
            }
            let start = String(incoming.guestBase + offset, radix: 16)
            let dev = UInt64(st.st_dev)
            let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & ~UInt64(0xfff))
            let minor = (dev & 0xff) | ((dev >> 12) & ~UInt64(0xff))
            guard let line = maps.split(separator: "\n").first(where: { $0.hasPrefix(start + "-") }) else {
                throw MigrationError(
                    .mismatch,
                    "cannot find the incoming guest's RAM mapping in /proc/\(incoming.guestPID)/maps (did it exit?); start it again with livemig stress --incoming"
                )
            }
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            let d = f.count >= 5 ? f[3].split(separator: ":") : []
            guard d.count == 2, UInt64(d[0], radix: 16) == major, UInt64(d[1], radix: 16) == minor, UInt64(f[4]) == UInt64(st.st_ino) else {
                throw MigrationError(
                    .mismatch,
                    "the incoming guest (pid \(incoming.guestPID)) maps another file than \(path) as its RAM: give receive the --ram the guest was started with"
                )
            }
        }
    }

    /// Removes the listening socket's file, if it is still the one this
    /// destination bound (docs/PROTOCOL.md §1). Call before exiting: the
    /// process may exit before the listener's deinit would.
    public func removeSocketFile() {
        guard let f = socketFile else { return }
        var st = stat()
        guard lstat(f.path, &st) == 0, UInt64(st.st_dev) == f.device, UInt64(st.st_ino) == f.inode else { return }
        unlink(f.path)
    }

    /// Whether this process created the RAM file: then a failed migration
    /// removes it, since it never held anything of value.
    private var createdRAM: [FilePath] { ramLocks.withLock { $0.filter(\.created).map(\.path) } }

    /// The RAM files this destination writes: the one `--ram`, or each block's.
    private var ramPaths: [FilePath] { config.ramBlocks.isEmpty ? [config.ramPath] : config.ramBlocks.map(\.path) }

    /// The mapped RAM, once known.
    public var ram: RAMFile? { ramFile.withLock { $0 } }

    /// Stops from any thread.
    public func cancel(_ reason: String) {
        cancelled.store(true, ordering: .relaxed)
        latch.fail(MigrationError(.cancelled, reason))
        listener.shutdown()
    }

    /// Starts a recovery's connections on a fresh latch.
    func freshLatch() -> FailureLatch {
        let l = FailureLatch()
        latches.withLock { $0 = l }
        return l
    }

    /// Whether a failure found the migration after the postcopy commit.
    public var postcopyPaused: Bool { latch.hasFailed && phase.load(ordering: .acquiring) == .postcopyActive }

    /// Whether the guest runs here while pages still arrive (after the
    /// postcopy commit, before the last page), and no failure paused it.
    public var postcopyActive: Bool { !latch.hasFailed && phase.load(ordering: .acquiring) == .postcopyActive }

    /// Receives the migration: the first connections, then, when they
    /// break after the postcopy commit, the source's recoveries
    /// (`recoverPostcopy`, for up to `config.recoverTimeout`).
    public func run() throws(MigrationError) -> MigrationStats {
        do {
            return try receive()
        } catch {
            guard phase.load(ordering: .acquiring) == .postcopyActive else { throw error }
            return try recoverPostcopy(after: error)
        }
    }

    private func receive() throws(MigrationError) -> MigrationStats {
        var control: ControlChannel?
        var receivers: [PacketReceiver] = []
        var threads: [WorkerThread] = []
        var faultThread: PostcopyFaults?
        var start = 0.0
        defer {
            faultThread?.stop()
            for r in receivers { r.socket.shutdown() }
            control?.socket.shutdown()
            for t in threads { t.join() }
        }
        let listener = self.listener
        // After the postcopy commit the listener stays open for the
        // source's recovery (`recoverPostcopy`); `cancel` shuts it then.
        latch.onFailure { [weak self] in
            guard let self, config.recoverTimeout > 0, phase.load(ordering: .acquiring) == .postcopyActive else {
                return listener.shutdown()
            }
        }
        do {
            let (ctl, hello) = try acceptMain()
            control = ctl
            let trust = TrustSetting(key: config.key, encrypt: hello.flags.contains(.encrypted))
            start = Monotonic.now
            // First waker: tell the source why, before the data channels are
            // shut; then wake our own main-channel read.
            latch.onFailure { [latch] in
                if let e = latch.error, e.kind != .peer { ctl.sendErrorBestEffort(e) }
                ctl.socket.shutdownReceive()
            }
            try acceptHello(hello, on: ctl)
            let session = hello.session
            let postcopy = hello.flags.contains(.postcopy)
            // The preempt channel has its own SYNC, at the end of postcopy.
            let barrier = RoundBarrier(channels: config.channels + (postcopy ? 1 : 0))
            let ram = try acceptLayout(ctl)
            TestHook.stop(at: "setup", ifRequested: config.testStopAt)
            // The hello deadline guarded the handshake only: a round may
            // leave the main channel silent for as long as it takes.
            ctl.socket.setReceiveTimeout(nil)
            let limits = { (id: Int) in
                PacketLimits(
                    channelID: id, pageSize: ram.block.pageSize,
                    blocks: ram.blocks.map { RAMBlockLayout(name: $0.name, size: $0.size, pageSize: $0.pageSize) },
                    compression: hello.compression, tagSize: trust.key == nil ? 0 : PacketSealer.tagSize)
            }
            let arrived = DirtyBitmap(pageCount: ram.block.pageCount)
            let roundSeen = DirtyBitmap(pageCount: ram.block.pageCount)
            let table = PageTable(pages: ram.block.pageCount)
            let target = guest?.incoming.map { PostcopyTarget($0, numbering: PageNumbering(ram)) }
            let (channels, early) = try acceptChannels(session: session, main: ctl, trust: trust, preempt: postcopy)
            for (id, (s, keys)) in channels.enumerated() {
                // The preempt channel (the last) counts apart: the source's
                // completion totals are the multifd channels'.
                receivers.append(
                    try PacketReceiver(
                        id: id, socket: s, ram: ram, limits: limits(id), counters: id < config.channels ? counters : preemptCounters,
                        arrived: arrived, roundSeen: roundSeen, table: table,
                        sealer: keys.map { PacketSealer(key: $0.toDestination, encrypts: trust.encrypt) }, writeThrough: !prefaulted,
                        postcopy: target))
            }
            if postcopy, let target, let (s, keys) = channels.last {
                faultThread = PostcopyFaults(
                    target: target, arrived: arrived, requests: ControlChannel(socket: s, keys: keys, isSource: false), latch: latch,
                    priority: faultPathScheduling)
            }
            latch.onFailure { [receivers, barrier] in
                for r in receivers { r.socket.shutdown() }
                barrier.wakeAll()
            }
            let setupTime = Monotonic.now - start
            watchdog.start(latch: latch) { [counters, preemptCounters] in
                counters.read(counters.multifdBytes) &+ counters.read(counters.mainBytes)
                    &+ preemptCounters.read(preemptCounters.multifdBytes)
            }
            defer { watchdog.stop() }
            for r in receivers {
                let latch = self.latch
                // The preempt channel's receiver places requested pages.
                let scheduling = r.id == config.channels ? faultPathScheduling : nil
                r.postcopyTransferPriority = config.faultPathPriority
                threads.append(
                    WorkerThread(name: "mig/recv/\(r.id)", prologue: { scheduling?.apply(to: "the preempt receiver") }) {
                        r.run(barrier: barrier, latch: latch)
                    })
            }
            if postcopy, let target {
                resumePoint.withLock {
                    $0 = PostcopyResumePoint(
                        session: session, ram: ram, arrived: arrived, roundSeen: roundSeen, table: table, target: target, start: start,
                        setupTime: setupTime)
                }
            }
            let rounds = try serveControl(
                ctl, barrier: barrier, arrived: arrived, roundSeen: roundSeen, table: table, ram: ram, first: early,
                postcopy: postcopy ? faultThread.map { ($0, target!) } : nil)
            return completedStats(
                rounds: rounds, ram: ram, compression: hello.compression, start: start, setupTime: setupTime,
                postcopy: postcopy ? target : nil)
        } catch {
            latch.fail(error)
            // Postcopy-paused: `run` tries the recovery.
            if phase.load(ordering: .acquiring) == .postcopyActive { throw latch.error ?? error }
            // A RAM file this process created holds a partial copy and
            // nothing else: remove it (a file that existed keeps its
            // incomplete mark). The lock is still ours, so nobody else
            // has started on it.
            for path in createdRAM { unlink(path.string) }
            throw latch.error ?? error
        }
    }

    /// The statistics of a completed migration.
    func completedStats(
        rounds: UInt64, ram: RAMFile, compression: CompressionMethod, start: Double, setupTime: Double, postcopy target: PostcopyTarget?
    ) -> MigrationStats {
        var s = MigrationStats(status: .completed)
        s.fillTransfer(counters, block: ram.block, channels: config.channels, elapsed: Monotonic.now - start)
        s.setupTime = UInt64(setupTime * 1000)
        s.ram.dirtySyncCount = rounds
        s.fillCompression(counters, method: compression, level: nil, pageSize: ram.block.pageSize)
        if let target {
            var p = target.faults.snapshot(at: Monotonic.now)
            p.postcopyBytes =
                preemptCounters.read(preemptCounters.multifdBytes) + counters.read(counters.multifdBytes)
                - bytesAtSwitch.load(ordering: .relaxed)
            s.postcopy = p
        }
        return s
    }

    // MARK: - setup

    /// Waits for the main channel and runs its hello exchange. Connections
    /// that are not a livemig source (a port probe that closes, an HTTP
    /// request, bytes without our magic) or that say nothing within the
    /// hello deadline are dropped with a notice, and the wait goes on: a
    /// stranger cannot fail a migration. A livemig source whose hello or
    /// proof fails (another version, another key, no key) fails it: that is
    /// the user's source, and both sides must say why.
    func acceptMain(deadline: Double? = nil) throws(MigrationError) -> (ControlChannel, ChannelHello) {
        var gate = HelloGate(listener: listener, helloTimeout: config.helloTimeout, notice: notice, latch: latch)
        while true {
            guard let (s, hello, bytes) = try gate.next(deadline: deadline, strict: true) else { continue }
            s.setReceiveTimeout(config.helloTimeout)
            let keys = try ChannelHandshake.answer(
                s, hello: hello, helloBytes: bytes, trust: TrustSetting(key: config.key), counters: counters)
            return (ControlChannel(socket: s, counters: counters, keys: keys, isSource: false), hello)
        }
    }

    /// Checks the main hello against this destination; the caller owns the
    /// channel by now, so a refusal reaches the source as an error message.
    func acceptHello(_ hello: ChannelHello, on ctl: ControlChannel) throws(MigrationError) {
        guard hello.kind == .main else {
            throw MigrationError(
                .protocolViolation, "the first connection is multifd channel \(hello.channelID), expected the main channel")
        }
        guard Int(hello.channelCount) == config.channels else {
            throw MigrationError(
                .mismatch,
                "the source uses \(hello.channelCount) multifd channel(s) but this destination expects \(config.channels); pass the same --channels to send and receive"
            )
        }
        let live = hello.flags.contains(.guestState)
        if live, config.guestControl == nil {
            throw MigrationError(
                .mismatch, "the source migrates a live guest; pass --guest CONTROL to receive so the guest state can be stored")
        }
        if !live, config.guestControl != nil {
            throw MigrationError(.mismatch, "receive has --guest but the source sends no guest (start send with --guest CONTROL)")
        }
        if hello.flags.contains(.postcopy) {
            for path in ramPaths {
                if let refusal = RAMFile.postcopyRefusal(for: path) {
                    throw MigrationError(.mismatch, "this destination cannot take postcopy: \(refusal)")
                }
            }
            guard guest?.incoming != nil else {
                throw MigrationError(
                    .mismatch,
                    "this destination cannot take postcopy: no incoming guest waits on \(config.guestControl?.string ?? "its control file"). "
                        + "Start one first (livemig stress --incoming --ram \(config.ramPath) --control CONTROL), then receive --guest CONTROL; "
                        + "or migrate without --postcopy")
            }
        }
        try ctl.send(.helloAccepted)
    }

    /// Reads the RAM layout, maps (or checks) the RAM file to match, replies.
    private func acceptLayout(_ ctl: ControlChannel) throws(MigrationError) -> RAMFile {
        let m = try ctl.receive("waiting for the RAM layout")
        guard case .ramLayout(let blocks) = m else {
            if case .error(let t) = m { throw MigrationError(.peer, "source failed: \(t)") }
            throw MigrationError(.protocolViolation, "expected the RAM layout, got '\(m.name)'")
        }
        if !config.ramBlocks.isEmpty {
            let ram = try acceptBlocks(blocks)
            try guest?.checkFits(ram)
            try markIncomplete()
            try ctl.send(.layoutAccepted)
            return ram
        }
        guard blocks.count == 1, let block = blocks.first else {
            throw MigrationError(
                .mismatch,
                "the source sends \(blocks.count) RAM blocks (\(blocks.map(\.name).joined(separator: ", "))); this destination maps one RAM file: "
                    + "give receive one --ram NAME=PATH per block")
        }
        let hostPage = RAMBlock.hostPageSize
        guard block.pageSize == hostPage else {
            throw MigrationError(.mismatch, "the source's page size is \(block.pageSize) bytes, this host's is \(hostPage)")
        }
        // Set before `layout-accepted`: no page can arrive before the marks.
        let ram: RAMFile
        if let existing = self.ram {
            guard existing.block.size == block.size else {
                throw MigrationError(
                    .mismatch,
                    "RAM size mismatch: the source's block '\(block.name)' is \(block.size) bytes but the destination file \(config.ramPath) is \(existing.block.size) bytes; give a file of the same size or a new path"
                )
            }
            ram = existing
        } else {
            // Bounded before anything is created or allocated for it.
            try Self.checkBounds(
                block.size, for: config, what: "the source's RAM block '\(block.name)' of \(block.size) bytes",
                fix: "migrate a smaller guest, or raise --max-size if this host should hold it")
            let lock = try Self.claim(config.ramPath, create: true)
            ramLocks.withLock { $0.append(lock) }
            ram = try Self.mapped(prefault: false) { () throws(GuestMemoryError) in
                try RAMFile.create(path: config.ramPath, size: block.size, blockName: block.name)
            }
            ramFile.withLock { $0 = ram }
        }
        try guest?.checkFits(ram)
        try markIncomplete()
        try ctl.send(.layoutAccepted)
        return ram
    }

    /// Several RAM blocks: matches the source's blocks to `config.ramBlocks`
    /// by name, checks every size and bound before creating anything, then
    /// creates the absent files and maps all of them side by side in the
    /// source's layout order (the page numbering both sides share).
    private func acceptBlocks(_ blocks: [RAMBlockLayout]) throws(MigrationError) -> RAMFile {
        let sent = blocks.map(\.name).joined(separator: ", ")
        if guest?.incoming != nil, let ram = self.ram {
            // An incoming guest fixed the order: the source's must be its.
            let mine = ram.blocks.map { RAMBlockLayout(name: $0.name, size: $0.size, pageSize: $0.pageSize) }
            guard blocks.map(\.name) == mine.map(\.name) || (mine.count == 1 && blocks.count == 1) else {
                throw MigrationError(
                    .mismatch,
                    "the source sends the RAM blocks \(sent) but the incoming guest has \(mine.map(\.name).joined(separator: ", ")) in this order; "
                        + "start the incoming guest with the source guest's blocks, in its order")
            }
            for (b, m) in zip(blocks, mine) where b.size != m.size || b.pageSize != m.pageSize {
                throw MigrationError(
                    .mismatch,
                    "RAM size mismatch: the source's block '\(b.name)' is \(b.size) bytes but the incoming guest's is \(m.size); "
                        + "start the incoming guest with the source's sizes")
            }
            return ram
        }
        guard Set(blocks.map(\.name)).count == blocks.count else {
            throw MigrationError(.protocolViolation, "the source's RAM layout names a block twice (\(sent))")
        }
        let byName = Dictionary(uniqueKeysWithValues: config.ramBlocks.map { ($0.name, $0.path) })
        for b in config.ramBlocks where !blocks.contains(where: { $0.name == b.name }) {
            throw MigrationError(
                .mismatch,
                "--ram \(b.name)=\(b.path) names a RAM block the source does not send (it sends \(sent)); drop it or check the block names")
        }
        let existing = blockFiles.withLock { $0 }
        let hostPage = RAMBlock.hostPageSize
        for block in blocks {
            guard let path = byName[block.name] else {
                throw MigrationError(
                    .mismatch,
                    "the source sends RAM block '\(block.name)' (\(block.size) bytes) but this destination has no --ram \(block.name)=PATH for it"
                )
            }
            guard block.pageSize == hostPage else {
                throw MigrationError(
                    .mismatch, "the source's block '\(block.name)' has pages of \(block.pageSize) bytes, this host's are \(hostPage)")
            }
            if let f = existing[block.name] {
                guard f.block.size == block.size else {
                    throw MigrationError(
                        .mismatch,
                        "RAM size mismatch: the source's block '\(block.name)' is \(block.size) bytes but the destination file \(path) is \(f.block.size) bytes; give a file of the same size or a new path"
                    )
                }
            } else {
                try Self.checkBounds(
                    block.size, for: config, at: path, what: "the source's RAM block '\(block.name)' of \(block.size) bytes",
                    fix: "migrate a smaller guest, or raise --max-size if this host should hold it")
            }
        }
        let total = blocks.reduce(UInt64(0)) { $0 &+ $1.size }
        guard total <= config.maxSize else {
            throw MigrationError(
                .mismatch,
                "the source's \(blocks.count) RAM blocks hold \(total) bytes, more than this destination's --max-size of \(config.maxSize) bytes"
            )
        }
        var files: [RAMFile] = []
        for block in blocks {
            if let f = existing[block.name] {
                files.append(f)
                continue
            }
            let path = byName[block.name]!
            let lock = try Self.claim(path, create: true)
            ramLocks.withLock { $0.append(lock) }
            files.append(
                try Self.mapped(prefault: false) { () throws(GuestMemoryError) in
                    try RAMFile.create(path: path, size: block.size, blockName: block.name)
                })
        }
        blockFiles.withLock { $0 = [:] }
        do {
            let ram = try RAMFile.combining(files)
            ramFile.withLock { $0 = ram }
            return ram
        } catch {
            throw MigrationError(error)
        }
    }

    // MARK: - ownership, bounds and marks

    /// Claims the RAM file's writer byte (creating the file when `create`
    /// and absent).
    private static func claim(_ path: FilePath, create: Bool) throws(MigrationError) -> OwnerLock {
        do {
            return try OwnerLock.claimRAM(path, create: create)
        } catch {
            throw MigrationError(.mismatch, error.description)
        }
    }

    /// Refuses to create a RAM file of `size` bytes beyond `maxSize` or the
    /// free space of its file system, before anything is created.
    private static func checkBounds(
        _ size: UInt64, for config: DestinationConfig, at path: FilePath? = nil, what: String, fix: String
    ) throws(MigrationError) {
        let path = path ?? config.ramPath
        guard size <= config.maxSize else {
            throw MigrationError(
                .mismatch,
                "\(what) is more than this destination's --max-size of \(config.maxSize) bytes (default: the host's physical memory); \(fix)"
            )
        }
        if let free = FileSystemSpace.available(forFileAt: path), size > free {
            throw MigrationError(
                .mismatch,
                "\(what) does not fit: the file system of \(path) has \(free) bytes free; free space there or give --ram on a larger file system"
            )
        }
    }

    /// Marks what the migration is about to overwrite: the RAM file
    /// (extended attribute, `IncompleteMark`) and an existing control file
    /// (run state incomplete, `DestinationGuest.markIncomplete`). Until completion clears them, no guest
    /// command takes these files for a good guest. A RAM file this process
    /// created is removed on failure anyway; its mark covers a receiver
    /// killed before it could remove it.
    private func markIncomplete() throws(MigrationError) {
        do throws(GuestMemoryError) {
            for path in ramPaths where !(try IncompleteMark.set(on: path)) {
                config.onWarning?(
                    "the file system of \(path) takes no user extended attributes: a failed migration cannot mark the file "
                        + "incomplete (\(IncompleteMark.attribute)); do not use it after a failure")
            }
        } catch {
            throw MigrationError(.mismatch, error.description)
        }
        try guest?.markIncomplete()
    }

    /// The RAM is complete: every page arrived and the totals matched.
    private func clearIncompleteMark() throws(MigrationError) {
        do {
            for path in ramPaths { try IncompleteMark.clear(on: path) }
        } catch {
            throw MigrationError(error)
        }
    }

    /// Accepts the N multifd channels: same session, proven key, right
    /// count, no duplicate ids. Returns them ordered by channel id, with
    /// their keys. A connection of another session, or one that fails its
    /// proof, is dropped with a notice and never fails the migration in
    /// progress. The connections may be accepted after the source already
    /// sent on main (a small first round fits in the socket buffers): such
    /// a message is returned for the control loop, unless it is an error.
    func acceptChannels(session: SessionID, main: ControlChannel, trust: TrustSetting, preempt: Bool) throws(MigrationError)
        -> ([(Socket, ChannelKeys?)], MainMessage?)
    {
        // With postcopy the preempt channel comes last, with id N.
        let wanted = config.channels + (preempt ? 1 : 0)
        var byID = [(Socket, ChannelKeys?)?](repeating: nil, count: wanted)
        var early: MainMessage?
        var opened = 0
        var gate = HelloGate(listener: listener, helloTimeout: config.helloTimeout, notice: notice, latch: latch)
        let deadline = Monotonic.now + config.channelTimeout
        while opened < wanted {
            let next: (Socket, ChannelHello, [UInt8])?
            do {
                next = try gate.next(deadline: deadline, strict: false, watch: early == nil ? main.socket : nil)
            } catch  where error.kind == .timeout {
                throw MigrationError(
                    .timeout,
                    "only \(opened) of \(wanted) channels (multifd\(preempt ? " and preempt" : "")) connected within \(formatSeconds(config.channelTimeout)) s"
                )
            }
            guard let (s, h, bytes) = next else {
                // The source says something (an error, most likely) or left.
                let m = try main.receive("waiting for multifd channels")
                if case .error(let text) = m { throw MigrationError(.peer, "source failed: \(text)") }
                early = m
                continue
            }
            guard h.kind == .multifd || (preempt && h.kind == .preempt), h.session == session else {
                notice(
                    "dropped a connection from \(s.peer) that is not a multifd channel of this migration (\(h.kind == .main ? "a second main channel" : "session \(h.session)"))"
                )
                continue
            }
            // The proof follows the challenge at once from a real source.
            s.setReceiveTimeout(min(config.helloTimeout, HelloGate.channelProofTimeout))
            let keys: ChannelKeys?
            do {
                keys = try ChannelHandshake.answer(s, hello: h, helloBytes: bytes, trust: trust, counters: counters)
            } catch {
                notice("dropped multifd channel \(h.channelID) from \(s.peer): \(error.description)")
                continue
            }
            guard Int(h.channelCount) == config.channels else {
                throw MigrationError(
                    .mismatch, "multifd channel \(h.channelID) says \(h.channelCount) channels, expected \(config.channels)")
            }
            guard byID[Int(h.channelID)] == nil else {
                throw MigrationError(.protocolViolation, "multifd channel \(h.channelID) connected twice")
            }
            s.setReceiveTimeout(nil)
            // The preempt channel's page requests must leave at once.
            if h.kind == .preempt { s.preferUnpacedCongestionControl() }
            byID[Int(h.channelID)] = (s, keys)
            opened += 1
        }
        return (byID.map { $0! }, early)
    }

    // MARK: - transfer

    /// The main thread's loop: end-of-round barriers, then completion; with
    /// `postcopy` (the fault thread and the guest's userfaultfd), the
    /// postcopy switch between them (docs/PROTOCOL.md §8). Returns the
    /// number of rounds.
    func serveControl(
        _ ctl: ControlChannel, barrier: RoundBarrier, arrived: DirtyBitmap, roundSeen: DirtyBitmap, table: PageTable, ram: RAMFile,
        first: MainMessage?, postcopy: (faults: PostcopyFaults, target: PostcopyTarget)?, resumed: Bool = false
    )
        throws(MigrationError)
        -> UInt64
    {
        // A recovery goes on in the postcopy phase from the resume point.
        let point = resumed ? resumePoint.withLock { $0 } : nil
        var rounds: UInt64 = point?.rounds ?? 0
        var guestState: [UInt8]? = point?.guestState
        /// Pages the source said are stale (postcopy-discard), and whether
        /// the postcopy phase began (committed).
        var discarded: UInt64 = 0
        var inPostcopy = resumed
        var pending = first
        while true {
            let m: MainMessage
            if let p = pending {
                m = p
                pending = nil
            } else {
                m = try ctl.receive("waiting for the source")
            }
            switch m {
            case .guestState(let bytes):
                guard guest != nil, guestState == nil, rounds > 0 else {
                    throw MigrationError(.protocolViolation, "unexpected guest-state message (after \(rounds) rounds)")
                }
                guard bytes.count <= GuestControl.stateCapacity else {
                    throw MigrationError(
                        .protocolViolation, "guest state of \(bytes.count) bytes exceeds the \(GuestControl.stateCapacity)-byte bound")
                }
                guestState = bytes
            case .postcopyDiscard(let ranges):
                guard postcopy != nil, !inPostcopy, rounds > 0 else {
                    throw MigrationError(.protocolViolation, "unexpected postcopy-discard (after \(rounds) rounds, postcopy \(inPostcopy))")
                }
                discarded += try discard(ranges, arrived: arrived, ram: ram)
                try ctl.send(.postcopyDiscarded(pages: discarded))
            case .postcopyStart(let r, let count):
                guard let postcopy, !inPostcopy, r == rounds, rounds > 0 else {
                    throw MigrationError(.protocolViolation, "unexpected postcopy-start after round \(r) (\(rounds) rounds arrived)")
                }
                guard count == discarded else {
                    throw MigrationError(
                        .mismatch, "the source discarded \(count) pages before postcopy-start but \(discarded) discards arrived")
                }
                resumePoint.withLock { [guestState] in
                    $0?.rounds = rounds
                    $0?.guestState = guestState
                }
                try startPostcopy(ctl, postcopy: postcopy, guestState: guestState, arrived: arrived, ram: ram)
                inPostcopy = true
            case .endOfRound(let r):
                guard r == rounds + 1 else {
                    throw MigrationError(.protocolViolation, "end-of-round \(r) after round \(rounds); rounds are numbered 1, 2, ...")
                }
                for _ in 0..<config.channels {
                    barrier.synced.wait()
                    try latch.check()
                }
                // The postcopy round ends with a SYNC on the preempt channel
                // too, which the source sends once it hears that the
                // multifd channels drained (§8.5): the N posts above are
                // theirs. Until then it answers page requests.
                if inPostcopy, let postcopy {
                    try postcopy.faults.sendMultifdDrained()
                    barrier.synced.wait()
                    try latch.check()
                }
                rounds = r
                // Every receiver waits at its SYNC: nobody marks now.
                roundSeen.clearAll()
                for s in barrier.resume { s.signal() }
            case .complete(let summary) where inPostcopy:
                guard let postcopy else { fatalError("postcopy without its state") }
                try checkCompletion(summary, rounds: rounds, arrived: arrived, table: table, ram: ram, totals: !resumed)
                guard UInt64(guestState?.count ?? -1) == summary.guestStateBytes else {
                    throw MigrationError(
                        .mismatch,
                        "the source completed with a \(summary.guestStateBytes)-byte guest state but \(guestState?.count ?? 0) bytes arrived"
                    )
                }
                // Every page is in the guest: no fault can come any more.
                postcopy.faults.stop()
                do {
                    let t = postcopy.target
                    try t.userfault.unregister(address: t.guestBase, length: ram.block.size)
                } catch {
                    notice("every page arrived, but the guest's RAM could not be unregistered (\(error.description)); it runs on")
                }
                try clearIncompleteMark()
                phase.store(.completed, ordering: .releasing)
                barrier.quit.store(true, ordering: .releasing)
                try ctl.send(.completed)
                return rounds
            case .complete(let summary):
                try checkCompletion(summary, rounds: rounds, arrived: arrived, table: table, ram: ram)
                if let guest {
                    guard let state = guestState, UInt64(state.count) == summary.guestStateBytes else {
                        throw MigrationError(
                            .mismatch,
                            "the source sent a \(summary.guestStateBytes)-byte guest state but \(guestState?.count ?? 0) bytes arrived")
                    }
                    try guest.store(state, for: ram)
                } else if summary.guestStateBytes != 0 {
                    throw MigrationError(
                        .protocolViolation,
                        "the source completed with \(summary.guestStateBytes) bytes of guest state but announced no guest")
                }
                // Release: receivers that see `quit` leave without an error
                // when the source closes the channels.
                barrier.quit.store(true, ordering: .releasing)
                // Prepared: every page and the state are here and checked,
                // but the guest is not ours until the source says so.
                try ctl.send(.completed)
                TestHook.stop(at: "prepared", ifRequested: config.testStopAt)
                let decision = try ctl.receive("waiting for the source to commit the switchover")
                switch decision {
                case .commit:
                    try commit()
                    TestHook.stop(at: "committed", ifRequested: config.testStopAt)
                    // Committed: the guest is ours now, whatever becomes of
                    // this reply (docs/PROTOCOL.md §7).
                    do {
                        try ctl.send(.committed)
                    } catch {
                        notice("committed, but the confirmation did not reach the source (\(error.description)); the guest lives here")
                    }
                    return rounds
                case .error(let text):
                    throw MigrationError(.peer, "the source aborted the switchover: \(text)")
                default:
                    throw MigrationError(.protocolViolation, "'\(decision.name)' instead of commit or error after 'completed'")
                }
            case .error(let text):
                throw MigrationError(.peer, "source failed: \(text)")
            default:
                throw MigrationError(.protocolViolation, "unexpected '\(m.name)' on the main channel during the transfer")
            }
        }
    }

    /// The point of no return on this side: the source stopped its copy for
    /// good, so the RAM loses its incomplete mark and a live guest becomes
    /// *incoming*, ready for `livemig stress --resume`. An incoming guest
    /// (`stress --incoming`) holds every page now: its RAM is unregistered
    /// first, then it starts at the run state.
    private func commit() throws(MigrationError) {
        try clearIncompleteMark()
        if let incoming = guest?.incoming, let ram {
            do {
                try incoming.userfault.unregister(address: incoming.guestBase, length: ram.block.size)
            } catch {
                throw MigrationError(.local, "cannot unregister the incoming guest's RAM before starting it: \(error.description)")
            }
        }
        try guest?.commit()
    }

    // MARK: - postcopy

    /// Drops the pages the source says are stale (`postcopy-discard`):
    /// they lose their arrived mark and leave the file (a hole), so the
    /// guest faults on them. Returns the pages named.
    private func discard(_ ranges: [PageRange], arrived: DirtyBitmap, ram: RAMFile) throws(MigrationError) -> UInt64 {
        let pageSize = ram.block.pageSize, numbering = PageNumbering(ram)
        var total: UInt64 = 0
        for wire in ranges {
            guard let r = numbering.local(wire) else {
                throw MigrationError(.protocolViolation, "postcopy-discard names \(numbering.describe(wire))")
            }
            for p in r.first..<(r.first + r.count) { arrived.clear(page: Int(p)) }
            do {
                try ram.discard(offset: r.first * pageSize, length: r.count * pageSize)
            } catch {
                throw MigrationError(error)
            }
            total += r.count
        }
        return total
    }

    /// The postcopy switch on this side (docs/PROTOCOL.md §8): every page
    /// that has not arrived is made a hole too (it should be one already),
    /// so that every page the guest lacks faults; the guest state is
    /// stored; receivers place through the guest's userfaultfd from now
    /// on; `postcopy-ready`. Then the source hands its guest over and says
    /// `commit`: the fault thread starts, the guest starts, `committed`.
    private func startPostcopy(
        _ ctl: ControlChannel, postcopy: (faults: PostcopyFaults, target: PostcopyTarget), guestState: [UInt8]?, arrived: DirtyBitmap,
        ram: RAMFile
    ) throws(MigrationError) {
        guard let guest, let state = guestState else {
            throw MigrationError(.protocolViolation, "postcopy-start before the guest state")
        }
        let pageSize = ram.block.pageSize
        var page = 0
        do {
            while page < ram.block.pageCount {
                guard !arrived.isDirty(page: page) else {
                    page += 1
                    continue
                }
                var end = page + 1
                while end < ram.block.pageCount, !arrived.isDirty(page: end) { end += 1 }
                try ram.discard(offset: UInt64(page) * pageSize, length: UInt64(end - page) * pageSize)
                page = end
            }
        } catch {
            throw MigrationError(error)
        }
        try guest.store(state, for: ram)
        bytesAtSwitch.store(counters.read(counters.multifdBytes), ordering: .relaxed)
        postcopy.target.activate()
        try ctl.send(.postcopyReady)
        TestHook.stop(at: "postcopy-ready", ifRequested: config.testStopAt)
        let decision = try ctl.receive("waiting for the source to commit the postcopy switch")
        switch decision {
        case .commit:
            let control = guest.control()
            postcopy.faults.start { control.map { Int($0.guestThreads) } ?? 0 }
            try guest.commit()
            // Release: pairs with the failure path's acquire load.
            phase.store(.postcopyActive, ordering: .releasing)
            TestHook.stop(at: "postcopy-committed", ifRequested: config.testStopAt)
            do {
                try ctl.send(.committed)
            } catch {
                notice("committed the postcopy switch, but the confirmation did not reach the source (\(error.description))")
                throw error
            }
        case .error(let text):
            throw MigrationError(.peer, "the source aborted the postcopy switch: \(text)")
        default:
            throw MigrationError(.protocolViolation, "'\(decision.name)' instead of commit or error after 'postcopy-ready'")
        }
    }

    /// `totals`: compare the source's page and packet counts with ours. A
    /// recovered postcopy cannot (what was in flight when the connections
    /// broke was counted by the source only); every page's arrival and the
    /// digest still prove the copy.
    private func checkCompletion(
        _ s: CompletionSummary, rounds: UInt64, arrived: DirtyBitmap, table: PageTable, ram: RAMFile, totals: Bool = true
    )
        throws(MigrationError)
    {
        let normal = counters.read(counters.normalPages), zero = counters.read(counters.zeroPages)
        let packets = counters.read(counters.packets)
        guard s.rounds == rounds, rounds > 0 else {
            throw MigrationError(.mismatch, "the source completed after \(s.rounds) round(s) but \(rounds) arrived")
        }
        guard !totals || (s.normalPages == normal && s.zeroPages == zero && s.packets == packets) else {
            throw MigrationError(
                .mismatch,
                "the source sent \(s.normalPages) normal + \(s.zeroPages) zero pages in \(s.packets) packets, but \(normal) + \(zero) in \(packets) arrived"
            )
        }
        let got = arrived.dirtyCount()
        guard got == ram.block.pageCount else {
            throw MigrationError(.mismatch, "only \(got) of \(ram.block.pageCount) pages arrived; refusing to report success")
        }
        // Every page's last copy here must be the source's last copy: a page
        // placed at a wrong offset, or an older round's copy applied after
        // a newer one, changes the digest.
        let digest = table.digest()
        guard digest == s.pageDigest else {
            throw MigrationError(
                .integrity,
                "the digest of the pages placed here (\(hexString(digest))) differs from the source's (\(hexString(s.pageDigest))): some page holds another copy than the one the source sent last; refusing to report success"
            )
        }
    }

    /// Maps the RAM file; with `prefault`, faults every page in first, on
    /// every CPU (`RAMFile.populate(forWriting:threads:)`).
    ///
    /// Before listening (file known, or --size) pre-faulting is free for
    /// the migration and saves the transfer from first-touch faults. A file
    /// created when the layout arrives is not pre-faulted: the source would
    /// wait for it, and the receivers' own first-touch writes cost less than
    /// faulting first and copying second (measured with tools/bench, 1 GiB
    /// random, 2 channels, TCP, cold: 1.11 GB/s pre-faulted, 1.50 GB/s not).
    private static func mapped(prefault: Bool = true, _ body: () throws(GuestMemoryError) -> RAMFile) throws(MigrationError)
        -> RAMFile
    {
        do {
            let ram = try body()
            if prefault { try ram.populate(forWriting: true, threads: WorkerThread.parallelism) }
            return ram
        } catch {
            throw MigrationError(error)
        }
    }
}

/// Lowercase hex of `bytes`, for messages.
func hexString(_ bytes: [UInt8]) -> String {
    bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
}
