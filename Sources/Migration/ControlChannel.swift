import MigrationWire
import Synchronization
import Trust
import URing

/// The main channel: framed `MainMessage`s over one socket, each followed by
/// a 16-byte tag over the frame and its per-direction sequence number: an
/// XXH3-128 checksum, or with a pre-shared key an HMAC (`FrameSealer`,
/// docs/PROTOCOL.md §3). A frame whose tag does not verify is refused before
/// it is decoded, so a corrupted, forged, replayed, reordered or dropped
/// frame ends the migration.
///
/// One thread receives; sends are serialised by a lock because a failure
/// waker may send the final error frame from any thread.
public final class ControlChannel: Sendable {
    public let socket: Socket
    private let counters: TransferCounters?
    private let outgoing: Mutex<FrameSealer>
    private let incoming: Mutex<FrameSealer>

    /// `keys` from the channel's hello, nil without a pre-shared key;
    /// `isSource` picks which key seals which direction.
    init(socket: Socket, counters: TransferCounters? = nil, keys: ChannelKeys?, isSource: Bool) {
        self.socket = socket
        self.counters = counters
        let send = isSource ? keys?.toDestination : keys?.toSource
        let receive = isSource ? keys?.toSource : keys?.toDestination
        outgoing = Mutex(FrameSealer(key: send))
        incoming = Mutex(FrameSealer(key: receive))
    }

    /// The frame with its tag, as it goes on the wire (the sequence moves on).
    private func sealed(_ message: MainMessage, into sealer: inout FrameSealer) -> [UInt8] {
        var bytes = message.encoded()
        let tag = bytes.withUnsafeBytes { sealer.tag($0) }
        bytes.append(contentsOf: tag)
        return bytes
    }

    public func send(_ message: MainMessage) throws(MigrationError) {
        let failure: SocketError? = outgoing.withLock { sealer in
            let bytes = sealed(message, into: &sealer)
            do throws(SocketError) {
                try socket.sendAll(bytes)
                counters?.add(counters!.mainBytes, UInt64(bytes.count))
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw MigrationError(failure) }
    }

    /// Tells the peer why we stop: an error frame, sent without blocking
    /// (a peer that does not read must not hold our failure path).
    /// Skipped when another send holds the channel: a failure path must
    /// never wait for a peer that stopped reading.
    public func sendErrorBestEffort(_ error: MigrationError) {
        _ = outgoing.withLockIfAvailable { sealer in
            socket.sendNonBlocking(sealed(.error(error.description), into: &sealer))
        }
    }

    /// Reads the next message; `what` names the wait for error messages.
    public func receive(_ what: String) throws(MigrationError) -> MainMessage {
        do {
            let head = try socket.receiveBytes(MainMessage.frameHeaderSize, what: what)
            let frame = try head.withUnsafeBytes { try MainMessage.decodeFrameHeader($0) }
            let rest = try socket.receiveBytes(frame.length + MainMessage.frameTagSize, what: what)
            counters?.add(counters!.mainBytes, UInt64(MainMessage.frameHeaderSize + rest.count))
            let whole = head + rest[..<frame.length]
            let (expected, sequence, keyed) = incoming.withLock { s in
                let seq = s.sequence
                return (whole.withUnsafeBytes { s.tag($0) }, seq, s.authenticated)
            }
            guard HelloProof.matches(Array(rest[frame.length...]), expected) else {
                throw MigrationError(
                    .integrity,
                    keyed
                        ? "main-channel frame \(sequence) (\(MainMessage.name(type: frame.type))) fails its MAC: it was tampered with, replayed or reordered, or does not come from the peer that proved the key"
                        : "main-channel frame \(sequence) (\(MainMessage.name(type: frame.type))) fails its checksum: it was corrupted in transit"
                )
            }
            return try rest.withUnsafeBytes {
                try MainMessage.decode(type: frame.type, payload: UnsafeRawBufferPointer(rebasing: $0[..<frame.length]))
            }
        } catch {
            throw MigrationError(converting: error)
        }
    }
}
