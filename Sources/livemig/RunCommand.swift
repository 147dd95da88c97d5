import ArgumentParser
import FoundationEssentials
import GuestMemory
import OSCall
import Synchronization
import SystemPackage
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// `livemig run`: an unmodified program as a guest (issue 15, part 2;
/// docs/GUEST-CONTROL.md §13).
///
/// The launcher starts PROGRAM with the preload library
/// (libLivemigPreload.so, LD_PRELOAD), which registers the program's
/// MAP_SHARED mapping of the RAM file for kernel write tracking and
/// publishes it in the control file. The launcher then speaks the control
/// protocol on the program's behalf, from outside:
///
/// - *pause requested*: SIGSTOP, wait until the whole process stopped
///   (waitpid WUNTRACED: every thread is in the group stop), acknowledge;
/// - back to *running* (a failed migration, or a source that vanished:
///   the lease): SIGCONT;
/// - a throttle: a duty cycle of SIGSTOP and SIGCONT in 10 ms slices;
/// - *migrated*: SIGKILL while still stopped, so the RAM file stays exactly
///   as it was sent, then exit 0. The program is restarted on the
///   destination by the user: it has no guest state.
///
/// It holds the RAM file's writer lock and the control file's guest lock
/// for the program's life, like `stress`.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run an unmodified program as a guest whose writes to its RAM file the kernel tracks.",
        discussion: """
            PROGRAM must be dynamically linked and map all of the RAM file with MAP_SHARED (a static binary ignores \
            LD_PRELOAD). send --guest CONTROL then migrates it live: the program is frozen from outside at switchover \
            (SIGSTOP) and ended, still frozen, once the destination holds its RAM; after a failed migration it runs on. \
            It has no guest state: restart the program on the destination yourself. Writes made with write(2), by other \
            processes, or by a forked child are not seen; a fork, munmap or mremap of the RAM fails the migration.
            """
    )

    @Option(help: "The RAM file the program maps.") var ram: String
    @Option(help: "The guest-control file (created when absent).") var control: String
    @Option(parsing: .unconditional, help: "Create an absent RAM file of this size (e.g. 64MiB).") var size: String?
    @Option(help: "How long the program may take to map the RAM file, e.g. 10s.") var attachTimeout: String = "10s"
    @Argument(parsing: .postTerminator, help: "The program and its arguments, after --.") var command: [String] = []

    func validate() throws {
        guard !command.isEmpty else { throw ValidationError("give the program to run after --, e.g. livemig run ... -- python3 app.py") }
        if let s = size, parseSize(s).map({ $0 > 0 }) != true { throw ValidationError("--size: '\(s)' is not a size (e.g. 64MiB)") }
        guard let t = parseDuration(attachTimeout), t > 0 else {
            throw ValidationError("--attach-timeout: '\(attachTimeout)' is not a positive duration (e.g. 10s)")
        }
    }

    func run() throws {
        let preload = try Self.preloadLibrary()
        let program = try Self.resolve(command[0])
        if let why = Self.staticBinary(program) { throw CommandFailure(message: why) }
        let ramPath = FilePath(ram)
        let ramFile: RAMFile
        let control: GuestControl
        let locks: (OwnerLock, OwnerLock)
        do {
            let ramLock: OwnerLock
            if let s = size.flatMap(parseSize), !FileManager.default.fileExists(atPath: ram) {
                ramLock = try OwnerLock.claimRAM(ramPath, create: true)
                ramFile = try RAMFile.create(path: ramPath, size: s)
            } else {
                ramFile = try RAMFile(path: ramPath, access: .readWrite)
                ramLock = try OwnerLock.claimRAM(ramPath)
            }
            try IncompleteMark.refuseMarked(ramPath)
            control = try GuestControl.openOrCreate(path: FilePath(self.control), for: ramFile.block)
            let guestLock = try OwnerLock.acquire(.guest, on: FilePath(self.control)) { holder in
                "control file \(self.control) belongs to a running guest, \(holder.named("livemig")); stop it first or give another path"
            }
            locks = (ramLock, guestLock)
        } catch {
            throw CommandFailure(message: error.description)
        }
        switch control.runState {
        case .running, .pauseRequested: break
        case let s:
            throw CommandFailure(message: "the guest in \(self.control) is in run state '\(s)'; it is no guest to start here")
        }
        // The words the launcher keeps (GUEST-CONTROL.md §13): not tracked
        // until the preload library says so.
        control.throttlePercent = 0
        control.resetPauseAcknowledgements()
        control.setGuestKind(.external)
        control.clearTrackingBlindness()
        control.setTracking(.bitmap, mappingAddress: 0)
        do { try control.writeState([]) } catch { throw CommandFailure(message: error.description) }
        control.guestThreads = 1
        control.setRunState(.running)

        var env = ProcessInfo.processInfo.environment
        env["LD_PRELOAD"] = ([preload] + (env["LD_PRELOAD"].map { [$0] } ?? [])).joined(separator: " ")
        env["LIVEMIG_RAM"] = Self.absolute(ram)
        env["LIVEMIG_CONTROL"] = Self.absolute(self.control)
        let pid = try Self.spawn(program, command, env: env)
        control.guestPID = pid
        let freezer = CgroupFreezer(holding: pid)
        defer { freezer?.remove() }  // the program has exited and was reaped by then
        let supervisor = Supervisor(pid: pid, control: control, freezer: freezer)
        let signals = SignalWatch { _ in supervisor.forward(SIGTERM) }
        defer { signals.end() }

        // Attach: the program maps the RAM file and the preload library
        // publishes the mapping, or the launcher gives up on it.
        let deadline = Monotonic.now + parseDuration(attachTimeout)!
        while control.tracking != .kernel {
            if let status = supervisor.reapIfExited() {
                throw CommandFailure(
                    message: "\(command[0]) exited (\(status)) before it mapped \(ram) with MAP_SHARED; nothing was tracked")
            }
            if Monotonic.now > deadline {
                supervisor.forward(SIGKILL)
                _ = supervisor.waitExit()
                throw CommandFailure(
                    message: "\(command[0]) did not map all of \(ram) with MAP_SHARED within \(attachTimeout) (a static binary, or one "
                        + "that maps another file, cannot be tracked); it was ended")
            }
            usleep(2000)
        }
        FileHandleStderr.write(
            "run: \(command[0]) (pid \(pid)) maps \(ram) at 0x\(String(control.trackedMappingAddress, radix: 16)); "
                + "its writes are tracked by the kernel; control \(self.control); "
                + (freezer.map { "frozen with the cgroup v2 freezer (\($0.directory))" }
                    ?? "frozen with SIGSTOP (no cgroup v2 freezer here)")
                + "\n")
        let end = withExtendedLifetime((ramFile, locks)) { supervisor.supervise() }
        switch end {
        case .migrated:
            print("run: the program migrated; it was ended while frozen, its RAM file is as sent. Restart it on the destination.")
        case .exited(let status):
            print("run: \(command[0]) exited (\(status))")
            if status != "status 0" { throw CommandFailure(message: "\(command[0]) exited (\(status))") }
        }
    }

    // MARK: - the program

    /// The preload library: LIVEMIG_PRELOAD, or libLivemigPreload.so beside
    /// this executable (SwiftPM builds both into one directory).
    static func preloadLibrary() throws -> String {
        if let p = ProcessInfo.processInfo.environment["LIVEMIG_PRELOAD"] { return p }
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let exe = n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        let path = FilePath(exe).removingLastComponent().appending("libLivemigPreload.so").string
        guard access(path, R_OK) == 0 else {
            throw CommandFailure(
                message: "the preload library is not at \(path); build it with 'swift build --product LivemigPreload' "
                    + "(same -c as livemig) or set LIVEMIG_PRELOAD")
        }
        return path
    }

    /// `name` as a path: as given when it has a slash, else found on PATH.
    static func resolve(_ name: String) throws -> String {
        if name.contains("/") {
            guard access(name, X_OK) == 0 else { throw CommandFailure(message: "\(name) is not an executable file") }
            return name
        }
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let p = "\(dir)/\(name)"
            if access(p, X_OK) == 0 { return p }
        }
        throw CommandFailure(message: "\(name) was not found on PATH")
    }

    /// Why `path` cannot take LD_PRELOAD (an ELF executable without an
    /// interpreter: statically linked), or nil. Scripts (#!) pass: their
    /// interpreter is what runs.
    static func staticBinary(_ path: String) -> String? {
        guard let f = FileManager.default.contents(atPath: path), f.count >= 64 else { return nil }
        let b = [UInt8](f.prefix(64))
        guard b[0] == 0x7F, b[1] == 0x45, b[2] == 0x4C, b[3] == 0x46, b[4] == 2 else { return nil }  // ELF64 only
        func u64(_ o: Int) -> Int { (0..<8).reduce(0) { $0 | Int(f[f.startIndex + o + $1]) << (8 * $1) } }
        func u16(_ o: Int) -> Int { Int(f[f.startIndex + o]) | Int(f[f.startIndex + o + 1]) << 8 }
        let phoff = u64(32), phentsize = u16(54), phnum = u16(56)
        for i in 0..<phnum {
            let o = phoff + i * phentsize
            guard o + 4 <= f.count else { break }
            if u16(o) == 3 { return nil }  // PT_INTERP
        }
        return "\(path) is statically linked: it ignores LD_PRELOAD, so livemig cannot track its writes; run a dynamically linked build"
    }

    static func absolute(_ path: String) -> String {
        path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
    }

    static func spawn(_ program: String, _ argv: [String], env: [String: String]) throws -> pid_t {
        var pid: pid_t = 0
        let cArgs = argv.map { strdup($0) } + [nil]
        let cEnv = env.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        // The program starts with every signal unblocked and at its default
        // action, whatever this process inherited or set up (SignalWatch).
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t(), all = sigset_t()
        sigemptyset(&none)
        sigfillset(&all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let rc = posix_spawn(&pid, program, nil, &attr, cArgs, cEnv)
        guard rc == 0 else { throw CommandFailure(message: "cannot start \(program): \(Errno(rawValue: rc))") }
        return pid
    }
}

