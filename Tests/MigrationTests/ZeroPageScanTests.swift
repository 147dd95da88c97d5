import Foundation
import GuestMemory
import SystemPackage
import TestSupport
import Testing

@testable import Migration

#if canImport(Glibc)
    import Glibc
#endif

@Suite("ZeroPageScan")
struct ZeroPageScanTests {
    static let pageSize = 4096

    /// A 1 MiB RAM file (256 pages) in a fresh directory on /dev/shm (tmpfs
    /// keeps 4 KiB folios there, so what a fault maps is predictable): page
    /// p is zero unless `data(p)`, then random.
    static func withRAM(data: (Int) -> Bool, _ body: (RAMFile) throws -> Void) throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-zscan-\(UUID().uuidString)")
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

    @Test("both ways find exactly the zero pages; a mostly-zero batch makes the next one read, not map")
    func bothWays() throws {
        // Pages 0..<128 all zero; in 128..<256 every third page has data.
        let hasData = { (p: Int) in p >= 128 && p % 3 == 0 }
        try Self.withRAM(data: hasData) { ram in
            let scan = ZeroPageScan(ram: ram)
            let first = Self.batch(Array(0..<128))
            scan.scan(first)
            #expect((0..<128).allSatisfy { scan.isZero[$0] })
            // Scanned in place: the pages are mapped now.
            let firstMapped = try isPageMapped(ram.base + 5 * Self.pageSize)
            #expect(firstMapped)
            // Far from the first batch: not mapped by its faults' fault-around.
            let before = try isPageMapped(ram.base + 200 * Self.pageSize)
            #expect(!before)

            // The previous batch was all zero: this one is read with pread,
            // in two runs (a gap at 190), and its zero pages stay unmapped.
            let pages = Array(128..<190) + Array(191..<256)
            let second = Self.batch(pages)
            scan.scan(second)
            for (i, p) in pages.enumerated() { #expect(scan.isZero[i] == !hasData(p), "page \(p)") }
            let readMapped = try isPageMapped(ram.base + 200 * Self.pageSize)
            #expect(!readMapped, "a zero page found by pread was mapped")

            // That batch was only 2/3 zero: the next one goes through the mapping.
            let third = Self.batch([200, 202])
            scan.scan(third)
            #expect(scan.isZero[0] && scan.isZero[1])
            let thirdMapped = try isPageMapped(ram.base + 200 * Self.pageSize)
            #expect(thirdMapped)
        }
    }
}
