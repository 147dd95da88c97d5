// CShims: the few Linux pieces Swift cannot use directly.
//
// This header includes nothing but <stdint.h>, <stdbool.h> and <stddef.h>.
// swift-system's CSystem module already imports the kernel's io_uring and
// libc headers, and liburing ships its own copy of the io_uring uapi header:
// exposing liburing here makes the two copies of `struct io_uring_sqe` clash
// in Swift's importer. So the ring is an opaque handle and liburing is used
// only inside shims.c.
//
// What is here:
//   - the ring operations our senders need (opaque `lm_ring`),
//   - uapi constants newer than Debian 12's headers (the kernel is newer),
//   - atomics on raw memory (bitmap words shared with another process, which
//     Swift's Atomic<T> cannot own),
//   - futex calls (syscall(2) is variadic),
//   - zero-page detection written for the vectoriser,
//   - libzstd behind opaque contexts (zstd.c; <zstd.h> stays out of this
//     header like liburing's),
//   - a seccomp filter tests use to take io_uring away from a process,
//   - userfaultfd (postcopy): its ioctls behind plain functions, with the
//     uapi constants and struct layouts written out here, because
//     <linux/userfaultfd.h> cannot be included (see above); shims.c checks
//     them against the build's header where it has them,
//   - SCM_RIGHTS hand-off of one descriptor (struct msghdr and the CMSG_*
//     macros do not import), peer credentials, fallocate, statfs.
#ifndef LIVEMIG_CSHIMS_H
#define LIVEMIG_CSHIMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// ---- uapi constants (values from the kernel's uapi headers) ------------
#define LM_MADV_POPULATE_READ 22
#define LM_MADV_POPULATE_WRITE 23

// ---- io_uring ------------------------------------------------------------

/// One io_uring ring owned by one thread.
typedef struct lm_ring lm_ring;

/// Ring setup flags (values from the uapi header).
#define LM_IORING_SETUP_COOP_TASKRUN (1U << 8)
#define LM_IORING_SETUP_SINGLE_ISSUER (1U << 12)
#define LM_IORING_SETUP_DEFER_TASKRUN (1U << 13)

/// io_uring_queue_init(entries, flags). Returns NULL and sets *err to
/// -errno on failure (-ENOSYS under a seccomp filter, -EPERM when
/// io_uring_disabled, -EINVAL for flags the kernel does not know).
lm_ring *lm_ring_create(unsigned entries, unsigned flags, int *err);
/// io_uring_queue_exit and free.
void lm_ring_destroy(lm_ring *ring);
/// Number of submission slots (the `entries` the ring was made with).
unsigned lm_ring_entries(const lm_ring *ring);
/// Queues IORING_OP_SENDMSG of `iovcnt` `struct iovec`s at `iov` on `fd`.
/// `slot` (< entries) names the msghdr kept alive until completion; the
/// iovec array must stay valid until then too. Returns 0, or -EBUSY when the
/// submission queue is full.
int lm_ring_prep_sendv(lm_ring *ring, unsigned slot, int fd, const void *iov, unsigned iovcnt,
                       unsigned msg_flags, uint64_t user_data);
/// Like lm_ring_prep_sendv but IORING_OP_SENDMSG_ZC: the kernel sends from
/// the pages without copying where the device allows, and posts a second
/// completion (IORING_CQE_F_NOTIF) once it no longer needs them. With
/// `report_usage` that notification says whether the data was copied after
/// all (IORING_NOTIF_USAGE_ZC_COPIED in its res).
int lm_ring_prep_sendv_zc(lm_ring *ring, unsigned slot, int fd, const void *iov, unsigned iovcnt,
                          unsigned msg_flags, bool report_usage, uint64_t user_data);
#define LM_IORING_CQE_F_MORE (1U << 1)
#define LM_IORING_CQE_F_NOTIF (1U << 3)
#define LM_IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)

/// io_uring_submit_and_wait. Returns submitted count or -errno.
int lm_ring_submit_and_wait(lm_ring *ring, unsigned wait_nr);
/// Waits for one completion and consumes it. Returns 0 or -errno.
int lm_ring_wait(lm_ring *ring, uint64_t *user_data, int32_t *res, uint32_t *flags);

