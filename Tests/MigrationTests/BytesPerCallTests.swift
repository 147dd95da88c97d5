import Testing

@testable import URing

#if canImport(Glibc)
    import Glibc
#endif

/// Postcopy's short system calls (`postcopyBytesPerCall`): a gather list
/// sent, or a payload read, in calls of at most N bytes must carry exactly
/// the same bytes as one call, whatever N is against the iovecs' lengths.
@Suite struct BytesPerCallTests {
    private static func pair() -> (Socket, Socket) {
        var fds: [Int32] = [0, 0]
        let rc = socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        precondition(rc == 0, "socketpair: \(errno)")
        return (Socket(fd: fds[0], peer: "pair[0]"), Socket(fd: fds[1], peer: "pair[1]"))
    }

    @Test func windowCutsTheLastIOVecAndRestoresIt() {
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 600, alignment: 8)
        defer { buffer.deallocate() }
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: 3)
        defer { iov.deallocate() }
        iov[0] = iovec(iov_base: buffer, iov_len: 100)
        iov[1] = iovec(iov_base: buffer + 100, iov_len: 200)
        iov[2] = iovec(iov_base: buffer + 300, iov_len: 300)
        let cursor = IOVecCursor(iov, count: 3)

        let cut = cursor.window(limit: 250)
        #expect(cut.count == 2)
        #expect(iov[1].iov_len == 150, "the second iovec is cut to what fits in 250 bytes")
        cut.restore()
        #expect(iov[1].iov_len == 200)

        let exact = cursor.window(limit: 300)
        #expect(exact.count == 2 && iov[1].iov_len == 200, "a limit on an iovec's end cuts nothing")
        exact.restore()

        let first = cursor.window(limit: 40)
        #expect(first.count == 1 && iov[0].iov_len == 40)
        first.restore()
        #expect(iov[0].iov_len == 100)

        #expect(cursor.window(limit: 0).count == 3, "0 is no limit")
        #expect(cursor.window(limit: 10_000).count == 3)
        #expect(iov[0].iov_len == 100 && iov[1].iov_len == 200 && iov[2].iov_len == 300)
    }

    /// Every writer, with limits below, on and above the iovecs' lengths;
    /// the reader reads with a limit of its own.
    @Test(arguments: [1, 3000, 4096, 5000, 70_000, 0])
    func shortCallsCarryTheSameBytes(_ limit: Int) throws {
        let lengths = [17, 65536, 4096, 1, 100_000, 333]
        let total = lengths.reduce(0, +)
        var source = [UInt8](repeating: 0, count: total)
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15 &* UInt64(limit + 1)
        for i in source.indices {
            state = state &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            source[i] = UInt8(truncatingIfNeeded: state >> 56)
        }
        let writers: [(Socket) throws -> any StreamWriter] = [
            { PlainSendWriter(socket: $0) },
            { try URingSendWriter(socket: $0, zeroCopy: false) },
        ]
        for make in writers {
            let (a, b) = Self.pair()
            defer {
                a.shutdown()
                b.shutdown()
            }
            let writer = try make(a)
            writer.bytesPerCall = limit
            let received = UnsafeMutableRawPointer.allocate(byteCount: total, alignment: 64)
            defer { received.deallocate() }
            // The socket buffer is smaller than the list: read while writing.
            let reader = ReaderThread(socket: b, into: received, count: total, bytesPerCall: limit == 0 ? 0 : limit + 7)
            try source.withUnsafeMutableBytes { raw in
                let iov = UnsafeMutablePointer<iovec>.allocate(capacity: lengths.count)
                defer { iov.deallocate() }
                var at = 0
                for (i, n) in lengths.enumerated() {
                    iov[i] = iovec(iov_base: raw.baseAddress! + at, iov_len: n)
                    at += n
                }
                try writer.writeAll(iov, count: lengths.count, total: total)
            }
            try reader.finish()
            #expect(
                Array(UnsafeRawBufferPointer(start: received, count: total)) == source,
                "\(writer.mechanism), \(limit) bytes per call: the bytes differ")
        }
    }
}

/// Reads `count` bytes on a thread of its own.
private final class ReaderThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let socket: Socket
    private let buffer: UnsafeMutableRawPointer
    private let count: Int
    private let bytesPerCall: Int
    private var failure: SocketError?

    init(socket: Socket, into buffer: UnsafeMutableRawPointer, count: Int, bytesPerCall: Int) {
        self.socket = socket
        self.buffer = buffer
        self.count = count
        self.bytesPerCall = bytesPerCall
        let me = Unmanaged.passRetained(self).toOpaque()
        let rc = pthread_create(
            &thread, nil,
            { raw in
                let r = Unmanaged<ReaderThread>.fromOpaque(raw!).takeRetainedValue()
                do throws(SocketError) {
                    try r.socket.receiveExact(r.buffer, count: r.count, bytesPerCall: r.bytesPerCall, what: "the test's bytes")
                } catch {
                    r.failure = error
                }
                return nil
            }, me)
        precondition(rc == 0, "pthread_create: \(rc)")
    }

    func finish() throws {
        pthread_join(thread, nil)
        if let failure { throw failure }
    }
}
