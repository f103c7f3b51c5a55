/*
 * loadgen.c - native load generator for the ringblob benchmark (bench/run.py).
 *
 * One process opens one Unix-socket connection to `ringblob serve` and keeps
 * --share requests in flight, pipelined, matching replies by request_id
 * (replies may come in any order). It speaks the wire protocol of
 * docs/PROTOCOL.md (20-byte little-endian header "<4sBBHQI": magic "RBLB",
 * version 1, opcode, flags/status, request_id u64, body_length u32).
 *
 * It mirrors bench/run.py's Python load (`_load`): each of the --share slots
 * loops "pick a random key, send one request, wait for its reply" until the
 * end of the measured window; a request's latency (seconds) counts when it
 * started at or after t_meas and finished by t_end. put_nosync_flush: after
 * every --flush-every successful PUTs of the process, the slot whose PUT made
 * the count sends a FLUSH and waits for it before its next PUT (the other
 * slots go on), exactly as `_load` does; FLUSH latencies started in the
 * measured window are kept apart. put_nosync_flush and put_big send one last
 * FLUSH after the window (not measured).
 *
 * Start-up: connect, print "ready" on stdout, then (with --go-stdin) read one
 * line "T_MEAS DURATION" from stdin: T_MEAS is an absolute CLOCK_MONOTONIC
 * time in seconds (Python's time.monotonic() on Linux); the load starts at
 * once (the warm-up is the time until T_MEAS) and stops at T_MEAS + DURATION.
 * Without --go-stdin, --warmup and --duration time it from the start.
 *
 * Send buffer: --sndbuf BYTES sets SO_SNDBUF on the connection (default, and
 * 0: the kernel's, net.core.wmem_default). A Unix stream socket holds at most
 * the sender's send buffer in flight, so it bounds each of the daemon's reads
 * of a large body. Measured on the 2-CPU bench host (put_big 1 MiB, 2 x 4
 * slots, 6 rounds each): 0 (208 KiB) 10.9 reads and 580 us of daemon CPU per
 * MiB, 4403 PUTs in 3 s; 512 KiB 7.3 / 524 us / 4175; 1 MiB 7.7 / 518 us /
 * 3995; 4 MiB 7.6 / 569 us / 3808. Fewer reads and less CPU, but less
 * bandwidth as the buffer grows, so the benchmark keeps the kernel's default.
 * The kernel caps the size at net.core.wmem_max and doubles it (its
 * bookkeeping); the size in effect is "sndbuf" in the JSON line.
 *
 * Output: the measured latencies as raw native-endian float64 seconds to
 * --out (FLUSH latencies to --flush-out when given), and one JSON line on
 * stdout: ops, errors, first_error, flushes, cpu_s (getrusage user+system
 * over the measured window [T_MEAS, T_END], as `_load` measures it),
 * cpu_window_s, sndbuf (SO_SNDBUF in effect, bytes), and "error" when the
 * run was aborted (connection lost, a protocol violation, a FLUSH that
 * failed, or over 1000 request errors; exit status 1). A request answered with a non-zero status counts as an error
 * (the first one is reported with its status and message); so does a GET
 * whose value is not --size bytes long, or (with the bench's data set, whose
 * values end with the key number as "%016d") whose last 16 bytes name another
 * key, and a PING whose echo is not empty.
 *
 * Build: cc -O2 -Wall -Wextra -o loadgen bench/loadgen.c   (libc only)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 20
#define OP_PUT 1
#define OP_GET 2
#define OP_FLUSH 6
#define OP_PING 8
#define FLAG_SYNC 1
#define SLOT_BITS 20 /* request_id = (generation << SLOT_BITS) | slot */
#define MAX_ERRORS 1000
#define STALL_S 60.0 /* no reply for this long with requests in flight: abort */

