import SystemPackage

/// A failure to open, size or map guest memory. The description says what
/// failed, with the values, and what the user can do.
public struct GuestMemoryError: Error, CustomStringConvertible, Equatable {
    /// What went wrong, in one sentence with the values.
    public var description: String
    /// The system error behind it, when there is one.
    public var errno: Errno?

    public init(_ description: String, errno: Errno? = nil) {
        self.description = description
        self.errno = errno
    }
}
