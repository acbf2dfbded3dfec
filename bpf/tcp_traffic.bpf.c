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
    u8 not_http;        /* a request on this connection was not HTTP: stop peeking */
    u32 slot;           /* tp_btf: the socket's slot in tcp_sock_slots, PODNET_NO_SLOT if none */
    u64 last_rtt_ns;    /* when this socket last gave an RTT sample */
    u64 id;             /* tp_btf: unique per socket state, never reused */
};

#define PODNET_MAPID_REQUEST_HIST 2
#define PODNET_MAPID_TCP_FLOW_OVERFLOW 3
#define PODNET_MAPID_TCP_SOCK_STATE 4
#define PODNET_MAPID_TCP_SOCK_FINAL 5
#define PODNET_MAPID_TCP_SOCK_SLOTS 6

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
    struct podnet_request_key k = {.cgroup_id = info->flow.cgroup_id, .role = info->role, .protocol = protocol,
                                   .method = info->method, .status_class = status_class,
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
static __always_inline void track_turn(struct tcp_sock_info *info, int sent, int len, u64 now)
{
    if (!info->role)    /* established before podnet started: whoever speaks first asks */
        info->role = sent ? PODNET_ROLE_CLIENT : PODNET_ROLE_SERVER;
    int asking = (info->role == PODNET_ROLE_SERVER) ? !sent : sent;
    if (!info->in_request) {
        if (!asking)
            return;     /* more of the previous response */
        info->in_request = 1;
        info->turn_start_ns = now;
        info->method = info->not_http ? 0 : podnet_peek_method(len);
        return;
    }
    if (asking)
        return;         /* more of the request */
    info->in_request = 0;
    u64 ns = now - info->turn_start_ns;
    u8 status = info->not_http ? 0 : podnet_peek_status_class(len);
    /* A connection does not turn into HTTP/1.x later: once a request was something else,
     * its payload is never read again. */
    if (!info->method && !status)
        info->not_http = 1;
    observe_request(info, ns, status);
}

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
#ifndef PODNET_NO_REQUESTS
    u64 now = bpf_ktime_get_ns();
    track_turn(info, sent, ret, now);
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
    return 0;
}

PODNET_HOOK(on_sock_send_length)
{
    return count_bytes((const void *)PODNET_ARG(0), (int)PODNET_ARG(1), (int)PODNET_ARG(2), 1);
}

PODNET_HOOK(on_sock_recv_length)
{
    return count_bytes((const void *)PODNET_ARG(0), (int)PODNET_ARG(1), (int)PODNET_ARG(2), 0);
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
