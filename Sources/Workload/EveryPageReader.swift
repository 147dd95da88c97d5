import GuestMemory
import Synchronization
import SystemPackage
import WorkerThreads

#if canImport(Glibc)
    import Glibc
#endif

/// Reads every page of a guest's RAM the way a guest thread does (a plain
/// load through the guest's own mapping) and writes what it saw to a file:
/// the check that a postcopy destination shows its guest exactly the
/// source's final content (`stress --incoming --read-every-page`).
///
/// Run on an incoming guest after the switch, a page that has not arrived
/// faults into the receiver (userfaultfd) and the load returns only once the
/// page was placed; a page read as zero or stale would show as a difference
/// between the file and the source's RAM.
///
/// Ownership: each thread reads its own contiguous slice of pages and writes
/// it at the same offset of the output file; the threads share nothing but
/// the first error. Thread `k` starts at slice `k`'s first page, so with two
/// or more threads some reads land far from the pusher's cursor.
public enum EveryPageReader {
    public struct Outcome: Sendable {
        public var pages: Int
        public var seconds: Double
    }

    /// Reads all of `ram` with `threads` threads into a new file at `output`
    /// (created, or truncated, with `ram`'s size).
    public static func read(_ ram: RAMFile, into output: FilePath, threads: Int) throws(GuestMemoryError) -> Outcome {
        let fd = open(output.string, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let e = Errno(rawValue: errno)
            throw GuestMemoryError("cannot create \(output) to write the pages read into: \(e)", errno: e)
        }
        defer { close(fd) }
        guard ftruncate(fd, off_t(ram.block.size)) == 0 else {
            let e = Errno(rawValue: errno)
            throw GuestMemoryError("cannot size \(output) to \(ram.block.size) bytes: \(e)", errno: e)
        }
        let pageCount = ram.block.pageCount
        let pageSize = Int(ram.block.pageSize)
        let n = max(1, min(threads, pageCount))
        let firstError = Mutex<GuestMemoryError?>(nil)
        var start = timespec()
        clock_gettime(CLOCK_MONOTONIC, &start)
        let workers = (0..<n).map { k in
            let first = pageCount * k / n
            let end = pageCount * (k + 1) / n
            return WorkerThread(name: "read-pages-\(k)") {
                // Pages are copied one at a time (each load is a guest
                // read), then written in chunks.
                let chunkPages = 64
                let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunkPages * pageSize, alignment: pageSize)
                defer { buffer.deallocate() }
                var page = first
                while page < end {
                    let count = min(chunkPages, end - page)
                    for i in 0..<count {
                        let offset = ram.block.offset(ofPage: page + i)
                        memcpy(buffer + i * pageSize, ram.pointer(at: offset), pageSize)
                    }
                    let bytes = count * pageSize
                    let wrote = pwrite(fd, buffer, bytes, off_t(ram.block.offset(ofPage: page)))
                    guard wrote == bytes else {
                        let e = Errno(rawValue: wrote < 0 ? errno : ENOSPC)
                        firstError.withLock { $0 = $0 ?? GuestMemoryError("cannot write the pages read into \(output): \(e)", errno: e) }
                        return
                    }
                    page += count
                }
            }
        }
        for w in workers { w.join() }
        if let e = firstError.withLock({ $0 }) { throw e }
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let seconds = Double(now.tv_sec - start.tv_sec) + Double(now.tv_nsec - start.tv_nsec) / 1e9
        return Outcome(pages: pageCount, seconds: seconds)
    }
}
