import CShims
import OSCall
import SystemPackage

#if canImport(Glibc)
    import Glibc
#endif

/// Sends a whole gather list (header + pointers into guest RAM or into the
/// sender's staging slots) on one socket: the kernel copies straight from
/// the buffers. Short writes are resumed where they stopped. `writeAll`
/// returns only when the kernel is done with every buffer (the staging
/// slots are reused by the next job right after).
///
/// Owned by one sender thread; not thread-safe.
public protocol StreamWriter: AnyObject {
    /// How bytes leave: "io_uring" or "plain sendmsg".
    var mechanism: String { get }
    /// Writes `total` bytes described by `count` iovecs at `iov`. The array
    /// may be modified (advanced past what was sent) by partial writes.
    /// On return the kernel no longer needs the buffers.
    func writeAll(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int) throws(SocketError)
    /// Zero-copy sends made, and how many of them the kernel copied anyway.
    var zeroCopyReport: (sends: UInt64, copied: UInt64) { get }
    /// The most bytes one system call sends (0: a whole gather list at
    /// once). See `postcopyBytesPerCall`.
    var bytesPerCall: Int { get set }
}

/// The bytes per send system call while postcopy runs.
///
/// This kernel is built without preemption in kernel mode
/// (`CONFIG_PREEMPT_NONE`, as most server kernels): a thread inside one
/// `sendmsg` of a whole 2 MiB job keeps its CPU until the call returns,
/// copying and, over loopback, doing the receiving side's TCP work as well.
/// A real-time thread on the fault path (`FaultPathPriority`) woken on that
/// CPU meanwhile waits for it: traced with the sched events, such waits
/// reached 0.9 ms and made most of the faults slower than 300 µs. Calls of
/// at most this many bytes return (and let the woken thread run) within
/// tens of microseconds.
public let postcopyBytesPerCall = 128 << 10

extension StreamWriter {
    public var zeroCopyReport: (sends: UInt64, copied: UInt64) { (0, 0) }
}

/// Builds the writer for `socket`: io_uring when the kernel lets this process
/// have a ring, else plain `sendmsg`. `warning` says why the fallback was taken.
public func makeStreamWriter(for socket: Socket, useRing: Bool = true, zeroCopy: Bool = false) -> (
    writer: any StreamWriter, warning: String?
) {
    guard useRing else { return (PlainSendWriter(socket: socket), nil) }
    do {
        return (try URingSendWriter(socket: socket, zeroCopy: zeroCopy), nil)
    } catch {
        return (PlainSendWriter(socket: socket), "\(error.description); sending with plain sendmsg instead")
    }
}

/// `IORING_OP_SENDMSG` on a ring of this writer's own: one submission and
/// one completion per gather list, a single `io_uring_enter` each.
///
/// The ring is created on the first write, in the sender thread that owns
/// it, with `SINGLE_ISSUER | DEFER_TASKRUN`: completion work then runs only
/// when that thread waits, with no wake-ups from other CPUs. Measured on
/// kernel 6.18 with a guest running beside the migration: a 1 GiB round of
/// mostly zero pages (small packets) took 1.5 s on a default ring, 0.15 s on
/// this one and 0.13 s with plain sendmsg (tools/bench-live.py runs a guest
/// beside the migration). `init` only checks that this process may have a
/// ring at all (one probe per process).
public final class URingSendWriter: StreamWriter {
    /// "io_uring", or "plain sendmsg" if the sender thread could not get a
    /// ring after all (the probe in `init` passed, the real one failed).
    public var mechanism: String { fallback == nil ? "io_uring" : "plain sendmsg" }
    private var fallback: PlainSendWriter?
    private let socket: Socket
    public var bytesPerCall = 0 {
        didSet { fallback?.bytesPerCall = bytesPerCall }
    }
    private let entries: UInt32
    private var ring: OpaquePointer?
    /// Send with IORING_OP_SENDMSG_ZC and count what the kernel copied.
    public let zeroCopy: Bool
    private var zcSends: UInt64 = 0
    private var zcCopied: UInt64 = 0

    public var zeroCopyReport: (sends: UInt64, copied: UInt64) { (zcSends, zcCopied) }

    public init(socket: Socket, entries: UInt32 = 8, zeroCopy: Bool = false) throws(SocketError) {
        self.socket = socket
        self.entries = entries
        self.zeroCopy = zeroCopy
        if let refused = Self.probe { throw refused }
    }

    /// Whether this process may have a ring: one probe per process (about
    /// 0.1 ms each), not one per channel; nil when it may.
    private static let probe: SocketError? = {
        do throws(SocketError) {
            lm_ring_destroy(try createRing(entries: 8, flags: 0))
            return nil
        } catch {
            return error
        }
    }()

    deinit { if let ring { lm_ring_destroy(ring) } }

    static func createRing(entries: UInt32, flags: UInt32) throws(SocketError) -> OpaquePointer {
        var err: Int32 = 0
        guard let r = lm_ring_create(entries, flags, &err) else {
            let e = SystemCall.error(negated: err)
            let why: String
            switch e {
            case .noFunction: why = "io_uring is not available (io_uring_setup: ENOSYS, a seccomp filter or an old kernel)"
            case .notPermitted: why = "io_uring is disabled (kernel.io_uring_disabled or a policy: EPERM)"
            default: why = "cannot create an io_uring ring: \(e)"
            }
            throw SocketError(.ringUnavailable, why, errno: e)
        }
        return r
    }

