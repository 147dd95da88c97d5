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
/// from. A connection that closes before its first byte (a port probe) is
/// dropped silently; one that sends no hello within `helloTimeout`, or
/// bytes without our magic, is dropped with a notice. With `strict`
/// (before the main channel exists), a livemig hello that fails its checks
/// (another protocol version, a bad field) fails the migration: that is the
/// user's source and it must hear why. Otherwise it is dropped too.
struct HelloGate {
    let listener: Listener
    let helloTimeout: Double
    let notice: @Sendable (String) -> Void
    let latch: FailureLatch
    private var pending: [(socket: Socket, deadline: Double)] = []

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
            var ready: [Socket] = []
            for (i, p) in pending.enumerated().reversed() where fds[1 + i].revents != 0 {
                ready.append(p.socket)
                pending.remove(at: i)
            }
            for s in ready.reversed() {
                if let hello = try hear(s, strict: strict) { return hello }
            }
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
                pending.append((s, Monotonic.now + helloTimeout))
            }
        }
    }

    /// How long a connection that started its hello may take to finish it
    /// while channels are awaited (`strict == false`): a source writes its
    /// hello at once, and a stranger that stalls mid-hello must not hold
    /// the others up until the channels' deadline.
    static let channelHelloReadTimeout = 1.0

    /// Reads the hello of a connection that has data (or closed).
    private func hear(_ s: Socket, strict: Bool) throws(MigrationError) -> (Socket, ChannelHello, [UInt8])? {
        s.setReceiveTimeout(strict ? helloTimeout : min(helloTimeout, Self.channelHelloReadTimeout))
        guard s.peerSendsData() else { return nil }  // a port probe
        let bytes: [UInt8]
        do {
            let preamble = try s.receiveBytes(ChannelHello.preambleSize, what: "reading a channel hello")
            let checked = preamble.withUnsafeBytes { b in Result { () throws(WireError) in try ChannelHello.checkPreamble(b) } }
            if case .failure(let e) = checked, e.field == "magic" {
                notice("ignored a connection from \(s.peer) that is not a livemig source: \(e.description)")
                return nil
            }
            try checked.get()
            bytes = preamble + (try s.receiveBytes(ChannelHello.size - ChannelHello.preambleSize, what: "reading a channel hello"))
            let hello = try bytes.withUnsafeBytes { b throws(WireError) in try ChannelHello.decode(b) }
            return (s, hello, bytes)
        } catch {
            let e = MigrationError(converting: error)
            if strict, e.kind == .protocolViolation { throw e }
            notice("dropped a connection from \(s.peer): \(e.description)")
            return nil
        }
    }
}
