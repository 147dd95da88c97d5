#define _GNU_SOURCE
#include "CShims.h"

#include <liburing.h>
#include <malloc.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/futex.h>
#include <linux/seccomp.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/resource.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/xattr.h>
#include <string.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

#if defined(__x86_64__)
#define LM_AUDIT_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define LM_AUDIT_ARCH AUDIT_ARCH_AARCH64
#else
#error "add this architecture's AUDIT_ARCH"
#endif

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#endif

int lm_futex_wait(uint32_t *word, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    // Not FUTEX_PRIVATE_FLAG: the word is in a MAP_SHARED file mapping that
    // another process waits on or wakes.
    long r = syscall(SYS_futex, word, FUTEX_WAIT, expected, tsp, NULL, 0);
    return r == 0 ? 0 : -errno;
}

int lm_futex_wake(uint32_t *word, int count) {
    long r = syscall(SYS_futex, word, FUTEX_WAKE, count, NULL, NULL, 0);
    return r >= 0 ? (int)r : -errno;
}

#ifndef F_OFD_GETLK
#define F_OFD_GETLK 36
#define F_OFD_SETLK 37
#endif

static int lm_ofd_setlk(int fd, int64_t byte) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1, .l_pid = 0};
    return fcntl(fd, F_OFD_SETLK, &fl) == 0 ? 0 : -errno;
}

int lm_ofd_lock(int fd, int64_t byte, int64_t beacon) {
    int r = lm_ofd_setlk(fd, byte);
    if (r == -EACCES) r = -EAGAIN;  // POSIX allows either for "held"
    if (r != 0 || beacon < 0) return r;
    // Best effort: without the beacon a refusal cannot name this process.
    (void)lm_ofd_setlk(fd, beacon);
    return 0;
}

int lm_ofd_holder(int fd, int64_t start, int64_t length, int64_t *held_start) {
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = start, .l_len = length, .l_pid = 0};
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return -errno;
    if (fl.l_type == F_UNLCK) return 0;
    *held_start = fl.l_start;
    return 1;
}

int lm_setxattr(const char *path, const char *name, const void *value, size_t size) {
    return setxattr(path, name, value, size, 0) == 0 ? 0 : -errno;
}

int lm_removexattr(const char *path, const char *name) { return removexattr(path, name) == 0 ? 0 : -errno; }

int64_t lm_getxattr_size(const char *path, const char *name) {
    ssize_t n = getxattr(path, name, NULL, 0);
    return n >= 0 ? (int64_t)n : -errno;
}

bool lm_buffer_is_zero(const void *p, size_t length) {
    // OR-reduce 64 bytes at a time so the compiler vectorises the loop; stop
    // at the first non-zero block (random pages cost one block).
    const uint64_t *w = (const uint64_t *)p;
    size_t n = length / 8;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t acc = w[i] | w[i + 1] | w[i + 2] | w[i + 3] |
                       w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (acc != 0) return false;
    }
    return true;
}

void lm_place_pages(void *base, const uint64_t *offsets, const void *pages, size_t count, size_t page_size) {
    const uint8_t *from = (const uint8_t *)pages;
#if defined(__x86_64__)
    bool streams = ((uintptr_t)base % 16 == 0) && ((uintptr_t)pages % 16 == 0) && (page_size % 64 == 0);
    if (streams) {
        for (size_t i = 0; i < count; i++, from += page_size) {
            const __m128i *s = (const __m128i *)from;
            __m128i *d = (__m128i *)((uint8_t *)base + offsets[i]);
            for (size_t k = 0; k < page_size / 16; k += 4) {
                __m128i a = _mm_load_si128(s + k), b = _mm_load_si128(s + k + 1);
                __m128i c = _mm_load_si128(s + k + 2), e = _mm_load_si128(s + k + 3);
                _mm_stream_si128(d + k, a);
                _mm_stream_si128(d + k + 1, b);
                _mm_stream_si128(d + k + 2, c);
                _mm_stream_si128(d + k + 3, e);
            }
        }
        // Streaming stores are weakly ordered: without this fence a later
        // release store (the arrived bit, the SYNC barrier) could be seen
        // before the page content.
        _mm_sfence();
        return;
    }
#endif
    for (size_t i = 0; i < count; i++, from += page_size) memcpy((uint8_t *)base + offsets[i], from, page_size);
}

