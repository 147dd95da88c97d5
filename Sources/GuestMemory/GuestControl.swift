import CShims
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// The guest-control file: a small file mapped `MAP_SHARED` by the guest and
/// by the source that migrates it (docs/GUEST-CONTROL.md).
///
/// Layout (native byte order: both processes are on one host):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 8 | magic "LMGUEST1" |
/// | 8 | 4 | version (1) |
/// | 12 | 4 | header size (4096) |
/// | 16 | 8 | page size |
/// | 24 | 8 | RAM size |
/// | 32 | 8 | bitmap offset (4096) |
/// | 40 | 8 | bitmap words |
/// | 48 | 8 | state offset |
/// | 56 | 8 | state capacity |
/// | 64 | 4 | run state (futex word) |
/// | 68 | 4 | throttle percent |
/// | 72 | 4 | guest threads running |
/// | 76 | 4 | guest threads paused (acknowledged) |
/// | 80 | 4 | guest pid |
/// | 84 | 4 | source pid (while a source holds the guest paused) |
/// | 88 | 8 | pause lease deadline, CLOCK_MONOTONIC ns |
/// | 96 | 4 | state length |
/// | 100 | 4 | generation (bumped on each run-state change) |
/// | 128 | 108 | hand-off socket path of an incoming guest, NUL-terminated |
/// | 240 | 4 | RAM blocks in the table below (0: one block, not named) |
/// | 256 | 64 × n | block table: name (48 bytes, NUL-padded), size (8), reserved (8) |
///
/// The bitmap follows at `bitmap offset`, the guest-state bytes after it
/// (page-aligned). Every run-control word is accessed only atomically.
public final class GuestControl: @unchecked Sendable {
    // @unchecked: all shared words are touched through CShims atomics; the
    // state bytes are written by the guest only while it runs and read by
    // the source only after every guest thread acknowledged a pause (the
    // acquire load of `pausedThreads` orders them).

    /// Run states of the guest (the futex word).
    public enum RunState: UInt32, Sendable, CustomStringConvertible {
        /// Writing pages.
        case running = 0
        /// A source asks the guest to stop writing; threads acknowledge by
        /// bumping `pausedThreads` and wait.
        case pauseRequested = 1
        /// The guest now runs on the destination: exit for good.
        case migrated = 2
        /// Freshly written by a destination: the guest state awaits `--resume`.
        case incoming = 3
        /// A destination is receiving into this file, or failed to: the
        /// state and the RAM are not a guest. Set when the layout is
        /// accepted; only a completed migration replaces it (with incoming).
        case incomplete = 4
        /// The source stopped this copy and told the destination to commit,
        /// but never heard that it did (docs/PROTOCOL.md §7): the guest may
        /// run there now. Exit for good; only `stress --resume --reclaim`
        /// takes it back, after the user checked the destination.
        case handedOver = 5
        /// An incoming guest (`livemig stress --incoming`) is attached: its
        /// RAM is registered with a userfaultfd and waits to be filled. It
        /// starts when a receiver stores *incoming*. Nothing else may run
        /// or resume it; it is a destination, never a source.
        case waitingIncoming = 6

        public var description: String {
            switch self {
            case .running: "running"
            case .pauseRequested: "pause requested"
            case .migrated: "migrated"
            case .incoming: "incoming"
            case .incomplete: "incomplete"
            case .handedOver: "handed over"
            case .waitingIncoming: "waiting incoming"
            }
        }
    }

    public static let magic: UInt64 = 0x3154_5345_5547_4D4C  // "LMGUEST1" little-endian
    public static let version: UInt32 = 1
    public static let headerSize = 4096
    public static let stateCapacity = 64 * 1024
    /// How long a pause holds without the source renewing it (the guest
    /// resumes by itself after that: the source must have died).
    public static let leaseSeconds = 2.0

    public let path: FilePath
    public let pageSize: UInt64
    public let ramSize: UInt64
    /// The guest's dirty bitmap, inside this file.
    public let bitmap: DirtyBitmap
    private let base: UnsafeMutableRawPointer
    private let length: Int

