/* A link emulator between two TUN devices: every packet read from one device
 * goes through that direction's emulated link (linkq.c: random loss, a queue,
 * a rate that follows a schedule, the propagation delay) and is written to the
 * other device when it is due -- mahimahi's link and delay shells in one
 * process, our code.
 *
 *   delayline TUN_A TUN_B DELAY_A_TO_B_US DELAY_B_TO_A_US [SLOTS]
 *
 * Creates both devices (IFF_TUN | IFF_NO_PI; they vanish when we exit), prints
 * "ready" on stdout.  Both directions start with no rate limit and a FIFO
 * without a limit: a pure delay line.  Then it reads commands on stdin, one a
 * line, and answers each with one line on stdout ("ok", "err <why>" or JSON):
 *
 *   set ab|ba key=value...    rate=<bit/s>|inf  qdisc=fifo|codel|fq_codel
 *                             limit=<bytes (fifo) | packets>  delay_us=  loss=<0..1>
 *                             seed=  target_us=  interval_us=  quantum=  overhead=<bytes>
 *   sched ab|ba T0_NS PERIOD_NS AT_NS:RATE...   a rate schedule from T0 (CLOCK_MONOTONIC)
 *   stats                      the counters of both directions, as JSON
 *
 * It runs until SIGTERM/SIGINT (or EOF on stdin is ignored: stdin may be
 * /dev/null) and prints the counters on stderr.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "linkq.h"

struct dir {
    const char *name;
    struct lq *q;
    int in_fd, out_fd;
    uint64_t write_errors, late_max_ns;
};

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int tun_open(const char *name)
{
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { perror("open /dev/net/tun"); exit(1); }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); exit(1); }
    return fd;
}

/* Read everything waiting on the direction's input (bounded per call so the other side is served). */
static void take(struct dir *d)
{
    uint8_t buf[LQ_SLOT];
    for (int i = 0; i < 256; i++) {
        ssize_t r = read(d->in_fd, buf, sizeof buf);
        if (r <= 0) return;            /* EAGAIN (or error): nothing more now */
        lq_push(d->q, now_ns(), buf, (size_t)r);
    }
}

/* Write every packet whose time has come. */
static void release(struct dir *d, uint64_t now)
{
    const uint8_t *data;
    size_t len;
    uint64_t t_in, due;
    while (lq_pop(d->q, now, &data, &len, &t_in, &due)) {
        uint64_t late = now - due;
        if (late > d->late_max_ns) d->late_max_ns = late;
        if (write(d->out_fd, data, len) < 0) d->write_errors++;
    }
}

static int stats_json(char *out, size_t cap, struct dir *dirs, int rt)
{
    size_t n = 0;
    n += (size_t)snprintf(out + n, cap - n, "{");
    for (int k = 0; k < 2; k++) {
        struct lq_stats s;
        lq_get_stats(dirs[k].q, &s);
        const char *p = dirs[k].name;
        n += (size_t)snprintf(out + n, cap - n,
            "\"%s_in\": %llu, \"%s_out\": %llu, \"%s_out_bytes\": %llu, \"%s_drops\": %llu, "
            "\"%s_drop_overflow\": %llu, \"%s_drop_codel\": %llu, \"%s_drop_loss\": %llu, "
            "\"%s_drop_nobuf\": %llu, \"%s_backlog_max_bytes\": %llu, \"%s_late_max_us\": %llu, ",
            p, (unsigned long long)s.in, p, (unsigned long long)s.out, p, (unsigned long long)s.out_bytes,
            /* "drops": what the line lost by itself (no room, write errors), as before queues existed */
            p, (unsigned long long)(s.drop_nobuf + dirs[k].write_errors),
            p, (unsigned long long)s.drop_overflow, p, (unsigned long long)s.drop_codel,
            p, (unsigned long long)s.drop_loss, p, (unsigned long long)s.drop_nobuf,
            p, (unsigned long long)s.backlog_max_bytes, p, (unsigned long long)(dirs[k].late_max_ns / 1000));
    }
    n += (size_t)snprintf(out + n, cap - n, "\"realtime\": %d}", rt);
    return (int)n;
}

static int parse_u64(const char *s, uint64_t *v)
{
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || end == s || *end) return -1;
    *v = x;
    return 0;
}

