/* librelaycore.so: the tunnel mechanics of `pep relay --engine c`.
 *
 * What the core does (C): accept on the listeners, read and parse the
 * Convert header (preload/tlv.c), create and connect the onward socket
 * (onward TFO when allowed), send the Success reply (with the destination's
 * first bytes when the client sent early data: tunnel.c), move the bytes (copy
 * small transfers, splice large ones through pooled pipes), carry half-close
 * and resets, deliver what it holds before carrying a destination's reset
 * (FLUSHING), send Error replies with a clean close (the closer), and the
 * timers of all that (header, connect, linger, flush, stall).
 *
 * What stays in Python (pepsock/relay/core.py, server.py): every decision.
 * The core reports each new tunnel in a record; Python applies admission,
 * rate limits, the memory budget, the Cookie TLV check and the route rules,
 * then calls rc_connect() or rc_refuse().  Logging, stats rendering, signals,
 * drain, workers and the stats server are Python's too.
 *
 * The loop: rc_wait() blocks in the core's epoll set, where Python's own
 * set (signals, the stats server) is one fd (rc_set_external); or Python
 * polls the core's fd (rc_fd) and calls rc_step() when it is readable.
 *
 * Records: rc_step() handles what is ready and fills core->rec[0..n); they
 * stay valid (and so do the pointers in them) until the next rc_step() or
 * rc_abort_all().  rc_connect() may add records behind them (a destination
 * that answered inside connect()): rc_count() says how many there are now.
 * A tunnel id in a NEW / HEADER / CONNECT_FAILED record
 * waits for exactly one decision from Python before the next rc_step().
 *
 * This header is read by cffi (pepsock/relay/core.py): declarations below
 * the CFFI-BEGIN line must stay plain C (no macros, no includes).
 */
#ifndef RELAYCORE_H
#define RELAYCORE_H

#include <stdint.h>
#include <stddef.h>

/* CFFI-BEGIN */
enum rc_record_kind {
    RC_NEW = 1,            /* accepted; `hdr` says how far the header got */
    RC_HEADER = 2,         /* the header finished (or failed) after the accept */
    RC_CONNECTED = 3,      /* onward connect done, Success sent (or held, tunnel.c): data flows */
    RC_CONNECT_FAILED = 4, /* `err`: errno (ETIMEDOUT with timeout=1): refuse it */
    RC_ENDED = 5,          /* the tunnel is gone: `why`, bytes, duration */
    RC_ACCEPT_ERROR = 6,   /* accept() failed with `err`; the listener pauses */
    RC_REPLIED = 7,        /* a held reply went out (handshake done): `err` its code */
};

enum rc_header_state {
    RC_HDR_NONE = 0,    /* not complete yet: rc_wait_header() to keep reading */
    RC_HDR_CONNECT = 1, /* a Connect: dest_*, options, cookie are filled */
    RC_HDR_INFO = 2,    /* an Info request */
    RC_HDR_BAD = 3,     /* breaks the rules: `err` is the Error code to reply */
    RC_HDR_TIMEOUT = 4, /* no complete header within header_timeout */
    RC_HDR_GONE = 5,    /* NEW only: the client failed before a byte; already closed */
};

struct rc_record {
    int32_t kind;
    int32_t id;            /* the tunnel (index of a slot, reused after RC_ENDED) */
    int32_t hdr;           /* enum rc_header_state (NEW, HEADER) */
    int32_t err;           /* see the kinds */
    int32_t timeout;       /* RC_CONNECT_FAILED: the connect deadline passed */
    int32_t handshaking;   /* NEW: still in SYN_RECV */
    int32_t unverified;    /* NEW, HEADER, CONNECT_FAILED: the client's handshake is
                            * not complete (clients_unverified only) */
    uint32_t got;          /* NEW, HEADER: bytes read from the client so far */
    int32_t syn_data;      /* NEW: the SYN's data was acknowledged (0-RTT) */
    uint32_t syn_payload;  /* NEW: bytes the SYN carried, when known */
    int32_t family;        /* NEW: the client's address family */
    uint16_t client_port;
    uint16_t dest_port;
    uint8_t client_addr[16]; /* IPv4: the first 4 bytes */
    uint8_t dest_addr[16];   /* IPv6 or ::ffff:a.b.c.d (the Connect's) */
    uint32_t early;        /* bytes of early data read behind the header */
    uint32_t nkinds;       /* TCP option kinds the Connect asks for */
    uint8_t kinds[40];
    const uint8_t *cookie; /* the Cookie TLV's value, or NULL */
    uint32_t cookie_len;
    int32_t onward_syn_data; /* CONNECTED: the onward SYN carried early data */
    uint64_t up, down;     /* ENDED: bytes delivered each way */
    int64_t elapsed_ns;    /* CONNECTED: set-up time; ENDED: the tunnel's age */
    int32_t reset;         /* ENDED: 1 if it ended with a reset */
    int32_t expired;       /* ENDED: an unverified client never completed its handshake */
    char why[120];         /* ENDED: the outcome text */
};

