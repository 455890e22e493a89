/* PEP_PROXY / PEP_NO_PROXY / PEP_LOG / PEP_DISABLE, by the rules of
 * docs/protocol.md ("PEP selection and bypass rules"). */
#define _GNU_SOURCE
#include "config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct pep_config pep_cfg;
__thread int pep_resolving;

static const uint8_t v4_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* ---- logging ------------------------------------------------------------ */

static const char *level_names[] = {"off", "error", "warn", "info", "debug"};

/* May this call site print now? How many lines it dropped before, in *dropped.
 * Races between threads only blur the count. */
static int log_allowed(struct pep_log_limit *lim, int level, unsigned *dropped)
{
    *dropped = 0;
    if (level >= PEP_LOG_DEBUG)
        return 1;
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    long long now = t.tv_sec;
    if (now - __atomic_load_n(&lim->window, __ATOMIC_RELAXED) >= PEP_LOG_WINDOW_S ||
        !__atomic_load_n(&lim->lines, __ATOMIC_RELAXED)) {
        __atomic_store_n(&lim->window, now, __ATOMIC_RELAXED);
        __atomic_store_n(&lim->lines, 0, __ATOMIC_RELAXED);
    }
    if (__atomic_add_fetch(&lim->lines, 1, __ATOMIC_RELAXED) > PEP_LOG_BURST) {
        __atomic_add_fetch(&lim->dropped, 1, __ATOMIC_RELAXED);
        return 0;
    }
    *dropped = __atomic_exchange_n(&lim->dropped, 0, __ATOMIC_RELAXED);
    return 1;
}

void pep_log_at(struct pep_log_limit *lim, int level, const char *fmt, ...)
{
    unsigned dropped;
    if (level > pep_cfg.level || !log_allowed(lim, level, &dropped))
        return;
    int saved = errno;
    char line[512];
    int n = snprintf(line, sizeof line, "libpep[%d] %s: ", (int)getpid(), level_names[level]);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (m < 0)
        m = 0;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    if (dropped) {
        int k = snprintf(line + len, sizeof line - len - 1, " (%u similar lines suppressed)",
                         dropped);
        if (k > 0)
            len += (size_t)k;
    }
    if (len > sizeof line - 2)
        len = sizeof line - 2;
    line[len++] = '\n';
    /* Raw syscalls: no hook of ours in the way, and no fd left open. */
    long fd = 2;
    if (pep_cfg.logpath[0])
        fd = syscall(SYS_openat, AT_FDCWD, pep_cfg.logpath,
                     O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd >= 0) {
        if (syscall(SYS_write, fd, line, len) < 0) {
            /* nothing useful to do */
        }
        if (fd != 2)
            syscall(SYS_close, fd);
    }
    errno = saved;
}

/* ---- parsing helpers ---------------------------------------------------- */

static int parse_port(const char *s, size_t n, uint16_t *port)
{
    unsigned long v = 0;
    size_t i;

    if (n == 0)
        return -1;
    for (i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (unsigned long)(s[i] - '0');
        if (v > 65535)
            return -1;
    }
    if (v == 0 || v > 65535)
        return -1;
    *port = (uint16_t)v;
    return 0;
}

/* "443" or "1000-2000" (pepsock/policy.py allows ranges too); "" is any port */
static int parse_ports(const char *s, size_t n, uint16_t *lo, uint16_t *hi)
{
    const char *dash = memchr(s, '-', n);
    if (n == 0) {
        *lo = *hi = 0;
        return 0;
    }
    if (!dash) {
        if (parse_port(s, n, lo))
            return -1;
        *hi = *lo;
        return 0;
    }
    if (parse_port(s, (size_t)(dash - s), lo) ||
        parse_port(dash + 1, n - (size_t)(dash - s) - 1, hi) || *lo > *hi)
        return -1;
    return 0;
}

/* Same rule as pepsock/policy.py: letters, digits, '-', '.', '_'. */
static int valid_name(const char *s, size_t n)
{
    size_t i;

    if (n == 0 || n > 253)
        return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!(isalnum(c) || c == '-' || c == '.' || c == '_'))
            return 0;
    }
    return 1;
}

