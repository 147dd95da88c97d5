import ArgumentParser
import Dispatch
import FoundationEssentials
import GuestMemory
import Synchronization
import SystemPackage
import WorkerThreads
import Workload

#if canImport(Glibc)
    import Glibc
#endif

extension DirtyTracking: ExpressibleByArgument {
    public init?(argument: String) { self.init(name: argument) }
    public static var allValueStrings: [String] { allCases.map(\.description) }
}

/// `livemig stress`: the guest — a process that keeps writing its RAM.
struct StressCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "stress",
        abstract: "Run a guest that writes its RAM file and marks dirty pages, obeying migration control.",
        discussion: """
            Creates the control file (and, with --size, the RAM file, preallocated) when absent. Patterns: random, \
            sequential, hotset:F (a fraction F of pages gets 90% of the writes), counter (QEMU's a-b test: \
            pass after pass, +1 to the counter in the first 8 bytes of each page, in order). \
            It exits when --duration passes, on SIGINT/SIGTERM, or when its migration completes \
            (it then runs on the destination). \
            With --incoming it is an incoming guest (QEMU's -incoming): it maps the RAM file (on tmpfs or \
            hugetlbfs, e.g. /dev/shm; created sparse with --size) with every page missing, registers it with a \
            userfaultfd, hands that descriptor to receivers on a Unix socket (default CONTROL.uffd, path stored \
            in the control file) and waits until a receiver has placed its RAM and state; then it continues \
            like --resume.
            """
    )

    @Option(
        help: ArgumentHelp(
            "The guest RAM file; for a guest of several RAM blocks, NAME=PATH once per block (NAME=PATH,size=SIZE creates an absent one).",
            valueName: "PATH|NAME=PATH[,size=SIZE]"))
    var ram: [String]
    @Option(help: "The guest-control file (dirty bitmap, run state, guest state).") var control: String
    // `.unconditional`: a negative number is a value to refuse in validate(),
    // not an unknown flag ("Missing value").
    @Option(parsing: .unconditional, help: "Writer threads; each owns an equal slice of the pages.") var threads: Int = 1
    @Option(parsing: .unconditional, help: "Dirty rate over all threads, e.g. 200MiB/s, or 'unlimited'.") var rate: String =
        "unlimited"
    @Option(help: "random | sequential | hotset:F | counter") var pattern: String = "random"
    @Option(parsing: .unconditional, help: "Stop after this long (e.g. 10s, 500ms); default: until migrated or signalled.")
    var duration: String?
    @Option(parsing: .unconditional, help: "Create an absent RAM file of this size (e.g. 64MiB).") var size: String?
    @Flag(help: "Continue the guest stored in the control file (as a destination wrote it).") var resume = false
    @Flag(
        help:
            "With --resume: take back a guest whose switchover was never confirmed (run state 'handed over'). Only after checking that the destination's receive failed."
    ) var reclaim = false
    @Flag(
        help:
            "Start as an incoming guest: wait, with the RAM registered for missing-page faults, until a receiver migrates a guest in; then run it like --resume."
    ) var incoming = false
    @Option(help: "With --incoming: the hand-off socket's path (default: CONTROL.uffd).") var handoffSocket: String?
    @Option(
        help: ArgumentHelp(
            "How the source finds the pages written: 'bitmap' (the guest marks each page in the control file) or 'kernel'.",
            discussion:
                "kernel: the guest never touches the bitmap; its RAM mapping is registered with a userfaultfd for asynchronous "
                + "write-protect and the source asks the kernel (PAGEMAP_SCAN) each round. Needs Linux 6.7 or later."
        )) var tracking: DirtyTracking = .bitmap
    @Option(
        help: ArgumentHelp(
            "With --incoming: once started, read every page through the guest's mapping before running, and write what was read to PATH.",
            discussion:
                "A check for postcopy: pages that have not arrived fault and are fetched; PATH must equal the source's RAM at the switch.",
            valueName: "PATH")
    ) var readEveryPage: String?

    func validate() throws {
        let blocks = try RAMArgument.parse(ram, sizes: true)
        if blocks[0].name != nil {
            if size != nil { throw ValidationError("--size goes with --ram PATH; give each named block's size as NAME=PATH,size=SIZE") }
            if incoming { throw ValidationError("--incoming takes one RAM block (--ram PATH): postcopy moves one block") }
            if tracking == .kernel { throw ValidationError("--tracking kernel covers one RAM block (--ram PATH); use the bitmap") }
        }
        guard (1...256).contains(threads) else { throw ValidationError("--threads must be from 1 to 256, got \(threads)") }
        if reclaim, !resume { throw ValidationError("--reclaim goes with --resume") }
        if incoming, resume { throw ValidationError("--incoming and --resume exclude each other (an incoming guest resumes by itself)") }
        if handoffSocket != nil, !incoming { throw ValidationError("--handoff-socket goes with --incoming") }
        if readEveryPage != nil, !incoming { throw ValidationError("--read-every-page goes with --incoming") }
        if tracking == .kernel, incoming {
            throw ValidationError(
                "--tracking kernel does not go with --incoming: an incoming guest's RAM is registered for missing pages and tracked with the bitmap"
            )
        }
        if rate != "unlimited" {
            guard let r = parseRate(rate) else {
                throw ValidationError("--rate: '\(rate)' is not a rate (examples: 200MiB/s, 1GiB/s, unlimited)")
            }
            guard r > 0 else { throw ValidationError("--rate must be more than 0 bytes/s (or 'unlimited'), got \(rate)") }
        }
        if StressPattern(parsing: pattern) == nil {
            throw ValidationError("--pattern: '\(pattern)' is not one of random, sequential, hotset:F (0<F<=1), counter")
        }
        if let d = duration, parseDuration(d) == nil {
            throw ValidationError("--duration: '\(d)' is not a duration (examples: 10s, 500ms)")
        }
        if let s = size {
            guard let n = parseSize(s) else { throw ValidationError("--size: '\(s)' is not a size (examples: 4096, 64MiB)") }
            guard n > 0 else { throw ValidationError("--size must be at least one page (4096 bytes), got \(s)") }
        }
    }

    func run() throws {
        if incoming { return try runIncoming() }
        let ramFile: RAMFile
        let controlFile: GuestControl
        // The guest owns its RAM (the writer byte) and its control file (the
        // guest byte) for its whole run: a receive pointed at this RAM, or a
        // second guest on either file, is refused at once (OwnerLock).
        var ramLocks: [OwnerLock] = []
        let guestLock: OwnerLock
        var created: [String] = []
        let blocks = try RAMArgument.parse(ram, sizes: true)
        do {
            var files: [RAMFile] = []
            for b in blocks {
                let ramPath = FilePath(b.path)
                let name = b.name ?? RAMBlock.defaultName
                if let s = b.size ?? size.flatMap(parseSize), !FileManager.default.fileExists(atPath: b.path) {
                    // A new guest's RAM is allocated up front, as QEMU's
                    // memory-backend prealloc=on does (with its prealloc-threads):
                    // a guest owns its memory.
                    let lock = try OwnerLock.claimRAM(ramPath, create: true)
                    ramLocks.append(lock)
                    if lock.created { created.append(b.path) }
                    let file = try RAMFile.create(path: ramPath, size: s, blockName: name)
                    try file.populate(forWriting: true, threads: WorkerThread.parallelism)
                    files.append(file)
                } else {
                    files.append(try RAMFile(path: ramPath, access: .readWrite, blockName: name))
                    ramLocks.append(try OwnerLock.claimRAM(ramPath))
                }
                try IncompleteMark.refuseMarked(ramPath)
            }
            ramFile = try RAMFile.combining(files)
            controlFile = try GuestControl.openOrCreate(path: FilePath(control), for: ramFile.block, blocks: ramFile.blocks)
            guestLock = try OwnerLock.acquire(.guest, on: FilePath(control)) { holder in
                "control file \(control) belongs to a running guest, \(holder.named("livemig stress")); stop it first or give another path"
            }
        } catch {
            // A RAM file this process created holds nothing of a guest yet.
            for path in created { unlink(path) }
            throw CommandFailure(message: error.description)
        }
        var options = StressOptions()
        options.pattern = StressPattern(parsing: pattern)!
        options.threads = threads
        options.rate = rate == "unlimited" ? nil : parseRate(rate)
        options.duration = duration.flatMap(parseDuration)
        options.resume = resume
        options.reclaim = reclaim
        options.tracking = tracking
        let guest: StressGuest
        do {
            guest = try StressGuest(ram: ramFile, control: controlFile, options: options)
        } catch {
            throw CommandFailure(message: error.description)
        }
        let signals = SignalWatch { _ in guest.stop() }
        FileHandleStderr.write(
            "stress: guest \(resume ? "resumed" : "started"): pattern \(guest.options.pattern), \(guest.options.threads) thread(s), "
                + "tracking \(tracking), "
                + "target \(options.rate.map { formatBytes($0) + "/s" } ?? "unlimited"), pid \(getpid())\n")
        let outcome = withExtendedLifetime((ramLocks, guestLock)) { guest.run() }
        signals.end()
        report(outcome, rate: options.rate)
    }

    /// `stress --incoming`: the incoming guest (`IncomingGuest`) waits for
    /// a receiver, then runs like `--resume`.
    private func runIncoming() throws {
        let guest: IncomingGuest
        do {
            guest = try IncomingGuest(
                ram: FilePath(ram[0]), control: FilePath(control), size: size.flatMap(parseSize), socketPath: handoffSocket)
        } catch {
            throw CommandFailure(message: error.description)
        }
        // One watch per process: it stops the wait, then the running guest.
        let running = Mutex<StressGuest?>(nil)
        let signals = SignalWatch { _ in
            guest.stop()
            running.withLock { $0 }?.stop()
        }
        defer { guest.finish() }
        FileHandleStderr.write(
            "stress: incoming guest waiting on \(ram[0]) (\(formatBytes(guest.ram.block.size)), every page missing, registered with a "
                + "userfaultfd), control \(control), hand-off socket \(guest.socketPath), pid \(getpid())\n")
        switch guest.waitForStart() {
        case .started: break
        case .stopped:
            signals.end()
            print("stress: stopped by signal while waiting for an incoming migration; no guest ran")
            return
        case .abandoned(let state):
            signals.end()
            throw CommandFailure(
                message: "the run state of \(control) became '\(state)' while the incoming guest waited for a receiver; not starting")
        }
        if let path = readEveryPage, !guest.stopRequested {
            // Before any writer runs: what the guest reads now is what the
            // source held at the switch.
            do {
                let read = try EveryPageReader.read(guest.ram, into: FilePath(path), threads: WorkerThread.parallelism)
                FileHandleStderr.write(
                    "stress: read every page (\(read.pages) pages) through the guest's mapping in \(fixed(read.seconds, 3)) s into \(path)\n"
                )
            } catch {
                signals.end()
                throw CommandFailure(message: "the incoming guest could not read its pages: \(error.description)")
            }
        }
        var options = StressOptions()
        options.rate = rate == "unlimited" ? nil : parseRate(rate)
        options.duration = duration.flatMap(parseDuration)
        options.resume = true
        let stress: StressGuest
        do {
            stress = try StressGuest(ram: guest.ram, control: guest.control, options: options)
        } catch {
            signals.end()
            throw CommandFailure(message: "the incoming guest cannot start: \(error.description)")
        }
        running.withLock { $0 = stress }
        if guest.stopRequested { stress.stop() }  // a signal before `running` was set
        // The receiver holds the RAM writer lock while it places pages; the
        // guest takes it once the receiver lets go (IncomingGuest).
        guest.claimRAMWhenFree()
        FileHandleStderr.write(
            "stress: guest resumed (incoming): pattern \(stress.options.pattern), "
                + "\(stress.options.threads) thread(s), target \(options.rate.map { formatBytes($0) + "/s" } ?? "unlimited"), pid \(getpid())\n"
        )
        // The hand-off server keeps running while the guest runs: a
        // receiver may attach again (postcopy recovery).
        let outcome = withExtendedLifetime(guest) { stress.run() }
        // A workload that ended by its duration while the receiver still
        // places pages (postcopy) waits for it: this process owns the
        // userfaultfd, and leaving now would fail the migration.
        if outcome.end == .duration, !guest.holdsRAMLock {
            FileHandleStderr.write("stress: duration reached; waiting for the receiver to finish placing pages before exiting\n")
            if guest.awaitReceiverDone(), IncompleteMark.isSet(on: FilePath(ram[0])) {
                FileHandleStderr.write("stress: the migration into this guest did not complete; its RAM lacks pages\n")
            }
        }
        signals.end()
        report(outcome, rate: options.rate)
    }

    private func report(_ outcome: StressOutcome, rate: UInt64?) {
        // Saturate: a Double beyond UInt64 must not trap the report.
        let rateText = formatBytes(outcome.bytesPerSecond < 1.8e19 ? UInt64(max(0, outcome.bytesPerSecond)) : .max) + "/s"
        var line =
            "stress: wrote \(outcome.pagesWritten) pages in \(fixed(outcome.seconds, 2)) s: dirty rate achieved \(rateText)"
        if let r = rate { line += " (target \(formatBytes(r))/s)" }
        print(line)
        if outcome.selfResumes > 0 {
            print(
                "stress: the migrating source vanished while the guest was paused (its process ended, or it renewed "
                    + "no \(GuestControl.leaseSeconds) s lease); the guest resumed by itself"
            )
        }
        switch outcome.end {
        case .migrated: print("stress: the guest migrated to the destination; stopping here")
        case .stopped: print("stress: stopped by signal; guest state saved in \(control)")
        case .duration: print("stress: duration reached; guest state saved in \(control)")
        }
    }
}