// ---- atomics on raw (possibly shared) memory ---------------------------
// Every word these touch is touched only through them (never plainly).

/// Sets bits with release order: data written before it is visible to
/// whoever later takes the bits with an acquire exchange.
static inline uint64_t lm_atomic_fetch_or_release_u64(uint64_t *word, uint64_t bits) {
    return __atomic_fetch_or(word, bits, __ATOMIC_RELEASE);
}
/// Takes a word, leaving `value`, with acquire order (pairs with the
/// writer's release fetch_or).
static inline uint64_t lm_atomic_exchange_acquire_u64(uint64_t *word, uint64_t value) {
    return __atomic_exchange_n(word, value, __ATOMIC_ACQUIRE);
}
/// Clears bits, returning the word before (acquire: the caller may read
/// the pages of the bits it cleared, like after a harvest).
static inline uint64_t lm_atomic_fetch_and_acquire_u64(uint64_t *word, uint64_t mask) {
    return __atomic_fetch_and(word, mask, __ATOMIC_ACQUIRE);
}
static inline void lm_atomic_store_relaxed_u64(uint64_t *word, uint64_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELAXED);
}
static inline uint64_t lm_atomic_load_relaxed_u64(const uint64_t *word) {
    return __atomic_load_n(word, __ATOMIC_RELAXED);
}
static inline uint64_t lm_atomic_load_acquire_u64(const uint64_t *word) {
    return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}
static inline void lm_atomic_store_release_u64(uint64_t *word, uint64_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
}
static inline uint64_t lm_atomic_fetch_add_u64(uint64_t *word, uint64_t value) {
    return __atomic_fetch_add(word, value, __ATOMIC_SEQ_CST);
}
static inline uint32_t lm_atomic_load_acquire_u32(const uint32_t *word) {
    return __atomic_load_n(word, __ATOMIC_ACQUIRE);
}
static inline void lm_atomic_store_release_u32(uint32_t *word, uint32_t value) {
    __atomic_store_n(word, value, __ATOMIC_RELEASE);
}
static inline uint32_t lm_atomic_fetch_add_u32(uint32_t *word, uint32_t value) {
    return __atomic_fetch_add(word, value, __ATOMIC_SEQ_CST);
}
static inline bool lm_atomic_cas_u32(uint32_t *word, uint32_t expected, uint32_t desired) {
    return __atomic_compare_exchange_n(word, &expected, desired, false, __ATOMIC_SEQ_CST,
                                       __ATOMIC_SEQ_CST);
}

// ---- futex (shared: the words live in files mapped by two processes) ----

/// futex(FUTEX_WAIT). timeout_ns < 0 waits forever. Returns 0 or -errno
/// (-EAGAIN: the word was not `expected`; -ETIMEDOUT; -EINTR).
int lm_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
/// futex(FUTEX_WAKE); returns the number woken or -errno.
int lm_futex_wake(uint32_t *word, int count);

// ---- open-file-description locks (fcntl(2) is variadic) ----------------
// Write locks on single bytes, one byte per role, taken with F_OFD_SETLK:
// they belong to the open file description, so they are released when its
// last descriptor closes or the process dies, and other descriptors the
// process opens on the same file neither conflict nor release them.

/// F_OFD_SETLK of a write lock on byte `byte` of `fd` (open for writing),
/// plus one on byte `beacon` when it is >= 0 (a byte past the data whose
/// offset names the holder; see lm_ofd_holder). Never waits. Returns 0,
/// -EAGAIN when another open file description holds a conflicting lock, or
/// another -errno.
int lm_ofd_lock(int fd, int64_t byte, int64_t beacon);
/// F_OFD_GETLK: whether another open file description holds a lock on any
/// byte of [start, start + length). Returns 0 when none, 1 when one does
/// (its first byte in *held_start), or -errno.
int lm_ofd_holder(int fd, int64_t start, int64_t length, int64_t *held_start);

// ---- extended attributes (<sys/xattr.h> is not in Swift's Glibc module) ---

/// setxattr(path, name, value, size, 0). Returns 0 or -errno.
int lm_setxattr(const char *path, const char *name, const void *value, size_t size);
/// removexattr(path, name). Returns 0 or -errno (-ENODATA: not set).
int lm_removexattr(const char *path, const char *name);
/// getxattr(path, name, NULL, 0): the value's size, or -errno (-ENODATA).
int64_t lm_getxattr_size(const char *path, const char *name);

