/// Big-endian integer stores into a raw buffer; every integer on the wire is
/// big-endian (network order).
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { append(v.bigEndian) }
    public mutating func u32(_ v: UInt32) { append(v.bigEndian) }
    public mutating func u64(_ v: UInt64) { append(v.bigEndian) }
    public mutating func raw(_ v: some Sequence<UInt8>) { bytes.append(contentsOf: v) }

    private mutating func append<T: FixedWidthInteger>(_ v: T) {
        withUnsafeBytes(of: v) { bytes.append(contentsOf: $0) }
    }
}

/// Big-endian reads from a byte buffer that throw a `WireError` naming the
/// field when the buffer is too short.
public struct ByteReader {
    let bytes: UnsafeRawBufferPointer
    let message: String
    public private(set) var position = 0

    public init(_ bytes: UnsafeRawBufferPointer, message: String) {
        self.bytes = bytes
        self.message = message
    }

    public var remaining: Int { bytes.count - position }

    public mutating func u8(_ field: String) throws(WireError) -> UInt8 { try read(field) }
    public mutating func u16(_ field: String) throws(WireError) -> UInt16 { UInt16(bigEndian: try read(field)) }
    public mutating func u32(_ field: String) throws(WireError) -> UInt32 { UInt32(bigEndian: try read(field)) }
    public mutating func u64(_ field: String) throws(WireError) -> UInt64 { UInt64(bigEndian: try read(field)) }

    public mutating func raw(_ count: Int, _ field: String) throws(WireError) -> [UInt8] {
        guard count <= remaining else { throw truncated(field, need: count) }
        defer { position += count }
        return Array(bytes[position..<position + count])
    }

    private mutating func read<T: FixedWidthInteger>(_ field: String) throws(WireError) -> T {
        let n = MemoryLayout<T>.size
        guard n <= remaining else { throw truncated(field, need: n) }
        defer { position += n }
        return bytes.loadUnaligned(fromByteOffset: position, as: T.self)
    }

    private func truncated(_ field: String, need: Int) -> WireError {
        WireError(
            message: message, field: field, value: "missing",
            reason: "the message ends \(remaining) bytes before it, \(need) needed")
    }
}