void lm_fault_in_windows(const void *base, const uint64_t *offsets, size_t count, uint64_t window) {
    const volatile uint8_t *b = (const volatile uint8_t *)base;
    uint64_t last = UINT64_MAX;
    for (size_t i = 0; i < count; i++) {
        // The kernel aligns its window on the virtual address, and a
        // mapping need not start on a window boundary.
        uint64_t w = ((uintptr_t)base + offsets[i]) / window;
        if (w == last) continue;
        last = w;
        (void)b[offsets[i]];
    }
}

int lm_deny_io_uring(void) {
    struct sock_filter filter[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, LM_AUDIT_ARCH, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = {
        .len = (unsigned short)(sizeof(filter) / sizeof(filter[0])),
        .filter = filter,
    };
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return -errno;
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) return -errno;
    return 0;
}

// ---- io_uring ------------------------------------------------------------

struct lm_ring {
    struct io_uring ring;
    unsigned entries;
    struct msghdr msgs[]; // one per slot, alive until its completion
};

lm_ring *lm_ring_create(unsigned entries, unsigned flags, int *err) {
    lm_ring *r = calloc(1, sizeof(lm_ring) + entries * sizeof(struct msghdr));
    if (!r) {
        *err = -ENOMEM;
        return NULL;
    }
    int rc = io_uring_queue_init(entries, &r->ring, flags);
    if (rc < 0) {
        free(r);
        *err = rc;
        return NULL;
    }
    r->entries = entries;
    *err = 0;
    return r;
}

void lm_ring_destroy(lm_ring *r) {
    if (!r) return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

unsigned lm_ring_entries(const lm_ring *r) { return r->entries; }

#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif

// One SENDMSG or SENDMSG_ZC submission; the msghdr lives in the ring's slot
// until its completion.
static int prep_sendv(lm_ring *r, unsigned slot, int fd, const void *iov, unsigned iovcnt,
                      unsigned msg_flags, bool zero_copy, bool report_usage, uint64_t user_data) {
    if (slot >= r->entries) return -EINVAL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe) return -EBUSY;
    struct msghdr *m = &r->msgs[slot];
    memset(m, 0, sizeof(*m));
    m->msg_iov = (struct iovec *)iov;
    m->msg_iovlen = iovcnt;
    if (zero_copy) {
        io_uring_prep_sendmsg_zc(sqe, fd, m, msg_flags);
        if (report_usage) sqe->ioprio |= IORING_SEND_ZC_REPORT_USAGE;
    } else {
        io_uring_prep_sendmsg(sqe, fd, m, msg_flags);
    }
    io_uring_sqe_set_data64(sqe, user_data);
    return 0;
}

int lm_ring_prep_sendv(lm_ring *r, unsigned slot, int fd, const void *iov, unsigned iovcnt,
                       unsigned msg_flags, uint64_t user_data) {
    return prep_sendv(r, slot, fd, iov, iovcnt, msg_flags, false, false, user_data);
}

int lm_ring_prep_sendv_zc(lm_ring *r, unsigned slot, int fd, const void *iov, unsigned iovcnt,
                          unsigned msg_flags, bool report_usage, uint64_t user_data) {
    return prep_sendv(r, slot, fd, iov, iovcnt, msg_flags, true, report_usage, user_data);
}

int lm_ring_submit_and_wait(lm_ring *r, unsigned wait_nr) {
    return io_uring_submit_and_wait(&r->ring, wait_nr);
}

int lm_ring_wait(lm_ring *r, uint64_t *user_data, int32_t *res, uint32_t *flags) {
    struct io_uring_cqe *cqe = NULL;
    int rc;
    do {
        rc = io_uring_wait_cqe(&r->ring, &cqe);
    } while (rc == -EINTR);
    if (rc < 0) return rc;
    *user_data = io_uring_cqe_get_data64(cqe);
    *res = cqe->res;
    *flags = cqe->flags;
    io_uring_cqe_seen(&r->ring, cqe);
    return 0;
}

void lm_set_thread_name(const char *name) { prctl(PR_SET_NAME, name, 0, 0, 0); }

int lm_set_thread_background_priority(void) {
    /* who = 0 is the calling thread: on Linux the nice value is per thread. */
    return setpriority(PRIO_PROCESS, 0, 19) == 0 ? 0 : -errno;
}

