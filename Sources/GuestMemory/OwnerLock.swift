import CShims
import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// An exclusive claim of one role on a file (the guest's RAM, its control
/// file): a Linux open-file-description write lock on the role's byte
/// (`fcntl(F_OFD_SETLK)`, docs/GUEST-CONTROL.md §10).
///
/// The lock belongs to a descriptor this object opens for itself, so it
/// lasts exactly as long as the object: `deinit` closes the descriptor and
/// the kernel drops the lock, as it does when the process dies in any way
/// (SIGKILL included). No stale lock survives its holder. Each role locks
/// its own byte, so roles never block each other: a running guest, the
/// source migrating it and a destination each hold one byte of the control
/// file at once.
///
/// The kernel does not say who holds an open-file-description lock
/// (`F_OFD_GETLK` reports the pid as -1). The holder therefore also locks a
/// *beacon* byte far past the data whose offset encodes its pid, and
/// `holder(of:on:)` reads the pid back from the offset of the conflicting
/// lock. Locks past the end of a file are allowed and cost nothing.
public final class OwnerLock: Sendable {
    /// Which byte a role locks.
    public struct Role: Sendable, Equatable {
        /// The byte offset locked.
        public let byte: Int64

        /// RAM file, byte 0: the one process that writes the RAM
        /// (`livemig stress`, or `livemig receive`).
        public static let ramWriter = Role(byte: 0)
        /// Control file, byte 0: the running guest (`livemig stress`).
        public static let guest = Role(byte: 0)
        /// Control file, byte 1: the source migrating the guest (`send --guest`).
        public static let source = Role(byte: 1)
        /// Control file, byte 2: the destination receiving into it (`receive --guest`).
        public static let receiver = Role(byte: 2)

        /// The first beacon byte of this role; the holder's pid is added.
        var beaconBase: Int64 { (1 << 50) + (byte << 32) }
    }

    /// The process holding a role, as far as it can be named.
    public struct Holder: Sendable, Equatable, CustomStringConvertible {
        /// The holder's pid, when its beacon lock names it.
        public var pid: Int32?

        public var description: String {
            pid.map { "another livemig process (pid \($0))" } ?? "another livemig process"
        }

        /// "another livemig process (pid N, `what`)": the holder and what it must be.
        public func named(_ what: String) -> String {
            pid.map { "another livemig process (pid \($0), \(what))" } ?? "another livemig process (\(what))"
        }
    }

    /// Claims the writer byte of the RAM file at `path` (`create`: creating
    /// it empty when absent), refusing with the message every command gives.
    public static func claimRAM(_ path: FilePath, create: Bool = false) throws(GuestMemoryError) -> OwnerLock {
        try acquire(.ramWriter, on: path, create: create) { holder in
            "RAM file \(path) is in use by \(holder.named("a running guest or a receive")); give another path"
        }
    }

    /// The file, for messages.
    public let path: FilePath
    /// The role held.
    public let role: Role
    /// True when `acquire(_:on:create:busy:)` created the file: it did not
    /// exist before this process claimed it.
    public let created: Bool
    private let fd: Int32

    private init(path: FilePath, role: Role, created: Bool, fd: Int32) {
        self.path = path
        self.role = role
        self.created = created
        self.fd = fd
    }

    deinit { close(fd) }

    /// Claims `role` on the file at `path` without waiting. With `create`,
    /// an absent file is created empty first (`created` tells). When another
    /// process holds the role, throws the message `busy` makes from the
    /// holder ("another livemig process (pid N)").
    public static func acquire(
        _ role: Role, on path: FilePath, create: Bool = false, busy: (Holder) -> String
    ) throws(GuestMemoryError) -> OwnerLock {
        var created = false
        var fd: Int32 = -1
        if create {
            fd = open(path.string, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o640)
            created = fd >= 0
        }
        if fd < 0 { fd = open(path.string, O_RDWR | O_CLOEXEC) }
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            throw GuestMemoryError("cannot open \(path) to claim it: \(e)", errno: e)
        }
        let r = lm_ofd_lock(fd, role.byte, role.beaconBase + Int64(getpid()))
        if r == 0 { return OwnerLock(path: path, role: role, created: created, fd: fd) }
        // Whoever holds it has the file open: a file we just created is
        // theirs now as much as ours, so it stays.
        close(fd)
        let e = Errno(rawValue: -r)
        guard e == .resourceTemporarilyUnavailable else {
            throw GuestMemoryError(
                "cannot lock byte \(role.byte) of \(path) (fcntl F_OFD_SETLK): \(e); livemig needs a file system with "
                    + "open-file-description locks (a local one such as tmpfs, ext4 or xfs)",
                errno: e)
        }
        throw GuestMemoryError(busy((try? holder(of: role, on: path)) ?? Holder(pid: nil)), errno: e)
    }

    /// Who holds `role` on the file at `path`, or nil when nobody does (or
    /// the file does not exist). Only looks: claims nothing.
    public static func holder(of role: Role, on path: FilePath) throws(GuestMemoryError) -> Holder? {
        let fd = open(path.string, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            if e == .noSuchFileOrDirectory { return nil }
            throw GuestMemoryError("cannot open \(path) to see who uses it: \(e)", errno: e)
        }
        // Closing this descriptor releases nothing: it holds no lock, and
        // open-file-description locks of other descriptions are unaffected.
        defer { close(fd) }
        var start: Int64 = 0
        let held = lm_ofd_holder(fd, role.byte, 1, &start)
        guard held >= 0 else {
            let e = Errno(rawValue: -held)
            throw GuestMemoryError("cannot test the lock on byte \(role.byte) of \(path) (fcntl F_OFD_GETLK): \(e)", errno: e)
        }
        guard held == 1 else { return nil }
        var beacon: Int64 = 0
        let range: Int64 = 1 << 32
        if lm_ofd_holder(fd, role.beaconBase, range, &beacon) == 1, beacon >= role.beaconBase,
            beacon - role.beaconBase <= Int64(Int32.max)
        {
            return Holder(pid: Int32(beacon - role.beaconBase))
        }
        return Holder(pid: nil)
    }
}
