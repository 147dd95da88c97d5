import ArgumentParser
import FoundationEssentials
import GuestMemory
import Migration
import SystemPackage
import URing

/// `livemig receive`: the destination side.
struct ReceiveCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Listen for one migration and write the guest RAM into a file.",
        discussion: """
            An existing RAM file is mapped and pre-faulted before listening and must have the \
            source's size. An absent one is created with the source's size (or --size).
            Exits 0 only after every page arrived, was validated and the totals matched.
            """
    )

    @Option(
        help: ArgumentHelp(
            "The destination RAM file (created when absent); for a guest of several RAM blocks, NAME=PATH once per block (matched by name).",
            valueName: "PATH|NAME=PATH"))
    var ram: [String]

    @Option(help: "Address to listen on: tcp:HOST:PORT or unix:PATH.")
    var listen: String

    @OptionGroup var common: ChannelOptions

    @OptionGroup var trust: TrustOptions

    @Option(parsing: .unconditional, help: "Create an absent RAM file of this size before listening (e.g. 1GiB).")
    var size: String?

    @Option(
        parsing: .unconditional,
        help: "Refuse to create a RAM file larger than this, for --size or the source's size (default: the host's physical memory)."
    )
    var maxSize: String?

    @Option(help: "Receive a live guest: store its state in this control file (created when absent).")
    var guest: String?

    func validate() throws {
        let blocks = try RAMArgument.parse(ram)
        if blocks.count > 1 || blocks[0].name != nil {
            if size != nil { throw ValidationError("--size goes with --ram PATH; named blocks are created with the source's sizes") }
        }
        _ = try parseAddress(listen, option: "--listen")
        if let size {
            guard let n = parseSize(size) else {
                throw ValidationError("--size: '\(size)' is not a size (examples: 4096, 64MiB, 1GiB)")
            }
            guard n > 0 else { throw ValidationError("--size must be at least one page (4096 bytes), got \(size)") }
        }
        if let maxSize {
            guard let n = parseSize(maxSize), n > 0 else {
                throw ValidationError("--max-size: '\(maxSize)' is not a size above 0 (examples: 64MiB, 16GiB)")
            }
        }
    }

    func run() throws {
        let address = try parseAddress(listen, option: "--listen")
        let blocks = try RAMArgument.parse(ram)
        var config = DestinationConfig(address: address, channels: common.channels, ramPath: FilePath(blocks[0].path))
        if blocks[0].name != nil { config.ramBlocks = blocks.map { RAMBlockPath(name: $0.name!, path: FilePath($0.path)) } }
        config.size = size.flatMap(parseSize)
        config.peerTimeout = common.peerTimeoutSeconds
        config.recoverTimeout = common.recoverTimeoutSeconds
        config.faultPathPriority = common.faultPathPriority
        config.guestControl = guest.map { FilePath($0) }
        config.key = try trust.loadKey()
        trust.warnIfExposed(address, role: "listening on")
        if let m = maxSize.flatMap(parseSize) { config.maxSize = m }
        config.onWarning = { FileHandleStderr.write("livemig: warning: \($0)\n") }
        config.testStopAt = ProcessInfo.processInfo.environment["LIVEMIG_TEST_STOP_AT"]
        let destination: DestinationMigration
        do {
            destination = try DestinationMigration(config: config) { FileHandleStderr.write("livemig: notice: \($0)\n") }
        } catch {
            throw CommandFailure(message: error.description)
        }
        // On every way out, success, failure or a signal's cancel (docs/PROTOCOL.md §1).
        defer { destination.removeSocketFile() }
        // Watch signals before saying we listen: a script that signals us
        // once it reads that line must find the watch in place.
        let signals = SignalWatch { destination.cancel($0) }
        FileHandleStderr.write("livemig: listening on \(address)\n")
        let progress = ProgressLine.start(
            role: "receive", ram: { destination.ram.map { ($0.block.size, $0.block.pageSize) } }, counters: destination.counters,
            live: nil)
        let result: Result<MigrationStats, MigrationError>
        do throws(MigrationError) {
            result = .success(try destination.run())
        } catch {
            result = .failure(error)
        }
        progress?.finish()
        signals.end()
        switch result {
        case .success(let stats):
            printStats(stats, format: common.format, role: "receive")
            dropPageTablesBeforeExit(destination.ram)
        case .failure(let e):
            if destination.postcopyPaused, common.format == .json {
                printStats(MigrationStats(failedPostcopy: e), format: .json, role: "receive")
            }
            throw CommandFailure(message: "receiving on \(address) failed: \(e.description)")
        }
    }
}