/// Speaks the control protocol for the program, from outside. Only the
/// launcher's main thread calls `supervise`; `forward` may come from the
/// signal thread.
private final class Supervisor: Sendable {
    enum End {
        case migrated
        case exited(String)
    }

    let pid: pid_t
    let control: GuestControl
    let freezer: CgroupFreezer?
    /// The program is stopped by us (pause or throttle).
    private let stopped = Atomic<Bool>(false)

    init(pid: pid_t, control: GuestControl, freezer: CgroupFreezer?) {
        self.pid = pid
        self.control = control
        self.freezer = freezer
    }

    /// Sends `signal` to the program (and SIGCONT, so a stopped one acts).
    func forward(_ signal: Int32) {
        kill(pid, signal)
        if signal != SIGKILL {
            freezer?.thaw()
            kill(pid, SIGCONT)
        }
    }

    /// The program's end as text, if it has exited (reaped).
    func reapIfExited() -> String? {
        var status: Int32 = 0
        let r = waitpid(pid, &status, WNOHANG)
        guard r == pid, !Self.isStop(status) else { return nil }
        return Self.describe(status)
    }

    func waitExit() -> String {
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, 0)
            if r == pid, !Self.isStop(status) { return Self.describe(status) }
            if r < 0, errno != EINTR { return "already reaped" }
        }
    }

    private func stop() -> String? {
        guard !stopped.exchange(true, ordering: .relaxed) else { return nil }
        // The cgroup freezer stops every task of the program without a
        // signal it could see; `freeze` returns once the kernel says all
        // are frozen. Without it, SIGSTOP.
        if let freezer {
            if freezer.freeze() { return nil }
            if let end = reapIfExited() { return end }
        }
        kill(pid, SIGSTOP)
        // The group stop is complete (every thread stopped) when waitpid
        // reports the child stopped.
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, WUNTRACED)
            if r == pid { return Self.isStop(status) ? nil : Self.describe(status) }
            if r < 0, errno != EINTR { return "already reaped" }
        }
    }

    private func resume() {
        guard stopped.exchange(false, ordering: .relaxed) else { return }
        freezer?.thaw()
        kill(pid, SIGCONT)
    }

    func supervise() -> End {
        var acknowledged = false
        var busySince = Monotonic.now
        while true {
            if let end = reapIfExited() { return .exited(end) }
            switch control.runState {
            case .running:
                if acknowledged {
                    control.leavePause()
                    acknowledged = false
                }
                let percent = Double(min(control.throttlePercent, 99))
                if percent > 0, control.pauseHolderVanished {
                    control.exchangeThrottle(from: UInt32(percent), to: 0)
                    resume()
                } else if percent > 0, Monotonic.now - busySince >= 0.01 {
                    // QEMU's throttle: asleep `percent` % of the time.
                    if let end = stop() { return .exited(end) }
                    usleep(UInt32(0.01 * percent / (100 - percent) * 1e6))
                    resume()
                    busySince = Monotonic.now
                } else if percent == 0 {
                    resume()
                    busySince = Monotonic.now
                }
                control.waitWhile(.running, timeout: 0.002)
            case .pauseRequested:
                if !acknowledged {
                    if let end = stop() { return .exited(end) }
                    // Every thread stopped: no write is in flight.
                    control.acknowledgePause()
                    acknowledged = true
                }
                if control.pauseHolderVanished, control.exchangeRunState(from: .pauseRequested, to: .running) { continue }
                control.waitWhile(.pauseRequested, timeout: 0.05)
            case .handedOver, .incoming, .waitingIncoming, .incomplete:
                // Handed over: stay frozen until the source says migrated
                // or takes it back (--reclaim sets running).
                control.waitWhile(control.runState, timeout: 0.05)
            case .migrated:
                // Ended while frozen: the RAM file stays as it was sent.
                kill(pid, SIGKILL)
                _ = waitExit()
                return .migrated
            }
        }
    }

    private static func isStop(_ status: Int32) -> Bool { status & 0xff == 0x7f }

    private static func describe(_ status: Int32) -> String {
        if status & 0x7f == 0 { return "status \((status >> 8) & 0xff)" }
        return "signal \(status & 0x7f)"
    }
}

