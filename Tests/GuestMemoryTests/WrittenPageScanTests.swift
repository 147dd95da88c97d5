import Foundation
import GuestMemory
import Synchronization
import SystemPackage
import Testing
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// Kernel write tracking (DESIGN.md §9): a mapping registered for
/// asynchronous write-protect, scanned with PAGEMAP_SCAN. Every scan must
/// report at least the pages written since the one before (a page missed
/// would migrate stale), and a quiet mapping reports nothing.
@Suite("WrittenPageScan", .serialized)
struct WrittenPageScanTests {
    /// A RAM file on /dev/shm, mapped and registered for write tracking in
    /// this process; scanned through this process's own pagemap.
    final class TrackedRAM: @unchecked Sendable {
        // @unchecked: every member is set once in init; the RAM is written
        // by plain stores from the tests' threads, which is what is tested.
        let path: String
        let ram: RAMFile
        let tracking: Userfault
        let scan: WrittenPageScan

        init(pages: Int) throws {
            path = "/dev/shm/livemig-wp-test-\(UUID().uuidString).ram"
            ram = try RAMFile.create(path: FilePath(path), size: UInt64(pages * 4096))
            tracking = try Userfault(writeTrackingPageSize: 4096)
            let base = UInt64(UInt(bitPattern: ram.base))
            try tracking.registerWriteProtect(address: base, length: ram.block.size)
            scan = try WrittenPageScan(pid: getpid(), base: base, pageSize: 4096, pageCount: pages)
        }

        func write(_ page: Int, _ value: UInt64) { ram.pointer(at: UInt64(page) * 4096).storeBytes(of: value, as: UInt64.self) }

        func scanned() throws -> Set<Int> {
            var pages = Set<Int>()
            try scan.collect { pages.insert($0) }
            return pages
        }

        deinit { unlink(path) }
    }

    @Test("the first scan reports every page written so far; a quiet mapping then reports nothing")
    func firstScanThenQuiet() throws {
        let t = try TrackedRAM(pages: 256)
        for p in 0..<256 { t.write(p, 1) }
        #expect(try t.scanned() == Set(0..<256))
        #expect(try t.scanned().isEmpty)
        #expect(try t.scanned().isEmpty)
    }

    @Test("every scan reports at least the pages written since the last one", arguments: [1, 7, 300, 4096])
    func reportsAKnownSet(size: Int) throws {
        let pages = 4096
        let t = try TrackedRAM(pages: pages)
        for p in 0..<pages { t.write(p, 0) }
        _ = try t.scanned()
        var rng = SystemRandomNumberGenerator()
        for round in 1...5 {
            let written = Set((0..<size).map { _ in Int.random(in: 0..<pages, using: &rng) })
            for p in written { t.write(p, UInt64(round)) }
            let seen = try t.scanned()
            #expect(written.isSubset(of: seen), "round \(round): \(written.subtracting(seen).count) written pages not reported")
            #expect(try t.scanned().isEmpty, "round \(round): a second scan with no write in between reported pages")
        }
    }

    @Test("copying what each scan reports while a writer runs ends with an exact copy (the migration's invariant)")
    func copyFollowingScansIsExact() throws {
        // A writer thread keeps writing pages in order while this thread
        // scans and, after each scan, copies the reported pages, as a round
        // does. Once the writer stops, one more scan and copy must leave
        // the copy equal to the RAM: no write was lost to a re-protection.
        let pages = 1024
        let t = try TrackedRAM(pages: pages)
        for p in 0..<pages { t.write(p, 0) }
        func read(_ p: Int) -> UInt64 { t.ram.pointer(at: UInt64(p) * 4096).load(as: UInt64.self) }
        _ = try t.scanned()
        var copy = (0..<pages).map(read)
        let stop = Atomic<Bool>(false)
        let lastPass = Atomic<Int>(0)
        let writer = WorkerThread(name: "wp-writer") {
            var pass = 0
            while !stop.load(ordering: .relaxed) {
                pass += 1
                for p in 0..<pages { t.write(p, UInt64(pass)) }
                lastPass.store(pass, ordering: .releasing)
            }
        }
        // Scan while the writer makes at least 3 passes (bounded).
        let until = Date().addingTimeInterval(20)
        var scans = 0
        while lastPass.load(ordering: .acquiring) < 3 || scans < 20, Date() < until {
            for p in try t.scanned() { copy[p] = read(p) }
            scans += 1
        }
        stop.store(true, ordering: .relaxed)
        writer.join()
        for p in try t.scanned() { copy[p] = read(p) }
        #expect(lastPass.load(ordering: .acquiring) >= 3, "the writer made too few passes to test anything")
        let stale = (0..<pages).filter { copy[$0] != read($0) }
        #expect(stale.isEmpty, "\(stale.count) pages are stale in the copy, first \(stale.prefix(8))")
        #expect(try t.scanned().isEmpty)
    }