enum { W_PING, W_GET, W_GET_BIG, W_PUT_SYNC, W_PUT_NOSYNC_FLUSH, W_PUT_BIG };
enum { K_IDLE, K_MAIN, K_FLUSH, K_FINAL_FLUSH };

typedef struct {
    uint64_t rng;
    uint64_t id;        /* request id in flight (0: none) */
    double t0;          /* when the request in flight was issued */
    int kind;           /* K_* */
    uint32_t key_idx;   /* key number of the request in flight */
    unsigned char hdr[HDR + 1 + 255];
} slot_t;

typedef struct { double *v; size_t n, cap; } dvec;

/* -- options and state ----------------------------------------------------------------------- */

static const char *o_socket, *o_op, *o_out, *o_flush_out;
static long o_size = -1, o_share = 1, o_keys = 1, o_flush_every = 32;
static uint64_t o_seed = 1;
static double o_warmup = 0.0, o_duration = -1.0;
static int o_go_stdin = 0, o_check_tail = 1;
static long o_sndbuf = 0;       /* SO_SNDBUF to set (bytes); 0: the kernel's default */
static int sndbuf_now = 0;      /* SO_SNDBUF in effect (getsockopt), for the JSON line */

static int wl, fd = -1;
static slot_t *slots;
static unsigned char *value;            /* the PUT value (random, seeded) */
static struct iovec *iov;               /* output queue: [ohead, ocount) */
static int ocap, ohead, ocount;
static unsigned char *rbuf;             /* input buffer: unparsed bytes in [rpos, rlen) */
static size_t rcap, rpos, rlen;
static double t_meas, t_end;
static dvec lat, flush_lat;
static long errors, in_flight, puts_done;
static uint64_t generation;
static char first_error[512];
static char fatal_msg[768];
static struct rusage ru0, ru1;
static int have_ru0, have_ru1;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double ru_cpu(const struct rusage *r) {
    return (double)r->ru_utime.tv_sec + r->ru_utime.tv_usec * 1e-6 + (double)r->ru_stime.tv_sec + r->ru_stime.tv_usec * 1e-6;
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void dpush(dvec *d, double x) {
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 65536;
        double *v = realloc(d->v, cap * sizeof *v);
        if (!v) { fprintf(stderr, "loadgen: out of memory\n"); exit(1); }
        d->v = v;
        d->cap = cap;
    }
    d->v[d->n++] = x;
}

static void put_le16(unsigned char *p, uint16_t x) { p[0] = (unsigned char)x; p[1] = (unsigned char)(x >> 8); }
static void put_le32(unsigned char *p, uint32_t x) { for (int i = 0; i < 4; i++) p[i] = (unsigned char)(x >> (8 * i)); }
static void put_le64(unsigned char *p, uint64_t x) { for (int i = 0; i < 8; i++) p[i] = (unsigned char)(x >> (8 * i)); }
static uint16_t get_le16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get_le32(const unsigned char *p) { uint32_t x = 0; for (int i = 3; i >= 0; i--) x = (x << 8) | p[i]; return x; }
static uint64_t get_le64(const unsigned char *p) { uint64_t x = 0; for (int i = 7; i >= 0; i--) x = (x << 8) | p[i]; return x; }

/* -- JSON output --------------------------------------------------------------------------- */

static void json_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') fprintf(f, "\\%c", *p);
        else if (*p < 0x20 || *p == 0x7f || *p >= 0x80) fprintf(f, "\\u%04x", *p); /* bytes as code points: always valid JSON */
        else fputc(*p, f);
    }
    fputc('"', f);
}

static int write_doubles(const char *path, const dvec *d) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t n = d->n ? fwrite(d->v, sizeof(double), d->n, f) : 0;
    int bad = n != d->n;
    if (fclose(f) != 0) bad = 1;
    return bad ? -1 : 0;
}

