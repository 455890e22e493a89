/* The PEPs of PEP_PROXY and what is known of them: see peers.h. */
#define _GNU_SOURCE
#include "peers.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "config.h"
#include "state.h"
#include "tlv.h"

/* Re-read a PEP's shared file at most this often (ns). */
#define REFRESH_NS 1000000000LL
/* A changed RTT is written at most this often per PEP and process (ns), as
 * pepsock.session does: a hint for the connect timeout, and rewriting the
 * file for each wobble of it cost more than the connect (loopback RTTs
 * swing by 2x from one connection to the next). */
#define RTT_REWRITE_NS 10000000000LL

struct health {
    struct sockaddr_in6 addr;   /* the address this was read for */
    long long read_at;          /* CLOCK_MONOTONIC ns; 0: never */
    long long rtt_written_at;   /* CLOCK_MONOTONIC ns this process last wrote rtt_us; 0: never */
    struct pep_peer_state st;
};

static struct health health[PEP_PEERS_MAX];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* A fork while another thread holds the lock (it does file I/O under it)
 * must not leave the child's copy locked. */
static void child_after_fork(void)
{
    pthread_mutex_init(&lock, NULL);
}

void pep_peers_atfork(void)
{
    pthread_atfork(NULL, NULL, child_after_fork);
}

static long long mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static long long unix_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return t.tv_sec;
}

static int same_addr(const struct sockaddr_in6 *a, const struct sockaddr_in6 *b)
{
    return !memcmp(a, b, sizeof *a);
}

/* PEP i's health, fresh enough; under the lock. */
static struct health *get(unsigned i, const struct sockaddr_in6 *addr)
{
    struct health *h = &health[i];
    long long now = mono_ns();
    if (!h->read_at || now - h->read_at > REFRESH_NS || !same_addr(&h->addr, addr)) {
        if (!same_addr(&h->addr, addr))
            h->rtt_written_at = 0;
        h->addr = *addr;
        pep_state_read(addr, &h->st);
        h->read_at = now;
    }
    return h;
}

int pep_peer_addr(unsigned i, int family, int v6only, struct sockaddr_in6 *out,
                  socklen_t *len, const char **why)
{
    const struct pep_addrs *pa = pep_config_resolve(i);
    memset(out, 0, sizeof *out);
    if (!pa) {
        *why = "its name does not resolve";
        return -1;
    }
    if (family == AF_INET) {
        if (!pa->have4) {
            *why = "IPv4 socket, but the PEP has no IPv4 address";
            return -1;
        }
        memcpy(out, &pa->v4, sizeof pa->v4);
        *len = sizeof pa->v4;
    } else if (pa->have6) {
        *out = pa->v6;
        *len = sizeof *out;
    } else {
        if (v6only) {
            *why = "IPV6_V6ONLY socket, but the PEP is IPv4 only";
            return -1;
        }
        out->sin6_family = AF_INET6;
        out->sin6_port = pa->v4.sin_port;
        pep_v4_mapped(out->sin6_addr.s6_addr, (const uint8_t *)&pa->v4.sin_addr);
        *len = sizeof *out;
    }
    return 0;
}

/* The shared state names a PEP by its plain address: v4-mapped as IPv4. */
static struct sockaddr_in6 key_of(const struct sockaddr_in6 *a)
{
    struct sockaddr_in6 k;
    memset(&k, 0, sizeof k);
    if (a->sin6_family == AF_INET) {
        memcpy(&k, a, sizeof(struct sockaddr_in));
    } else if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
        struct sockaddr_in *k4 = (struct sockaddr_in *)&k;
        k4->sin_family = AF_INET;
        k4->sin_port = a->sin6_port;
        memcpy(&k4->sin_addr, a->sin6_addr.s6_addr + 12, 4);
    } else {
        k.sin6_family = AF_INET6;
        k.sin6_port = a->sin6_port;
        k.sin6_addr = a->sin6_addr;
    }
    return k;
}

int pep_peer_held_down(unsigned i, const struct sockaddr_in6 *addr)
{
    struct sockaddr_in6 k = key_of(addr);
    pthread_mutex_lock(&lock);
    int down = get(i, &k)->st.down_until > unix_s();
    pthread_mutex_unlock(&lock);
    return down;
}

static const char *reason_words[] = {"refused", "timeout", "error64", "error65"};

void pep_peer_hold_down(unsigned i, const struct sockaddr_in6 *addr, enum pep_down_reason why,
                        unsigned seconds)
{
    struct sockaddr_in6 k = key_of(addr);
    char until[24];
    if (!seconds)
        seconds = PEP_HOLD_DOWN_S;
    long long t = unix_s() + seconds;
    snprintf(until, sizeof until, "%lld", t);
    pthread_mutex_lock(&lock);
    struct health *h = get(i, &k);
    h->st.down_until = t;
    snprintf(h->st.reason, sizeof h->st.reason, "%s", reason_words[why]);
    pthread_mutex_unlock(&lock);
    pep_state_write(&k, "down_until", until, "reason", reason_words[why], (char *)NULL);
}