// ---- page content ------------------------------------------------------

/// True when `length` bytes at `p` are all zero. `p` is 8-byte aligned and
/// `length` a multiple of 64 (a page). Reads until the first non-zero block.
bool lm_buffer_is_zero(const void *p, size_t length);

/// Copies `count` pages of `page_size` bytes, laid out one after the other
/// at `pages`, to `base + offsets[i]`, with non-temporal stores, then
/// fences them (sfence), so that a release store or a syscall that follows
/// publishes them like ordinary stores. For the receiver's placement from
/// its packet buffer into a pre-faulted mapping: the source is hot in this
/// core's cache (it was just received and hashed), the destination cold, so
/// ordinary stores would first read every destination line (read for
/// ownership) only to overwrite it. Measured on 1 GiB of /dev/shm in 4 KiB
/// pages from a 512 KiB buffer: 106 ms against memcpy's 150 ms; a copy
/// straight into the mapping, with no staging at all, takes 85 ms.
/// `pages` and every destination are 16-byte aligned and `page_size` is a
/// multiple of 64; elsewhere (or off x86-64) it is memcpy.
void lm_place_pages(void *base, const uint64_t *offsets, const void *pages, size_t count, size_t page_size);

/// Reads one byte of each page at `base + offsets[i]` whose address starts a
/// new `window`-byte aligned window (the kernel's fault-around unit, 64 KiB
/// by default), so
/// the page faults of a batch happen back to back before its pages are
/// scanned. Measured on 1 GiB of /dev/shm: first-touch zero checks take
/// 110 ms when the faults interleave with the scan, 69 ms this way.
void lm_fault_in_windows(const void *base, const uint64_t *offsets, size_t count, uint64_t window);

// ---- content hashes (hash.c; links libxxhash) ---------------------------
// Integrity checks, not cryptography: they catch corruption, not an
// attacker (a pre-shared key adds MACs for that, see the Trust module).

/// XXH3-64 of `length` bytes at `p` (run-time dispatch to the widest vector
/// unit). About 33 GB/s per 4 KiB page on this project's machines.
uint64_t lm_hash64(const void *p, size_t length);
/// XXH3-128 of `length` bytes at `p`, in canonical (big-endian) byte order.
void lm_hash128(const void *p, size_t length, uint8_t out[16]);
/// `lm_place_pages` that also returns each page's XXH3-64 in `hashes[i]`,
/// exactly `lm_hash64`'s value. With AVX-512 (a 64-byte aligned `base`,
/// a page size a multiple of 64) the hash is computed from the
/// copy's own loads, in the same pass, at no measurable cost; elsewhere it
/// hashes each page, then copies. The pages are in place when it returns:
/// the caller compares the hashes and undoes a page that does not match.
void lm_place_pages_hashed(void *base, const uint64_t *offsets, const void *pages, size_t count, size_t page_size,
                           uint64_t *hashes);
/// Whether `lm_place_pages_hashed` takes its one-pass path for these
/// arguments (for tests, which check both paths give `lm_hash64`'s value).
bool lm_place_hashing_is_fused(const void *base, size_t page_size);

// ---- zstd (zstd.c; links libzstd) ---------------------------------------
// One context per channel, made once and reused for every packet: libzstd
// keeps its workspace between calls, so the hot path allocates nothing.
// Sizes and results are libzstd's: a result is an error code when
// lm_zstd_is_error says so, and lm_zstd_error_name names it.

/// A compression context (ZSTD_CCtx) with its level set.
typedef struct lm_zstd_cctx lm_zstd_cctx;
/// A decompression context (ZSTD_DCtx).
typedef struct lm_zstd_dctx lm_zstd_dctx;

/// The level range this libzstd accepts (ZSTD_minCLevel, ZSTD_maxCLevel).
int lm_zstd_min_level(void);
int lm_zstd_max_level(void);
/// ZSTD_compressBound: the largest frame `size` input bytes can become.
size_t lm_zstd_compress_bound(size_t size);
/// The libzstd version in use, e.g. "1.5.4".
const char *lm_zstd_version(void);
bool lm_zstd_is_error(size_t result);
/// A static text for an error result.
const char *lm_zstd_error_name(size_t result);