/* An IP literal of n chars into 16 bytes (IPv4 mapped); 4 or 6, or 0. */
static int parse_ip(const char *s, size_t n, uint8_t out[16])
{
    char tmp[64];
    uint8_t v4[4];

    if (n == 0 || n >= sizeof tmp)
        return 0;
    memcpy(tmp, s, n);
    tmp[n] = 0;
    if (inet_pton(AF_INET, tmp, v4) == 1) {
        memcpy(out, v4_prefix, 12);
        memcpy(out + 12, v4, 4);
        return 4;
    }
    if (inet_pton(AF_INET6, tmp, out) == 1) {
        if (memcmp(out, v4_prefix, 12) == 0)
            return 4;
        return 6;
    }
    return 0;
}

static void mask(uint8_t a[16], unsigned plen)
{
    unsigned i;
    for (i = 0; i < 16; i++) {
        unsigned bits = plen > i * 8 ? plen - i * 8 : 0;
        if (bits >= 8)
            continue;
        a[i] &= (uint8_t)(0xff00u >> bits);
    }
}

/* address or CIDR, no port */
static int parse_net(const char *s, size_t n, struct pep_net *net)
{
    const char *slash = memchr(s, '/', n);
    size_t alen = slash ? (size_t)(slash - s) : n;
    int fam = parse_ip(s, alen, net->addr);
    unsigned long plen;

    if (!fam)
        return -1;
    net->fam = (uint8_t)fam;
    if (!slash) {
        net->plen = 128;
        return fam;
    }
    const char *p = slash + 1;
    size_t plen_len = n - alen - 1, i;
    if (plen_len == 0 || plen_len > 3)
        return -1;
    plen = 0;
    for (i = 0; i < plen_len; i++) {
        if (!isdigit((unsigned char)p[i]))
            return -1;
        plen = plen * 10 + (unsigned long)(p[i] - '0');
    }
    /* an IPv4 CIDR is written over 32 bits */
    if (fam == 4 && memchr(s, ':', alen) == NULL) {
        if (plen > 32)
            return -1;
        plen += 96;
    } else if (plen > 128) {
        return -1;
    } else if (fam == 4 && plen < 96) {
        net->fam = 6; /* ::ffff:0:0/80 and wider are IPv6 networks */
    }
    net->plen = (uint8_t)plen;
    mask(net->addr, (unsigned)plen);
    return fam;
}

static const struct pep_net default_nets[] = {
    {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 0}, 104, 4, 0, 0},   /* 127/8 */
    {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, 128, 6, 0, 0},           /* ::1 */
    {{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 169, 254, 0, 0}, 112, 4, 0, 0}, /* 169.254/16 */
    {{0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, 10, 6, 0, 0},      /* fe80::/10 */
};

static int add_net(struct pep_config *cfg, const struct pep_net *net)
{
    if (cfg->nnets >= PEP_NOPROXY_MAX)
        return -1;
    cfg->nets[cfg->nnets++] = *net;
    return 0;
}

