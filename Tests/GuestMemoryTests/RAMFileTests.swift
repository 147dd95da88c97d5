import CShims
import Foundation
import GuestMemory
import SystemPackage
import TestSupport
import Testing
import WorkerThreads

@Suite("RAMFile")
struct RAMFileTests {
    static let pageSize: UInt64 = 4096
    static let oneMiB: UInt64 = 1 << 20

    /// Runs `body` with a fresh, empty directory that is removed afterwards.
    static func withTempDir<R>(_ body: (URL) throws -> R) throws -> R {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("livemig-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        return try body(dir)
    }

    static func path(_ url: URL) -> FilePath { FilePath(url.path) }

    static func fileSize(_ url: URL) throws -> UInt64 {
        let attributes = try FileManager.default.attributesOfItem(atPath: url.path)
        return try #require(attributes[.size] as? NSNumber).uint64Value
    }

    static func writeFile(_ url: URL, bytes: Int) throws {
        try Data(repeating: 0x5A, count: bytes).write(to: url)
    }

    // MARK: - create

    @Test func createMakesAFileOfTheSize() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            let ram = try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
            #expect(try Self.fileSize(url) == Self.oneMiB)
            #expect(ram.block == RAMBlock(name: "pc.ram", size: Self.oneMiB, pageSize: Self.pageSize))
            #expect(ram.block.pageCount == 256)
            #expect(ram.access == .readWrite)
            #expect(ram.path == Self.path(url))
            #expect(ram.pointer(at: 0) == ram.base)
            #expect(ram.pointer(at: 8192) == ram.base + 8192)
            // A new file reads as zeros everywhere.
            let bytes = UnsafeRawBufferPointer(start: ram.base, count: Int(Self.oneMiB))
            #expect(bytes.allSatisfy { $0 == 0 })
        }
    }

    @Test func createUsesTheBlockName() throws {
        try Self.withTempDir { dir in
            let ram = try RAMFile.create(
                path: Self.path(dir.appendingPathComponent("vram")), size: 65536, pageSize: Self.pageSize,
                blockName: "vga.vram")
            #expect(ram.block.name == "vga.vram")
            #expect(ram.block.size == 65536)
        }
    }

    @Test func createReusesAFileOfTheSameSizeWithoutClearingIt() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            do {
                let ram = try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
                ram.pointer(at: 12345).storeBytes(of: 0xC0FF_EE00_DEAD_BEEF, as: UInt64.self)
            }
            let again = try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
            #expect(again.pointer(at: 12345).loadUnaligned(as: UInt64.self) == 0xC0FF_EE00_DEAD_BEEF)
        }
    }

    @Test func createRejectsAnExistingFileOfAnotherSize() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 8192)
            let error = #expect(throws: GuestMemoryError.self) {
                try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
            }
            #expect(error?.description.contains("8192") == true, "\(String(describing: error))")
            #expect(error?.description.contains("1048576") == true, "\(String(describing: error))")
            // Never truncated: it may be someone's guest.
            #expect(try Self.fileSize(url) == 8192)
            #expect(try Data(contentsOf: url) == Data(repeating: 0x5A, count: 8192))
        }
    }

    @Test func createChecksGeometryBeforeTouchingTheFile() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            let error = #expect(throws: GuestMemoryError.self) {
                try RAMFile.create(path: Self.path(url), size: 5000, pageSize: Self.pageSize)
            }
            #expect(error?.description.contains("5000") == true)
            #expect(error?.description.contains("4096") == true)
            #expect(!FileManager.default.fileExists(atPath: url.path))

            let empty = #expect(throws: GuestMemoryError.self) {
                try RAMFile.create(path: Self.path(url), size: 0, pageSize: Self.pageSize)
            }
            #expect(empty?.description.contains("empty") == true)
            #expect(!FileManager.default.fileExists(atPath: url.path))
        }
    }

    // MARK: - open

    @Test func openOfAMissingFileSaysItDoesNotExist() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("no-such-ram")
            for access in [RAMFile.Access.readOnly, .readWrite] {
                let error = #expect(throws: GuestMemoryError.self) {
                    try RAMFile(path: Self.path(url), access: access, pageSize: Self.pageSize)
                }
                #expect(error?.description.contains("does not exist") == true, "\(String(describing: error))")
                #expect(error?.description.contains(url.path) == true)
                #expect(error?.errno == .noSuchFileOrDirectory)
            }
            #expect(!FileManager.default.fileExists(atPath: url.path))
        }
    }

    @Test func openRejectsASizeNotAMultipleOfThePageSize() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 8193)
            let error = #expect(throws: GuestMemoryError.self) {
                try RAMFile(path: Self.path(url), access: .readOnly, pageSize: Self.pageSize)
            }
            #expect(error?.description.contains("8193") == true, "\(String(describing: error))")
            #expect(error?.description.contains("page size 4096") == true, "\(String(describing: error))")
            // 8192 is a multiple of 4096 but not of 16384.
            try Self.writeFile(url, bytes: 8192)
            #expect(throws: GuestMemoryError.self) {
                try RAMFile(path: Self.path(url), access: .readOnly, pageSize: 16384)
            }
        }
    }

    @Test func openRejectsAnEmptyFile() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 0)
            for access in [RAMFile.Access.readOnly, .readWrite] {
                let error = #expect(throws: GuestMemoryError.self) {
                    try RAMFile(path: Self.path(url), access: access, pageSize: Self.pageSize)
                }
                #expect(error?.description.contains("is empty") == true, "\(String(describing: error))")
            }
        }
    }

    @Test func openRejectsABadPageSize() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 12288)
            for bad: UInt64 in [3000, 2048, 12288] {
                let error = #expect(throws: GuestMemoryError.self) {
                    try RAMFile(path: Self.path(url), access: .readOnly, pageSize: bad)
                }
                #expect(error?.description.contains("page size \(bad)") == true, "\(String(describing: error))")
            }
        }
    }

    @Test func openRejectsADirectory() throws {
        try Self.withTempDir { dir in
            let readOnly = #expect(throws: GuestMemoryError.self) {
                try RAMFile(path: Self.path(dir), access: .readOnly, pageSize: Self.pageSize)
            }
            #expect(readOnly?.description.contains("not a regular file") == true, "\(String(describing: readOnly))")
            let readWrite = #expect(throws: GuestMemoryError.self) {
                try RAMFile(path: Self.path(dir), access: .readWrite, pageSize: Self.pageSize)
            }
            #expect(readWrite?.description.contains("is a directory") == true, "\(String(describing: readWrite))")
        }
    }

    @Test func openTakesTheBlockSizeFromTheFile() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 3 * 4096)
            let ram = try RAMFile(path: Self.path(url), access: .readOnly, pageSize: Self.pageSize, blockName: "rom")
            #expect(ram.block == RAMBlock(name: "rom", size: 3 * 4096, pageSize: 4096))
            #expect(ram.access == .readOnly)
            let bytes = UnsafeRawBufferPointer(start: ram.base, count: 3 * 4096)
            #expect(bytes.allSatisfy { $0 == 0x5A })
        }
    }

    // MARK: - sharing and population

    @Test func readOnlyMappingSeesWritesThroughReadWriteMapping() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            let size: UInt64 = 4 * Self.oneMiB
            let writer = try RAMFile.create(path: Self.path(url), size: size, pageSize: Self.pageSize)
            // Written before the reader maps the file...
            for page in stride(from: 0, to: Int(size / Self.pageSize), by: 7) {
                writer.pointer(at: UInt64(page) * Self.pageSize).storeBytes(of: UInt64(page) | 0xAB00_0000, as: UInt64.self)
            }
            let reader = try RAMFile(path: Self.path(url), access: .readOnly, pageSize: Self.pageSize)
            #expect(reader.block.size == size)
            #expect(reader.base != writer.base)
            for page in stride(from: 0, to: Int(size / Self.pageSize), by: 7) {
                let v = reader.pointer(at: UInt64(page) * Self.pageSize).load(as: UInt64.self)
                #expect(v == UInt64(page) | 0xAB00_0000, "page \(page)")
            }
            // ...and after: the mappings are shared.
            writer.pointer(at: size - 8).storeBytes(of: 0x1122_3344_5566_7788, as: UInt64.self)
            #expect(reader.pointer(at: size - 8).load(as: UInt64.self) == 0x1122_3344_5566_7788)
        }
    }

    @Test func writesReachTheFile() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            do {
                let ram = try RAMFile.create(path: Self.path(url), size: 65536, pageSize: Self.pageSize)
                ram.pointer(at: 4096 + 3).storeBytes(of: 0x42, as: UInt8.self)
            }
            let data = try Data(contentsOf: url)
            #expect(data.count == 65536)
            #expect(data[4096 + 3] == 0x42)
            #expect(data.filter { $0 != 0 }.count == 1)
        }
    }

    @Test func populateForWritingAndReading() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            let ram = try RAMFile.create(path: Self.path(url), size: 2 * Self.oneMiB, pageSize: Self.pageSize)
            try ram.populate(forWriting: true)
            try ram.populate(forWriting: false)
            try ram.populate(offset: Self.oneMiB, length: 8192, forWriting: true)
            // The mapping still works and is still all zero.
            ram.pointer(at: Self.oneMiB).storeBytes(of: 9, as: UInt64.self)
            #expect(ram.pointer(at: Self.oneMiB).load(as: UInt64.self) == 9)

            let reader = try RAMFile(path: Self.path(url), access: .readOnly, pageSize: Self.pageSize)
            try reader.populate(forWriting: false)
            #expect(reader.pointer(at: Self.oneMiB).load(as: UInt64.self) == 9)
            // A read-only mapping cannot be pre-faulted for writing.
            let error = #expect(throws: GuestMemoryError.self) { try reader.populate(forWriting: true) }
            #expect(error?.description.contains("madvise") == true, "\(String(describing: error))")
            #expect(error?.errno != nil)
        }
    }

    @Test func createdEmptyOnlyWhenCreateSizedAnEmptyFile() throws {
        try Self.withTempDir { dir in
            let url = dir.appendingPathComponent("ram")
            let fresh = try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
            #expect(fresh.createdEmpty)
            // Reused at the same size: it may hold anything now.
            let reused = try RAMFile.create(path: Self.path(url), size: Self.oneMiB, pageSize: Self.pageSize)
            #expect(!reused.createdEmpty)
            let opened = try RAMFile(path: Self.path(url), access: .readWrite, pageSize: Self.pageSize)
            #expect(!opened.createdEmpty)
        }
    }

    @Test func writeAndReadGoThroughTheFileAndAgreeWithTheMapping() throws {
        try Self.withTempDir { dir in
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: Self.oneMiB, pageSize: Self.pageSize)
            let bytes: [UInt8] = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
            try bytes.withUnsafeBytes { b in try ram.write(from: b.baseAddress!, offset: 3 * 4096, length: b.count) }
            // The mapping sees the write (one page cache)...
            #expect((0..<8192).allSatisfy { ram.base.load(fromByteOffset: 3 * 4096 + $0, as: UInt8.self) == bytes[$0] })
            // ...and read returns it, without the mapping.
            let back = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
            defer { back.deallocate() }
            try ram.read(into: back.baseAddress!, offset: 3 * 4096, length: 8192)
            #expect(Array(back) == bytes)
            // Past the end of the file there is nothing to read: an error
            // that says the file is shorter now.
            let e = #expect(throws: GuestMemoryError.self) {
                try ram.read(into: back.baseAddress!, offset: Self.oneMiB, length: 4096)
            }
            #expect(e?.description.contains("shorter") == true, "\(String(describing: e))")
        }
    }

    // MARK: - page tables

    @Test func dropPageTablesUnmapsPagesAndKeepsTheirData() throws {
        try Self.withTempDir { dir in
            let size: UInt64 = 64 << 20
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: size, pageSize: Self.pageSize)
            let touched = [0, 4097, Int(size / 2) + 5, Int(size) - 1]
            for (i, o) in touched.enumerated() { ram.base.storeBytes(of: UInt8(0xA0 + i), toByteOffset: o, as: UInt8.self) }
            for o in touched { #expect(try isPageMapped(ram.base + o)) }
            ram.dropPageTables(threads: 3)
            for o in touched { #expect(try !isPageMapped(ram.base + o), "page at \(o) still mapped") }
            // The bytes are in the file, and the mapping still works.
            for (i, o) in touched.enumerated() { #expect(ram.base.load(fromByteOffset: o, as: UInt8.self) == UInt8(0xA0 + i)) }
        }
    }

    @Test func dropPageTablesOfARangeLeavesTheRestMapped() throws {
        try Self.withTempDir { dir in
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: Self.oneMiB, pageSize: Self.pageSize)
            for p in 0..<8 { ram.base.storeBytes(of: UInt8(p + 1), toByteOffset: p * 4096, as: UInt8.self) }
            ram.dropPageTables(offset: 2 * 4096, length: 3 * 4096)
            for p in 0..<8 {
                let mapped = try isPageMapped(ram.base + p * 4096)
                #expect(mapped == !(2..<5).contains(p), "page \(p)")
            }
            // Reading faults them back in (after the checks: fault-around
            // maps neighbours too), with their data.
            for p in 0..<8 { #expect(ram.base.load(fromByteOffset: p * 4096, as: UInt8.self) == UInt8(p + 1)) }
        }
    }

    /// The drop threads lower their own priority (nice 19). On Linux the
    /// nice value is per thread, so the rest of the process, the migration
    /// and the peer it is waiting for, keeps its priority.
    @Test func backgroundPriorityIsTheCallingThreadsOnly() {
        let which = __priority_which_t(PRIO_PROCESS.rawValue)
        let before = getpriority(which, 0)
        let seen = UnsafeMutablePointer<Int32>.allocate(capacity: 2)
        defer { seen.deallocate() }
        let box = UInt(bitPattern: seen)
        let thread = WorkerThread(name: "nice-test") {
            let p = UnsafeMutablePointer<Int32>(bitPattern: box)!
            p[0] = lm_set_thread_background_priority()
            p[1] = getpriority(which, 0)
        }
        thread.join()
        #expect(seen[0] == 0)
        #expect(seen[1] == 19)
        #expect(getpriority(which, 0) == before, "the test's own thread was reniced")
    }

    @Test func dropPageTablesLeavesSmallMappingsToMunmap() throws {
        try Self.withTempDir { dir in
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: Self.oneMiB, pageSize: Self.pageSize)
            ram.base.storeBytes(of: 1, as: UInt8.self)
            ram.dropPageTables(threads: 2)
            #expect(try isPageMapped(ram.base))
        }
    }

    @Test func populateOnThreadsMapsEverySlice() throws {
        try Self.withTempDir { dir in
            let size: UInt64 = 64 << 20
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: size, pageSize: Self.pageSize)
            // Three slices of 5462, 5462 and 5460 pages: check the ends of each.
            let probes = [0, 5461, 5462, 10923, 10924, 16383].map { $0 * 4096 }
            for o in probes { #expect(try !isPageMapped(ram.base + o)) }
            try ram.populate(forWriting: true, threads: 3)
            for o in probes { #expect(try isPageMapped(ram.base + o), "page at \(o) not populated") }
        }
    }

    @Test func populateOnThreadsReportsAFailure() throws {
        try Self.withTempDir { dir in
            let path = Self.path(dir.appendingPathComponent("ram"))
            _ = try RAMFile.create(path: path, size: 64 << 20, pageSize: Self.pageSize)
            // A read-only mapping cannot be populated for writing.
            let ram = try RAMFile(path: path, access: .readOnly)
            #expect(throws: GuestMemoryError.self) { try ram.populate(forWriting: true, threads: 2) }
        }
    }

    @Test func dropPageTablesLeavesALittleTouchedMappingToMunmap() throws {
        try Self.withTempDir { dir in
            let size: UInt64 = 64 << 20
            let ram = try RAMFile.create(path: Self.path(dir.appendingPathComponent("ram")), size: size, pageSize: Self.pageSize)
            ram.base.storeBytes(of: 1, as: UInt8.self)
            ram.dropPageTables(threads: 2, touchedBytes: 4096)
            #expect(try isPageMapped(ram.base), "a 4 KiB touch is not worth the threads")
            ram.dropPageTables(threads: 2, touchedBytes: size)
            #expect(try !isPageMapped(ram.base))
        }
    }

    @Test func faultInWindowsMapsTheTouchedPagesOnly() throws {
        // On /dev/shm: tmpfs keeps 4 KiB folios there, while a freshly
        // written ext4 file may sit in large folios that one fault maps whole.
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        do {
            let url = dir.appendingPathComponent("ram")
            try Self.writeFile(url, bytes: 1 << 20)
            let ram = try RAMFile(path: Self.path(url), access: .readOnly, pageSize: Self.pageSize)
            // Pages 1..5 are close together, 40 is further on: at most two
            // touches (the mapping need not be window-aligned) for 1..5.
            let pages: [UInt64] = [1, 2, 3, 4, 5, 40]
            let offsets = pages.map { $0 * Self.pageSize }
            lm_fault_in_windows(ram.base, offsets, offsets.count, 64 << 10)
            #expect(try isPageMapped(ram.base + 4096))
            #expect(try isPageMapped(ram.base + 40 * 4096))
            // Nothing far from the touched pages (fault-around maps a few
            // neighbours; how many is the kernel's business).
            let far = try isPageMapped(ram.base + 200 * 4096)
            #expect(!far)
        }
    }

    // MARK: - several blocks

    /// Three files combined side by side: one offset space, block starts
    /// in order, and reads, writes and discards that reach the right file
    /// even when a range spans two blocks.
    @Test func combiningMapsBlocksSideBySide() throws {
        try Self.withTempDir { dir in
            let sizes: [UInt64] = [4 * Self.pageSize, 2 * Self.pageSize, Self.pageSize]
            let names = ["pc.ram", "vga.vram", "pc.rom"]
            var files: [RAMFile] = []
            for (i, size) in sizes.enumerated() {
                let f = try RAMFile.create(path: Self.path(dir.appendingPathComponent(names[i])), size: size, blockName: names[i])
                // Each block's first byte names it.
                f.pointer(at: 0).storeBytes(of: UInt8(i + 1), as: UInt8.self)
                files.append(f)
            }
            let ram = try RAMFile.combining(files)
            #expect(ram.blocks.map(\.name) == names)
            #expect(ram.blockStarts == [0, 4 * Self.pageSize, 6 * Self.pageSize])
            #expect(ram.block.size == 7 * Self.pageSize && ram.block.pageCount == 7)
            #expect((0..<7).map(ram.blockIndex(ofPage:)) == [0, 0, 0, 0, 1, 1, 2])
            // The combined mapping shows each file's bytes at its start.
            for (i, start) in ram.blockStarts.enumerated() {
                #expect(ram.pointer(at: start).load(as: UInt8.self) == UInt8(i + 1))
            }
            // A write through the combined mapping lands in the file.
            ram.pointer(at: 6 * Self.pageSize + 8).storeBytes(of: UInt8(0xEE), as: UInt8.self)
            #expect(files[2].pointer(at: 8).load(as: UInt8.self) == 0xEE)
            // pwrite and pread across the boundary of blocks 0 and 1.
            let span = Int(Self.pageSize) * 2
            let out = [UInt8]((0..<span).map { UInt8(truncatingIfNeeded: $0 * 7) })
            try out.withUnsafeBytes { try ram.write(from: $0.baseAddress!, offset: 3 * Self.pageSize, length: span) }
            #expect(files[0].pointer(at: 3 * Self.pageSize).load(as: UInt8.self) == out[0])
            #expect(files[1].pointer(at: 0).load(as: UInt8.self) == out[Int(Self.pageSize)])
            var back = [UInt8](repeating: 0, count: span)
            try back.withUnsafeMutableBytes { try ram.read(into: $0.baseAddress!, offset: 3 * Self.pageSize, length: span) }
            #expect(back == out)
            // A discard across the boundary empties both files' pages.
            try ram.discard(offset: 3 * Self.pageSize, length: 2 * Self.pageSize)
            #expect(files[1].pointer(at: 0).load(as: UInt8.self) == 0)
            #expect(files[0].pointer(at: 3 * Self.pageSize).load(as: UInt8.self) == 0)
            #expect(files[0].pointer(at: 0).load(as: UInt8.self) == 1, "the discard went past its range")
        }
    }

    @Test func combiningRefusesBlocksOfDifferentPageSizes() throws {
        try Self.withTempDir { dir in
            let a = try RAMFile.create(path: Self.path(dir.appendingPathComponent("a")), size: 8192, pageSize: 4096)
            let b = try RAMFile.create(path: Self.path(dir.appendingPathComponent("b")), size: 16384, pageSize: 8192)
            #expect(throws: GuestMemoryError.self) { try RAMFile.combining([a, b]) }
            // One file is itself.
            #expect(try RAMFile.combining([a]) === a)
        }
    }
}
