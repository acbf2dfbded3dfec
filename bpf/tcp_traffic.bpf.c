/* The hot path: TCP payload bytes per (owner, peer), smoothed RTT and requests per owner.
 *
 * Raw tracepoints:
 *   sock:sock_send_length, sock:sock_recv_length (struct sock *sk, int ret, int flags):
 *     ret is what the application handed to / took from the socket; the socket's smoothed
 *     RTT is sampled here too, at most once per PODNET_RTT_SAMPLE_NS per socket;
 *   tcp:tcp_destroy_sock (struct sock *sk) and sock:inet_sock_set_state (sk, old, new):
 *     forget a socket's cached identity when it dies or disconnects.
 *
 * Reading a field through bpf_probe_read_kernel() costs ~35 ns here, and naming a socket's
 * owner takes five reads; so each TCP socket's (owner cgroup, peer) is resolved once and
 * kept in an LRU cache keyed by the socket's address. A cache hit is one hash lookup. An
 * entry is dropped when its socket is destroyed or disconnected, so a recycled address
 * never inherits a dead socket's identity; LRU eviction of a live entry only costs a
 * re-resolve. Per-pod byte totals are the sum of the pod's flows, so each event updates
 * one counter.
 *
 * Requests: on each connection a request is a turn of the conversation. On a server
 * socket, data received while idle starts a request and the first data sent back ends it;
 * on a client socket, the mirror image. At those two moments only, the first bytes of the
 * syscall's user buffer are read (found through the task's saved syscall registers) to
 * recognise HTTP/1.x methods and status lines; nothing is hooked on other syscalls.
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
    u8 pad[4];
    u64 last_rtt_ns;    /* when this socket last gave an RTT sample */
};

#define PODNET_MAPID_REQUEST_HIST 2
#define PODNET_MAPID_TCP_FLOW_OVERFLOW 3

BPF_TABLE("lru_hash", u64, struct tcp_sock_info, tcp_sock_identity, PODNET_SOCK_ENTRIES);
BPF_F_TABLE("percpu_hash", struct podnet_request_key, struct podnet_hist_val, request_hist, PODNET_HIST_ENTRIES,
            BPF_F_NO_PREALLOC);
/* Per-CPU so the hot path never bounces a cache line between cores; not preallocated so
 * memory follows the number of live flows. */
BPF_F_TABLE("percpu_hash", struct tcp_flow_key, struct tcp_bytes, tcp_flow_bytes, PODNET_FLOW_ENTRIES,
            BPF_F_NO_PREALLOC);
/* Bytes of owners whose flow could not get an entry: the owner's totals stay exact. */
BPF_F_TABLE("percpu_hash", u64, struct tcp_bytes, tcp_flow_overflow, PODNET_MAP_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash", struct podnet_hist_key, struct podnet_hist_val, tcp_rtt_hist, PODNET_HIST_ENTRIES,
            BPF_F_NO_PREALLOC);
BPF_PERCPU_ARRAY(map_update_failures, u64, PODNET_MAX_MAP_IDS);

static __always_inline void podnet_count_failure(u32 id)
{
    u64 *f = map_update_failures.lookup(&id);
    if (f)
        (*f)++;
}

/* The socket's (owner, peer), from the cache or resolved and cached; NULL for sockets
 * that are not inet TCP or whose owner is unknown. */
static __always_inline struct tcp_sock_info *identity_of(const void *sk)
{
    u64 skaddr = (u64)sk;
    struct tcp_sock_info *id = tcp_sock_identity.lookup(&skaddr);
    if (id)
        return id;
    if (!podnet_sk_is_inet_tcp(sk))
        return NULL;
    struct tcp_sock_info fresh = {.flow = {.cgroup_id = podnet_sk_cgroup_id(sk)}};
    if (!fresh.flow.cgroup_id)
        return NULL;
    podnet_sk_peer(sk, fresh.flow.peer);
    tcp_sock_identity.update(&skaddr, &fresh);
    return tcp_sock_identity.lookup(&skaddr);
}

static __always_inline void add_bytes(struct tcp_bytes *v, u64 n, int sent)
{
    if (sent)
        v->sent += n;
    else
        v->received += n;
}