/// A cgroup v2 of its own for the program, used as its freezer
/// (`cgroup.freeze`): the launcher's own cgroup in the unified hierarchy
/// gets a child `livemig-run-PID` and the program is moved into it right
/// after it starts (its later threads and children follow it). nil where
/// there is no writable cgroup v2 hierarchy: SIGSTOP is used then.
final class CgroupFreezer: Sendable {
    let directory: String

    init?(holding pid: pid_t) {
        guard let root = Self.unifiedMount(), let mine = Self.ownCgroup() else { return nil }
        let parent = root + (mine == "/" ? "" : mine)
        // Earlier runs' cgroups that children of their programs kept busy
        // then: remove the ones that are empty now (rmdir refuses others).
        for old in (try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? [] where old.hasPrefix("livemig-run-") {
            rmdir(parent + "/" + old)
        }
        let dir = parent + "/livemig-run-\(pid)"
        guard mkdir(dir, 0o755) == 0 || errno == EEXIST else { return nil }
        guard Self.write("\(pid)", to: dir + "/cgroup.procs"), access(dir + "/cgroup.freeze", W_OK) == 0 else {
            rmdir(dir)
            return nil
        }
        directory = dir
    }

    /// Freezes the program; true once `cgroup.events` says frozen (at most 5 s).
    func freeze() -> Bool {
        guard Self.write("1", to: directory + "/cgroup.freeze") else { return false }
        let deadline = Monotonic.now + 5
        while Monotonic.now < deadline {
            if let events = try? String(contentsOfFile: directory + "/cgroup.events", encoding: .utf8),
                events.contains("frozen 1")
            {
                return true
            }
            usleep(200)
        }
        _ = Self.write("0", to: directory + "/cgroup.freeze")
        return false
    }

    func thaw() { _ = Self.write("0", to: directory + "/cgroup.freeze") }

    /// Removes the cgroup (once the program has exited).
    func remove() { rmdir(directory) }

    private static func write(_ text: String, to path: String) -> Bool {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        return text.withCString { Glibc.write(fd, $0, strlen($0)) } == text.utf8.count
    }

    /// Where the unified (cgroup2) hierarchy is mounted, from mountinfo.
    private static func unifiedMount() -> String? {
        guard let info = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        for line in info.split(separator: "\n") {
            let parts = line.split(separator: " - ", maxSplits: 1)
            guard parts.count == 2, parts[1].hasPrefix("cgroup2 ") else { continue }
            let fields = parts[0].split(separator: " ")
            if fields.count >= 5 { return String(fields[4]) }
        }
        return nil
    }

    /// This process's cgroup in the unified hierarchy ("0::PATH").
    private static func ownCgroup() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else { return nil }
        return text.split(separator: "\n").first { $0.hasPrefix("0::") }.map { String($0.dropFirst(3)) }
    }
}