/* One command line; the answer goes to `reply`. */
static void command(char *line, struct dir *dirs, int rt, char *reply, size_t cap)
{
    char *save, *tok = strtok_r(line, " \t", &save);
    if (!tok) { snprintf(reply, cap, "err empty"); return; }
    if (!strcmp(tok, "stats")) { stats_json(reply, cap, dirs, rt); return; }
    int is_set = !strcmp(tok, "set"), is_sched = !strcmp(tok, "sched");
    if (!is_set && !is_sched) { snprintf(reply, cap, "err unknown command %s", tok); return; }
    char *dn = strtok_r(NULL, " \t", &save);
    struct dir *d = dn && !strcmp(dn, "ab") ? &dirs[0] : dn && !strcmp(dn, "ba") ? &dirs[1] : NULL;
    if (!d) { snprintf(reply, cap, "err direction must be ab or ba"); return; }
    uint64_t now = now_ns();
    if (is_sched) {
        uint64_t t0, period;
        char *a = strtok_r(NULL, " \t", &save), *b = strtok_r(NULL, " \t", &save);
        if (!a || !b || parse_u64(a, &t0) || parse_u64(b, &period)) {
            snprintf(reply, cap, "err sched T0_NS PERIOD_NS AT:RATE...");
            return;
        }
        size_t n = 0, cap_n = 64;
        uint64_t *at = malloc(cap_n * sizeof *at), *rate = malloc(cap_n * sizeof *rate);
        char *step;
        int bad = !at || !rate;
        while (!bad && (step = strtok_r(NULL, " \t", &save))) {
            char *colon = strchr(step, ':');
            if (!colon) { bad = 1; break; }
            *colon = 0;
            if (n == cap_n) {
                cap_n *= 2;
                uint64_t *a2 = realloc(at, cap_n * sizeof *at);
                if (a2) at = a2;
                uint64_t *r2 = realloc(rate, cap_n * sizeof *rate);
                if (r2) rate = r2;
                if (!a2 || !r2) { bad = 1; break; }
            }
            if (parse_u64(step, &at[n])) { bad = 1; break; }
            if (!strcmp(colon + 1, "inf")) rate[n] = LQ_RATE_INF;
            else if (parse_u64(colon + 1, &rate[n])) { bad = 1; break; }
            n++;
        }
        if (bad || lq_set_schedule(d->q, now, t0, period, n, at, rate))
            snprintf(reply, cap, "err bad schedule");
        else
            snprintf(reply, cap, "ok");
        free(at);
        free(rate);
        return;
    }
    /* set: collect first, so the qdisc and its limit change together */
    const char *qdisc = NULL;
    uint64_t limit = 0, v, seed = 1;
    int have_limit = 0, have_loss = 0;
    double loss = 0;
    char *kv;
    while ((kv = strtok_r(NULL, " \t", &save))) {
        char *eq = strchr(kv, '=');
        if (!eq) { snprintf(reply, cap, "err want key=value: %s", kv); return; }
        *eq = 0;
        const char *k = kv, *val = eq + 1;
        if (!strcmp(k, "qdisc")) { qdisc = val; continue; }
        if (!strcmp(k, "loss")) {
            char *end;
            loss = strtod(val, &end);
            if (end == val || *end || !(loss >= 0 && loss <= 1)) { snprintf(reply, cap, "err loss"); return; }
            have_loss = 1;
            continue;
        }
        if (!strcmp(k, "rate") && !strcmp(val, "inf")) { lq_set_rate(d->q, now, LQ_RATE_INF); continue; }
        if (parse_u64(val, &v)) { snprintf(reply, cap, "err %s: not a number", k); return; }
        if (!strcmp(k, "rate")) lq_set_rate(d->q, now, v);
        else if (!strcmp(k, "limit")) { limit = v; have_limit = 1; }
        else if (!strcmp(k, "delay_us")) lq_set_delay(d->q, v * 1000);
        else if (!strcmp(k, "seed")) seed = v;
        else if (!strcmp(k, "target_us")) lq_set_codel(d->q, v * 1000, 0);
        else if (!strcmp(k, "interval_us")) lq_set_codel(d->q, 0, v * 1000);
        else if (!strcmp(k, "quantum")) lq_set_quantum(d->q, (uint32_t)v);
        else if (!strcmp(k, "overhead")) lq_set_overhead(d->q, (uint32_t)v);
        else { snprintf(reply, cap, "err unknown key %s", k); return; }
    }
    if (have_loss) lq_set_loss(d->q, loss, seed);   /* the seed goes with a loss rate */
    if (qdisc || have_limit) {
        if (lq_set_qdisc(d->q, qdisc ? qdisc : lq_qdisc_name(d->q), limit)) {
            snprintf(reply, cap, "err unknown qdisc %s", qdisc);
            return;
        }
    }
    snprintf(reply, cap, "ok");
}

