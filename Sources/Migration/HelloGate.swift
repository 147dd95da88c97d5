import MigrationWire
import OSCall
import URing

#if canImport(Glibc)
    import Glibc
#endif

/// The destination's door: accepts connections and reads their hellos
/// without letting one stray connection hold up or fail the others
/// (docs/PROTOCOL.md §2, "Connections the destination drops").
///
/// It polls the listener and every connection accepted but not yet heard
/// from, and takes each hello's bytes as they arrive, without blocking: a
/// connection that sends part of a hello and stalls holds up no other. A
/// connection that closes before its first byte (a port probe) is dropped
/// silently; one that sends no whole hello within `helloTimeout`, or bytes
/// without our magic, is dropped with a notice. With `strict`
/// (before the main channel exists), a livemig hello that fails its checks
/// (another protocol version, a bad field) fails the migration: that is the
/// user's source and it must hear why. Otherwise it is dropped too.
struct HelloGate {
    let listener: Listener
    let helloTimeout: Double
    let notice: @Sendable (String) -> Void
    let latch: FailureLatch
    private var pending: [Pending] = []

    /// A connection accepted but not heard out: what it sent of its hello.
    private struct Pending {
        let socket: Socket
        let deadline: Double
        var received: [UInt8] = []
    }

    private enum Heard {
        case waiting
        case dropped
        case hello(Socket, ChannelHello, [UInt8])
    }

    init(listener: Listener, helloTimeout: Double, notice: @escaping @Sendable (String) -> Void, latch: FailureLatch) {
        self.listener = listener
        self.helloTimeout = helloTimeout
        self.notice = notice
        self.latch = latch
    }

    /// The next connection with a decoded hello (and the hello's bytes), or
    /// nil when `watch` became readable. Throws a timeout at `deadline`.
    mutating func next(deadline: Double?, strict: Bool, watch: Socket? = nil) throws(MigrationError) -> (
        Socket, ChannelHello, [UInt8]
    )? {
        while true {
            try latch.check()
            let now = Monotonic.now
            pending.removeAll { p in
                guard p.deadline <= now else { return false }
                notice("dropped a connection from \(p.socket.peer) that sent no hello within \(formatSeconds(helloTimeout)) s")
                return true
            }
            if let deadline, now >= deadline { throw MigrationError(.timeout, "no channel arrived in time") }
            var fds = [pollfd(fd: listener.fd, events: Int16(POLLIN), revents: 0)]
            fds += pending.map { pollfd(fd: $0.socket.fd, events: Int16(POLLIN), revents: 0) }
            if let watch { fds.append(pollfd(fd: watch.fd, events: Int16(POLLIN), revents: 0)) }
            var until = deadline ?? .infinity
            for p in pending { until = min(until, p.deadline) }
            let wait = until.isFinite ? Int32(max(0, min(60, until - now)) * 1000) + 1 : -1
            let r = poll(&fds, nfds_t(fds.count), wait)
            if r < 0 {
                if errno == EINTR { continue }
                throw MigrationError(.local, "waiting for connections on \(listener.address): \(String(cString: strerror(errno)))")
            }
            if watch != nil, fds[fds.count - 1].revents != 0 { return nil }
            // Connections first, in accept order, then new ones.
            var kept: [Pending] = []
            var heard: (Socket, ChannelHello, [UInt8])?
            for (i, var p) in pending.enumerated() {
                guard heard == nil, fds[1 + i].revents != 0 else {
                    kept.append(p)
                    continue
                }
                switch try hear(&p, strict: strict) {
                case .waiting: kept.append(p)
                case .dropped: break
                case .hello(let s, let hello, let bytes): heard = (s, hello, bytes)
                }
            }
            pending = kept
            if let heard { return heard }
            if fds[0].revents != 0 {
                // A peer that reset before we got to it is not an error.
                let s: Socket
                do {
                    s = try listener.accept(timeout: 0)
                } catch  where error.code == .timedOut {
                    continue
                } catch {
                    // The latch's waker shut the listener down (cancel).
                    try latch.check()
                    throw MigrationError(error)
                }
                pending.append(Pending(socket: s, deadline: Monotonic.now + helloTimeout))
            }
        }
    }

    /// How long a channel's source may take to send its proof after the
    /// challenge while channels are awaited: a source answers at once, and
    /// a stranger that stalls must not hold the others up until the
    /// channels' deadline.
    static let channelProofTimeout = 1.0

    /// Takes what a readable connection sent of its hello, without
    /// blocking (a stray that stalls mid-hello must not hold up the real
    /// channels, which have the same deadline).
    private func hear(_ p: inout Pending, strict: Bool) throws(MigrationError) -> Heard {
        let s = p.socket
        var chunk = [UInt8](repeating: 0, count: ChannelHello.size - p.received.count)
        let n = chunk.withUnsafeMutableBytes { recv(s.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        if n < 0 {
            let e = errno
            if e == EAGAIN || e == EWOULDBLOCK || e == EINTR { return .waiting }
            // A peer that reset before its first byte is a port probe.
            if !p.received.isEmpty { notice("dropped a connection from \(s.peer): \(String(cString: strerror(e)))") }
            return .dropped
        }
        if n == 0 {
            // Closed before its first byte: a port probe, dropped silently.
            if !p.received.isEmpty {
                notice("dropped a connection from \(s.peer) that closed after \(p.received.count) bytes of a hello")
            }
            return .dropped
        }
        p.received += chunk[0..<n]
        do {
            if p.received.count >= ChannelHello.preambleSize {
                let checked = p.received.withUnsafeBytes { b in
                    Result { () throws(WireError) in
                        try ChannelHello.checkPreamble(UnsafeRawBufferPointer(rebasing: b[0..<ChannelHello.preambleSize]))
                    }
                }
                if case .failure(let e) = checked, e.field == "magic" {
                    notice("ignored a connection from \(s.peer) that is not a livemig source: \(e.description)")
                    return .dropped
                }
                try checked.get()
            }
            guard p.received.count == ChannelHello.size else { return .waiting }
            let hello = try p.received.withUnsafeBytes { b throws(WireError) in try ChannelHello.decode(b) }
            s.setReceiveTimeout(helloTimeout)
            return .hello(s, hello, p.received)
        } catch {
            let e = MigrationError(converting: error)
            if strict, e.kind == .protocolViolation { throw e }
            notice("dropped a connection from \(s.peer): \(e.description)")
            return .dropped
        }
    }
}
