/* One direction of an emulated link, in user space: random loss at the
 * ingress, a queue (drop-tail FIFO in bytes, CoDel, or FQ-CoDel per RFC 8290),
 * a serializer running at a rate that follows a schedule (trace-driven, as
 * mahimahi's link queue), then the propagation delay.  No I/O and no clock:
 * every call takes the time ("now", CLOCK_MONOTONIC ns), so the same code runs
 * in delayline.c and, on virtual time, in tests/test_testbed_linkq.py (cffi).
 *
 *   arrival --loss--> qdisc --(rate)--> pipe (+delay) --> lq_pop()
 */
#ifndef PEPSOCK_LINKQ_H
#define PEPSOCK_LINKQ_H

#include <stddef.h>
#include <stdint.h>

#define LQ_SLOT 2048                 /* bytes per packet slot (links run at MTU 1500) */
#define LQ_RATE_INF UINT64_MAX       /* no serialization: the link only delays */
#define LQ_FLOWS 1024                /* FQ-CoDel queues (RFC 8290 default) */
#define LQ_DROP_BATCH 64             /* FQ-CoDel overflow: most packets dropped at once (Linux drop_batch) */

enum lq_kind { LQ_FIFO = 0, LQ_CODEL = 1, LQ_FQ_CODEL = 2 };

struct lq_stats {
    uint64_t in, out, out_bytes;
    uint64_t drop_overflow;          /* FIFO tail drop / FQ-CoDel fattest-queue batch / limit */
    uint64_t drop_codel;             /* dropped by the CoDel control law */
    uint64_t drop_loss;              /* random loss at the ingress */
    uint64_t drop_nobuf;             /* no free slot (the pool is full) */
    uint64_t drop_flush;             /* queued when the qdisc was changed */
    uint64_t backlog_max_bytes;
};

struct lq;

struct lq *lq_new(size_t slots);
void lq_free(struct lq *q);

/* kind: "fifo" (limit in bytes), "codel" or "fq_codel" (limit in packets,
 * 0 = 10240 as Linux).  Changing the kind drops what is queued.  -1: bad kind. */
int lq_set_qdisc(struct lq *q, const char *kind, uint64_t limit);
const char *lq_qdisc_name(const struct lq *q);
void lq_set_codel(struct lq *q, uint64_t target_ns, uint64_t interval_ns);
void lq_set_quantum(struct lq *q, uint32_t quantum);
void lq_set_delay(struct lq *q, uint64_t delay_ns);
/* Bytes the serializer adds to each packet (14: an Ethernet header, as TBF on a veth counts). */
void lq_set_overhead(struct lq *q, uint32_t bytes);
/* Random loss at the ingress with probability p (0..1), from a seeded PRNG. */
void lq_set_loss(struct lq *q, double p, uint64_t seed);
/* A constant rate (bit/s; 0 = outage, LQ_RATE_INF = unlimited) from `now` on;
 * forgets any schedule. */
void lq_set_rate(struct lq *q, uint64_t now, uint64_t rate_bps);
/* A piecewise-constant schedule starting at t0: rate[i] holds from t0 + at[i]
 * (at[0] must be 0, increasing).  period > 0 repeats it (mahimahi's repeat).
 * Before t0 the current constant rate holds.  -1 on a malformed schedule. */
int lq_set_schedule(struct lq *q, uint64_t now, uint64_t t0, uint64_t period_ns, size_t n,
                    const uint64_t *at_ns, const uint64_t *rate_bps);
uint64_t lq_rate_at(const struct lq *q, uint64_t t);

/* A packet arrives (copied).  0: queued; 1: dropped (counted). */
int lq_push(struct lq *q, uint64_t now, const uint8_t *pkt, size_t len);
/* The next packet whose release time has come, or 0.  *data stays valid until
 * the next call on q.  *t_in: arrival, *t_due: when it was due to leave. */
int lq_pop(struct lq *q, uint64_t now, const uint8_t **data, size_t *len, uint64_t *t_in,
           uint64_t *t_due);
/* When lq_pop may next return something (UINT64_MAX: only after a push). */
uint64_t lq_next_event(struct lq *q, uint64_t now);

void lq_get_stats(const struct lq *q, struct lq_stats *st);
size_t lq_backlog_packets(const struct lq *q);
uint64_t lq_backlog_bytes(const struct lq *q);
/* The FQ-CoDel queue a packet is classified to (5-tuple hash), for tests. */
uint32_t lq_flow_of(const struct lq *q, const uint8_t *pkt, size_t len);

#endif
