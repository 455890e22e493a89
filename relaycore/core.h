/* The core's internals, shared by loop.c (epoll, timers, slots, accept, the
 * API) and tunnel.c (the tunnel state machine and its data path). */
#ifndef RELAYCORE_CORE_H
#define RELAYCORE_CORE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "../preload/tlv.h"
#include "relaycore.h"

#define RC_API __attribute__((visibility("default")))

/* Bytes of a direction's copy buffer: transfers that fit are copied with
 * recv/send (two syscalls, no pipe); a read that fills it switches the
 * direction to splice for good. */
#define COPY_BUF 16384
/* Records one rc_step() may produce, with what rc_connect() adds: due
 * timers make at most a quarter, and EVENTS_PER_STEP events at most
 * ACCEPT_BATCH new tunnels each, each up to 3 records (NEW, then CONNECTED
 * and ENDED from rc_connect): 512 + 8 * 64 * 3 = 2048. */
#define MAX_RECORDS 2048
#define ACCEPT_BATCH 64
#define EVENTS_PER_STEP 8
#define ACCEPT_PAUSE_NS 100000000LL /* 0.1 s, as the Python reactor */
#define FLUSH_POLL_NS 20000000LL    /* 20 ms: a flushing tunnel checks the client's ACKs */
/* How long a held Success reply waits for the destination's first bytes to
 * ride with (tunnel.c): far below the clients' reply timeout (10 s). */
#define REPLY_HOLD_NS 200000000LL   /* 0.2 s */
/* How long after a coalesced reply the relay may hold back the reply's spill
 * (tunnel.c, "The spill"). */
#define SPILL_HOLD_NS 10000000LL     /* 10 ms */
#define MAX_LISTENERS 16

enum tstate {
    T_HEADER,     /* reading the Convert header */
    T_DECIDE,     /* a record went to Python; waiting for its decision */
    T_CONNECTING, /* onward connect in progress */
    T_OPEN,       /* data flows */
    T_FLUSHING,   /* the destination reset: deliver what is held, then reset */
    T_CLOSER,     /* an Error reply sent: discard until the client's FIN */
    T_HELD,       /* unverified client: `held` waits for its handshake */
};

/* What an unverified client's tunnel holds until the client's ACK
 * (pepsock/relay/routability.py): nothing is sent to the client, and none
 * of its bytes onward, before it. */
enum held {
    H_NONE,
    H_CONNECT, /* connect (again) to `conn` */
    H_OPEN,    /* onward connection up: the Success reply and the data path */
    H_REPLY,   /* an Error reply (`reply`), then the closer */
};

/* The timer queues.  Each has one fixed duration, so appending keeps a
 * queue sorted by deadline: the timers are O(1) without a heap. */
enum tqueue {
    Q_NONE = -1,
    Q_HEADER,      /* header_timeout */
    Q_CONNECT,     /* connect_limit */
    Q_LINGER,      /* linger_timeout */
    Q_FLUSH,       /* FLUSH_POLL_NS */
    Q_SYN_WINDOW,  /* an unverified client's onward SYN: unverified_syn_window */
    Q_REPLY,       /* OPEN with the Success reply held: REPLY_HOLD_NS */
    Q_SPILL,       /* OPEN, the reply's spill held back: SPILL_HOLD_NS */
    Q_VERIFY,      /* an unverified client's handshake: header_timeout (link 1) */
    NQUEUES
};

/* A tunnel sits in at most two queues: its state's (link 0) and Q_VERIFY (link 1). */
struct tlink {
    int q;
    int64_t deadline;
    struct tunnel *prev, *next;
};

struct end {
    int fd;
    bool readable, writable;
    /* A short recv() means "drained" (haproxy's raw_sock.c takes the same
     * shortcut) only once every later arrival is sure to raise an event:
     * after an EAGAIN (`armed`; an onward socket is armed from its connect),
     * and while no event said the peer's FIN is in (`fin_seen`). */
    bool armed, fin_seen;
};

