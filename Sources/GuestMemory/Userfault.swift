import CShims
import OSCall
import Synchronization
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A userfaultfd: the descriptor through which a process learns of page
/// faults on the ranges it registered, and through which pages are placed
/// there atomically (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`). Postcopy migration
/// uses MISSING mode on the destination guest's RAM mapping (DESIGN.md §8).
///
/// **Which process it acts on.** A userfaultfd belongs to the mm (address
/// space) of the process that created it, whoever holds the descriptor.
/// The incoming guest creates it and registers its own mapping; the
/// receiver, holding a copy received over SCM_RIGHTS (`FaultHandoff`),
/// reads the guest's faults and places pages into the guest's memory.
/// Addresses are always the guest's; the *source* buffer of a copy is read
/// from the caller's memory (Firecracker's page-fault handler works the
/// same way).
///
/// **Who owns the descriptor.** This object: `deinit` closes it. Each
/// process that holds a copy has its own `Userfault` and closes its own.
/// The kernel keeps the userfaultfd alive while any copy is open. When the
/// last one closes, the registration goes away and every fault that was
/// waiting, and every later one, is resolved by the kernel as a normal
/// fault: on a tmpfs file a missing page then reads as **zeros**, silently.
/// So the guest keeps its own copy open for its whole life, and a receiver
/// that dies never takes the registration with it.
public final class Userfault: @unchecked Sendable {
    // @unchecked: `fd`, `features` and `pageSize` never change after init;
    // every operation is one ioctl, poll or read that the kernel serialises
    // on the descriptor; `rangeIoctls` is an Atomic.

    /// The userfaultfd (non-blocking, close-on-exec). Closed by `deinit`.
    public let fd: Int32
    /// The features the API handshake enabled (`UFFD_FEATURE_*`); for an
    /// adopted descriptor, what its creator said it enabled.
    public let features: UInt64
    /// The page size of the registered mappings: copies and zero fills are
    /// multiples of it, and a present page (EEXIST) is skipped by one page.
    public let pageSize: UInt64
    /// The range ioctls UFFDIO_REGISTER allowed (`LM_UFFD_IOCTL_*`), when
    /// this process registered; 0 when it did not (an adopted descriptor).
    private let rangeIoctls = Atomic<UInt64>(0)

    /// Creates a userfaultfd in this process (non-blocking, close-on-exec)
    /// and does the API handshake, asking for `UFFD_FEATURE_THREAD_ID`
    /// (faults then name the thread; a kernel without it still works).
    public init(pageSize: UInt64 = RAMBlock.hostPageSize) throws(GuestMemoryError) {
        self.pageSize = pageSize
        var granted: UInt64 = 0
        var fd = try Self.create()
        var r = lm_uffd_api(fd, UInt64(LM_UFFD_FEATURE_THREAD_ID), &granted)
        if r == -EINVAL {
            // A kernel that does not know the feature refuses the whole
            // handshake. Older kernels also refuse a second UFFDIO_API on
            // the same descriptor, so ask again on a fresh one, for nothing.
            close(fd)
            fd = try Self.create()
            granted = 0
            r = lm_uffd_api(fd, 0, &granted)
        }
        guard r == 0 else {
            close(fd)
            let e = SystemCall.error(negated: r)
            throw GuestMemoryError("userfaultfd API handshake (UFFDIO_API, api 0xAA) failed: \(e)", errno: e)
        }
        self.fd = fd
        self.features = granted
    }

    /// Adopts a descriptor received from another process (`FaultHandoff`):
    /// its creator did the API handshake and registered its ranges, and
    /// says in the hand-off whether faults carry thread ids. Owned from
    /// here on: `deinit` closes it.
    public init(adopting fd: Int32, threadIDs: Bool = false, pageSize: UInt64 = RAMBlock.hostPageSize) {
        self.fd = fd
        self.features = threadIDs ? UInt64(LM_UFFD_FEATURE_THREAD_ID) : 0
        self.pageSize = pageSize
    }

    /// Creates a userfaultfd in this process for kernel write tracking
    /// (DESIGN.md §9): asynchronous write-protect (`UFFD_FEATURE_WP_ASYNC`:
    /// a write to a protected page is not reported as a fault; the kernel
    /// lifts the protection and the page counts as written), on shared
    /// memory (`WP_HUGETLBFS_SHMEM`) and on pages not yet mapped
    /// (`WP_UNPOPULATED`). A kernel without one of them is refused with
    /// what it lacks.
    public init(writeTrackingPageSize pageSize: UInt64) throws(GuestMemoryError) {
        self.pageSize = pageSize
        let wanted =
            UInt64(LM_UFFD_FEATURE_WP_ASYNC) | UInt64(LM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM) | UInt64(LM_UFFD_FEATURE_WP_UNPOPULATED)
        let fd = try Self.create()
        var granted: UInt64 = 0
        let r = lm_uffd_api(fd, wanted, &granted)
        guard r == 0, granted == wanted else {
            close(fd)
            let e = r == 0 ? nil : SystemCall.error(negated: r)
            throw GuestMemoryError(
                "this kernel cannot track writes for us: the userfaultfd API handshake "
                    + (e.map { "failed (\($0))" } ?? "lacks features 0x\(String(wanted & ~granted, radix: 16))")
                    + " (asynchronous write-protect of shared memory needs Linux 6.7 or later); use --tracking bitmap",
                errno: e)
        }
        self.fd = fd
        self.features = granted
    }

