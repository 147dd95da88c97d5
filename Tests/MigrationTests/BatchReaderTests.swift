import Foundation
import GuestMemory
import SystemPackage
import TestSupport
import Testing

@testable import Migration

#if canImport(Glibc)
    import Glibc
#endif

@Suite("BatchReader")
struct BatchReaderTests {
    static let pageSize = 4096

    /// A 1 MiB RAM file (256 pages) in a fresh directory on /dev/shm (tmpfs
    /// keeps 4 KiB folios there, so what a fault maps is predictable): page
    /// p is zero unless `data(p)`, then random.
    static func withRAM(data: (Int) -> Bool, _ body: (RAMFile) throws -> Void) throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-breader-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("ram")
        var bytes = Data(count: 256 * pageSize)
        var g = SplitMix64(seed: 77)
        bytes.withUnsafeMutableBytes { b in
            let words = b.bindMemory(to: UInt64.self)
            for p in 0..<256 where data(p) {
                for w in 0..<(pageSize / 8) { words[p * pageSize / 8 + w] = g.next() | 1 }
            }
        }
        try bytes.write(to: url)
        try body(try RAMFile(path: FilePath(url.path), access: .readOnly))
    }

    static func batch(_ pages: [Int]) -> MultiFDPages {
        let b = MultiFDPages()
        for p in pages { b.append(offset: UInt64(p * pageSize), block: 0) }
        return b
    }

    /// Checks what the reader reports for `pages` (read last): the zero
    /// flags, that page i is the copy at `staged + i * pageSize` in the
    /// slot, never the mapping, and that each copy's bytes are the file's
    /// bytes (read with pread, so the check itself maps nothing).
    static func expectRead(_ reader: BatchReader, _ ram: RAMFile, _ pages: [Int], hasData: (Int) -> Bool) {
        let file = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { file.deallocate() }
        let mapping = UnsafeMutableRawPointer(ram.base)..<UnsafeMutableRawPointer(ram.base) + Int(ram.block.size)
        for (i, p) in pages.enumerated() {
            let offset = UInt64(p * pageSize)
            #expect(reader.isZero[i] == !hasData(p), "page \(p)")
            #expect(reader.page(i) == reader.staged + i * pageSize, "page \(p) is not in its slot")
            #expect(!mapping.contains(reader.page(i)), "page \(p) points into the mapping")
            #expect(throws: Never.self) { try ram.read(into: file, offset: offset, length: pageSize) }
            let same = memcmp(reader.page(i), file, pageSize) == 0
            #expect(same, "page \(p): bytes differ from the file's")
        }
    }

    @Test("runs of adjacent pages are staged by pread and never mapped; scattered pages are copied through the mapping")
    func stagedAndCopied() throws {
        // In 0..<128 every third page has data; 128..<256 all have data.
        let hasData = { (p: Int) in p >= 128 || p % 3 == 0 }
        try Self.withRAM(data: hasData) { ram in
            let reader = BatchReader(ram: ram, slots: 2)

            // Two runs of 60 and 67 pages (a gap at 60): staged in slot 0.
            let bulk = Array(0..<60) + Array(61..<128)
            try reader.read(Self.batch(bulk), slot: 0)
            #expect(reader.isStaged)
            Self.expectRead(reader, ram, bulk, hasData: hasData)
            for p in [0, 3, 59, 61, 127] {
                let mapped = try isPageMapped(ram.base + p * Self.pageSize)
                #expect(!mapped, "staged page \(p) was mapped")
            }

            // 16 single pages (runs of 1, fewer than 8 pages per run on
            // average), after a batch that was not mostly zero: copied
            // through the mapping into slot 1.
            let scattered = (0..<16).map { 130 + 7 * $0 }
            let slot0 = reader.staged
            try reader.read(Self.batch(scattered), slot: 1)
            #expect(!reader.isStaged)
            #expect(reader.staged == slot0 + MultiFDPages.capacity * Self.pageSize, "slot 1")
            Self.expectRead(reader, ram, scattered, hasData: hasData)
            let copiedMapped = try isPageMapped(ram.base + 130 * Self.pageSize)
            #expect(copiedMapped)

            // 8 runs of 8 pages: exactly long enough to stage.
            let runsOf8 = (0..<8).flatMap { r in (0..<8).map { 128 + 16 * r + $0 } }
            try reader.read(Self.batch(runsOf8), slot: 1)
            #expect(reader.isStaged)
            Self.expectRead(reader, ram, runsOf8, hasData: hasData)
        }
    }

    @Test("each slot keeps its batch until that slot is read into again")
    func slotsAreIndependent() throws {
        try Self.withRAM(data: { $0 % 2 == 0 }) { ram in
            let reader = BatchReader(ram: ram, slots: 2)
            let first = Array(0..<128), second = Array(128..<256)
            try reader.read(Self.batch(first), slot: 0)
            let slot0 = reader.staged
            try reader.read(Self.batch(second), slot: 1)
            let slot1 = reader.staged
            #expect(slot0 != slot1)
            // Slot 0 still holds the first batch, byte for byte (and its
            // pages differ from the second batch's: odd pages are zero).
            for i in [0, 2, 76, 126] {
                let same = memcmp(slot0 + i * Self.pageSize, ram.base + i * Self.pageSize, Self.pageSize) == 0
                #expect(same, "slot 0, page \(i)")
            }
            // A scattered batch copied into slot 1 leaves slot 0 alone too.
            let scattered = [130, 140, 150]
            try reader.read(Self.batch(scattered), slot: 1)
            #expect(!reader.isStaged && reader.staged == slot1)
            for i in [0, 2, 76, 126] {
                let same = memcmp(slot0 + i * Self.pageSize, ram.base + i * Self.pageSize, Self.pageSize) == 0
                #expect(same, "slot 0, page \(i), after slot 1 was copied into")
            }
        }
    }

    @Test("a mostly-zero batch makes the next scattered batch read by pread, so its zero pages stay unmapped")
    func mostlyZeroStagesScatteredPages() throws {
        // Pages 0..<128 all zero; in 128..<256 every third page has data.
        let hasData = { (p: Int) in p >= 128 && p % 3 == 0 }
        try Self.withRAM(data: hasData) { ram in
            let reader = BatchReader(ram: ram)
            try reader.read(Self.batch(Array(0..<128)))
            #expect((0..<128).allSatisfy { reader.isZero[$0] })

            // Scattered (runs of 1) but after an all-zero batch: staged.
            let scattered = Array(stride(from: 129, to: 256, by: 2))
            try reader.read(Self.batch(scattered))
            #expect(reader.isStaged)
            Self.expectRead(reader, ram, scattered, hasData: hasData)
            let readMapped = try isPageMapped(ram.base + 201 * Self.pageSize)
            #expect(!readMapped, "a page read by pread was mapped")

            // That batch was only 2/3 zero: the next scattered one is copied through the mapping.
            let third = [200, 203]
            try reader.read(Self.batch(third))
            #expect(!reader.isStaged)
            Self.expectRead(reader, ram, third, hasData: hasData)
            let thirdMapped = try isPageMapped(ram.base + 200 * Self.pageSize)
            #expect(thirdMapped)
        }
    }

    @Test("a copy is private: the guest writing a page after it was read does not change what is sent", arguments: [false, true])
    func copiesArePrivate(scattered: Bool) throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-breader-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("ram").path
        try Data(repeating: 0x11, count: 256 * Self.pageSize).write(to: URL(fileURLWithPath: path))
        let ram = try RAMFile(path: FilePath(path), access: .readOnly)
        let reader = BatchReader(ram: ram)
        let pages = scattered ? [3, 10, 17, 24] : Array(0..<128)
        try reader.read(Self.batch(pages))
        #expect(reader.isStaged == !scattered)
        // The guest writes page 10 (and 3) after the read: through the file,
        // which the shared mapping shows at once.
        let fd = open(path, O_RDWR)
        #expect(fd >= 0)
        defer { close(fd) }
        let new = [UInt8](repeating: 0x22, count: Self.pageSize)
        for p in [3, 10] { #expect(pwrite(fd, new, Self.pageSize, off_t(p * Self.pageSize)) == Self.pageSize) }
        #expect((ram.base + 10 * Self.pageSize).load(as: UInt8.self) == 0x22, "the mapping shows the write")
        for (i, p) in pages.enumerated() where p == 3 || p == 10 {
            let copy = UnsafeRawBufferPointer(start: reader.page(i), count: Self.pageSize)
            #expect(copy.allSatisfy { $0 == 0x11 }, "page \(p): the copy changed with the guest's write")
        }
    }

    @Test("a file that shrank under the sender: staging throws naming the file, nothing is decided")
    func shrunkFileThrows() throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-breader-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("ram").path
        try Data(repeating: 7, count: 256 * Self.pageSize).write(to: URL(fileURLWithPath: path))
        let ram = try RAMFile(path: FilePath(path), access: .readOnly)
        #expect(truncate(path, off_t(100 * Self.pageSize)) == 0)
        let reader = BatchReader(ram: ram)
        let e = #expect(throws: GuestMemoryError.self) { try reader.read(Self.batch(Array(64..<192))) }
        #expect(e?.description.contains(path) == true, "\(String(describing: e))")
    }
}
