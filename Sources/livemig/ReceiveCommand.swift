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

    @Option(help: "Address to listen on: tcp:HOST:PORT or unix:PATH (with --qmp: from QMP's migrate-incoming instead).")
    var listen: String?

    @Option(
        help: ArgumentHelp(
            "Serve QMP on unix:PATH or tcp:HOST:PORT (loopback) and listen when a client says `migrate-incoming`, as QEMU's -incoming defer.",
            valueName: "address"))
    var qmp: String?

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
        if let qmp {
            _ = try parseAddress(qmp, option: "--qmp")
            if listen != nil {
                throw ValidationError("--listen and --qmp exclude each other: with --qmp, QMP's migrate-incoming names the address")
            }
        } else if let listen {
            _ = try parseAddress(listen, option: "--listen")
        } else {
            throw ValidationError("missing --listen ADDRESS (or --qmp ADDRESS, to take it from QMP's migrate-incoming)")
        }
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

    /// The settings the options give: the same set QMP's `migrate-set-*`
    /// change (`DestinationSettings`).
    var settings: DestinationSettings {
        var s = DestinationSettings()
        s.channels = common.channels
        return s
    }

    /// The process's fixed choices (RAM, guest, key, sizes, timeouts) for
    /// an address, then the settings.
    func config(for address: SocketAddress, settings: DestinationSettings) throws -> DestinationConfig {
        let blocks = try RAMArgument.parse(ram)
        var config = DestinationConfig(address: address, channels: common.channels, ramPath: FilePath(blocks[0].path))
        if blocks[0].name != nil { config.ramBlocks = blocks.map { RAMBlockPath(name: $0.name!, path: FilePath($0.path)) } }
        config.size = size.flatMap(parseSize)
        config.peerTimeout = common.peerTimeoutSeconds
        config.recoverTimeout = common.recoverTimeoutSeconds
        config.faultPathPriority = common.faultPathPriority
        config.guestControl = guest.map { FilePath($0) }
        config.key = try trust.loadKey()
        if let m = maxSize.flatMap(parseSize) { config.maxSize = m }
        config.onWarning = { FileHandleStderr.write("livemig: warning: \($0)\n") }
        config.testStopAt = ProcessInfo.processInfo.environment["LIVEMIG_TEST_STOP_AT"]
        settings.apply(to: &config)
        return config
    }

    func run() throws {
        if let qmp { return try runQMP(qmp) }
        guard let listen else { throw CommandFailure(message: "missing --listen", status: exitUsage) }
        let address = try parseAddress(listen, option: "--listen")
        let config = try config(for: address, settings: settings)
        trust.warnIfExposed(address, role: "listening on")
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

extension ReceiveCommand {
    /// `receive --qmp`: checks what it can before any client speaks (the
    /// key, and that no other process writes the RAM file or receives into
    /// the control file), then serves QMP. The RAM is mapped and the
    /// address bound by `migrate-incoming`, as QEMU's `-incoming defer`.
    func runQMP(_ qmp: String) throws {
        let template = try config(for: .unix(path: "/"), settings: settings)
        try refuseBusyFiles()
        let keyed = trust.pskFile != nil, insecure = trust.insecure
        let controller = DestinationQMP(
            settings: settings, guestPath: guest.map { FilePath($0) },
            makeConfig: { address, settings in
                var c = template
                c.address = address
                settings.apply(to: &c)
                return c
            },
            warnExposed: { TrustOptions.warnIfExposed($0, role: "listening on", keyed: keyed, insecure: insecure) })
        let status = try serveQMP(qmp, role: "receive", controller: controller)
        guard status == 0 else { throw CommandFailure(message: "the last incoming migration did not complete", status: status) }
    }

    /// Refuses at start what `migrate-incoming` would refuse later: a RAM
    /// file another process writes, a control file another receiver holds.
    /// (Only looks; the claims are taken when the migration starts.)
    private func refuseBusyFiles() throws {
        do {
            for block in try RAMArgument.parse(ram) {
                if let holder = try OwnerLock.holder(of: .ramWriter, on: FilePath(block.path)) {
                    throw CommandFailure(
                        message: "RAM file \(block.path) is in use by \(holder.named("a running guest or a receive")); give another path")
                }
            }
            if let guest, let holder = try OwnerLock.holder(of: .receiver, on: FilePath(guest)) {
                throw CommandFailure(message: "control file \(guest) is in use by \(holder.named("livemig receive")); give another path")
            }
        } catch let e as GuestMemoryError {
            throw CommandFailure(message: e.description)
        }
    }
}