    deinit { close(fd) }

    /// Whether faults name the faulting thread (`UFFD_FEATURE_THREAD_ID`
    /// granted). The adopting side learns it from the hand-off payload.
    public var reportsThreadID: Bool { features & UInt64(LM_UFFD_FEATURE_THREAD_ID) != 0 }

    private static func create() throws(GuestMemoryError) -> Int32 {
        var devError: Int32 = 0
        let fd = lm_uffd_create(&devError)
        if fd >= 0 { return fd }
        let e = SystemCall.error(negated: fd)
        let dev = SystemCall.error(negated: devError)
        throw GuestMemoryError(
            "cannot create a userfaultfd: userfaultfd(2): \(e); /dev/userfaultfd: \(dev). Postcopy needs one: run as root, "
                + "set sysctl vm.unprivileged_userfaultfd=1, or give this user read-write access to /dev/userfaultfd",
            errno: e)
    }

    // MARK: - ranges

    /// Registers `length` bytes at `address` (page-aligned) for MISSING
    /// faults (`UFFDIO_REGISTER`): from now on a thread touching a page the
    /// page cache does not hold sleeps until the page is placed, and the
    /// fault is read from this descriptor. The range must be mapped and of
    /// a kind that allows it (anonymous, tmpfs, memfd, hugetlbfs).
    public func registerMissing(address: UInt64, length: UInt64) throws(GuestMemoryError) {
        let ioctls = try register(
            address, length, mode: UInt64(LM_UFFDIO_REGISTER_MODE_MISSING), purpose: "MISSING faults (UFFDIO_REGISTER)",
            invalid:
                "the range is not all mapped by memory that takes MISSING faults (anonymous, tmpfs, memfd or hugetlbfs), or is registered already"
        )
        guard ioctls & UInt64(LM_UFFD_IOCTL_COPY) != 0 else {
            _ = lm_uffd_unregister(fd, address, length)
            throw GuestMemoryError(
                "the kernel registered \(Self.range(address, length)) but allows no UFFDIO_COPY there (ioctls 0x\(String(ioctls, radix: 16)))"
            )
        }
        rangeIoctls.store(ioctls, ordering: .relaxed)
    }

    /// Registers `length` bytes at `address` (page-aligned) for write
    /// protection (`UFFDIO_REGISTER`, mode WP) on a descriptor made with
    /// `init(writeTrackingPageSize:)`. Nothing is protected yet: the first
    /// `WrittenPageScan` reports every page as written and protects it.
    public func registerWriteProtect(address: UInt64, length: UInt64) throws(GuestMemoryError) {
        _ = try register(
            address, length, mode: UInt64(LM_UFFDIO_REGISTER_MODE_WP), purpose: "write tracking (UFFDIO_REGISTER, mode WP)",
            invalid: "the range is not all one mapping the kernel can write-protect, or is registered already")
    }

    /// `UFFDIO_REGISTER` of the range in `mode`; returns the range ioctls
    /// the kernel allows there. `invalid` explains EINVAL for this mode.
    private func register(_ address: UInt64, _ length: UInt64, mode: UInt64, purpose: String, invalid: String)
        throws(GuestMemoryError) -> UInt64
    {
        try checkRange(address, length, "register")
        var ioctls: UInt64 = 0
        let r = lm_uffd_register(fd, address, length, mode, &ioctls)
        guard r == 0 else {
            let e = SystemCall.error(negated: r)
            let why =
                switch e {
                case .invalidArgument: invalid
                case .noMemory: "no mapping covers the whole range"
                case .permissionDenied, .notPermitted: "the mapping is not writable or the kernel refused it"
                default: "\(e)"
                }
            throw GuestMemoryError("cannot register \(Self.range(address, length)) for \(purpose): \(why)", errno: e)
        }
        return ioctls
    }