static int parse_entry(struct pep_config *cfg, const char *s, size_t n)
{
    struct pep_net net;
    uint16_t lo = 0, hi = 0;
    const char *host = s;
    size_t hlen = n;
    char tmp[128];

    memset(&net, 0, sizeof net);
    if (n == 1 && s[0] == '*') {
        cfg->bypass_all = 1;
        return 0;
    }
    if (s[0] == '[') {
        const char *close = memchr(s, ']', n);
        if (!close)
            return -1;
        host = s + 1;
        hlen = (size_t)(close - host);
        const char *after = close + 1;
        size_t rest = n - (size_t)(after - s);
        if (rest && after[0] == '/') { /* [2001:db8::]/32:443 */
            const char *colon = memchr(after, ':', rest);
            size_t plen = colon ? (size_t)(colon - after) : rest;
            if (hlen + plen >= sizeof tmp)
                return -1;
            memcpy(tmp, host, hlen);
            memcpy(tmp + hlen, after, plen);
            host = tmp;
            hlen += plen;
            after += plen;
            rest -= plen;
        }
        if (rest) {
            if (after[0] != ':' || parse_ports(after + 1, rest - 1, &lo, &hi))
                return -1;
        }
        if (parse_net(host, hlen, &net) <= 0) {
            /* pepsock/policy.py takes "[name]:port" as the name */
            if (memchr(host, '/', hlen) || !valid_name(host, hlen))
                return -1;
            return 0;
        }
    } else {
        const char *colon = memchr(s, ':', n);
        if (colon && memchr(colon + 1, ':', n - (size_t)(colon - s) - 1)) {
            /* two colons or more: a bare IPv6 address or CIDR, no port */
            if (parse_net(s, n, &net) <= 0)
                return -1;
        } else {
            if (colon) {
                hlen = (size_t)(colon - s);
                if (parse_ports(colon + 1, n - hlen - 1, &lo, &hi))
                    return -1;
            }
            if (hlen == 0)
                return -1;
            if (parse_net(host, hlen, &net) <= 0) {
                size_t nl = hlen;
                while (nl && host[0] == '.') {
                    host++;
                    nl--;
                }
                while (nl && host[nl - 1] == '.')
                    nl--;
                if (memchr(host, '/', nl) || !valid_name(host, nl))
                    return -1;
                /* Names are for the Python client: libpep sees addresses,
                 * except localhost, which is loopback by definition. */
                if (nl == 9 && strncasecmp(host, "localhost", 9) == 0) {
                    struct pep_net loop = default_nets[0];
                    loop.port_lo = lo;
                    loop.port_hi = hi;
                    if (add_net(cfg, &loop))
                        return -1;
                    loop = default_nets[1];
                    loop.port_lo = lo;
                    loop.port_hi = hi;
                    return add_net(cfg, &loop);
                }
                return 0;
            }
        }
    }
    net.port_lo = lo;
    net.port_hi = hi;
    return add_net(cfg, &net);
}

/* The next entry of the comma-separated list at *p into [*a, *b), blanks
 * around it trimmed (it may be empty); *p moves past its comma. 0 when the
 * list is used up. */
static int next_list_entry(const char **p, const char **a, const char **b)
{
    if (!**p)
        return 0;
    const char *end = strchr(*p, ',');
    if (!end)
        end = *p + strlen(*p);
    *a = *p;
    *b = end;
    while (*a < *b && (**a == ' ' || **a == '\t'))
        (*a)++;
    while (*b > *a && ((*b)[-1] == ' ' || (*b)[-1] == '\t'))
        (*b)--;
    *p = *end ? end + 1 : end;
    return 1;
}

/* A list of destinations in PEP_NO_PROXY syntax into cfg's nets (or
 * bypass_all for *). */
static int parse_rule_list(struct pep_config *cfg, const char *list, const char *what, char *err,
                           size_t errlen)
{
    const char *p = list, *a, *b;
    while (next_list_entry(&p, &a, &b)) {
        if (b > a && parse_entry(cfg, a, (size_t)(b - a))) {
            snprintf(err, errlen,
                     "%s entry \"%.*s\" is not an address, CIDR, name or *, "
                     "with an optional :port (or too many entries, max %d)", what,
                     (int)(b - a > 100 ? 100 : b - a), a, PEP_NOPROXY_MAX);
            return -1;
        }
        if (cfg->bypass_all)
            break; /* as pepsock/policy.py: nothing after * matters */
    }
    return 0;
}

static int parse_proxy(struct pep_peer *peer, const char *s, size_t n)
{
    const char *host, *portp;
    size_t hlen;
    uint8_t a[16];

    if (s[0] == '[') {
        const char *close = memchr(s, ']', n);
        if (!close || (size_t)(close - s) + 1 >= n || close[1] != ':')
            return -1;
        host = s + 1;
        hlen = (size_t)(close - host);
        portp = close + 2;
        if (parse_ip(host, hlen, a) != 6 && !(parse_ip(host, hlen, a) && memchr(host, ':', hlen)))
            return -1;
    } else {
        const char *colon = memrchr(s, ':', n);
        if (!colon || memchr(s, ':', (size_t)(colon - s)))
            return -1;
        host = s;
        hlen = (size_t)(colon - s);
        portp = colon + 1;
        if (!parse_ip(host, hlen, a) && !valid_name(host, hlen))
            return -1;
    }
    if (parse_port(portp, n - (size_t)(portp - s), &peer->port))
        return -1;
    if (hlen >= sizeof peer->host)
        return -1;
    memcpy(peer->host, host, hlen);
    peer->host[hlen] = 0;
    return 0;
}

