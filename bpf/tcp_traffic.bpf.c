/* The hot path: TCP payload bytes per (owner, peer), smoothed RTT and requests per owner.
 *
 * Hooks (the socket layer's own tracepoints):
 *   sock:sock_send_length, sock:sock_recv_length (struct sock *sk, int ret, int flags):
 *     ret is what the application handed to / took from the socket; the socket's smoothed
 *     RTT is sampled here too, at most once per PODNET_RTT_SAMPLE_NS per socket;
 *   tcp:tcp_destroy_sock (struct sock *sk) and sock:inet_sock_set_state (sk, old, new):
 *     forget a socket's state when it dies or connects again.
 *
 * Built two ways from this one source:
 *   -DPODNET_TP_BTF (preferred): BTF-typed tracepoint programs. The verifier knows `sk` is a
 *     struct sock, so fields are plain loads, and each socket's state lives in the socket's
 *     own local storage (freed by the kernel with the socket). Its byte counters sit in a
 *     slot of an mmap-able array that the poller reads in place: no shared map update per
 *     event, and no map-element iterator (which some hosts refuse to load).
 *   otherwise: raw tracepoints. Fields are read with bpf_probe_read_kernel (~35 ns each
 *     here) and each socket's state sits in an LRU hash keyed by the socket's address,
 *     dropped when its socket is destroyed or connects again, so a recycled address never
 *     inherits a dead socket's state; LRU eviction of a live entry only costs a re-resolve.
 * Either way a socket's (owner cgroup, peer) is resolved once. Per-pod byte totals are the
 * sum of the pod's flows, so each event updates one counter.
 *
 * Requests (unless -DPODNET_NO_REQUESTS): on each connection a request is a turn of the
 * conversation. On a server socket, data received while idle starts a request and the
 * first data sent back ends it; on a client socket, the mirror image. At those two moments
 * only, the first bytes of the syscall's user buffer are read (found through the task's
 * saved syscall registers) to recognise HTTP/1.x methods and status lines; nothing is
 * hooked on other syscalls. The clock is read only when requests are tracked: here it
 * costs as much as the rest of an event.
 */
#include "podnet.h"
#include "requests.h"

struct tcp_flow_key {
    u64 cgroup_id;
    u8 peer[16];    /* v4-mapped for IPv4 */
};

struct tcp_bytes {
    u64 sent;
    u64 received;
};

/* A flow's key in the counter maps: the flow and the generation it was counted in. */
struct tcp_flow_gen_key {
    struct tcp_flow_key flow;
    u32 gen;
    u32 pad;
};

#ifndef PODNET_RTT_SAMPLE_NS
#define PODNET_RTT_SAMPLE_NS 1000000ULL
#endif

#define PODNET_MAPID_TCP_FLOW_BYTES 0
#define PODNET_MAPID_TCP_RTT_HIST 1

struct tcp_sock_info {
    struct tcp_flow_key flow;
    u64 turn_start_ns;  /* when the request in progress started */
    u8 role;            /* PODNET_ROLE_*: set when the connection is established */
    u8 in_request;
    u8 method;          /* PODNET_HTTP_* of the request in progress, 0 if not HTTP */
    u8 flags;           /* PODNET_SOCK_*: what the connection turned out to speak */
    u32 slot;           /* tp_btf: the socket's slot in tcp_sock_slots, PODNET_NO_SLOT if none */
    u64 last_rtt_ns;    /* when this socket last gave an RTT sample */
    u64 id;             /* tp_btf: unique per socket state, never reused */
};

/* tcp_sock_info.flags */
#define PODNET_SOCK_NOT_HTTP 0x1    /* a request on this connection was not HTTP: stop peeking */
#define PODNET_SOCK_H2 0x2          /* HTTP/2: its payloads are walked frame by frame */
#define PODNET_SOCK_H2_LOST 0x4     /* HTTP/2, but its state was lost: nothing more is counted */
#define PODNET_SOCK_H2_SENT 0x8     /* the state of the direction sent exists */
#define PODNET_SOCK_H2_RECEIVED 0x10
#define PODNET_SOCK_TLS 0x20        /* a TLS library's connection: requests come from its plaintext */
#define PODNET_SOCK_TLS_CHECKED 0x40    /* its first request is over: a TLS library would have shown */
#define PODNET_SOCK_TLS_RECORDS 0x80    /* it started with a TLS handshake: its library may show later */

#define PODNET_MAPID_REQUEST_HIST 2
#define PODNET_MAPID_TCP_FLOW_OVERFLOW 3
#define PODNET_MAPID_TCP_SOCK_STATE 4
#define PODNET_MAPID_TCP_SOCK_FINAL 5
#define PODNET_MAPID_TCP_SOCK_SLOTS 6
#define PODNET_MAPID_H2_CONN_DIRS 7     /* an HTTP/2 connection's state was evicted or not created */
#define PODNET_MAPID_H2_STREAMS 8
#define PODNET_MAPID_H2_WALK 9          /* a payload had more frames than the walker's budget */

#ifdef PODNET_TP_BTF
#define PODNET_HOOK(fn) int fn(u64 *ctx)
#define PODNET_ARG(i) (ctx[i])
/* Socket-local storage: found from the socket itself, no hashing, no size limit to tune. */
PODNET_SK_STORAGE(tcp_sock_state, struct tcp_sock_info);

/* A live socket's byte counters, mirrored in exporter/kernel/bpf_structs.py (TcpSockSlot). The
 * poller maps this array and reads the slots below the high-water mark in place. `id` is
 * written last when a socket takes a slot and cleared when it gives it back, so a reader
 * that finds the same id before and after reading the counters read that socket's. */
