/* One direction of an emulated link: loss, queue, rate, delay.  See linkq.h.
 *
 * The link model is mahimahi's (a trace-driven serializer in front of a delay
 * pipe) with a rate schedule instead of per-packet delivery opportunities; the
 * queues follow RFC 8289 (CoDel) and RFC 8290 (FQ-CoDel).  Our code.
 *
 * Time is virtual: the serializer's clock `lt` runs behind or at the caller's
 * `now`, and a packet leaves the serializer at the exact time its last bit would
 * have, however late the caller asks.  So lateness of the caller (a busy machine)
 * delays the write of a packet but not its computed departure, and CoDel sees
 * the sojourn times the emulated link would have produced.
 */
#include "linkq.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define NIL (-1)
#define DEFAULT_PKT_LIMIT 10240      /* Linux fq_codel/codel default `limit` (packets) */

struct pq { int32_t head, tail; uint32_t n; uint64_t bytes; };   /* a list of slots */

struct codel {                       /* RFC 8289 state */
    uint64_t first_above, drop_next;
    uint32_t count, lastcount;
    int dropping;
};

enum { IN_NONE = 0, IN_NEW, IN_OLD };

struct flow {
    struct pq q;
    struct codel cv;
    int64_t deficit;
    int32_t next;                    /* next flow in its list */
    uint8_t list;
};

struct flist { int32_t head, tail; };

struct lq {
    size_t nslots;
    uint8_t *buf;
    uint16_t *len;
    int32_t *next;
    uint64_t *t_in, *t_due;
    int32_t free_head;
    int32_t popped;                  /* slot handed out by lq_pop, freed on the next call */

    enum lq_kind kind;
    uint64_t limit;                  /* FIFO: bytes; CoDel, FQ-CoDel: packets */
    uint64_t target, interval;
    uint32_t quantum, maxpacket, overhead;
    struct pq fifo;                  /* FIFO and CoDel */
    struct codel cv;
    struct flow *flows;              /* FQ-CoDel */
    struct flist newf, oldf;
    uint64_t perturb;
    size_t qpkts;
    uint64_t qbytes;

    uint64_t lt;                     /* the serializer's clock */
    int32_t cur;                     /* packet being serialized, or NIL */
    double cur_left;                 /* its bytes still to send */
    uint64_t base_rate;
    uint64_t t0, period;
    size_t sn;
    uint64_t *s_at, *s_rate;

    struct pq pipe;                  /* serialized, waiting out the delay */
    uint64_t delay;

    double loss;
    uint64_t rng;
    struct lq_stats st;
};

/* ------------------------------------------------------------------ slots */

static int32_t slot_get(struct lq *q)
{
    int32_t i = q->free_head;
    if (i != NIL) q->free_head = q->next[i];
    return i;
}

static void slot_put(struct lq *q, int32_t i)
{
    q->next[i] = q->free_head;
    q->free_head = i;
}

static void pq_append(struct lq *q, struct pq *l, int32_t i)
{
    q->next[i] = NIL;
    if (l->tail == NIL) l->head = i;
    else q->next[l->tail] = i;
    l->tail = i;
    l->n++;
    l->bytes += q->len[i];
}

static int32_t pq_take(struct lq *q, struct pq *l)
{
    int32_t i = l->head;
    if (i == NIL) return NIL;
    l->head = q->next[i];
    if (l->head == NIL) l->tail = NIL;
    l->n--;
    l->bytes -= q->len[i];
    return i;
}

static void pq_init(struct pq *l) { l->head = l->tail = NIL; l->n = 0; l->bytes = 0; }

/* ------------------------------------------------------------ lifecycle */

struct lq *lq_new(size_t slots)
{
    if (slots < 2 || slots > (1u << 30)) return NULL;
    struct lq *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->nslots = slots;
    q->buf = malloc(slots * LQ_SLOT);
    q->len = calloc(slots, sizeof *q->len);
    q->next = calloc(slots, sizeof *q->next);
    q->t_in = calloc(slots, sizeof *q->t_in);
    q->t_due = calloc(slots, sizeof *q->t_due);
    q->flows = calloc(LQ_FLOWS, sizeof *q->flows);
    if (!q->buf || !q->len || !q->next || !q->t_in || !q->t_due || !q->flows) {
        lq_free(q);
        return NULL;
    }
    memset(q->buf, 0, slots * LQ_SLOT);   /* fault the pages in now, not mid-run */
    q->free_head = NIL;
    for (size_t i = slots; i-- > 0;) slot_put(q, (int32_t)i);
    q->popped = NIL;
    q->cur = NIL;
    q->base_rate = LQ_RATE_INF;
    q->target = 5000000;                  /* RFC 8290: 5 ms / 100 ms, quantum 1514 */
    q->interval = 100000000;
    q->quantum = 1514;
    q->maxpacket = 1500;
    q->perturb = 0x9e3779b97f4a7c15ull;
    q->kind = LQ_FIFO;
    q->limit = UINT64_MAX;
    pq_init(&q->fifo);
    pq_init(&q->pipe);
    q->newf.head = q->newf.tail = q->oldf.head = q->oldf.tail = NIL;
    for (int f = 0; f < LQ_FLOWS; f++) pq_init(&q->flows[f].q);
    q->rng = 1;
    return q;
}

