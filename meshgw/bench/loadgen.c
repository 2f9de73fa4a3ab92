/*
 * loadgen.c - the load generator and backend of `meshgw bench`.
 *
 * One small single-threaded epoll program, so the load side costs little CPU and never becomes
 * the thing being measured (Python cannot drive 10k connections/s on one core). meshgw compiles
 * it on first use with the system `cc` into ~/.cache/meshgw-bench/.
 *
 *   loadgen serve [--reply-size N] [--hello FILE]... MODE...
 *       MODE is reply | hold | echo | sink | source; one listener on 127.0.0.1 per MODE.
 *       Prints "ports MODE=PORT ..."; serves until its stdin closes, then prints
 *       "stats {json}" and exits.
 *   loadgen rate  --port P --hello FILE [--concurrency C] [--duration S | --count N]
 *   loadgen bulk  --port P --hello FILE [--connections C] --duration S --direction up|down|both
 *   loadgen rr    --port P --hello FILE [--connections C] --duration S [--size N]
 *   loadgen idle  --port P --hello FILE --count N [--concurrency C]
 *       Clients print "start" and "end" around the measured window, then "result {json}".
 *       idle prints "held N" once every connection is up and closes them when stdin closes.
 *
 * Every connection carries a ClientHello first (consumed by the backend, which checks it against
 * the --hello files: the proxy must forward it verbatim), then the backend sends a greeting of
 * --reply-size bytes (so a client knows its connection reaches the backend), then the mode's
 * stream. Stream bytes follow a fixed pattern of period 251 indexed by stream offset, so both
 * ends verify every byte with one memcmp: nothing altered, dropped or inserted.
 *
 * reply: greeting, then close (the backend closes first, so TIME_WAIT stays on listening sides
 *        and the client's ephemeral ports do not run out at high connection rates).
 * hold:  greeting, then wait for EOF.      echo: greeting, then echo until EOF.
 * sink:  greeting, then read and verify until EOF.
 * source: the pattern stream from offset 0 (its first bytes are the greeting) until EOF.
 *
 * Every client run is bounded: --timeout (default duration + 30 s) ends it via SIGALRM.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define PERIOD 251
#define CHUNK (256 * 1024)
#define MAX_HELLO 65536
#define MAX_HELLOS 8
#define MAX_EVENTS 512

static unsigned char PAT[CHUNK + PERIOD];
static unsigned char RBUF[CHUNK];

static void pat_init(void) {
    for (size_t i = 0; i < sizeof PAT; i++) PAT[i] = (unsigned char)((i % PERIOD) * 37 + 11);
}

static inline const unsigned char *pat_at(uint64_t off) { return PAT + (off % PERIOD); }

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec +
           (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "loadgen: deadline reached, giving up\n";
    ssize_t ignored = write(2, msg, sizeof msg - 1);
    (void)ignored;
    _exit(3);
}

static void raise_nofile(void) {
    /* idle holds thousands of connections: lift the soft limit to the hard one. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* --- latency histogram: log-linear, 1024 sub-buckets per power of two (< 0.1 % error) --- */

#define HSUB 1024
#define HBUCKETS (2 * HSUB + 42 * HSUB)
static uint64_t HIST[HBUCKETS];
static uint64_t hist_n, hist_max;

static void hist_add(uint64_t v) {
    if (v >= (1ull << 50)) v = (1ull << 50) - 1;
    int i;
    if (v < 2 * HSUB) {
        i = (int)v;
    } else {
        int shift = 63 - __builtin_clzll(v) - 10;
        i = 2 * HSUB + (shift - 1) * HSUB + (int)((v >> shift) - HSUB);
    }
    HIST[i]++;
    hist_n++;
    if (v > hist_max) hist_max = v;
}

static uint64_t hist_value(int i) {
    if (i < 2 * HSUB) return (uint64_t)i;
    int shift = (i - 2 * HSUB) / HSUB + 1;
    uint64_t m = (uint64_t)((i - 2 * HSUB) % HSUB + HSUB);
    return (m << shift) + ((1ull << shift) >> 1); /* middle of the bucket */
}

static uint64_t hist_pct(double p) {
    if (!hist_n) return 0;
    uint64_t rank = (uint64_t)(p * (double)hist_n + 0.999999);
    if (rank < 1) rank = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HBUCKETS; i++) {
        seen += HIST[i];
        if (seen >= rank) return hist_value(i);
    }
    return hist_max;
}