/// ZSTD_createCCtx and ZSTD_c_compressionLevel. NULL when out of memory or
/// the level is refused.
lm_zstd_cctx *lm_zstd_cctx_create(int level);
void lm_zstd_cctx_destroy(lm_zstd_cctx *cctx);
/// Compresses `src_len` bytes at `src` into one frame at `dst` that records
/// its content size (ZSTD_compress2). Returns the frame's size or an error.
size_t lm_zstd_compress(lm_zstd_cctx *cctx, void *dst, size_t dst_cap, const void *src, size_t src_len);
/// ZSTD_sizeof_CCtx: the context's memory, for tests that check reuse.
size_t lm_zstd_cctx_size(const lm_zstd_cctx *cctx);

lm_zstd_dctx *lm_zstd_dctx_create(void);
void lm_zstd_dctx_destroy(lm_zstd_dctx *dctx);
/// ZSTD_findFrameCompressedSize: bytes of the first frame at `src`, or an error.
size_t lm_zstd_frame_size(const void *src, size_t src_len);
/// ZSTD_getFrameContentSize: the content size the frame header records;
/// LM_ZSTD_CONTENTSIZE_UNKNOWN when it records none, _ERROR when the header
/// is not a zstd frame header.
uint64_t lm_zstd_frame_content_size(const void *src, size_t src_len);
static const uint64_t LM_ZSTD_CONTENTSIZE_UNKNOWN = UINT64_MAX;
static const uint64_t LM_ZSTD_CONTENTSIZE_ERROR = UINT64_MAX - 1;
/// ZSTD_decompressDCtx: decodes the frames at `src` into at most `dst_cap`
/// bytes at `dst`. Returns the bytes written or an error (a larger result
/// than dst_cap is the error "Destination buffer is too small").
size_t lm_zstd_decompress(lm_zstd_dctx *dctx, void *dst, size_t dst_cap, const void *src, size_t src_len);

// ---- memory ------------------------------------------------------------

/// Keeps freed heap memory in the process instead of returning it to the
/// kernel at once (glibc mallopt: M_MMAP_THRESHOLD 64 MiB, M_TRIM_THRESHOLD
/// 256 MiB). swift-crypto's AEAD allocates and frees each packet's output
/// (512 KiB); by default glibc serves that with mmap or trims it back, and
/// every packet then faults in half a megabyte of fresh zeroed pages.
void lm_keep_freed_memory(void);

// ---- threads -----------------------------------------------------------

/// Names the calling thread (first 15 bytes), as `ps -L` and `top -H` show.
void lm_set_thread_name(const char *name);

/// Gives the calling thread the weakest nice value (19): a CPU it shares
/// with ordinary threads goes to them first, yet it is never starved
/// outright. For clean-up work that must not delay other processes.
/// Returns 0 or -errno.
int lm_set_thread_background_priority(void);

/// Makes the calling thread SCHED_FIFO at `priority` (1 is the lowest
/// real-time level). Needs root, CAP_SYS_NICE or RLIMIT_RTPRIO. Only for
/// threads that block between short pieces of work. Returns 0 or -errno.
int lm_set_thread_realtime(int priority);

/// Sets the calling thread's nice value (below 0 needs privilege too).
/// Returns 0 or -errno.
int lm_set_thread_nice(int nice_value);

// ---- signals -----------------------------------------------------------

/// Starts forwarding SIGINT and SIGTERM to a pipe: their handler writes the
/// signal's number as one byte (write(2) is async-signal-safe) and returns,
/// whichever thread the kernel picked. Returns the pipe's read end, or
/// -errno. The handlers are installed when this returns, so a signal sent
/// right after is never lost: it waits in the pipe. Also unblocks both in
/// the calling thread (a blocked mask survives exec). One watch per process.
int lm_signal_watch_start(void);

/// Restores the default action of SIGINT and SIGTERM, then writes a 0 byte
/// to the pipe (the reader's cue to stop) and closes its write end.
/// Also forwards SIGUSR1 to the watch (after lm_signal_watch_start);
/// 0 or -errno.
int lm_signal_watch_add_usr1(void);
void lm_signal_watch_stop(void);

