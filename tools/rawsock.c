/*
 * rawsock: the raw-socket ceiling for livemig's benchmarks.
 *
 * Moves the bytes of a file over N sockets (TCP or Unix) into a MAP_SHARED
 * mapping of the destination file, with no protocol beyond a 16-byte header
 * per connection, one thread per channel on both sides:
 *
 *   rawsock recv --listen tcp:HOST:PORT|unix:PATH --channels N --size BYTES --out PATH [--cold]
 *   rawsock send --to tcp:HOST:PORT|unix:PATH --channels N --in PATH [--pread|--sendfile]
 *
 * Channel i carries the i-th contiguous share of the file: shares are
 * size/N rounded down to 4096 bytes, the last one takes the rest. The sender
 * mmaps its input read-only and send()s each share straight from the mapping
 * in 512 KiB chunks; with --pread it instead reads each 2 MiB of its share
 * into a buffer of its own with pread() and send()s it from there (one more
 * kernel copy, but no page faults, TLB misses or page tables on the user
 * mapping: the faster of the two on a VM without huge pages). With
 * --sendfile (an experiment, not the ceiling) it hands each share to
 * sendfile(2), which splices the page-cache pages into the socket without
 * copying them: tools/pathbench measures it against the two above.
 * The receiver recv(MSG_WAITALL)s each share straight into
 * its mapping at the share's offset. Each connection starts with two
 * little-endian uint64: channel id, byte count. When a channel's share has
 * arrived the receiver answers one byte, so `send` exits only once the
 * destination has every byte (as `livemig send` waits for its destination).
 *
 * Warm (default): the output file is created/sized and pre-faulted with
 * MADV_POPULATE_WRITE before listening. --cold: no pre-fault; an existing
 * output file is truncated first so the pages are allocated while receiving.
 *
 * --packets MODE (recv only; an experiment, not the ceiling): read each share
 * in livemig's packet shape, a 64-byte header, 1 KiB of offsets and 512 KiB
 * of pages per packet, the first two into scratch buffers and the pages into
 * the mapping, so the destination is NOT a copy of the source. MODE is
 * `plain` (three blocking recv(MSG_WAITALL) per packet, as livemig's receiver
 * does), `uring` (the same three reads as io_uring operations, one
 * submit-and-wait each) or `uring-linked` (the three linked and submitted
 * together: one io_uring_enter per packet, the best case an io_uring receiver
 * could reach). `tools/pathbench recv` compares them.
 *
 * The receiver prints "rawsock: listening on ADDR" on stderr when ready and
 * exits 0 when all bytes arrived. Errors: one line on stderr, exit 1; bad
 * usage exits 2.
 *
 * Build: cc -O2 -pthread -o tools/bin/rawsock tools/rawsock.c -luring
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define CHUNK (512u * 1024u)
#define PAGE 4096u
#define MAX_CHANNELS 256
#define HEADER_SIZE 16

static const char *role = "rawsock";
static int timeout_s = 120;  /* accept / per-syscall I/O timeout */

static void die(const char *fmt, ...) {
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "rawsock %s: %s\n", role, msg);
    exit(1);
}

static void usage(const char *msg) {
    if (msg) fprintf(stderr, "rawsock: %s\n", msg);
    fprintf(stderr,
            "usage: rawsock recv --listen tcp:HOST:PORT|unix:PATH --channels N --size BYTES --out PATH [--cold] [--timeout S]\n"
            "                     [--packets plain|uring|uring-linked]\n"
            "       rawsock send --to tcp:HOST:PORT|unix:PATH --channels N --in PATH [--pread|--sendfile] [--timeout S]\n");
    exit(2);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- sizes and shares ---- */

static int parse_size(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || s[0] == '-') return -1;
    uint64_t mul = 1;
    if (*end == 0 || strcmp(end, "B") == 0) mul = 1;
    else if (strcmp(end, "K") == 0 || strcmp(end, "KiB") == 0) mul = 1ull << 10;
    else if (strcmp(end, "M") == 0 || strcmp(end, "MiB") == 0) mul = 1ull << 20;
    else if (strcmp(end, "G") == 0 || strcmp(end, "GiB") == 0) mul = 1ull << 30;
    else return -1;
    if (v > UINT64_MAX / mul) return -1;
    *out = (uint64_t)v * mul;
    return 0;
}

