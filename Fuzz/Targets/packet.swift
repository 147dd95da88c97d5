// libFuzzer target: the multifd packet header and entries decoders, in the
// receiver's order (MultiFDPacketHeader.decode, then decodeEntries over the
// entries that follow). Built with the MigrationWire sources. The input is
// one packet's header and entries, as on the wire.

private let block = RAMBlockLayout(name: "pc.ram", size: 256 << 10, pageSize: 4096)
/// The limits a destination of a 256 KiB RAM file derives: plain and zstd.
private let limitSets = [
    PacketLimits(channelID: 0, pageSize: 4096, blocks: [block]),
    PacketLimits(channelID: 1, pageSize: 4096, blocks: [block], compression: .zstd, tagSize: 16),
]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzPacket(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size >= MultiFDPacketHeader.size else { return 0 }
    // Exact-size copies (header and entries apart, as the receiver reads
    // them), so any read past what was received is an ASan heap overflow.
    let header = UnsafeMutableRawPointer.allocate(byteCount: MultiFDPacketHeader.size, alignment: 8)
    defer { header.deallocate() }
    header.copyMemory(from: data, byteCount: MultiFDPacketHeader.size)
    let rest = size - MultiFDPacketHeader.size
    let number = UInt64(bigEndian: header.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
    for limits in limitSets {
        // Packet 0 (a fresh channel) and the packet's own number (a channel
        // that got this far).
        for expected in Set([0, number]) {
            guard let h = try? MultiFDPacketHeader.decode(header, limits: limits, expectedPacketNumber: expected) else { continue }
            precondition(h.prefixSize <= MultiFDPacketHeader.maxPrefixSize, "prefix of \(h.prefixSize) bytes")
            precondition(h.pagesSize(limits: limits) <= MultiFDPacketHeader.maxPages * Int(limits.pageSize))
            if h.flags.contains(.sync) { continue }
            guard rest >= h.entriesSize else { continue }  // the receiver would wait for more
            let count = Int(h.normalCount + h.zeroCount)
            let entries = UnsafeMutableRawPointer.allocate(byteCount: h.entriesSize, alignment: 8)
            let offsets = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
            let hashes = UnsafeMutablePointer<UInt64>.allocate(capacity: count)
            defer {
                entries.deallocate()
                offsets.deallocate()
                hashes.deallocate()
            }
            entries.copyMemory(from: data + MultiFDPacketHeader.size, byteCount: h.entriesSize)
            do {
                try h.decodeEntries(entries, offsets: offsets, hashes: hashes, limits: limits)
                for i in 0..<count {
                    // What the receiver relies on before it writes guest memory.
                    precondition(offsets[i] % limits.pageSize == 0 && offsets[i] + limits.pageSize <= block.size, "offset \(offsets[i])")
                }
            } catch {
                _ = error.description
            }
        }
    }
    return 0
}