/* A comma-separated list of PEPs, blanks around entries ignored. */
static int parse_proxy_list(struct pep_config *cfg, const char *s)
{
    const char *p = s, *a, *b;
    cfg->npeers = 0;
    while (next_list_entry(&p, &a, &b)) {
        if (b == a || cfg->npeers == PEP_PEERS_MAX ||
            parse_proxy(&cfg->peers[cfg->npeers], a, (size_t)(b - a)))
            return -1;
        cfg->npeers++;
    }
    if (!cfg->npeers)
        return -1;
    memcpy(cfg->host, cfg->peers[0].host, sizeof cfg->host);
    cfg->port = cfg->peers[0].port;
    return 0;
}

static int parse_log(struct pep_config *cfg, const char *s)
{
    const char *colon = strchr(s, ':');
    size_t n = colon ? (size_t)(colon - s) : strlen(s);
    int i;

    for (i = 0; i <= PEP_LOG_DEBUG; i++) {
        if (strlen(level_names[i]) == n && strncasecmp(s, level_names[i], n) == 0)
            break;
    }
    if (i > PEP_LOG_DEBUG)
        return -1;
    cfg->level = i;
    if (colon) {
        if (!colon[1] || strlen(colon + 1) >= sizeof cfg->logpath)
            return -1;
        strcpy(cfg->logpath, colon + 1);
    }
    return 0;
}

int pep_config_parse(struct pep_config *cfg, const char *proxy, const char *noproxy,
                     const char *log, const char *disable, char *err, size_t errlen)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->level = PEP_LOG_ERROR;
    err[0] = 0;

    if (log && *log && parse_log(cfg, log)) {
        cfg->level = PEP_LOG_ERROR;
        cfg->logpath[0] = 0;
        snprintf(err, errlen,
                 "PEP_LOG=\"%.100s\" is not off, error, warn, info or debug (optionally "
                 "followed by :/path/to/file)", log);
        return -1;
    }
    if (disable && *disable && strcmp(disable, "0") != 0) {
        if (strcmp(disable, "1") != 0) {
            snprintf(err, errlen, "PEP_DISABLE=\"%.100s\" is not 0 or 1", disable);
            return -1;
        }
        return 0; /* disabled on purpose */
    }
    if (!proxy || !*proxy)
        return 0; /* no PEP: everything direct */
    if (parse_proxy_list(cfg, proxy)) {
        snprintf(err, errlen,
                 "PEP_PROXY=\"%.100s\" is not host:port or [v6addr]:port (or a comma-separated "
                 "list of at most %d of them)", proxy, PEP_PEERS_MAX);
        return -1;
    }
    if (!noproxy) {
        unsigned i;
        for (i = 0; i < sizeof default_nets / sizeof default_nets[0]; i++)
            add_net(cfg, &default_nets[i]);
    } else if (parse_rule_list(cfg, noproxy, "PEP_NO_PROXY", err, errlen)) {
        return -1;
    }
    cfg->enabled = 1;
    return 0;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

size_t pep_hex_decode(const char *s, size_t n, uint8_t *out, size_t cap)
{
    size_t i;
    if (n % 2 || n / 2 > cap)
        return 0;
    for (i = 0; i < n / 2; i++) {
        int h = hexval((unsigned char)s[2 * i]), l = hexval((unsigned char)s[2 * i + 1]);
        if (h < 0 || l < 0)
            return 0;
        out[i] = (uint8_t)(h << 4 | l);
    }
    return n / 2;
}