    /// Unregisters `length` bytes at `address` (`UFFDIO_UNREGISTER`). The
    /// kernel wakes the range's waiting threads; their faults are then
    /// resolved normally, so a page still missing reads as zeros. Call it
    /// only when every page of the range has been placed.
    public func unregister(address: UInt64, length: UInt64) throws(GuestMemoryError) {
        try checkRange(address, length, "unregister")
        let r = lm_uffd_unregister(fd, address, length)
        guard r == 0 else {
            let e = SystemCall.error(negated: r)
            throw GuestMemoryError(
                "cannot unregister \(Self.range(address, length)) (UFFDIO_UNREGISTER): \(Self.meaning(e))", errno: e)
        }
    }

    // MARK: - placing pages

    /// What a placement found.
    public enum Placement: Sendable, Equatable {
        /// Every page of the range was missing and now holds the new bytes.
        case placed
        /// At least one page was present already (EEXIST) and kept its
        /// bytes; every other page was placed.
        case alreadyPresent
    }

    /// Copies `length` bytes (a page multiple) from `source`, in this
    /// process's memory, to `address` in the registered mm
    /// (`UFFDIO_COPY`), and wakes the threads waiting there. The kernel
    /// fills each page before mapping it, so no thread ever sees a page
    /// half-written.
    ///
    /// **EEXIST is not an error.** It means the page is present: placed by
    /// an earlier copy (a page requested and pushed at once, a retried
    /// request), or faulted in some other way. A present page is never
    /// overwritten: it is skipped and its waiters are woken (the kernel
    /// does not wake on EEXIST, and a thread that faulted just before the
    /// page appeared must not sleep on), and the result is
    /// `.alreadyPresent`. So whoever places pages must place each page's
    /// final bytes the first time.
    ///
    /// A copy the kernel interrupted part-way (it returns the bytes done
    /// and EAGAIN) goes on from where it stopped; EAGAIN with nothing done
    /// (the guest's mappings are changing) is retried.
    @discardableResult
    public func copy(to address: UInt64, from source: UnsafeRawPointer, length: Int) throws(GuestMemoryError) -> Placement {
        try checkRange(address, UInt64(length), "copy to")
        return try fill(address, UInt64(length), "UFFDIO_COPY") { at, done, left in
            lm_uffd_copy(fd, at, source + Int(done), left, false)
        }
    }

