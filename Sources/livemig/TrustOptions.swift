import ArgumentParser
import Migration
import Trust
import URing

/// `--psk-file` and `--insecure`, shared by `send` and `receive`.
struct TrustOptions: ParsableArguments {
    @Option(help: "Pre-shared key file (from `livemig keygen`): both sides prove it, and every frame and packet carries a MAC.")
    var pskFile: String?

    @Flag(help: "Do not warn about a migration over a non-loopback network without a key.")
    var insecure = false

    /// Loads the key, if one was given, as a command failure when it cannot be used.
    func loadKey() throws -> PreSharedKey? {
        guard let pskFile else { return nil }
        do {
            return try PreSharedKey.load(path: pskFile)
        } catch {
            throw CommandFailure(message: error.description)
        }
    }

    /// Warns loudly when RAM would cross a network that is not this host's
    /// without a key: anyone who reaches the port could then write (or
    /// read) guest memory.
    func warnIfExposed(_ address: SocketAddress, role: String) {
        Self.warnIfExposed(address, role: role, keyed: pskFile != nil, insecure: insecure)
    }

    /// The same, for a later address (QMP's `migrate`, `migrate-incoming`).
    static func warnIfExposed(_ address: SocketAddress, role: String, keyed: Bool, insecure: Bool) {
        guard !keyed, !insecure, !address.isLoopback else { return }
        FileHandleStderr.write(
            "livemig: WARNING: \(role) \(address) without a pre-shared key: any host that reaches it can "
                + (role == "listening on" ? "write this guest's RAM" : "pose as the destination and read the guest's RAM")
                + ". Use --psk-file FILE on both sides (`livemig keygen FILE` makes one), or --insecure to silence this.\n")
    }
}

/// `livemig keygen FILE`: writes a new pre-shared key.
struct KeygenCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keygen",
        abstract: "Write a new random pre-shared key (32 bytes, as hex) for --psk-file.",
        discussion: "The file is created with mode 0600 and never overwritten. Copy it to the other host over a channel you trust."
    )

    @Argument(help: "Where to write the key.") var file: String

    func run() throws {
        do {
            try PreSharedKey.generate(path: file)
        } catch {
            throw CommandFailure(message: error.description)
        }
        print("livemig: wrote a new pre-shared key to \(file) (mode 0600)")
    }
}
