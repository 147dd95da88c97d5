import CShims
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// A connected stream socket (TCP or Unix). Closed in `deinit`.
///
/// One thread reads or writes it; any thread may call `shutdown()` to make
/// blocked I/O on it return at once (the error path's "wake everything").
/// The descriptor is immutable, so sharing the object is safe.
public final class Socket: Sendable {
    public let fd: Int32
    /// The address, for messages.
    public let peer: String

    init(fd: Int32, peer: String) {
        self.fd = fd
        self.peer = peer
    }

    deinit { close(fd) }

    /// Connects to `address`, retrying refused connections until `timeout`
    /// seconds pass (the destination may still be mapping its RAM).
    public static func connect(to address: SocketAddress, timeout: Double = 0) throws(SocketError) -> Socket {
        let deadline = Monotonic.now + timeout
        while true {
            do throws(SocketError) {
                return try address.withSockaddr { sa, len, family throws(SocketError) in
                    let fd: Int32
                    do throws(Errno) {
                        fd = try SystemCall.once { Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
                    } catch {
                        throw .system("socket", error)
                    }
                    // Once: after EINTR the connection goes on in the
                    // kernel, and a second connect fails with EALREADY.
                    do throws(Errno) {
                        _ = try SystemCall.once { Glibc.connect(fd, sa, len) }
                    } catch let e {
                        close(fd)
                        if e == .noSuchFileOrDirectory {
                            throw SocketError(
                                .connectionRefused,
                                "cannot connect to \(address): no socket at that path; is `livemig receive` listening there?", errno: e)
                        }
                        throw .system("cannot connect to \(address)", e)
                    }
                    let s = Socket(fd: fd, peer: address.description)
                    s.tune(family: family)
                    return s
                }
            } catch  where error.code == .connectionRefused && Monotonic.now < deadline {
                usleep(20_000)
            }
        }
    }

    func tune(family: Int32) {
        var one: Int32 = 1
        if family == AF_INET || family == AF_INET6 {
            setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        }
    }

    /// Lets the kernel end a connection whose peer host died or whose link
    /// was cut, in about twice `seconds`, even while nobody sends: TCP
    /// keepalive probes after `seconds` of silence (`SO_KEEPALIVE`,
    /// `TCP_KEEPIDLE`), three more a third of that apart (`TCP_KEEPINTVL`,
    /// `TCP_KEEPCNT`), and written data left unacknowledged that long
    /// (`TCP_USER_TIMEOUT`) fails reads and writes with ETIMEDOUT.
    ///
    /// Twice, not once: in the data phase the migration's progress watchdog
    /// stops after `seconds` with a clearer message; this is the backstop
    /// for the waits it does not watch. No-op on a Unix socket.
    public func setPeerTimeout(_ seconds: Double) throws(SocketError) {
        precondition(seconds > 0, "peer timeout must be positive")
        guard isInternet else { return }
        let idle = max(1, Int32(seconds.rounded(.up)))
        let options: [(level: Int32, name: Int32, value: Int32, label: String)] = [
            (SOL_SOCKET, SO_KEEPALIVE, 1, "SO_KEEPALIVE"),
            (Int32(IPPROTO_TCP), TCP_KEEPIDLE, idle, "TCP_KEEPIDLE"),
            (Int32(IPPROTO_TCP), TCP_KEEPINTVL, max(1, Int32((seconds / 3).rounded(.up))), "TCP_KEEPINTVL"),
            (Int32(IPPROTO_TCP), TCP_KEEPCNT, 3, "TCP_KEEPCNT"),
            (Int32(IPPROTO_TCP), TCP_USER_TIMEOUT, Int32(min(seconds * 2000, Double(Int32.max))), "TCP_USER_TIMEOUT"),
        ]
        for o in options {
            var value = o.value
            do throws(Errno) {
                _ = try SystemCall.once { setsockopt(fd, o.level, o.name, &value, socklen_t(MemoryLayout<Int32>.size)) }
            } catch {
                throw SocketError(.system, "cannot set \(o.label) to \(o.value) on the connection to \(peer): \(error)", errno: error)
            }
        }
    }

    /// For a channel that carries requests and their answers, not bulk
    /// data: a congestion control that sends at once instead of pacing.
    ///
    /// BBR (this machine's default, and common on servers) paces every
    /// socket with a timer when no `fq` qdisc does it, at a rate it
    /// estimates from what the socket delivered; a socket that sends a few
    /// pages now and then gets a low estimate, so an answer waits for its
    /// slot. Traced on the postcopy preempt channel over loopback: 180 µs
    /// of pacing timers before a 4 KiB page left, and fault latency p99
    /// 0.9–1.7 ms against 0.15–0.4 ms with CUBIC. Tries CUBIC, then Reno
    /// (which an unprivileged process may always choose); returns the one
    /// set, or nil (the system's default stays; not an error). No-op on a
    /// Unix socket.
    @discardableResult
    public func preferUnpacedCongestionControl() -> String? {
        guard isInternet else { return nil }
        for name in ["cubic", "reno"] {
            let rc = name.withCString { setsockopt(fd, Int32(IPPROTO_TCP), TCP_CONGESTION, $0, socklen_t(strlen($0))) }
            if rc == 0 { return name }
        }
        return nil
    }

    /// Whether this is a TCP socket over IPv4 or IPv6 (not a Unix one).
    private var isInternet: Bool {
        var domain: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard (try? SystemCall.once({ getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) })) != nil else { return false }
        return domain == AF_INET || domain == AF_INET6
    }