/* The shared grammar (docs/protocol.md "Environment values"): a number of
 * seconds is plain decimal, digits with an optional fraction (no sign,
 * exponent, hex, underscores or blanks), 0 < t <= 86400, compared exactly
 * on the text (as pepsock/route.py does with Decimal). Into nanoseconds
 * (digits past the ninth decimal truncated, at least 1 ns); -1 if not. */
static long long parse_seconds(const char *s)
{
    const char *p = s;
    while (*p == '0')
        p++; /* leading zeros do not count against the bound */
    const char *int_start = p;
    while (*p >= '0' && *p <= '9')
        p++;
    size_t int_len = (size_t)(p - int_start);
    if (p == s) /* no digit before the point (".5", "", "x") */
        return -1;
    const char *frac = NULL;
    if (*p == '.') {
        frac = ++p;
        while (*p >= '0' && *p <= '9')
            p++;
        if (p == frac) /* "5." */
            return -1;
    }
    if (*p)
        return -1;
    if (int_len > 5)
        return -1;
    long long whole = 0, ns = 0, scale = 100000000;
    int nonzero_frac = 0;
    for (const char *q = int_start; q < int_start + int_len; q++)
        whole = whole * 10 + (*q - '0');
    for (const char *q = frac; q && *q; q++) {
        if (*q != '0')
            nonzero_frac = 1;
        if (scale) {
            ns += (*q - '0') * scale;
            scale /= 10;
        }
    }
    if (whole > 86400 || (whole == 86400 && nonzero_frac) || (whole == 0 && !nonzero_frac))
        return -1;
    ns += whole * 1000000000LL;
    return ns > 0 ? ns : 1;
}

/* Leading or trailing blanks: an error of their own in every value. */
static int has_blanks_around(const char *s)
{
    size_t n = strlen(s);
    return n && (isspace((unsigned char)s[0]) || isspace((unsigned char)s[n - 1]));
}

/* "<VAR>=\"value\" has blanks around it" or "<VAR>=\"value\" is not <what>" */
static void value_error(char *err, size_t errlen, const char *var, const char *value,
                        const char *what)
{
    if (has_blanks_around(value))
        snprintf(err, errlen, "%s=\"%.100s\" has blanks around it (write %s, nothing else)",
                 var, value, what);
    else
        snprintf(err, errlen, "%s=\"%.100s\" is not %s", var, value, what);
}

static struct pep_config confirm_rules; /* PEP_CONFIRM: nets, or bypass_all for all */

int pep_config_parse_confirm(const char *confirm, char *err, size_t errlen)
{
    memset(&confirm_rules, 0, sizeof confirm_rules);
    if (!confirm || !*confirm || !strcmp(confirm, "0"))
        return 0;
    if (has_blanks_around(confirm)) {
        value_error(err, errlen, "PEP_CONFIRM", confirm,
                    "1 or a list of destinations in PEP_NO_PROXY syntax");
        return -1;
    }
    if (!strcmp(confirm, "1")) {
        confirm_rules.bypass_all = 1;
    } else if (parse_rule_list(&confirm_rules, confirm, "PEP_CONFIRM", err, errlen)) {
        memset(&confirm_rules, 0, sizeof confirm_rules);
        return -1;
    }
    confirm_rules.enabled = 1;
    return 0;
}

int pep_config_confirm(const uint8_t addr[16], uint16_t port)
{
    return confirm_rules.enabled && pep_config_bypass(&confirm_rules, NULL, addr, port);
}