struct tcp_sock_slot {
    u64 id;
    struct tcp_flow_key flow;
    u64 sent;
    u64 received;
};
#define PODNET_NO_SLOT 0xffffffffU
PODNET_TABLE("array", u32, struct tcp_sock_slot, tcp_sock_slots, PODNET_SOCK_SLOTS, BPF_F_MMAPABLE);
/* Slots given back by dead sockets, taken first (last in, first out, so the slots in use
 * stay below the high-water mark); then never-used slots, counted up in tcp_sock_ids. */
PODNET_STACK(tcp_sock_free_slots, u32, PODNET_SOCK_SLOTS);

/* A dead socket's totals, until the poller takes them (lookup-and-delete): a socket's
 * bytes are in exactly one of its slot and this map, except while a poll reads both; the
 * id tells the poller when it did. */
struct tcp_sock_final {
    struct tcp_flow_key flow;
    u64 sent;
    u64 received;
};
PODNET_TABLE("hash", u64, struct tcp_sock_final, tcp_sock_final, PODNET_SOCK_ENTRIES, BPF_F_NO_PREALLOC);
/* Mirrored in exporter/kernel/bpf_structs.py (TcpSockIds). */
struct tcp_sock_ids {
    u64 last_id;        /* the last socket id given out */
    u64 slots_taken;    /* slots ever taken from the array: the high-water mark */
};
PODNET_TABLE("array", u32, struct tcp_sock_ids, tcp_sock_ids, 1, 0);
#else
#define PODNET_HOOK(fn) int fn(struct bpf_raw_tracepoint_args *ctx)
#define PODNET_ARG(i) (ctx->args[i])
PODNET_TABLE("lru_hash", u64, struct tcp_sock_info, tcp_sock_identity, PODNET_SOCK_ENTRIES, 0);
#endif

PODNET_TABLE("percpu_hash", struct podnet_request_key, struct podnet_hist_val, request_hist, PODNET_HIST_ENTRIES,
             BPF_F_NO_PREALLOC);
/* Per-CPU so the hot path never bounces a cache line between cores; not preallocated so
 * memory follows the number of live flows. */
PODNET_TABLE("percpu_hash", struct tcp_flow_gen_key, struct tcp_bytes, tcp_flow_bytes, PODNET_FLOW_ENTRIES,
             BPF_F_NO_PREALLOC);
/* Bytes of owners whose flow could not get an entry: the owner's totals stay exact. */
PODNET_TABLE("percpu_hash", struct podnet_cgroup_key, struct tcp_bytes, tcp_flow_overflow, PODNET_MAP_ENTRIES,
             BPF_F_NO_PREALLOC);
PODNET_TABLE("percpu_hash", struct podnet_hist_key, struct podnet_hist_val, tcp_rtt_hist, PODNET_HIST_ENTRIES,
             BPF_F_NO_PREALLOC);
PODNET_GEN_TABLE;
PODNET_TABLE("percpu_array", u32, u64, map_update_failures, PODNET_MAX_MAP_IDS, 0);

static __always_inline void podnet_count_failure(u32 id)
{
    u64 *f = map_update_failures.lookup(&id);
    if (f)
        (*f)++;
}

static __always_inline u32 podnet_current_gen(void)
{
    u32 zero = 0;
    u32 *gen = podnet_gen.lookup(&zero);
    return gen ? *gen : 0;
}

static __always_inline void add_bytes(struct tcp_bytes *v, u64 n, int sent)
{
    if (sent)
        v->sent += n;
    else
        v->received += n;
}

static __always_inline void count_flow(const struct tcp_flow_key *id, u64 n, int sent)
{
    struct tcp_flow_gen_key k = {.flow = *id, .gen = podnet_current_gen()};
    struct tcp_bytes *v = tcp_flow_bytes.lookup(&k);
    if (v) {
        add_bytes(v, n, sent);
        return;
    }
    struct tcp_bytes init = {};
    add_bytes(&init, n, sent);
    /* BPF_ANY on a per-CPU map writes only this CPU's slot: a concurrent insert from
     * another CPU cannot overwrite our count. */
    if (!tcp_flow_bytes.update(&k, &init))
        return;
    podnet_count_failure(PODNET_MAPID_TCP_FLOW_BYTES);
    struct podnet_cgroup_key ck = {.cgroup_id = id->cgroup_id, .gen = k.gen};
    v = tcp_flow_overflow.lookup(&ck);
    if (v)
        add_bytes(v, n, sent);
    else if (tcp_flow_overflow.update(&ck, &init))
        podnet_count_failure(PODNET_MAPID_TCP_FLOW_OVERFLOW);
}

static __always_inline void podnet_request_done(u64 cgroup_id, u8 role, u8 protocol, u8 method, u8 status_class,
                                                u8 grpc_status, u64 ns)
{
    struct podnet_request_key k = {.cgroup_id = cgroup_id, .role = role, .protocol = protocol, .method = method,
                                   .status_class = status_class, .grpc_status = grpc_status,
                                   .slot = podnet_hist_slot(ns), .gen = podnet_current_gen()};
    struct podnet_hist_val *v = request_hist.lookup(&k);
    if (v) {
        v->count++;
        v->sum_ns += ns;
        return;
    }
    struct podnet_hist_val init = {.count = 1, .sum_ns = ns};
    if (request_hist.update(&k, &init))
        podnet_count_failure(PODNET_MAPID_REQUEST_HIST);
}

#if defined(PODNET_CAN_PEEK) && !defined(PODNET_NO_HTTP2)
#define PODNET_HTTP2 1
#include "http2.h"
PODNET_TABLE("lru_hash", struct podnet_h2_dir_key, struct podnet_h2_dir, h2_conn_dirs, PODNET_H2_CONNS, 0);
PODNET_TABLE("lru_hash", struct podnet_h2_stream_key, struct podnet_h2_stream, h2_streams_open, PODNET_H2_STREAMS,
             0);