/* Write the results and exit: status 0 after a complete run, 1 when aborted (fatal_msg set). */
static void finish(void) {
    int rc = fatal_msg[0] ? 1 : 0;
    if (o_out && write_doubles(o_out, &lat) != 0) {
        snprintf(fatal_msg, sizeof fatal_msg, "cannot write %s: %s", o_out, strerror(errno));
        rc = 1;
    }
    if (o_flush_out && write_doubles(o_flush_out, &flush_lat) != 0) {
        snprintf(fatal_msg, sizeof fatal_msg, "cannot write %s: %s", o_flush_out, strerror(errno));
        rc = 1;
    }
    double cpu = (have_ru0 && have_ru1) ? ru_cpu(&ru1) - ru_cpu(&ru0) : 0.0;
    printf("{\"ops\": %zu, \"errors\": %ld, \"first_error\": ", lat.n, errors);
    if (first_error[0]) json_str(stdout, first_error); else fputs("null", stdout);
    printf(", \"flushes\": %zu, \"cpu_s\": %.6f, \"cpu_window\": \"measured\", \"cpu_window_s\": %.6f, \"in_flight_at_exit\": %ld"
           ", \"sndbuf\": %d", flush_lat.n, cpu, o_duration, in_flight, sndbuf_now);
    if (rc) { fputs(", \"error\": ", stdout); json_str(stdout, fatal_msg); }
    fputs("}\n", stdout);
    fflush(stdout);
    exit(rc);
}

static void fatal(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(fatal_msg, sizeof fatal_msg, fmt, ap);
    va_end(ap);
    if (!fatal_msg[0]) strcpy(fatal_msg, "aborted");
    fprintf(stderr, "loadgen: %s\n", fatal_msg);
    finish();
}

/* A failed request: counted; the first is kept; over MAX_ERRORS the run aborts (as `_load` does). */
static void request_error(const char *fmt, ...) {
    errors++;
    if (!first_error[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_error, sizeof first_error, fmt, ap);
        va_end(ap);
    }
    if (errors > MAX_ERRORS) fatal("more than %d request errors; first: %s", MAX_ERRORS, first_error);
}

/* -- output queue ---------------------------------------------------------------------------- */

static void enqueue(void *base, size_t len) {
    if (len == 0) return;
    if (ocount == ocap) {
        if (ohead == 0) fatal("internal: output queue full");
        memmove(iov, iov + ohead, (size_t)(ocount - ohead) * sizeof *iov);
        ocount -= ohead;
        ohead = 0;
    }
    iov[ocount].iov_base = base;
    iov[ocount].iov_len = len;
    ocount++;
}

/* Write as much of the queue as the socket takes now; 1 when bytes remain queued. */
static int flush_out(void) {
    while (ohead < ocount) {
        int n = ocount - ohead;
        if (n > IOV_MAX) n = IOV_MAX;
        ssize_t w = writev(fd, iov + ohead, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 1;
            fatal("connection lost: write to %s failed: %s (%ld requests in flight)", o_socket, strerror(errno), in_flight);
        }
        size_t left = (size_t)w;
        while (left > 0) {
            struct iovec *v = &iov[ohead];
            if (left >= v->iov_len) { left -= v->iov_len; ohead++; }
            else { v->iov_base = (char *)v->iov_base + left; v->iov_len -= left; left = 0; }
        }
    }
    ohead = ocount = 0;
    return 0;
}

/* -- requests ----------------------------------------------------------------------------- */

static void key_of(uint32_t i, char *buf, size_t n) {
    switch (wl) {
    case W_GET: snprintf(buf, n, "g%09" PRIu32, i); break;
    case W_GET_BIG: snprintf(buf, n, "G%06" PRIu32, i); break;
    case W_PUT_BIG: snprintf(buf, n, "P%06" PRIu32, i); break;
    default: snprintf(buf, n, "p%09" PRIu32, i); break;
    }
}