int pep_config_parse_more(struct pep_config *cfg, const char *reply, const char *connect,
                          const char *fallback, const char *tfo_mode, const char *cookie,
                          char *err, size_t errlen)
{
    cfg->reply_timeout_ns = PEP_REPLY_TIMEOUT_DEFAULT_S * 1000000000LL;
    cfg->connect_timeout_ns = 0;
    cfg->fallback_fail = 0;
    cfg->tfo_mode = PEP_TFO_AUTO;
    cfg->cookie_len = 0;
    static const char seconds[] = "a number of seconds (plain decimal as 2 or 0.5, more than 0, "
                                  "at most 86400)";
    if (reply && *reply && (cfg->reply_timeout_ns = parse_seconds(reply)) < 0) {
        value_error(err, errlen, "PEP_REPLY_TIMEOUT", reply, seconds);
        return -1;
    }
    if (connect && *connect && (cfg->connect_timeout_ns = parse_seconds(connect)) < 0) {
        value_error(err, errlen, "PEP_CONNECT_TIMEOUT", connect, seconds);
        return -1;
    }
    if (fallback && *fallback) {
        if (!strcmp(fallback, "fail")) {
            cfg->fallback_fail = 1;
        } else if (strcmp(fallback, "direct")) {
            value_error(err, errlen, "PEP_FALLBACK", fallback, "direct or fail (lower case)");
            return -1;
        }
    }
    if (tfo_mode && *tfo_mode) {
        if (!strcmp(tfo_mode, "nocookie")) {
            cfg->tfo_mode = PEP_TFO_FORCE_NOCOOKIE;
        } else if (!strcmp(tfo_mode, "cookie")) {
            cfg->tfo_mode = PEP_TFO_FORCE_COOKIE;
        } else if (strcmp(tfo_mode, "auto")) {
            value_error(err, errlen, "PEP_TFO_MODE", tfo_mode,
                        "auto, nocookie or cookie (lower case)");
            return -1;
        }
    }
    if (cookie && *cookie &&
        !(cfg->cookie_len = pep_hex_decode(cookie, strlen(cookie), cfg->cookie,
                                           sizeof cfg->cookie))) {
        /* a token: its length is said, never its value */
        snprintf(err, errlen, "PEP_COOKIE (%zu characters, not shown) %s an even number of hex "
                 "digits (1 to %zu bytes)", strlen(cookie),
                 has_blanks_around(cookie) ? "has blanks around it; write only" : "is not",
                 sizeof cfg->cookie);
        return -1;
    }
    return 0;
}

int pep_config_parse_syn_write(struct pep_config *cfg, const char *v, char *err, size_t errlen)
{
    cfg->syn_write = 1;
    if (!v || !*v || !strcmp(v, "1"))
        return 0;
    if (!strcmp(v, "0")) {
        cfg->syn_write = 0;
        return 0;
    }
    value_error(err, errlen, "PEP_SYN_WRITE", v, "0 or 1");
    return -1;
}

long long pep_config_reply_timeout_ns(const struct pep_config *cfg)
{
    return cfg->reply_timeout_ns;
}

static pthread_mutex_t resolve_lock = PTHREAD_MUTEX_INITIALIZER;

static void resolve_lock_child(void)
{
    pthread_mutex_init(&resolve_lock, NULL);
}

void pep_config_load(void)
{
    char err[300];
    pthread_atfork(NULL, NULL, resolve_lock_child);
    if (pep_config_parse(&pep_cfg, getenv("PEP_PROXY"), getenv("PEP_NO_PROXY"),
                         getenv("PEP_LOG"), getenv("PEP_DISABLE"), err, sizeof err) ||
        pep_config_parse_more(&pep_cfg, getenv("PEP_REPLY_TIMEOUT"), getenv("PEP_CONNECT_TIMEOUT"),
                              getenv("PEP_FALLBACK"), getenv("PEP_TFO_MODE"), getenv("PEP_COOKIE"),
                              err, sizeof err) ||
        pep_config_parse_confirm(getenv("PEP_CONFIRM"), err, sizeof err) ||
        pep_config_parse_syn_write(&pep_cfg, getenv("PEP_SYN_WRITE"), err, sizeof err)) {
        confirm_rules.enabled = 0;
        /* The one line always goes out, and to stderr. */
        int level = pep_cfg.level;
        char path[sizeof pep_cfg.logpath];
        memcpy(path, pep_cfg.logpath, sizeof path);
        pep_cfg.enabled = 0;
        pep_cfg.level = PEP_LOG_ERROR;
        pep_cfg.logpath[0] = 0;
        pep_log(PEP_LOG_ERROR, "%s; running unproxied", err);
        pep_cfg.level = level;
        memcpy(pep_cfg.logpath, path, sizeof path);
        return;
    }
    pep_cfg.confirm_configured = pep_cfg.enabled && confirm_rules.enabled;
    if (pep_cfg.enabled)
        pep_log(PEP_LOG_DEBUG, "PEP %s port %u (%u in PEP_PROXY)", pep_cfg.host, pep_cfg.port,
                pep_cfg.npeers);
}

