/* RFC 8803 codec: see tlv.h and docs/protocol.md. */
#include "tlv.h"

#include <errno.h>
#include <string.h>

static const uint8_t v4_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

void pep_v4_mapped(uint8_t out[16], const uint8_t v4[4])
{
    memcpy(out, v4_prefix, 12);
    memcpy(out + 12, v4, 4);
}

static void put_header(uint8_t *out, size_t total)
{
    out[0] = PEP_VERSION;
    out[1] = (uint8_t)(total / 4);
    out[2] = PEP_MAGIC >> 8;
    out[3] = PEP_MAGIC & 0xff;
}

static int bad_address(const uint8_t a[16])
{
    static const uint8_t zero[16];

    if (memcmp(a, v4_prefix, 12) == 0) {
        const uint8_t *v4 = a + 12;
        if (!v4[0] && !v4[1] && !v4[2] && !v4[3])
            return 1; /* 0.0.0.0 */
        if ((v4[0] & 0xf0) == 0xe0)
            return 1; /* 224.0.0.0/4 */
        if (v4[0] == 255 && v4[1] == 255 && v4[2] == 255 && v4[3] == 255)
            return 1;
        return 0;
    }
    if (memcmp(a, zero, 16) == 0)
        return 1; /* :: */
    return a[0] == 0xff; /* ff00::/8 */
}

size_t pep_encode_connect(uint8_t *out, size_t cap, const uint8_t addr[16], uint16_t port,
                          const struct pep_opt *opts, size_t nopts)
{
    size_t body = 20, i;

    if (port == 0 || bad_address(addr))
        return 0;
    for (i = 0; i < nopts; i++) {
        if (opts[i].kind <= 1 || opts[i].len > 253)
            return 0;
        body += 2u + opts[i].len;
        if (body > PEP_MSG_MAX)
            return 0;
    }
    body = (body + 3) & ~(size_t)3;
    if (PEP_HDR_LEN + body > PEP_MSG_MAX || PEP_HDR_LEN + body > cap)
        return 0;

    put_header(out, PEP_HDR_LEN + body);
    uint8_t *t = out + PEP_HDR_LEN;
    memset(t, 0, body);
    t[0] = PEP_TLV_CONNECT;
    t[1] = (uint8_t)(body / 4);
    t[2] = (uint8_t)(port >> 8);
    t[3] = (uint8_t)port;
    memcpy(t + 4, addr, 16);
    size_t off = 20;
    for (i = 0; i < nopts; i++) {
        t[off] = opts[i].kind;
        t[off + 1] = (uint8_t)(opts[i].len + 2);
        if (opts[i].len)
            memcpy(t + off + 2, opts[i].value, opts[i].len);
        off += 2u + opts[i].len;
    }
    return PEP_HDR_LEN + body;
}

size_t pep_add_cookie(uint8_t *msg, size_t len, size_t cap, const uint8_t *cookie, size_t clen)
{
    size_t body = (4 + clen + 3) & ~(size_t)3;
    if (len < PEP_HDR_LEN || len % 4 || clen == 0 || body / 4 > 255 || len + body > cap ||
        len + body > PEP_MSG_MAX)
        return 0;
    uint8_t *t = msg + len;
    memset(t, 0, body);
    t[0] = PEP_TLV_COOKIE;
    t[1] = (uint8_t)(body / 4);
    memcpy(t + 4, cookie, clen);
    msg[1] = (uint8_t)((len + body) / 4);
    return len + body;
}

size_t pep_encode_error(uint8_t *out, size_t cap, uint8_t code, const uint8_t *value,
                        size_t len)
{
    size_t body = (3 + len + 3) & ~(size_t)3;

    if (len > PEP_MSG_MAX || PEP_HDR_LEN + body > PEP_MSG_MAX || PEP_HDR_LEN + body > cap)
        return 0;
    put_header(out, PEP_HDR_LEN + body);
    uint8_t *t = out + PEP_HDR_LEN;
    memset(t, 0, body);
    t[0] = PEP_TLV_ERROR;
    t[1] = (uint8_t)(body / 4);
    t[2] = code;
    if (len)
        memcpy(t + 3, value, len);
    return PEP_HDR_LEN + body;
}