static void header(unsigned char *h, int opcode, int flags, uint64_t id, uint32_t body_len) {
    memcpy(h, "RBLB", 4);
    h[4] = 1;
    h[5] = (unsigned char)opcode;
    put_le16(h + 6, (uint16_t)flags);
    put_le64(h + 8, id);
    put_le32(h + 16, body_len);
}

static uint64_t next_id(int s) {
    generation++;
    return (generation << SLOT_BITS) | (uint64_t)s;
}

static void issue_flush(int s, int kind, double t) {
    slot_t *sl = &slots[s];
    sl->id = next_id(s);
    sl->kind = kind;
    sl->t0 = t;
    header(sl->hdr, OP_FLUSH, 0, sl->id, 0);
    enqueue(sl->hdr, HDR);
    in_flight++;
}

/* Slot s's next request at time t, or nothing (the slot is done) once the window is over. */
static void issue(int s, double t) {
    slot_t *sl = &slots[s];
    if (t >= t_end) { sl->kind = K_IDLE; sl->id = 0; return; }
    sl->id = next_id(s);
    sl->kind = K_MAIN;
    sl->t0 = t;
    if (wl == W_PING) {
        header(sl->hdr, OP_PING, 0, sl->id, 0);
        enqueue(sl->hdr, HDR);
    } else {
        char key[64];
        sl->key_idx = (uint32_t)(splitmix(&sl->rng) % (uint64_t)o_keys);
        key_of(sl->key_idx, key, sizeof key);
        size_t klen = strlen(key);
        sl->hdr[HDR] = (unsigned char)klen;
        memcpy(sl->hdr + HDR + 1, key, klen);
        if (wl == W_GET || wl == W_GET_BIG) {
            header(sl->hdr, OP_GET, 0, sl->id, (uint32_t)(1 + klen));
            enqueue(sl->hdr, HDR + 1 + klen);
        } else {
            header(sl->hdr, OP_PUT, wl == W_PUT_SYNC ? FLAG_SYNC : 0, sl->id, (uint32_t)(1 + klen + (size_t)o_size));
            enqueue(sl->hdr, HDR + 1 + klen);
            enqueue(value, (size_t)o_size);
        }
    }
    in_flight++;
}

static const char *op_name(int opcode) {
    switch (opcode) {
    case OP_PUT: return "PUT";
    case OP_GET: return "GET";
    case OP_FLUSH: return "FLUSH";
    case OP_PING: return "PING";
    default: return "?";
    }
}

/* The reply's message as printable text (at most n-1 bytes). */
static void message(const unsigned char *body, uint32_t len, char *out, size_t n) {
    size_t k = len < n - 1 ? len : n - 1;
    memcpy(out, body, k);
    out[k] = 0;
    for (size_t i = 0; i < k; i++) if (out[i] == 0) out[i] = '?';
}

