// CShims: the few Linux pieces Swift cannot import by itself.
//
// Plain liburing functions (io_uring_queue_init, io_uring_prep_sendmsg, ...)
// are called straight from Swift; this header adds only
//   - uapi constants newer than Debian 12's headers (the kernel is newer),
//   - atomics on raw memory (the dirty bitmap lives in a file shared with
//     another process, so Swift's Atomic<T> cannot own it),
//   - futex calls (syscall(2) is variadic),
//   - a seccomp filter used by tests to take io_uring away from a process.
#ifndef LIVEMIG_CSHIMS_H
#define LIVEMIG_CSHIMS_H

#include <liburing.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/un.h>
#include <time.h>

// ---- uapi constants missing from older headers -------------------------
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

static const int LM_MADV_POPULATE_READ = MADV_POPULATE_READ;
static const int LM_MADV_POPULATE_WRITE = MADV_POPULATE_WRITE;
static const unsigned LM_IORING_CQE_F_MORE = IORING_CQE_F_MORE;
static const unsigned LM_IORING_CQE_F_NOTIF = IORING_CQE_F_NOTIF;
static const unsigned LM_IORING_SEND_ZC_REPORT_USAGE = IORING_SEND_ZC_REPORT_USAGE;
static const unsigned LM_IORING_NOTIF_USAGE_ZC_COPIED = IORING_NOTIF_USAGE_ZC_COPIED;

// ---- atomics on raw (possibly shared) memory ---------------------------
// Used for the dirty bitmap words and the guest-control header. Every word
// that one of these touches is touched only through these (never plainly).

/// Sets bits with release order: the page data written before it is visible
/// to whoever later takes the bits with an acquire exchange.
static inline uint64_t lm_atomic_fetch_or_release_u64(uint64_t *word, uint64_t bits) {
    return __atomic_fetch_or(word, bits, __ATOMIC_RELEASE);
}
/// Takes a word and leaves zero, with acquire order (pairs with the release
/// fetch_or of the writer).
static inline uint64_t lm_atomic_exchange_acquire_u64(uint64_t *word, uint64_t value) {
    return __atomic_exchange_n(word, value, __ATOMIC_ACQUIRE);
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
    return __atomic_compare_exchange_n(word, &expected, desired, false,
                                       __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

// ---- futex (shared: the words live in files mapped by two processes) ----

/// futex(FUTEX_WAIT) on a shared mapping. Returns 0 or -errno
/// (-EAGAIN: the word was not `expected`; -ETIMEDOUT; -EINTR).
int lm_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns);
/// futex(FUTEX_WAKE); returns the number woken or -errno.
int lm_futex_wake(uint32_t *word, int count);

// ---- page content ------------------------------------------------------

/// True when `length` bytes at `p` are all zero. `p` is 8-byte aligned and
/// `length` a multiple of 64 (a page). Reads the page and nothing more.
bool lm_buffer_is_zero(const void *p, size_t length);

// ---- test support ------------------------------------------------------

/// Installs a seccomp filter that makes io_uring_setup(2) fail with ENOSYS in
/// this process, as a container runtime's filter would. Returns 0 or -errno.
int lm_deny_io_uring(void);

#endif