    /// Byte size of a control file for `ramSize` bytes of RAM.
    public static func fileSize(ramSize: UInt64, pageSize: UInt64) -> Int {
        stateOffset(ramSize: ramSize, pageSize: pageSize) + stateCapacity
    }

    static func stateOffset(ramSize: UInt64, pageSize: UInt64) -> Int {
        let words = DirtyBitmap.wordCount(pages: Int(ramSize / pageSize))
        let bitmapBytes = (words * 8 + 4095) & ~4095
        return headerSize + bitmapBytes
    }

    /// Opens an existing control file, or creates one for `ram` when absent.
    /// An existing file must describe the same RAM size and page size.
    public static func openOrCreate(path: FilePath, for ram: RAMBlock, blocks: [RAMBlock] = []) throws(GuestMemoryError) -> GuestControl {
        if access(path.string, F_OK) == 0 {
            let c = try GuestControl(path: path)
            guard c.ramSize == ram.size, c.pageSize == ram.pageSize else {
                throw GuestMemoryError(
                    "control file \(path) describes \(c.ramSize) bytes of RAM in \(c.pageSize)-byte pages, but the RAM file is \(ram.size) bytes in \(ram.pageSize)-byte pages; remove it or give the matching RAM file"
                )
            }
            if let why = c.blockMismatch(blocks) {
                throw GuestMemoryError("control file \(path): \(why); remove it or give the matching RAM files")
            }
            return c
        }
        return try create(path: path, for: ram, blocks: blocks.count > 1 ? blocks : [])
    }

    /// Why `blocks` (one RAM file's block, or several in order) are not
    /// the RAM blocks this file was made for, or nil when they are.
    /// Sizes must match in order; names too when the file lists several.
    public func blockMismatch(_ given: [RAMBlock]) -> String? {
        let listed = blocks
        if listed.isEmpty, given.count <= 1 { return nil }
        let want = listed.isEmpty ? "one RAM block" : listed.map { "\($0.name) (\($0.size) bytes)" }.joined(separator: ", ")
        let got = given.map { "\($0.name) (\($0.size) bytes)" }.joined(separator: ", ")
        guard listed.count == given.count, zip(listed, given).allSatisfy({ $0.name == $1.name && $0.size == $1.size }) else {
            return "it is for the guest's RAM blocks \(want), but the RAM given is \(got) (same names, sizes and order needed)"
        }
        return nil
    }

    /// The block table: where it starts, each entry's size, its room, and
    /// the longest block name an entry holds.
    static let blockTableOffset = 256
    static let blockEntrySize = 64
    public static let maxBlocks = (headerSize - blockTableOffset) / blockEntrySize
    public static let maxBlockNameBytes = 47

    /// The guest's RAM blocks as the file lists them, in order, when the
    /// guest has several (each page numbering runs on from the previous
    /// block: the bitmap covers them side by side); empty for a guest of
    /// one block.
    public var blocks: [RAMBlock] {
        let n = Int(base.load(fromByteOffset: 240, as: UInt32.self))
        guard n > 0, n <= Self.maxBlocks else { return [] }
        return (0..<n).map { i in
            let e = base + Self.blockTableOffset + i * Self.blockEntrySize
            let nameBytes = UnsafeRawBufferPointer(start: e, count: Self.maxBlockNameBytes + 1).prefix { $0 != 0 }
            return RAMBlock(
                name: String(decoding: nameBytes, as: UTF8.self), size: e.load(fromByteOffset: 48, as: UInt64.self), pageSize: pageSize)
        }
    }

