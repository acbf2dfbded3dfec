/* HTTP/2 and gRPC requests for tcp_traffic.bpf.c: one request per stream.
 *
 * A connection is HTTP/2 when its first request starts with the client connection preface
 * ("PRI * HTTP/2.0\r\n..."). From then on every payload of the connection is walked frame by
 * frame, in both directions:
 *   - the hook (sock:sock_send_length / sock_recv_length) fills a per-CPU cursor over the
 *     syscall's user buffer (flat, or an iovec array) and tail-calls a walker program;
 *   - a walker program takes PODNET_H2_STEPS steps and tail-calls itself until the payload is
 *     done; past PODNET_H2_TAILS calls (the kernel allows 33) the direction has lost its frame
 *     boundaries and is no longer parsed (counted in map_update_failures);
 *   - a step is one of: move to the next iovec, read a frame header (even one split across
 *     iovecs or syscalls), pass over a payload, copy a header-block fragment into the
 *     direction's state, or decode one HPACK field of a complete header block.
 * Header blocks are decoded with HPACK's static table (:method GET/POST, :status 200..500) and
 * the literal forms; each direction keeps the insertion count of its encoder's dynamic table
 * and a ring of the last PODNET_H2_RING insertions that carry something podnet needs
 * (:method, :status, content-type application/grpc, grpc-status), so later references to them
 * decode too. A block longer than PODNET_H2_BLOCK bytes, or malformed, puts the dynamic table
 * out of step: from then on references to it decode as unknown (the stream is still counted).
 *
 * This header holds the layouts and the pure decoding; the maps, the stream bookkeeping and
 * the walker live in tcp_traffic.bpf.c (BCC rewrites map calls in the main source file only).
 *
 * A stream is a request from its request HEADERS to its response: counted at the response's
 * first final HEADERS, except gRPC streams, which wait for the trailers (grpc-status) and end
 * at the response's END_STREAM or at RST_STREAM. Duration: request HEADERS to the response's
 * first final HEADERS.
 */
#ifndef PODNET_HTTP2_H
#define PODNET_HTTP2_H

#ifndef PODNET_H2_STEPS
#define PODNET_H2_STEPS 48
#endif
#ifndef PODNET_H2_TAILS
#define PODNET_H2_TAILS 32
#endif
#ifndef PODNET_H2_CONNS
#define PODNET_H2_CONNS 8192
#endif
#ifndef PODNET_H2_STREAMS
#define PODNET_H2_STREAMS 16384
#endif

#define PODNET_H2_BLOCK 512     /* header-block bytes kept per direction (a power of two) */
#define PODNET_H2_MASK (PODNET_H2_BLOCK - 1)
#define PODNET_H2_RING 16       /* remembered dynamic-table insertions (a power of two) */

#define PODNET_H2_DATA 0
#define PODNET_H2_HEADERS 1
#define PODNET_H2_RST_STREAM 3
#define PODNET_H2_CONTINUATION 9
#define PODNET_H2_END_STREAM 0x1
#define PODNET_H2_END_HEADERS 0x4
#define PODNET_H2_PADDED 0x8
#define PODNET_H2_PRIORITY 0x20
/* Not a frame flag: set in podnet_h2_dir.blk_flags once the HEADERS frame itself is copied
 * (what follows are CONTINUATIONs). */
#define PODNET_H2_FRAGMENT_DONE 0x80

/* What an HPACK header field names, as far as podnet cares. */
#define PODNET_H2_NAME_METHOD 1
#define PODNET_H2_NAME_STATUS 2
#define PODNET_H2_NAME_CONTENT_TYPE 3
#define PODNET_H2_NAME_GRPC_STATUS 4

struct podnet_h2_entry {
    u32 ins;    /* insertion number */
    u8 name;    /* PODNET_H2_NAME_* */
    u8 value;   /* decoded value: method code, status class, 1 for gRPC, grpc-status + 1 */
    u16 pad;
};

/* One direction of an HTTP/2 connection. */
struct podnet_h2_dir {
    u32 skip;           /* payload bytes of the current frame still to pass over */
    u32 collect;        /* header-block bytes of the current frame still to copy */
    u8 hdr[16];         /* a frame header assembled across iovecs or syscalls */
    u8 have;            /* bytes of hdr assembled */
    u8 lost;            /* the dynamic table is out of step */
    u8 dead;            /* frame boundaries lost: this direction is no longer parsed */
    u8 parsing;         /* a complete header block is being decoded */
    u8 blk_flags;       /* flags of the block's HEADERS frame */
    u8 blk_end_headers; /* the block's last frame has been seen */
    u8 truncated;       /* the block was longer than PODNET_H2_BLOCK */
    u8 r_method;        /* what the block decoded to so far */
    u8 r_status;
    u8 r_grpc;
    u8 r_grpc_status;   /* grpc-status + 1, 0 if none */
    u8 pad;
    u32 blk_stream;
    u32 blk_len;        /* bytes in blk */
    u32 blk_pos;        /* decoding position in blk */
    u32 ins;            /* insertions into the encoder's dynamic table seen so far */
    struct podnet_h2_entry ring[PODNET_H2_RING];
    u8 blk[PODNET_H2_BLOCK + 256];  /* room for a copy of up to 255 bytes at any offset < PODNET_H2_BLOCK */
};

