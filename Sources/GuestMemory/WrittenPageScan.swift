import CShims
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// How a guest's writes are found (docs/GUEST-CONTROL.md §6, §12).
public enum DirtyTracking: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// The guest marks every page it writes in the control file's bitmap.
    case bitmap = 0
    /// The kernel tracks the writes: the guest's RAM mapping is registered
    /// with a userfaultfd for asynchronous write-protect, and the source
    /// asks the kernel for the written pages (`WrittenPageScan`).
    case kernel = 1

    public var description: String {
        switch self {
        case .bitmap: "bitmap"
        case .kernel: "kernel"
        }
    }

    /// The mode named `name` ("bitmap", "kernel").
    public init?(name: String) {
        guard let m = Self.allCases.first(where: { $0.description == name }) else { return nil }
        self = m
    }
}

/// The source's side of kernel write tracking (DESIGN.md §9): asks the
/// kernel, through `PAGEMAP_SCAN` on the guest's `/proc/PID/pagemap`, which
/// pages of the guest's RAM mapping were written since the last scan, and
/// write-protects them again in the same step.
///
/// **The ordering contract.** Report and re-protect are one atomic step per
/// page table, so a write that lands after a page was reported faults (the
/// kernel lifts the protection and marks the page written again) and shows
/// in the next scan. The caller reads a page's bytes only after the scan
/// that reported it: the same guarantee as the bitmap's exchange-then-read
/// (GUEST-CONTROL.md §6).
///
/// **What it cannot see**: writes through `write(2)` or another mapping of
/// the file, by other processes, by DMA or through pinned pages, and writes
/// by a forked child. An error (the guest exited, its mapping changed)
/// leaves the tracking state unknown: the caller must fail the migration.
///
/// Used by one thread at a time (the migration thread).
public final class WrittenPageScan: @unchecked Sendable {
    // @unchecked: `regions` is used only by `collect`, which one thread
    // calls at a time; the rest never changes after init.
    private let pagemap: Int32
    private let pid: Int32
    /// The guest's mapping of its RAM, in the guest's address space.
    public let base: UInt64
    public let pageSize: UInt64
    public let pageCount: Int
    private let regions: UnsafeMutablePointer<lm_page_region>
    private static let regionCapacity = 4096

