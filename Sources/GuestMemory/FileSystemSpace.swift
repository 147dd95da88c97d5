import SystemPackage

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// Free space of file systems and the host's memory: the bounds a RAM file
/// announced by a peer or asked for on the command line must fit in.
public enum FileSystemSpace {
    /// Bytes an unprivileged process may still allocate on the file system
    /// that holds (or would hold) the file at `path`: `statvfs` of its
    /// directory, `f_bavail × f_frsize`. Nil when that cannot be asked.
    public static func available(forFileAt path: FilePath) -> UInt64? {
        var dir = path
        dir.removeLastComponent()
        let name = dir.isEmpty ? "." : dir.string
        var st = statvfs()
        guard statvfs(name, &st) == 0 else { return nil }
        return product(UInt64(st.f_bavail), UInt64(st.f_frsize))
    }

    /// Free bytes of the file system that holds the open file `fd`.
    public static func available(fd: Int32) -> UInt64? {
        var st = statvfs()
        guard fstatvfs(fd, &st) == 0 else { return nil }
        return product(UInt64(st.f_bavail), UInt64(st.f_frsize))
    }

    /// The host's physical memory: `sysconf(_SC_PHYS_PAGES) × page size`.
    public static var physicalMemory: UInt64 {
        let pages = sysconf(Int32(_SC_PHYS_PAGES))
        let size = sysconf(Int32(_SC_PAGESIZE))
        guard pages > 0, size > 0 else { return UInt64.max }
        return product(UInt64(pages), UInt64(size))
    }

    private static func product(_ a: UInt64, _ b: UInt64) -> UInt64 {
        let (p, overflow) = a.multipliedReportingOverflow(by: b)
        return overflow ? UInt64.max : p
    }
}