int lm_set_thread_realtime(int priority) {
    /* pthread_setschedparam on pthread_self(): the policy is per thread. */
    struct sched_param param = {.sched_priority = priority};
    int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param);
    return -rc;
}

int lm_set_thread_nice(int nice_value) {
    return setpriority(PRIO_PROCESS, 0, nice_value) == 0 ? 0 : -errno;
}

/* ---- signals ----------------------------------------------------------- */

/* The write end of the signal pipe, or -1. Read by the handler. */
static volatile sig_atomic_t signal_pipe_write = -1;

static void forward_signal(int sig) {
    int saved = errno;
    unsigned char byte = (unsigned char)sig;
    int fd = signal_pipe_write;
    /* A full pipe (64 KiB of unread signals) drops this one: the watcher
     * has plenty to act on already. */
    if (fd >= 0) (void)!write(fd, &byte, 1);
    errno = saved;
}

int lm_signal_watch_start(void) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return -errno;
    /* Non-blocking write end: the handler must never block. */
    if (fcntl(fds[1], F_SETFL, O_NONBLOCK) != 0) {
        int e = errno;
        close(fds[0]);
        close(fds[1]);
        return -e;
    }
    signal_pipe_write = fds[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0) {
        int e = errno;
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal_pipe_write = -1;
        close(fds[0]);
        close(fds[1]);
        return -e;
    }
    /* A parent may have blocked them (the mask survives exec; test runners
     * do): blocked, they would wait forever instead of reaching us. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return fds[0];
}

int lm_signal_watch_add_usr1(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = forward_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) != 0) return -errno;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    return 0;
}

void lm_signal_watch_stop(void) {
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGUSR1, SIG_DFL);
    int fd = signal_pipe_write;
    if (fd < 0) return;
    signal_pipe_write = -1;
    unsigned char stop = 0;
    (void)!write(fd, &stop, 1);
    close(fd);
}

void lm_keep_freed_memory(void) {
    mallopt(M_MMAP_THRESHOLD, 64 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

/* ---- userfaultfd -------------------------------------------------------- */

#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/statfs.h>

#ifndef __NR_userfaultfd
#if defined(__x86_64__)
#define __NR_userfaultfd 323
#elif defined(__aarch64__)
#define __NR_userfaultfd 282
#endif
#endif

/* The ABI as CShims.h writes it out, mirrored here and checked against the
 * build's uapi header: a typo in a constant fails the build, not a guest. */
struct lm_uffdio_range { uint64_t start, len; };
struct lm_uffdio_api { uint64_t api, features, ioctls; };
struct lm_uffdio_register { struct lm_uffdio_range range; uint64_t mode, ioctls; };
struct lm_uffdio_copy { uint64_t dst, src, len, mode; int64_t copy; };
struct lm_uffdio_zeropage { struct lm_uffdio_range range; uint64_t mode; int64_t zeropage; };

_Static_assert(sizeof(struct uffd_msg) == LM_UFFD_MSG_SIZE, "uffd_msg is 32 bytes");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.flags) == 8, "pagefault.flags at 8");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.address) == 16, "pagefault.address at 16");
_Static_assert(offsetof(struct uffd_msg, arg.pagefault.feat.ptid) == 24, "pagefault.ptid at 24");
_Static_assert(sizeof(struct lm_uffdio_api) == sizeof(struct uffdio_api), "uffdio_api");
_Static_assert(sizeof(struct lm_uffdio_register) == sizeof(struct uffdio_register), "uffdio_register");
_Static_assert(sizeof(struct lm_uffdio_copy) == sizeof(struct uffdio_copy), "uffdio_copy");
_Static_assert(sizeof(struct lm_uffdio_zeropage) == sizeof(struct uffdio_zeropage), "uffdio_zeropage");
_Static_assert(LM_UFFD_API == UFFD_API, "UFFD_API");
_Static_assert(LM_UFFDIO_API == UFFDIO_API, "UFFDIO_API");
_Static_assert(LM_UFFDIO_REGISTER == UFFDIO_REGISTER, "UFFDIO_REGISTER");
_Static_assert(LM_UFFDIO_UNREGISTER == UFFDIO_UNREGISTER, "UFFDIO_UNREGISTER");
_Static_assert(LM_UFFDIO_WAKE == UFFDIO_WAKE, "UFFDIO_WAKE");
_Static_assert(LM_UFFDIO_COPY == UFFDIO_COPY, "UFFDIO_COPY");
_Static_assert(LM_UFFDIO_ZEROPAGE == UFFDIO_ZEROPAGE, "UFFDIO_ZEROPAGE");
_Static_assert(LM_UFFDIO_REGISTER_MODE_MISSING == UFFDIO_REGISTER_MODE_MISSING, "MODE_MISSING");
_Static_assert(LM_UFFD_FEATURE_THREAD_ID == UFFD_FEATURE_THREAD_ID, "FEATURE_THREAD_ID");
_Static_assert(LM_UFFD_EVENT_PAGEFAULT == UFFD_EVENT_PAGEFAULT, "EVENT_PAGEFAULT");
_Static_assert(LM_UFFD_PAGEFAULT_FLAG_WRITE == UFFD_PAGEFAULT_FLAG_WRITE, "FLAG_WRITE");
_Static_assert(LM_UFFD_IOCTL_COPY == (1ULL << _UFFDIO_COPY), "_UFFDIO_COPY");
_Static_assert(LM_UFFD_IOCTL_ZEROPAGE == (1ULL << _UFFDIO_ZEROPAGE), "_UFFDIO_ZEROPAGE");
_Static_assert(LM_UFFD_IOCTL_WAKE == (1ULL << _UFFDIO_WAKE), "_UFFDIO_WAKE");
#ifdef USERFAULTFD_IOC_NEW
_Static_assert(LM_USERFAULTFD_IOC_NEW == USERFAULTFD_IOC_NEW, "USERFAULTFD_IOC_NEW");
#endif

