import MigrationWire
import Synchronization
import URing

/// The main channel: framed `MainMessage`s over one socket.
///
/// One thread receives; sends are serialised by a lock because a failure
/// waker may send the final error frame from any thread.
public final class ControlChannel: Sendable {
    public let socket: Socket
    private let counters: TransferCounters?
    private let sendLock = Mutex<Void>(())

    public init(socket: Socket, counters: TransferCounters? = nil) {
        self.socket = socket
        self.counters = counters
    }

    public func send(_ message: MainMessage) throws(MigrationError) {
        let bytes = message.encoded()
        let failure: SocketError? = sendLock.withLock { _ in
            do throws(SocketError) {
                try socket.sendAll(bytes)
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw MigrationError(failure) }
        counters?.add(counters!.mainBytes, UInt64(bytes.count))
    }

    /// Tells the peer why we stop: an error frame, sent without blocking
    /// (a peer that does not read must not hold our failure path).
    /// Skipped when another send holds the channel: a failure path must
    /// never wait for a peer that stopped reading.
    public func sendErrorBestEffort(_ error: MigrationError) {
        let bytes = MainMessage.error(error.description).encoded()
        _ = sendLock.withLockIfAvailable { _ in socket.sendNonBlocking(bytes) }
    }

    /// Reads the next message; `what` names the wait for error messages.
    public func receive(_ what: String) throws(MigrationError) -> MainMessage {
        do {
            let head = try socket.receiveBytes(MainMessage.frameHeaderSize, what: what)
            let frame = try head.withUnsafeBytes { try MainMessage.decodeFrameHeader($0) }
            let payload = try socket.receiveBytes(frame.length, what: what)
            counters?.add(counters!.mainBytes, UInt64(MainMessage.frameHeaderSize + frame.length))
            return try payload.withUnsafeBytes { try MainMessage.decode(type: frame.type, payload: $0) }
        } catch {
            throw MigrationError(converting: error)
        }
    }
}