size_t pep_encode_success(uint8_t *out, size_t cap)
{
    if (cap < PEP_HDR_LEN)
        return 0;
    put_header(out, PEP_HDR_LEN);
    return PEP_HDR_LEN;
}

static int reject(int *code, int c)
{
    *code = c;
    return PEP_REJECT;
}

static int check_connect(const uint8_t *t, size_t tlen, struct pep_msg *m)
{
    if (tlen < 20)
        return -1;
    m->port = (uint16_t)((t[2] << 8) | t[3]);
    memcpy(m->addr, t + 4, 16);
    m->opts = t + 20;
    m->optlen = tlen - 20;
    if (m->port == 0 || bad_address(m->addr))
        return -1;
    size_t i = 20;
    while (i < tlen) {
        uint8_t kind = t[i];
        if (kind == 1)
            return -1;
        if (kind == 0) {
            if (tlen - i >= 4)
                return -1;
            for (; i < tlen; i++)
                if (t[i])
                    return -1;
            break;
        }
        if (i + 1 >= tlen || t[i + 1] < 2 || t[i + 1] > tlen - i)
            return -1;
        i += t[i + 1];
    }
    return 0;
}

static int check_supported(const uint8_t *t, size_t tlen, struct pep_msg *m)
{
    size_t n, i;
    const uint8_t *k = t + 4;

    if (tlen < 4)
        return -1;
    n = tlen - 4;
    while (n && k[n - 1] == 0)
        n--;
    for (i = 0; i < n; i++)
        if (k[i] == 0)
            return -1;
    m->supported = k;
    m->nsupported = n;
    return 0;
}

int pep_decode(const uint8_t *buf, size_t len, struct pep_msg *m, int *code)
{
    memset(m, 0, sizeof *m);
    if (len < 1)
        return reject(code, PEP_E_MALFORMED);
    if (buf[0] != PEP_VERSION)
        return reject(code, PEP_E_UNSUPPORTED_VERSION);
    if (len < 2 || buf[1] == 0)
        return reject(code, PEP_E_MALFORMED);
    if (len < 4 || ((buf[2] << 8) | buf[3]) != PEP_MAGIC)
        return reject(code, PEP_E_MALFORMED);
    size_t total = (size_t)buf[1] * 4;
    if (len < total)
        return reject(code, PEP_E_MALFORMED);
    m->total = total;

    /* Rule 5 for every TLV first, then rule 6 on the bodies. */
    size_t off;
    for (off = PEP_HDR_LEN; off < total;) {
        uint8_t type = buf[off], l = buf[off + 1];
        if (type == 0 || l == 0 || off + (size_t)l * 4 > total)
            return reject(code, PEP_E_MALFORMED);
        if (m->seen[type / 32] & (1u << (type % 32)))
            return reject(code, PEP_E_MALFORMED);
        m->seen[type / 32] |= 1u << (type % 32);
        m->ntlv++;
        off += (size_t)l * 4;
    }
    for (off = PEP_HDR_LEN; off < total;) {
        const uint8_t *t = buf + off;
        size_t tlen = (size_t)t[1] * 4;
        int bad = 0;
        switch (t[0]) {
        case PEP_TLV_INFO:
            m->has_info = 1;
            bad = tlen != 4;
            break;
        case PEP_TLV_CONNECT:
            m->has_connect = 1;
            bad = check_connect(t, tlen, m);
            break;
        case PEP_TLV_SUPPORTED_EXT:
            m->has_supported = 1;
            bad = check_supported(t, tlen, m);
            break;
        case PEP_TLV_ERROR:
            m->has_error = 1;
            m->error_code = t[2];
            m->error_value = t + 3;
            m->error_len = tlen - 3;
            break;
        case PEP_TLV_COOKIE:
            m->cookie = t + 4;
            m->cookie_len = tlen - 4;
            break;
        case PEP_TLV_EXTENDED_HEADER:
            break;
        default:
            m->has_unknown = 1;
            break;
        }
        if (bad)
            return reject(code, PEP_E_MALFORMED);
        off += tlen;
    }
    return PEP_OK;
}