static void print_hist(void) {
    printf("\"lat_ns\":{\"n\":%llu,\"p50\":%llu,\"p90\":%llu,\"p99\":%llu,\"p999\":%llu,"
           "\"max\":%llu}",
           (unsigned long long)hist_n, (unsigned long long)hist_pct(0.50),
           (unsigned long long)hist_pct(0.90), (unsigned long long)hist_pct(0.99),
           (unsigned long long)hist_pct(0.999), (unsigned long long)hist_max);
}

/* --- hellos --- */

static unsigned char *HELLO[MAX_HELLOS];
static size_t HELLO_LEN[MAX_HELLOS];
static int n_hellos;

static void load_hello(const char *path) {
    if (n_hellos == MAX_HELLOS) {
        fprintf(stderr, "loadgen: too many --hello files\n");
        exit(2);
    }
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    unsigned char *buf = malloc(MAX_HELLO);
    size_t n = fread(buf, 1, MAX_HELLO, f);
    fclose(f);
    if (n == 0) {
        fprintf(stderr, "loadgen: %s is empty\n", path);
        exit(2);
    }
    HELLO[n_hellos] = buf;
    HELLO_LEN[n_hellos++] = n;
}

/* Length of the TLS handshake message at the start of buf once it is complete (it may span
 * several records), 0 while more bytes are needed, -1 if this is not a TLS handshake. */
static long hello_length(const unsigned char *buf, size_t len) {
    size_t pos = 0, have = 0, need = 0;
    unsigned char hh[4];
    size_t hh_have = 0;
    while (pos + 5 <= len) {
        if (buf[pos] != 0x16) return -1;
        size_t rl = ((size_t)buf[pos + 3] << 8) | buf[pos + 4];
        size_t avail = len - pos - 5 < rl ? len - pos - 5 : rl;
        for (size_t k = 0; k < avail && hh_have < 4; k++) hh[hh_have++] = buf[pos + 5 + k];
        have += avail;
        if (!need && hh_have == 4)
            need = 4 + (((size_t)hh[1] << 16) | ((size_t)hh[2] << 8) | hh[3]);
        if (avail < rl) return 0;
        pos += 5 + rl;
        if (need && have >= need) return (long)pos;
    }
    return 0;
}

/* --- the backend --- */

enum { M_REPLY, M_HOLD, M_ECHO, M_SINK, M_SOURCE, M_COUNT };
static const char *MODE_NAMES[M_COUNT] = {"reply", "hold", "echo", "sink", "source"};

struct mstats {
    uint64_t accepted, hello_ok, hello_bad, bytes_in, bytes_out, corrupt, errors, closed;
};
static struct mstats STATS[M_COUNT];

struct sconn {
    int fd, mode;
    unsigned char *hbuf; /* the hello while it arrives; freed once checked */
    size_t hlen;
    int hello_done, eof, events;
    size_t greet_left;
    uint64_t in, out;      /* stream offsets after the hello */
    unsigned char *ebuf;   /* echo bytes waiting for the socket to drain */
    size_t epos, elen;
};

static int g_ep;
static size_t g_reply = 128;
static struct sconn **SCONN; /* by fd */
static int sconn_cap;

static void ep_set(int fd, uint32_t events, uint64_t data, int op) {
    struct epoll_event ev = {.events = events, .data.u64 = data};
    if (epoll_ctl(g_ep, op, fd, &ev) < 0) die("epoll_ctl");
}

static void s_close(struct sconn *c) {
    STATS[c->mode].closed++;
    close(c->fd);
    SCONN[c->fd] = NULL;
    free(c->hbuf);
    free(c->ebuf);
    free(c);
}

static void s_want(struct sconn *c, uint32_t events) {
    if (c->events != (int)events) {
        ep_set(c->fd, events, (uint64_t)c->fd, EPOLL_CTL_MOD);
        c->events = (int)events;
    }
}

static int s_error(struct sconn *c) {
    STATS[c->mode].errors++;
    s_close(c);
    return -1;
}