struct podnet_h2_dir_key {
    u64 conn;   /* the socket (or, for TLS, the library's connection object) */
    u32 sent;   /* the direction: 1 for data sent by this side */
    u32 pad;
};

struct podnet_h2_stream_key {
    u64 conn;
    u32 stream;
    u32 pad;
};

struct podnet_h2_stream {
    u64 start_ns;
    u64 duration_ns;
    u8 method;
    u8 grpc;
    u8 status_class;
    u8 responded;
    u32 pad;
};

/* What the walk found that concerns a stream, handled after the walker's steps (stream
 * bookkeeping and counting are verified once per program that way, not once per step). */
struct podnet_h2_event {
    u32 stream;
    u8 type;        /* PODNET_H2_HEADERS (a decoded block), _DATA (END_STREAM) or _RST_STREAM */
    u8 flags;       /* the frame's (for a block: its HEADERS frame's) */
    u8 method;      /* a block's decoded fields */
    u8 status;
    u8 grpc;
    u8 grpc_status;
    u16 pad;
};

/* Stream events per walker program (a power of two). Steps and events are bounded by what the
 * verifier accepts: about 9,000 verified instructions per step and 12,000 per event here. */
#ifndef PODNET_H2_EVENTS
#define PODNET_H2_EVENTS 8
#endif

/* The payload being walked, per CPU: set by the hook, advanced by the walker programs. */
struct podnet_h2_cursor {
    const char *iov;    /* the iovec array, NULL for a flat buffer */
    const char *seg;    /* the current buffer */
    u64 cnt;            /* iovecs */
    u64 idx;            /* current iovec */
    u64 seglen;         /* usable bytes of the current buffer */
    u64 pos;            /* position in it */
    u64 left;           /* bytes of the payload from the current buffer's start on */
    u64 conn;
    u64 cgroup_id;
    u64 now;
    u32 sent;
    u32 tails;
    u32 events;         /* queued in ev */
    u8 role;
    u8 tls;
    u8 pad[2];
    struct podnet_h2_event ev[PODNET_H2_EVENTS];
};

/* ---- HPACK ----------------------------------------------------------------------- */

/* An HPACK integer whose first byte's low bits are `mask` (RFC 7541 5.1); -1 when it runs
 * past `end` or over 2^21. */
static __always_inline int podnet_h2_int(const u8 *blk, u32 *p, u32 end, u8 mask, u32 *out)
{
    u32 i = *p;
    if (i >= end)
        return -1;
    u32 v = blk[i & PODNET_H2_MASK] & mask;
    i++;
    if (v == mask) {
        u32 shift = 0;
#pragma unroll
        for (int k = 0; k < 3; k++) {
            if (i >= end)
                return -1;
            u8 b = blk[i & PODNET_H2_MASK];
            i++;
            v += (u32)(b & 127) << shift;
            shift += 7;
            if (!(b & 128)) {
                *p = i;
                *out = v;
                return 0;
            }
        }
        return -1;
    }
    *p = i;
    *out = v;
    return 0;
}

/* A string of the block as two little-endian words: bytes [p, p+8) and [p+8, p+16), those
 * past `len` zeroed. Whole-word compares keep the decoder small for the verifier. */
struct podnet_h2_str {
    u64 w0, w1;
    u32 len;
    u8 huff;
};

static __always_inline u64 podnet_h2_low(u32 n)
{
    return n >= 8 ? ~0ULL : (1ULL << (8 * n)) - 1;
}

static __always_inline void podnet_h2_str_at(const u8 *blk, u32 p, u32 len, u8 huff, struct podnet_h2_str *out)
{
    const u8 *at = blk + (p & PODNET_H2_MASK);
    out->w0 = *(const u64 *)at & podnet_h2_low(len);
    out->w1 = len > 8 ? *(const u64 *)(at + 8) & podnet_h2_low(len - 8) : 0;
    out->len = len;
    out->huff = huff;
}

