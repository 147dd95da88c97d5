// A stand-in for the GuestMemory module, for the stress-state fuzz target
// only: StressState.decode needs nothing of GuestMemory but this error type.
// The real one (Sources/GuestMemory/GuestMemoryError.swift) also carries an
// Errno from swift-system, which the decoder never sets.

/// The error StressState.decode reports.
public struct GuestMemoryError: Error, CustomStringConvertible, Equatable {
    public var description: String

    public init(_ description: String) { self.description = description }
}
