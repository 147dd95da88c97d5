import GuestMemory
import MigrationWire
import Trust
import URing

/// Why a migration stopped. One line for the user: what failed, with values,
/// and what to do.
public struct MigrationError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// Something on this side failed (memory, socket, ring).
        case local
        /// The peer reported an error or vanished.
        case peer
        /// The peer sent bytes that break the protocol.
        case protocolViolation
        /// A checksum or MAC did not verify: bytes were corrupted in transit,
        /// or tampered with, replayed or reordered.
        case integrity
        /// The bytes on both sides are fine but do not fit (sizes, counts).
        case mismatch
        /// A deadline passed.
        case timeout
        /// The user (or a signal) cancelled it.
        case cancelled
    }

    public var kind: Kind
    public var description: String

    public init(_ kind: Kind, _ description: String) {
        self.kind = kind
        self.description = description
    }

    public init(_ e: SocketError) {
        switch e.code {
        case .peerClosed: self.init(.peer, e.description)
        case .timedOut: self.init(.timeout, e.description)
        default: self.init(.local, e.description)
        }
    }

    public init(_ e: WireError) { self.init(.protocolViolation, e.description) }
    public init(_ e: GuestMemoryError) { self.init(.local, e.description) }
    public init(_ e: TrustError) { self.init(.local, e.description) }

    /// Converts whatever a mixed `do` block threw (sockets, wire, memory).
    public init(converting error: any Error) {
        switch error {
        case let e as MigrationError: self = e
        case let e as SocketError: self.init(e)
        case let e as WireError: self.init(e)
        case let e as GuestMemoryError: self.init(e)
        case let e as TrustError: self.init(e)
        default: self.init(.local, "\(error)")
        }
    }
}
