import CShims
import MigrationWire

/// How the source compresses normal pages: the method the main hello
/// announces, and the level only the source needs.
public struct CompressionSetting: Sendable, Equatable, CustomStringConvertible {
    public var method: CompressionMethod
    /// zstd level (`Zstd.levels`); ignored for `.none`.
    public var level: Int32

    public init(method: CompressionMethod, level: Int32 = Zstd.defaultLevel) {
        self.method = method
        self.level = level
    }

    /// Pages travel as they are.
    public static let none = CompressionSetting(method: .none)

    public var description: String { method == .none ? "none" : "\(method):\(level)" }
}

/// libzstd's figures, from the library linked in.
public enum Zstd {
    /// Level used by `--compress zstd` (QEMU's `multifd-zstd-level` default).
    public static let defaultLevel: Int32 = 1
    /// Levels this libzstd accepts; negative ones trade ratio for speed,
    /// 0 means libzstd's own default (3).
    public static var levels: ClosedRange<Int32> { Int32(lm_zstd_min_level())...Int32(lm_zstd_max_level()) }
    /// `ZSTD_compressBound`: the largest frame `size` bytes can become.
    public static func compressBound(_ size: Int) -> Int { lm_zstd_compress_bound(size) }
    /// The libzstd version, e.g. "1.5.4".
    public static var version: String { String(cString: lm_zstd_version()) }

    static func errorName(_ result: Int) -> String { String(cString: lm_zstd_error_name(result)) }
}

/// One sender channel's zstd state (QEMU's `struct zstd_data`, send side):
/// the context, the copy of the packet's pages, and one frame slot per
/// packet of a job. Made once per channel; owned and used by that channel's
/// sender thread only, so nothing here is allocated per packet.
final class PacketCompressor {
    private let cctx: OpaquePointer
    private let pageSize: Int
    /// Private copies of the normal pages of the packet being built
    /// (`MultiFDPages.capacity` pages). Owned by this channel.
    private let staging: UnsafeMutableRawPointer
    /// `jobCapacity` frame slots of `frameCapacity` bytes: a job's frames
    /// must all live until its one gather write has completed. Owned by this
    /// channel; the write's iovecs point here.
    private let frames: UnsafeMutableRawPointer
    let frameCapacity: Int
    let level: Int32

    init(level: Int32, pageSize: Int, jobCapacity: Int) throws(MigrationError) {
        guard Zstd.levels.contains(level), let c = lm_zstd_cctx_create(level) else {
            throw MigrationError(
                .local, "cannot create a zstd context at level \(level) (this libzstd \(Zstd.version) takes \(Zstd.levels))")
        }
        cctx = c
        self.level = level
        self.pageSize = pageSize
        let pagesCapacity = MultiFDPages.capacity * pageSize
        frameCapacity = Zstd.compressBound(pagesCapacity)
        staging = .allocate(byteCount: pagesCapacity, alignment: 64)
        frames = .allocate(byteCount: jobCapacity * frameCapacity, alignment: 64)
    }

    deinit {
        lm_zstd_cctx_destroy(cctx)
        staging.deallocate()
        frames.deallocate()
    }

    /// Copies one guest page into slot `index` of the packet being built.
    ///
    /// The invariant (QEMU's, from multifd-zlib): compression reads only our
    /// private copy, never the guest mapping. The guest may write a page
    /// while it is being compressed, and zstd reads its input more than once
    /// (match search, then match copy): a page that changes between those
    /// reads can make a frame that decodes to bytes the page never held, or
    /// does not decode at all. Compressing a copy, the frame decodes to
    /// exactly what we copied; a page torn by the guest's write is then an
    /// ordinary torn page, which the dirty bitmap sends again
    /// (GUEST-CONTROL.md §6).
    @inline(__always) func stage(_ page: UnsafeRawPointer, index: Int) {
        (staging + index * pageSize).copyMemory(from: page, byteCount: pageSize)
    }

    /// Compresses staged pages 0..<count into frame slot `slot` (one per
    /// packet of the job). Returns the frame; it stays valid until `slot` is
    /// used again, by the next job.
    func compress(count: Int, slot: Int) throws(MigrationError) -> UnsafeRawBufferPointer {
        let dst = frames + slot * frameCapacity
        let n = lm_zstd_compress(cctx, dst, frameCapacity, staging, count * pageSize)
        // The slot holds compressBound(capacity): zstd cannot run out of
        // room, so an error here is a libzstd failure, not our input.
        if lm_zstd_is_error(n) {
            throw MigrationError(.local, "zstd could not compress \(count) pages: \(Zstd.errorName(n))")
        }
        return UnsafeRawBufferPointer(start: dst, count: n)
    }

    /// The context's memory: tests check it stops growing after a packet.
    var contextBytes: Int { lm_zstd_cctx_size(cctx) }
}

