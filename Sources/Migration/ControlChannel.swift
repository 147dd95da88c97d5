import MigrationWire
import URing

/// The main channel: framed `MainMessage`s over one socket.
///
/// One thread sends and one thread receives (they may differ); the socket
/// itself is safe to share for that.
public final class ControlChannel: Sendable {
    public let socket: Socket
    private let counters: TransferCounters?

    public init(socket: Socket, counters: TransferCounters? = nil) {
        self.socket = socket
        self.counters = counters
    }

    public func send(_ message: MainMessage) throws(MigrationError) {
        let bytes = message.encoded()
        do {
            try socket.sendAll(bytes)
        } catch {
            throw MigrationError(error)
        }
        counters?.add(counters!.mainBytes, UInt64(bytes.count))
    }

    /// Reads the next message; `what` names the wait for error messages.
    public func receive(_ what: String) throws(MigrationError) -> MainMessage {
        do {
            let head = try socket.receiveBytes(MainMessage.frameHeaderSize, what: what)
            let frame = try head.withUnsafeBytes { try MainMessage.decodeFrameHeader($0) }
            let payload = try socket.receiveBytes(frame.length, what: what)
            counters?.add(counters!.mainBytes, UInt64(MainMessage.frameHeaderSize + frame.length))
            return try payload.withUnsafeBytes { try MainMessage.decode(type: frame.type, payload: $0) }
        } catch let e as SocketError {
            throw MigrationError(e)
        } catch let e as WireError {
            throw MigrationError(e)
        } catch {
            throw MigrationError(.local, "\(error)")
        }
    }
}