struct rc_config {
    double header_timeout;
    double connect_limit;  /* onward connect deadline */
    double linger_timeout; /* an Error reply waits this long for the client's FIN */
    double stall_timeout;  /* 0: off */
    uint32_t pipe_size;
    uint32_t pipe_pool;
    uint32_t max_closers;
    int32_t server_rcvbuf, server_sndbuf; /* 0: kernel default */
    int32_t nodelay;
    int32_t keepalive;       /* seconds, 0: kernel timing */
    int32_t user_timeout_ms; /* 0: kernel default */
    int32_t syn_retries;      /* TCP_SYNCNT; -1: leave the kernel's */
    char server_cc[16];      /* "" : the default */
    int32_t clients_unverified;   /* the listeners may hand over clients still in SYN_RECV */
    double unverified_syn_window; /* an unverified client's onward SYN may wait this long */
    int32_t unverified_user_timeout_ms; /* its TCP_USER_TIMEOUT meanwhile */
};

struct rc_counters {
    uint64_t bytes_up, bytes_down;
    uint64_t resets;
    uint64_t onward_syn_data;
    uint64_t pipes_open;
    uint64_t closers;  /* Error replies lingering for the client's FIN */
    uint64_t tunnels;  /* tunnels alive (all states but closers) */
    uint64_t pipe_refused; /* F_SETPIPE_SZ refused: pipes are pipe_cap bytes */
    uint64_t pipe_cap;
    uint64_t held_replies; /* accept-time refusals waiting for a client's handshake */
    uint64_t replies_coalesced; /* Success replies sent with the destination's first bytes */
};

struct rc_connect {
    int32_t family;      /* AF_INET or AF_INET6 of the destination */
    uint8_t addr[16];    /* IPv4: the first 4 bytes */
    uint16_t port;
    uint32_t syn_room;   /* early-data bytes the onward SYN may carry (0: no TFO) */
    uint32_t pipe_limit; /* the most a pipe may hold for this tunnel */
    int32_t hold;        /* unverified: connect only once the client is verified */
    int32_t server_rcvbuf, server_sndbuf; /* 0: the config's */
};

struct rc_core;

struct rc_core *rc_new(const struct rc_config *cfg, struct rc_record **records);
void rc_free(struct rc_core *core);
int rc_fd(const struct rc_core *core);
int rc_add_listener(struct rc_core *core, int fd);
void rc_stop_accepting(struct rc_core *core);
int rc_step(struct rc_core *core);
int rc_wait(struct rc_core *core, int timeout_ms, int *external);
int rc_set_external(struct rc_core *core, int fd);
double rc_next_deadline(const struct rc_core *core);
int rc_count(const struct rc_core *core);
const struct rc_counters *rc_counters(const struct rc_core *core);
uint64_t rc_pipe_bytes(const struct rc_core *core);

int rc_wait_header(struct rc_core *core, int id);
int rc_client_buffers(struct rc_core *core, int id, int rcvbuf, int sndbuf);
int rc_connect(struct rc_core *core, int id, const struct rc_connect *c);
int rc_refuse(struct rc_core *core, int id, const uint8_t *reply, size_t len, int code,
              int tracked);
int rc_verified(struct rc_core *core, int id);
int rc_abort_all(struct rc_core *core, const char *why);
/* CFFI-END */

#endif