PODNET_TABLE("percpu_array", u32, struct podnet_h2_cursor, h2_cursor, 1, 0);
/* A zeroed direction, to create new ones from: too large for the stack. */
PODNET_TABLE("percpu_array", u32, struct podnet_h2_dir, h2_dir_zero, 1, 0);

/* ---- HTTP/2 streams and the frame walker (bpf/http2.h) ---- */


static __always_inline void podnet_h2_end_stream(struct podnet_h2_cursor *c, struct podnet_h2_stream_key *k,
                                                 struct podnet_h2_stream *st, u8 grpc_status)
{
    u8 protocol = st->grpc ? PODNET_PROTO_GRPC : PODNET_PROTO_HTTP2;
    u64 ns = st->responded ? st->duration_ns : c->now - st->start_ns;
    podnet_request_done(c->cgroup_id, c->role, protocol, st->method, st->status_class,
                        st->grpc ? grpc_status : 0, ns);
    h2_streams_open.delete(k);
}

static __always_inline int podnet_h2_asking(struct podnet_h2_cursor *c)
{
    return c->role == PODNET_ROLE_SERVER ? !c->sent : c->sent;
}

/* A stream's event: a request starts, or its response arrives or ends. */
static __always_inline void podnet_h2_stream_event(struct podnet_h2_cursor *c, struct podnet_h2_event *e)
{
    struct podnet_h2_stream_key k = {.conn = c->conn, .stream = e->stream};
    struct podnet_h2_stream *st = h2_streams_open.lookup(&k);
    if (e->type != PODNET_H2_HEADERS) {
        /* gRPC responses end with trailers; a DATA END_STREAM (no trailers) or a reset ends
         * them too, with no grpc-status. A reset ends any stream not yet counted. */
        if (st && (e->type == PODNET_H2_RST_STREAM || st->responded))
            podnet_h2_end_stream(c, &k, st, 0);
        return;
    }
    if (podnet_h2_asking(c)) {
        if (st)
            return;     /* the request's trailers */
        struct podnet_h2_stream fresh = {.start_ns = c->now, .method = e->method ? e->method : PODNET_HTTP_OTHER,
                                         .grpc = e->grpc};
        if (h2_streams_open.update(&k, &fresh))
            podnet_count_failure(PODNET_MAPID_H2_STREAMS);
        return;
    }
    if (!st) {
        /* Every HTTP/2 connection is followed from its preface: a response (it has a
         * :status; trailers have none) to a client stream (odd) podnet does not know had its
         * entry evicted from h2_streams_open (LRU), and goes uncounted. */
        if (e->status && (e->stream & 1))
            podnet_count_failure(PODNET_MAPID_H2_STREAMS);
        return;
    }
    if (e->grpc)
        st->grpc = 1;
    if (!st->responded) {
        if (e->status == 1 && !(e->flags & PODNET_H2_END_STREAM))
            return;     /* informational: the final response follows */
        st->responded = 1;
        st->duration_ns = c->now - st->start_ns;
        st->status_class = e->status;
    }
    if (!st->grpc || (e->flags & PODNET_H2_END_STREAM))
        podnet_h2_end_stream(c, &k, st, e->grpc_status);
}

static __always_inline void podnet_h2_queue(struct podnet_h2_cursor *c, u32 stream, u8 type, u8 flags,
                                            struct podnet_h2_dir *d)
{
    struct podnet_h2_event *e = &c->ev[c->events & (PODNET_H2_EVENTS - 1)];
    e->stream = stream;
    e->type = type;
    e->flags = flags;
    if (d) {
        e->method = d->r_method;
        e->status = d->r_status;
        e->grpc = d->r_grpc;
        e->grpc_status = d->r_grpc_status;
    }
    c->events++;
}

/* A complete frame header in d->hdr. */
static __always_inline void podnet_h2_frame(struct podnet_h2_cursor *c, struct podnet_h2_dir *d)
{
    u32 len = ((u32)d->hdr[0] << 16) | ((u32)d->hdr[1] << 8) | d->hdr[2];
    u8 type = d->hdr[3], flags = d->hdr[4];
    u32 stream = (((u32)d->hdr[5] & 0x7f) << 24) | ((u32)d->hdr[6] << 16) | ((u32)d->hdr[7] << 8) | d->hdr[8];
    d->have = 0;
    if (type == PODNET_H2_HEADERS || (type == PODNET_H2_CONTINUATION && stream == d->blk_stream)) {
        if (type == PODNET_H2_HEADERS) {
            d->blk_stream = stream;
            d->blk_flags = flags;
            d->blk_len = 0;
            d->blk_pos = 0;
            d->truncated = 0;
            d->r_method = d->r_status = d->r_grpc = d->r_grpc_status = 0;
        }
        d->blk_end_headers = flags & PODNET_H2_END_HEADERS;
        d->collect = len;
        if (!len && d->blk_end_headers) {
            d->blk_pos = 0;
            d->parsing = 1;
        }
        return;
    }
    /* DATA ends a response without trailers; nothing of a request's DATA matters. */
    if ((type == PODNET_H2_DATA && (flags & PODNET_H2_END_STREAM) && !podnet_h2_asking(c)) ||
        type == PODNET_H2_RST_STREAM)
        podnet_h2_queue(c, stream, type, flags, 0);
    d->skip = len;
}

