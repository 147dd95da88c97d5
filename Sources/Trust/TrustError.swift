/// A key that cannot be used, a proof or tag that does not verify. The
/// description says what failed, with the values, and what to do.
public struct TrustError: Error, CustomStringConvertible, Equatable, Sendable {
    public var description: String

    public init(_ description: String) { self.description = description }
}
