import GuestMemory
import MigrationWire
import Trust
import WorkerThreads

@testable import Migration
@testable import URing

#if canImport(Glibc)
    import Glibc
#endif

// libFuzzer target: a recorded migration, mutated, through socketpairs into
// the destination's real code: a PacketReceiver (header decode, prefix
// check, entries, payload, zstd, per-page hash check, placing into a mapped
// 256 KiB RAM file) and a ControlChannel (frame header, tag, decode).
//
// Input: config u8, main-stream length u32 (big-endian), the main-channel
// bytes (destination's side of the stream, tags included), then the bytes of
// multifd channel 0. Config bit 0: the main hello negotiated zstd. Bit 1:
// the harness re-seals what it feeds, as a source with a bug (not a
// corrupting link) would: the main frames' checksums and the packets'
// prefix checks and page hashes are recomputed, so the mutation reaches the
// decoders and the placing behind those checks. Bit 2: the channel ends
// when the input does, as a source that closes it. Without it the channel
// goes on with 0xFF bytes, which end any packet with a wire or integrity
// error: a receiver that sees its peer close waits 200 ms for the peer's
// reason (FailureLatch.peerExplanationGrace), which would cap the target
// at five inputs a second. Bit 3: the channels are keyed (a fixed test
// key): frames carry HMACs, every packet a 16-byte tag after its payload
// (the receiver verifies a GMAC). Bit 4, with bit 3: the payloads are
// encrypted (AES-256-GCM; the receiver opens them where they lie). With
// bit 1 the harness seals what it feeds with that key, so mutations reach
// what lies behind the MACs too.

private let pageSize: UInt64 = 4096
private let block = RAMBlockLayout(name: "pc.ram", size: 256 << 10, pageSize: pageSize)

/// One RAM file for the whole run, unlinked at once: only its mapping is used.
private let ram: RAMFile = {
    let path = "/tmp/livemig-fuzz-\(getpid()).ram"
    do {
        let r = try RAMFile.create(path: .init(path), size: block.size)
        unlink(path)
        return r
    } catch {
        fatalError("cannot create the fuzz RAM file \(path): \(error)")
    }
}()

/// Enough 0xFF bytes to end any packet, even one that stops in the middle
/// of the largest payload, then a header that fails its magic.
private let trailer = [UInt8](
    repeating: 0xFF,
    count: 2 * MultiFDPacketHeader.maxPrefixSize + Int(CompressionMethod.zstd.payloadBound(UInt64(MultiFDPacketHeader.maxPages) * pageSize))
        + PacketSealer.tagSize)

/// A socket whose peer end receives `bytes` (and `tail`) from a writer
/// thread, then EOF.
private final class Feed {
    let socket: Socket
    private let writer: WorkerThread
    private let fd: Int32

