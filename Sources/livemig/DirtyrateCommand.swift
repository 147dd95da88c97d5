import ArgumentParser
import FoundationEssentials
import GuestMemory
import Migration
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

extension DirtyRate.Mode: ExpressibleByArgument {}

/// `livemig dirtyrate`: QEMU's calc-dirty-rate / query-dirty-rate.
struct DirtyrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dirtyrate",
        abstract: "Measure how fast a guest dirties its RAM (QEMU's calc-dirty-rate).",
        discussion: """
            page-sampling (the default) hashes --sample-pages random pages per GiB of the RAM file, waits --calc-time and \
            hashes them again: it needs nothing of the guest. bitmap counts the pages a cooperative guest marks in its control \
            file; kernel asks the kernel for the pages a --tracking kernel guest wrote. Both count every page written in the \
            window and refuse a guest that is being migrated. Every mode counts a page once however often it was written.
            """
    )

    @Option(help: "The guest's RAM file.") var ram: String
    @Option(help: "The guest's control file (needed by the bitmap and kernel modes).") var guest: String?
    @Option(help: "With page-sampling and no --guest: the process that maps the RAM file (checked to be running and to map it).")
    var pid: Int32?
    @Option(help: "How long to measure, e.g. 1s, 500ms.") var calcTime: String = "1s"
    @Option(help: "page-sampling | bitmap | kernel") var mode: DirtyRate.Mode = .pageSampling
    @Option(help: "With page-sampling: pages sampled per GiB of RAM.") var samplePages: UInt64 = 512
    @Option(help: "Print 'human' text or one 'json' object (QEMU's query-dirty-rate names).") var format: OutputFormat = .human

    func validate() throws {
        guard let t = parseDuration(calcTime), t >= 0.01, t <= 3600 else {
            throw ValidationError("--calc-time: '\(calcTime)' is not a duration from 10ms to 1h (e.g. 1s)")
        }
        guard (1...1 << 20).contains(samplePages) else { throw ValidationError("--sample-pages must be from 1 to 1048576 per GiB") }
        if mode != .pageSampling, guest == nil {
            throw ValidationError("--mode \(mode.rawValue) reads the guest's dirty tracking: add --guest CONTROL")
        }
        if pid != nil, guest != nil {
            throw ValidationError("--pid and --guest exclude each other (the control file names the guest's pid)")
        }
    }

    func run() throws {
        let result: DirtyRate.Result
        do {
            let ramFile = try RAMFile(path: FilePath(ram), access: .readOnly)
            let control = try guest.map { try GuestControl(path: FilePath($0)) }
            if let control, control.ramSize != ramFile.block.size {
                throw CommandFailure(
                    message: "control file \(guest!) is for \(control.ramSize) bytes of RAM, but \(ram) has \(ramFile.block.size)")
            }
            if let pid { try Self.checkMaps(pid: pid, ram: ram) }
            var meter = DirtyRate(mode: mode, calcTime: parseDuration(calcTime)!)
            meter.samplePagesPerGiB = samplePages
            result = try meter.measure(ram: ramFile, control: control)
        } catch let e as GuestMemoryError {
            throw CommandFailure(message: e.description)
        } catch let e as MigrationError {
            throw CommandFailure(message: e.description)
        }
        switch format {
        case .json:
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            if let data = try? encoder.encode(result), let text = String(data: data, encoding: .utf8) { print(text) }
        case .human:
            let what =
                mode == .pageSampling
                ? "\(result.dirtyPages) of \(result.pagesChecked) sampled pages changed"
                : "\(result.dirtyPages) of \(result.pagesChecked) pages written"
            print("dirtyrate: \(result.dirtyRate) MiB/s (\(mode.rawValue), \(fixed(result.calcTime, 3)) s: \(what))")
        }
    }

    /// The process must be running and map the RAM file.
    static func checkMaps(pid: Int32, ram: String) throws {
        guard SystemCall.processExists(pid) else { throw CommandFailure(message: "no process \(pid) is running") }
        guard let maps = try? String(contentsOfFile: "/proc/\(pid)/maps", encoding: .utf8) else {
            throw CommandFailure(message: "cannot read /proc/\(pid)/maps (the process ended, or it is not ours to inspect)")
        }
        var real = ram
        if let r = realpath(ram, nil) {
            real = String(validatingCString: r) ?? ram
            free(r)
        }
        guard maps.split(separator: "\n").contains(where: { $0.hasSuffix(" " + real) }) else {
            throw CommandFailure(message: "process \(pid) does not map \(real); give the RAM file it maps")
        }
    }
}
