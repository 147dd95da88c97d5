#if canImport(Glibc)
    import Glibc
#endif

/// /proc/self/pagemap could not be read.
public struct PagemapUnreadable: Error {}

/// Whether this process's page table maps the page at `address`: bit 63
/// ("present") of its /proc/self/pagemap entry.
public func isPageMapped(_ address: UnsafeRawPointer) throws -> Bool {
    let fd = open("/proc/self/pagemap", O_RDONLY)
    guard fd >= 0 else { throw PagemapUnreadable() }
    defer { close(fd) }
    var entry: UInt64 = 0
    guard pread(fd, &entry, 8, off_t(UInt(bitPattern: address) / 4096 * 8)) == 8 else { throw PagemapUnreadable() }
    return entry >> 63 == 1
}