/// `livemig verify`: checks a counter guest's RAM against its saved state.
struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check a counter guest: every page's counter agrees with the saved guest state.",
        discussion: "Run it while the guest is stopped (after a migration, or after stress exited). Exits 1 on any bad page."
    )

    @Option(
        help: ArgumentHelp(
            "The guest RAM file; for several RAM blocks, NAME=PATH once per block, in the guest's order.", valueName: "PATH|NAME=PATH"))
    var ram: [String]
    @Option(help: "The guest-control file holding the guest state.") var control: String

    func validate() throws { _ = try RAMArgument.parse(ram) }

    func run() throws {
        let report: CounterVerifier.Report
        do {
            let blocks = try RAMArgument.parse(ram)
            let ramFile = try openRAM(blocks, access: .readOnly)
            for b in blocks { try IncompleteMark.refuseMarked(FilePath(b.path)) }
            let c = try GuestControl(path: FilePath(control))
            if let why = c.blockMismatch(ramFile.blocks) { throw CommandFailure(message: "control file \(control): \(why)") }
            guard c.runState != .incomplete else {
                throw CommandFailure(
                    message: "the guest in \(control) is incomplete: the migration into it did not complete; migrate the guest here again")
            }
            guard c.runState != .waitingIncoming else {
                let pid = c.guestPID
                let who =
                    pid > 0 && (kill(pid, 0) == 0 || errno == EPERM)
                    ? "belongs to an incoming guest (pid \(pid)) that waits for a migration"
                    : "was left by an incoming guest (pid \(pid)) that ended before a migration reached it"
                throw CommandFailure(message: "\(control) \(who): its RAM and state have not arrived; verify after a migration into it")
            }
            let state: StressState
            switch StressState.decode(c.readState()) {
            case .success(let s): state = s
            case .failure(let e): throw e
            }
            guard state.pattern == .counter else {
                throw CommandFailure(message: "verify checks counter guests; this guest runs pattern \(state.pattern)")
            }
            guard state.pageCount == ramFile.block.pageCount else {
                throw CommandFailure(
                    message:
                        "the guest state covers \(state.pageCount) pages but \(ram.joined(separator: ", ")) holds \(ramFile.block.pageCount)"
                )
            }
            report = CounterVerifier.verify(ram: ramFile, state: state)
        } catch let e as GuestMemoryError {
            throw CommandFailure(message: e.description)
        }
        let where_ = report.boundaries.map { "thread \($0.thread): pass \($0.pass), page \($0.position) of its slice" }.joined(
            separator: "; ")
        if report.passed {
            print("verify: OK: \(report.pagesChecked) pages agree with the guest state (\(where_))")
        } else {
            let first = report.firstBad.map(\.description).joined(separator: "\n  ")
            throw CommandFailure(
                message:
                    "verify: \(report.badCount) of \(report.pagesChecked) pages disagree with the guest state (\(where_)); first:\n  \(first)"
            )
        }
    }
}

/// Parses rates such as 200MiB/s or 1GiB/s (bytes per second).
func parseRate(_ text: String) -> UInt64? {
    guard text.hasSuffix("/s") else { return parseSize(text) }
    return parseSize(String(text.dropLast(2)))
}

/// Parses durations: 300ms, 2s, 1.5s, 2m.
func parseDuration(_ text: String) -> Double? {
    for (suffix, mult) in [("ms", 0.001), ("s", 1.0), ("m", 60.0)] where text.hasSuffix(suffix) {
        guard let v = Double(text.dropLast(suffix.count)), v >= 0, v.isFinite, v * mult <= 1e7 else { return nil }
        return v * mult
    }
    return nil
}
