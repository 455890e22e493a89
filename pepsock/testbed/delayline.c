/* A delay line between two TUN devices: every packet read from one device is
 * written to the other at (arrival + D), in arrival order -- mahimahi's delay
 * queue idea (a FIFO of packets stamped with their release time), our code.
 *
 *   delayline TUN_A TUN_B DELAY_A_TO_B_US DELAY_B_TO_A_US [SLOTS]
 *
 * Creates both devices (IFF_TUN | IFF_NO_PI; they vanish when we exit), prints
 * "ready" on stdout, then runs until SIGTERM/SIGINT and prints one line of
 * counters on stderr: per direction packets in/out, drops (queue full or write
 * error) and the largest lateness of a release in microseconds.
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

#define SLOT 2048 /* bytes per packet slot; the links run at MTU 1500 */

struct fifo {
    uint8_t *buf;
    uint16_t *len;
    uint64_t *due;
    size_t cap, head, n;
    uint64_t in, out, drops, late_max_ns;
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

static void fifo_init(struct fifo *q, size_t cap)
{
    memset(q, 0, sizeof *q);
    q->cap = cap;
    q->buf = malloc(cap * SLOT);
    q->len = malloc(cap * sizeof *q->len);
    q->due = malloc(cap * sizeof *q->due);
    if (!q->buf || !q->len || !q->due) { perror("malloc"); exit(1); }
    memset(q->buf, 0, cap * SLOT); /* fault the pages in now, not mid-run */
}

/* Read everything waiting on fd (bounded per call so the other side is served). */
static void take(struct fifo *q, int fd, uint64_t delay_ns)
{
    for (int i = 0; i < 256; i++) {
        uint8_t scratch[SLOT];
        size_t tail = (q->head + q->n) % q->cap;
        uint8_t *dst = q->n < q->cap ? q->buf + tail * SLOT : scratch;
        ssize_t r = read(fd, dst, SLOT);
        if (r <= 0) return; /* EAGAIN (or error): nothing more now */
        uint64_t t = now_ns();
        q->in++;
        if (q->n == q->cap) { q->drops++; continue; }
        q->len[tail] = (uint16_t)r;
        q->due[tail] = t + delay_ns;
        q->n++;
    }
}

/* Write every packet whose time has come. */
static void release(struct fifo *q, int fd, uint64_t now)
{
    while (q->n && q->due[q->head] <= now) {
        uint64_t late = now - q->due[q->head];
        if (late > q->late_max_ns) q->late_max_ns = late;
        if (write(fd, q->buf + q->head * SLOT, q->len[q->head]) < 0) q->drops++;
        else q->out++;
        q->head = (q->head + 1) % q->cap;
        q->n--;
    }
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
    struct fifo ab, ba;
    fifo_init(&ab, slots);
    fifo_init(&ba, slots);
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
    printf("ready\n");
    fflush(stdout);

    struct pollfd pfd[2] = {{.fd = fa, .events = POLLIN}, {.fd = fb, .events = POLLIN}};
    while (!stop) {
        uint64_t now = now_ns();
        release(&ab, fb, now);
        release(&ba, fa, now);
        uint64_t next = UINT64_MAX;
        if (ab.n) next = ab.due[ab.head];
        if (ba.n && ba.due[ba.head] < next) next = ba.due[ba.head];
        struct timespec ts, *tsp = NULL;
        if (next != UINT64_MAX) {
            uint64_t wait = next > now ? next - now : 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull);
            ts.tv_nsec = (long)(wait % 1000000000ull);
            tsp = &ts;
        }
        int r = ppoll(pfd, 2, tsp, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("ppoll");
            break;
        }
        if (pfd[0].revents & POLLIN) take(&ab, fa, d_ab);
        if (pfd[1].revents & POLLIN) take(&ba, fb, d_ba);
    }
    fprintf(stderr,
            "{\"ab_in\": %llu, \"ab_out\": %llu, \"ab_drops\": %llu, \"ab_late_max_us\": %llu, "
            "\"ba_in\": %llu, \"ba_out\": %llu, \"ba_drops\": %llu, \"ba_late_max_us\": %llu, "
            "\"realtime\": %d}\n",
            (unsigned long long)ab.in, (unsigned long long)ab.out, (unsigned long long)ab.drops,
            (unsigned long long)(ab.late_max_ns / 1000), (unsigned long long)ba.in,
            (unsigned long long)ba.out, (unsigned long long)ba.drops,
            (unsigned long long)(ba.late_max_ns / 1000), rt);
    return 0;
}