/* One step; 1 when the payload is done. */
static __always_inline int podnet_h2_step(struct podnet_h2_cursor *c, struct podnet_h2_dir *d)
{
    if (d->parsing) {
        if (d->blk_pos < d->blk_len && d->blk_pos < PODNET_H2_BLOCK) {
            podnet_h2_field(d);
            return 0;
        }
        if (d->truncated)
            d->lost = 1;
        d->parsing = 0;
        podnet_h2_queue(c, d->blk_stream, PODNET_H2_HEADERS, d->blk_flags, d);
        return 0;
    }
    if (c->pos >= c->seglen) {
        if (c->left <= c->seglen)
            return 1;
        c->left -= c->seglen;
        c->idx++;
        if (!c->iov || c->idx >= c->cnt)
            return 1;
        u64 v[2] = {};
        if (bpf_probe_read_user(v, sizeof(v), c->iov + 16 * c->idx))
            return 1;
        c->seg = (const char *)v[0];
        c->seglen = v[1] < c->left ? v[1] : c->left;
        c->pos = 0;
        return 0;
    }
    u64 avail = c->seglen - c->pos;
    if (d->skip) {
        u64 n = d->skip < avail ? d->skip : avail;
        d->skip -= n;
        c->pos += n;
        return 0;
    }
    if (d->collect) {
        /* HEADERS fragments: the pad length, priority and padding are copied along and
         * dealt with when the frame is complete. */
        u32 n = d->collect < avail ? d->collect : avail;
        u32 room = d->blk_len < PODNET_H2_BLOCK ? PODNET_H2_BLOCK - d->blk_len : 0;
        if (n > room) {
            d->truncated = 1;
            n = room;
        }
        if (n > 255)
            n = 255;
        if (n) {
            u32 off = d->blk_len;
            asm volatile("%[off] &= 511" : [off] "+r"(off));
            asm volatile("%[n] &= 255" : [n] "+r"(n));
            if (bpf_probe_read_user(&d->blk[off], n, c->seg + c->pos))
                return 1;
            d->blk_len += n;
        } else {
            /* No room left: pass over the rest of the fragment. */
            n = d->collect < avail ? d->collect : avail;
        }
        d->collect -= n;
        c->pos += n;
        if (!d->collect) {
            podnet_h2_fragment_done(d, !(d->blk_flags & PODNET_H2_FRAGMENT_DONE));
            d->blk_flags |= PODNET_H2_FRAGMENT_DONE;
            if (d->blk_end_headers)
                d->parsing = 1;
        }
        return 0;
    }
    u32 have = d->have;
    if (have == 0 && avail >= 9) {
        if (bpf_probe_read_user(d->hdr, 9, c->seg + c->pos))
            return 1;
        c->pos += 9;
        podnet_h2_frame(c, d);
        return 0;
    }
    /* A frame header split across buffers: assemble it byte by byte. */
    if (have > 8)
        have = 8;
    u8 b = 0;
    if (bpf_probe_read_user(&b, 1, c->seg + c->pos))
        return 1;
    d->hdr[have & 15] = b;
    d->have = have + 1;
    c->pos++;
    if (d->have >= 9)
        podnet_h2_frame(c, d);
    return 0;
}

/* The payload outgrew the walker's budget: where the next frame starts is unknown. */
static __always_inline void podnet_h2_lose(struct podnet_h2_cursor *c)
{
    struct podnet_h2_dir_key k = {.conn = c->conn, .sent = c->sent};
    struct podnet_h2_dir *d = h2_conn_dirs.lookup(&k);
    if (d)
        d->dead = 1;
    podnet_count_failure(PODNET_MAPID_H2_WALK);
}

/* The walker program's body: 0 when more remains for another tail call. */
static __always_inline int podnet_h2_walk(void)
{
    u32 zero = 0;
    struct podnet_h2_cursor *c = h2_cursor.lookup(&zero);
    if (!c)
        return 1;
    struct podnet_h2_dir_key k = {.conn = c->conn, .sent = c->sent};
    struct podnet_h2_dir *d = h2_conn_dirs.lookup(&k);
    if (!d || d->dead)
        return 1;
    int done = 0;
    c->events = 0;
    for (int i = 0; i < PODNET_H2_STEPS && c->events < PODNET_H2_EVENTS; i++) {
        if (podnet_h2_step(c, d)) {
            done = 1;
            break;
        }
    }
#pragma unroll
    for (int i = 0; i < PODNET_H2_EVENTS; i++)
        if (i < c->events)
            podnet_h2_stream_event(c, &c->ev[i]);
    if (done)
        return 1;
    if (++c->tails < PODNET_H2_TAILS)
        return 0;
    podnet_h2_lose(c);
    return 1;
}

/* Point the cursor at this syscall's payload; 1 when there is something to walk. */
static __always_inline int podnet_h2_start(u64 conn, u64 cgroup_id, u8 role, u8 *flags, int sent, int len, u64 now,
                                           int preface, const char *plain)
{
    if (*flags & PODNET_SOCK_H2_LOST)
        return 0;
    u8 made = sent ? PODNET_SOCK_H2_SENT : PODNET_SOCK_H2_RECEIVED;
    struct podnet_h2_dir_key k = {.conn = conn, .sent = sent};
    struct podnet_h2_dir *d = h2_conn_dirs.lookup(&k);
    u32 zero = 0;
    if (!d && !(*flags & made)) {
        struct podnet_h2_dir *z = h2_dir_zero.lookup(&zero);
        if (z && !h2_conn_dirs.update(&k, z)) {
            *flags |= made;
            d = h2_conn_dirs.lookup(&k);
        }
    }
    if (!d) {
        /* Evicted (more HTTP/2 connections than PODNET_H2_CONNS) or never created: this
         * connection's frame boundaries are lost for good. */
        *flags |= PODNET_SOCK_H2_LOST;
        podnet_count_failure(PODNET_MAPID_H2_CONN_DIRS);
        return 0;
    }
    if (d->dead)
        return 0;
    if (preface)
        d->skip = 24;
    struct podnet_sysbuf b = {.buf = plain};
    if (!plain && podnet_syscall_buffer(&b))
        return 0;
    struct podnet_h2_cursor *c = h2_cursor.lookup(&zero);
    if (!c)
        return 0;
    c->conn = conn;
    c->sent = sent;
    c->cgroup_id = cgroup_id;
    c->role = role;
    c->now = now;
    c->tails = 0;
    c->left = len;
    c->pos = 0;
    c->idx = 0;
    c->iov = b.iov;
    if (b.iov) {
        u64 v[2] = {};
        if (!b.cnt || bpf_probe_read_user(v, sizeof(v), b.iov))
            return 0;
        c->cnt = b.cnt;
        c->seg = (const char *)v[0];
        c->seglen = v[1] < (u64)len ? v[1] : (u64)len;
    } else {
        c->cnt = 1;
        c->seg = b.buf;
        c->seglen = len;
    }
    return 1;
}