void lq_free(struct lq *q)
{
    if (!q) return;
    free(q->buf);
    free(q->len);
    free(q->next);
    free(q->t_in);
    free(q->t_due);
    free(q->flows);
    free(q->s_at);
    free(q->s_rate);
    free(q);
}

/* -------------------------------------------------------------- rate */

/* The rate at t and the end of the constant stretch it belongs to. */
static uint64_t segment(const struct lq *q, uint64_t t, uint64_t *end)
{
    if (q->sn == 0 || t < q->t0) {
        *end = q->sn ? q->t0 : UINT64_MAX;
        return q->base_rate;
    }
    uint64_t rel = t - q->t0, base = 0;
    if (q->period) {
        base = rel / q->period * q->period;
        rel -= base;
    }
    size_t lo = 0, hi = q->sn;            /* largest i with s_at[i] <= rel */
    while (hi - lo > 1) {
        size_t mid = (lo + hi) / 2;
        if (q->s_at[mid] <= rel) lo = mid;
        else hi = mid;
    }
    if (lo + 1 < q->sn) *end = q->t0 + base + q->s_at[lo + 1];
    else if (q->period) *end = q->t0 + base + q->period;
    else *end = UINT64_MAX;
    return q->s_rate[lo];
}

uint64_t lq_rate_at(const struct lq *q, uint64_t t)
{
    uint64_t end;
    return segment(q, t, &end);
}

static void advance(struct lq *q, uint64_t now);

void lq_set_rate(struct lq *q, uint64_t now, uint64_t rate_bps)
{
    advance(q, now);
    q->base_rate = rate_bps;
    q->sn = 0;
}

int lq_set_schedule(struct lq *q, uint64_t now, uint64_t t0, uint64_t period_ns, size_t n,
                    const uint64_t *at_ns, const uint64_t *rate_bps)
{
    if (n == 0 || at_ns[0] != 0) return -1;
    for (size_t i = 1; i < n; i++)
        if (at_ns[i] <= at_ns[i - 1]) return -1;
    if (period_ns && period_ns <= at_ns[n - 1]) return -1;
    uint64_t *a = malloc(n * sizeof *a), *r = malloc(n * sizeof *r);
    if (!a || !r) { free(a); free(r); return -1; }
    memcpy(a, at_ns, n * sizeof *a);
    memcpy(r, rate_bps, n * sizeof *r);
    advance(q, now);
    free(q->s_at);
    free(q->s_rate);
    q->s_at = a;
    q->s_rate = r;
    q->sn = n;
    q->t0 = t0;
    q->period = period_ns;
    return 0;
}

/* ------------------------------------------------------------- CoDel */

static uint64_t control_law(const struct lq *q, uint64_t t, uint32_t count)
{
    return t + (uint64_t)((double)q->interval / sqrt((double)count));
}

/* RFC 8289 dodequeue(): take the head, say whether it may be dropped. */
static int32_t codel_take(struct lq *q, struct pq *l, struct codel *cv, uint64_t now, int *ok_to_drop)
{
    *ok_to_drop = 0;
    int32_t i = pq_take(q, l);
    if (i == NIL) {
        cv->first_above = 0;
        return NIL;
    }
    q->qpkts--;
    q->qbytes -= q->len[i];
    uint64_t sojourn = now > q->t_in[i] ? now - q->t_in[i] : 0;
    if (sojourn < q->target || l->bytes <= q->maxpacket) {
        cv->first_above = 0;           /* below target, or too little queued to matter */
    } else if (cv->first_above == 0) {
        cv->first_above = now + q->interval;
    } else if (now >= cv->first_above) {
        *ok_to_drop = 1;               /* above target for a whole interval */
    }
    return i;
}

static void codel_drop(struct lq *q, int32_t i)
{
    q->st.drop_codel++;
    slot_put(q, i);
}