/// One receiver channel's zstd state (QEMU's `struct zstd_data`, receive
/// side): the context, a buffer for the frame as it arrives and one for
/// the pages it decodes to. Made once per channel; owned and used by that
/// channel's receiver thread only.
///
/// Why decode into a buffer and copy, not straight into the mapping: a
/// frame can be checked only by decoding it, and an invalid packet must
/// never write guest memory (docs/PROTOCOL.md §4). The copy costs nothing
/// measurable: decoding a 64-page packet (half text, half random, level 1)
/// ran at 3.0 GB/s this way, 3.0 GB/s streamed page by page into scattered
/// pages (QEMU's way), and 3.0 GB/s one-shot into contiguous pages (a C
/// loop over libzstd 1.5.4 on this 2-core machine).
final class PacketDecompressor {
    private let dctx: OpaquePointer
    private let pageSize: Int
    /// The packet's payload as read from the socket; `payload-size` is
    /// checked against the bound before the read, so it fits.
    let frame: UnsafeMutableRawPointer
    let frameCapacity: Int
    /// The decoded normal pages, copied into the mapping only once the
    /// frame decoded to exactly the expected size.
    let pages: UnsafeMutableRawPointer
    private let pagesCapacity: Int

    init(method: CompressionMethod, pageSize: Int) throws(MigrationError) {
        precondition(method == .zstd, "only zstd has a decompressor")
        guard let d = lm_zstd_dctx_create() else { throw MigrationError(.local, "cannot create a zstd decompression context") }
        dctx = d
        self.pageSize = pageSize
        pagesCapacity = MultiFDPages.capacity * pageSize
        frameCapacity = Int(method.payloadBound(UInt64(pagesCapacity)))
        frame = .allocate(byteCount: frameCapacity, alignment: 64)
        pages = .allocate(byteCount: pagesCapacity, alignment: 64)
    }

    deinit {
        lm_zstd_dctx_destroy(dctx)
        frame.deallocate()
        pages.deallocate()
    }

    /// Decodes the `payload-size` bytes at `source` (by default this
    /// channel's `frame` buffer) into `pages` and checks them
    /// (docs/PROTOCOL.md §4): exactly one zstd frame, with a content
    /// checksum, which records and decodes to normal-count × page size
    /// bytes. Nothing is written to the mapping here.
    func decode(_ h: MultiFDPacketHeader, limits: PacketLimits, from source: UnsafeRawPointer? = nil) throws(WireError) {
        let frame = source ?? UnsafeRawPointer(self.frame)
        let payload = Int(h.payloadSize), expected = h.pagesSize(limits: limits)
        // A zstd frame of today's format (magic 28 B5 2F FD) and nothing
        // else: libzstd would also run its legacy decoders (v0.5, v0.7
        // magics) on bytes from the wire, an attack surface we do not need.
        guard payload >= 4, UInt32(littleEndian: frame.loadUnaligned(as: UInt32.self)) == 0xFD2F_B528 else {
            throw h.payloadError(
                field: "payload", value: "\(payload) bytes", reason: "not a zstd frame (its magic number must be 28 B5 2F FD)",
                limits: limits)
        }
        let frameSize = lm_zstd_frame_size(frame, payload)
        if lm_zstd_is_error(frameSize) {
            throw h.payloadError(
                field: "payload", value: "\(payload) bytes", reason: "not one whole zstd frame: \(Zstd.errorName(frameSize))",
                limits: limits)
        }
        guard frameSize == payload else {
            throw h.payloadError(
                field: "payload-size", value: "\(payload)",
                reason: "its zstd frame ends after \(frameSize) bytes; a packet carries exactly one frame and nothing after it",
                limits: limits)
        }
        // RFC 8878 §3.1.1.1.1: bit 2 of the frame header descriptor (the
        // byte after the magic) says the frame ends with a checksum of its
        // content, which libzstd then verifies as it decodes.
        guard frame.load(fromByteOffset: 4, as: UInt8.self) & 0x04 != 0 else {
            throw h.payloadError(
                field: "payload", value: "\(payload) bytes",
                reason: "its zstd frame has no content checksum; livemig sends every frame with one", limits: limits)
        }
        let recorded = lm_zstd_frame_content_size(frame, payload)
        if recorded != LM_ZSTD_CONTENTSIZE_UNKNOWN, recorded != UInt64(expected) {
            throw h.payloadError(
                field: "decompressed-size", value: recorded == LM_ZSTD_CONTENTSIZE_ERROR ? "unreadable" : "\(recorded)",
                reason: "the frame header must record \(h.normalCount) normal pages of \(limits.pageSize) bytes = \(expected)",
                limits: limits)
        }
        let n = lm_zstd_decompress(dctx, pages, pagesCapacity, frame, payload)
        if lm_zstd_is_error(n) {
            throw h.payloadError(
                field: "payload", value: "\(payload) bytes", reason: "zstd cannot decode it: \(Zstd.errorName(n))", limits: limits)
        }
        guard n == expected else {
            throw h.payloadError(
                field: "decompressed-size", value: "\(n)",
                reason: "\(h.normalCount) normal pages of \(limits.pageSize) bytes make \(expected)", limits: limits)
        }
    }

    /// Decoded page `index`, valid after `decode` until the next packet.
    @inline(__always) func page(_ index: Int) -> UnsafeRawPointer { UnsafeRawPointer(pages + index * pageSize) }
}
