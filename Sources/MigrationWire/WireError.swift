/// A wire-format violation: which message, which field, the value seen and
/// why it is wrong. Raised before any guest memory is touched.
public struct WireError: Error, CustomStringConvertible, Equatable, Sendable {
    /// What was being read: "channel hello", "multifd packet", "main message".
    public var message: String
    /// The field, with the names docs/PROTOCOL.md uses ("magic", "normal-count").
    public var field: String
    /// The value received, as text (hex for magic numbers and offsets).
    public var value: String
    /// Why the value is wrong.
    public var reason: String

    public init(message: String, field: String, value: String, reason: String) {
        self.message = message
        self.field = field
        self.value = value
        self.reason = reason
    }

    public var description: String { "\(message): field '\(field)' is \(value): \(reason)" }
}

@inlinable func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }
