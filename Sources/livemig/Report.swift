import CShims
import FoundationEssentials
import GuestMemory
import Migration
import OSCall
import Synchronization
import URing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// Prints the final statistics on stdout, as JSON or a short summary.
func printStats(_ s: MigrationStats, format: OutputFormat, role: String) {
    switch format {
    case .json:
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        if let data = try? encoder.encode(s), let text = String(data: data, encoding: .utf8) {
            print(text)
        }
    case .human:
        let secs = Double(s.totalTime) / 1000
        let gbps = secs > 0 ? Double(s.ram.transferred) / secs / 1e9 : 0
        print(
            "\(role): \(s.status.rawValue) in \(fixed(secs, 3)) s (setup \(s.setupTime) ms): "
                + "\(formatBytes(s.ram.total)) of RAM, \(s.ram.normal) normal + \(s.ram.duplicate) zero pages, "
                + "\(formatBytes(s.ram.transferred)) on the wire at \(fixed(gbps, 2)) GB/s "
                + "over \(s.channels) channel(s)"
                + (s.sendMechanism.map { " (\($0))" } ?? ""))
        if let c = s.compression {
            let raw = c.pages * s.ram.pageSize
            // Two decimals without String(format:), which needs all of Foundation.
            let rate = (c.compressionRate * 100).rounded() / 100
            print(
                "\(role): \(c.method)\(c.level.map { " level \($0)" } ?? ""): \(c.pages) pages (\(formatBytes(raw))) took "
                    + "\(formatBytes(c.compressedSize)) on the wire (\(rate)x)")
        }
        if let p = s.postcopy {
            // Latency: QEMU's average is in ns; the rest of the line is µs.
            print(
                "\(role): postcopy: \(p.requests) requests for \(p.faults) faults, \(formatBytes(p.postcopyBytes)), "
                    + "blocktime \(p.blocktime) ms, latency avg \(fixed(Double(p.latency) / 1000, 1)) µs "
                    + "p50 \(p.latencyP50Us) µs p99 \(p.latencyP99Us) µs max \(p.latencyMaxUs) µs")
            if p.recoveries > 0 {
                print("\(role): postcopy: recovered \(p.recoveries) time(s) after the connections broke")
            }
            if !p.vcpuBlocktime.isEmpty {
                print("\(role): postcopy: blocked per guest thread (ms): \(p.vcpuBlocktime.map(String.init).joined(separator: " "))")
            }
        }
        if let sends = s.zeroCopySends, let copied = s.zeroCopyCopied {
            print("\(role): zero copy: \(sends) sends, \(copied) of them copied by the kernel anyway")
        }
        if let d = s.downtime {
            print(
                "\(role): live: \(s.ram.dirtySyncCount) rounds, downtime \(d) ms (expected \(s.expectedDowntime.map { "\($0)" } ?? "?") ms), "
                    + "precopy \(formatBytes(s.ram.precopyBytes)), downtime bytes \(formatBytes(s.ram.downtimeBytes)), "
                    + "throttle \(s.cpuThrottlePercentage ?? 0)%")
        }
    }
}

func formatBytes(_ n: UInt64) -> String {
    let d = Double(n)
    if n >= 1 << 30 { return fixed(d / Double(1 << 30), 2) + " GiB" }
    if n >= 1 << 20 { return fixed(d / Double(1 << 20), 1) + " MiB" }
    if n >= 1 << 10 { return fixed(d / Double(1 << 10), 1) + " KiB" }
    return "\(n) B"
}

/// A one-line live progress display on stderr, only when it is a terminal.
final class ProgressLine: Sendable {
    private let stop: StopFlag
    private let thread: WorkerThread

    /// Starts the display, or returns nil when stderr is not a terminal.
    /// `ram`: the RAM block's size and page size, once known (a destination
    /// learns them from the source's layout).
    static func start(
        role: String, ram: @escaping @Sendable () -> (size: UInt64, pageSize: UInt64)?, counters: TransferCounters,
        live: LiveProgress?
    ) -> ProgressLine? {
        guard FileHandleStderr.isTerminal else { return nil }
        return ProgressLine(role: role, ram: ram, counters: counters, live: live)
    }

    private init(
        role: String, ram: @escaping @Sendable () -> (size: UInt64, pageSize: UInt64)?, counters: TransferCounters,
        live: LiveProgress?
    ) {
        let stop = StopFlag()
        self.stop = stop
        let started = Monotonic.now
        thread = WorkerThread(name: "progress") {
            while !stop.isSet {
                usleep(250_000)
                let pages = counters.read(counters.normalPages) + counters.read(counters.zeroPages)
                let bytes = counters.read(counters.multifdBytes)
                let t = Monotonic.now - started
                let rate = t > 0 ? Double(bytes) / t / 1e9 : 0
                let (total, pageSize) = ram() ?? (0, 0)
                var line = "\r\(role): \(formatBytes(pages &* pageSize)) of \(formatBytes(total)) sent, \(fixed(rate, 2)) GB/s"
                if let live {
                    line +=
                        ", round \(live.round.load(ordering: .relaxed)), remaining \(formatBytes(live.remainingBytes.load(ordering: .relaxed)))"
                    line += ", dirty \(formatBytes(live.dirtyPagesRate.load(ordering: .relaxed) &* pageSize))/s"
                    let t = live.throttle.load(ordering: .relaxed)
                    if t > 0 { line += ", throttle \(t)%" }
                    if live.postcopy.load(ordering: .relaxed) {
                        line += ", postcopy-active, \(live.postcopyRequests.load(ordering: .relaxed)) page requests"
                    }
                }
                line += "   "
                FileHandleStderr.write(line)
            }
            FileHandleStderr.write("\r\u{1B}[K")
        }
    }