    /// Maps zero pages over `length` bytes at `address` (`UFFDIO_ZEROPAGE`),
    /// waking waiters; a present page is skipped as in `copy`. Where the
    /// mapping allows no zero-page ioctl (hugetlbfs), zeros are copied.
    @discardableResult
    public func zeroPage(at address: UInt64, length: Int) throws(GuestMemoryError) -> Placement {
        try checkRange(address, UInt64(length), "zero-fill")
        let ioctls = rangeIoctls.load(ordering: .relaxed)
        if ioctls == 0 || ioctls & UInt64(LM_UFFD_IOCTL_ZEROPAGE) != 0 {
            do throws(GuestMemoryError) {
                return try fill(address, UInt64(length), "UFFDIO_ZEROPAGE") { at, _, left in
                    lm_uffd_zeropage(fd, at, left, false)
                }
            } catch {
                // EINVAL on an aligned range of an adopted descriptor (its
                // ioctls unknown here): the mapping may have no zero-page
                // ioctl. Copy zeros instead; any other error stands.
                guard ioctls == 0, error.errno == .invalidArgument else { throw error }
            }
        }
        // Rare path (hugetlbfs): one zeroed buffer per call.
        let zeros = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: Int(pageSize))
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0, count: length)
        return try copy(to: address, from: zeros, length: length)
    }

    /// The placement loop of `copy` and `zeroPage`. `call(at, done, left)`
    /// returns bytes done (> 0) or -errno.
    private func fill(
        _ address: UInt64, _ length: UInt64, _ name: String, _ call: (UInt64, UInt64, UInt64) -> Int64
    ) throws(GuestMemoryError) -> Placement {
        var done: UInt64 = 0
        var present = false
        var retries = 0
        while done < length {
            let r = call(address + done, done, length - done)
            if r > 0 {
                done += UInt64(r)
                continue
            }
            let e = SystemCall.error(negated: r)
            switch e {
            case .fileExists:
                // The page at `address + done` is present: keep it, wake
                // whoever waits on it (best effort: a wake of a range
                // without waiters does nothing), go on with the next page.
                present = true
                _ = lm_uffd_wake(fd, address + done, pageSize)
                done += pageSize
            case .resourceTemporarilyUnavailable, .interrupted:
                // The guest's mappings are changing (fork, mremap, an
                // madvise in flight): nothing was done, try again. A
                // real-time caller (FaultPathPriority) must not spin on
                // its CPU while the guest finishes the change: after a few
                // yields it sleeps.
                retries += 1
                if retries <= 8 { sched_yield() } else { usleep(100) }
            default:
                throw GuestMemoryError(
                    "cannot place \(Self.range(address + done, length - done)) in the guest (\(name)): \(Self.meaning(e))",
                    errno: e)
            }
        }
        return present ? .alreadyPresent : .placed
    }

    /// Wakes the threads waiting on faults in `length` bytes at `address`
    /// (`UFFDIO_WAKE`), after pages were placed with waking deferred or
    /// made present some other way.
    public func wake(address: UInt64, length: UInt64) throws(GuestMemoryError) {
        try checkRange(address, length, "wake")
        let r = lm_uffd_wake(fd, address, length)
        guard r == 0 else {
            let e = SystemCall.error(negated: r)
            throw GuestMemoryError("cannot wake \(Self.range(address, length)) (UFFDIO_WAKE): \(Self.meaning(e))", errno: e)
        }
    }

    // MARK: - faults

    /// A page fault a thread of the registered mm is waiting on.
    public struct Fault: Sendable, Equatable {
        /// The faulting address in the registered mm (page-aligned).
        public var address: UInt64
        /// The faulting thread's id (in the guest's pid namespace), or 0
        /// when the thread id feature was not granted.
        public var threadID: UInt32
        /// Whether the access was a write.
        public var write: Bool

        public init(address: UInt64, threadID: UInt32, write: Bool) {
            self.address = address
            self.threadID = threadID
            self.write = write
        }
    }

    /// Waits up to `timeout` seconds (`poll`) for faults, then reads every
    /// pending `struct uffd_msg` and returns the page faults among them
    /// (other events are not asked for and are skipped). Empty when the
    /// timeout passed or a signal interrupted the wait; EAGAIN (another
    /// reader took the messages first) is not an error. A thread stays
    /// asleep after its fault was read until its page is placed or woken:
    /// a fault read and dropped is not asked again.
    public func readFaults(timeout: Double) throws(GuestMemoryError) -> [Fault] {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ms = timeout <= 0 ? 0 : Int32(min(timeout * 1000, Double(Int32.max)).rounded(.up))
        let n = poll(&pfd, 1, ms)
        if n < 0 {
            let e = SystemCall.lastError
            if e == .interrupted { return [] }
            throw GuestMemoryError("cannot wait for page faults (poll on the userfaultfd): \(e)", errno: e)
        }
        if n == 0 { return [] }
        if pfd.revents & Int16(POLLERR) != 0 {
            throw GuestMemoryError("the userfaultfd reports an error (POLLERR): its API handshake was never done", errno: .ioError)
        }
        var faults: [Fault] = []
        let capacity: Int32 = 64
        var messages = [lm_uffd_fault](repeating: lm_uffd_fault(), count: Int(capacity))
        while true {
            let count = messages.withUnsafeMutableBufferPointer { lm_uffd_read(fd, $0.baseAddress, capacity) }
            if count < 0 {
                let e = SystemCall.error(negated: count)
                if e == .resourceTemporarilyUnavailable { break }
                throw GuestMemoryError("cannot read page faults from the userfaultfd: \(e)", errno: e)
            }
            for m in messages.prefix(Int(count)) where m.event == UInt8(LM_UFFD_EVENT_PAGEFAULT) {
                faults.append(
                    Fault(
                        address: m.address & ~(pageSize - 1), threadID: m.ptid,
                        write: m.flags & UInt64(LM_UFFD_PAGEFAULT_FLAG_WRITE) != 0))
            }
            if count < capacity { break }
        }
        return faults
    }

    // MARK: - helpers

    private func checkRange(_ address: UInt64, _ length: UInt64, _ what: String) throws(GuestMemoryError) {
        guard length > 0, address % pageSize == 0, length % pageSize == 0, address <= UInt64.max - length else {
            throw GuestMemoryError(
                "cannot \(what) \(Self.range(address, length)): address and length must be multiples of the page size \(pageSize), "
                    + "length above 0", errno: .invalidArgument)
        }
    }

    static func range(_ address: UInt64, _ length: UInt64) -> String {
        "\(length) bytes at 0x\(String(address, radix: 16))"
    }

    private static func meaning(_ e: Errno) -> String {
        switch e {
        case .noSuchProcess: "the guest process that created the userfaultfd has exited (ESRCH)"
        case .noSuchFileOrDirectory: "no registered mapping covers it any more: the guest unmapped or unregistered it (ENOENT)"
        case .noSpace: "the guest's RAM file system is full (ENOSPC)"
        case .noMemory: "out of memory, or the range is not mapped (ENOMEM)"
        case .badAddress: "the source buffer is not readable (EFAULT)"
        case .invalidArgument: "the range is not registered for this userfaultfd, or not page-aligned (EINVAL)"
        default: "\(e)"
        }
    }
}
