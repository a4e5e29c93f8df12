/* Open-loop HTTP/1.1 load generator for the benchmarks (bench/loadgen.py builds and runs it).

   Sends canned requests on a fixed schedule (slot i at start + i/rate), whatever the answers
   do, over keep-alive connections (one request in flight per connection, a new connection
   when none is idle). Latency is counted from the *scheduled* time, so a stall of the server
   shows in the tail the way a user would feel it (no coordinated omission), as wrk2 does.
   Several kinds of request can share the schedule: each slot goes to the kind furthest
   behind its share (a fixed interleaving, the same every run).

   Written in C because the Python generator it replaced took ~110 us of CPU per request (a
   tenth of a core at 1,000 req/s) on the two cores it shares with what it measures, and its
   own pauses (GC, loop turns) landed in the latencies it reported.

   usage: openloop HOST PORT RATE SECONDS GRACE_S [SHARE MARK REQUEST_FILE]...
     MARK: a header to look for in each answer ("x-floodwall-degraded", or a name and value
           prefix "x-floodwall-cache: hit"; case-insensitive), or "-" for none.
   stdout: one line per answer, "<kind> <latency ns> <status> <marked 0|1>", then
           "elapsed_ns <n>". A slot without an answer (connection refused or closed, or no
           answer within GRACE_S of the last slot) has no line: the caller counts it failed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 8192
#define MAX_KINDS 16
#define BUF 65536

typedef struct {
    char *wire;
    size_t len;
    double share;
    long sent;
    char mark[256]; /* "\r\n" + lower-case header (and value prefix); empty: none */
} kind_t;

typedef struct {
    int fd;
    int busy;          /* a request is in flight */
    int connecting;    /* non-blocking connect not yet done */
    int kind;
    int64_t scheduled; /* ns, CLOCK_MONOTONIC */
    size_t got;        /* bytes of the answer so far */
    char buf[BUF + 1];
} conn_t;

typedef struct {
    int64_t lat;
    int status, kind, marked;
} answer_t;

static conn_t *conns[MAX_CONNS];
static int nconns;
static int idle[MAX_CONNS];
static int nidle;
static kind_t kinds[MAX_KINDS];
static int nkinds;
static struct sockaddr_in addr;
static int ep;
static answer_t *answers;
static long answered;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void drop(int i) {
    epoll_ctl(ep, EPOLL_CTL_DEL, conns[i]->fd, NULL);
    close(conns[i]->fd);
    conns[i]->fd = -1;
    conns[i]->busy = 0;
}

static void send_req(int i) {
    conn_t *c = conns[i];
    kind_t *k = &kinds[c->kind];
    /* a request this small fits an empty socket buffer; anything else is a failed slot */
    if (write(c->fd, k->wire, k->len) != (ssize_t)k->len) drop(i);
}

static int open_conn(void) {
    if (nconns == MAX_CONNS) return -1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    conn_t *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->connecting = 1;
    int i = nconns++;
    conns[i] = c;
    /* Level-triggered: one read of a complete answer is enough (no read to EAGAIN); the
       write interest is dropped once connected. Fewer syscalls per request. */
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return i;
}

static void fire(int kind, int64_t scheduled) {
    int i = -1;
    while (nidle > 0) {
        int j = idle[--nidle];
        if (conns[j]->fd >= 0) { i = j; break; }
    }
    if (i < 0 && (i = open_conn()) < 0) return; /* no line: a failed slot */
    conn_t *c = conns[i];
    c->busy = 1;
    c->got = 0;
    c->kind = kind;
    c->scheduled = scheduled;
    if (!c->connecting) send_req(i);
}

/* Length of the whole answer once its head is in, or 0 while it is incomplete. */
static size_t answer_len(conn_t *c, int *st, char **head_end) {
    char *end = memmem(c->buf, c->got, "\r\n\r\n", 4);
    if (!end) return 0;
    *head_end = end;
    size_t head = (size_t)(end - c->buf) + 4;
    *st = atoi(c->buf + 9);
    for (char *p = c->buf; p < end; p++) {
        if (*p != '\n') continue;
        if (strncasecmp(p + 1, "content-length:", 15) == 0)
            return head + strtoul(p + 16, NULL, 10);
        if (strncasecmp(p + 1, "transfer-encoding:", 18) == 0)
            /* chunked: done at the last chunk (small bodies only, enough here) */
            return memmem(end, c->got - (size_t)(end - c->buf), "\r\n0\r\n\r\n", 7) ? c->got : 0;
    }
    return head; /* no body (a 204 or 304) */
}

