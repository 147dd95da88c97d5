import ArgumentParser
import URing
import WorkerThreads

/// How results are printed.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

/// Options both ends of a migration share.
struct ChannelOptions: ParsableArguments {
    // `.unconditional`: "-1" is a value to refuse with the range, not a flag.
    @Option(parsing: .unconditional, help: "Number of multifd channels, 1-64; must match on both sides.")
    var channels: Int = 2

    @Option(help: "Print the final statistics as 'human' text or one 'json' object (QEMU query-migrate names).")
    var format: OutputFormat = .human

    @Option(
        help: """
            Fail when the peer moves no bytes for this long during the transfer (e.g. 10s, at least 1s); \
            also sets TCP keepalive and user timeout so a dead host or cut link ends the migration.
            """)
    var peerTimeout: String = "10s"

    @Option(
        help: """
            Postcopy: when the connections break after the switch, how long to wait for the other side to \
            recover (send reconnects by itself; receive keeps listening), e.g. 60s; 0s turns recovery off.
            """)
    var recoverTimeout: String = "60s"

    @Option(
        help: """
            Postcopy: scheduling of the threads a page fault waits on (destination fault thread and preempt \
            receiver, source request server): 'realtime' (SCHED_FIFO, lowest level; nice -10 without the \
            privilege) or 'normal'.
            """)
    var faultPathPriority: FaultPathPriority = .realtime

    func validate() throws {
        guard (1...64).contains(channels) else {
            throw ValidationError("--channels must be from 1 to 64, got \(channels)")
        }
        guard let t = parseDuration(peerTimeout), t >= 1 else {
            throw ValidationError("--peer-timeout: '\(peerTimeout)' is not a duration of at least 1s (e.g. 10s)")
        }
        guard parseDuration(recoverTimeout) != nil else {
            throw ValidationError("--recover-timeout: '\(recoverTimeout)' is not a duration (e.g. 60s, or 0s for no recovery)")
        }
    }

    /// `--recover-timeout` in seconds (validated).
    var recoverTimeoutSeconds: Double { parseDuration(recoverTimeout)! }

    /// `--peer-timeout` in seconds (validated).
    var peerTimeoutSeconds: Double { parseDuration(peerTimeout)! }
}

extension FaultPathPriority: ExpressibleByArgument {}

/// Parses an address option, as a usage error when it is malformed.
func parseAddress(_ text: String, option: String) throws -> SocketAddress {
    do {
        return try SocketAddress(parsing: text)
    } catch {
        throw ValidationError("\(option): \(error.description)")
    }
}

/// Parses sizes such as 4096, 64MiB, 1GiB, 512K (binary units).
func parseSize(_ text: String) -> UInt64? {
    let units: [(String, UInt64)] = [
        ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10), ("B", 1),
    ]
    for (suffix, mult) in units where text.hasSuffix(suffix) {
        guard let n = UInt64(text.dropLast(suffix.count)) else { return nil }
        let (v, overflow) = n.multipliedReportingOverflow(by: mult)
        return overflow ? nil : v
    }
    return UInt64(text)
}
