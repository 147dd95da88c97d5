/// How the normal pages of a migration travel on the multifd channels. The
/// source announces it in the main hello; every page packet then follows it
/// (docs/PROTOCOL.md §2 and §4).
public enum CompressionMethod: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    /// Pages travel as they are: `payload-size` = normal-count × page size.
    case none = 0
    /// The normal pages of each packet travel as one zstd frame.
    case zstd = 1

    public var description: String {
        switch self {
        case .none: "none"
        case .zstd: "zstd"
        }
    }

    /// The names of every method, for error texts: "0 (none), 1 (zstd)".
    static var knownList: String { allCases.map { "\($0.rawValue) (\($0))" }.joined(separator: ", ") }

    /// The largest payload a packet may carry for `size` bytes of normal
    /// pages. For zstd this is libzstd's `ZSTD_COMPRESSBOUND(size)`, written
    /// out here because it is part of the wire format: a peer needs no
    /// libzstd to check it.
    @inlinable public func payloadBound(_ size: UInt64) -> UInt64 {
        switch self {
        case .none: return size
        case .zstd:
            let small: UInt64 = 128 << 10
            return size + (size >> 8) + (size < small ? (small - size) >> 11 : 0)
        }
    }
}