    func finish() {
        stop.set()
        thread.join()
    }
}

final class StopFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .relaxed) }
    func set() { flag.store(true, ordering: .relaxed) }
}

/// Turns SIGINT and SIGTERM into a cancellation of the running work while
/// it lives. Call `end()` when the work is done; that call is also what
/// keeps the watch alive until then (an unused local may be released at
/// once by the optimiser, and then the signals would go unwatched).
///
/// How: a C handler writes the signal's number to a pipe
/// (`lm_signal_watch_start`) and one thread of ours reads the pipe and calls
/// `cancel` there, outside the handler, where locks and allocation are
/// allowed. The handlers are in place when `init` returns, so a signal sent
/// right after we announce readiness waits in the pipe and is seen.
///
/// Why not a Dispatch signal source: its registration is asynchronous and
/// starts libdispatch's worker and manager threads first. Waiting for it
/// cost `send` about 1 ms of wall time and more of CPU at start-up, for
/// every migration.
final class SignalWatch {
    private let readEnd: Int32
    private let reader: WorkerThread?

    /// `user1`: also watch SIGUSR1 and call it for each (`send
    /// --postcopy`: switch to postcopy now).
    init(user1: (@Sendable () -> Void)? = nil, _ cancel: @escaping @Sendable (String) -> Void) {
        let fd = lm_signal_watch_start()
        readEnd = fd
        guard fd >= 0 else {
            // Without the watch the signals keep their default action (the
            // process ends); nothing of the source is at stake either way.
            FileHandleStderr.write(
                "livemig: warning: cannot watch SIGINT/SIGTERM (\(String(cString: strerror(-fd)))): "
                    + "they will end the process without a clean cancel\n")
            reader = nil
            return
        }
        if user1 != nil, lm_signal_watch_add_usr1() != 0 {
            FileHandleStderr.write("livemig: warning: cannot watch SIGUSR1; it would end the process\n")
        }
        reader = WorkerThread(name: "signals") {
            var byte: UInt8 = 0
            while true {
                let n = (try? SystemCall.retrying { read(fd, &byte, 1) }) ?? -1
                guard n == 1, byte != 0 else { return }  // 0: end() was called
                if Int32(byte) == SIGUSR1 {
                    user1?()
                    continue
                }
                cancel("cancelled by \(Int32(byte) == SIGINT ? "SIGINT" : "SIGTERM")")
            }
        }
    }

    /// Stops watching; the signals' default action applies again.
    func end() {
        lm_signal_watch_stop()
        reader?.join()
        if readEnd >= 0 { close(readEnd) }
    }
}

/// `--events FILE`: one JSON line per round, flushed as it happens.
final class EventLog: Sendable {
    private let fd: Int32

    init(path: String) throws {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_APPEND, 0o644)
        guard fd >= 0 else {
            throw CommandFailure(message: "cannot write the events file \(path): \(SystemCall.lastError)")
        }
        self.fd = fd
    }

    deinit { close(fd) }

    func append(_ r: RoundRecord) {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(r) else { return }
        // One write per line (O_APPEND): a reader never sees half a record.
        (data + Data("\n".utf8)).withUnsafeBytes { b in _ = write(fd, b.baseAddress, b.count) }
    }
}

/// `x` with `digits` decimals, as "%.Nf" prints it (without Foundation,
/// whose loading costs `send` a few milliseconds of start-up).
func fixed(_ x: Double, _ digits: Int) -> String {
    guard x.isFinite, abs(x) < 1e15 else { return "\(x)" }
    var scale: Int64 = 1
    for _ in 0..<digits { scale *= 10 }
    let n = Int64((abs(x) * Double(scale)).rounded())
    let sign = x < 0 && n != 0 ? "-" : ""
    guard digits > 0 else { return sign + String(n) }
    let frac = String(n % scale)
    return sign + String(n / scale) + "." + String(repeating: "0", count: digits - frac.count) + frac
}

/// Tears the RAM mapping's page tables down on every core before the
/// process exits, instead of on one core inside exit (see
/// `RAMFile.dropPageTables`): `send` and `receive` return sooner.
/// `touchedBytes`: how much of it this process mapped, when it knows.
func dropPageTablesBeforeExit(_ file: RAMFile?, touchedBytes: UInt64? = nil) {
    file?.dropPageTables(threads: WorkerThread.parallelism, touchedBytes: touchedBytes)
}