    @Test("the mapping check passes for the tracked file and fails for another inode or once part of the RAM is unmapped")
    func mappingCheck() throws {
        let t = try TrackedRAM(pages: 64)
        var st = stat()
        #expect(stat(t.path, &st) == 0)
        try t.scan.checkMapping(inode: UInt64(st.st_ino))
        #expect(throws: GuestMemoryError.self) { try t.scan.checkMapping(inode: UInt64(st.st_ino) + 1) }
        // The last 4 pages go away (RAMFile's own munmap later finds them
        // gone, which is no error).
        #expect(munmap(t.ram.base + 60 * 4096, 4 * 4096) == 0)
        let error = #expect(throws: GuestMemoryError.self) { try t.scan.checkMapping(inode: UInt64(st.st_ino)) }
        #expect(error?.description.contains("unmapped or remapped") == true, "\(String(describing: error))")
    }

    @Test("with several RAM blocks side by side the check wants each block's file at its start, in order")
    func mappingCheckOfBlocks() throws {
        let paths = (0..<2).map { "/dev/shm/livemig-wp-test-\(UUID().uuidString)-\($0).ram" }
        defer { for p in paths { unlink(p) } }
        let files = try [48, 16].enumerated().map { i, pages in
            try RAMFile.create(path: FilePath(paths[i]), size: UInt64(pages * 4096), blockName: "b\(i)")
        }
        let ram = try RAMFile.combining(files)
        let scan = try WrittenPageScan(pid: getpid(), base: UInt64(UInt(bitPattern: ram.base)), pageSize: 4096, pageCount: 64)
        let inodes = paths.map { p -> UInt64 in
            var st = stat()
            _ = stat(p, &st)
            return UInt64(st.st_ino)
        }
        try scan.checkMapping(blocks: [(inodes[0], 0), (inodes[1], 48 * 4096)])
        // The blocks in the other order, or the second block's start moved.
        #expect(throws: GuestMemoryError.self) { try scan.checkMapping(blocks: [(inodes[1], 0), (inodes[0], 16 * 4096)]) }
        #expect(throws: GuestMemoryError.self) { try scan.checkMapping(blocks: [(inodes[0], 0), (inodes[1], 32 * 4096)]) }
        // One file's mapping is not the whole range.
        #expect(throws: GuestMemoryError.self) { try scan.checkMapping(inode: inodes[0]) }
    }

    @Test("a process that is gone is a clear error")
    func goneProcess() throws {
        let pid = fork()
        if pid == 0 { _exit(0) }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        #expect(throws: GuestMemoryError.self) {
            _ = try WrittenPageScan(pid: pid, base: 1 << 30, pageSize: 4096, pageCount: 16)
        }
    }

    @Test("a mapping not registered for write tracking is refused by the scan")
    func unregisteredRange() throws {
        let path = "/dev/shm/livemig-wp-test-\(UUID().uuidString).ram"
        defer { unlink(path) }
        let ram = try RAMFile.create(path: FilePath(path), size: 16 * 4096)
        let scan = try WrittenPageScan(pid: getpid(), base: UInt64(UInt(bitPattern: ram.base)), pageSize: 4096, pageCount: 16)
        let error = #expect(throws: GuestMemoryError.self) { try scan.collect { _ in } }
        #expect(error?.description.contains("PAGEMAP_SCAN") == true, "\(String(describing: error))")
    }
}
