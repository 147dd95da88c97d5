import CShims
import OSCall
import Synchronization
import SystemPackage
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#endif

/// A guest's RAM mapped `MAP_SHARED`: the memory a guest writes and we move.
///
/// Usually one file holding one RAM block. A guest with several RAM blocks
/// (QEMU's "pc.ram", "vga.vram", ...) has one file per block; `combining`
/// maps them side by side in one address range, in layout order, so the
/// engines address the whole RAM with one offset: block i's bytes start at
/// `blockStarts[i]`, and page numbers run on from one block into the next.
/// `block` then describes the whole range (the sum of the sizes, the common
/// page size) and `blocks` the parts. Each file keeps its own bytes: reads,
/// writes and discards go to the file the offset falls in.
///
/// Ownership: the mapping lives as long as this object; `deinit` unmaps it and
/// closes the files. The pointer and geometry never change after `init`.
/// The bytes behind `base` are shared with other processes by design (the
/// guest writes them while the source reads them), so this type is
/// `@unchecked Sendable`: it hands out a pointer, and the rules for touching
/// the bytes are the dirty-tracking contract (docs/GUEST-CONTROL.md), not Swift's.
public final class RAMFile: @unchecked Sendable {
    /// How the file is opened and mapped.
    public enum Access: Sendable {
        /// `O_RDONLY` + `PROT_READ`: the source, which must never write guest RAM.
        case readOnly
        /// `O_RDWR` + `PROT_READ|PROT_WRITE`: the guest and the destination.
        case readWrite
    }

    /// The file's path, for messages (the first block's, when combined).
    public let path: FilePath
    /// Name, size and page size of the block this file holds; for combined
    /// blocks, the whole range (names joined with '+').
    public let block: RAMBlock
    /// The RAM blocks, in order: one, or the combined ones.
    public var blocks: [RAMBlock] { parts.map(\.block) }
    /// Where each of `blocks` starts in the mapping, in bytes.
    public var blockStarts: [UInt64] { parts.map(\.start) }
    /// Each block's file path.
    public var paths: [FilePath] { parts.map(\.path) }
    /// Start of the mapping; `block.size` bytes long.
    public let base: UnsafeMutableRawPointer
    public let access: Access
    /// True when `create` found the file empty and sized it: every page read
    /// zero when this mapping was made (a hole, or zero-filled by a
    /// pre-fault). Whoever writes the mapping afterwards must track what it
    /// wrote before relying on this (the destination's `arrived` bitmap).
    public let createdEmpty: Bool
    /// One file per block: its descriptor, path, geometry and start.
    private let parts: [Part]

    private struct Part {
        let fd: FileDescriptor
        let path: FilePath
        let block: RAMBlock
        let start: UInt64
    }

