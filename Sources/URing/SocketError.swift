import SystemPackage

/// A socket or ring failure: what was being done, on which address, and the
/// system error. The description is one line for the user.
public struct SocketError: Error, CustomStringConvertible, Sendable {
    public enum Code: Sendable, Equatable {
        /// The peer closed the connection (EOF) or reset it.
        case peerClosed
        /// The address is taken by another program.
        case addressInUse
        /// Nobody listens there.
        case connectionRefused
        /// A deadline passed.
        case timedOut
        /// The address text does not parse.
        case badAddress
        /// io_uring is not available in this process.
        case ringUnavailable
        /// A wait ended because another socket became readable.
        case interrupted
        /// Any other system error.
        case system
    }

    public var code: Code
    public var description: String
    public var errno: Errno?

    public init(_ code: Code, _ description: String, errno: Errno? = nil) {
        self.code = code
        self.description = description
        self.errno = errno
    }

    static func system(_ what: String, _ e: Errno) -> SocketError {
        switch e {
        case .addressInUse:
            SocketError(
                .addressInUse, "\(what): address already in use; choose another address or stop the program that holds it", errno: e)
        case .connectionRefused:
            SocketError(.connectionRefused, "\(what): connection refused; is `livemig receive` listening there?", errno: e)
        case .connectionReset, .brokenPipe: SocketError(.peerClosed, "\(what): the peer closed the connection (\(e))", errno: e)
        case .timedOut, .resourceTemporarilyUnavailable: SocketError(.timedOut, "\(what): timed out", errno: e)
        default: SocketError(.system, "\(what): \(e)", errno: e)
        }
    }
}