static __always_inline void podnet_h2_forget(u64 conn)
{
    struct podnet_h2_dir_key k = {.conn = conn, .sent = 1};
    h2_conn_dirs.delete(&k);
    k.sent = 0;
    h2_conn_dirs.delete(&k);
}


/* The walker program for each hook: a tail call stays within one hook's program type. */
PODNET_TABLE("prog", u32, u32, h2_walk_sent, 1, 0);
PODNET_TABLE("prog", u32, u32, h2_walk_received, 1, 0);

PODNET_HOOK(h2_walk_on_sent)
{
    if (!podnet_h2_walk())
        h2_walk_sent.call(ctx, 0);
    return 0;
}

PODNET_HOOK(h2_walk_on_received)
{
    if (!podnet_h2_walk())
        h2_walk_received.call(ctx, 0);
    return 0;
}
#endif

#ifdef PODNET_TP_BTF
static __always_inline struct tcp_sock_info *cached_state(const void *sk)
{
    return tcp_sock_state.sk_storage_get((void *)sk, 0, 0);
}

/* A free slot for a new socket's counters, PODNET_NO_SLOT when every slot is taken. */
static __always_inline u32 take_slot(struct tcp_sock_ids *ids)
{
    u32 slot;
    if (!tcp_sock_free_slots.pop(&slot))
        return slot;
    u64 fresh = __sync_fetch_and_add(&ids->slots_taken, 1);
    if (fresh < PODNET_SOCK_SLOTS)
        return (u32)fresh;
    /* Full: undo, so that the high-water mark never passes the array's end. */
    __sync_fetch_and_add(&ids->slots_taken, -1);
    podnet_count_failure(PODNET_MAPID_TCP_SOCK_SLOTS);
    return PODNET_NO_SLOT;
}

static __always_inline struct tcp_sock_info *new_state(const void *sk, struct tcp_sock_info *fresh)
{
    u32 zero = 0;
    struct tcp_sock_ids *ids = tcp_sock_ids.lookup(&zero);
    if (!ids)
        return 0;
    /* Set before the storage exists: two CPUs creating it at once agree on one value. */
    fresh->id = __sync_fetch_and_add(&ids->last_id, 1) + 1;
    fresh->slot = PODNET_NO_SLOT;
    struct tcp_sock_info *info = tcp_sock_state.sk_storage_get((void *)sk, fresh, BPF_SK_STORAGE_GET_F_CREATE);
    if (!info || info->id != fresh->id || info->slot != PODNET_NO_SLOT)
        return info;    /* none, or another CPU created it first (and takes the slot) */
    u32 slot = take_slot(ids);
    struct tcp_sock_slot *s = tcp_sock_slots.lookup(&slot);
    if (!s)
        return info;    /* no slot: the socket's bytes go to tcp_flow_bytes */
    s->flow = info->flow;
    s->sent = 0;
    s->received = 0;
    /* The counters are in place before the id claims them for this socket. */
    asm volatile("" ::: "memory");
    s->id = info->id;
    info->slot = slot;
    return info;
}

static __always_inline void count_socket(struct tcp_sock_info *info, int ret, int sent)
{
    u32 slot = info->slot;
    struct tcp_sock_slot *s = tcp_sock_slots.lookup(&slot);
    if (!s) {
        count_flow(&info->flow, ret, sent);
        return;
    }
    /* Atomic: two threads may send on one socket at once. */
    if (sent)
        __sync_fetch_and_add(&s->sent, ret);
    else
        __sync_fetch_and_add(&s->received, ret);
}

/* The socket dies or starts a new connection: hand its totals to the poller, give its
 * slot back, then drop its state. */
static __always_inline void forget_state(const void *sk)
{
    struct tcp_sock_info *info = cached_state(sk);
    if (!info)
        return;
    u32 slot = info->slot;
    struct tcp_sock_slot *s = tcp_sock_slots.lookup(&slot);
    if (s && s->id == info->id) {
        struct tcp_sock_final f = {.flow = s->flow, .sent = s->sent, .received = s->received};
        u64 id = info->id;
        if ((f.sent || f.received) && tcp_sock_final.update(&id, &f)) {
            /* Full: into the flow counters instead. Exact, unless a poll reads this slot
             * before its id is cleared below (then counted twice in that poll). */
            podnet_count_failure(PODNET_MAPID_TCP_SOCK_FINAL);
            count_flow(&f.flow, f.sent, 1);
            count_flow(&f.flow, f.received, 0);
        }
        /* From here on a poll reads these bytes from the hand-over only. */
        asm volatile("" ::: "memory");
        s->id = 0;
        tcp_sock_free_slots.push(&slot, 0);
    }
#ifdef PODNET_HTTP2
    if (info->flags & PODNET_SOCK_H2)
        podnet_h2_forget((u64)sk);
#endif
    tcp_sock_state.sk_storage_delete((void *)sk);
}
#else
static __always_inline struct tcp_sock_info *cached_state(const void *sk)
{
    u64 skaddr = (u64)sk;
    return tcp_sock_identity.lookup(&skaddr);
}

