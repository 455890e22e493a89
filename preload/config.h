/* libpep configuration: PEP_PROXY, PEP_NO_PROXY, PEP_LOG, PEP_DISABLE.
 * Read once at load (pep_config_load); the PEP's name, if it is one, is
 * resolved once, at the first connection that needs it. */
#ifndef PEP_CONFIG_H
#define PEP_CONFIG_H

#include <netinet/in.h>
#include <stdint.h>

enum pep_level { PEP_LOG_OFF, PEP_LOG_ERROR, PEP_LOG_WARN, PEP_LOG_INFO, PEP_LOG_DEBUG };

#define PEP_NOPROXY_MAX 64

struct pep_net {
    uint8_t addr[16]; /* IPv4 as ::ffff:a.b.c.d */
    uint8_t plen;     /* prefix length over the 128 bits */
    uint8_t fam;      /* 4 or 6: an IPv4 destination only matches IPv4 nets */
    uint16_t port_lo, port_hi; /* 0, 0: any port */
};

#define PEP_PEERS_MAX 8

struct pep_peer {
    char host[256];              /* as given */
    uint16_t port;               /* host order */
};

enum pep_tfo_mode { PEP_TFO_AUTO, PEP_TFO_FORCE_NOCOOKIE, PEP_TFO_FORCE_COOKIE };

struct pep_config {
    int enabled;                 /* a valid PEP_PROXY and nothing bad */
    int level;
    char logpath[256];           /* "" means stderr */
    char host[256];              /* the first PEP of PEP_PROXY, as given */
    uint16_t port;               /* its port, host order */
    int bypass_all;              /* PEP_NO_PROXY=* */
    unsigned nnets;
    struct pep_net nets[PEP_NOPROXY_MAX];
    unsigned npeers;             /* PEP_PROXY, in order (peers[0] is host, port) */
    struct pep_peer peers[PEP_PEERS_MAX];
    /* Read by pep_config_load() (pep_config_parse_more) */
    long long reply_timeout_ns;  /* PEP_REPLY_TIMEOUT: handshake done to reply complete */
    long long connect_timeout_ns; /* PEP_CONNECT_TIMEOUT; 0: adapted to the RTT */
    int fallback_fail;           /* PEP_FALLBACK=fail (default direct) */
    int tfo_mode;                /* PEP_TFO_MODE, enum pep_tfo_mode */
    uint8_t cookie[64];          /* PEP_COOKIE, decoded */
    size_t cookie_len;
    int confirm_configured;      /* PEP_CONFIRM names any destination */
    int syn_write;               /* PEP_SYN_WRITE (default 1): the first write rides the SYN */
};

#define PEP_REPLY_TIMEOUT_DEFAULT_S 10

extern struct pep_config pep_cfg;

/* A PEP's addresses, filled by pep_config_resolve(). */
struct pep_addrs {
    int ok;
    int have4, have6;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
};

/* Parse the environment into pep_cfg. A bad value prints one line on stderr
 * and leaves pep_cfg.enabled = 0. Never exits. */
void pep_config_load(void);
/* Parse from explicit strings (NULL = unset); for the tests. Returns 0 if all
 * good, -1 if a value was bad (message in err). */
int pep_config_parse(struct pep_config *cfg, const char *proxy, const char *noproxy,
                     const char *log, const char *disable, char *err, size_t errlen);
/* Nonzero while this thread is inside libpep's own name lookup of the PEP
 * (getaddrinfo): the connects the resolver makes go straight to the kernel,
 * never to the PEP being resolved. */
extern __thread int pep_resolving;

/* The variables of issue 10 and 9 (NULL = unset): PEP_REPLY_TIMEOUT,
 * PEP_CONNECT_TIMEOUT (seconds, float > 0), PEP_FALLBACK (direct|fail),
 * PEP_TFO_MODE (auto|nocookie|cookie), PEP_COOKIE (hex). 0 or -1 (err). */
int pep_config_parse_more(struct pep_config *cfg, const char *reply, const char *connect,
                          const char *fallback, const char *tfo_mode, const char *cookie,
                          char *err, size_t errlen);
/* cfg->reply_timeout_ns, for tests/test_preload_config.py (cffi sees cfg as bytes). */
long long pep_config_reply_timeout_ns(const struct pep_config *cfg);

/* PEP_CONFIRM (NULL = unset): "1" (every connection), "0" or empty (none),
 * or destinations in PEP_NO_PROXY syntax. 0 or -1 (err). */
int pep_config_parse_confirm(const char *confirm, char *err, size_t errlen);
/* PEP_SYN_WRITE: unset or "1": on; "0": off; anything else an error. */
int pep_config_parse_syn_write(struct pep_config *cfg, const char *v, char *err, size_t errlen);
/* Must a connect() to this destination wait for the PEP's verdict? */
int pep_config_confirm(const uint8_t addr[16], uint16_t port);

/* Hex into bytes; the number of bytes, 0 if not hex or too long. */
size_t pep_hex_decode(const char *s, size_t n, uint8_t *out, size_t cap);

/* Resolve PEP i of PEP_PROXY (all of them, once; thread-safe). NULL if it
 * cannot be resolved. */
const struct pep_addrs *pep_config_resolve(unsigned i);
/* Does a destination (16-byte address, IPv4 mapped; port host order) bypass
 * the PEP? The first PEP's own address counts when addrs is given. */
int pep_config_bypass(const struct pep_config *cfg, const struct pep_addrs *addrs,
                      const uint8_t addr[16], uint16_t port);
/* Is it that PEP itself (its address and port, as pepsock/client.py)? That
 * goes direct: the part of pep_config_bypass() that needs addrs. The port
 * is the first PEP's; pep_config_is_any_pep() checks every PEP. */
int pep_config_is_pep(const struct pep_config *cfg, const struct pep_addrs *addrs,
                      const uint8_t addr[16], uint16_t port);

int pep_config_is_any_pep(const uint8_t addr[16], uint16_t port);

/* Logging: one line, errno untouched, no fd kept open.
 *
 * Every call site is rate-limited on its own: at most PEP_LOG_BURST lines
 * per PEP_LOG_WINDOW_S seconds; the first line of a later window says how
 * many were suppressed. Debug lines (PEP_LOG=debug) are not limited. */
#define PEP_LOG_BURST 5
#define PEP_LOG_WINDOW_S 10
struct pep_log_limit {
    long long window;   /* CLOCK_MONOTONIC second the current window started */
    unsigned lines;     /* printed in this window */
    unsigned dropped;   /* suppressed since the last printed line */
};
void pep_log_at(struct pep_log_limit *lim, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define pep_log(level, ...)                                 \
    do {                                                    \
        static struct pep_log_limit pep_log_limit_;         \
        pep_log_at(&pep_log_limit_, (level), __VA_ARGS__);  \
    } while (0)

#endif
