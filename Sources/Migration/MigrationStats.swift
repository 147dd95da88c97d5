import GuestMemory
import MigrationWire

/// Statistics in QEMU `query-migrate` terms (docs/ARCHITECTURE.md). Times are in
/// milliseconds, sizes in bytes, `mbps` in megabits per second, as QEMU.
public struct MigrationStats: Encodable, Sendable {
    public enum Status: String, Encodable, Sendable {
        case setup, active, completed, failed, cancelled
        /// After the point of no return: the destination's guest runs and
        /// pulls the pages it still misses.
        case postcopyActive = "postcopy-active"
        /// Postcopy failed after the point of no return: neither side can go
        /// on alone; the source keeps RAM and state, the guest's missing
        /// pages wait.
        case postcopyPaused = "postcopy-paused"
    }

    public var status: Status
    public var totalTime: UInt64 = 0
    public var setupTime: UInt64 = 0
    public var downtime: UInt64?
    public var expectedDowntime: UInt64?
    public var cpuThrottlePercentage: Int?
    public var ram = RAMStats()
    /// Multifd channels used.
    public var channels = 0
    /// How the sender channels wrote ("io_uring", "plain sendmsg").
    public var sendMechanism: String?
    /// With --zerocopy: zero-copy sends made, and how many the kernel
    /// copied anyway (on loopback: all of them).
    public var zeroCopySends: UInt64?
    public var zeroCopyCopied: UInt64?
    /// With `--compress`: what compression did (QEMU's `compression` names).
    public var compression: CompressionStats?
    /// After a switch to postcopy: requests, bytes, and on the destination
    /// the fault costs (`PostcopyFaultLog`).
    public var postcopy: PostcopyStats?
    public var errorDesc: String?

    public init(status: Status) { self.status = status }

    /// The report of a migration that failed after the postcopy commit.
    public init(failedPostcopy error: MigrationError) {
        status = .postcopyPaused
        errorDesc = error.description
    }

    /// Fills the totals both ends report alike from their counters.
    mutating func fillTransfer(_ counters: TransferCounters, block: RAMBlock, channels: Int, elapsed: Double) {
        totalTime = UInt64(elapsed * 1000)
        self.channels = channels
        ram.total = block.size
        ram.pageSize = block.pageSize
        ram.normal = counters.read(counters.normalPages)
        ram.duplicate = counters.read(counters.zeroPages)
        ram.normalBytes = ram.normal * block.pageSize
        ram.multifdBytes = counters.read(counters.multifdBytes)
        ram.transferred = ram.multifdBytes + counters.read(counters.mainBytes)
        ram.computeRates(seconds: elapsed)
    }

    /// Fills `compression` from the counters, when the migration compressed.
    mutating func fillCompression(_ counters: TransferCounters, method: CompressionMethod, level: Int32?, pageSize: UInt64) {
        guard method != .none else { return }
        var c = CompressionStats(method: method.description, level: level.map(Int.init))
        c.pages = counters.read(counters.compressedPages)
        c.compressedSize = counters.read(counters.compressedBytes)
        c.compressionRate = c.compressedSize > 0 ? Double(c.pages * pageSize) / Double(c.compressedSize) : 0
        compression = c
    }

    enum CodingKeys: String, CodingKey {
        case status, ram, channels, downtime
        case totalTime = "total-time"
        case setupTime = "setup-time"
        case expectedDowntime = "expected-downtime"
        case cpuThrottlePercentage = "cpu-throttle-percentage"
        case sendMechanism = "send-mechanism"
        case zeroCopySends = "zerocopy-sends"
        case zeroCopyCopied = "zerocopy-copied"
        case compression
        case postcopy
        case errorDesc = "error-desc"
    }
}

/// The `ram` part of `query-migrate`.
public struct RAMStats: Encodable, Sendable {
    /// Bytes moved over all channels (main + multifd).
    public var transferred: UInt64 = 0
    /// Dirty bytes not yet sent.
    public var remaining: UInt64 = 0
    /// Guest RAM size.
    public var total: UInt64 = 0
    /// Zero pages (sent as offsets only).
    public var duplicate: UInt64 = 0
    /// Pages sent with data.
    public var normal: UInt64 = 0
    public var normalBytes: UInt64 = 0
    public var dirtyPagesRate: UInt64 = 0
    public var mbps: Double = 0
    public var dirtySyncCount: UInt64 = 0
    public var pagesPerSecond: UInt64 = 0
    public var precopyBytes: UInt64 = 0
    public var downtimeBytes: UInt64 = 0
    public var multifdBytes: UInt64 = 0
    public var pageSize: UInt64 = 0

    public init() {}

    enum CodingKeys: String, CodingKey {
        case transferred, remaining, total, duplicate, normal, mbps
        case normalBytes = "normal-bytes"
        case dirtyPagesRate = "dirty-pages-rate"
        case dirtySyncCount = "dirty-sync-count"
        case pagesPerSecond = "pages-per-second"
        case precopyBytes = "precopy-bytes"
        case downtimeBytes = "downtime-bytes"
        case multifdBytes = "multifd-bytes"
        case pageSize = "page-size"
    }

    /// Fills the rate fields from the totals and the elapsed seconds.
    public mutating func computeRates(seconds: Double) {
        guard seconds > 0 else { return }
        mbps = Double(transferred) * 8 / 1e6 / seconds
        pagesPerSecond = UInt64(Double(normal + duplicate) / seconds)
    }
}

/// The `compression` part of the statistics, with the names of QEMU's
/// `CompressionStats` (`pages`, `compressed-size`, `compression-rate`), plus
/// the method and, on the source, the level.
public struct CompressionStats: Encodable, Sendable {
    /// "zstd".
    public var method: String
    /// The zstd level (source only: the destination does not learn it).
    public var level: Int?
    /// Normal pages that travelled compressed.
    public var pages: UInt64 = 0
    /// Bytes those pages took on the wire (payloads only, no headers).
    public var compressedSize: UInt64 = 0
    /// Uncompressed bytes ÷ compressed bytes of those pages.
    public var compressionRate: Double = 0

    public init(method: String, level: Int?) {
        self.method = method
        self.level = level
    }

    enum CodingKeys: String, CodingKey {
        case method, level, pages
        case compressedSize = "compressed-size"
        case compressionRate = "compression-rate"
    }
}