static __always_inline struct tcp_sock_info *new_state(const void *sk, struct tcp_sock_info *fresh)
{
    u64 skaddr = (u64)sk;
    tcp_sock_identity.update(&skaddr, fresh);
    return tcp_sock_identity.lookup(&skaddr);
}

static __always_inline void forget_state(const void *sk)
{
    u64 skaddr = (u64)sk;
#ifdef PODNET_HTTP2
    struct tcp_sock_info *info = tcp_sock_identity.lookup(&skaddr);
    if (info && (info->flags & PODNET_SOCK_H2))
        podnet_h2_forget(skaddr);
#endif
    tcp_sock_identity.delete(&skaddr);
}

static __always_inline void count_socket(struct tcp_sock_info *info, int ret, int sent)
{
    count_flow(&info->flow, ret, sent);
}
#endif

/* Resolves the socket's (owner, peer) into *fresh; 0 for sockets that are not inet TCP or
 * whose owner is unknown. */
static __always_inline int resolve_identity(const void *sk, struct tcp_sock_info *fresh)
{
    if (!podnet_sk_is_inet_tcp(sk))
        return 0;
    fresh->flow.cgroup_id = podnet_sk_cgroup_id(sk);
    if (!fresh->flow.cgroup_id)
        return 0;
    podnet_sk_peer(sk, fresh->flow.peer);
    return 1;
}

static __always_inline void observe_request(struct tcp_sock_info *info, u64 ns, u8 status_class)
{
    u8 protocol = (info->method || status_class) ? PODNET_PROTO_HTTP : PODNET_PROTO_OTHER;
    podnet_request_done(info->flow.cgroup_id, info->role, protocol, info->method, status_class, 0, ns);
}

/* The socket's smoothed RTT (tcp_sock.srtt_us, microseconds << 3) into its owner's
 * histogram. */
static __always_inline void observe_rtt(const void *sk, struct tcp_sock_info *info)
{
    /* tcp_sock lies beyond struct sock: not a plain load even for tp_btf. */
    u32 srtt8 = podnet_probe_u32(sk, PODNET_OFF_TCP_SRTT_US);
    if (!srtt8)
        return;
    u64 ns = (u64)srtt8 * 125;
    struct podnet_hist_key k = {.cgroup_id = info->flow.cgroup_id, .slot = podnet_hist_slot(ns),
                                .gen = podnet_current_gen()};
    struct podnet_hist_val *v = tcp_rtt_hist.lookup(&k);
    if (v) {
        v->count++;
        v->sum_ns += ns;
        return;
    }
    struct podnet_hist_val init = {.count = 1, .sum_ns = ns};
    if (tcp_rtt_hist.update(&k, &init))
        podnet_count_failure(PODNET_MAPID_TCP_RTT_HIST);
}

/* The request state machine: called for each send/recv with data. */
static __always_inline void track_turn(struct tcp_sock_info *info, int sent, int len, u64 now, const char *plain)
{
    if (!info->role)    /* established before podnet started: whoever speaks first asks */
        info->role = sent ? PODNET_ROLE_CLIENT : PODNET_ROLE_SERVER;
    int asking = (info->role == PODNET_ROLE_SERVER) ? !sent : sent;
    if (!info->in_request) {
        if (!asking)
            return;     /* more of the previous response */
        info->in_request = 1;
        info->turn_start_ns = now;
        info->method = (info->flags & PODNET_SOCK_NOT_HTTP) ? 0 : podnet_peek_method(len, plain);
        if (info->method == PODNET_TLS_RECORD) {
            info->flags |= PODNET_SOCK_TLS_RECORDS;
            info->method = 0;
        }
        if (info->method == PODNET_HTTP2_PREFACE) {
            /* HTTP/2 from here on: streams, not turns, are its requests. */
            info->flags |= PODNET_SOCK_H2;
            info->in_request = 0;
            info->method = 0;
        }
        return;
    }
    if (asking)
        return;         /* more of the request */
    info->in_request = 0;
    u64 ns = now - info->turn_start_ns;
    u8 status = (info->flags & PODNET_SOCK_NOT_HTTP) ? 0 : podnet_peek_status_class(len, plain);
    /* A connection does not turn into HTTP/1.x later: once a request was something else,
     * its payload is never read again. */
    if (!info->method && !status)
        info->flags |= PODNET_SOCK_NOT_HTTP;
    info->flags |= PODNET_SOCK_TLS_CHECKED;
    observe_request(info, ns, status);
}

/* Requests of one payload on a connection (a socket; or a TLS library's connection object,
 * `plain` its plaintext): 1 when the payload is to be walked as HTTP/2. */
static __always_inline int track_requests(u64 conn, struct tcp_sock_info *info, int sent, int len, u64 now,
                                          const char *plain)
{
#ifdef PODNET_HTTP2
    if (info->flags & PODNET_SOCK_H2)
        return podnet_h2_start(conn, info->flow.cgroup_id, info->role, &info->flags, sent, len, now, 0, plain);
    track_turn(info, sent, len, now, plain);
    if (info->flags & PODNET_SOCK_H2)
        return podnet_h2_start(conn, info->flow.cgroup_id, info->role, &info->flags, sent, len, now, 1, plain);
#else
    track_turn(info, sent, len, now, plain);
#endif
    return 0;
}