static void share(uint64_t size, int channels, int id, uint64_t *off, uint64_t *len) {
    uint64_t base = size / (uint64_t)channels / PAGE * PAGE;
    *off = base * (uint64_t)id;
    *len = (id == channels - 1) ? size - *off : base;
}

static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* ---- addresses ---- */

struct addr {
    int family;
    struct sockaddr_storage ss;
    socklen_t len;
    char unix_path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

static void parse_addr(const char *text, struct addr *a) {
    memset(a, 0, sizeof *a);
    if (strncmp(text, "unix:", 5) == 0) {
        const char *path = text + 5;
        struct sockaddr_un *un = (struct sockaddr_un *)&a->ss;
        if (!*path) usage("unix: address needs a path");
        if (strlen(path) >= sizeof un->sun_path) die("unix socket path too long (max %zu bytes): %s", sizeof un->sun_path - 1, path);
        un->sun_family = AF_UNIX;
        strcpy(un->sun_path, path);
        strcpy(a->unix_path, path);
        a->family = AF_UNIX;
        a->len = sizeof *un;
        return;
    }
    if (strncmp(text, "tcp:", 4) != 0) die("address '%s' is neither tcp:HOST:PORT nor unix:PATH", text);
    char host[256];
    const char *rest = text + 4, *colon = strrchr(rest, ':');
    if (!colon || colon == rest || !colon[1]) die("address '%s' is not tcp:HOST:PORT", text);
    size_t hl = (size_t)(colon - rest);
    if (hl >= sizeof host) die("host name too long in '%s'", text);
    memcpy(host, rest, hl);
    host[hl] = 0;
    if (host[0] == '[' && hl >= 2 && host[hl - 1] == ']') { /* [::1] */
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    struct addrinfo hints = {0}, *res;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc) die("cannot resolve '%s': %s", text, gai_strerror(rc));
    memcpy(&a->ss, res->ai_addr, res->ai_addrlen);
    a->len = res->ai_addrlen;
    a->family = res->ai_family;
    freeaddrinfo(res);
}

static void set_timeouts(int fd) {
    struct timeval tv = {.tv_sec = timeout_s, .tv_usec = 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* ---- receiver ---- */

struct recv_ctx {
    int fd;
    unsigned char *map;
    uint64_t size;
    int channels;
    int index;               /* accept order, for messages */
    int id;                  /* channel id from the header */
    uint64_t bytes;
};

static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned char seen[MAX_CHANNELS];

static void recv_all(int fd, unsigned char *p, uint64_t n, const char *what, int ch) {
    uint64_t got = 0;
    while (got < n) {
        uint64_t want = n - got;
        if (want > CHUNK) want = CHUNK;
        ssize_t r = recv(fd, p + got, (size_t)want, MSG_WAITALL);
        if (r > 0) { got += (uint64_t)r; continue; }
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) die("channel %d: connection closed while reading %s after %llu of %llu bytes", ch, what,
                        (unsigned long long)got, (unsigned long long)n);
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            die("channel %d: timed out after %d s reading %s (%llu of %llu bytes)", ch, timeout_s, what,
                (unsigned long long)got, (unsigned long long)n);
        die("channel %d: recv %s: %s", ch, what, strerror(errno));
    }
}


/* ---- --packets: livemig's packet shape, with blocking recv or io_uring ---- */

enum packets_mode { STREAM, PACKETS_PLAIN, PACKETS_URING, PACKETS_URING_LINKED };
static enum packets_mode packets_mode = STREAM;
#define PACKET_HEADER 64u
#define PACKET_OFFSETS 1024u
#define PACKET_PAGES (128u * PAGE)

/* Takes one completion, which must have filled `piece` whole (MSG_WAITALL on
 * a blocking stream socket). */
static void uring_reap(struct io_uring *ring, const struct iovec *piece, int ch) {
    struct io_uring_cqe *cqe;
    int rc = io_uring_wait_cqe(ring, &cqe);
    if (rc < 0) die("channel %d: io_uring_wait_cqe: %s", ch, strerror(-rc));
    if (cqe->res != (int)piece->iov_len)
        die("channel %d: io_uring recvmsg returned %d of %zu bytes%s%s", ch, cqe->res, piece->iov_len,
            cqe->res < 0 ? ": " : "", cqe->res < 0 ? strerror(-cqe->res) : "");
    io_uring_cqe_seen(ring, cqe);
}

/* Reads one packet's three pieces as io_uring operations on `ring`: one
 * submit-and-wait each, or linked and submitted together. */
static void uring_packet(struct io_uring *ring, int fd, struct iovec pieces[3], int linked, int ch) {
    struct msghdr msg[3];
    for (int i = 0; i < 3; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(ring);
        if (!sqe) die("channel %d: io_uring submission queue full", ch);
        msg[i] = (struct msghdr){.msg_iov = &pieces[i], .msg_iovlen = 1};
        io_uring_prep_recvmsg(sqe, fd, &msg[i], MSG_WAITALL);
        if (linked) {
            if (i < 2) sqe->flags |= IOSQE_IO_LINK;
            continue;
        }
        int rc = io_uring_submit_and_wait(ring, 1);
        if (rc < 0) die("channel %d: io_uring_submit_and_wait: %s", ch, strerror(-rc));
        uring_reap(ring, &pieces[i], ch);
    }
    if (!linked) return;
    int rc = io_uring_submit_and_wait(ring, 3);
    if (rc < 0) die("channel %d: io_uring_submit_and_wait: %s", ch, strerror(-rc));
    for (int i = 0; i < 3; i++) uring_reap(ring, &pieces[i], ch);
}

/* Receives `n` bytes of a share in packet-shaped pieces; a tail shorter
 * than a packet is read with one recv. */
static void recv_packets(int fd, unsigned char *p, uint64_t n, int ch) {
    unsigned char header[PACKET_HEADER], offsets[PACKET_OFFSETS];
    const uint64_t per = PACKET_HEADER + PACKET_OFFSETS + PACKET_PAGES;
    struct io_uring ring;
    int uring = packets_mode != PACKETS_PLAIN;
    if (uring) {
        int rc = io_uring_queue_init(8, &ring, IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN);
        if (rc < 0) die("channel %d: io_uring_queue_init: %s", ch, strerror(-rc));
    }
    uint64_t left = n;
    for (; left >= per; left -= per, p += PACKET_PAGES) {
        if (!uring) {
            recv_all(fd, header, PACKET_HEADER, "a packet header", ch);
            recv_all(fd, offsets, PACKET_OFFSETS, "packet offsets", ch);
            recv_all(fd, p, PACKET_PAGES, "packet pages", ch);
            continue;
        }
        struct iovec pieces[3] = {{header, PACKET_HEADER}, {offsets, PACKET_OFFSETS}, {p, PACKET_PAGES}};
        uring_packet(&ring, fd, pieces, packets_mode == PACKETS_URING_LINKED, ch);
    }
    if (left) recv_all(fd, p, left, "the last bytes", ch);
    if (uring) io_uring_queue_exit(&ring);
}

static void *recv_thread(void *arg) {
    struct recv_ctx *c = arg;
    unsigned char hdr[HEADER_SIZE];
    recv_all(c->fd, hdr, HEADER_SIZE, "the header", c->index);
    uint64_t id = get_u64(hdr), count = get_u64(hdr + 8);
    if (id >= (uint64_t)c->channels)
        die("connection %d announces channel %llu but only %d channels are expected (--channels differs?)", c->index,
            (unsigned long long)id, c->channels);
    pthread_mutex_lock(&seen_lock);
    int dup = seen[id];
    seen[id] = 1;
    pthread_mutex_unlock(&seen_lock);
    if (dup) die("channel %llu connected twice", (unsigned long long)id);
    uint64_t off, len;
    share(c->size, c->channels, (int)id, &off, &len);
    if (count != len)
        die("channel %llu announces %llu bytes but its share of %llu bytes over %d channels is %llu (sizes differ?)",
            (unsigned long long)id, (unsigned long long)count, (unsigned long long)c->size, c->channels,
            (unsigned long long)len);
    c->id = (int)id;
    if (packets_mode == STREAM) recv_all(c->fd, c->map + off, len, "data", (int)id);
    else recv_packets(c->fd, c->map + off, len, (int)id);
    /* Nothing more may follow: the sender half-closes after its share. */
    unsigned char extra;
    ssize_t r;
    do r = recv(c->fd, &extra, 1, 0); while (r < 0 && errno == EINTR);
    if (r > 0) die("channel %d: the sender sent more than its %llu bytes", c->id, (unsigned long long)len);
    unsigned char ack = 1;
    if (send(c->fd, &ack, 1, MSG_NOSIGNAL) != 1) die("channel %d: sending the acknowledgement: %s", c->id, strerror(errno));
    c->bytes = len;
    close(c->fd);
    return NULL;
}

static int cmd_recv(const char *listen_s, int channels, uint64_t size, const char *out, int cold) {
    role = "recv";
    struct addr a;
    parse_addr(listen_s, &a);

    int ofd = open(out, O_RDWR | O_CREAT | O_CLOEXEC | (cold ? O_TRUNC : 0), 0640);
    if (ofd < 0) die("cannot open output file %s: %s", out, strerror(errno));
    struct stat st;
    if (fstat(ofd, &st)) die("fstat %s: %s", out, strerror(errno));
    if ((uint64_t)st.st_size != size) {
        if (st.st_size != 0) die("output file %s is %lld bytes but --size is %llu; remove it first", out,
                                 (long long)st.st_size, (unsigned long long)size);
        if (ftruncate(ofd, (off_t)size)) die("cannot size %s to %llu bytes: %s", out, (unsigned long long)size, strerror(errno));
    }
    unsigned char *map = NULL;
    if (size) {
        map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, ofd, 0);
        if (map == MAP_FAILED) die("mmap %s (%llu bytes): %s", out, (unsigned long long)size, strerror(errno));
        if (!cold && madvise(map, size, MADV_POPULATE_WRITE))
            die("pre-faulting %s with MADV_POPULATE_WRITE: %s (needs Linux >= 5.14)", out, strerror(errno));
    }
    close(ofd);

    int ls = socket(a.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (ls < 0) die("socket: %s", strerror(errno));
    if (a.family == AF_UNIX) {
        struct stat sst;
        if (lstat(a.unix_path, &sst) == 0) {
            if (!S_ISSOCK(sst.st_mode)) die("%s exists and is not a socket", a.unix_path);
            unlink(a.unix_path);
        }
    } else {
        int one = 1;
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    }
    if (bind(ls, (struct sockaddr *)&a.ss, a.len)) die("bind %s: %s", listen_s, strerror(errno));
    if (listen(ls, channels + 8)) die("listen %s: %s", listen_s, strerror(errno));
    fprintf(stderr, "rawsock: listening on %s\n", listen_s);
    fflush(stderr);

    pthread_t th[MAX_CHANNELS];
    struct recv_ctx ctx[MAX_CHANNELS];
    double t0 = 0;
    for (int i = 0; i < channels; i++) {
        struct pollfd pfd = {.fd = ls, .events = POLLIN};
        int pr;
        do pr = poll(&pfd, 1, timeout_s * 1000); while (pr < 0 && errno == EINTR);
        if (pr < 0) die("poll: %s", strerror(errno));
        if (pr == 0) die("timed out after %d s waiting for channel connections (%d of %d arrived)", timeout_s, i, channels);
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) die("accept: %s", strerror(errno));
        if (i == 0) t0 = now();
        set_timeouts(fd);
        ctx[i] = (struct recv_ctx){.fd = fd, .map = map, .size = size, .channels = channels, .index = i};
        int rc = pthread_create(&th[i], NULL, recv_thread, &ctx[i]);
        if (rc) die("pthread_create: %s", strerror(rc));
    }
    close(ls);
    if (a.family == AF_UNIX) unlink(a.unix_path);
    uint64_t total = 0;
    for (int i = 0; i < channels; i++) {
        pthread_join(th[i], NULL);
        total += ctx[i].bytes;
    }
    double dt = now() - t0;
    if (total != size) die("received %llu bytes, expected %llu", (unsigned long long)total, (unsigned long long)size);
    if (map && munmap(map, size)) die("munmap: %s", strerror(errno));
    printf("{\"role\":\"recv\",\"bytes\":%llu,\"channels\":%d,\"seconds\":%.6f,\"gbps\":%.3f}\n",
           (unsigned long long)total, channels, dt, dt > 0 ? total / dt / 1e9 : 0.0);
    return 0;
}

/* ---- sender ---- */

/* Where the sender takes the bytes from. */
enum send_source { FROM_MAP, FROM_PREAD, FROM_SENDFILE };

struct send_ctx {
    const struct addr *a;
    const char *to;
    enum send_source from;
    const unsigned char *map; /* FROM_MAP only */
    int in_fd;                /* the input file */
    uint64_t size;
    int channels;
    int id;
};

static void send_all(int fd, const unsigned char *p, uint64_t n, int ch, const char *what) {
    uint64_t sent = 0;
    while (sent < n) {
        uint64_t want = n - sent;
        if (want > CHUNK) want = CHUNK;
        ssize_t w = send(fd, p + sent, (size_t)want, MSG_NOSIGNAL);
        if (w > 0) { sent += (uint64_t)w; continue; }
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            die("channel %d: timed out after %d s sending %s (%llu of %llu bytes)", ch, timeout_s, what,
                (unsigned long long)sent, (unsigned long long)n);
        die("channel %d: send %s: %s (after %llu of %llu bytes)", ch, what, w < 0 ? strerror(errno) : "wrote 0 bytes",
            (unsigned long long)sent, (unsigned long long)n);
    }
}

static void *send_thread(void *arg) {
    struct send_ctx *c = arg;
    int fd = socket(c->a->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) die("channel %d: socket: %s", c->id, strerror(errno));
    set_timeouts(fd);
    int rc;
    do rc = connect(fd, (const struct sockaddr *)&c->a->ss, c->a->len); while (rc < 0 && errno == EINTR);
    if (rc) die("channel %d: connect %s: %s", c->id, c->to, strerror(errno));
    uint64_t off, len;
    share(c->size, c->channels, c->id, &off, &len);
    unsigned char hdr[HEADER_SIZE];
    put_u64(hdr, (uint64_t)c->id);
    put_u64(hdr + 8, len);
    send_all(fd, hdr, HEADER_SIZE, c->id, "the header");
    if (c->from == FROM_MAP) {
        send_all(fd, c->map + off, len, c->id, "data");
    } else if (c->from == FROM_SENDFILE) {
        off_t at = (off_t)off;
        for (uint64_t done = 0; done < len;) {
            size_t want = len - done < CHUNK ? (size_t)(len - done) : CHUNK;
            ssize_t w = sendfile(fd, c->in_fd, &at, want);
            if (w < 0 && errno == EINTR) continue;
            if (w <= 0)
                die("channel %d: sendfile at %llu: %s", c->id, (unsigned long long)at,
                    w < 0 ? strerror(errno) : "end of file (the input shrank?)");
            done += (uint64_t)w;
        }
    } else {
        const size_t stage = 2u << 20;
        unsigned char *buf = aligned_alloc(4096, stage);
        if (!buf) die("channel %d: cannot allocate the %zu-byte read buffer", c->id, stage);
        for (uint64_t done = 0; done < len;) {
            size_t want = len - done < stage ? (size_t)(len - done) : stage;
            ssize_t r = pread(c->in_fd, buf, want, (off_t)(off + done));
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) die("channel %d: pread at %llu: %s", c->id, (unsigned long long)(off + done),
                            r < 0 ? strerror(errno) : "end of file (the input shrank?)");
            send_all(fd, buf, (uint64_t)r, c->id, "data");
            done += (uint64_t)r;
        }
        free(buf);
    }
    if (shutdown(fd, SHUT_WR)) die("channel %d: shutdown: %s", c->id, strerror(errno));
    unsigned char ack;
    ssize_t r;
    do r = recv(fd, &ack, 1, 0); while (r < 0 && errno == EINTR);
    if (r != 1)
        die("channel %d: no acknowledgement from the receiver: %s", c->id,
            r == 0 ? "connection closed (the receiver failed; see its stderr)" : strerror(errno));
    close(fd);
    return NULL;
}