static void on_reply(int opcode, int status, uint64_t id, const unsigned char *body, uint32_t blen, double t1) {
    char msg[400];
    if (id == 0) {
        message(body, blen, msg, sizeof msg);
        fatal("connection-level error from the daemon: status %d: %s", status, msg);
    }
    uint64_t s = id & ((1u << SLOT_BITS) - 1);
    if (s >= (uint64_t)o_share || slots[s].id != id)
        fatal("reply for request id %" PRIu64 " that is not in flight (protocol violation)", id);
    slot_t *sl = &slots[s];
    in_flight--;
    int kind = sl->kind;
    int want_op = kind == K_MAIN ? (wl == W_PING ? OP_PING : (wl == W_GET || wl == W_GET_BIG) ? OP_GET : OP_PUT) : OP_FLUSH;
    if (opcode != want_op && status == 0)
        fatal("reply to request %" PRIu64 " has opcode %d, expected %d", id, opcode, want_op);
    sl->id = 0;
    if (kind == K_FLUSH || kind == K_FINAL_FLUSH) {
        if (status != 0) {
            message(body, blen, msg, sizeof msg);
            fatal("FLUSH failed: status %d: %s", status, msg);
        }
        if (kind == K_FLUSH && sl->t0 >= t_meas) dpush(&flush_lat, t1 - sl->t0);
        sl->kind = K_IDLE;
        if (kind == K_FLUSH) issue((int)s, t1);
        return;
    }
    char key[64];
    key_of(sl->key_idx, key, sizeof key);
    int ok = 0;
    if (status != 0) {
        message(body, blen, msg, sizeof msg);
        if (wl == W_PING) request_error("%s: status %d: %s", op_name(opcode), status, msg);
        else request_error("%s %s: status %d: %s", op_name(opcode), key, status, msg);
    } else if (wl == W_GET || wl == W_GET_BIG) {
        char tail[32];
        snprintf(tail, sizeof tail, "%016" PRIu32, sl->key_idx);
        if (blen != (uint64_t)o_size)
            request_error("GET %s returned %" PRIu32 " bytes, expected %ld", key, blen, o_size);
        else if (o_check_tail && blen >= 16 && memcmp(body + blen - 16, tail, 16) != 0)
            request_error("GET %s returned another blob's value (its last 16 bytes are not %s)", key, tail);
        else ok = 1;
    } else if (wl == W_PING) {
        if (blen != 0) request_error("PING echoed %" PRIu32 " bytes, sent 0", blen);
        else ok = 1;
    } else {
        ok = 1;
    }
    if (ok && sl->t0 >= t_meas && t1 <= t_end) dpush(&lat, t1 - sl->t0);
    if (ok && wl == W_PUT_NOSYNC_FLUSH) {
        puts_done++;
        if (puts_done % o_flush_every == 0) { issue_flush((int)s, K_FLUSH, t1); return; }
    }
    issue((int)s, t1);
}

/* Parse every complete frame in the input buffer. */
static void parse_frames(double t1) {
    while (rlen - rpos >= HDR) {
        const unsigned char *h = rbuf + rpos;
        if (memcmp(h, "RBLB", 4) != 0) fatal("bad magic in a reply frame (protocol violation)");
        if (h[4] != 1) fatal("reply frame of protocol version %d, expected 1", h[4]);
        uint32_t blen = get_le32(h + 16);
        if (blen > (64u << 20) + (8u << 20)) fatal("reply frame body of %" PRIu32 " bytes is over 72 MiB", blen);
        size_t need = HDR + (size_t)blen;
        if (rlen - rpos < need) {
            if (rpos + need > rcap) { /* make room: move the partial frame down, grow if still too small */
                memmove(rbuf, rbuf + rpos, rlen - rpos);
                rlen -= rpos;
                rpos = 0;
                if (need > rcap) {
                    unsigned char *nb = realloc(rbuf, need);
                    if (!nb) fatal("out of memory for a %zu-byte reply", need);
                    rbuf = nb;
                    rcap = need;
                }
            }
            return;
        }
        on_reply(h[5], get_le16(h + 6), get_le64(h + 8), h + HDR, blen, t1);
        rpos += need;
    }
    if (rpos == rlen) rpos = rlen = 0;
    else if (rcap - rlen < (256u << 10)) {
        memmove(rbuf, rbuf + rpos, rlen - rpos);
        rlen -= rpos;
        rpos = 0;
    }
}

/* -- main ---------------------------------------------------------------------------------- */

static void usage(void) {
    fputs("usage: loadgen --socket PATH --op {ping,get,get_big,put_sync,put_nosync_flush,put_big}\n"
          "               --size BYTES --share N --keys N [--seed N] [--flush-every N]\n"
          "               [--out FILE] [--flush-out FILE] [--no-check-tail] [--sndbuf BYTES]\n"
          "               (--go-stdin | [--warmup S] --duration S)\n", stderr);
    exit(2);
}

static long parse_long(const char *s, const char *what, long lo) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo) { fprintf(stderr, "loadgen: bad %s %s\n", what, s); exit(2); }
    return v;
}

