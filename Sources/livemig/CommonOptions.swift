import ArgumentParser
import GuestMemory
import SystemPackage
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

/// One `--ram` value: `PATH` (a guest of one RAM block), or `NAME=PATH`
/// for one of several named blocks (QEMU's RAMBlock names, e.g. pc.ram,
/// vga.vram), with `,size=SIZE` where a size may be given (stress).
struct RAMArgument: Equatable {
    var name: String?
    var path: String
    var size: UInt64?

    /// Parses every `--ram` of a command. A plain PATH stands alone; named
    /// blocks may repeat, each name once. `sizes`: whether `,size=` is allowed.
    static func parse(_ values: [String], sizes: Bool = false) throws -> [RAMArgument] {
        guard !values.isEmpty else { throw ValidationError("give the guest's RAM: --ram PATH, or --ram NAME=PATH per RAM block") }
        var out: [RAMArgument] = []
        for v in values {
            var arg = RAMArgument(name: nil, path: v)
            if let eq = v.firstIndex(of: "="), isBlockName(v[..<eq]) {
                arg.name = String(v[..<eq])
                arg.path = String(v[v.index(after: eq)...])
                if let comma = arg.path.ranges(of: ",size=").last {
                    guard sizes else { throw ValidationError("--ram \(v): ',size=' is for stress, which creates the block's file") }
                    let text = String(arg.path[comma.upperBound...])
                    guard let n = parseSize(text), n > 0 else {
                        throw ValidationError("--ram \(v): '\(text)' is not a size above 0 (examples: 16MiB, 256KiB)")
                    }
                    arg.size = n
                    arg.path = String(arg.path[..<comma.lowerBound])
                }
                guard !arg.path.isEmpty else { throw ValidationError("--ram \(v): no path after '='") }
            }
            out.append(arg)
        }
        if out.contains(where: { $0.name == nil }), out.count > 1 {
            throw ValidationError(
                "--ram PATH is the form for a guest of one RAM block; for several, name each: --ram pc.ram=PATH --ram vga.vram=PATH2")
        }
        var seen = Set<String>()
        for a in out {
            if let n = a.name, !seen.insert(n).inserted { throw ValidationError("--ram: block '\(n)' is given twice") }
        }
        if Set(out.map(\.path)).count != out.count { throw ValidationError("--ram: two blocks name the same file") }
        return out
    }

    /// A RAM block's name: 1 to 47 bytes of letters, digits, '.', '_' or '-'
    /// (what a control file's block table holds).
    static func isBlockName(_ s: Substring) -> Bool {
        !s.isEmpty && s.utf8.count <= 47 && s.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || "._-".contains($0)) }
    }
}

/// Opens the RAM `args` name (`RAMArgument.parse`) as one `RAMFile`: the one
/// file, or each block's file side by side in the order given.
func openRAM(_ args: [RAMArgument], access: RAMFile.Access) throws(GuestMemoryError) -> RAMFile {
    var files: [RAMFile] = []
    for a in args {
        files.append(try RAMFile(path: FilePath(a.path), access: access, blockName: a.name ?? RAMBlock.defaultName))
    }
    return try RAMFile.combining(files)
}