/* Write what the mode has to send now; -1 if the connection was closed. */
static int s_flush(struct sconn *c) {
    struct mstats *st = &STATS[c->mode];
    while (c->greet_left) {
        size_t off = g_reply - c->greet_left;
        ssize_t n = send(c->fd, PAT + off, c->greet_left, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return 0;
            return s_error(c);
        }
        c->greet_left -= (size_t)n;
        if (c->mode == M_REPLY) st->bytes_out += (uint64_t)n;
    }
    if (c->mode == M_REPLY) {
        s_close(c);
        return -1;
    }
    if (c->mode == M_ECHO && c->elen) {
        while (c->epos < c->elen) {
            ssize_t n = send(c->fd, c->ebuf + c->epos, c->elen - c->epos, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) return 0;
                return s_error(c);
            }
            c->epos += (size_t)n;
            c->out += (uint64_t)n;
            st->bytes_out += (uint64_t)n;
        }
        c->epos = c->elen = 0;
        if (c->eof) {
            s_close(c);
            return -1;
        }
    }
    if (c->mode == M_SOURCE && !c->eof) {
        for (int turn = 0; turn < 4; turn++) { /* bounded: let other connections run */
            ssize_t n = send(c->fd, pat_at(c->out), CHUNK, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) return 0;
                if (errno == EPIPE || errno == ECONNRESET) { /* client went away */
                    s_close(c);
                    return -1;
                }
                return s_error(c);
            }
            c->out += (uint64_t)n;
            st->bytes_out += (uint64_t)n;
        }
    }
    return 0;
}

static uint32_t s_events(struct sconn *c) {
    if (c->greet_left) return EPOLLOUT;
    if (c->mode == M_ECHO && c->elen) return EPOLLOUT;
    if (c->mode == M_SOURCE && !c->eof) return EPOLLIN | EPOLLOUT;
    return EPOLLIN;
}

/* Stream bytes after the hello. Returns -1 if the connection was closed. */
static int s_stream(struct sconn *c, const unsigned char *data, size_t n) {
    struct mstats *st = &STATS[c->mode];
    if (c->mode == M_SINK || c->mode == M_ECHO) {
        if (memcmp(data, pat_at(c->in), n) != 0) st->corrupt++;
    }
    c->in += n;
    st->bytes_in += n;
    if (c->mode == M_ECHO) {
        if (!c->ebuf) c->ebuf = malloc(CHUNK);
        memcpy(c->ebuf, data, n); /* only called when nothing is pending */
        c->epos = 0;
        c->elen = n;
        if (s_flush(c) < 0) return -1;
    }
    return 0;
}

static void s_readable(struct sconn *c) {
    for (int turn = 0; turn < 8; turn++) {
        if (c->mode == M_ECHO && c->elen) break; /* backpressure: wait for the socket */
        ssize_t n;
        if (!c->hello_done) {
            n = recv(c->fd, c->hbuf + c->hlen, MAX_HELLO - c->hlen, 0);
        } else {
            size_t room = c->mode == M_ECHO ? CHUNK : sizeof RBUF;
            n = recv(c->fd, RBUF, room, 0);
        }
        if (n < 0) {
            if (errno == EAGAIN) break;
            if (errno == ECONNRESET && c->hello_done) {
                s_close(c);
                return;
            }
            s_error(c);
            return;
        }
        if (n == 0) {
            if (!c->hello_done) {
                s_error(c);
                return;
            }
            c->eof = 1;
            if (c->mode == M_ECHO && c->elen) break; /* close once the rest is echoed */
            s_close(c);
            return;
        }
        if (!c->hello_done) {
            c->hlen += (size_t)n;
            long hl = hello_length(c->hbuf, c->hlen);
            if (hl < 0 || (hl == 0 && c->hlen == MAX_HELLO)) {
                STATS[c->mode].hello_bad++;
                s_error(c);
                return;
            }
            if (hl == 0) continue;
            int ok = n_hellos == 0;
            for (int h = 0; h < n_hellos && !ok; h++)
                ok = HELLO_LEN[h] == (size_t)hl && memcmp(HELLO[h], c->hbuf, (size_t)hl) == 0;
            STATS[c->mode].hello_ok += ok;
            STATS[c->mode].hello_bad += !ok;
            c->hello_done = 1;
            c->greet_left = c->mode == M_SOURCE ? 0 : g_reply;
            size_t extra = c->hlen - (size_t)hl;
            if (extra) {
                memcpy(RBUF, c->hbuf + hl, extra);
            }
            free(c->hbuf);
            c->hbuf = NULL;
            if (s_flush(c) < 0) return;
            if (extra && s_stream(c, RBUF, extra) < 0) return;
            continue;
        }
        if (s_stream(c, RBUF, (size_t)n) < 0) return;
    }
    s_want(c, s_events(c));
}

