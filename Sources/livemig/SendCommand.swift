import ArgumentParser
import FoundationEssentials
import GuestMemory
import Migration
import SystemPackage
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// `livemig send`: the source side.
struct SendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Migrate a RAM file to a listening `livemig receive`.",
        discussion: "The RAM file is opened read-only: send never writes guest memory, even when it fails."
    )

    @Option(
        help: ArgumentHelp(
            "The guest RAM file to migrate; for a guest of several RAM blocks, NAME=PATH once per block, in the guest's order.",
            valueName: "PATH|NAME=PATH"))
    var ram: [String]

    @Option(help: "Destination address: tcp:HOST:PORT or unix:PATH (with --qmp: from QMP's migrate instead).")
    var to: String?

    @Option(
        help: ArgumentHelp(
            "Serve QMP on unix:PATH or tcp:HOST:PORT (loopback) and migrate when a client says `migrate`, as QEMU does.",
            valueName: "address"))
    var qmp: String?

    @OptionGroup var common: ChannelOptions

    @OptionGroup var trust: TrustOptions

    @Flag(help: "Encrypt page data (AES-256-GCM, keys from the pre-shared key); needs --psk-file.")
    var encrypt = false

    @Flag(help: "Send with plain sendmsg instead of io_uring (for comparison).")
    var noIoUring = false

    @Flag(help: "Send pages with io_uring SENDMSG_ZC and report how many sends the kernel copied anyway.")
    var zerocopy = false

    @Option(help: "Compress normal pages: none, zstd (level 1) or zstd:LEVEL.")
    var compress: String = "none"

    @Option(help: "Migrate a running guest live: its control file (from livemig stress).")
    var guest: String?

    // `.unconditional` on the numeric options: a negative number is a value
    // to refuse in validate() with its range, not an unknown flag.
    @Option(parsing: .unconditional, help: "Switch over when the rest can be sent within this (live only).")
    var downtimeLimit: String = "300ms"

    @Option(
        help:
            "Resume the source guest and fail when the destination has not confirmed within this long after the pause (default: 2 x --downtime-limit, at least 1s; live only)."
    )
    var switchoverTimeout: String?

    @Option(parsing: .unconditional, help: "Rate limit of the page channels during precopy, e.g. 512MiB/s (default unlimited).")
    var maxBandwidth: String?

    @Flag(help: "Throttle the guest when it dirties faster than we send (QEMU's auto-converge).")
    var autoConverge = false

    @Option(parsing: .unconditional, help: "First auto-converge throttle, percent, 1-99 (QEMU cpu-throttle-initial).")
    var throttleInitial: Int = 20

    @Option(parsing: .unconditional, help: "Auto-converge throttle step, percent, 1-99 (QEMU cpu-throttle-increment).")
    var throttleIncrement: Int = 10

    @Option(parsing: .unconditional, help: "Fail when not converged after this many rounds.")
    var maxRounds: Int?

    @Option(parsing: .unconditional, help: "Fail when not converged after this long (e.g. 30s).")
    var timeout: String?

    @Option(help: "Write one JSON line per round to this file (emptied first).")
    var events: String?

    @Flag(
        help: ArgumentHelp(
            "Switch to postcopy after --postcopy-after-rounds precopy rounds, or at once on SIGUSR1 (cutting the round in progress), "
                + "unless precopy converges first; "
                + "the destination needs an incoming guest (livemig stress --incoming) with its RAM on tmpfs."))
    var postcopy = false

    @Option(
        parsing: .unconditional,
        help:
            "With --postcopy: precopy rounds before the switch (default 1; 0: switch before the first page, every page moves by postcopy)."
    )
    var postcopyAfterRounds: Int?

    @Flag(help: .hidden) var noPreempt = false

    func validate() throws {
        _ = try RAMArgument.parse(ram)
        if let qmp {
            _ = try parseAddress(qmp, option: "--qmp")
            if to != nil { throw ValidationError("--to and --qmp exclude each other: with --qmp, QMP's migrate names the destination") }
        } else if to == nil {
            throw ValidationError("missing --to ADDRESS (or --qmp ADDRESS, to take it from QMP's migrate)")
        }
        let address = try to.map { try parseAddress($0, option: "--to") }
        if zerocopy, case .unix? = address {
            // The kernel refuses SENDMSG_ZC on Unix sockets (EOPNOTSUPP).
            throw ValidationError("--zerocopy needs a TCP destination; Unix sockets do not support zero-copy sends")
        }
        if let t = switchoverTimeout {
            guard let d = parseDuration(t), d > 0 else {
                throw ValidationError("--switchover-timeout: '\(t)' is not a positive duration (e.g. 2s)")
            }
            if guest == nil { throw ValidationError("--switchover-timeout applies to live migration: add --guest CONTROL") }
        }
        guard parseDuration(downtimeLimit) != nil else {
            throw ValidationError("--downtime-limit: '\(downtimeLimit)' is not a duration (e.g. 300ms)")
        }
        if let b = maxBandwidth, parseRate(b) == nil || parseRate(b) == 0 {
            throw ValidationError("--max-bandwidth: '\(b)' is not a rate (e.g. 512MiB/s)")
        }
        if let t = timeout, parseDuration(t) == nil { throw ValidationError("--timeout: '\(t)' is not a duration (e.g. 30s)") }
        if let m = maxRounds { try check { () throws(SettingError) in _ = try SettingCheck.maxRounds(Int64(m), "--max-rounds") } }
        if zerocopy, noIoUring { throw ValidationError("--zerocopy needs io_uring; drop --no-io-uring") }
        if encrypt, trust.pskFile == nil {
            throw ValidationError("--encrypt needs --psk-file: the encryption keys come from the pre-shared key")
        }
        _ = try parseCompression(compress)
        try check { () throws(SettingError) in
            _ = try SettingCheck.throttlePercent(Int64(throttleInitial), "--throttle-initial")
            _ = try SettingCheck.throttlePercent(Int64(throttleIncrement), "--throttle-increment")
        }
        if let n = postcopyAfterRounds {
            try check { () throws(SettingError) in _ = try SettingCheck.postcopyAfterRounds(Int64(n), "--postcopy-after-rounds") }
            if !postcopy { throw ValidationError("--postcopy-after-rounds goes with --postcopy") }
        }
        if postcopy, guest == nil {
            throw ValidationError("--postcopy applies to live migration: add --guest CONTROL")
        }
        if guest == nil, autoConverge || maxRounds != nil || timeout != nil || maxBandwidth != nil {
            throw ValidationError(
                "--auto-converge, --max-rounds, --timeout and --max-bandwidth apply to live migration: add --guest CONTROL")
        }
    }

    /// The settings the options give: the same set QMP's `migrate-set-*`
    /// change (`SourceSettings`).
    func settings() throws -> SourceSettings {
        var s = SourceSettings()
        s.channels = common.channels
        s.autoConverge = autoConverge
        s.postcopyRAM = postcopy
        s.zeroCopySend = zerocopy
        s.postcopyPreempt = !noPreempt
        s.downtimeLimit = parseDuration(downtimeLimit)!
        s.switchoverTimeout = switchoverTimeout.flatMap(parseDuration)
        s.maxBandwidth = maxBandwidth.flatMap(parseRate)
        s.throttleInitial = throttleInitial
        s.throttleIncrement = throttleIncrement
        let c = try parseCompression(compress)
        s.compressionMethod = c.method
        if c.method != .none { s.zstdLevel = c.level }
        s.maxRounds = maxRounds
        s.convergeTimeout = timeout.flatMap(parseDuration)
        // With QMP, as in QEMU, postcopy-ram alone switches only on
        // migrate-start-postcopy; on the command line after one round.
        s.postcopyAfterRounds = postcopyAfterRounds ?? (qmp == nil ? 1 : nil)
        return s
    }

    /// The process's fixed choices for a destination (io_uring, key,
    /// timeouts, test hooks), then the settings.
    func config(for address: SocketAddress, settings: SourceSettings) throws -> SourceConfig {
        var config = SourceConfig(address: address, channels: settings.channels)
        config.useRing = !noIoUring
        if let key = try trust.loadKey() { config.trust = TrustSetting(key: key, encrypt: encrypt) }
        config.peerTimeout = common.peerTimeoutSeconds
        config.recoverTimeout = common.recoverTimeoutSeconds
        config.faultPathPriority = common.faultPathPriority
        config.onNotice = { FileHandleStderr.write("livemig: \($0)\n") }
        config.testHoldPause = ProcessInfo.processInfo.environment["LIVEMIG_TEST_HOLD_PAUSE"].flatMap(Double.init)
        config.testStopAt = ProcessInfo.processInfo.environment["LIVEMIG_TEST_STOP_AT"]
        settings.apply(to: &config)
        return config
    }

    /// Opens the guest's control file and takes its source byte, held
    /// until this process exits: one source per guest.
    func openGuest() throws -> (GuestControl?, OwnerLock?) {
        guard let guest else { return (nil, nil) }
        do {
            let control = try GuestControl(path: FilePath(guest))
            let lock = try OwnerLock.acquire(.source, on: FilePath(guest)) { holder in
                "the guest in \(guest) is already being migrated by \(holder.named("livemig send")); "
                    + "wait for that migration to end or stop it"
            }
            return (control, lock)
        } catch {
            throw CommandFailure(message: error.description)
        }
    }

    func run() throws {
        let file: RAMFile
        let blocks = try RAMArgument.parse(ram)
        do {
            // Read-only and unlocked: sending never writes the RAM, and a
            // running guest holds its writer lock.
            file = try openRAM(blocks, access: .readOnly)
            for b in blocks { try IncompleteMark.refuseMarked(FilePath(b.path)) }
        } catch {
            throw CommandFailure(message: error.description)
        }
        if let qmp {
            let (control, sourceLock) = try openGuest()
            let settings = try settings()
            let template = try config(for: .unix(path: "/"), settings: settings)
            let keyed = trust.pskFile != nil, insecure = trust.insecure
            // --events: every migration's rounds, one after the other.
            let eventLog = try events.map { try EventLog(path: $0) }
            let controller = SourceQMP(
                ram: file, guest: control, useRing: !noIoUring, settings: settings,
                makeConfig: { address, settings in
                    var c = template
                    c.address = address
                    settings.apply(to: &c)
                    return c
                },
                makeSource: { config, onRound in
                    SourceMigration(ram: file, config: config, guest: control) { record in
                        eventLog?.append(record)
                        onRound(record)
                    }
                },
                warnExposed: { TrustOptions.warnIfExposed($0, role: "sending to", keyed: keyed, insecure: insecure) })
            let status = try withExtendedLifetime(sourceLock) {
                try serveQMP(qmp, role: "send", controller: controller) { controller.startPostcopyFromSignal() }
            }
            guard status == 0 else { throw CommandFailure(message: "the last migration did not complete", status: status) }
            return
        }
        guard let to else { throw CommandFailure(message: "missing --to", status: exitUsage) }
        let address = try parseAddress(to, option: "--to")
        let config = try config(for: address, settings: settings())
        trust.warnIfExposed(address, role: "sending to")
        let (control, sourceLock) = try openGuest()
        let eventLog = try events.map { try EventLog(path: $0) }
        var onRound: (@Sendable (RoundRecord) -> Void)?
        if let log = eventLog { onRound = { log.append($0) } }
        let source = SourceMigration(ram: file, config: config, guest: control, onRound: onRound)
        var switchNow: (@Sendable () -> Void)?
        if postcopy { switchNow = { @Sendable in source.startPostcopy() } }
        let signals = SignalWatch(user1: switchNow) { source.cancel($0) }
        let progress = ProgressLine.start(
            role: "send", ram: { (file.block.size, file.block.pageSize) }, counters: source.counters,
            live: control == nil ? nil : source.progress)
        let result: Result<MigrationStats, MigrationError>
        do throws(MigrationError) {
            result = .success(try withExtendedLifetime(sourceLock) { () throws(MigrationError) in try source.run() })
        } catch {
            result = .failure(error)
        }
        progress?.finish()
        signals.end()
        for w in source.warnings.withLock({ $0 }) { FileHandleStderr.write("livemig: warning: \(w)\n") }
        switch result {
        case .success(let stats):
            printStats(stats, format: common.format, role: "send")
            // Staged batches map nothing: only pages read in place (live
            // rounds' scattered ones) left page-table entries behind.
            let inPlace = source.counters.read(source.counters.pagesReadInPlace)
            dropPageTablesBeforeExit(file, touchedBytes: inPlace * file.block.pageSize)
        case .failure(let e) where source.postcopyPaused:
            if common.format == .json { printStats(MigrationStats(failedPostcopy: e), format: .json, role: "send") }
            throw CommandFailure(message: "migration to \(address) failed after the postcopy switch: \(e.description)")
        case .failure(let e):
            let kept =
                control.map(guestAfterFailure)
                ?? (ram.count == 1
                    ? "The source RAM file \(ram[0]) was not modified."
                    : "The source RAM files (\(ram.joined(separator: ", "))) were not modified.")
            throw CommandFailure(message: "migration to \(address) failed: \(e.description). \(kept)")
        }
    }
}