int lm_uffd_create(int *dev_err) {
    *dev_err = 0;
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0) return (int)fd;
    int sys_err = -errno;
    /* /dev/userfaultfd (Linux 6.1+) is governed by its file mode instead of
     * vm.unprivileged_userfaultfd, and a seccomp filter that denies the
     * system call may still allow open and ioctl. */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) {
        *dev_err = -errno;
        return sys_err;
    }
    int r = ioctl(dev, LM_USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    if (r < 0) *dev_err = -errno;
    close(dev);
    return r >= 0 ? r : sys_err;
}

/* struct pm_scan_arg of linux/fs.h (6.7), 96 bytes. */
struct lm_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};
_Static_assert(sizeof(struct lm_pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");
_Static_assert(sizeof(lm_page_region) == 24, "page_region is 24 bytes");

int64_t lm_pagemap_scan_written(int pagemap_fd, uint64_t start, uint64_t end, lm_page_region *vec, uint64_t vec_len,
                                uint64_t *walk_end) {
    struct lm_pm_scan_arg arg = {
        .size = sizeof(arg),
        .flags = LM_PM_SCAN_WP_MATCHING | LM_PM_SCAN_CHECK_WPASYNC,
        .start = start,
        .end = end,
        .vec = (uint64_t)(uintptr_t)vec,
        .vec_len = vec_len,
        .category_mask = LM_PAGE_IS_WRITTEN,
        .return_mask = LM_PAGE_IS_WRITTEN,
    };
    long r;
    do {
        r = ioctl(pagemap_fd, LM_PAGEMAP_SCAN, &arg);
    } while (r < 0 && errno == EINTR);
    if (r < 0) return -errno;
    *walk_end = arg.walk_end;
    return r;
}

int lm_uffd_api(int fd, uint64_t features, uint64_t *granted) {
    struct lm_uffdio_api api = {.api = LM_UFFD_API, .features = features, .ioctls = 0};
    if (ioctl(fd, LM_UFFDIO_API, &api) != 0) return -errno;
    /* The kernel answers with every feature it supports; it enabled only
     * the ones asked for. */
    *granted = api.features & features;
    return 0;
}

int lm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls) {
    struct lm_uffdio_register reg = {.range = {.start = start, .len = len}, .mode = mode, .ioctls = 0};
    int r;
    do {
        r = ioctl(fd, LM_UFFDIO_REGISTER, &reg);
    } while (r != 0 && errno == EINTR);
    if (r != 0) return -errno;
    *ioctls = reg.ioctls;
    return 0;
}

int lm_uffd_unregister(int fd, uint64_t start, uint64_t len) {
    struct lm_uffdio_range range = {.start = start, .len = len};
    int r;
    do {
        r = ioctl(fd, LM_UFFDIO_UNREGISTER, &range);
    } while (r != 0 && errno == EINTR);
    return r == 0 ? 0 : -errno;
}

int lm_uffd_wake(int fd, uint64_t start, uint64_t len) {
    struct lm_uffdio_range range = {.start = start, .len = len};
    return ioctl(fd, LM_UFFDIO_WAKE, &range) == 0 ? 0 : -errno;
}

/* The kernel writes the bytes done (or -errno) into the struct's last field
 * and returns 0 when all of `len` was done, -EAGAIN when only part was, or
 * the error when nothing was. The field says which. */
int64_t lm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, bool dont_wake) {
    struct lm_uffdio_copy c = {
        .dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = dont_wake ? UFFDIO_COPY_MODE_DONTWAKE : 0, .copy = 0};
    if (ioctl(fd, LM_UFFDIO_COPY, &c) == 0) return (int64_t)len;
    int e = errno;
    if (c.copy > 0) return c.copy;
    return c.copy < 0 ? c.copy : -e;
}