#ifdef PODNET_TLS
/* ---- TLS: OpenSSL's plaintext, through uprobes (user space calls the library) ----
 *
 * Entry probes of SSL_write/SSL_read (and _ex) and SSL_do_handshake note the call per
 * thread; the socket hook of the same thread, seeing a call in progress, marks the socket
 * as the library's (no turns of ciphertext are counted on it) and tells the call the
 * socket's owner and role; the return probe hands the plaintext to the same recognition as
 * sockets, on state kept per SSL object (forgotten at SSL_free). Arguments are read from
 * the probe's registers at BTF-resolved offsets (x86-64 SysV: di, si, dx, cx; ax returns).
 */
#define PODNET_TLS_WRITE 1
#define PODNET_TLS_READ 2
#define PODNET_TLS_HANDSHAKE 3

#ifndef PODNET_TLS_CONNS
#define PODNET_TLS_CONNS 16384
#endif

struct podnet_tls_call {
    u64 ssl;
    const char *buf;
    u64 *len_out;       /* _ex forms: where the library writes the byte count */
    u64 cgroup_id;      /* the socket's owner, from the socket hook (0: not seen) */
    u8 kind;            /* PODNET_TLS_* */
    u8 role;            /* the socket's role, from the socket hook */
    u8 pad[6];
};

PODNET_TABLE("lru_hash", u64, struct podnet_tls_call, tls_calls_active, PODNET_TLS_CONNS, 0);
/* Per SSL object: the request state a socket has (role, turn, HTTP/2 flags). */
PODNET_TABLE("lru_hash", u64, struct tcp_sock_info, tls_conn_state, PODNET_TLS_CONNS, 0);
PODNET_TABLE("prog", u32, u32, h2_walk_tls, 1, 0);

#define PODNET_REG(ctx, off) (*(u64 *)((char *)(ctx) + (off)))

static __always_inline void podnet_tls_claim(const void *sk, struct tcp_sock_info *info)
{
    u64 id = bpf_get_current_pid_tgid();
    struct podnet_tls_call *call = tls_calls_active.lookup(&id);
    if (!call)
        return;
    info->flags |= PODNET_SOCK_TLS;
    info->in_request = 0;
    call->cgroup_id = info->flow.cgroup_id;
    call->role = info->role;
}

static __always_inline int podnet_tls_enter(void *ctx, u8 kind, int ex)
{
    u64 id = bpf_get_current_pid_tgid();
    struct podnet_tls_call call = {.ssl = PODNET_REG(ctx, PODNET_OFF_PT_REGS_DI), .kind = kind};
    if (kind != PODNET_TLS_HANDSHAKE) {
        call.buf = (const char *)PODNET_REG(ctx, PODNET_OFF_PT_REGS_SI);
        if (ex)
            call.len_out = (u64 *)PODNET_REG(ctx, PODNET_OFF_PT_REGS_CX);
    }
    tls_calls_active.update(&id, &call);
    return 0;
}

int on_ssl_write(void *ctx) { return podnet_tls_enter(ctx, PODNET_TLS_WRITE, 0); }
int on_ssl_write_ex(void *ctx) { return podnet_tls_enter(ctx, PODNET_TLS_WRITE, 1); }
int on_ssl_read(void *ctx) { return podnet_tls_enter(ctx, PODNET_TLS_READ, 0); }
int on_ssl_read_ex(void *ctx) { return podnet_tls_enter(ctx, PODNET_TLS_READ, 1); }
int on_ssl_handshake(void *ctx) { return podnet_tls_enter(ctx, PODNET_TLS_HANDSHAKE, 0); }

/* The return of any of them. */
int on_ssl_return(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct podnet_tls_call *found = tls_calls_active.lookup(&id);
    if (!found)
        return 0;
    struct podnet_tls_call call = *found;
    tls_calls_active.delete(&id);
    s64 rc = (s64)PODNET_REG(ctx, PODNET_OFF_PT_REGS_AX);
    u64 len = 0;
    if (call.kind == PODNET_TLS_HANDSHAKE) {
        /* The connection's role, learnt from its socket: a server may write first (an
         * HTTP/2 server's SETTINGS). */
        if (call.role && !tls_conn_state.lookup(&call.ssl)) {
            struct tcp_sock_info fresh = {.role = call.role, .id = 1};
            fresh.flow.cgroup_id = call.cgroup_id;
            tls_conn_state.update(&call.ssl, &fresh);
        }
        return 0;
    }
    if (rc <= 0)
        return 0;
    if (call.len_out) {
        if (rc != 1 || bpf_probe_read_user(&len, sizeof(len), call.len_out))
            return 0;
    } else {
        len = rc;
    }
    if (!len || len > 0x7fffffff)
        return 0;
    struct tcp_sock_info *info = tls_conn_state.lookup(&call.ssl);
    if (!info) {
        /* A connection never seen on its socket: its records go through memory (a memory
         * BIO, as Python's asyncio has them) and reach the socket outside the library's
         * calls, so the socket counts its turns; counting the plaintext as well would count
         * each request twice. (A buffered read before any socket I/O: the next call ties.) */
        if (!call.cgroup_id)
            return 0;
        struct tcp_sock_info fresh = {.role = call.role, .id = 1};
        fresh.flow.cgroup_id = call.cgroup_id;
        tls_conn_state.update(&call.ssl, &fresh);
        info = tls_conn_state.lookup(&call.ssl);
        if (!info)
            return 0;
    }
    if (!info->role && call.role)
        info->role = call.role;
    int walk = track_requests(call.ssl, info, call.kind == PODNET_TLS_WRITE, (int)len, bpf_ktime_get_ns(), call.buf);
#ifdef PODNET_HTTP2
    if (walk)
        h2_walk_tls.call(ctx, 0);
#endif
    return 0;
}

