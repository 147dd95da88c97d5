import Foundation
import TestSupport
import Testing
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// The `livemig` binary `swift test` built next to the test bundle
/// (override with LIVEMIG_BIN).
let livemigBinary: String = {
    if let p = ProcessInfo.processInfo.environment["LIVEMIG_BIN"] { return p }
    let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
    return exe.deletingLastPathComponent().appendingPathComponent("livemig").path
}()

/// A running `livemig` process with its output collected.
final class LivemigProcess: @unchecked Sendable {
    // @unchecked: the pipes' buffers are filled by reader threads and read
    // only after `wait` (which joins them via the group).
    let process = Process()
    private let out = Pipe(), err = Pipe()
    private var outData = Data(), errData = Data()
    private let group = DispatchGroup()
    private let errLines = DispatchSemaphore(value: 0)
    private let lock = NSLock()
    private var errSoFar = ""

    init(_ args: [String], env: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: livemigBinary)
        process.arguments = args
        var e = ProcessInfo.processInfo.environment
        for (k, v) in env { e[k] = v }
        process.environment = e
        process.standardOutput = out
        process.standardError = err
        try process.run()
        let outHandle = out.fileHandleForReading, errHandle = err.fileHandleForReading
        group.enter()
        DispatchQueue.global().async { [self] in
            let d = outHandle.readDataToEndOfFile()
            lock.withLock { outData = d }
            group.leave()
        }
        group.enter()
        DispatchQueue.global().async { [self] in
            while true {
                let d = errHandle.availableData
                if d.isEmpty { break }
                lock.withLock {
                    errData.append(d)
                    errSoFar = String(decoding: errData, as: UTF8.self)
                }
                errLines.signal()
            }
            errLines.signal()
            group.leave()
        }
    }

    var pid: Int32 { process.processIdentifier }

    /// Waits until stderr contains `text` (e.g. "listening") or the process ends.
    func waitForStderr(_ text: String, timeout: Double = 30) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if lock.withLock({ errSoFar.contains(text) }) { return true }
            if !process.isRunning && lock.withLock({ !errSoFar.contains(text) }) {
                _ = errLines.wait(timeout: .now() + 0.1)
                return lock.withLock { errSoFar.contains(text) }
            }
            _ = errLines.wait(timeout: .now() + 0.05)
        }
        return false
    }

    /// Waits for exit (killing it after `timeout` seconds) and returns
    /// (status, stdout, stderr, seconds waited).
    @discardableResult
    func wait(timeout: Double = 60) -> (status: Int32, stdout: String, stderr: String, seconds: Double) {
        let start = Date()
        while process.isRunning && Date().timeIntervalSince(start) < timeout { usleep(5_000) }
        if process.isRunning {
            kill(pid, SIGKILL)
        }
        process.waitUntilExit()
        group.wait()
        let secs = Date().timeIntervalSince(start)
        return lock.withLock {
            (process.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self), secs)
        }
    }
}

/// Runs `livemig` to completion.
func livemig(_ args: [String], env: [String: String] = [:], timeout: Double = 60) throws -> (
    status: Int32, stdout: String, stderr: String, seconds: Double
) {
    try LivemigProcess(args, env: env).wait(timeout: timeout)
}

/// A temporary directory removed when the test is done.
final class Scratch {
    let dir: String

    /// `under`: the parent directory (default the temporary directory;
    /// postcopy tests need tmpfs: /dev/shm/).
    init(under parent: String = NSTemporaryDirectory()) throws {
        dir = parent + "livemig-test-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    func path(_ name: String) -> String { dir + "/" + name }
}

let pageSize = 4096

/// Writes a RAM image of `pages` pages: a page is zero when `isZero(page)`,
/// otherwise random. Returns the number of zero pages.
@discardableResult
func writeImage(_ path: String, pages: Int, seed: UInt64, isZero: (Int) -> Bool) throws -> Int {
    var rng = SplitMix64(seed: seed)
    var data = Data(count: pages * pageSize)
    var zeros = 0
    data.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) in
        let words = b.bindMemory(to: UInt64.self)
        for p in 0..<pages {
            if isZero(p) {
                zeros += 1
                continue
            }
            for w in 0..<(pageSize / 8) { words[p * pageSize / 8 + w] = rng.next() }
        }
    }
    try data.write(to: URL(fileURLWithPath: path))
    return zeros
}