static double parse_double(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || *end || end == s || v < 0) { fprintf(stderr, "loadgen: bad %s %s\n", what, s); exit(2); }
    return v;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (strcmp(a, name) == 0 && v && (i++, 1))
        if (ARG("--socket")) o_socket = v;
        else if (ARG("--op")) o_op = v;
        else if (ARG("--size")) o_size = parse_long(v, "--size", 0);
        else if (ARG("--share")) o_share = parse_long(v, "--share", 1);
        else if (ARG("--keys")) o_keys = parse_long(v, "--keys", 1);
        else if (ARG("--seed")) o_seed = (uint64_t)parse_long(v, "--seed", 0);
        else if (ARG("--sndbuf")) o_sndbuf = parse_long(v, "--sndbuf", 0);
        else if (ARG("--flush-every")) o_flush_every = parse_long(v, "--flush-every", 1);
        else if (ARG("--out")) o_out = v;
        else if (ARG("--flush-out")) o_flush_out = v;
        else if (ARG("--warmup")) o_warmup = parse_double(v, "--warmup");
        else if (ARG("--duration")) o_duration = parse_double(v, "--duration");
        else if (strcmp(a, "--go-stdin") == 0) o_go_stdin = 1;
        else if (strcmp(a, "--no-check-tail") == 0) o_check_tail = 0;
        else usage();