    /// Creates a control file for `ram` (all pages clean, state empty).
    /// `blocks`: when the guest has several RAM blocks, `ram` is their
    /// whole range and the table lists them (at most `maxBlocks`, names of
    /// at most `maxBlockNameBytes` bytes).
    public static func create(path: FilePath, for ram: RAMBlock, blocks: [RAMBlock] = []) throws(GuestMemoryError) -> GuestControl {
        guard blocks.count <= maxBlocks, blocks.allSatisfy({ $0.name.utf8.count <= maxBlockNameBytes }),
            blocks.isEmpty || blocks.reduce(0, { $0 + $1.size }) == ram.size
        else {
            throw GuestMemoryError(
                "a control file lists at most \(maxBlocks) RAM blocks with names of at most \(maxBlockNameBytes) bytes; got \(blocks.count): \(blocks.map(\.name))"
            )
        }
        let size = fileSize(ramSize: ram.size, pageSize: ram.pageSize)
        let fd = open(path.string, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot create control file \(path): \(e)", errno: e)
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(size)) == 0 else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot size control file \(path): \(e)", errno: e)
        }
        guard let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot map control file \(path): \(e)", errno: e)
        }
        let words = DirtyBitmap.wordCount(pages: Int(ram.size / ram.pageSize))
        p.storeBytes(of: UInt32(headerSize), toByteOffset: 12, as: UInt32.self)
        p.storeBytes(of: ram.pageSize, toByteOffset: 16, as: UInt64.self)
        p.storeBytes(of: ram.size, toByteOffset: 24, as: UInt64.self)
        p.storeBytes(of: UInt64(headerSize), toByteOffset: 32, as: UInt64.self)
        p.storeBytes(of: UInt64(words), toByteOffset: 40, as: UInt64.self)
        p.storeBytes(of: UInt64(stateOffset(ramSize: ram.size, pageSize: ram.pageSize)), toByteOffset: 48, as: UInt64.self)
        p.storeBytes(of: UInt64(stateCapacity), toByteOffset: 56, as: UInt64.self)
        p.storeBytes(of: version, toByteOffset: 8, as: UInt32.self)
        if blocks.count > 1 {
            p.storeBytes(of: UInt32(blocks.count), toByteOffset: 240, as: UInt32.self)
            for (i, b) in blocks.enumerated() {
                let e = p + blockTableOffset + i * blockEntrySize
                for (k, byte) in b.name.utf8.enumerated() { e.storeBytes(of: byte, toByteOffset: k, as: UInt8.self) }
                e.storeBytes(of: b.size, toByteOffset: 48, as: UInt64.self)
            }
        }
        // Magic last: a reader that sees it sees a complete header.
        lm_atomic_store_release_u64(p.assumingMemoryBound(to: UInt64.self), magic)
        munmap(p, size)
        return try GuestControl(path: path)
    }

    /// Opens and checks an existing control file.
    public init(path: FilePath) throws(GuestMemoryError) {
        self.path = path
        let fd = open(path.string, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else {
            let e = SystemCall.lastError
            if e == .noSuchFileOrDirectory {
                throw GuestMemoryError("control file \(path) does not exist; start the guest (livemig stress) first", errno: e)
            }
            throw GuestMemoryError("cannot open control file \(path): \(e)", errno: e)
        }
        defer { close(fd) }
        var st = stat()
        fstat(fd, &st)
        guard st.st_size >= Self.headerSize else {
            throw GuestMemoryError("control file \(path) is \(st.st_size) bytes, too small to be a livemig control file")
        }
        guard let p = mmap(nil, Int(st.st_size), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot map control file \(path): \(e)", errno: e)
        }
        base = p
        length = Int(st.st_size)
        let magic = lm_atomic_load_acquire_u64(p.assumingMemoryBound(to: UInt64.self))
        let version = p.load(fromByteOffset: 8, as: UInt32.self)
        pageSize = p.load(fromByteOffset: 16, as: UInt64.self)
        ramSize = p.load(fromByteOffset: 24, as: UInt64.self)
        let words = p.load(fromByteOffset: 40, as: UInt64.self)
        let stateOff = p.load(fromByteOffset: 48, as: UInt64.self)
        // Every header field is bounded before it is converted or used in
        // arithmetic: a random file must fail with a message, not trap.
        let valid =
            magic == Self.magic && version == Self.version && pageSize >= 4096 && pageSize <= 1 << 30
            && pageSize & (pageSize - 1) == 0 && ramSize > 0 && ramSize <= 1 << 50 && ramSize % pageSize == 0
            && words == UInt64(DirtyBitmap.wordCount(pages: Int(ramSize / pageSize)))
            && stateOff == UInt64(Self.stateOffset(ramSize: ramSize, pageSize: pageSize))
            && length >= Self.fileSize(ramSize: ramSize, pageSize: pageSize)
        guard valid else {
            munmap(p, length)
            throw GuestMemoryError(
                "\(path) is not a livemig control file (magic \(String(magic, radix: 16)), version \(version)); give the file `livemig stress --control` created"
            )
        }
        let words64 = (p + Self.headerSize).assumingMemoryBound(to: UInt64.self)
        bitmap = DirtyBitmap(borrowing: words64, pageCount: Int(ramSize / pageSize), owner: MappingOwner(base: p, length: length))
    }

    // MARK: - run control

    private func word32(_ offset: Int) -> UnsafeMutablePointer<UInt32> {
        (base + offset).assumingMemoryBound(to: UInt32.self)
    }

    private func word64(_ offset: Int) -> UnsafeMutablePointer<UInt64> {
        (base + offset).assumingMemoryBound(to: UInt64.self)
    }

    /// The run state (acquire: pairs with `setRunState`'s release).
    public var runState: RunState {
        // An unknown value means a corrupt file: treat it as "stop writing".
        RunState(rawValue: lm_atomic_load_acquire_u32(word32(64))) ?? .migrated
    }

    /// Sets the run state (release) and wakes every thread waiting on it.
    public func setRunState(_ s: RunState) {
        lm_atomic_store_release_u32(word32(64), s.rawValue)
        _ = lm_atomic_fetch_add_u32(word32(100), 1)
        _ = lm_futex_wake(word32(64), Int32.max)
    }

    /// Compare-and-swap on the run state; wakes waiters when it changed.
    @discardableResult
    public func exchangeRunState(from old: RunState, to new: RunState) -> Bool {
        guard lm_atomic_cas_u32(word32(64), old.rawValue, new.rawValue) else { return false }
        _ = lm_atomic_fetch_add_u32(word32(100), 1)
        _ = lm_futex_wake(word32(64), Int32.max)
        return true
    }

    /// Waits until the run state is no longer `state` or `timeout` passes.
    public func waitWhile(_ state: RunState, timeout: Double) {
        _ = lm_futex_wait(word32(64), state.rawValue, Int64(timeout * 1e9))
    }

    /// Throttle: the percentage of time each guest thread must sleep.
    public var throttlePercent: UInt32 {
        get { lm_atomic_load_acquire_u32(word32(68)) }
        set { lm_atomic_store_release_u32(word32(68), min(newValue, 99)) }
    }

    /// Sets the throttle to `new` only if it is still `old` (a source may
    /// have set a newer one meanwhile).
    @discardableResult
    public func exchangeThrottle(from old: UInt32, to new: UInt32) -> Bool {
        lm_atomic_cas_u32(word32(68), old, new)
    }

    /// Guest threads that write pages (set by the guest at start).
    public var guestThreads: UInt32 {
        get { lm_atomic_load_acquire_u32(word32(72)) }
        set { lm_atomic_store_release_u32(word32(72), newValue) }
    }

    /// Starts a run: no thread has acknowledged anything yet (a guest killed
    /// while paused leaves its acknowledgements behind).
    public func resetPauseAcknowledgements() { lm_atomic_store_release_u32(word32(76), 0) }

    /// Wakes every thread waiting on the run-state word without changing it
    /// (they re-check their own stop conditions).
    public func wakeWaiters() { _ = lm_futex_wake(word32(64), Int32.max) }

    /// A guest thread ends: a pause no longer waits for it.
    public func threadExited() { _ = lm_atomic_fetch_add_u32(word32(72), UInt32.max) }

    /// Guest threads that acknowledged the current pause.
    public var pausedThreads: UInt32 { lm_atomic_load_acquire_u32(word32(76)) }

    /// A guest thread acknowledges a pause: it has no write in flight and
    /// its page data, bitmap bits and state are all stored (release: pairs
    /// with the source's acquire load of `pausedThreads`).
    public func acknowledgePause() { _ = lm_atomic_fetch_add_u32(word32(76), 1) }

    /// A guest thread leaves the pause.
    public func leavePause() { _ = lm_atomic_fetch_add_u32(word32(76), UInt32.max) }

    public var guestPID: Int32 {
        get { Int32(bitPattern: lm_atomic_load_acquire_u32(word32(80))) }
        set { lm_atomic_store_release_u32(word32(80), UInt32(bitPattern: newValue)) }
    }

    /// How the guest's writes are tracked (offset 104), set by the guest
    /// before it runs; nil for a value no livemig knows (refuse the guest).
    public var tracking: DirtyTracking? { DirtyTracking(rawValue: lm_atomic_load_acquire_u32(word32(104))) }

    /// Records the guest's tracking: `.kernel` with the address of its RAM
    /// mapping in its own address space (offset 112; stored first, then the
    /// mode with release order, so a source that sees `.kernel` sees the
    /// address), `.bitmap` with 0.
    public func setTracking(_ mode: DirtyTracking, mappingAddress: UInt64) {
        lm_atomic_store_release_u64(word64(112), mode == .kernel ? mappingAddress : 0)
        lm_atomic_store_release_u32(word32(104), mode.rawValue)
    }

    /// The guest's RAM mapping address, for kernel tracking (acquire).
    public var trackedMappingAddress: UInt64 { lm_atomic_load_acquire_u64(word64(112)) }

    /// What runs the guest (offset 108).
    public enum GuestKind: UInt32, Sendable {
        /// A program that follows this protocol itself (`livemig stress`).
        case cooperative = 0
        /// An unmodified program under `livemig run`: the launcher pauses
        /// it from outside (SIGSTOP) and acknowledges for it, its writes are
        /// tracked by the kernel, and it has no guest state.
        case external = 1
    }

    /// What runs the guest; nil for a value no livemig knows.
    public var guestKind: GuestKind? { GuestKind(rawValue: lm_atomic_load_acquire_u32(word32(108))) }

    public func setGuestKind(_ kind: GuestKind) { lm_atomic_store_release_u32(word32(108), kind.rawValue) }

    /// Why kernel tracking of an external guest went blind (offset 120):
    /// bits the preload library sets (`Blindness`); 0 while it sees all.
    public var trackingBlindness: Blindness { Blindness(rawValue: lm_atomic_load_acquire_u32(word32(120))) }

    /// Clears the blindness word (a new program starts).
    public func clearTrackingBlindness() { lm_atomic_store_release_u32(word32(120), 0) }

    public struct Blindness: OptionSet, Sendable, CustomStringConvertible {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// The program forked: the child's writes are not tracked.
        public static let forked = Blindness(rawValue: 1)
        /// The program unmapped or remapped its RAM.
        public static let remapped = Blindness(rawValue: 2)
        /// The program mapped the RAM file a second time.
        public static let mappedTwice = Blindness(rawValue: 4)

        public var description: String {
            var why: [String] = []
            if contains(.forked) { why.append("the program forked (its child's writes are in page tables nobody tracks)") }
            if contains(.remapped) { why.append("the program unmapped or remapped its RAM") }
            if contains(.mappedTwice) { why.append("the program mapped the RAM file a second time (writes there are not tracked)") }
            return why.isEmpty ? "none" : why.joined(separator: "; ")
        }
    }

    public var sourcePID: Int32 {
        get { Int32(bitPattern: lm_atomic_load_acquire_u32(word32(84))) }
        set { lm_atomic_store_release_u32(word32(84), UInt32(bitPattern: newValue)) }
    }

    /// Until when (CLOCK_MONOTONIC ns) a pause holds without renewal.
    public var leaseDeadline: UInt64 {
        get { lm_atomic_load_acquire_u64(word64(88)) }
        set { lm_atomic_store_release_u64(word64(88), newValue) }
    }

    /// Renews the pause lease for `leaseSeconds` from now.
    public func renewLease() { leaseDeadline = monotonicNanoseconds() + UInt64(Self.leaseSeconds * 1e9) }

    /// Whether the source that paused the guest is gone: its lease ran out
    /// or its process no longer exists.
    public var pauseHolderVanished: Bool {
        if monotonicNanoseconds() > leaseDeadline { return true }
        let pid = sourcePID
        return pid > 0 && !SystemCall.processExists(pid)
    }

    // MARK: - incoming guest

    /// Where the hand-off socket path lives in the header (unused space).
    static let handoffSocketPathOffset = 128
    /// The longest hand-off socket path, in bytes: what `sun_path` holds
    /// (108 bytes) less its NUL.
    public static let handoffSocketPathLimit = 107

    /// The Unix socket on which an incoming guest hands out its
    /// userfaultfd (`FaultHandoffServer`), or nil when none is announced.
    /// An absolute path, so that a receiver in another directory finds it.
    ///
    /// Plain bytes, not a run-control word: the guest stores the path
    /// before it sets *waiting incoming* (a release store), and a receiver
    /// reads it after it saw that state (an acquire load), which orders
    /// them. Trust it only while the run state is *waiting incoming*: a
    /// guest that was killed leaves its path behind. Setting a path longer
    /// than `handoffSocketPathLimit` bytes is a programming error (check it
    /// first).
    public var handoffSocketPath: String? {
        get {
            let p = UnsafeRawBufferPointer(start: base + Self.handoffSocketPathOffset, count: Self.handoffSocketPathLimit + 1)
            guard let end = p.firstIndex(of: 0), end > 0 else { return nil }
            return String(decoding: p[..<end], as: UTF8.self)
        }
        set {
            let bytes = Array((newValue ?? "").utf8)
            precondition(
                bytes.count <= Self.handoffSocketPathLimit, "hand-off socket path longer than \(Self.handoffSocketPathLimit) bytes")
            let p = base + Self.handoffSocketPathOffset
            p.initializeMemory(as: UInt8.self, repeating: 0, count: Self.handoffSocketPathLimit + 1)
            if !bytes.isEmpty { bytes.withUnsafeBytes { p.copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }
        }
    }

    // MARK: - guest state

    /// Pointer to the guest-state bytes (capacity `stateCapacity`).
    public var stateBytes: UnsafeMutableRawPointer { base + Self.stateOffset(ramSize: ramSize, pageSize: pageSize) }

    /// Length of the stored guest state.
    public var stateLength: Int {
        get { Int(lm_atomic_load_acquire_u32(word32(96))) }
        set { lm_atomic_store_release_u32(word32(96), UInt32(min(newValue, Self.stateCapacity))) }
    }

    /// A copy of the guest state (read it only while the guest is paused or stopped).
    public func readState() -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: stateBytes, count: stateLength))
    }

    /// Stores a guest state (as a destination does after migration).
    public func writeState(_ bytes: [UInt8]) throws(GuestMemoryError) {
        guard bytes.count <= Self.stateCapacity else {
            throw GuestMemoryError("guest state of \(bytes.count) bytes exceeds the control file's \(Self.stateCapacity)")
        }
        if !bytes.isEmpty {
            bytes.withUnsafeBytes { stateBytes.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        }
        stateLength = bytes.count
    }
}

/// Unmaps a control-file mapping when the last user (the bitmap) goes.
final class MappingOwner {
    let base: UnsafeMutableRawPointer
    let length: Int
    init(base: UnsafeMutableRawPointer, length: Int) {
        self.base = base
        self.length = length
    }
    deinit { munmap(base, length) }
}

/// CLOCK_MONOTONIC in nanoseconds (shared by the processes of one host):
/// `Monotonic.nanoseconds`, under the name the guest side has always used.
@inlinable public func monotonicNanoseconds() -> UInt64 { Monotonic.nanoseconds }