    /// Makes blocked reads and writes on this socket return (EOF / EPIPE).
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// Makes a blocked read return (EOF) but keeps the write side, so a
    /// last error message can still be sent.
    public func shutdownReceive() { _ = Glibc.shutdown(fd, Int32(SHUT_RD)) }

    /// Sets (or with nil clears) a deadline for each blocking read.
    public func setReceiveTimeout(_ seconds: Double?) {
        var tv = timeval()
        if let s = seconds {
            tv.tv_sec = Int(s)
            tv.tv_usec = Int((s - Double(Int(s))) * 1e6)
        }
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    /// Writes all of `bytes` (plain send; for small control messages).
    public func sendAll(_ bytes: [UInt8]) throws(SocketError) {
        // The closure returns its error: Array.withUnsafeBytes is not
        // typed-throws, so a thrown SocketError would lose its type.
        let failure: SocketError? = bytes.withUnsafeBytes { b -> SocketError? in
            var done = 0
            while done < b.count {
                do throws(Errno) {
                    done += try SystemCall.retrying { send(fd, b.baseAddress! + done, b.count - done, Int32(MSG_NOSIGNAL)) }
                } catch {
                    return .system("sending to \(peer)", error)
                }
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// Waits for the first byte (within the receive timeout) without taking
    /// it. False when the peer closed or reset before sending anything: a
    /// port probe, not a migration.
    public func peerSendsData() -> Bool {
        var byte: UInt8 = 0
        do throws(Errno) {
            return try SystemCall.retrying { recv(fd, &byte, 1, Int32(MSG_PEEK)) } > 0
        } catch {
            // EAGAIN: let the hello read time out with a message.
            return error == .resourceTemporarilyUnavailable || error == .wouldBlock
        }
    }

    /// Whether the peer has closed or reset the connection (`poll` without
    /// waiting: POLLRDHUP, POLLHUP or POLLERR), even while another thread
    /// blocks reading it. Data still unread does not hide a hang-up.
    public func peerHungUp() -> Bool {
        // POLLRDHUP (0x2000) is behind _GNU_SOURCE in <poll.h>, which the
        // Glibc module does not import.
        let rdhup: Int16 = 0x2000
        var p = pollfd(fd: fd, events: Int16(POLLIN) | rdhup, revents: 0)
        guard poll(&p, 1, 0) == 1 else { return false }
        return p.revents & (rdhup | Int16(POLLHUP) | Int16(POLLERR)) != 0
    }

    /// Sends what fits without blocking; the rest is dropped. For last words.
    public func sendNonBlocking(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { b in _ = send(fd, b.baseAddress, b.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }

    /// Reads exactly `count` bytes into a new array.
    public func receiveBytes(_ count: Int, what: @autoclosure () -> String) throws(SocketError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        guard count > 0 else { return bytes }
        let label = what()
        let failure: SocketError? = bytes.withUnsafeMutableBytes { b -> SocketError? in
            do throws(SocketError) {
                try receiveExact(b.baseAddress!, count: count, what: label)
                return nil
            } catch {
                return error
            }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Reads exactly `count` bytes into `buffer`; EOF before that is an error.
    /// `bytesPerCall` (0: no limit) bounds what one `recv` takes (see
    /// `postcopyBytesPerCall`).
    public func receiveExact(_ buffer: UnsafeMutableRawPointer, count: Int, bytesPerCall: Int = 0, what: @autoclosure () -> String)
        throws(SocketError)
    {
        var done = 0
        while done < count {
            let n: Int
            let want = bytesPerCall > 0 ? min(count - done, bytesPerCall) : count - done
            do throws(Errno) {
                n = try SystemCall.retrying { recv(fd, buffer + done, want, Int32(MSG_WAITALL)) }
            } catch  where error == .resourceTemporarilyUnavailable || error == .wouldBlock {
                throw SocketError(.timedOut, "\(what()) from \(peer): nothing arrived in time", errno: error)
            } catch {
                throw .system("\(what()) from \(peer)", error)
            }
            if n == 0 {
                throw SocketError(.peerClosed, "\(what()) from \(peer): the peer closed the connection after \(done) of \(count) bytes")
            }
            done += n
        }
    }

    /// Reads exactly the bytes the iovecs describe, straight into their
    /// buffers (the destination mapping): no intermediate copy.
    /// The iovec array is consumed (advanced) by partial reads.
    public func receiveExact(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int, what: @autoclosure () -> String)
        throws(SocketError)
    {
        var cursor = IOVecCursor(iov, count: count)
        var done = 0
        while done < total {
            var msg = msghdr()
            msg.msg_iov = cursor.current
            msg.msg_iovlen = cursor.remainingCount
            let n: Int
            do throws(Errno) {
                n = try SystemCall.retrying { recvmsg(fd, &msg, Int32(MSG_WAITALL)) }
            } catch {
                throw .system("\(what()) from \(peer)", error)
            }
            if n == 0 {
                throw SocketError(.peerClosed, "\(what()) from \(peer): the peer closed the connection after \(done) of \(total) bytes")
            }
            done += n
            cursor.advance(by: n)
        }
    }
}

/// Walks an iovec array as bytes are transferred: a partial transfer leaves
/// `current` at the first byte not yet moved.
public struct IOVecCursor {
    public private(set) var current: UnsafeMutablePointer<iovec>
    public private(set) var remainingCount: Int

    public init(_ iov: UnsafeMutablePointer<iovec>, count: Int) {
        current = iov
        remainingCount = count
    }

    public mutating func advance(by bytes: Int) {
        var n = bytes
        while n > 0, remainingCount > 0 {
            let len = current.pointee.iov_len
            if n >= len {
                n -= len
                current += 1
                remainingCount -= 1
            } else {
                current.pointee.iov_base = current.pointee.iov_base! + n
                current.pointee.iov_len = len - n
                n = 0
            }
        }
        while remainingCount > 0, current.pointee.iov_len == 0 {
            current += 1
            remainingCount -= 1
        }
    }

    /// The iovecs of the remaining ones that one system call may take when
    /// it must send at most `limit` bytes (0: no limit). The last iovec of
    /// the window may be cut short, in place; call `restore()` on the
    /// window once the call returned, before `advance(by:)`.
    public func window(limit: Int) -> IOVecWindow {
        guard limit > 0 else { return IOVecWindow(count: remainingCount, cut: nil, length: 0) }
        var bytes = 0
        for i in 0..<remainingCount {
            let v = current + i
            let len = v.pointee.iov_len
            if bytes + len >= limit {
                if bytes + len == limit { return IOVecWindow(count: i + 1, cut: nil, length: 0) }
                v.pointee.iov_len = limit - bytes
                return IOVecWindow(count: i + 1, cut: v, length: len)
            }
            bytes += len
        }
        return IOVecWindow(count: remainingCount, cut: nil, length: 0)
    }
}

/// What `IOVecCursor.window(limit:)` handed out: `count` iovecs from the
/// cursor's current one, and the one it cut short with its real length.
public struct IOVecWindow {
    public let count: Int
    let cut: UnsafeMutablePointer<iovec>?
    let length: Int

    /// Puts the cut iovec's length back.
    public func restore() { cut?.pointee.iov_len = length }
}

/// A listening socket. A Unix socket's file is removed when it closes.
public final class Listener: Sendable {
    public let fd: Int32
    public let address: SocketAddress
    /// Applied to every accepted TCP connection (`Socket.setPeerTimeout`).
    public let peerTimeout: Double?

    /// Binds and listens. A stale Unix socket file (nobody accepting) is
    /// replaced; a live one is "address in use". `peerTimeout`: see
    /// `Socket.setPeerTimeout`, applied to each accepted connection.
    public init(_ address: SocketAddress, backlog: Int32 = 64, peerTimeout: Double? = nil) throws(SocketError) {
        self.address = address
        self.peerTimeout = peerTimeout
        if case .unix(let path) = address, access(path, F_OK) == 0 {
            var st = stat()
            guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK else {
                throw SocketError(.addressInUse, "cannot listen on \(address): \(path) exists and is not a socket; choose another path")
            }
            if (try? Socket.connect(to: address)) != nil {
                throw SocketError(.addressInUse, "cannot listen on \(address): another program is accepting there; choose another path")
            }
            unlink(path)  // a stale socket file nobody accepts on
        }
        fd = try address.withSockaddr { sa, len, family throws(SocketError) in
            let fd: Int32
            do throws(Errno) {
                fd = try SystemCall.once { Glibc.socket(family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
            } catch {
                throw .system("socket", error)
            }
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            do throws(Errno) {
                _ = try SystemCall.once { bind(fd, sa, len) }
                _ = try SystemCall.once { listen(fd, backlog) }
            } catch {
                close(fd)
                throw .system("cannot listen on \(address)", error)
            }
            return fd
        }
    }

    deinit {
        close(fd)
        if case .unix(let path) = address { unlink(path) }
    }

    /// Makes a blocked `accept` return at once (cancellation).
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// Accepts one connection, waiting at most `timeout` seconds (nil: forever).
    /// With `watch`, gives up as soon as that socket has something to read
    /// (or closed): the peer's control stream speaks while we wait.
    public func accept(timeout: Double?, watch: Socket? = nil) throws(SocketError) -> Socket {
        var pfds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
        if let w = watch { pfds.append(pollfd(fd: w.fd, events: Int16(POLLIN), revents: 0)) }
        let deadline = timeout.map { Monotonic.now + $0 }
        while true {
            let wait = deadline.map { max(0, Int32(($0 - Monotonic.now) * 1000)) } ?? -1
            let r: Int32
            do {
                // Not `retrying`: after EINTR the wait is computed anew.
                r = try SystemCall.once { poll(&pfds, nfds_t(pfds.count), wait) }
            } catch  where error == .interrupted {
                continue
            } catch {
                throw .system("waiting for a connection on \(address)", error)
            }
            if r == 0 { throw SocketError(.timedOut, "no connection arrived on \(address) in time") }
            if pfds.count > 1, pfds[1].revents != 0 {
                throw SocketError(.interrupted, "the peer spoke on its control channel while we waited for a connection")
            }
            let c: Int32
            do throws(Errno) {
                c = try SystemCall.retrying { Glibc.accept(fd, nil, nil) }
            } catch  where error == .resourceTemporarilyUnavailable || error == .connectionAbort {
                continue  // the connection went away before we took it: wait for the next
            } catch {
                throw .system("accepting on \(address)", error)
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            let s = Socket(fd: c, peer: "\(address) (accepted)")
            if case .tcp = address {
                s.tune(family: AF_INET)
                if let peerTimeout { try s.setPeerTimeout(peerTimeout) }
            }
            return s
        }
    }
}