static int cmd_send(const char *to, int channels, const char *in, enum send_source from) {
    role = "send";
    struct addr a;
    parse_addr(to, &a);
    int fd = open(in, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open input file %s: %s", in, strerror(errno));
    struct stat st;
    if (fstat(fd, &st)) die("fstat %s: %s", in, strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    const unsigned char *map = NULL;
    if (size && from == FROM_MAP) {
        map = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED) die("mmap %s (%llu bytes): %s", in, (unsigned long long)size, strerror(errno));
    }
    double t0 = now();
    pthread_t th[MAX_CHANNELS];
    struct send_ctx ctx[MAX_CHANNELS];
    for (int i = 0; i < channels; i++) {
        ctx[i] = (struct send_ctx){.a = &a, .to = to, .from = from, .map = map, .in_fd = fd, .size = size, .channels = channels, .id = i};
        int rc = pthread_create(&th[i], NULL, send_thread, &ctx[i]);
        if (rc) die("pthread_create: %s", strerror(rc));
    }
    for (int i = 0; i < channels; i++) pthread_join(th[i], NULL);
    close(fd);
    double dt = now() - t0;
    printf("{\"role\":\"send\",\"bytes\":%llu,\"channels\":%d,\"seconds\":%.6f,\"gbps\":%.3f}\n",
           (unsigned long long)size, channels, dt, dt > 0 ? size / dt / 1e9 : 0.0);
    return 0;
}

/* ---- main ---- */

int main(int argc, char **argv) {
    if (argc < 2) usage(NULL);
    const char *mode = argv[1], *listen_s = NULL, *to = NULL, *out = NULL, *in = NULL, *size_s = NULL;
    int channels = 1, cold = 0, use_pread = 0, use_sendfile = 0;
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i];
#define NEXT() (i + 1 < argc ? argv[++i] : (usage("missing value after option"), (char *)0))
        if (!strcmp(o, "--listen")) listen_s = NEXT();
        else if (!strcmp(o, "--to")) to = NEXT();
        else if (!strcmp(o, "--out")) out = NEXT();
        else if (!strcmp(o, "--in")) in = NEXT();
        else if (!strcmp(o, "--size")) size_s = NEXT();
        else if (!strcmp(o, "--cold")) cold = 1;
        else if (!strcmp(o, "--pread")) use_pread = 1;
        else if (!strcmp(o, "--sendfile")) use_sendfile = 1;
        else if (!strcmp(o, "--packets")) {
            const char *v = NEXT();
            if (!strcmp(v, "plain")) packets_mode = PACKETS_PLAIN;
            else if (!strcmp(v, "uring")) packets_mode = PACKETS_URING;
            else if (!strcmp(v, "uring-linked")) packets_mode = PACKETS_URING_LINKED;
            else usage("--packets: plain, uring or uring-linked");
        }
        else if (!strcmp(o, "--channels") || !strcmp(o, "--timeout")) {
            const char *v = NEXT();
            char *end;
            long n = strtol(v, &end, 10);
            if (*end || end == v || n < 1) usage("--channels and --timeout need a positive integer");
            if (!strcmp(o, "--channels")) {
                if (n > MAX_CHANNELS) usage("--channels: at most 256");
                channels = (int)n;
            } else timeout_s = (int)(n > 1000000 ? 1000000 : n);
        } else if (!strcmp(o, "-h") || !strcmp(o, "--help")) usage(NULL);
        else {
            fprintf(stderr, "rawsock: unknown option '%s'\n", o);
            usage(NULL);
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(mode, "recv")) {
        if (!listen_s || !size_s || !out) usage("recv needs --listen, --size and --out");
        if (to || in || use_pread || use_sendfile) usage("recv takes no --to/--in/--pread/--sendfile");
        uint64_t size;
        if (parse_size(size_s, &size)) usage("--size: not a size (bytes, or with K/M/G/KiB/MiB/GiB)");
        return cmd_recv(listen_s, channels, size, out, cold);
    }
    if (!strcmp(mode, "send")) {
        if (!to || !in) usage("send needs --to and --in");
        if (listen_s || out || size_s || cold || packets_mode != STREAM)
            usage("send takes no --listen/--out/--size/--cold/--packets");
        if (use_pread && use_sendfile) usage("--pread and --sendfile exclude each other");
        return cmd_send(to, channels, in, use_pread ? FROM_PREAD : use_sendfile ? FROM_SENDFILE : FROM_MAP);
    }
    usage("mode must be recv or send");
    return 2;
}