/// Writes a RAM image of mixed pages like tools/bench's mixed image: zero,
/// text-like (words, compressible) and random pages, by `kind(page)`.
/// Returns how many pages of each kind (zero, text, random) it wrote.
@discardableResult
func writeMixedImage(_ path: String, pages: Int, seed: UInt64) throws -> (zero: Int, text: Int, random: Int) {
    var rng = SplitMix64(seed: seed)
    let words = "guest kernel page cache dirty migrate channel socket buffer inode dentry task the of and to in is"
        .split(separator: " ").map { Array($0.utf8) + [0x20] }
    var data = Data(count: pages * pageSize)
    var counts = (zero: 0, text: 0, random: 0)
    data.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) in
        for p in 0..<pages {
            let page = UnsafeMutableRawBufferPointer(rebasing: b[p * pageSize..<(p + 1) * pageSize])
            switch rng.next() % 4 {
            case 0, 1:
                counts.zero += 1
            case 2:
                counts.text += 1
                var at = 0
                while at < pageSize {
                    for byte in words[Int(rng.next() % UInt64(words.count))] where at < pageSize {
                        page[at] = byte
                        at += 1
                    }
                }
            default:
                counts.random += 1
                let w = page.bindMemory(to: UInt64.self)
                for i in 0..<w.count { w[i] = rng.next() }
            }
        }
    }
    try data.write(to: URL(fileURLWithPath: path))
    return counts
}

/// A `livemig receive` listening on a Unix socket in a fresh scratch folder,
/// for tests that then speak to it as a (fake or broken) source.
struct ListeningReceiver {
    let scratch: Scratch
    let dst: String
    let addr: SocketAddress
    let process: LivemigProcess

    /// `fill: nil` leaves the destination file absent (the receiver creates
    /// it when the layout arrives); otherwise it is `size` bytes of `fill`.
    init(size: Int, fill: UInt8? = 0x77, channels: Int? = nil, extra: [String] = []) throws {
        scratch = try Scratch()
        dst = scratch.path("dst.ram")
        if let fill { try writeFilled(dst, bytes: size, value: fill) }
        addr = try SocketAddress(parsing: "unix:" + scratch.path("s"))
        process = try LivemigProcess(
            ["receive", "--ram", dst, "--listen", addr.description] + (channels.map { ["--channels", "\($0)"] } ?? []) + extra)
        #expect(process.waitForStderr("listening"))
    }

    func connect() throws -> Socket { try Socket.connect(to: addr, timeout: 5) }
}

/// Writes `bytes` of a repeated byte: a destination "with other content".
func writeFilled(_ path: String, bytes: Int, value: UInt8) throws {
    try Data(repeating: value, count: bytes).write(to: URL(fileURLWithPath: path))
}

func filesEqual(_ a: String, _ b: String) throws -> Bool {
    try Data(contentsOf: URL(fileURLWithPath: a)) == Data(contentsOf: URL(fileURLWithPath: b))
}

/// A TCP port that was free a moment ago.
func freePort() -> UInt16 {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    var addr = sockaddr_in()
    addr.sin_family = sa_family_t(AF_INET)
    addr.sin_addr.s_addr = inet_addr("127.0.0.1")
    addr.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
    _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
    return UInt16(bigEndian: addr.sin_port)
}

/// Parses the single JSON object `livemig --format json` prints.
func stats(_ stdout: String) throws -> [String: Any] {
    let line = stdout.split(separator: "\n").last.map(String.init) ?? ""
    let obj = try JSONSerialization.jsonObject(with: Data(line.utf8))
    return try #require(obj as? [String: Any])
}

/// A man in the middle on 127.0.0.1 TCP: forwards every connection it
/// accepts to `upstream`, records the first bytes the source writes on each
/// (source → destination), and can flip one bit of one connection's source
/// → destination stream. Connections are numbered in accept order: a real
/// `send` opens the main channel first (0), then multifd channels 0, 1, …
/// (1, 2, …).
final class MiddleProxy: @unchecked Sendable {
    // @unchecked: the mutable state is under `lock`; each pump thread
    // otherwise touches only its own two sockets.