/* ---- resolution --------------------------------------------------------- */

static int resolved;
static struct pep_addrs addrs[PEP_PEERS_MAX];

static void resolve_one(const struct pep_peer *peer, struct pep_addrs *out)
{
    struct addrinfo hints, *res = NULL, *ai;
    char port[8];
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    snprintf(port, sizeof port, "%u", peer->port);
    pep_resolving++;
    int rc = getaddrinfo(peer->host, port, &hints, &res);
    pep_resolving--;
    if (rc != 0) {
        pep_log(PEP_LOG_ERROR, "PEP_PROXY host \"%s\" does not resolve (%s); not using it",
                peer->host, gai_strerror(rc));
        return;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET && !out->have4) {
            memcpy(&out->v4, ai->ai_addr, sizeof out->v4);
            out->have4 = 1;
        } else if (ai->ai_family == AF_INET6 && !out->have6) {
            memcpy(&out->v6, ai->ai_addr, sizeof out->v6);
            out->have6 = 1;
        }
    }
    freeaddrinfo(res);
    out->ok = out->have4 || out->have6;
}

const struct pep_addrs *pep_config_resolve(unsigned i)
{
    if (i >= pep_cfg.npeers)
        return NULL;
    if (!__atomic_load_n(&resolved, __ATOMIC_ACQUIRE)) {
        pthread_mutex_lock(&resolve_lock);
        if (!resolved) {
            int saved = errno;
            unsigned k;
            for (k = 0; k < pep_cfg.npeers; k++)
                resolve_one(&pep_cfg.peers[k], &addrs[k]);
            errno = saved;
            __atomic_store_n(&resolved, 1, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&resolve_lock);
    }
    return addrs[i].ok ? &addrs[i] : NULL;
}

int pep_config_is_any_pep(const uint8_t addr[16], uint16_t port)
{
    unsigned i;
    for (i = 0; i < pep_cfg.npeers; i++) {
        const struct pep_addrs *pa = pep_config_resolve(i);
        if (pa && port == pep_cfg.peers[i].port &&
            ((pa->have4 && memcmp(addr, v4_prefix, 12) == 0 &&
              memcmp(addr + 12, &pa->v4.sin_addr, 4) == 0) ||
             (pa->have6 && memcmp(addr, &pa->v6.sin6_addr, 16) == 0)))
            return 1;
    }
    return 0;
}

/* ---- matching ----------------------------------------------------------- */

static int in_net(const uint8_t a[16], const struct pep_net *net)
{
    unsigned full = net->plen / 8, rest = net->plen % 8;
    if (memcmp(a, net->addr, full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    uint8_t m = (uint8_t)(0xff00u >> rest);
    return (a[full] & m) == net->addr[full];
}

int pep_config_bypass(const struct pep_config *cfg, const struct pep_addrs *pa,
                      const uint8_t addr[16], uint16_t port)
{
    unsigned i;

    if (cfg->bypass_all)
        return 1;
    uint8_t fam = memcmp(addr, v4_prefix, 12) == 0 ? 4 : 6;
    for (i = 0; i < cfg->nnets; i++) {
        const struct pep_net *net = &cfg->nets[i];
        if (net->fam == fam && (net->port_lo == 0 || (port >= net->port_lo && port <= net->port_hi)) &&
            in_net(addr, net))
            return 1;
    }
    return pa && pep_config_is_pep(cfg, pa, addr, port);
}

int pep_config_is_pep(const struct pep_config *cfg, const struct pep_addrs *pa,
                      const uint8_t addr[16], uint16_t port)
{
    if (port != cfg->port)
        return 0;
    if (pa->have4 && memcmp(addr, v4_prefix, 12) == 0 &&
        memcmp(addr + 12, &pa->v4.sin_addr, 4) == 0)
        return 1;
    return pa->have6 && memcmp(addr, &pa->v6.sin6_addr, 16) == 0;
}