struct dir {
    struct end *src, *dst;
    struct dir *peer;
    int pipe_r, pipe_w;   /* -1: no pipe */
    uint32_t pipe_cap;
    uint32_t held;        /* bytes in the pipe */
    uint8_t *buf;         /* copy buffer (COPY_BUF bytes) or NULL */
    uint32_t off, len;    /* bytes buf[off..off+len) wait to be sent */
    bool eof, shut, splice_mode;
    uint64_t bytes;       /* delivered to dst */
    uint64_t *counter;    /* core counter of this direction */
    uint32_t reply;       /* down only: bytes of the held Success reply, to go in
                           * front of the first bytes read (0: none held) */
    uint32_t lead;        /* bytes at buf[off] that are the reply, not data */
    bool spilling;        /* down only: sends whole segments only (the reply's spill) */
    uint32_t mss;         /* down only: the client socket's MSS at accept (0: unknown) */
    uint32_t limit;       /* budget: the most a pipe may hold */
};

struct tunnel {
    int id;
    enum tstate state;
    struct end c, s;       /* client, server (fd -1: none) */
    struct dir up, down;
    struct pep_reader *reader; /* T_HEADER and T_DECIDE only */
    struct pep_msg msg;        /* the decoded header (points into reader) */
    int64_t t0;                /* accept time, ns */
    int family;
    struct tlink tl[2];         /* timers */
    /* unverified clients */
    bool unverified;
    bool tracked;               /* Python keeps a tunnel for it (not an accept-time refusal) */
    enum held held;
    struct rc_connect conn;     /* H_CONNECT */
    uint8_t *reply;             /* H_REPLY */
    uint32_t reply_len;
    int reply_code;
    /* FLUSHING and stall bookkeeping */
    char why[80];
    uint64_t mark[4];
    bool marked;
    int64_t mark_at;
    bool onward_syn_data;       /* the onward SYN carried early data */
    uint32_t got;               /* bytes read while reading the header */
    uint32_t early;             /* bytes of early data read with the header */
};

struct tqueue_head {
    struct tunnel *head, *tail;
    int64_t duration;
};

struct rc_core {
    struct rc_config cfg;
    int ep;
    int listeners[MAX_LISTENERS];
    int nlisteners;
    int64_t paused_until;  /* listeners paused after EMFILE & co (0: not) */
    struct tunnel **slots;
    int nslots, *free_ids, nfree;
    int *freed_now, nfreed_now, capfreed_now; /* ids freed in this step, reusable after it */
    struct tqueue_head q[NQUEUES];
    int64_t stall_every, next_stall;
    struct rc_record *rec;
    int nrec;
    struct rc_counters n;
    /* pools */
    int (*pipes)[3];
    uint32_t npipes;
    uint8_t **bufs;
    uint32_t nbufs, maxbufs;
    uint8_t success[8];
    size_t success_len;
};

/* loop.c */
int64_t now_ns(void);
struct rc_record *record(struct rc_core *core, int kind, struct tunnel *t);
void timer_set(struct rc_core *core, struct tunnel *t, int queue);
void timer_clear(struct rc_core *core, struct tunnel *t);     /* link 0 */
void verify_clear(struct rc_core *core, struct tunnel *t);    /* link 1 */
void tunnel_free(struct rc_core *core, struct tunnel *t);
bool pipe_get(struct rc_core *core, struct dir *d);
void pipe_put(struct rc_core *core, struct dir *d);
uint8_t *buf_get(struct rc_core *core);
void buf_put(struct rc_core *core, uint8_t *buf);

/* tunnel.c */
void tunnel_accepted(struct rc_core *core, struct tunnel *t, const struct sockaddr_storage *ss);
void tunnel_event(struct rc_core *core, struct tunnel *t, bool server, uint32_t ev);
void tunnel_timer(struct rc_core *core, struct tunnel *t);
void tunnel_verify_expired(struct rc_core *core, struct tunnel *t);
void tunnel_verified(struct rc_core *core, struct tunnel *t);
void tunnel_stall_check(struct rc_core *core, struct tunnel *t, int64_t now);
int tunnel_connect(struct rc_core *core, struct tunnel *t, const struct rc_connect *c);
int tunnel_refuse(struct rc_core *core, struct tunnel *t, const uint8_t *reply, size_t len,
                  int code, bool tracked);
void tunnel_abort(struct rc_core *core, struct tunnel *t, const char *why);
void tunnel_wait_header(struct rc_core *core, struct tunnel *t);

#endif
