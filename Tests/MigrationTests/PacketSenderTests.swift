import Foundation
import GuestMemory
import MigrationWire
import SystemPackage
import TestSupport
import Testing

@testable import Migration

/// The uncompressed sender end to end, through a capturing writer: a job
/// whose batches are staged in their slots and one read in place goes out
/// as packets whose payload is exactly the normal pages, in the order of
/// the header's offsets.
@Suite("PacketSender")
struct PacketSenderTests {
    @Test("staged and in-place batches of one job: every payload page is the file's page, in offset order")
    func stagedAndInPlacePayloads() throws {
        let dir = URL(fileURLWithPath: "/dev/shm/livemig-psend-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: false)
        defer { try? FileManager.default.removeItem(at: dir) }
        let pages = 512, pageSize = 4096
        let isZero = { (p: Int) in p % 5 == 2 }
        var image = [UInt8](repeating: 0, count: pages * pageSize)
        var g = SplitMix64(seed: 99)
        for p in 0..<pages where !isZero(p) {
            for w in 0..<(pageSize / 8) {
                let v = g.next() | 1
                for k in 0..<8 { image[p * pageSize + w * 8 + k] = UInt8(truncatingIfNeeded: v >> (8 * k)) }
            }
        }
        let path = dir.appendingPathComponent("ram").path
        try Data(image).write(to: URL(fileURLWithPath: path))
        let ram = try RAMFile(path: FilePath(path), access: .readOnly)

        // Batch 0: two runs (a gap at 60), staged in slot 0. Batch 1: one
        // run, staged in slot 1; were it staged over slot 0, batch 0's
        // payload would carry batch 1's bytes. Batch 2: 16 single pages,
        // read in place.
        let batches = [
            Array(0..<60) + Array(61..<128),
            Array(128..<256),
            (0..<16).map { 300 + 7 * $0 },
        ]
        let job = MultiFDJob(capacity: 3)
        for b in batches {
            var batch = MultiFDPages()
            for p in b { batch.append(offset: UInt64(p * pageSize), block: 0) }
            job.take(&batch)
        }
        let writer = CapturingWriter()
        let counters = TransferCounters()
        let sender = try PacketSender(channelID: 0, ram: ram, writer: writer, counters: counters, jobCapacity: 3)
        var released = 0
        try sender.sendJob(job) { released += 1 }
        #expect(released == 1)

        let limits = PacketLimits(
            channelID: 0, pageSize: UInt64(pageSize),
            blocks: [RAMBlockLayout(name: "pc.ram", size: UInt64(pages * pageSize), pageSize: UInt64(pageSize))],
            compression: .none)
        let bytes = writer.bytes
        var at = 0
        for (number, sent) in batches.enumerated() {
            let (h, offsets) = try writer.decodePrefix(at: &at, limits: limits, packetNumber: UInt64(number))
            #expect(h.flags == [])
            // Every page of the batch once: normal ones first, then zero ones.
            #expect(Set(offsets.map { Int($0) / pageSize }) == Set(sent))
            #expect(Int(h.normalCount) == sent.filter { !isZero($0) }.count)
            #expect(Int(h.payloadSize) == Int(h.normalCount) * pageSize)
            for (i, off) in offsets.enumerated() {
                let p = Int(off) / pageSize
                if i < Int(h.normalCount) {
                    #expect(!isZero(p), "page \(p) sent with data")
                    let sentPage = bytes[(at + i * pageSize)..<(at + (i + 1) * pageSize)]
                    let same = sentPage.elementsEqual(image[p * pageSize..<(p + 1) * pageSize])
                    #expect(same, "batch \(number), page \(p): payload bytes differ from the file's")
                } else {
                    #expect(isZero(p), "page \(p) sent as zero")
                }
            }
            at += Int(h.payloadSize)
        }
        #expect(at == bytes.count, "nothing after the job's packets")
        #expect(counters.read(counters.multifdBytes) == UInt64(bytes.count))
        // Only batch 2 went through the mapping.
        #expect(counters.read(counters.pagesReadInPlace) == UInt64(batches[2].count))
    }
}