static int listen_on(int *port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)*port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 4096) < 0) die("listen");
    socklen_t al = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &al);
    *port = ntohs(a.sin_port);
    return fd;
}

#define TAG_LISTEN (1ull << 40)
#define TAG_STDIN (1ull << 41)

static int serve_main(int argc, char **argv) {
    int modes[M_COUNT], nmodes = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--reply-size") && i + 1 < argc) {
            g_reply = (size_t)atol(argv[++i]);
            if (g_reply < 1 || g_reply > CHUNK) g_reply = 128;
        } else if (!strcmp(argv[i], "--hello") && i + 1 < argc) {
            load_hello(argv[++i]);
        } else {
            int m = -1;
            for (int k = 0; k < M_COUNT; k++)
                if (!strcmp(argv[i], MODE_NAMES[k])) m = k;
            if (m < 0 || nmodes == M_COUNT) {
                fprintf(stderr, "loadgen serve: unknown mode %s\n", argv[i]);
                return 2;
            }
            modes[nmodes++] = m;
        }
    }
    if (!nmodes) {
        fprintf(stderr, "loadgen serve: no mode given\n");
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    sconn_cap = (int)(rl.rlim_cur > 1 << 20 ? 1 << 20 : rl.rlim_cur) + 16;
    SCONN = calloc((size_t)sconn_cap, sizeof *SCONN);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    int lfd[M_COUNT];
    printf("ports");
    for (int i = 0; i < nmodes; i++) {
        int port = 0;
        lfd[i] = listen_on(&port);
        ep_set(lfd[i], EPOLLIN, TAG_LISTEN | (uint64_t)i, EPOLL_CTL_ADD);
        printf(" %s=%d", MODE_NAMES[modes[i]], port);
    }
    printf("\n");
    fflush(stdout);
    ep_set(0, EPOLLIN, TAG_STDIN, EPOLL_CTL_ADD);
    struct epoll_event evs[MAX_EVENTS];
    double cpu0 = cpu_s();
    int running = 1;
    while (running) {
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, 1000);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int e = 0; e < n; e++) {
            uint64_t d = evs[e].data.u64;
            if (d & TAG_STDIN) {
                char b[256];
                ssize_t r = read(0, b, sizeof b);
                if (r <= 0) running = 0;
                continue;
            }
            if (d & TAG_LISTEN) {
                int i = (int)(d & 0xff);
                for (int k = 0; k < 64; k++) {
                    int fd = accept4(lfd[i], NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (fd < 0) {
                        if (errno != EAGAIN && errno != ECONNABORTED) STATS[modes[i]].errors++;
                        break;
                    }
                    if (fd >= sconn_cap) {
                        STATS[modes[i]].errors++;
                        close(fd);
                        continue;
                    }
                    struct sconn *c = calloc(1, sizeof *c);
                    c->fd = fd;
                    c->mode = modes[i];
                    c->hbuf = malloc(MAX_HELLO);
                    c->events = EPOLLIN;
                    SCONN[fd] = c;
                    STATS[c->mode].accepted++;
                    ep_set(fd, EPOLLIN, (uint64_t)fd, EPOLL_CTL_ADD);
                }
                continue;
            }
            struct sconn *c = SCONN[(int)d];
            if (!c) continue;
            uint32_t ev = evs[e].events;
            if (ev & EPOLLOUT) {
                if (s_flush(c) < 0) continue;
                c = SCONN[(int)d];
                if (!c) continue;
                s_want(c, s_events(c));
            }
            if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) s_readable(c);
        }
    }
    printf("stats {\"cpu_s\":%.6f", cpu_s() - cpu0);
    for (int i = 0; i < nmodes; i++) {
        struct mstats *s = &STATS[modes[i]];
        printf(",\"%s\":{\"accepted\":%llu,\"closed\":%llu,\"hello_ok\":%llu,\"hello_bad\":%llu,"
               "\"bytes_in\":%llu,\"bytes_out\":%llu,\"corrupt\":%llu,\"errors\":%llu}",
               MODE_NAMES[modes[i]], (unsigned long long)s->accepted,
               (unsigned long long)s->closed, (unsigned long long)s->hello_ok,
               (unsigned long long)s->hello_bad, (unsigned long long)s->bytes_in,
               (unsigned long long)s->bytes_out, (unsigned long long)s->corrupt,
               (unsigned long long)s->errors);
    }
    printf("}\n");
    fflush(stdout);
    return 0;
}