    /// Flip `mask` in byte `offset` of connection `connection`'s source →
    /// destination stream.
    struct Flip: Sendable, CustomTestStringConvertible {
        var connection: Int
        var offset: Int
        var mask: UInt8 = 0x01
        var testDescription: String { "connection \(connection), byte \(offset)" }
    }

    let address: SocketAddress
    private let upstream: SocketAddress
    private let listener: Listener
    private let flip: Flip?
    private let recordLimit: Int
    /// Called in the accept thread with a connection's number before it is
    /// forwarded (tests open stray connections to the destination there).
    private let onConnection: @Sendable (Int) -> Void
    /// Called in a pump thread with (connection, bytes the source wrote so
    /// far) after each chunk it forwarded.
    private let onProgress: @Sendable (Int, Int) -> Void
    private let lock = NSLock()
    private var streams: [[UInt8]] = []
    private var sockets: [Socket] = []
    private var flipDone = false

    init(
        to upstream: SocketAddress, flip: Flip? = nil, record: Int = 1 << 20, onConnection: @escaping @Sendable (Int) -> Void = { _ in },
        onProgress: @escaping @Sendable (Int, Int) -> Void = { _, _ in }
    ) throws {
        self.upstream = upstream
        self.flip = flip
        recordLimit = record
        self.onConnection = onConnection
        self.onProgress = onProgress
        address = try SocketAddress(parsing: "tcp:127.0.0.1:\(freePort())")
        listener = try Listener(address)
        Thread { [self] in acceptLoop() }.start()
    }

    /// Whether the flip happened (the stream reached its offset).
    var flipped: Bool { lock.withLock { flipDone } }

    /// How many connections were accepted.
    var connections: Int { lock.withLock { streams.count } }

    /// What the source wrote on connection `index` (up to the record limit).
    func sourceBytes(_ index: Int) -> [UInt8] { lock.withLock { index < streams.count ? streams[index] : [] } }

    /// Cuts every connection forwarded so far (both ways), and goes on
    /// accepting new ones: a broken link that comes back.
    func cutAll() {
        for s in lock.withLock({ sockets }) { s.shutdown() }
    }

    /// Stops accepting and cuts every forwarded connection.
    func stop() {
        listener.shutdown()
        for s in lock.withLock({ sockets }) { s.shutdown() }
    }

    private func acceptLoop() {
        while true {
            guard let s = try? listener.accept(timeout: nil) else { return }
            let index = lock.withLock { streams.count }
            onConnection(index)
            guard let up = try? Socket.connect(to: upstream, timeout: 5) else {
                s.shutdown()
                continue
            }
            lock.withLock {
                streams.append([])
                sockets += [s, up]
            }
            Thread { [self] in pump(from: s, to: up, connection: index, sourceSide: true) }.start()
            Thread { [self] in pump(from: up, to: s, connection: index, sourceSide: false) }.start()
        }
    }

    /// Copies `a` to `b` until either side closes, then passes the close on.
    private func pump(from a: Socket, to b: Socket, connection: Int, sourceSide: Bool) {
        var buffer = [UInt8](repeating: 0, count: 1 << 16)
        var position = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(a.fd, $0.baseAddress, $0.count, 0) }
            if n < 0, errno == EINTR { continue }
            guard n > 0 else { break }
            if sourceSide {
                lock.withLock {
                    let room = max(0, recordLimit - streams[connection].count)
                    streams[connection] += buffer[0..<min(n, room)]
                }
                if let f = flip, f.connection == connection, (position..<position + n).contains(f.offset) {
                    buffer[f.offset - position] ^= f.mask
                    lock.withLock { flipDone = true }
                }
            }
            position += n
            guard (try? b.sendAll(Array(buffer[0..<n]))) != nil else {
                // The far side is gone: make this side's writer see it too.
                a.shutdown()
                break
            }
            if sourceSide { onProgress(connection, position) }
        }
        _ = Glibc.shutdown(b.fd, Int32(SHUT_WR))
    }
}