    /// The ring, created by the calling (sender) thread on first use.
    private func ownRing() throws(SocketError) -> OpaquePointer {
        if let ring { return ring }
        let r: OpaquePointer
        do {
            r = try Self.createRing(entries: entries, flags: LM_IORING_SETUP_SINGLE_ISSUER | LM_IORING_SETUP_DEFER_TASKRUN)
        } catch {
            // Kernels before 6.1 lack these flags: a default ring still works.
            r = try Self.createRing(entries: entries, flags: 0)
        }
        ring = r
        return r
    }

    public func writeAll(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int) throws(SocketError) {
        if let fallback { return try fallback.writeAll(iov, count: count, total: total) }
        let ring: OpaquePointer
        do {
            ring = try ownRing()
        } catch {
            let plain = PlainSendWriter(socket: socket)
            plain.bytesPerCall = bytesPerCall
            fallback = plain
            return try plain.writeAll(iov, count: count, total: total)
        }
        var cursor = IOVecCursor(iov, count: count)
        var done = 0
        while done < total {
            let window = cursor.window(limit: bytesPerCall)
            let res: Int32, cqeFlags: UInt32
            do {
                // Once the send completed the kernel has read the iovecs
                // (the pages it may still hold under zero copy, not the
                // array): the cut one gets its length back.
                defer { window.restore() }
                (res, cqeFlags) = try sendOnce(ring, cursor.current, count: window.count)
            }
            if cqeFlags & LM_IORING_CQE_F_MORE != 0 {
                // Zero copy: the buffers (our header, guest pages) stay in
                // the kernel's hands until the notification arrives.
                try awaitNotification(ring)
            }
            if res < 0 {
                // The send itself was interrupted: submit the rest again.
                let e = SystemCall.error(negated: res)
                if e == .interrupted || e == .resourceTemporarilyUnavailable { continue }
                throw .system("sending to \(socket.peer)", e)
            }
            if res == 0 { throw SocketError(.peerClosed, "sending to \(socket.peer): the connection is closed") }
            done += Int(res)
            cursor.advance(by: Int(res))
        }
    }

    /// Submits one send of `count` iovecs from `iov` and waits for its
    /// completion: its result and completion flags.
    private func sendOnce(_ ring: OpaquePointer, _ iov: UnsafeMutablePointer<iovec>, count: Int) throws(SocketError) -> (
        res: Int32, flags: UInt32
    ) {
        // MSG_WAITALL: the kernel retries partial sends itself; a short
        // result still happens (signal, shutdown) and is resumed by the
        // caller.
        let flags = UInt32(MSG_NOSIGNAL | MSG_WAITALL)
        let prep =
            zeroCopy
            ? lm_ring_prep_sendv_zc(ring, 0, socket.fd, iov, UInt32(count), flags, true, 0)
            : lm_ring_prep_sendv(ring, 0, socket.fd, iov, UInt32(count), flags, 0)
        if prep < 0 { throw .system("io_uring submission on \(socket.peer)", SystemCall.error(negated: prep)) }
        do throws(Errno) {
            _ = try SystemCall.retryingNegated { lm_ring_submit_and_wait(ring, 1) }
        } catch {
            throw .system("io_uring_submit_and_wait to \(socket.peer)", error)
        }
        var data: UInt64 = 0, res: Int32 = 0, cqeFlags: UInt32 = 0
        let rc = lm_ring_wait(ring, &data, &res, &cqeFlags)
        if rc < 0 { throw .system("io_uring_wait_cqe on \(socket.peer)", SystemCall.error(negated: rc)) }
        return (res, cqeFlags)
    }

    /// Waits for the zero-copy notification of the send just completed.
    private func awaitNotification(_ ring: OpaquePointer) throws(SocketError) {
        var data: UInt64 = 0, res: Int32 = 0, cqeFlags: UInt32 = 0
        let rc = lm_ring_wait(ring, &data, &res, &cqeFlags)
        if rc < 0 { throw .system("io_uring_wait_cqe on \(socket.peer)", SystemCall.error(negated: rc)) }
        guard cqeFlags & LM_IORING_CQE_F_NOTIF != 0 else {
            throw SocketError(.system, "io_uring: expected a zero-copy notification, got flags \(cqeFlags)")
        }
        zcSends += 1
        if UInt32(bitPattern: res) & LM_IORING_NOTIF_USAGE_ZC_COPIED != 0 { zcCopied += 1 }
    }
}

/// Plain blocking `sendmsg(2)`: the fallback where io_uring is not allowed.
public final class PlainSendWriter: StreamWriter {
    public let mechanism = "plain sendmsg"
    private let socket: Socket
    public var bytesPerCall = 0

    public init(socket: Socket) { self.socket = socket }

    public func writeAll(_ iov: UnsafeMutablePointer<iovec>, count: Int, total: Int) throws(SocketError) {
        var cursor = IOVecCursor(iov, count: count)
        var done = 0
        var msg = msghdr()
        while done < total {
            let window = cursor.window(limit: bytesPerCall)
            msg.msg_iov = cursor.current
            msg.msg_iovlen = window.count
            let n: Int
            do throws(Errno) {
                defer { window.restore() }
                n = try SystemCall.retrying { sendmsg(socket.fd, &msg, Int32(MSG_NOSIGNAL)) }
            } catch {
                throw .system("sending to \(socket.peer)", error)
            }
            done += n
            cursor.advance(by: n)
        }
    }
}