    /// Opens `/proc/PID/pagemap` of the guest `pid`, whose RAM of
    /// `pageCount` pages is mapped at `base`.
    public init(pid: Int32, base: UInt64, pageSize: UInt64, pageCount: Int) throws(GuestMemoryError) {
        guard base != 0, base % pageSize == 0 else {
            throw GuestMemoryError(
                "the guest (pid \(pid)) uses kernel write tracking but its control file names no page-aligned RAM mapping "
                    + "(0x\(String(base, radix: 16))); restart the guest")
        }
        let path = "/proc/\(pid)/pagemap"
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            let hint =
                e == .noSuchFileOrDirectory
                ? "the guest process has exited" : "reading another process's page tables needs root or the same user with ptrace access"
            throw GuestMemoryError("cannot open \(path) to track the guest's writes: \(e) (\(hint))", errno: e)
        }
        pagemap = fd
        self.pid = pid
        self.base = base
        self.pageSize = pageSize
        self.pageCount = pageCount
        regions = .allocate(capacity: Self.regionCapacity)
    }

    /// The scan of the guest whose control file is `control` and whose RAM
    /// file is `ramPath` (`pageCount` pages of `pageSize`): its pid and
    /// mapping address from the control file, the RAM file's inode for
    /// `sync`'s mapping check, which runs once here too.
    public convenience init(guest control: GuestControl, ramPath: FilePath, pageSize: UInt64, pageCount: Int)
        throws(GuestMemoryError)
    {
        try self.init(guest: control, files: [(ramPath, 0)], pageSize: pageSize, pageCount: pageCount)
    }

    /// The same for a guest of several RAM blocks (`ram`: the blocks' files
    /// as this process opened them, side by side as the guest maps them).
    public convenience init(guest control: GuestControl, ram: RAMFile) throws(GuestMemoryError) {
        try self.init(
            guest: control, files: Array(zip(ram.paths, ram.blockStarts)), pageSize: ram.block.pageSize, pageCount: ram.block.pageCount)
    }

    private convenience init(guest control: GuestControl, files: [(FilePath, UInt64)], pageSize: UInt64, pageCount: Int)
        throws(GuestMemoryError)
    {
        var blocks: [(inode: UInt64, start: UInt64)] = []
        for (path, start) in files {
            var st = stat()
            guard stat(path.string, &st) == 0 else {
                let e = Errno(rawValue: errno)
                throw GuestMemoryError("cannot stat \(path): \(e)", errno: e)
            }
            blocks.append((UInt64(st.st_ino), start))
        }
        try self.init(pid: control.guestPID, base: control.trackedMappingAddress, pageSize: pageSize, pageCount: pageCount)
        guest = (control, blocks)
        try checkMapping(blocks: blocks)
    }

    /// With `init(guest:…)`: the control file, and each RAM block's file
    /// (inode) with where it starts in the tracked range.
    private var guest: (control: GuestControl, blocks: [(inode: UInt64, start: UInt64)])?

    deinit {
        close(pagemap)
        regions.deallocate()
    }

    /// One sync of a guest opened with `init(guest:…)`: re-reads its
    /// mappings (a range that is no longer the RAM file would report the
    /// wrong pages), collects the written pages, then checks the control
    /// file's blindness word (set by `livemig run`'s preload library): a
    /// fork or remap before this scan may hide writes from every later one.
    @discardableResult
    public func sync(_ written: (Int) -> Void) throws(GuestMemoryError) -> Int {
        if let guest { try checkMapping(blocks: guest.blocks) }
        let found = try collect(written)
        if let blind = guest?.control.trackingBlindness, !blind.isEmpty {
            throw GuestMemoryError("it can no longer see every write: \(blind)")
        }
        return found
    }

    /// Re-reads the guest's mappings (`/proc/PID/maps`): the tracked range
    /// must still be mapped, whole and in order, from the file with inode
    /// `inode`. A program that unmapped, remapped or replaced its RAM
    /// mapping is an error (its writes there are no longer tracked).
    public func checkMapping(inode: UInt64) throws(GuestMemoryError) {
        try checkMapping(blocks: [(inode, 0)])
    }

    /// The same for several RAM blocks side by side: from each block's
    /// `start` in the range on, the mapping must be that block's file, from
    /// its offset 0.
    public func checkMapping(blocks: [(inode: UInt64, start: UInt64)]) throws(GuestMemoryError) {
        let end = base + UInt64(pageCount) * pageSize
        let fd = open("/proc/\(pid)/maps", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            throw GuestMemoryError("cannot read the guest's (pid \(pid)) mappings: \(e) (has it exited?)", errno: e)
        }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = read(fd, &chunk, chunk.count)
            if n <= 0 { break }
            bytes += chunk[0..<n]
        }
        // "start-end perms offset dev inode path": the lines of our file
        // must cover [base, end) without a gap, at matching file offsets.
        var covered = base
        for line in String(decoding: bytes, as: UTF8.self).split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 5, let dash = f[0].firstIndex(of: "-"),
                let lo = UInt64(f[0][..<dash], radix: 16), let hi = UInt64(f[0][f[0].index(after: dash)...], radix: 16),
                let offset = UInt64(f[2], radix: 16), let ino = UInt64(f[4])
            else { continue }
            guard hi > covered, lo <= covered, covered < end else { continue }
            // The block at `covered`: its file, at the distance from its start.
            let at = covered - base
            let block = blocks.last { $0.start <= at }!
            guard ino == block.inode, offset + (covered - lo) == at - block.start else { break }
            // One file's mapping cannot hold the next block: past its
            // block's end (before the range's end) it is the wrong file.
            if let next = blocks.first(where: { $0.start > at }), hi > base + next.start { break }
            covered = min(hi, end)
        }
        guard covered >= end else {
            throw GuestMemoryError(
                "the guest's (pid \(pid)) RAM mapping at 0x\(String(base, radix: 16)) is no longer the whole RAM file from 0x\(String(covered, radix: 16)) on: "
                    + "it unmapped or remapped it, so its writes there are not tracked")
        }
    }

    /// Reports every page written since the last scan to `written` (page
    /// index within the RAM) and write-protects it again. Returns how many
    /// pages were reported.
    @discardableResult
    public func collect(_ written: (Int) -> Void) throws(GuestMemoryError) -> Int {
        let end = base + UInt64(pageCount) * pageSize
        var start = base
        var found = 0
        while start < end {
            var walkEnd: UInt64 = 0
            let n = lm_pagemap_scan_written(pagemap, start, end, regions, UInt64(Self.regionCapacity), &walkEnd)
            guard n >= 0 else {
                let e = SystemCall.error(negated: Int32(truncatingIfNeeded: n))
                let why =
                    switch e {
                    case .noSuchProcess: "the guest process has exited"
                    case .notPermitted:
                        "some of the range is not registered for asynchronous write-protect (did the guest unmap or remap its RAM?)"
                    default: "\(e)"
                    }
                throw GuestMemoryError(
                    "cannot scan the guest's (pid \(pid)) written pages (PAGEMAP_SCAN of 0x\(String(start, radix: 16))-0x\(String(end, radix: 16))): \(why)",
                    errno: e)
            }
            for i in 0..<Int(n) {
                let r = regions[i]
                var a = max(r.start, base)
                while a < min(r.end, end) {
                    written(Int((a - base) / pageSize))
                    found += 1
                    a += pageSize
                }
            }
            // The walk stops early only when the regions filled up.
            guard walkEnd > start else { break }
            start = walkEnd
        }
        return found
    }
}