int on_ssl_free(void *ctx)
{
    u64 ssl = PODNET_REG(ctx, PODNET_OFF_PT_REGS_DI);
#ifdef PODNET_HTTP2
    struct tcp_sock_info *info = tls_conn_state.lookup(&ssl);
    if (info && (info->flags & PODNET_SOCK_H2))
        podnet_h2_forget(ssl);
#endif
    tls_conn_state.delete(&ssl);
    return 0;
}

#ifdef PODNET_HTTP2
int h2_walk_on_tls(void *ctx)
{
    if (!podnet_h2_walk())
        h2_walk_tls.call(ctx, 0);
    return 0;
}
#endif
#endif /* PODNET_TLS */

/* First sight of a socket: its state, created from its identity (left in *fresh). NULL
 * for sockets podnet does not track (fresh->flow.cgroup_id stays 0) and when there is no
 * room for the state (counted). */
static __always_inline struct tcp_sock_info *create_state(const void *sk, struct tcp_sock_info *fresh)
{
    if (!resolve_identity(sk, fresh))
        return 0;
    struct tcp_sock_info *info = new_state(sk, fresh);
    if (!info)
        podnet_count_failure(PODNET_MAPID_TCP_SOCK_STATE);
    return info;
}

/* Returns 1 when the payload is to be walked as HTTP/2 (the caller tail-calls the walker). */
static __always_inline int count_bytes(const void *sk, int ret, int flags, int sent)
{
    if (ret <= 0 || !sk)
        return 0;
    /* Peeked bytes are read again by a later recv(): count them once, then. */
    if (!sent && (flags & PODNET_MSG_PEEK))
        return 0;
    struct tcp_sock_info *info = cached_state(sk);
    if (!info) {
        struct tcp_sock_info fresh = {};
        info = create_state(sk, &fresh);
        if (!info) {
            /* No room for the socket's state: its bytes still count, its requests and
             * RTT do not. */
            if (fresh.flow.cgroup_id)
                count_flow(&fresh.flow, ret, sent);
            return 0;
        }
    }
    /* RTT: one sample of the smoothed RTT per socket and PODNET_RTT_SAMPLE_NS of activity.
     * Sampling per segment (tcp:tcp_probe) would cost a hook run per packet, ACKs
     * included, and weigh bulk transfers over everything else. */
    int walk = 0;
#ifndef PODNET_NO_REQUESTS
    u64 now = bpf_ktime_get_ns();
#ifdef PODNET_TLS
    /* Until its first request is over; and on every TLS connection: a library attached
     * later (a container's own, found at the next scan) takes its connections over then. */
    if (!(info->flags & PODNET_SOCK_TLS_CHECKED) || (info->flags & (PODNET_SOCK_TLS | PODNET_SOCK_TLS_RECORDS)))
        podnet_tls_claim(sk, info);
    /* A TLS library's connection: its requests are read from the plaintext (uprobes). */
    if (!(info->flags & PODNET_SOCK_TLS))
#endif
        walk = track_requests((u64)sk, info, sent, ret, now, 0);
    if (now - info->last_rtt_ns >= PODNET_RTT_SAMPLE_NS) {
#else
    /* Without requests nothing else needs the clock: space the samples by the tick
     * instead, which costs a load, not a clock read. */
    u64 now = bpf_jiffies64();
    if (now != info->last_rtt_ns) {
#endif
        info->last_rtt_ns = now;
        observe_rtt(sk, info);
    }
    count_socket(info, ret, sent);
    return walk;
}

PODNET_HOOK(on_sock_send_length)
{
    int walk = count_bytes((const void *)PODNET_ARG(0), (int)PODNET_ARG(1), (int)PODNET_ARG(2), 1);
#ifdef PODNET_HTTP2
    if (walk)
        h2_walk_sent.call(ctx, 0);
#endif
    return 0;
}

PODNET_HOOK(on_sock_recv_length)
{
    int walk = count_bytes((const void *)PODNET_ARG(0), (int)PODNET_ARG(1), (int)PODNET_ARG(2), 0);
#ifdef PODNET_HTTP2
    if (walk)
        h2_walk_received.call(ctx, 0);
#endif
    return 0;
}

PODNET_HOOK(on_tcp_destroy_sock)
{
    forget_state((const void *)PODNET_ARG(0));
    return 0;
}

/* Learn each connection's role when it is established; forget what a socket knew when
 * it connects (again): after connect(AF_UNSPEC) a socket may connect to another peer.
 * Not on the way to CLOSE: a reply that arrived with the peer's FIN is read after the
 * socket closed, and still ends its request. */
PODNET_HOOK(on_traffic_sock_state)
{
    const void *sk = (const void *)PODNET_ARG(0);
    int oldstate = (int)PODNET_ARG(1);
    int newstate = (int)PODNET_ARG(2);
    if (!sk)
        return 0;
    if (newstate == PODNET_TCP_SYN_SENT) {
        forget_state(sk);
        return 0;
    }
    if (newstate != PODNET_TCP_ESTABLISHED)
        return 0;
    if (oldstate != PODNET_TCP_SYN_SENT && oldstate != PODNET_TCP_SYN_RECV)
        return 0;
    struct tcp_sock_info *info = cached_state(sk);
    if (!info) {
        struct tcp_sock_info fresh = {};
        info = create_state(sk, &fresh);
        if (!info)
            return 0;
    }
    info->role = oldstate == PODNET_TCP_SYN_SENT ? PODNET_ROLE_CLIENT : PODNET_ROLE_SERVER;
    return 0;
}
