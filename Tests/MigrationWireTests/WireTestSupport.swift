import MigrationWire
import TestSupport
import Testing

/// Runs `body`, requires it to throw a `WireError` for `field`, and checks the
/// error's text mentions `value` (the bad value seen on the wire).
@discardableResult
func expectWireError(
    field: String, value: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) -> WireError? {
    let error = #expect(throws: WireError.self, sourceLocation: sourceLocation) { try body() }
    guard let error else { return nil }
    #expect(error.field == field, "wrong field in: \(error)", sourceLocation: sourceLocation)
    #expect(error.value == value, "wrong value in: \(error)", sourceLocation: sourceLocation)
    #expect(error.description.contains(value), "value missing from: \(error)", sourceLocation: sourceLocation)
    #expect(error.description.contains("'\(field)'"), "field missing from: \(error)", sourceLocation: sourceLocation)
    return error
}

extension Array where Element == UInt8 {
    /// A copy with the big-endian u32 at `offset` replaced.
    func settingU32(_ value: UInt32, at offset: Int) -> [UInt8] {
        var copy = self
        Swift.withUnsafeBytes(of: value.bigEndian) { copy.replaceSubrange(offset..<offset + 4, with: $0) }
        return copy
    }

    /// A copy with the big-endian u16 at `offset` replaced.
    func settingU16(_ value: UInt16, at offset: Int) -> [UInt8] {
        var copy = self
        Swift.withUnsafeBytes(of: value.bigEndian) { copy.replaceSubrange(offset..<offset + 2, with: $0) }
        return copy
    }

    /// A copy with the big-endian u64 at `offset` replaced.
    func settingU64(_ value: UInt64, at offset: Int) -> [UInt8] {
        var copy = self
        Swift.withUnsafeBytes(of: value.bigEndian) { copy.replaceSubrange(offset..<offset + 8, with: $0) }
        return copy
    }
}

/// Big-endian bytes of `v`.
func be<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    withUnsafeBytes(of: v.bigEndian) { Array($0) }
}

/// Runs `body` over the bytes of `bytes`, keeping `body`'s typed error
/// (`Array.withUnsafeBytes` only rethrows `any Error`).
func withBytes<R>(
    _ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) throws(WireError) -> R
) throws(WireError) -> R {
    let result = bytes.withUnsafeBytes { raw in
        Result { () throws(WireError) -> R in try body(raw) }
    }
    return try result.get()
}