#undef ARG
    }
    if (!o_socket || !o_op || o_size < 0 || (!o_go_stdin && o_duration < 0)) usage();
    if (strcmp(o_op, "ping") == 0) wl = W_PING;
    else if (strcmp(o_op, "get") == 0) wl = W_GET;
    else if (strcmp(o_op, "get_big") == 0) wl = W_GET_BIG;
    else if (strcmp(o_op, "put_sync") == 0) wl = W_PUT_SYNC;
    else if (strcmp(o_op, "put_nosync_flush") == 0) wl = W_PUT_NOSYNC_FLUSH;
    else if (strcmp(o_op, "put_big") == 0) wl = W_PUT_BIG;
    else { fprintf(stderr, "loadgen: unknown --op %s\n", o_op); exit(2); }
    if (o_share >= (1L << SLOT_BITS) || o_keys > 0xFFFFFFFFL || o_size > (64L << 20)) {
        fprintf(stderr, "loadgen: --share, --keys or --size out of range\n");
        exit(2);
    }
    if (wl == W_PING) o_size = 0;
    signal(SIGPIPE, SIG_IGN);

    slots = calloc((size_t)o_share, sizeof *slots);
    ocap = 2 * (int)o_share + 4;
    iov = calloc((size_t)ocap, sizeof *iov);
    value = malloc((size_t)o_size + 1);
    rcap = (4u << 20) + 2 * (size_t)o_size;
    rbuf = malloc(rcap);
    if (!slots || !iov || !value || !rbuf) { fprintf(stderr, "loadgen: out of memory\n"); exit(1); }
    uint64_t vs = o_seed * 0x2545F4914F6CDD1Dull + 1;
    for (long i = 0; i < o_size; i += 8) {
        uint64_t r = splitmix(&vs);
        long n = o_size - i < 8 ? o_size - i : 8;
        memcpy(value + i, &r, (size_t)n);
    }
    for (long i = 0; i < o_share; i++) {
        slots[i].rng = o_seed * 7919 + (uint64_t)i;
        splitmix(&slots[i].rng);
    }

    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(o_socket) >= sizeof addr.sun_path) { fprintf(stderr, "loadgen: socket path too long\n"); exit(2); }
    strcpy(addr.sun_path, o_socket);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) { perror("loadgen: socket"); exit(1); }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        fprintf(stderr, "loadgen: cannot connect to %s: %s\n", o_socket, strerror(errno));
        printf("{\"ops\": 0, \"errors\": 0, \"first_error\": null, \"cpu_s\": 0, \"error\": ");
        char m[600];
        snprintf(m, sizeof m, "cannot connect to %s: %s", o_socket, strerror(errno));
        json_str(stdout, m);
        puts("}");
        return 1;
    }

    int sb = o_sndbuf > INT_MAX ? INT_MAX : (int)o_sndbuf;
    if (sb > 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sb, sizeof sb) != 0) { perror("loadgen: SO_SNDBUF"); exit(1); }
    socklen_t sl = sizeof sndbuf_now;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf_now, &sl) != 0) sndbuf_now = -1;
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) { perror("loadgen: fcntl"); exit(1); }
    printf("ready\n");
    fflush(stdout);
    double t_start;
    if (o_go_stdin) {
        char line[256];
        if (!fgets(line, sizeof line, stdin) || sscanf(line, "%lf %lf", &t_meas, &o_duration) != 2 || o_duration < 0) {
            fprintf(stderr, "loadgen: expected 'T_MEAS DURATION' on stdin\n");
            return 2;
        }
        t_start = now_s();
    } else {
        t_start = now_s();
        t_meas = t_start + o_warmup;
    }
    t_end = t_meas + o_duration;

    for (long i = 0; i < o_share; i++) issue((int)i, t_start);
    int pending_out = flush_out();
    int final_sent = 0;
    double last_reply = now_s();
    for (;;) {
        double t = now_s();
        if (!have_ru0 && t >= t_meas) { getrusage(RUSAGE_SELF, &ru0); have_ru0 = 1; }
        if (!have_ru1 && t >= t_end) { getrusage(RUSAGE_SELF, &ru1); have_ru1 = 1; }
        if (in_flight == 0) {
            if (t < t_end) fatal("internal: no request in flight before the end of the window");
            if (!final_sent && (wl == W_PUT_NOSYNC_FLUSH || wl == W_PUT_BIG)) {
                issue_flush(0, K_FINAL_FLUSH, t);
                final_sent = 1;
                pending_out = flush_out();
            } else {
                break;
            }
        }
        if (t - last_reply > STALL_S)
            fatal("no reply from the daemon for %.0f s with %ld requests in flight", STALL_S, in_flight);
        double next_mark = !have_ru0 ? t_meas : !have_ru1 ? t_end : t + 1.0;
        int timeout_ms = (int)((next_mark - t) * 1000.0) + 1;
        if (timeout_ms > 1000) timeout_ms = 1000;
        struct pollfd p = {fd, (short)(POLLIN | (pending_out ? POLLOUT : 0)), 0};
        int r = poll(&p, 1, timeout_ms);
        if (r < 0) {
            if (errno == EINTR) continue;
            fatal("poll: %s", strerror(errno));
        }
        if (r == 0) continue;
        if (p.revents & POLLOUT) pending_out = flush_out();
        if (p.revents & (POLLIN | POLLHUP | POLLERR)) {
            if (rcap - rlen == 0) fatal("internal: input buffer full");
            ssize_t n = read(fd, rbuf + rlen, rcap - rlen);
            if (n < 0) {
                if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
                fatal("connection lost: read from %s failed: %s (%ld requests in flight)", o_socket, strerror(errno), in_flight);
            }
            if (n == 0)
                fatal("connection lost: the daemon closed the connection with %ld requests in flight", in_flight);
            double t1 = now_s();
            last_reply = t1;
            rlen += (size_t)n;
            if (!have_ru1 && t1 >= t_end) { getrusage(RUSAGE_SELF, &ru1); have_ru1 = 1; }
            parse_frames(t1);
            pending_out = flush_out();
        }
    }
    if (!have_ru0) { getrusage(RUSAGE_SELF, &ru0); have_ru0 = 1; }
    if (!have_ru1) { getrusage(RUSAGE_SELF, &ru1); have_ru1 = 1; }
    shutdown(fd, SHUT_WR);
    close(fd);
    finish();
    return 0;
}