/* Complete lines from stdin; a partial line waits for the rest. */
static void control(int fd, struct dir *dirs, int rt, int *open_)
{
    static char buf[1 << 16];
    static size_t have;
    ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
    if (r <= 0) {
        if (r == 0 || (errno != EAGAIN && errno != EINTR)) *open_ = 0;
        return;
    }
    have += (size_t)r;
    char *start = buf, *nl;
    while ((nl = memchr(start, '\n', have - (size_t)(start - buf)))) {
        *nl = 0;
        char reply[4096];
        command(start, dirs, rt, reply, sizeof reply);
        printf("%s\n", reply);
        fflush(stdout);
        start = nl + 1;
    }
    have -= (size_t)(start - buf);
    memmove(buf, start, have);
    if (have == sizeof buf - 1) have = 0;   /* a line longer than the buffer: drop it */
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: %s TUN_A TUN_B DELAY_AB_US DELAY_BA_US [SLOTS]\n", argv[0]);
        return 2;
    }
    uint64_t d_ab = strtoull(argv[3], NULL, 10) * 1000ull;
    uint64_t d_ba = strtoull(argv[4], NULL, 10) * 1000ull;
    size_t slots = argc > 5 ? strtoul(argv[5], NULL, 10) : 16384;
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* the eval process died (even by SIGKILL): stop too */
    int fa = tun_open(argv[1]), fb = tun_open(argv[2]);
    struct dir dirs[2] = {{.name = "ab", .in_fd = fa, .out_fd = fb},
                          {.name = "ba", .in_fd = fb, .out_fd = fa}};
    for (int k = 0; k < 2; k++) {
        dirs[k].q = lq_new(slots);
        if (!dirs[k].q) { perror("lq_new"); return 1; }
    }
    lq_set_delay(dirs[0].q, d_ab);
    lq_set_delay(dirs[1].q, d_ba);
    /* TUN carries IP packets; the emulated links are Ethernet, and the kernel's TBF on a
     * veth counts the 14-byte header too: so does the line, for rates that compare */
    lq_set_overhead(dirs[0].q, 14);
    lq_set_overhead(dirs[1].q, 14);
    /* On a busy machine a normal-priority process can be descheduled for tens of
     * milliseconds, which would show up as delay spikes.  The loop sleeps in ppoll
     * between packets, so a real-time priority costs nothing when idle (and the
     * kernel's RT throttling still bounds it).  Best effort: without the
     * privilege we run as we are and the lateness counters tell. */
    struct sched_param sp = {.sched_priority = 20};
    int rt = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    mlockall(MCL_CURRENT | MCL_FUTURE);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    printf("ready\n");
    fflush(stdout);

    int ctl_open = 1;
    struct pollfd pfd[3] = {{.fd = fa, .events = POLLIN}, {.fd = fb, .events = POLLIN},
                            {.fd = 0, .events = POLLIN}};
    while (!stop) {
        uint64_t now = now_ns();
        release(&dirs[0], now);
        release(&dirs[1], now);
        uint64_t next = lq_next_event(dirs[0].q, now), nb = lq_next_event(dirs[1].q, now);
        if (nb < next) next = nb;
        struct timespec ts, *tsp = NULL;
        if (next != UINT64_MAX) {
            uint64_t wait = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull);
            ts.tv_nsec = (long)(wait % 1000000000ull);
            tsp = &ts;
        }
        pfd[2].fd = ctl_open ? 0 : -1;
        int r = ppoll(pfd, 3, tsp, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("ppoll");
            break;
        }
        if (pfd[0].revents & POLLIN) take(&dirs[0]);
        if (pfd[1].revents & POLLIN) take(&dirs[1]);
        if (pfd[2].revents & (POLLIN | POLLHUP | POLLERR)) control(0, dirs, rt, &ctl_open);
    }
    char out[4096];
    stats_json(out, sizeof out, dirs, rt);
    fprintf(stderr, "%s\n", out);
    return 0;
}
