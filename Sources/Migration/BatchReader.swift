import CShims
import GuestMemory

/// Reads a batch's pages for one sender channel into a private copy and
/// finds the zero ones (used by that channel's thread only).
///
/// **Every page is sent from its copy, never from the guest mapping**: the
/// packet carries a hash of each page, and the bytes hashed must be the
/// bytes sent. A guest that writes a page after we copied it only makes
/// that copy stale, and the dirty bitmap sends it again (GUEST-CONTROL.md
/// §6). Each page is read once, in one of two ways chosen per batch:
///
/// - **Staged by pread** into the batch's slot of this channel's buffer,
///   one pread per run of adjacent pages, when the batch is made of long
///   runs (on average at least `minimumStagedRun` pages; bulk rounds are one
///   run of 128) or the channel's last batch was almost all zero. The
///   gather write then sends the non-zero pages **from the slot**, and the
///   source never maps them.
/// - **Through the mapping**, for a batch of scattered pages (a live
///   round's dirty pages): fault the batch in window by window
///   (`lm_fault_in_windows`), then copy each page into its place in the
///   slot and check the copy.
///
/// Why stage at all, when it costs a kernel copy that sending from the
/// mapping does not: on this machine (a VM without huge pages for tmpfs)
/// sending from the mapping pays a fault per 64 KiB window, a TLB miss per
/// page for the zero check and again for the kernel's copy into the socket,
/// and a page-table teardown afterwards. pread copies through the kernel's
/// own (huge-page) mapping of the page cache into a buffer of 512 KiB per
/// batch (2 MiB for a default job of 4) that stays hot in the TLB and
/// largely in cache. Measured, 1 GiB random, 2 channels,
/// TCP, warm, alternating runs in one invocation: `send` 251 -> 224 ms
/// (7 runs); mixed 201 -> 174 ms and all-zero 93 -> 76 ms (5 runs each);
/// 4 GiB 1046 -> 984 ms; the raw-socket ceiling itself sends 10% faster
/// with pread staging than from its mapping (230 -> 206 ms).
///
/// Scattered pages are left in place because pread costs a syscall per run:
/// per page, in isolation, 0.89 µs for runs of 1 page, 0.57 µs for 4, 0.40
/// µs for 8, against 0.46–0.50 µs for a first touch through the mapping
/// (and nothing for a page a previous round mapped already).
final class BatchReader {
    private let ram: RAMFile
    private let pageSize: Int
    /// `slots` x 128 pages: one slot per batch of a job. A staged batch's
    /// pages must stay put until the job's gather write returns, so each
    /// batch of a job has its own slot.
    private let buffer: UnsafeMutableRawPointer
    let slots: Int
    /// Per page of the last batch read: whether it is zero.
    let isZero: UnsafeMutablePointer<Bool>
    /// The slot the last batch was copied into (its page i is at
    /// `staged + i * pageSize`).
    private(set) var staged: UnsafeMutableRawPointer
    /// The last batch was read by pread (it mapped nothing); false when it
    /// was copied through the mapping.
    private(set) var isStaged = true
    /// The last batch had at least 7/8 zero pages.
    private var lastMostlyZero = false

    /// A batch is staged when its runs of adjacent pages are this long on
    /// average (see the per-page costs above: pread wins from about 8).
    static let minimumStagedRun = 8

    /// The kernel's fault-around unit (`fault_around_bytes`, 64 KiB by
    /// default): one read fault maps the window's cached pages.
    static let faultAroundBytes: UInt64 = 64 << 10

    /// Bytes from one slot's start to the next's: headroom, 128 pages,
    /// tailroom.
    private let slotStride: Int
    /// Free bytes before each slot's first page (a multiple of the page
    /// size, so that pages stay page-aligned).
    private let headroom: Int

    /// `headroom` and `tailroom`: free bytes kept before and after each
    /// slot's pages, so that a packet can be laid out around them in place
    /// (its prefix before, its tag after: `PacketSender` with a key).
    init(ram: RAMFile, slots: Int = 1, headroom: Int = 0, tailroom: Int = 0) {
        precondition(slots >= 1 && headroom >= 0 && tailroom >= 0)
        self.ram = ram
        self.slots = slots
        pageSize = Int(ram.block.pageSize)
        let page = pageSize
        let wholePages = { (bytes: Int) in (bytes + page - 1) / page * page }
        self.headroom = wholePages(headroom)
        slotStride = self.headroom + MultiFDPages.capacity * pageSize + wholePages(tailroom)
        buffer = .allocate(byteCount: slots * slotStride, alignment: 4096)
        staged = buffer + self.headroom
        isZero = .allocate(capacity: MultiFDPages.capacity)
    }

    deinit {
        buffer.deallocate()
        isZero.deallocate()
    }

    /// The copy of page `i` of the last batch read, in its slot.
    @inline(__always) func page(_ i: Int) -> UnsafeMutableRawPointer { staged + i * pageSize }

    /// Where slot `slot`'s first page goes; its headroom lies before.
    func slotStart(_ slot: Int) -> UnsafeMutableRawPointer { buffer + slot * slotStride + headroom }

    /// Copies `pages` into `slot` (by pread, or through the mapping) and
    /// fills `isZero[0..<pages.count]`. A slot is overwritten by the next
    /// batch read into the same slot. A failed pread throws (a file
    /// that shrank would otherwise kill the process with SIGBUS through the
    /// mapping).
    func read(_ pages: MultiFDPages, slot: Int = 0) throws(GuestMemoryError) {
        precondition(slot < slots, "slot \(slot) of \(slots)")
        var runs = 0
        for _ in PageRuns(pages.offsets, count: pages.count, pageSize: UInt64(pageSize)) { runs += 1 }
        let long = runs * Self.minimumStagedRun <= pages.count
        let slotBase = slotStart(slot)
        staged = slotBase
        isStaged = long || lastMostlyZero
        if isStaged {
            try stage(pages, in: slotBase)
        } else {
            copyThroughMapping(pages, into: slotBase)
        }
        var zero = 0
        for i in 0..<pages.count where isZero[i] { zero += 1 }
        lastMostlyZero = zero * 8 >= pages.count * 7
    }

    private func copyThroughMapping(_ pages: MultiFDPages, into slot: UnsafeMutableRawPointer) {
        // Fault the batch in first: faults interleaved with the copies cost
        // the scan 1.6x (see lm_fault_in_windows).
        lm_fault_in_windows(ram.base, pages.offsets, pages.count, Self.faultAroundBytes)
        for i in 0..<pages.count {
            let copy = slot + i * pageSize
            copy.copyMemory(from: ram.base + Int(pages.offsets[i]), byteCount: pageSize)
            isZero[i] = lm_buffer_is_zero(copy, pageSize)
        }
    }

    /// Reads each run of adjacent pages with one pread to its place in the
    /// slot (page i at `slot + i * pageSize`).
    private func stage(_ pages: MultiFDPages, in slot: UnsafeMutableRawPointer) throws(GuestMemoryError) {
        for run in PageRuns(pages.offsets, count: pages.count, pageSize: UInt64(pageSize)) {
            let at = slot + run.lowerBound * pageSize
            try ram.read(into: at, offset: pages.offsets[run.lowerBound], length: run.count * pageSize)
            for i in run { isZero[i] = lm_buffer_is_zero(slot + i * pageSize, pageSize) }
        }
    }
}