// ---- userfaultfd (postcopy; docs in Sources/GuestMemory/Userfault.swift) ---
// Values from the kernel's include/uapi/linux/userfaultfd.h (stable ABI;
// shims.c static-asserts them against the build's copy of that header).
// Every function returns -errno on failure, never sets errno for Swift.

#define LM_UFFD_API 0xAAULL
/// ioctl on /dev/userfaultfd that makes a new userfaultfd (flags: O_CLOEXEC...).
#define LM_USERFAULTFD_IOC_NEW 0xAA00UL
#define LM_UFFDIO_API 0xC018AA3FUL
#define LM_UFFDIO_REGISTER 0xC020AA00UL
#define LM_UFFDIO_UNREGISTER 0x8010AA01UL
#define LM_UFFDIO_WAKE 0x8010AA02UL
#define LM_UFFDIO_COPY 0xC028AA03UL
#define LM_UFFDIO_ZEROPAGE 0xC020AA04UL
/// Register modes.
#define LM_UFFDIO_REGISTER_MODE_MISSING (1ULL << 0)
#define LM_UFFDIO_REGISTER_MODE_WP (1ULL << 1)
#define LM_UFFDIO_REGISTER_MODE_MINOR (1ULL << 2)
/// Features asked for in UFFDIO_API.
#define LM_UFFD_FEATURE_THREAD_ID (1ULL << 8)
/// Bits of the ioctl mask UFFDIO_REGISTER answers (1 << _UFFDIO_x).
#define LM_UFFD_IOCTL_WAKE (1ULL << 0x02)
#define LM_UFFD_IOCTL_COPY (1ULL << 0x03)
#define LM_UFFD_IOCTL_ZEROPAGE (1ULL << 0x04)
/// `struct uffd_msg`: 32 bytes, packed. Page faults only need these fields.
#define LM_UFFD_MSG_SIZE 32
#define LM_UFFD_EVENT_PAGEFAULT 0x12
#define LM_UFFD_PAGEFAULT_FLAG_WRITE (1ULL << 0)
#define LM_UFFD_PAGEFAULT_FLAG_WP (1ULL << 1)
#define LM_UFFD_PAGEFAULT_FLAG_MINOR (1ULL << 2)

/// One page-fault message, decoded from a `struct uffd_msg`.
typedef struct lm_uffd_fault {
    uint8_t event;     // LM_UFFD_EVENT_*: only PAGEFAULT fills the rest
    uint64_t flags;    // LM_UFFD_PAGEFAULT_FLAG_*
    uint64_t address;  // the faulting address (page-aligned unless EXACT_ADDRESS)
    uint32_t ptid;     // the faulting thread, with UFFD_FEATURE_THREAD_ID; else 0
} lm_uffd_fault;

/// A non-blocking, close-on-exec userfaultfd for this process: the
/// userfaultfd(2) system call, or, when that is refused (EPERM without
/// vm.unprivileged_userfaultfd, ENOSYS under a seccomp filter),
/// ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW). Returns the descriptor, or
/// -errno of the system call; *dev_err gets the /dev/userfaultfd attempt's
/// -errno (0 when it was not needed).
int lm_uffd_create(int *dev_err);
/// UFFDIO_API handshake asking for `features`. Returns 0 and stores in
/// *granted the requested features the kernel has (the kernel answers with
/// every feature it knows; only the requested ones are enabled), or -errno.
int lm_uffd_api(int fd, uint64_t features, uint64_t *granted);
/// UFFDIO_REGISTER of [start, start + len) with `mode`; *ioctls gets the
/// mask of range ioctls the kernel allows there (LM_UFFD_IOCTL_*).
int lm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
/// UFFDIO_UNREGISTER of [start, start + len); wakes the range's waiters.
int lm_uffd_unregister(int fd, uint64_t start, uint64_t len);
/// UFFDIO_WAKE of [start, start + len).
int lm_uffd_wake(int fd, uint64_t start, uint64_t len);
/// UFFDIO_COPY of `len` bytes from `src` (the caller's memory) to `dst` (in
/// the registered mm), waking its waiters unless `dont_wake`. Returns the
/// bytes copied (> 0; fewer than `len` when interrupted part-way), or -errno
/// when nothing was copied (-EEXIST: the first page is present; -EAGAIN:
/// retry; -ESRCH: the mm is gone; -ENOENT: no registered range there).
int64_t lm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, bool dont_wake);
/// UFFDIO_ZEROPAGE of [start, start + len): like lm_uffd_copy, with zeros.
int64_t lm_uffd_zeropage(int fd, uint64_t start, uint64_t len, bool dont_wake);
/// Reads up to `max` messages (read(2) of max × 32 bytes) and decodes them
/// into `out`. Returns how many, or -errno (-EAGAIN: none pending).
int lm_uffd_read(int fd, lm_uffd_fault *out, int max);