long long pep_peer_connect_timeout_ns(unsigned i, const struct sockaddr_in6 *addr)
{
    if (pep_cfg.connect_timeout_ns)
        return pep_cfg.connect_timeout_ns;
    struct sockaddr_in6 k = key_of(addr);
    pthread_mutex_lock(&lock);
    long rtt = get(i, &k)->st.rtt_us;
    pthread_mutex_unlock(&lock);
    if (!rtt)
        return 3000000000LL;
    long long t = 4LL * rtt * 1000;
    return t < 1000000000LL ? 1000000000LL : t > 5000000000LL ? 5000000000LL : t;
}

void pep_peer_note_rtt(unsigned i, const struct sockaddr_in6 *addr, long rtt_us)
{
    struct sockaddr_in6 k = key_of(addr);
    if (rtt_us <= 0)
        return;
    pthread_mutex_lock(&lock);
    struct health *h = get(i, &k);
    long old = h->st.rtt_us;
    long long now = mono_ns();
    /* written when unknown, or off by more than 2x and not written by this
     * process in the last RTT_REWRITE_NS: a hint, not a log */
    int write = !old || ((rtt_us > 2 * old || 2 * rtt_us < old) &&
                         (!h->rtt_written_at || now - h->rtt_written_at > RTT_REWRITE_NS));
    if (write) {
        h->st.rtt_us = rtt_us;
        h->rtt_written_at = now;
    }
    pthread_mutex_unlock(&lock);
    if (write) {
        char v[24];
        snprintf(v, sizeof v, "%ld", rtt_us);
        pep_state_write(&k, "rtt_us", v, (char *)NULL);
    }
}

int pep_peer_use_nocookie(unsigned i, const struct sockaddr_in6 *addr)
{
    if (pep_cfg.tfo_mode == PEP_TFO_FORCE_NOCOOKIE)
        return 1;
    if (pep_cfg.tfo_mode == PEP_TFO_FORCE_COOKIE)
        return 0;
    struct sockaddr_in6 k = key_of(addr);
    pthread_mutex_lock(&lock);
    int tfo = get(i, &k)->st.tfo;
    pthread_mutex_unlock(&lock);
    return tfo != PEP_TFO_COOKIE;
}

void pep_peer_note_tfo(unsigned i, const struct sockaddr_in6 *addr, int used_nocookie,
                       int syn_data_acked)
{
    if (pep_cfg.tfo_mode != PEP_TFO_AUTO)
        return;
    int learned = syn_data_acked ? (used_nocookie ? PEP_TFO_NOCOOKIE : 0)
                                 : (used_nocookie ? PEP_TFO_COOKIE : 0);
    if (!learned)
        return; /* plain TFO: whether the kernel had a cookie says nothing new */
    struct sockaddr_in6 k = key_of(addr);
    pthread_mutex_lock(&lock);
    struct health *h = get(i, &k);
    int changed = h->st.tfo != learned;
    h->st.tfo = learned;
    pthread_mutex_unlock(&lock);
    if (changed)
        pep_state_write(&k, "tfo", learned == PEP_TFO_COOKIE ? "cookie" : "nocookie",
                        (char *)NULL);
}

size_t pep_peer_cookie(unsigned i, const struct sockaddr_in6 *addr, uint8_t *out, size_t cap)
{
    /* a stored cookie (from an Error 3) wins over PEP_COOKIE */
    struct sockaddr_in6 k = key_of(addr);
    pthread_mutex_lock(&lock);
    struct health *h = get(i, &k);
    size_t n = h->st.cookie_len <= cap ? h->st.cookie_len : 0;
    memcpy(out, h->st.cookie, n);
    pthread_mutex_unlock(&lock);
    if (!n && pep_cfg.cookie_len && pep_cfg.cookie_len <= cap) {
        memcpy(out, pep_cfg.cookie, pep_cfg.cookie_len);
        n = pep_cfg.cookie_len;
    }
    return n;
}

void pep_peer_store_cookie(unsigned i, const struct sockaddr_in6 *addr, const uint8_t *cookie,
                           size_t len)
{
    struct sockaddr_in6 k = key_of(addr);
    char hex[2 * PEP_COOKIE_MAX + 1];
    size_t j;
    if (len > PEP_COOKIE_MAX)
        return;
    for (j = 0; j < len; j++)
        snprintf(hex + 2 * j, 3, "%02x", cookie[j]);
    hex[2 * len] = 0; /* len 0: forget the stored cookie */
    pthread_mutex_lock(&lock);
    struct health *h = get(i, &k);
    memcpy(h->st.cookie, cookie, len);
    h->st.cookie_len = len;
    pthread_mutex_unlock(&lock);
    pep_state_write(&k, "cookie", len ? hex : NULL, (char *)NULL);
}
