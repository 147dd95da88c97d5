import GuestMemory

/// What the stress guest writes.
public enum StressPattern: Equatable, Sendable, CustomStringConvertible {
    /// Uniformly random pages of each thread's slice.
    case random
    /// Sweeps over each thread's slice, page after page.
    case sequential
    /// A fraction F of each slice (its start) gets 90% of the writes.
    case hotset(Double)
    /// QEMU's a-b test: pass after pass, add 1 to the counter in the first
    /// 8 bytes of every page of the slice, in order.
    case counter

    /// Parses `random`, `sequential`, `hotset:F` (0 < F ≤ 1), `counter`.
    public init?(parsing text: String) {
        switch text {
        case "random": self = .random
        case "sequential": self = .sequential
        case "counter": self = .counter
        default:
            guard text.hasPrefix("hotset:"), let f = Double(text.dropFirst(7)), f > 0, f <= 1 else { return nil }
            self = .hotset(f)
        }
    }

    public var description: String {
        switch self {
        case .random: "random"
        case .sequential: "sequential"
        case .hotset(let f): "hotset:\(f)"
        case .counter: "counter"
        }
    }

    var code: UInt32 {
        switch self {
        case .random: 0
        case .sequential: 1
        case .hotset: 2
        case .counter: 3
        }
    }
}

/// The stress guest's state, kept inside the guest-control file's state
/// area so it migrates with the guest and `--resume` continues from it.
///
/// Layout (little-endian, it crosses hosts):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic "LMSTRES1" |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | pattern (0 random, 1 sequential, 2 hotset, 3 counter) |
/// | 16 | 4 | threads |
/// | 20 | 4 | reserved |
/// | 24 | 8 | hot fraction (IEEE double bits) |
/// | 32 | 8 | page count |
/// | 40 | 32 × threads | per thread: pass, position, rng state, pages written |
///
/// Thread `t` owns pages `[t·n/T, (t+1)·n/T)` (its slice) and its slot; it
/// alone writes them while running. Others read the slots only while the
/// guest is paused or stopped.
public struct StressState: Sendable {
    public static let magic: UInt64 = 0x3153_4552_5453_4D4C  // "LMSTRES1" little-endian
    public static let headerSize = 40
    public static let slotSize = 32
    /// Bound on a stored pass or page count: decode refuses 2^62 and more.
    public static let maxCount: UInt64 = 1 << 62

    public var pattern: StressPattern
    public var threads: Int
    public var pageCount: Int
    public var slots: [Slot]

    /// One thread's progress.
    public struct Slot: Equatable, Sendable {
        /// Completed passes over the slice (counter, sequential).
        public var pass: UInt64
        /// Next page within the slice.
        public var position: UInt64
        public var rng: UInt64
        public var pagesWritten: UInt64
    }

    public init(pattern: StressPattern, threads: Int, pageCount: Int, seed: UInt64) {
        self.pattern = pattern
        self.threads = threads
        self.pageCount = pageCount
        slots = (0..<threads).map { Slot(pass: 0, position: 0, rng: seed &+ UInt64($0) &* 0x9E37_79B9_7F4A_7C15 | 1, pagesWritten: 0) }
    }

    /// Pages `[start, end)` owned by thread `t`.
    public static func slice(_ t: Int, threads: Int, pageCount: Int) -> Range<Int> {
        (t * pageCount / threads)..<((t + 1) * pageCount / threads)
    }

    public var byteCount: Int { Self.headerSize + threads * Self.slotSize }

    public func encoded() -> [UInt8] {
        var b = [UInt8]()
        func put<T: FixedWidthInteger>(_ v: T) { withUnsafeBytes(of: v.littleEndian) { b.append(contentsOf: $0) } }
        put(Self.magic)
        put(UInt32(1))
        put(pattern.code)
        put(UInt32(threads))
        put(UInt32(0))
        if case .hotset(let f) = pattern { put(f.bitPattern) } else { put(UInt64(0)) }
        put(UInt64(pageCount))
        for s in slots {
            put(s.pass)
            put(s.position)
            put(s.rng)
            put(s.pagesWritten)
        }
        return b
    }

    /// Decodes a state; nil with a reason when it is not a stress state.
    public static func decode(_ bytes: [UInt8]) -> Result<StressState, GuestMemoryError> {
        func get<T: FixedWidthInteger>(_ o: Int, _: T.Type) -> T? {
            guard o + MemoryLayout<T>.size <= bytes.count else { return nil }
            return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: o, as: T.self)) }
        }
        guard get(0, UInt64.self) == magic, get(8, UInt32.self) == 1 else {
            return .failure(
                GuestMemoryError(
                    "the control file holds no stress-guest state (\(bytes.count) bytes); was this guest started by livemig stress?"))
        }
        guard let code = get(12, UInt32.self), let threads = get(16, UInt32.self), let hot = get(24, UInt64.self),
            let pages = get(32, UInt64.self), threads >= 1, threads <= 256, pages >= UInt64(threads), pages <= 1 << 40,
            bytes.count >= headerSize + Int(threads) * slotSize
        else {
            return .failure(GuestMemoryError("the stress-guest state in the control file is truncated or corrupt"))
        }
        let pattern: StressPattern
        switch code {
        case 0: pattern = .random
        case 1: pattern = .sequential
        case 2:
            let f = Double(bitPattern: hot)
            guard f > 0, f <= 1 else {
                return .failure(GuestMemoryError("the stored hot fraction \(f) is outside (0, 1]; the guest state is corrupt"))
            }
            pattern = .hotset(f)
        case 3: pattern = .counter
        default: return .failure(GuestMemoryError("unknown stress pattern code \(code) in the guest state"))
        }
        var s = StressState(pattern: pattern, threads: Int(threads), pageCount: Int(pages), seed: 0)
        for t in 0..<Int(threads) {
            let o = headerSize + t * slotSize
            s.slots[t] = Slot(
                pass: get(o, UInt64.self)!, position: get(o + 8, UInt64.self)!, rng: get(o + 16, UInt64.self)!,
                pagesWritten: get(o + 24, UInt64.self)!)
            // Far beyond any real run (2^62 pages at a billion a second take
            // 146 years), and small enough that `pass + 1` and sums of a few
            // hundred counts cannot overflow.
            guard s.slots[t].pass < maxCount, s.slots[t].pagesWritten < maxCount else {
                return .failure(
                    GuestMemoryError(
                        "thread \(t)'s stored pass \(s.slots[t].pass) or pages written \(s.slots[t].pagesWritten) is not below 2^62; "
                            + "the guest state is corrupt"))
            }
            if case .random = pattern, s.slots[t].rng == 0 {
                return .failure(GuestMemoryError("thread \(t)'s stored random state is 0; the guest state is corrupt"))
            }
            if case .hotset = pattern, s.slots[t].rng == 0 {
                return .failure(GuestMemoryError("thread \(t)'s stored random state is 0; the guest state is corrupt"))
            }
            let sliceCount = UInt64(slice(t, threads: Int(threads), pageCount: Int(pages)).count)
            let ordered = pattern == .counter || pattern == .sequential
            guard !ordered || s.slots[t].position < sliceCount else {
                return .failure(
                    GuestMemoryError(
                        "thread \(t)'s stored position \(s.slots[t].position) is outside its \(sliceCount)-page slice; the guest state is corrupt"
                    ))
            }
        }
        return .success(s)
    }
}