static __always_inline void observe_request(struct tcp_sock_info *info, u64 ns, u8 status_class)
{
    u8 protocol = (info->method || status_class) ? PODNET_PROTO_HTTP : PODNET_PROTO_OTHER;
    struct podnet_request_key k = {.cgroup_id = info->flow.cgroup_id, .role = info->role, .protocol = protocol,
                                   .method = info->method, .status_class = status_class,
                                   .slot = podnet_hist_slot(ns)};
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
    u32 srtt8 = podnet_read_u32(sk, PODNET_OFF_TCP_SRTT_US);
    if (!srtt8)
        return;
    u64 ns = (u64)srtt8 * 125;
    struct podnet_hist_key k = {.cgroup_id = info->flow.cgroup_id, .slot = podnet_hist_slot(ns)};
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

static __always_inline int count_bytes(struct bpf_raw_tracepoint_args *ctx, int sent)
{
    const void *sk = (const void *)ctx->args[0];
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];

    if (ret <= 0 || !sk)
        return 0;
    /* Peeked bytes are read again by a later recv(): count them once, then. */
    if (!sent && (flags & PODNET_MSG_PEEK))
        return 0;
    struct tcp_sock_info *info = identity_of(sk);
    if (!info)
        return 0;
    u64 now = bpf_ktime_get_ns();
    track_turn(info, sent, ret, now);
    /* RTT: one sample of the smoothed RTT per socket and PODNET_RTT_SAMPLE_NS of activity.
     * Sampling per segment (tcp:tcp_probe) would cost a hook run per packet, ACKs
     * included, and weigh bulk transfers over everything else. */
    if (now - info->last_rtt_ns >= PODNET_RTT_SAMPLE_NS) {
        info->last_rtt_ns = now;
        observe_rtt(sk, info);
    }
    struct tcp_flow_key *id = &info->flow;
    struct tcp_bytes *v = tcp_flow_bytes.lookup(id);
    if (v) {
        add_bytes(v, ret, sent);
        return 0;
    }
    struct tcp_bytes init = {};
    add_bytes(&init, ret, sent);
    /* BPF_ANY on a per-CPU map writes only this CPU's slot: a concurrent insert from
     * another CPU cannot overwrite our count. */
    if (!tcp_flow_bytes.update(id, &init))
        return 0;
    podnet_count_failure(PODNET_MAPID_TCP_FLOW_BYTES);
    u64 cgroup_id = id->cgroup_id;
    v = tcp_flow_overflow.lookup(&cgroup_id);
    if (v)
        add_bytes(v, ret, sent);
    else if (tcp_flow_overflow.update(&cgroup_id, &init))
        podnet_count_failure(PODNET_MAPID_TCP_FLOW_OVERFLOW);
    return 0;
}

int on_sock_send_length(struct bpf_raw_tracepoint_args *ctx)
{
    return count_bytes(ctx, 1);
}

int on_sock_recv_length(struct bpf_raw_tracepoint_args *ctx)
{
    return count_bytes(ctx, 0);
}

int on_tcp_destroy_sock(struct bpf_raw_tracepoint_args *ctx)
{
    u64 skaddr = ctx->args[0];
    tcp_sock_identity.delete(&skaddr);
    return 0;
}

/* Learn each connection's role when it is established; forget a disconnected socket
 * (connect(AF_UNSPEC)), which may connect again to another peer. */
int on_traffic_sock_state(struct bpf_raw_tracepoint_args *ctx)
{
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    u64 skaddr = (u64)sk;
    if (newstate == PODNET_TCP_CLOSE) {
        tcp_sock_identity.delete(&skaddr);
        return 0;
    }
    if (newstate != PODNET_TCP_ESTABLISHED || !sk)
        return 0;
    if (oldstate != PODNET_TCP_SYN_SENT && oldstate != PODNET_TCP_SYN_RECV)
        return 0;
    struct tcp_sock_info *info = identity_of(sk);
    if (info)
        info->role = oldstate == PODNET_TCP_SYN_SENT ? PODNET_ROLE_CLIENT : PODNET_ROLE_SERVER;
    return 0;
}