/* :method's value: raw names (an encoder never Huffman-codes them: the code is no shorter). */
static __always_inline u8 podnet_h2_method(const struct podnet_h2_str *v)
{
    if (v->huff || v->len > 7)
        return PODNET_HTTP_OTHER;
    switch (v->w0) {
    case 0x544547: return PODNET_HTTP_GET;              /* "GET" */
    case 0x54534f50: return PODNET_HTTP_POST;           /* "POST" */
    case 0x545550: return PODNET_HTTP_PUT;              /* "PUT" */
    case 0x4554454c4544: return PODNET_HTTP_DELETE;     /* "DELETE" */
    case 0x44414548: return PODNET_HTTP_HEAD;           /* "HEAD" */
    case 0x4843544150: return PODNET_HTTP_PATCH;        /* "PATCH" */
    case 0x534e4f4954504f: return PODNET_HTTP_OPTIONS;  /* "OPTIONS" */
    case 0x5443454e4e4f43: return PODNET_HTTP_CONNECT;  /* "CONNECT" */
    case 0x4543415254: return PODNET_HTTP_TRACE;        /* "TRACE" */
    }
    return PODNET_HTTP_OTHER;
}

/* :status's class from its first digit, raw or Huffman-coded ('1','2' are 5-bit codes
 * 00001, 00010; '3'..'5' 6-bit codes 011001..011011). */
static __always_inline u8 podnet_h2_status(const struct podnet_h2_str *v)
{
    if (!v->len)
        return 0;
    u8 b = v->w0 & 0xff;
    if (!v->huff)
        return (b >= '1' && b <= '5') ? b - '0' : 0;
    if ((b >> 3) == 1 || (b >> 3) == 2)
        return b >> 3;
    if ((b >> 2) >= 0x19 && (b >> 2) <= 0x1b)
        return (b >> 2) - 0x19 + 3;
    return 0;
}

/* content-type application/grpc (also +proto, ;charset=...): raw, or the Huffman code of its
 * first 14 characters (10 whole bytes). */
static __always_inline u8 podnet_h2_is_grpc(const struct podnet_h2_str *v)
{
    if (!v->huff)
        return v->len >= 16 && v->w0 == 0x746163696c707061ULL && v->w1 == 0x637072672f6e6f69ULL;
    return v->len >= 10 && v->w0 == 0x4c3d260d62d0751dULL && (v->w1 & 0xffff) == 0x654d;
}

/* grpc-status's value + 1 (a raw decimal 0..16), 0 when not decodable. */
static __always_inline u8 podnet_h2_grpc_status(const struct podnet_h2_str *v)
{
    if (v->huff || !v->len || v->len > 2)
        return 0;
    u8 d0 = (u8)(v->w0 & 0xff) - '0';
    if (d0 > 9)
        return 0;
    if (v->len == 1)
        return d0 + 1;
    u8 d1 = (u8)((v->w0 >> 8) & 0xff) - '0';
    if (d1 > 9 || d0 == 0)
        return 0;
    u8 code = d0 * 10 + d1;
    return code <= 16 ? code + 1 : 0;
}

/* Literal names podnet needs that the static table lacks (grpc-status), raw or Huffman. */
static __always_inline u8 podnet_h2_literal_name(const struct podnet_h2_str *n)
{
    if (!n->huff && n->len == 11 && n->w0 == 0x6174732d63707267ULL && n->w1 == 0x737574)
        return PODNET_H2_NAME_GRPC_STATUS;     /* "grpc-status" */
    if (n->huff && n->len == 8 && n->w0 == 0x8fda3412b2c8ca9aULL)
        return PODNET_H2_NAME_GRPC_STATUS;
    if (!n->huff && n->len == 12 && n->w0 == 0x2d746e65746e6f63ULL && n->w1 == 0x65707974)
        return PODNET_H2_NAME_CONTENT_TYPE;    /* "content-type" */
    return 0;
}

static __always_inline u8 podnet_h2_value(u8 name, const struct podnet_h2_str *v)
{
    if (name == PODNET_H2_NAME_METHOD)
        return podnet_h2_method(v);
    if (name == PODNET_H2_NAME_STATUS)
        return podnet_h2_status(v);
    if (name == PODNET_H2_NAME_CONTENT_TYPE)
        return podnet_h2_is_grpc(v);
    if (name == PODNET_H2_NAME_GRPC_STATUS)
        return podnet_h2_grpc_status(v);
    return 0;
}

/* The static table's entries podnet uses (RFC 7541 appendix A): name, and the value for
 * indexed fields. */
static __always_inline u8 podnet_h2_static_name(u32 idx)
{
    if (idx == 2 || idx == 3)
        return PODNET_H2_NAME_METHOD;
    if (idx >= 8 && idx <= 14)
        return PODNET_H2_NAME_STATUS;
    if (idx == 31)
        return PODNET_H2_NAME_CONTENT_TYPE;
    return 0;
}

static __always_inline u8 podnet_h2_static_value(u32 idx)
{
    if (idx == 2)
        return PODNET_HTTP_GET;
    if (idx == 3)
        return PODNET_HTTP_POST;
    if (idx >= 8 && idx <= 10)     /* 200 204 206 */
        return 2;
    if (idx == 11)                 /* 304 */
        return 3;
    if (idx >= 12 && idx <= 13)    /* 400 404 */
        return 4;
    if (idx == 14)                 /* 500 */
        return 5;
    return 0;
}