    /// Opens and maps an existing RAM file; its size gives the block size.
    public convenience init(
        path: FilePath, access: Access, pageSize: UInt64 = RAMBlock.hostPageSize,
        blockName: String = RAMBlock.defaultName
    ) throws(GuestMemoryError) {
        let mode: FileDescriptor.AccessMode = access == .readOnly ? .readOnly : .readWrite
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(path, mode, options: [.closeOnExec])
        } catch {
            let e = (error as? Errno) ?? .ioError
            throw GuestMemoryError(Self.openFailure(path, e), errno: e)
        }
        try self.init(fd: fd, path: path, access: access, pageSize: pageSize, blockName: blockName, createdEmpty: false)
    }

    /// Maps the open `fd` (owned from here on: closed on failure or in
    /// deinit). `create` passes the descriptor it checked and sized, so
    /// `createdEmpty` speaks of the very file that gets mapped.
    private init(
        fd: FileDescriptor, path: FilePath, access: Access, pageSize: UInt64, blockName: String, createdEmpty: Bool
    ) throws(GuestMemoryError) {
        do {
            let size = try Self.fileSize(fd, path)
            try Self.checkGeometry(path: path, size: size, pageSize: pageSize)
            let block = RAMBlock(name: blockName, size: size, pageSize: pageSize)
            self.base = try Self.map(fd, block: block, access: access, path: path)
            self.block = block
        } catch {
            try? fd.close()
            throw error
        }
        self.path = path
        self.access = access
        self.createdEmpty = createdEmpty
        self.parts = [Part(fd: fd, path: path, block: block, start: 0)]
    }

    /// Maps `files`' blocks side by side, in this order, in one new range
    /// (see the type's comment). The files' own mappings are left as they
    /// are; this object holds duplicates of their descriptors. One file
    /// returns itself. Every block must have the same page size and access.
    public static func combining(_ files: [RAMFile]) throws(GuestMemoryError) -> RAMFile {
        precondition(!files.isEmpty, "combining no RAM files")
        if files.count == 1 { return files[0] }
        let pageSize = files[0].block.pageSize, access = files[0].access
        for f in files where f.block.pageSize != pageSize || f.parts.count != 1 || f.access != access {
            throw GuestMemoryError(
                "RAM block '\(f.block.name)' (\(f.path)) has pages of \(f.block.pageSize) bytes, '\(files[0].block.name)' of \(pageSize): "
                    + "the blocks of one guest must have the same page size")
        }
        let total = files.reduce(UInt64(0)) { $0 + $1.block.size }
        // Reserve the whole range first, then map each file over its part.
        guard let reserved = mmap(nil, Int(total), PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
            reserved != MAP_FAILED
        else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot reserve \(total) bytes of address space for \(files.count) RAM blocks: \(e)", errno: e)
        }
        var parts: [Part] = []
        var start: UInt64 = 0
        let prot = access == .readOnly ? PROT_READ : (PROT_READ | PROT_WRITE)
        for f in files {
            let part = f.parts[0]
            let fd: FileDescriptor
            do {
                fd = try part.fd.duplicate()
                _ = fcntl(fd.rawValue, F_SETFD, FD_CLOEXEC)
            } catch {
                for p in parts { try? p.fd.close() }
                munmap(reserved, Int(total))
                throw GuestMemoryError("cannot duplicate the descriptor of RAM file \(part.path): \(error)")
            }
            let p = mmap(reserved + Int(start), Int(part.block.size), prot, MAP_SHARED | MAP_FIXED, fd.rawValue, 0)
            guard p == reserved + Int(start) else {
                let e = SystemCall.lastError
                try? fd.close()
                for p in parts { try? p.fd.close() }
                munmap(reserved, Int(total))
                throw GuestMemoryError(
                    "cannot map RAM file \(part.path) (\(part.block.size) bytes) next to the other blocks: \(e)", errno: e)
            }
            parts.append(Part(fd: fd, path: part.path, block: part.block, start: start))
            start += part.block.size
        }
        return RAMFile(
            combined: parts, base: reserved, total: total, pageSize: pageSize, access: access,
            createdEmpty: files.allSatisfy(\.createdEmpty))
    }

    private init(
        combined parts: [Part], base: UnsafeMutableRawPointer, total: UInt64, pageSize: UInt64, access: Access, createdEmpty: Bool
    ) {
        self.parts = parts
        self.base = base
        self.block = RAMBlock(name: parts.map(\.block.name).joined(separator: "+"), size: total, pageSize: pageSize)
        self.path = parts[0].path
        self.access = access
        self.createdEmpty = createdEmpty
    }

    /// The index in `blocks` of the block that holds page `page` (of the
    /// whole range).
    public func blockIndex(ofPage page: Int) -> Int {
        if parts.count == 1 { return 0 }
        let offset = UInt64(page) &* block.pageSize
        var i = parts.count - 1
        while i > 0, parts[i].start > offset { i -= 1 }
        return i
    }

    /// The part that holds byte `offset`, and the offset within its file.
    private func part(at offset: UInt64) -> (Part, UInt64) {
        if parts.count == 1 { return (parts[0], offset) }
        var i = parts.count - 1
        while i > 0, parts[i].start > offset { i -= 1 }
        return (parts[i], offset - parts[i].start)
    }

    /// Runs `body(part, offset in its file, length)` for each piece of the
    /// byte range `offset..<offset+length`, which may span blocks.
    private func eachPiece(
        offset: UInt64, length: UInt64, _ body: (Part, UInt64, UInt64) throws(GuestMemoryError) -> Void
    ) throws(GuestMemoryError) {
        var at = offset, left = length
        while left > 0 {
            let (p, inFile) = part(at: at)
            // Past the last block's end: the file's own call says why.
            let n = inFile < p.block.size ? min(left, p.block.size - inFile) : left
            try body(p, inFile, n)
            at += n
            left -= n
        }
    }

    /// Creates (or reuses) a read-write RAM file of exactly `size` bytes.
    ///
    /// An existing file of another size is an error, never truncated: it may
    /// be someone's guest.
    public static func create(
        path: FilePath, size: UInt64, pageSize: UInt64 = RAMBlock.hostPageSize,
        blockName: String = RAMBlock.defaultName
    ) throws(GuestMemoryError) -> RAMFile {
        try checkGeometry(path: path, size: size, pageSize: pageSize)
        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(
                path, .readWrite, options: [.create, .closeOnExec], permissions: [.ownerReadWrite, .groupRead])
        } catch {
            let e = (error as? Errno) ?? .ioError
            throw GuestMemoryError(openFailure(path, e), errno: e)
        }
        let existing: UInt64
        do throws(GuestMemoryError) {
            existing = try fileSize(fd, path)
            if existing == 0 {
                do throws(Errno) {
                    _ = try SystemCall.retrying { ftruncate(fd.rawValue, off_t(size)) }
                } catch {
                    throw GuestMemoryError("cannot size RAM file \(path) to \(size) bytes: \(error)", errno: error)
                }
            } else if existing != size {
                throw GuestMemoryError(
                    "RAM file \(path) is \(existing) bytes but \(size) are needed; remove it or give a file of that size")
            }
        } catch {
            try? fd.close()
            throw error
        }
        return try RAMFile(
            fd: fd, path: path, access: .readWrite, pageSize: pageSize, blockName: blockName, createdEmpty: existing == 0)
    }

    deinit {
        munmap(base, Int(block.size))
        for p in parts { try? p.fd.close() }
    }

    /// Pre-faults the whole mapping (`MADV_POPULATE_READ` / `_WRITE`) so later
    /// accesses take no page faults. Write population allocates file pages.
    public func populate(forWriting: Bool) throws(GuestMemoryError) {
        try populate(offset: 0, length: block.size, forWriting: forWriting)
    }

    /// `populate(forWriting:)` in `threads` slices, one thread each, and
    /// waits; the first error is thrown. The kernel faults each slice on
    /// its own CPU. Measured here (a fresh 1 GiB tmpfs file,
    /// `MADV_POPULATE_WRITE`, alternating runs): 0.65 s on one thread,
    /// 0.40 s on two. Small mappings are populated on the calling thread.
    public func populate(forWriting: Bool, threads: Int) throws(GuestMemoryError) {
        guard threads > 1, block.size >= Self.minimumSlicedSize else { return try populate(forWriting: forWriting) }
        let failure = Mutex<GuestMemoryError?>(nil)
        onSlices(threads: threads, name: "ram/populate") { [self] offset, length in
            do throws(GuestMemoryError) {
                try populate(offset: offset, length: length, forWriting: forWriting)
            } catch {
                failure.withLock { if $0 == nil { $0 = error } }
            }
        }
        if let e = failure.withLock({ $0 }) { throw e }
    }

    /// Pre-faults `length` bytes at `offset` (both page-aligned).
    public func populate(offset: UInt64, length: UInt64, forWriting: Bool) throws(GuestMemoryError) {
        let advice = forWriting ? LM_MADV_POPULATE_WRITE : LM_MADV_POPULATE_READ
        do throws(Errno) {
            _ = try SystemCall.retrying { madvise(base + Int(offset), Int(length), advice) }
        } catch {
            // A full file system makes MADV_POPULATE_WRITE fail with EFAULT
            // (the fault's SIGBUS), which reads as a bad pointer: say what it is.
            if forWriting, error == .badAddress || error == .noSpace,
                let free = FileSystemSpace.available(fd: part(at: offset).0.fd.rawValue), free < block.pageSize * 16
            {
                throw GuestMemoryError(
                    "cannot pre-fault RAM file \(path) (\(block.size) bytes): its file system is full (\(free) bytes free); "
                        + "free space there or give a path on a file system with room for the whole file",
                    errno: .noSpace)
            }
            throw GuestMemoryError("cannot pre-fault RAM file \(path): madvise: \(error)", errno: error)
        }
    }

    /// Drops this process's page-table entries for `length` bytes at
    /// `offset` (page-aligned) with `MADV_DONTNEED`, on the calling thread.
    /// The data stays in the file; a later access faults the pages back in.
    public func dropPageTables(offset: UInt64, length: Int) {
        precondition(offset % block.pageSize == 0 && offset + UInt64(length) <= block.size)
        // Best effort: on failure munmap does the work instead.
        _ = madvise(base + Int(offset), length, MADV_DONTNEED)
    }

    /// Drops this process's page-table entries for the whole mapping with
    /// `MADV_DONTNEED`, in `threads` slices on as many threads, and waits.
    ///
    /// Why: the kernel tears down a touched mapping's page tables on one CPU
    /// at munmap or exit, 34 ms per GiB of 4 KiB pages here, and `send` and
    /// `receive` cannot finish before that; two threads do it in 18 ms. The
    /// data is untouched: on a `MAP_SHARED` mapping the pages stay in the file
    /// (dirty ones are marked so), and a later access faults them back in.
    /// Small mappings are left to munmap (a thread costs more than it saves),
    /// and so are large ones the caller touched little of: `touchedBytes`,
    /// when the caller knows (a source that staged its pages by pread maps
    /// next to nothing), is what the threads would have to tear down.
    ///
    /// The threads run at nice 19. This runs after the migration completed,
    /// while the peer process is still finishing (a destination tears down
    /// while its source joins its threads and exits). On a machine with few
    /// cores, two drop threads at normal priority took both CPUs and delayed
    /// the source's exit by several milliseconds. At nice 19 they yield to it
    /// and still use every idle CPU.
    public func dropPageTables(threads: Int, touchedBytes: UInt64? = nil) {
        let minimumSize = Self.minimumSlicedSize
        guard threads > 1, block.size >= minimumSize, (touchedBytes ?? block.size) >= minimumSize else { return }
        onSlices(threads: threads, name: "ram/drop") { [self] offset, length in
            _ = lm_set_thread_background_priority()
            dropPageTables(offset: offset, length: Int(length))
        }
    }

    /// Below this a mapping is worked on by the calling thread alone: a
    /// thread costs more than it saves.
    static let minimumSlicedSize: UInt64 = 64 << 20

    /// Runs `body(offset, length)` for `threads` page-aligned slices of the
    /// whole mapping, one thread each (named `name/i`), and waits for all.
    private func onSlices(threads: Int, name: String, _ body: @escaping @Sendable (UInt64, UInt64) -> Void) {
        let pageSize = block.pageSize
        let pages = UInt64(block.pageCount)
        let per = (pages + UInt64(threads) - 1) / UInt64(threads)
        let workers = (0..<UInt64(threads)).compactMap { i -> WorkerThread? in
            let first = i * per
            guard first < pages else { return nil }
            let count = min(per, pages - first)
            return WorkerThread(name: "\(name)/\(i)") { body(first * pageSize, count * pageSize) }
        }
        for w in workers { w.join() }
    }

    /// Reads `length` bytes at `offset` of the file into `buffer` with
    /// pread(2): the bytes of the mapping, without mapping them (no fault,
    /// no page-table entry to tear down later). An error, or the end of the
    /// file before `length` bytes (the file shrank under us), throws.
    public func read(into buffer: UnsafeMutableRawPointer, offset: UInt64, length: Int) throws(GuestMemoryError) {
        var into = buffer
        try eachPiece(offset: offset, length: UInt64(length)) { (p, inFile, n) throws(GuestMemoryError) in
            try Self.read(p, into: into, offset: inFile, length: Int(n))
            into += Int(n)
        }
    }

    private static func read(_ part: Part, into buffer: UnsafeMutableRawPointer, offset: UInt64, length: Int) throws(GuestMemoryError) {
        let fd = part.fd, path = part.path, block = part.block
        var done = 0
        while done < length {
            let n: Int
            do throws(Errno) {
                n = try SystemCall.retrying { pread(fd.rawValue, buffer + done, length - done, off_t(offset) + off_t(done)) }
            } catch {
                throw GuestMemoryError("cannot read RAM file \(path) at offset \(offset + UInt64(done)): \(error)", errno: error)
            }
            if n == 0 {
                throw GuestMemoryError(
                    "RAM file \(path) ends before offset \(offset + UInt64(done)): it is shorter than its \(block.size) bytes now; "
                        + "something truncated it during the migration")
            }
            done += n
        }
    }

    /// Writes `length` bytes from `buffer` at `offset` of the file with
    /// pwrite(2), not through the mapping (which sees the bytes at once: one
    /// page cache). Into a hole of a tmpfs file this allocates the page
    /// without zeroing it first and without a fault or a page-table entry.
    public func write(from buffer: UnsafeRawPointer, offset: UInt64, length: Int) throws(GuestMemoryError) {
        precondition(access == .readWrite, "write into a read-only RAM file")
        var from = buffer
        try eachPiece(offset: offset, length: UInt64(length)) { (p, inFile, n) throws(GuestMemoryError) in
            try Self.write(p, from: from, offset: inFile, length: Int(n))
            from += Int(n)
        }
    }

    private static func write(_ part: Part, from buffer: UnsafeRawPointer, offset: UInt64, length: Int) throws(GuestMemoryError) {
        let fd = part.fd, path = part.path
        var done = 0
        while done < length {
            let n: Int
            do throws(Errno) {
                n = try SystemCall.retrying { pwrite(fd.rawValue, buffer + done, length - done, off_t(offset) + off_t(done)) }
            } catch {
                throw GuestMemoryError("cannot write RAM file \(path) at offset \(offset + UInt64(done)): \(error)", errno: error)
            }
            if n == 0 {
                throw GuestMemoryError(
                    "cannot write RAM file \(path) at offset \(offset + UInt64(done)): \(Errno.ioError)", errno: .ioError)
            }
            done += n
        }
    }

    /// Drops `length` bytes at `offset` (page-aligned) from the file:
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`. The pages leave the page cache
    /// and the file keeps its size, so every mapping of the file faults on
    /// them again. A mapping registered with a userfaultfd for MISSING
    /// faults then reports them and waits for the pages to be placed; any
    /// other access (another mapping, pread) would read zeros or allocate a
    /// zero page, which is why postcopy never touches them another way.
    public func discard(offset: UInt64, length: UInt64) throws(GuestMemoryError) {
        precondition(access == .readWrite, "discard in a read-only RAM file")
        guard offset % block.pageSize == 0, length % block.pageSize == 0, offset <= block.size, length <= block.size - offset
        else {
            throw GuestMemoryError(
                "cannot discard \(length) bytes at offset \(offset) of RAM file \(path) (\(block.size) bytes, pages of "
                    + "\(block.pageSize)): the range must be page-aligned and inside the file", errno: .invalidArgument)
        }
        guard length > 0 else { return }
        try eachPiece(offset: offset, length: length) { (p, offset, length) throws(GuestMemoryError) in
            let r = lm_punch_hole(p.fd.rawValue, Int64(offset), Int64(length))
            guard r == 0 else {
                let e = SystemCall.error(negated: r)
                throw GuestMemoryError(
                    "cannot discard \(length) bytes at offset \(offset) of RAM file \(p.path) (fallocate PUNCH_HOLE): \(e)"
                        + (e == .notSupported ? "; its file system cannot punch holes (use tmpfs: /dev/shm)" : ""), errno: e)
            }
        }
    }

    /// Why the RAM file at `path` cannot take postcopy, or nil when it can.
    ///
    /// A userfaultfd reports MISSING faults on a shared file mapping only
    /// where the page cache can lack a page without a disk behind it:
    /// tmpfs (which includes memfd and POSIX shared memory,
    /// `TMPFS_MAGIC` 0x01021994) and hugetlbfs (0x958458f6). Anywhere else
    /// `UFFDIO_REGISTER` refuses the mapping. A path that does not exist
    /// yet is judged by its directory.
    public static func postcopyRefusal(for path: FilePath) -> String? {
        var type = lm_statfs_type(path.string)
        if type == -Int64(ENOENT) {
            var dir = path
            dir.removeLastComponent()
            type = lm_statfs_type(dir.isEmpty ? "." : dir.string)
        }
        guard type >= 0 else {
            return "cannot tell the file system of RAM file \(path) (statfs: \(SystemCall.error(negated: type))); "
                + "postcopy needs the RAM file on tmpfs or hugetlbfs, e.g. under /dev/shm"
        }
        switch type {
        case Int64(LM_TMPFS_MAGIC), Int64(LM_HUGETLBFS_MAGIC): return nil
        default:
            return "RAM file \(path) is on \(fileSystemName(type)), where a userfaultfd cannot report missing pages; "
                + "postcopy needs the RAM file on tmpfs, memfd or hugetlbfs: put it under /dev/shm"
        }
    }

    /// A file system's name from its statfs magic, for messages.
    static func fileSystemName(_ magic: Int64) -> String {
        let known: [Int64: String] = [
            0xEF53: "ext2/ext3/ext4", 0x5846_5342: "xfs", 0x9123_683E: "btrfs", 0x794C_7630: "overlayfs",
            0x6969: "nfs", 0x6573_5546: "fuse", 0x0102_1994: "tmpfs", 0x9584_58F6: "hugetlbfs", 0x2FC1_2FC1: "zfs",
            0x4D44: "vfat", 0x5346_544E: "ntfs", 0xFF53_4D42: "cifs", 0x0102_1997: "9p",
            0xF2F5_2010: "f2fs", 0x9FA0: "proc",
        ]
        let hex = "0x" + String(magic, radix: 16)
        return known[magic].map { "\($0) (f_type \(hex))" } ?? "a file system of type \(hex)"
    }

    /// Pointer to byte `offset` of the block.
    @inlinable public func pointer(at offset: UInt64) -> UnsafeMutableRawPointer {
        base + Int(offset)
    }

    // MARK: - helpers

    private static func openFailure(_ path: FilePath, _ error: Errno) -> String {
        switch error {
        case .noSuchFileOrDirectory: return "RAM file \(path) does not exist; create it or check the path"
        case .permissionDenied: return "RAM file \(path) is not accessible: permission denied"
        case .isDirectory: return "RAM file \(path) is a directory"
        default: return "cannot open RAM file \(path): \(error)"
        }
    }

    private static func fileSize(_ fd: FileDescriptor, _ path: FilePath) throws(GuestMemoryError) -> UInt64 {
        var st = stat()
        do throws(Errno) {
            _ = try SystemCall.retrying { fstat(fd.rawValue, &st) }
        } catch {
            throw GuestMemoryError("cannot stat RAM file \(path): \(error)", errno: error)
        }
        if (st.st_mode & S_IFMT) != S_IFREG {
            throw GuestMemoryError("RAM file \(path) is not a regular file")
        }
        return UInt64(st.st_size)
    }

    static func checkGeometry(path: FilePath, size: UInt64, pageSize: UInt64) throws(GuestMemoryError) {
        guard pageSize >= 4096, pageSize & (pageSize - 1) == 0 else {
            throw GuestMemoryError("page size \(pageSize) is not a power of two of at least 4096")
        }
        guard size > 0 else {
            throw GuestMemoryError("RAM file \(path) is empty; a RAM file holds at least one page")
        }
        guard size % pageSize == 0 else {
            throw GuestMemoryError(
                "RAM file \(path) is \(size) bytes, not a multiple of the page size \(pageSize)")
        }
    }

    private static func map(
        _ fd: FileDescriptor, block: RAMBlock, access: Access, path: FilePath
    ) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        let prot = access == .readOnly ? PROT_READ : (PROT_READ | PROT_WRITE)
        guard let p = mmap(nil, Int(block.size), prot, MAP_SHARED, fd.rawValue, 0), p != MAP_FAILED else {
            let e = SystemCall.lastError
            throw GuestMemoryError("cannot map RAM file \(path) (\(block.size) bytes): \(e)", errno: e)
        }
        return p
    }
}
