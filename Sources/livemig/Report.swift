import Dispatch
import Foundation
import Migration
import Synchronization
import URing

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
            "\(role): \(s.status.rawValue) in \(String(format: "%.3f", secs)) s (setup \(s.setupTime) ms): "
                + "\(formatBytes(s.ram.total)) of RAM, \(s.ram.normal) normal + \(s.ram.duplicate) zero pages, "
                + "\(formatBytes(s.ram.transferred)) on the wire at \(String(format: "%.2f", gbps)) GB/s "
                + "over \(s.channels) channel(s)"
                + (s.sendMechanism.map { " (\($0))" } ?? ""))
    }
}

func formatBytes(_ n: UInt64) -> String {
    let d = Double(n)
    if n >= 1 << 30 { return String(format: "%.2f GiB", d / Double(1 << 30)) }
    if n >= 1 << 20 { return String(format: "%.1f MiB", d / Double(1 << 20)) }
    if n >= 1 << 10 { return String(format: "%.1f KiB", d / Double(1 << 10)) }
    return "\(n) B"
}

/// A one-line live progress display on stderr, only when it is a terminal.
final class ProgressLine: Sendable {
    private let stop: StopFlag
    private let thread: WorkerThread

    /// Starts the display, or returns nil when stderr is not a terminal.
    static func start(role: String, total: @escaping @Sendable () -> UInt64, counters: TransferCounters) -> ProgressLine? {
        guard FileHandleStderr.isTerminal else { return nil }
        return ProgressLine(role: role, total: total, counters: counters)
    }

    private init(role: String, total: @escaping @Sendable () -> UInt64, counters: TransferCounters) {
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
                let line = "\r\(role): \(formatBytes(pages &* 4096)) of \(formatBytes(total())) pages moved, \(String(format: "%.2f", rate)) GB/s   "
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

/// Turns SIGINT and SIGTERM into a cancellation of the running migration.
/// Built outside any actor so the handler never asserts main-actor isolation.
func watchSignals(_ cancel: @escaping @Sendable (String) -> Void) -> [DispatchSourceSignal] {
    [SIGINT, SIGTERM].map { sig in
        signal(sig, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        let name = sig == SIGINT ? "SIGINT" : "SIGTERM"
        source.setEventHandler { cancel("cancelled by \(name)") }
        source.resume()
        return source
    }
}