/* --- the clients --- */

enum { C_FREE, C_CONNECTING, C_GREETING, C_RUNNING, C_DRAINING, C_HELD };

struct cconn {
    int fd, state, events, waiting; /* waiting: rr request outstanding */
    uint64_t t0;
    size_t hello_sent, greet;
    uint64_t tx, rx, rr_got;
};

struct client {
    const char *mode;
    int port, conc, size;
    double duration;
    long count;
    int dir_up, dir_down;
    struct cconn *conns;
    struct sockaddr_in addr;
    int open, window_open, window_done;
    uint64_t t_start, t_end;
    double cpu_start, cpu_end;
    long started, completed, completed_window, held;
    uint64_t tx_total, rx_total, tx_window, rx_window;
    uint64_t errors, corrupt, e_connect, e_reset, e_short, e_other;
    int first_errno;
};

static struct client C;

static void c_error(struct cconn *c, int kind, int err) {
    C.errors++;
    if (kind == 0) C.e_connect++;
    else if (kind == 1) C.e_reset++;
    else if (kind == 2) C.e_short++;
    else C.e_other++;
    if (!C.first_errno && err) C.first_errno = err;
    close(c->fd);
    c->fd = -1;
    c->state = C_FREE;
    C.open--;
}

static void c_want(struct cconn *c, int idx, uint32_t events) {
    if (c->events != (int)events) {
        ep_set(c->fd, events, (uint64_t)idx, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD);
        c->events = (int)events;
    }
}

static void window_start(void) {
    C.window_open = 1;
    C.t_start = now_ns();
    C.cpu_start = cpu_s();
    printf("start\n");
    fflush(stdout);
}

static void window_end(void) {
    C.window_open = 0;
    C.window_done = 1;
    C.t_end = now_ns();
    C.cpu_end = cpu_s();
    printf("end\n");
    fflush(stdout);
}

/* Send what remains of the hello; 1 when it is all sent, 0 if the socket is full, -1 on error. */
static int c_send_hello(struct cconn *c, int idx) {
    const unsigned char *h = HELLO[0];
    size_t len = HELLO_LEN[0];
    while (c->hello_sent < len) {
        ssize_t n = send(c->fd, h + c->hello_sent, len - c->hello_sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) {
                c_want(c, idx, EPOLLOUT);
                return 0;
            }
            c_error(c, errno == ECONNREFUSED ? 0 : 1, errno);
            return -1;
        }
        c->hello_sent += (size_t)n;
    }
    c->state = C_GREETING;
    c_want(c, idx, EPOLLIN);
    return 1;
}

static void c_start(int idx) {
    struct cconn *c = &C.conns[idx];
    memset(c, 0, sizeof *c);
    C.started++;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        C.errors++;
        C.e_connect++;
        if (!C.first_errno) C.first_errno = errno;
        c->state = C_FREE;
        return;
    }
    if (strcmp(C.mode, "rate") != 0) {
        int one = 1; /* request/response latency; rate sends one write per connection */
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    C.open++;
    c->t0 = now_ns();
    c->state = C_CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&C.addr, sizeof C.addr) < 0 && errno != EINPROGRESS) {
        c_error(c, 0, errno);
        return;
    }
    /* On loopback the handshake usually completes inside connect(): try the hello right away
     * and only wait for writability if the socket is not connected yet. */
    c_send_hello(c, idx);
}

/* Verify and count received stream bytes. */
static int c_received(struct cconn *c, const unsigned char *buf, size_t n) {
    size_t pos = 0;
    if (c->greet < g_reply) {
        size_t g = n < g_reply - c->greet ? n : g_reply - c->greet;
        if (memcmp(buf, PAT + c->greet, g) != 0) C.corrupt++;
        c->greet += g;
        pos = g;
        /* a source backend's greeting is the start of its stream */
        if (C.dir_down && !C.dir_up) {
            c->rx += g;
            C.rx_total += g;
            if (C.window_open) C.rx_window += g;
        }
    }
    if (pos < n) {
        size_t m = n - pos;
        if (memcmp(buf + pos, pat_at(c->rx), m) != 0) C.corrupt++;
        c->rx += m;
        C.rx_total += m;
        if (C.window_open) C.rx_window += m;
    }
    return 0;
}

