import ArgumentParser
import GuestMemory
import Migration
import SystemPackage
import URing

/// `livemig send`: the source side.
struct SendCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "send",
        abstract: "Migrate a RAM file to a listening `livemig receive`.",
        discussion: "The RAM file is opened read-only: send never writes guest memory, even when it fails."
    )

    @Option(help: "The guest RAM file to migrate.")
    var ram: String

    @Option(help: "Destination address: tcp:HOST:PORT or unix:PATH.")
    var to: String

    @OptionGroup var common: ChannelOptions

    @Flag(help: "Send with plain sendmsg instead of io_uring (for comparison).")
    var noIoUring = false

    func validate() throws {
        _ = try parseAddress(to, option: "--to")
    }

    func run() throws {
        let address = try parseAddress(to, option: "--to")
        let file: RAMFile
        do {
            file = try RAMFile(path: FilePath(ram), access: .readOnly)
        } catch {
            throw CommandFailure(message: error.description)
        }
        var config = SourceConfig(address: address, channels: common.channels)
        config.useRing = !noIoUring
        let source = SourceMigration(ram: file, config: config)
        let signals = watchSignals { source.cancel($0) }
        let progress = ProgressLine.start(role: "send", total: { file.block.size }, counters: source.counters)
        let result: Result<MigrationStats, MigrationError>
        do {
            result = .success(try source.run())
        } catch {
            result = .failure(error)
        }
        progress?.finish()
        _ = signals
        for w in source.warnings.withLock({ $0 }) { FileHandleStderr.write("livemig: warning: \(w)\n") }
        switch result {
        case .success(var stats):
            stats.sendMechanism = config.useRing ? (source.warnings.withLock { $0.isEmpty } ? "io_uring" : "plain sendmsg") : "plain sendmsg"
            printStats(stats, format: common.format, role: "send")
        case .failure(let e):
            throw CommandFailure(
                message: "migration to \(address) failed: \(e.description). The source RAM file \(ram) was not modified.")
        }
    }
}
