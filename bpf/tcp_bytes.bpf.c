/* TCP payload bytes per socket owner (cgroup) and per (owner, peer address).
 *
 * Hooks the raw tracepoints sock:sock_send_length and sock:sock_recv_length, which fire in
 * sock_sendmsg()/sock_recvmsg() with (struct sock *sk, int ret, int flags): ret is what the
 * application handed to / took from the socket. Raw tracepoints pass the kernel's own
 * arguments instead of a formatted record, which roughly halves the fixed cost per event.
 */
#include "podnet.h"

struct tcp_bytes {
    u64 sent;
    u64 received;
};

struct tcp_flow_key {
    u64 cgroup_id;
    u8 peer[16];    /* v4-mapped for IPv4 */
};

#define PODNET_MAPID_TCP_BYTES_BY_CGROUP 0
#define PODNET_MAPID_TCP_FLOW_BYTES 1

/* Per-CPU so the hot path never bounces a shared cache line between cores; not
 * preallocated so memory follows the number of live owners and flows. */
BPF_F_TABLE("percpu_hash", u64, struct tcp_bytes, tcp_bytes_by_cgroup, PODNET_MAP_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("percpu_hash", struct tcp_flow_key, struct tcp_bytes, tcp_flow_bytes, PODNET_FLOW_ENTRIES, BPF_F_NO_PREALLOC);

BPF_PERCPU_ARRAY(map_update_failures, u64, PODNET_MAX_MAP_IDS);

static __always_inline void podnet_count_failure(u32 id)
{
    u64 *f = map_update_failures.lookup(&id);
    if (f)
        (*f)++;
}

static __always_inline void add_bytes(struct tcp_bytes *v, u64 n, int sent)
{
    if (sent)
        v->sent += n;
    else
        v->received += n;
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
    if (!podnet_sk_is_inet_tcp(sk))
        return 0;
    u64 cgroup_id = podnet_sk_cgroup_id(sk);
    if (!cgroup_id)
        return 0;

    struct tcp_bytes *v = tcp_bytes_by_cgroup.lookup(&cgroup_id);
    if (v) {
        add_bytes(v, ret, sent);
    } else {
        struct tcp_bytes init = {};
        add_bytes(&init, ret, sent);
        /* BPF_ANY on a per-CPU map writes only this CPU's slot: a concurrent insert
         * from another CPU cannot overwrite our count. */
        if (tcp_bytes_by_cgroup.update(&cgroup_id, &init))
            podnet_count_failure(PODNET_MAPID_TCP_BYTES_BY_CGROUP);
    }

    struct tcp_flow_key fk = {.cgroup_id = cgroup_id};
    podnet_sk_peer(sk, fk.peer);
    v = tcp_flow_bytes.lookup(&fk);
    if (v) {
        add_bytes(v, ret, sent);
    } else {
        struct tcp_bytes init = {};
        add_bytes(&init, ret, sent);
        if (tcp_flow_bytes.update(&fk, &init))
            podnet_count_failure(PODNET_MAPID_TCP_FLOW_BYTES);
    }
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