int64_t lm_uffd_zeropage(int fd, uint64_t start, uint64_t len, bool dont_wake) {
    struct lm_uffdio_zeropage z = {
        .range = {.start = start, .len = len}, .mode = dont_wake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0, .zeropage = 0};
    if (ioctl(fd, LM_UFFDIO_ZEROPAGE, &z) == 0) return (int64_t)len;
    int e = errno;
    if (z.zeropage > 0) return z.zeropage;
    return z.zeropage < 0 ? z.zeropage : -e;
}

int lm_uffd_read(int fd, lm_uffd_fault *out, int max) {
    struct uffd_msg msgs[64];
    if (max > 64) max = 64;
    if (max <= 0) return 0;
    ssize_t n;
    do {
        n = read(fd, msgs, (size_t)max * sizeof(struct uffd_msg));
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    int count = (int)(n / (ssize_t)sizeof(struct uffd_msg));
    for (int i = 0; i < count; i++) {
        out[i].event = msgs[i].event;
        out[i].flags = 0;
        out[i].address = 0;
        out[i].ptid = 0;
        if (msgs[i].event == UFFD_EVENT_PAGEFAULT) {
            out[i].flags = msgs[i].arg.pagefault.flags;
            out[i].address = msgs[i].arg.pagefault.address;
            out[i].ptid = msgs[i].arg.pagefault.feat.ptid;
        }
    }
    return count;
}

/* ---- descriptor passing ------------------------------------------------- */

int64_t lm_send_fd(int sock, int fd, const void *payload, size_t len) {
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = (void *)payload, .iov_len = len};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    ssize_t n;
    do {
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    return n >= 0 ? (int64_t)n : -errno;
}

int64_t lm_recv_fd(int sock, void *buf, size_t cap, int *fd) {
    /* Room for a few descriptors: a hostile peer sending several must not
     * leave any open here (MSG_CTRUNC would drop them silently otherwise). */
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(8 * sizeof(int))];
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof control.buf;
    *fd = -1;
    ssize_t n;
    do {
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int got;
            memcpy(&got, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*fd < 0) {
                *fd = got;
            } else {
                close(got);
            }
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        if (*fd >= 0) close(*fd);
        *fd = -1;
        return -EMSGSIZE;
    }
    return (int64_t)n;
}

int lm_accept_cloexec(int sock) {
    int r;
    do {
        r = accept4(sock, NULL, NULL, SOCK_CLOEXEC);
    } while (r < 0 && errno == EINTR);
    return r >= 0 ? r : -errno;
}

int lm_peer_credentials(int sock, int32_t *pid, uint32_t *uid) {
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -errno;
    *pid = cred.pid;
    *uid = cred.uid;
    return 0;
}

/* ---- files -------------------------------------------------------------- */

int lm_punch_hole(int fd, int64_t offset, int64_t len) {
    int r;
    do {
        r = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)len);
    } while (r != 0 && errno == EINTR);
    return r == 0 ? 0 : -errno;
}

int64_t lm_fstatfs_type(int fd) {
    struct statfs st;
    if (fstatfs(fd, &st) != 0) return -errno;
    return (int64_t)(uint64_t)(unsigned long)st.f_type & 0xffffffffLL;
}

int64_t lm_statfs_type(const char *path) {
    struct statfs st;
    if (statfs(path, &st) != 0) return -errno;
    return (int64_t)(uint64_t)(unsigned long)st.f_type & 0xffffffffLL;
}