static void on_event(int i, uint32_t events) {
    conn_t *c = conns[i];
    if (c->fd < 0) return;
    if (c->connecting && (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) { drop(i); return; }
        c->connecting = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        if (c->busy) send_req(i);
        if (c->fd < 0) return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    ssize_t r = read(c->fd, c->buf + c->got, BUF - c->got);
    if (r < 0 && errno == EAGAIN) return;
    if (r <= 0 || c->got + (size_t)r == BUF) { drop(i); return; } /* closed, or too big */
    c->got += (size_t)r;
    if (!c->busy) return;
    int st = 0;
    char *head_end = NULL;
    size_t need = answer_len(c, &st, &head_end);
    if (need == 0 || c->got < need) return;
    answer_t *a = &answers[answered++];
    a->lat = now_ns() - c->scheduled;
    a->status = st;
    a->kind = c->kind;
    a->marked = 0;
    const char *mark = kinds[c->kind].mark;
    if (mark[0]) {
        *head_end = '\0'; /* the head only; the body is not needed any more */
        a->marked = strcasestr(c->buf, mark) != NULL;
    }
    c->busy = 0;
    c->got = 0;
    idle[nidle++] = i;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = malloc(BUF);
    *len = fread(buf, 1, BUF, f);
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc < 9 || (argc - 6) % 3 != 0 || (argc - 6) / 3 > MAX_KINDS) {
        fprintf(stderr, "usage: %s HOST PORT RATE SECONDS GRACE_S [SHARE MARK REQUEST_FILE]...\n",
                argv[0]);
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "openloop: HOST must be an IPv4 address\n");
        return 2;
    }
    double rate = atof(argv[3]), seconds = atof(argv[4]), grace = atof(argv[5]);
    long n = (long)(rate * seconds);
    if (rate <= 0 || n <= 0 || grace < 0) {
        fprintf(stderr, "openloop: bad RATE, SECONDS or GRACE_S\n");
        return 2;
    }
    double total = 0;
    for (int a = 6; a < argc; a += 3) {
        kind_t *k = &kinds[nkinds++];
        k->share = atof(argv[a]);
        k->wire = slurp(argv[a + 2], &k->len);
        if (k->share <= 0 || !k->wire || strlen(argv[a + 1]) > sizeof k->mark - 4) {
            fprintf(stderr, "openloop: bad SHARE, MARK or REQUEST_FILE %s\n", argv[a + 2]);
            return 2;
        }
        if (strcmp(argv[a + 1], "-") != 0) {
            snprintf(k->mark, sizeof k->mark, "\r\n%s%s", argv[a + 1],
                     strchr(argv[a + 1], ':') ? "" : ":");
        }
        total += k->share;
    }
    answers = calloc((size_t)n, sizeof *answers);
    ep = epoll_create1(0);

    int64_t start = now_ns() + 50000000LL, period = (int64_t)(1e9 / rate);
    int64_t deadline = start + (int64_t)((seconds + grace) * 1e9);
    long next = 0;
    struct epoll_event evs[256];
    for (;;) {
        int64_t t = now_ns();
        for (; next < n && start + next * period <= t; next++) {
            int best = 0;
            double behind = -1e300;
            for (int k = 0; k < nkinds; k++) {
                double b = kinds[k].share / total * (double)(next + 1) - (double)kinds[k].sent;
                if (b > behind) { behind = b; best = k; }
            }
            kinds[best].sent++;
            fire(best, start + next * period);
        }
        if (t > deadline) break;
        if (next == n) { /* all sent: done once nothing is in flight */
            int busy = 0;
            for (int i = 0; i < nconns && !busy; i++) busy = conns[i]->busy;
            if (!busy) break;
        }
        /* Sleep until the next slot or an answer, with nanosecond resolution. */
        int64_t wait = next < n ? start + next * period - t : 10000000LL;
        struct timespec ts = {.tv_sec = wait / 1000000000LL, .tv_nsec = wait % 1000000000LL};
        int k = epoll_pwait2(ep, evs, 256, &ts, NULL);
        for (int e = 0; e < k; e++) on_event((int)evs[e].data.u32, evs[e].events);
    }
    int64_t elapsed = now_ns() - start;
    for (long j = 0; j < answered; j++)
        printf("%d %lld %d %d\n", answers[j].kind, (long long)answers[j].lat, answers[j].status,
               answers[j].marked);
    printf("elapsed_ns %lld\n", (long long)elapsed);
    return 0;
}