/// Runs a setting check of `SettingCheck` as a usage error.
private func check(_ body: () throws(SettingError) -> Void) throws {
    do {
        try body()
    } catch {
        throw ValidationError(error.description)
    }
}

/// What became of the source guest after a failed live migration, read
/// from its control file rather than assumed: the source lifted its pause
/// and throttle (if it had set them) and never writes guest RAM, but the
/// guest may have been stopped, migrated or held by another source already.
func guestAfterFailure(_ g: GuestControl) -> String {
    let pid = g.guestPID
    let alive = pid > 0 && (kill(pid, 0) == 0 || errno == EPERM)
    switch g.runState {
    case .running where alive && g.guestThreads > 0:
        return "The guest keeps running on the source (pid \(pid)) with its RAM intact."
    case .running:
        return "The guest's RAM was not modified; the guest is not running (it may be resumed with livemig stress --resume)."
    case .pauseRequested:
        return "The guest's RAM was not modified; it is held paused by another migration (source pid \(g.sourcePID))."
    case .handedOver:
        return
            "The guest is stopped here and its RAM and state are intact, but it was handed over: the destination may have committed it. "
            + "If `livemig receive` exited 0 there, the guest lives on the destination; if it failed, take the guest back here with "
            + "`livemig stress --resume --reclaim`."
    case .migrated, .incoming, .incomplete, .waitingIncoming:
        return "The guest's RAM was not modified; its control file says '\(g.runState)'."
    }
}

/// Parses `--compress`: `none`, `zstd` or `zstd:LEVEL`, LEVEL in the range
/// the linked libzstd accepts. A usage error otherwise.
func parseCompression(_ text: String) throws -> CompressionSetting {
    let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
    switch parts[0] {
    case "none" where parts.count == 1: return .none
    case "zstd":
        guard parts.count == 2 else { return CompressionSetting(method: .zstd) }
        if let n = Int64(parts[1]) {
            // One check for --compress and QMP's multifd-zstd-level.
            do {
                return CompressionSetting(method: .zstd, level: try SettingCheck.zstdLevel(n, "--compress"))
            } catch {
                throw ValidationError(error.description)
            }
        }
        let levels = Zstd.levels
        guard let level = Int32(parts[1]), levels.contains(level) else {
            throw ValidationError(
                "--compress: '\(parts[1])' is not a zstd level; this libzstd (\(Zstd.version)) takes \(levels.lowerBound) to \(levels.upperBound) (default \(Zstd.defaultLevel))"
            )
        }
        return CompressionSetting(method: .zstd, level: level)
    default:
        throw ValidationError("--compress: '\(text)' is not a method; use none, zstd or zstd:LEVEL")
    }
}