// ---- kernel write tracking (uffd-WP async + PAGEMAP_SCAN) --------------
// Linux 6.7+ uapi that Debian 12's headers lack (linux/userfaultfd.h,
// linux/fs.h); DESIGN.md §9.

#define LM_UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1ULL << 12)
#define LM_UFFD_FEATURE_WP_UNPOPULATED (1ULL << 13)
#define LM_UFFD_FEATURE_WP_ASYNC (1ULL << 15)

#define LM_PAGEMAP_SCAN 0xC0606610UL
#define LM_PM_SCAN_WP_MATCHING (1ULL << 0)
#define LM_PM_SCAN_CHECK_WPASYNC (1ULL << 1)
#define LM_PAGE_IS_WRITTEN (1ULL << 1)

/// One `struct page_region`: pages [start, end) share `categories`.
typedef struct lm_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
} lm_page_region;

/// PAGEMAP_SCAN on `pagemap_fd` (/proc/PID/pagemap) over [start, end):
/// reports the pages written since they were last write-protected
/// (category PAGE_IS_WRITTEN) into `vec` (at most `vec_len` regions) and
/// write-protects them again in the same step (PM_SCAN_WP_MATCHING; with
/// PM_SCAN_CHECK_WPASYNC the kernel refuses a range not registered for
/// asynchronous write-protect). *walk_end gets the address where the walk
/// stopped: `end` when it covered the range, less when `vec` filled up.
/// Returns the regions filled, or -errno.
int64_t lm_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, lm_page_region *vec, uint64_t vec_len,
                                uint64_t *walk_end);

// ---- descriptor passing and peers (Unix stream sockets) -----------------

/// sendmsg(2) of `len` payload bytes with `fd` attached (SCM_RIGHTS) on the
/// connected Unix socket `sock`, MSG_NOSIGNAL. Returns the bytes sent or
/// -errno (EINTR retried).
int64_t lm_send_fd(int sock, int fd, const void *payload, size_t len);
/// recvmsg(2) of up to `cap` bytes into `buf`, MSG_CMSG_CLOEXEC. *fd gets a
/// received descriptor, or -1 when the message carried none (extra
/// descriptors are closed). Returns the bytes read (0: the peer closed), or
/// -errno (EINTR retried); -EMSGSIZE when the control data was truncated.
int64_t lm_recv_fd(int sock, void *buf, size_t cap, int *fd);
/// accept4(sock, NULL, NULL, SOCK_CLOEXEC) (accept4 needs _GNU_SOURCE,
/// which Swift's Glibc module lacks). Returns the descriptor or -errno
/// (EINTR retried).
int lm_accept_cloexec(int sock);
/// SO_PEERCRED of a connected Unix socket: the peer's pid and uid when it
/// connected (or listened). Returns 0 or -errno.
int lm_peer_credentials(int sock, int32_t *pid, uint32_t *uid);

// ---- files -------------------------------------------------------------

/// fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) of [offset,
/// offset + len): the pages leave the file and its page cache, the size
/// stays. Returns 0 or -errno (EINTR retried).
int lm_punch_hole(int fd, int64_t offset, int64_t len);
/// The f_type of fstatfs(2) (the file system's magic number), or -errno.
int64_t lm_fstatfs_type(int fd);
/// The f_type of statfs(2) of `path`, or -errno.
int64_t lm_statfs_type(const char *path);
#define LM_TMPFS_MAGIC 0x01021994
#define LM_HUGETLBFS_MAGIC 0x958458f6

// ---- test support ------------------------------------------------------

/// Installs a seccomp filter that makes io_uring_setup(2) fail with ENOSYS in
/// this process and its children, as a container runtime's filter would.
/// Returns 0 or -errno.
int lm_deny_io_uring(void);

#endif
