// livemig's preload library (`livemig run`, docs/GUEST-CONTROL.md §13).
//
// Loaded with LD_PRELOAD into a program that knows nothing of livemig. It
// interposes mmap(2): when the program maps the whole RAM file named by
// LIVEMIG_RAM with MAP_SHARED, it creates a userfaultfd in the program's
// own process (it must be this process: a userfaultfd acts on its
// creator's address space), registers that mapping for asynchronous
// write-protect, and writes into the control file named by LIVEMIG_CONTROL
// what the source needs to scan the program's page tables from outside:
// the mapping's address, the pid, and the tracking mode, stored last with
// release order. The descriptor stays open for the life of the process.
//
// It also records in the control file what would make the tracking
// blind: a fork (the child's writes are its own page tables'), a munmap or
// mremap of the tracked range, a second mapping of the file. The source
// reads that word at every sync and fails the migration with the reason.
// Calls made with raw system calls bypass all of this.
//
// No allocation, no stdio after the constructor: only system calls and
// atomics, so it is safe in any program.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "LivemigPreload.h"

// Control-file words (docs/GUEST-CONTROL.md §1), native byte order.
#define CTL_MAGIC 0x3154534555474D4CULL  // "LMGUEST1"
#define OFF_GUEST_THREADS 72
#define OFF_GUEST_PID 80
#define OFF_TRACKING 104
#define OFF_GUEST_KIND 108
#define OFF_TRACKED_MAPPING 112
#define OFF_BLIND 120
#define TRACKING_KERNEL 1u
#define KIND_EXTERNAL 1u

// Uapi newer than Debian 12's headers (DESIGN.md §9).
#define WP_HUGETLBFS_SHMEM (1ULL << 12)
#define WP_UNPOPULATED (1ULL << 13)
#define WP_ASYNC (1ULL << 15)

static unsigned char *control;  // the control file's first page, or NULL
static dev_t ram_dev;
static ino_t ram_ino;
static off_t ram_size;
static uintptr_t tracked_start, tracked_end;  // 0 when nothing is tracked
static int uffd = -1;

typedef void *(*mmap_fn)(void *, size_t, int, int, int, off_t);
typedef int (*munmap_fn)(void *, size_t);
typedef void *(*mremap_fn)(void *, size_t, size_t, int, ...);
typedef pid_t (*fork_fn)(void);

static void say(const char *text) {
    ssize_t r = write(2, text, strlen(text));
    (void)r;
}

static void set_blind(uint32_t why) {
    if (control) __atomic_fetch_or((uint32_t *)(control + OFF_BLIND), why, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void livemig_preload_init(void) {
    const char *ram = getenv("LIVEMIG_RAM");
    const char *ctl = getenv("LIVEMIG_CONTROL");
    if (!ram || !ctl) return;
    struct stat st;
    if (stat(ram, &st) != 0) {
        say("livemig-preload: cannot stat LIVEMIG_RAM; writes will not be tracked\n");
        return;
    }
    ram_dev = st.st_dev;
    ram_ino = st.st_ino;
    ram_size = st.st_size;
    int fd = open(ctl, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        say("livemig-preload: cannot open LIVEMIG_CONTROL; writes will not be tracked\n");
        return;
    }
    mmap_fn real = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    void *p = real(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return;
    if (__atomic_load_n((uint64_t *)p, __ATOMIC_ACQUIRE) != CTL_MAGIC) {
        say("livemig-preload: LIVEMIG_CONTROL is not a livemig control file; writes will not be tracked\n");
        return;
    }
    control = p;
}

// Registers [addr, addr + len) for asynchronous write-protect and
// publishes it. Returns 0, or -1 after saying why.
static int track(void *addr, size_t len) {
    long fd = syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        say("livemig-preload: userfaultfd failed (run as root, or allow unprivileged userfaultfd); writes are not tracked\n");
        return -1;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = WP_ASYNC | WP_HUGETLBFS_SHMEM | WP_UNPOPULATED};
    if (ioctl((int)fd, UFFDIO_API, &api) != 0) {
        close((int)fd);
        say("livemig-preload: this kernel lacks asynchronous write-protect (Linux 6.7+); writes are not tracked\n");
        return -1;
    }
    struct uffdio_register reg = {.range = {.start = (uintptr_t)addr, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl((int)fd, UFFDIO_REGISTER, &reg) != 0) {
        close((int)fd);
        say("livemig-preload: registering the RAM mapping for write-protect failed; writes are not tracked\n");
        return -1;
    }
    uffd = (int)fd;
    tracked_start = (uintptr_t)addr;
    tracked_end = (uintptr_t)addr + len;
    __atomic_store_n((uint32_t *)(control + OFF_GUEST_PID), (uint32_t)getpid(), __ATOMIC_RELEASE);
    __atomic_store_n((uint32_t *)(control + OFF_GUEST_THREADS), 1u, __ATOMIC_RELEASE);
    __atomic_store_n((uint32_t *)(control + OFF_GUEST_KIND), KIND_EXTERNAL, __ATOMIC_RELEASE);
    __atomic_store_n((uint64_t *)(control + OFF_TRACKED_MAPPING), (uint64_t)(uintptr_t)addr, __ATOMIC_RELEASE);
    __atomic_store_n((uint32_t *)(control + OFF_TRACKING), TRACKING_KERNEL, __ATOMIC_RELEASE);
    return 0;
}

static int is_ram(int fd) {
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && st.st_dev == ram_dev && st.st_ino == ram_ino;
}

static void *mapped(void *p, size_t len, int flags, int fd, off_t off) {
    if (p == MAP_FAILED || !control || !is_ram(fd)) return p;
    if (tracked_end != 0) {
        set_blind(4);  // a second mapping: its writes would not be seen
        return p;
    }
    if (!(flags & MAP_SHARED) || off != 0 || (off_t)len != ram_size) {
        say("livemig-preload: the program maps only part of the RAM file, or privately; writes are not tracked\n");
        return p;
    }
    int saved = errno;
    (void)track(p, len);
    errno = saved;
    return p;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    static mmap_fn real;
    if (!real) real = (mmap_fn)dlsym(RTLD_NEXT, "mmap");
    return mapped(real(addr, len, prot, flags, fd, off), len, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) { return mmap(addr, len, prot, flags, fd, off); }

int munmap(void *addr, size_t len) {
    static munmap_fn real;
    if (!real) real = (munmap_fn)dlsym(RTLD_NEXT, "munmap");
    uintptr_t a = (uintptr_t)addr;
    if (tracked_end != 0 && a < tracked_end && a + len > tracked_start) set_blind(2);
    return real(addr, len);
}

void *mremap(void *old, size_t old_len, size_t new_len, int flags, ...) {
    static mremap_fn real;
    if (!real) real = (mremap_fn)dlsym(RTLD_NEXT, "mremap");
    void *new_addr = NULL;
    if (flags & MREMAP_FIXED) {
        va_list ap;
        va_start(ap, flags);
        new_addr = va_arg(ap, void *);
        va_end(ap);
    }
    uintptr_t a = (uintptr_t)old;
    if (tracked_end != 0 && a < tracked_end && a + old_len > tracked_start) set_blind(2);
    return real(old, old_len, new_len, flags, new_addr);
}

pid_t fork(void) {
    static fork_fn real;
    if (!real) real = (fork_fn)dlsym(RTLD_NEXT, "fork");
    pid_t pid = real();
    // The parent records it: the child's writes to the shared file are in
    // page tables nobody scans.
    if (pid > 0 && tracked_end != 0) set_blind(1);
    return pid;
}

int livemig_preload_tracking_fd(void) { return uffd; }