/* The remembered dynamic-table entry at HPACK index idx (>= 62), NULL if unknown. Index 62
 * is the newest insertion whatever was evicted, so no table size is needed. */
static __always_inline struct podnet_h2_entry *podnet_h2_dynamic(struct podnet_h2_dir *d, u32 idx)
{
    if (d->lost || idx - 62 >= d->ins)
        return 0;
    u32 n = d->ins - (idx - 62);
    struct podnet_h2_entry *e = &d->ring[n & (PODNET_H2_RING - 1)];
    return e->ins == n ? e : 0;
}

static __always_inline void podnet_h2_note(struct podnet_h2_dir *d, u8 name, u8 value)
{
    if (!value)
        return;
    if (name == PODNET_H2_NAME_METHOD)
        d->r_method = value;
    else if (name == PODNET_H2_NAME_STATUS)
        d->r_status = value;
    else if (name == PODNET_H2_NAME_CONTENT_TYPE)
        d->r_grpc = value;
    else if (name == PODNET_H2_NAME_GRPC_STATUS)
        d->r_grpc_status = value;
}

/* Decode one header field at d->blk_pos. */
static __always_inline void podnet_h2_field(struct podnet_h2_dir *d)
{
    u32 p = d->blk_pos, end = d->blk_len, idx = 0, len = 0;
    if (end > PODNET_H2_BLOCK)
        end = PODNET_H2_BLOCK;
    const u8 *blk = d->blk;
    u8 b = blk[p & PODNET_H2_MASK];
    if (b & 0x80) {     /* indexed field */
        if (podnet_h2_int(blk, &p, end, 0x7f, &idx))
            goto bad;
        if (idx >= 62) {
            struct podnet_h2_entry *e = podnet_h2_dynamic(d, idx);
            if (e)
                podnet_h2_note(d, e->name, e->value);
        } else {
            podnet_h2_note(d, podnet_h2_static_name(idx), podnet_h2_static_value(idx));
        }
        d->blk_pos = p;
        return;
    }
    if ((b & 0xe0) == 0x20) {   /* dynamic table size update */
        if (podnet_h2_int(blk, &p, end, 0x1f, &idx))
            goto bad;
        d->blk_pos = p;
        return;
    }
    u8 insert = b & 0x40;
    if (podnet_h2_int(blk, &p, end, insert ? 0x3f : 0x0f, &idx))
        goto bad;
    u8 name = 0;
    if (idx >= 62) {
        struct podnet_h2_entry *e = podnet_h2_dynamic(d, idx);
        name = e ? e->name : 0;
    } else if (idx) {
        name = podnet_h2_static_name(idx);
    } else {
        if (p >= end)
            goto bad;
        u8 huff = blk[p & PODNET_H2_MASK] & 0x80;
        if (podnet_h2_int(blk, &p, end, 0x7f, &len))
            goto bad;
        struct podnet_h2_str n;
        podnet_h2_str_at(blk, p, len, huff, &n);
        name = podnet_h2_literal_name(&n);
        p += len;
    }
    if (p >= end)
        goto bad;
    u8 huff = blk[p & PODNET_H2_MASK] & 0x80;
    if (podnet_h2_int(blk, &p, end, 0x7f, &len))
        goto bad;
    if (p + len > end)
        goto bad;
    u8 value = 0;
    if (name) {
        struct podnet_h2_str v;
        podnet_h2_str_at(blk, p, len, huff, &v);
        value = podnet_h2_value(name, &v);
    }
    podnet_h2_note(d, name, value);
    if (insert) {
        d->ins++;
        if (name && value) {
            struct podnet_h2_entry *e = &d->ring[d->ins & (PODNET_H2_RING - 1)];
            e->ins = d->ins;
            e->name = name;
            e->value = value;
        }
    }
    d->blk_pos = p + len;
    return;
bad:
    /* Cut short or malformed: what follows may have inserted into the table. */
    d->lost = 1;
    d->blk_pos = d->blk_len;
}


/* The HEADERS frame's fragment is in blk[0, blk_len): skip its pad length and priority
 * fields, drop its padding. */
static __always_inline void podnet_h2_fragment_done(struct podnet_h2_dir *d, u32 first)
{
    if (!first)
        return;
    u32 start = 0;
    if (d->blk_flags & PODNET_H2_PADDED) {
        u32 padding = d->blk[0];
        start = 1;
        d->blk_len = d->blk_len > padding ? d->blk_len - padding : 0;
    }
    if (d->blk_flags & PODNET_H2_PRIORITY)
        start += 5;
    d->blk_pos = start;
}

#endif /* PODNET_HTTP2_H */