static void c_finish(struct cconn *c) {
    close(c->fd);
    c->fd = -1;
    c->state = C_FREE;
    C.open--;
}

static int rate_more(void) { return C.count ? C.started < C.count : C.window_open; }

/* rate: hello, greeting, EOF from the backend, close. */
static void rate_event(int idx, uint32_t ev) {
    struct cconn *c = &C.conns[idx];
    if (c->state == C_CONNECTING) {
        int r = c_send_hello(c, idx);
        if (r < 0) goto next;
        if (r == 0 || !(ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    }
    for (;;) {
        ssize_t n = recv(c->fd, RBUF, sizeof RBUF, 0);
        if (n > 0) {
            if (c->greet + (size_t)n > g_reply) {
                C.corrupt++;
                c_error(c, 2, 0);
                goto next;
            }
            c_received(c, RBUF, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EAGAIN) return;
        if (n < 0) {
            c_error(c, errno == ECONNREFUSED ? 0 : 1, errno);
            goto next;
        }
        if (c->greet != g_reply) {
            c_error(c, 2, 0);
            goto next;
        }
        uint64_t t = now_ns();
        hist_add(t - c->t0);
        C.completed++;
        if (C.window_open) C.completed_window++;
        C.rx_total += g_reply;
        c_finish(c);
        goto next;
    }
next:
    if (rate_more()) c_start(idx);
}

static void stream_send(struct cconn *c) {
    for (int turn = 0; turn < 4; turn++) {
        ssize_t n = send(c->fd, pat_at(c->tx), CHUNK / 4, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) return;
            c_error(c, 1, errno);
            return;
        }
        c->tx += (uint64_t)n;
        C.tx_total += (uint64_t)n;
        if (C.window_open) C.tx_window += (uint64_t)n;
    }
}

static void rr_request(struct cconn *c, int idx) {
    c->t0 = now_ns();
    c->rr_got = 0;
    ssize_t n = send(c->fd, pat_at(c->tx), (size_t)C.size, MSG_NOSIGNAL);
    if (n != C.size) { /* 64 bytes always fit an idle socket */
        c_error(c, 1, n < 0 ? errno : 0);
        return;
    }
    c->tx += (uint64_t)n;
    C.tx_total += (uint64_t)n;
    if (C.window_open) C.tx_window += (uint64_t)n;
    c->waiting = 1;
    (void)idx;
}

static void c_half_close(struct cconn *c, int idx) {
    shutdown(c->fd, SHUT_WR);
    c->state = C_DRAINING;
    c_want(c, idx, EPOLLIN);
}

static int echo_bulk(void) { return C.dir_up && C.dir_down && !strcmp(C.mode, "bulk"); }

static int all_greeted(void) {
    for (int i = 0; i < C.conc; i++)
        if (C.conns[i].state != C_RUNNING) return 0;
    return 1;
}

/* bulk, rr and idle connections: hello, greeting, then the mode's stream. */
static void stream_event(int idx, uint32_t ev) {
    struct cconn *c = &C.conns[idx];
    if (c->state == C_FREE) return;
    if (c->state == C_CONNECTING) {
        if (c_send_hello(c, idx) <= 0) return;
    }
    if ((ev & EPOLLOUT) && C.window_open && c->state == C_RUNNING && C.dir_up &&
        !strcmp(C.mode, "bulk")) {
        stream_send(c);
        if (c->state == C_FREE) return;
    }
    if (!(ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    for (int turn = 0; turn < 8; turn++) {
        ssize_t n = recv(c->fd, RBUF, sizeof RBUF, 0);
        if (n < 0) {
            if (errno == EAGAIN) return;
            c_error(c, 1, errno);
            return;
        }
        if (n == 0) {
            if (c->state == C_DRAINING) {
                c_finish(c);
            } else {
                c_error(c, 2, 0); /* the far end closed before we were done */
            }
            return;
        }
        int was_greeting = c->greet < g_reply;
        c_received(c, RBUF, (size_t)n);
        if (was_greeting && c->greet == g_reply) {
            if (!strcmp(C.mode, "idle")) {
                c->state = C_HELD;
                C.held++;
                continue;
            }
            c->state = C_RUNNING;
            if (!C.window_open && !C.window_done && all_greeted()) {
                window_start();
                for (int i = 0; i < C.conc; i++) {
                    struct cconn *o = &C.conns[i];
                    if (!strcmp(C.mode, "rr")) rr_request(o, i);
                    else if (C.dir_up) c_want(o, i, EPOLLIN | EPOLLOUT);
                }
            }
            continue;
        }
        if (echo_bulk() && c->waiting && c->state == C_RUNNING && c->rx >= c->tx) {
            c->waiting = 0;
            c_half_close(c, idx);
            continue;
        }
        if (!strcmp(C.mode, "rr") && c->state >= C_RUNNING && c->waiting) {
            c->rr_got += (uint64_t)n;
            if (c->rr_got >= (uint64_t)C.size) {
                if (c->rr_got > (uint64_t)C.size) C.corrupt++;
                uint64_t t = now_ns();
                hist_add(t - c->t0);
                c->waiting = 0;
                C.completed++;
                if (C.window_open) C.completed_window++;
                if (C.window_open) rr_request(c, idx);
                else if (c->state == C_RUNNING) c_half_close(c, idx);
                if (c->state == C_FREE) return;
            }
        }
    }
}

static long parse_port(const char *s) { return strtol(s, NULL, 10); }

static int client_main(const char *mode, int argc, char **argv) {
    memset(&C, 0, sizeof C);
    C.mode = mode;
    C.conc = 64;
    C.size = 64;
    C.duration = 0;
    double timeout = 0;
    const char *direction = "up";
    for (int i = 0; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--port")) C.port = (int)parse_port(v);
        else if (!strcmp(k, "--hello")) load_hello(v);
        else if (!strcmp(k, "--concurrency") || !strcmp(k, "--connections")) C.conc = atoi(v);
        else if (!strcmp(k, "--duration")) C.duration = atof(v);
        else if (!strcmp(k, "--count")) C.count = atol(v);
        else if (!strcmp(k, "--size")) C.size = atoi(v);
        else if (!strcmp(k, "--reply-size")) g_reply = (size_t)atol(v);
        else if (!strcmp(k, "--direction")) direction = v;
        else if (!strcmp(k, "--timeout")) timeout = atof(v);
        else {
            fprintf(stderr, "loadgen %s: unknown option %s\n", mode, k);
            return 2;
        }
    }
    if (!C.port || !n_hellos || C.conc < 1 || C.size < 1 || C.size > CHUNK) {
        fprintf(stderr, "loadgen %s: needs --port and --hello\n", mode);
        return 2;
    }
    C.dir_up = !strcmp(direction, "up") || !strcmp(direction, "both");
    C.dir_down = !strcmp(direction, "down") || !strcmp(direction, "both");
    if (!strcmp(mode, "rr")) C.dir_up = C.dir_down = 1;
    if (!strcmp(mode, "idle") || !strcmp(mode, "rate")) C.dir_up = C.dir_down = 0;
    if (!strcmp(mode, "idle")) {
        if (C.count < 1) C.count = 1;
    } else if (C.count == 0 && C.duration <= 0) {
        fprintf(stderr, "loadgen %s: needs --duration or --count\n", mode);
        return 2;
    }
    if (timeout <= 0) timeout = (C.duration > 0 ? C.duration : 60) + 30;
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(timeout + 1));
    signal(SIGPIPE, SIG_IGN);

    C.addr.sin_family = AF_INET;
    C.addr.sin_port = htons((uint16_t)C.port);
    C.addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int slots = !strcmp(mode, "idle") ? (int)C.count : C.conc;
    C.conns = calloc((size_t)slots, sizeof *C.conns);
    g_ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event evs[MAX_EVENTS];
    int is_rate = !strcmp(mode, "rate");
    int is_idle = !strcmp(mode, "idle");
    uint64_t deadline = now_ns() + (uint64_t)(timeout * 1e9);
    uint64_t drain_deadline = 0;

    if (is_rate) {
        window_start();
        for (int i = 0; i < C.conc && (!C.count || C.started < C.count); i++) c_start(i);
    } else if (is_idle) {
        window_start();
        while (C.started < C.count && C.open < C.conc) c_start((int)C.started);
    } else {
        for (int i = 0; i < C.conc; i++) c_start(i);
    }
    for (;;) {
        int n = epoll_wait(g_ep, evs, MAX_EVENTS, 5);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        uint64_t t = now_ns();
        if (t > deadline) {
            fprintf(stderr, "loadgen %s: deadline reached\n", mode);
            break;
        }
        for (int e = 0; e < n; e++) {
            int idx = (int)evs[e].data.u64;
            if (is_rate) rate_event(idx, evs[e].events);
            else stream_event(idx, evs[e].events);
        }
        t = now_ns();
        if (is_idle) {
            /* keep `conc` set-ups in flight until every connection is held or failed */
            while (C.started < C.count && C.open - C.held < C.conc) c_start((int)C.started);
            if (C.held + (long)C.errors >= C.count) break;
            continue;
        }
        if (is_rate) {
            if (C.count) {
                if (C.completed + (long)C.errors >= C.count) {
                    window_end();
                    break;
                }
            } else if (C.window_open && t >= C.t_start + (uint64_t)(C.duration * 1e9)) {
                window_end();
                drain_deadline = t + 10000000000ull;
            }
            /* slots whose connection failed outright start again */
            for (int i = 0; i < C.conc && C.open < C.conc && rate_more(); i++)
                if (C.conns[i].state == C_FREE) c_start(i);
            if (C.window_done && (C.open == 0 || t > drain_deadline)) break;
            continue;
        }
        if (!C.window_done && C.open < C.conc && !C.window_open) {
            fprintf(stderr, "loadgen %s: a connection failed during set-up\n", mode);
            break;
        }
        if (C.window_open && t >= C.t_start + (uint64_t)(C.duration * 1e9)) {
            window_end();
            drain_deadline = t + 10000000000ull;
            for (int i = 0; i < C.conc; i++) {
                struct cconn *o = &C.conns[i];
                if (o->state != C_RUNNING || o->waiting) continue;
                if (echo_bulk() && o->rx < o->tx) {
                    /* Half-close only once every byte came back: a proxy without half-close
                     * (sniproxy) would drop the echoes still in flight. */
                    o->waiting = 1;
                    c_want(o, i, EPOLLIN);
                } else {
                    c_half_close(o, i);
                }
            }
        }
        if (C.window_done && (C.open == 0 || t > drain_deadline)) break;
    }
    if (is_idle) {
        window_end();
        printf("held %ld\n", C.held);
        fflush(stdout);
        /* Hold until the harness has measured and closes our stdin (or the deadline). */
        char b[64];
        while (read(0, b, sizeof b) > 0) {
        }
        for (int i = 0; i < slots; i++) {
            struct cconn *o = &C.conns[i];
            if (o->state != C_FREE && o->fd >= 0) c_finish(o);
        }
    }
    if (!C.window_done) window_end();
    double window = C.t_start ? (double)(C.t_end - C.t_start) / 1e9 : 0.0;
    printf("result {\"mode\":\"%s\",\"window_s\":%.6f,\"cpu_s\":%.6f,\"connections\":%d,"
           "\"started\":%ld,\"completed\":%ld,\"completed_window\":%ld,\"held\":%ld,"
           "\"tx_total\":%llu,\"rx_total\":%llu,\"tx_window\":%llu,\"rx_window\":%llu,"
           "\"hello_bytes\":%zu,\"greeting_bytes\":%zu,\"unfinished\":%d,"
           "\"errors\":%llu,\"corrupt\":%llu,\"error_kinds\":{\"connect\":%llu,\"reset\":%llu,"
           "\"short\":%llu,\"other\":%llu},\"first_error\":\"%s\",",
           mode, window, C.cpu_end - C.cpu_start, C.conc, C.started, C.completed,
           C.completed_window, C.held, (unsigned long long)C.tx_total,
           (unsigned long long)C.rx_total, (unsigned long long)C.tx_window,
           (unsigned long long)C.rx_window, HELLO_LEN[0], g_reply, is_idle ? 0 : C.open,
           (unsigned long long)C.errors, (unsigned long long)C.corrupt,
           (unsigned long long)C.e_connect, (unsigned long long)C.e_reset,
           (unsigned long long)C.e_short, (unsigned long long)C.e_other,
           C.first_errno ? strerror(C.first_errno) : "");
    print_hist();
    printf("}\n");
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: loadgen serve|rate|bulk|rr|idle [options]\n");
        return 2;
    }
    pat_init();
    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *mode = argv[1];
    if (!strcmp(mode, "serve")) return serve_main(argc - 2, argv + 2);
    if (!strcmp(mode, "rate") || !strcmp(mode, "bulk") || !strcmp(mode, "rr") ||
        !strcmp(mode, "idle"))
        return client_main(mode, argc - 2, argv + 2);
    fprintf(stderr, "loadgen: unknown mode %s\n", mode);
    return 2;
}
