import Synchronization

/// Running totals shared between the threads that move pages and whoever
/// shows progress. Relaxed: they are statistics, not hand-offs.
public final class TransferCounters: Sendable {
    /// Bytes written to (or read from) multifd sockets: headers, offsets, pages.
    public let multifdBytes = Atomic<UInt64>(0)
    /// Pages sent with their data.
    public let normalPages = Atomic<UInt64>(0)
    /// Pages sent as zero-page offsets only.
    public let zeroPages = Atomic<UInt64>(0)
    /// Page packets (SYNC packets not counted).
    public let packets = Atomic<UInt64>(0)
    /// Bytes on the main channel.
    public let mainBytes = Atomic<UInt64>(0)
    /// Normal pages that travelled compressed (part of `normalPages`).
    public let compressedPages = Atomic<UInt64>(0)
    /// Payload bytes of compressed packets: what those pages took on the wire.
    public let compressedBytes = Atomic<UInt64>(0)
    /// Source: pages read through the mapping (in place), not staged by
    /// pread. Only these left page-table entries to tear down.
    public let pagesReadInPlace = Atomic<UInt64>(0)

    public init() {}

    @inlinable public func add(_ counter: borrowing Atomic<UInt64>, _ n: UInt64) {
        counter.add(n, ordering: .relaxed)
    }

    public func read(_ counter: borrowing Atomic<UInt64>) -> UInt64 { counter.load(ordering: .relaxed) }
}