    init(_ bytes: UnsafeRawBufferPointer, tail: [UInt8] = []) {
        var fds: [Int32] = [0, 0]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            fatalError("socketpair: errno \(errno)")
        }
        socket = Socket(fd: fds[0], peer: "fuzz input")
        fd = fds[1]
        let copy = Array(bytes) + tail
        let out = fds[1]
        writer = WorkerThread(name: "fuzz/feed") {
            copy.withUnsafeBytes { b in
                var done = 0
                while done < b.count {
                    // MSG_NOSIGNAL: a receiver that gave up shuts its end.
                    let n = send(out, b.baseAddress! + done, b.count - done, Int32(MSG_NOSIGNAL))
                    if n < 0, errno == EINTR { continue }
                    if n <= 0 { break }
                    done += n
                }
            }
            Glibc.shutdown(out, Int32(SHUT_WR))
        }
    }

    /// Stops the writer (the reader is done) and closes its end.
    func finish() {
        socket.shutdown()
        writer.join()
        close(fd)
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzReceiver(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size >= 5 else { return 0 }
    let input = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
    defer { input.deallocate() }
    input.copyMemory(from: UnsafeRawBufferPointer(start: data, count: size))
    let config = input[0]
    let mainLength = min(Int(UInt32(bigEndian: input.loadUnaligned(fromByteOffset: 1, as: UInt32.self))), size - 5)
    let main = UnsafeMutableRawBufferPointer(rebasing: input[5..<5 + mainLength])
    let channel = UnsafeMutableRawBufferPointer(rebasing: input[(5 + mainLength)...])
    let compression: CompressionMethod = config & 1 != 0 ? .zstd : .none
    let keys = config & 8 != 0 ? fuzzKeys : nil
    let sealer = keys.map { PacketSealer(key: $0.toDestination, encrypts: config & 16 != 0) }
    if config & 2 != 0 {
        resealFrames(main, keys: keys)
        resealPackets(channel, compressed: compression != .none, sealer: sealer)
    }
    receiveMain(UnsafeRawBufferPointer(main), keys: keys)
    receivePackets(UnsafeRawBufferPointer(channel), compression: compression, closes: config & 4 != 0, sealer: sealer)
    return 0
}

/// The keyed mode's channel keys: a fixed key and hello, as if negotiated.
private let fuzzKeys: ChannelKeys = {
    do {
        let key = try PreSharedKey(bytes: [UInt8](repeating: 0x5A, count: 32))
        return ChannelKeys(key: key, hello: [1], challenge: [2], sourceNonce: [3], destinationNonce: [4])
    } catch {
        fatalError("the fuzz key is refused: \(error)")
    }
}()

/// The destination's main-channel reads until the stream fails or ends.
private func receiveMain(_ bytes: UnsafeRawBufferPointer, keys: ChannelKeys?) {
    let feed = Feed(bytes)
    let control = ControlChannel(socket: feed.socket, keys: keys, isSource: false)
    while true {
        do {
            _ = try control.receive("fuzz main channel")
        } catch {
            _ = error.description
            break
        }
    }
    feed.finish()
}

/// One receiver thread's loop on channel 0, run here until its stream fails
/// or ends. Every SYNC is let through at once (no other channel to wait for).
private func receivePackets(_ bytes: UnsafeRawBufferPointer, compression: CompressionMethod, closes: Bool, sealer: PacketSealer?) {
    let feed = Feed(bytes, tail: closes ? [] : trailer)
    let pages = Int(block.size / pageSize)
    let limits = PacketLimits(
        channelID: 0, pageSize: pageSize, blocks: [block], compression: compression, tagSize: sealer == nil ? 0 : PacketSealer.tagSize)
    let receiver: PacketReceiver
    do {
        receiver = try PacketReceiver(
            id: 0, socket: feed.socket, ram: ram, limits: limits, counters: TransferCounters(),
            arrived: DirtyBitmap(pageCount: pages), roundSeen: DirtyBitmap(pageCount: pages), table: PageTable(pages: pages),
            sealer: sealer)
    } catch {
        fatalError("cannot build a receiver: \(error)")
    }
    let barrier = RoundBarrier(channels: 1)
    for _ in 0...(bytes.count / MultiFDPacketHeader.size) { barrier.resume[0].signal() }
    let latch = FailureLatch()
    receiver.run(barrier: barrier, latch: latch)
    precondition(latch.hasFailed, "the receiver stopped without a failure")
    feed.finish()
}

/// Recomputes each frame's tag (the unkeyed XXH3-128 checksum over the
/// sequence number and the frame, or with `keys` its HMAC), as a source
/// would send it.
private func resealFrames(_ stream: UnsafeMutableRawBufferPointer, keys: ChannelKeys?) {
    var sealer = FrameSealer(key: keys?.toDestination)
    var pos = 0
    while stream.count - pos >= MainMessage.frameHeaderSize {
        let length = Int(UInt32(bigEndian: stream.loadUnaligned(fromByteOffset: pos + 4, as: UInt32.self)))
        let end = pos + MainMessage.frameHeaderSize + length
        guard end + MainMessage.frameTagSize <= stream.count else { return }
        let tag = sealer.tag(UnsafeRawBufferPointer(rebasing: stream[pos..<end]))
        for (i, b) in tag.enumerated() { stream[end + i] = b }
        pos = end + MainMessage.frameTagSize
    }
}

/// Recomputes each packet's page hashes (uncompressed) and prefix check,
/// walking the stream by the header's own counts as far as they make sense;
/// with `sealer`, also its tag (after the payload), and with encryption the
/// payload found there is taken as plaintext and encrypted in place.
private func resealPackets(_ stream: UnsafeMutableRawBufferPointer, compressed: Bool, sealer: PacketSealer?) {
    guard let base = stream.baseAddress else { return }
    let h = MultiFDPacketHeader.size, e = MultiFDPacketHeader.entrySize
    func be32(_ o: Int) -> Int { Int(UInt32(bigEndian: base.loadUnaligned(fromByteOffset: o, as: UInt32.self))) }
    var pos = 0
    while stream.count - pos >= h {
        let normal = be32(pos + 12), zero = be32(pos + 16), payload = be32(pos + 20)
        guard normal + zero <= MultiFDPacketHeader.maxPages else { return }
        let entriesEnd = pos + h + (normal + zero) * e
        guard entriesEnd <= stream.count else { return }
        if !compressed, entriesEnd + normal * Int(pageSize) <= stream.count {
            for i in 0..<normal {
                let hash = ContentHash.page(base + entriesEnd + i * Int(pageSize), length: Int(pageSize))
                (base + pos + h + i * e + 8).storeBytes(of: hash.bigEndian, as: UInt64.self)
            }
        }
        MultiFDPacketHeader.storeCheck(0, to: base + pos)
        let check = ContentHash.page(base + pos, length: entriesEnd - pos)
        MultiFDPacketHeader.storeCheck(check, to: base + pos)
        guard let sealer else {
            pos = entriesEnd + payload
            continue
        }
        let tag = entriesEnd + payload
        guard tag + PacketSealer.tagSize <= stream.count else { return }
        let number = UInt64(bigEndian: base.loadUnaligned(fromByteOffset: pos + 24, as: UInt64.self))
        let prefix = UnsafeRawBufferPointer(start: base + pos, count: entriesEnd - pos)
        do {
            if sealer.encrypts {
                let (ciphertext, mac) = try sealer.seal(
                    UnsafeRawBufferPointer(start: base + entriesEnd, count: payload), prefix: prefix, packetNumber: number)
                ciphertext.withUnsafeBytes {
                    if $0.count > 0 { (base + entriesEnd).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
                }
                mac.withUnsafeBytes { (base + tag).copyMemory(from: $0.baseAddress!, byteCount: PacketSealer.tagSize) }
            } else {
                try sealer.authenticate(
                    UnsafeRawBufferPointer(start: base + pos, count: tag - pos), packetNumber: number, into: base + tag)
            }
        } catch {
            fatalError("cannot seal a fuzz packet: \(error)")
        }
        pos = tag + PacketSealer.tagSize
    }
}