size_t pep_option_kinds(const struct pep_msg *m, uint8_t *out, size_t cap)
{
    size_t i = 0, n = 0;

    /* check_connect validated the walk: kinds >= 2, lengths in bounds. */
    while (i < m->optlen && m->opts[i] != 0) {
        if (n < cap)
            out[n] = m->opts[i];
        n++;
        i += m->opts[i + 1];
    }
    return n < cap ? n : cap;
}

int pep_check_request(const struct pep_msg *m, int *code)
{
    if (m->has_error || m->has_unknown)
        return reject(code, PEP_E_UNSUPPORTED_MESSAGE);
    if (!m->has_connect && !m->has_info)
        return reject(code, PEP_E_MALFORMED);
    return PEP_OK;
}

void pep_reader_init(struct pep_reader *r)
{
    r->have = 0;
}

size_t pep_reader_want(const struct pep_reader *r)
{
    if (r->have < PEP_HDR_LEN)
        return PEP_HDR_LEN - r->have;
    return (size_t)r->buf[1] * 4 - r->have;
}

int pep_reader_feed(struct pep_reader *r, const uint8_t *data, size_t len, size_t *used,
                    struct pep_msg *msg, int *code)
{
    size_t taken = 0;

    *used = 0;
    while (taken < len) {
        size_t want = pep_reader_want(r);
        size_t n = len - taken < want ? len - taken : want;
        memcpy(r->buf + r->have, data + taken, n);
        r->have = (uint16_t)(r->have + n);
        taken += n;
        *used = taken;
        /* Rules 1-3 as soon as the bytes they look at are in. */
        if (r->buf[0] != PEP_VERSION)
            return reject(code, PEP_E_UNSUPPORTED_VERSION);
        if (r->have >= 2 && r->buf[1] == 0)
            return reject(code, PEP_E_MALFORMED);
        if (r->have < PEP_HDR_LEN)
            continue;
        if (((r->buf[2] << 8) | r->buf[3]) != PEP_MAGIC)
            return reject(code, PEP_E_MALFORMED);
        if (pep_reader_want(r) == 0)
            return pep_decode(r->buf, r->have, msg, code);
    }
    if (r->have >= 1 && r->buf[0] != PEP_VERSION)
        return reject(code, PEP_E_UNSUPPORTED_VERSION);
    return PEP_NEED_MORE;
}

int pep_reader_eof(const struct pep_reader *r)
{
    if (r->have >= 1 && r->buf[0] != PEP_VERSION)
        return PEP_E_UNSUPPORTED_VERSION;
    return PEP_E_MALFORMED;
}

int pep_errno_for(uint8_t code, const uint8_t *value, size_t len)
{
    switch (code) {
    case PEP_E_NOT_AUTHORIZED:
        return EACCES;
    case PEP_E_UNSUPPORTED_TCP_OPTION:
        return EOPNOTSUPP;
    case PEP_E_RESOURCE_EXCEEDED:
        return ENOBUFS;
    case PEP_E_NETWORK_FAILURE:
        return ENETUNREACH;
    case PEP_E_CONNECTION_RESET:
        return ECONNREFUSED;
    case PEP_E_DESTINATION_UNREACHABLE: {
        uint8_t icmp = len ? value[0] : 1; /* as pepsock.protocol */
        if (icmp == 0 || icmp == 6 || icmp == 9 || icmp == 11)
            return ENETUNREACH;
        return EHOSTUNREACH;
    }
    default:
        return EPROTO;
    }
}
