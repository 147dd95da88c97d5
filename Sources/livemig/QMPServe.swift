import QMP
import URing

/// What `send --qmp` and `receive --qmp` have in common for `serveQMP`.
protocol QMPController: Sendable {
    var commands: [QMPCommand] { get }
    var events: EventSink { get }
    /// Cancels a running migration (a signal).
    func cancel(_ reason: String)
    /// Ends every thread of the controller; the exit status.
    func finish() -> Int32
}

extension SourceQMP: QMPController {}

/// The version in the greeting and `query-version`: the QEMU release whose
/// QMP migration commands livemig follows (qapi/migration.json of 9.2).
let livemigQMPVersion = QMPVersion(major: 9, minor: 2, micro: 0, package: "livemig")

/// Serves QMP on `text` until a client says `quit` or SIGINT/SIGTERM
/// arrives (which also cancels a running migration, as without QMP);
/// returns the exit status. `user1`: SIGUSR1's action (`send`: switch to
/// postcopy, as `migrate-start-postcopy`).
func serveQMP(_ text: String, role: String, controller: some QMPController, user1: (@Sendable () -> Void)? = nil) throws -> Int32 {
    let address = try parseAddress(text, option: "--qmp")
    let server: QMPServer
    do {
        server = try QMPServer(address: address, version: livemigQMPVersion, commands: controller.commands)
    } catch {
        throw CommandFailure(message: error.desc)
    }
    controller.events.attach(server)
    let signals = SignalWatch(user1: user1) { reason in
        controller.cancel(reason)
        server.requestQuit()
    }
    server.start()
    let shown = server.boundPort.map { port -> String in
        guard case .tcp(let host, _) = address else { return address.description }
        return "tcp:\(host):\(port)"
    }
    FileHandleStderr.write("livemig: \(role): QMP listening on \(shown ?? address.description)\n")
    server.waitForQuit()
    let status = controller.finish()
    signals.end()
    server.close()
    return status
}