/* RFC 8289 dequeue(). */
static int32_t codel_dequeue(struct lq *q, struct pq *l, struct codel *cv, uint64_t now)
{
    int ok;
    int32_t i = codel_take(q, l, cv, now, &ok);
    if (cv->dropping) {
        if (!ok) {
            cv->dropping = 0;
        } else {
            while (cv->dropping && now >= cv->drop_next) {
                codel_drop(q, i);
                cv->count++;
                i = codel_take(q, l, cv, now, &ok);
                if (!ok) cv->dropping = 0;
                else cv->drop_next = control_law(q, cv->drop_next, cv->count);
            }
        }
    } else if (ok) {
        codel_drop(q, i);
        i = codel_take(q, l, cv, now, &ok);
        cv->dropping = 1;
        uint32_t delta = cv->count - cv->lastcount;
        cv->count = 1;
        if (delta > 1 && now - cv->drop_next < 16 * q->interval) cv->count = delta;
        cv->drop_next = control_law(q, now, cv->count);
        cv->lastcount = cv->count;
    }
    return i;
}

/* ---------------------------------------------------------- FQ-CoDel */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static uint64_t hash_bytes(uint64_t h, const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

/* The 5-tuple (addresses, protocol, ports) of an IPv4/IPv6 packet, hashed. */
uint32_t lq_flow_of(const struct lq *q, const uint8_t *p, size_t len)
{
    uint64_t h = q->perturb;
    if (len >= 20 && p[0] >> 4 == 4) {
        size_t ihl = (size_t)(p[0] & 15) * 4;
        uint8_t proto = p[9];
        h = hash_bytes(h, &proto, 1);
        h = hash_bytes(h, p + 12, 8);
        int first_fragment = ((p[6] & 0x1f) | p[7]) == 0;
        if ((proto == 6 || proto == 17) && first_fragment && ihl >= 20 && len >= ihl + 4)
            h = hash_bytes(h, p + ihl, 4);
    } else if (len >= 40 && p[0] >> 4 == 6) {
        uint8_t nh = p[6];
        h = hash_bytes(h, &nh, 1);
        h = hash_bytes(h, p + 8, 32);
        if ((nh == 6 || nh == 17) && len >= 44) h = hash_bytes(h, p + 40, 4);
    } else {
        h = hash_bytes(h, p, len < 20 ? len : 20);
    }
    return (uint32_t)(mix64(h) % LQ_FLOWS);
}

static void fl_append(struct lq *q, struct flist *l, int32_t f, uint8_t which)
{
    q->flows[f].next = NIL;
    q->flows[f].list = which;
    if (l->tail == NIL) l->head = f;
    else q->flows[l->tail].next = f;
    l->tail = f;
}

static int32_t fl_pop(struct lq *q, struct flist *l)
{
    int32_t f = l->head;
    if (f == NIL) return NIL;
    l->head = q->flows[f].next;
    if (l->head == NIL) l->tail = NIL;
    q->flows[f].list = IN_NONE;
    return f;
}

static void fq_enqueue(struct lq *q, int32_t i)
{
    int32_t f = (int32_t)lq_flow_of(q, q->buf + (size_t)i * LQ_SLOT, q->len[i]);
    struct flow *fl = &q->flows[f];
    pq_append(q, &fl->q, i);
    if (fl->list == IN_NONE) {         /* a flow with nothing queued becomes a new (sparse) flow */
        fl_append(q, &q->newf, f, IN_NEW);
        fl->deficit = q->quantum;
    }
    if (q->qpkts > q->limit) {
        /* Overflow, as Linux's fq_codel_drop(): from the head of the fattest queue (most
         * bytes), a batch until half of its backlog is gone, at most LQ_DROP_BATCH packets
         * and at least one.  One packet a time would make every later arrival pay the
         * 1024-queue scan again while a flood lasts; the batch also tells that flow's
         * sender at once.  Dropping less than half leaves the flow non-empty. */
        int32_t fat = 0;
        for (int32_t k = 1; k < LQ_FLOWS; k++)
            if (q->flows[k].q.bytes > q->flows[fat].q.bytes) fat = k;
        struct pq *fq = &q->flows[fat].q;
        uint64_t threshold = fq->bytes >> 1, dropped = 0;
        uint32_t n = 0;
        do {
            int32_t d = pq_take(q, fq);
            q->qpkts--;
            q->qbytes -= q->len[d];
            dropped += q->len[d];
            q->st.drop_overflow++;
            slot_put(q, d);
        } while (++n < LQ_DROP_BATCH && dropped < threshold && fq->n);
    }
}

/* RFC 8290 section 4.2: new flows first, DRR with `quantum` bytes a round. */
static int32_t fq_dequeue(struct lq *q, uint64_t now)
{
    for (;;) {
        struct flist *l = q->newf.head != NIL ? &q->newf : &q->oldf;
        int32_t f = l->head;
        if (f == NIL) return NIL;
        struct flow *fl = &q->flows[f];
        if (fl->deficit <= 0) {
            fl->deficit += q->quantum;
            fl_pop(q, l);
            fl_append(q, &q->oldf, f, IN_OLD);
            continue;
        }
        int32_t i = codel_dequeue(q, &fl->q, &fl->cv, now);
        if (i == NIL) {
            fl_pop(q, l);
            /* a new flow that empties goes behind the old ones once, so it cannot
             * starve them by going idle and coming back as new (RFC 8290 4.2) */
            if (l == &q->newf && q->oldf.head != NIL) fl_append(q, &q->oldf, f, IN_OLD);
            continue;
        }
        fl->deficit -= q->len[i];
        return i;
    }
}

/* ---------------------------------------------------------- the qdisc */

static int qdisc_enqueue(struct lq *q, int32_t i)
{
    uint16_t n = q->len[i];
    if (q->kind == LQ_FIFO) {
        if (q->qbytes + n > q->limit) {
            q->st.drop_overflow++;
            slot_put(q, i);
            return 1;
        }
    } else if (q->kind == LQ_CODEL && q->qpkts >= q->limit) {
        q->st.drop_overflow++;
        slot_put(q, i);
        return 1;
    }
    q->qpkts++;
    q->qbytes += n;
    if (q->kind == LQ_FQ_CODEL) fq_enqueue(q, i);
    else pq_append(q, &q->fifo, i);
    if (q->qbytes > q->st.backlog_max_bytes) q->st.backlog_max_bytes = q->qbytes;
    return 0;
}

static int32_t qdisc_dequeue(struct lq *q, uint64_t now)
{
    switch (q->kind) {
    case LQ_FIFO: {
        int32_t i = pq_take(q, &q->fifo);
        if (i != NIL) {
            q->qpkts--;
            q->qbytes -= q->len[i];
        }
        return i;
    }
    case LQ_CODEL:
        return codel_dequeue(q, &q->fifo, &q->cv, now);
    case LQ_FQ_CODEL:
        return fq_dequeue(q, now);
    }
    return NIL;
}

int lq_set_qdisc(struct lq *q, const char *kind, uint64_t limit)
{
    enum lq_kind k;
    if (!strcmp(kind, "fifo")) k = LQ_FIFO;
    else if (!strcmp(kind, "codel")) k = LQ_CODEL;
    else if (!strcmp(kind, "fq_codel")) k = LQ_FQ_CODEL;
    else return -1;
    if (k != q->kind) {                /* drop what is queued under the old discipline */
        int32_t i;
        while ((i = pq_take(q, &q->fifo)) != NIL) { q->st.drop_flush++; slot_put(q, i); }
        for (int f = 0; f < LQ_FLOWS; f++) {
            while ((i = pq_take(q, &q->flows[f].q)) != NIL) { q->st.drop_flush++; slot_put(q, i); }
            memset(&q->flows[f].cv, 0, sizeof q->flows[f].cv);
            q->flows[f].list = IN_NONE;
            q->flows[f].deficit = 0;
        }
        q->newf.head = q->newf.tail = q->oldf.head = q->oldf.tail = NIL;
        memset(&q->cv, 0, sizeof q->cv);
        q->qpkts = 0;
        q->qbytes = 0;
        q->kind = k;
    }
    q->limit = limit ? limit : (k == LQ_FIFO ? UINT64_MAX : DEFAULT_PKT_LIMIT);
    return 0;
}

const char *lq_qdisc_name(const struct lq *q)
{
    return q->kind == LQ_FIFO ? "fifo" : q->kind == LQ_CODEL ? "codel" : "fq_codel";
}

void lq_set_codel(struct lq *q, uint64_t target_ns, uint64_t interval_ns)
{
    if (target_ns) q->target = target_ns;
    if (interval_ns) q->interval = interval_ns;
}

void lq_set_quantum(struct lq *q, uint32_t quantum)
{
    if (quantum) q->quantum = quantum;
}

void lq_set_delay(struct lq *q, uint64_t delay_ns) { q->delay = delay_ns; }

void lq_set_overhead(struct lq *q, uint32_t bytes) { q->overhead = bytes; }

void lq_set_loss(struct lq *q, double p, uint64_t seed)
{
    q->loss = p < 0 ? 0 : p > 1 ? 1 : p;
    q->rng = seed ? seed : 1;
}

/* -------------------------------------------------------- the serializer */

static void depart(struct lq *q, int32_t i, uint64_t t)
{
    q->t_due[i] = t + q->delay;
    pq_append(q, &q->pipe, i);
}

/* Run the serializer from its clock up to `now`. */
static void advance(struct lq *q, uint64_t now)
{
    while (q->lt < now || q->cur == NIL) {
        if (q->cur == NIL) {
            q->cur = qdisc_dequeue(q, q->lt);
            if (q->cur == NIL) {       /* idle: nothing to send before the next arrival */
                if (q->lt < now) q->lt = now;
                return;
            }
            q->cur_left = (double)q->len[q->cur] + q->overhead;
        }
        uint64_t end, rate = segment(q, q->lt, &end);
        if (rate == LQ_RATE_INF) {
            depart(q, q->cur, q->lt);
            q->cur = NIL;
            continue;
        }
        uint64_t stop = end < now ? end : now;
        if (rate == 0) {               /* outage: the packet waits on the wire */
            q->lt = stop;
            continue;
        }
        double need = ceil(q->cur_left * 8e9 / (double)rate);
        if ((double)q->lt + need <= (double)stop) {
            q->lt += (uint64_t)need;
            depart(q, q->cur, q->lt);
            q->cur = NIL;
            continue;
        }
        q->cur_left -= (double)(stop - q->lt) * (double)rate / 8e9;
        if (q->cur_left < 0) q->cur_left = 0;
        q->lt = stop;
    }
}

/* When the packet on the wire will have left, without changing anything. */
static uint64_t completion(const struct lq *q)
{
    uint64_t t = q->lt;
    double left = q->cur_left;
    for (int k = 0; k < 100000; k++) {
        uint64_t end, rate = segment(q, t, &end);
        if (rate == LQ_RATE_INF) return t;
        if (rate != 0) {
            double need = ceil(left * 8e9 / (double)rate);
            if ((double)t + need <= (double)end) return t + (uint64_t)need;
            left -= (double)(end - t) * (double)rate / 8e9;
        }
        if (end == UINT64_MAX) return UINT64_MAX;
        t = end;
    }
    return UINT64_MAX;
}

uint64_t lq_next_event(struct lq *q, uint64_t now)
{
    advance(q, now);
    uint64_t ev = q->pipe.head != NIL ? q->t_due[q->pipe.head] : UINT64_MAX;
    if (q->cur != NIL) {
        uint64_t c = completion(q);
        if (c != UINT64_MAX && c + q->delay < ev) ev = c + q->delay;
    }
    return ev;
}

/* ------------------------------------------------------------- in / out */

static void release_popped(struct lq *q)
{
    if (q->popped != NIL) {
        slot_put(q, q->popped);
        q->popped = NIL;
    }
}

static double uniform(struct lq *q)   /* splitmix64, [0, 1) */
{
    uint64_t z = (q->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) / 9007199254740992.0;
}

int lq_push(struct lq *q, uint64_t now, const uint8_t *pkt, size_t len)
{
    release_popped(q);
    q->st.in++;
    if (len == 0 || len > LQ_SLOT) {
        q->st.drop_overflow++;
        return 1;
    }
    if (q->loss > 0 && uniform(q) < q->loss) {
        q->st.drop_loss++;
        return 1;
    }
    advance(q, now);
    int32_t i = slot_get(q);
    if (i == NIL) {
        q->st.drop_nobuf++;
        return 1;
    }
    memcpy(q->buf + (size_t)i * LQ_SLOT, pkt, len);
    q->len[i] = (uint16_t)len;
    q->t_in[i] = now;
    if (len > q->maxpacket) q->maxpacket = (uint32_t)len;
    if (qdisc_enqueue(q, i)) return 1;
    advance(q, now);                   /* an idle link takes it at once */
    return 0;
}

int lq_pop(struct lq *q, uint64_t now, const uint8_t **data, size_t *len, uint64_t *t_in,
           uint64_t *t_due)
{
    release_popped(q);
    advance(q, now);
    int32_t i = q->pipe.head;
    if (i == NIL || q->t_due[i] > now) return 0;
    pq_take(q, &q->pipe);
    q->popped = i;
    q->st.out++;
    q->st.out_bytes += q->len[i];
    *data = q->buf + (size_t)i * LQ_SLOT;
    *len = q->len[i];
    *t_in = q->t_in[i];
    *t_due = q->t_due[i];
    return 1;
}

void lq_get_stats(const struct lq *q, struct lq_stats *st) { *st = q->st; }
size_t lq_backlog_packets(const struct lq *q) { return q->qpkts; }
uint64_t lq_backlog_bytes(const struct lq *q) { return q->qbytes; }
