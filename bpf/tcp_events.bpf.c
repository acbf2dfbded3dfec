/* TCP retransmitted segments and resets per socket owner, from the raw tracepoints
 * tcp:tcp_retransmit_skb (sk, skb, err), tcp:tcp_send_reset (sk, skb, reason) and
 * tcp:tcp_receive_reset (sk).
 */
#include "podnet.h"

struct tcp_event_counters {
    u64 retransmits;
    u64 resets_sent;
    u64 resets_received;
};

#define PODNET_MAPID_TCP_EVENTS_BY_CGROUP 0

PODNET_TABLE("percpu_hash", struct podnet_cgroup_key, struct tcp_event_counters, tcp_events_by_cgroup,
             PODNET_MAP_ENTRIES, BPF_F_NO_PREALLOC);
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

static __always_inline struct tcp_event_counters *counters_of(const void *sk)
{
    if (!sk || !podnet_sk_is_full(sk) || !podnet_sk_is_inet_tcp(sk))
        return NULL;
    struct podnet_cgroup_key k = {.cgroup_id = podnet_sk_cgroup_id(sk), .gen = podnet_current_gen()};
    if (!k.cgroup_id)
        return NULL;
    struct tcp_event_counters *c = tcp_events_by_cgroup.lookup(&k);
    if (c)
        return c;
    struct tcp_event_counters zero = {};
    if (tcp_events_by_cgroup.update(&k, &zero)) {
        podnet_count_failure(PODNET_MAPID_TCP_EVENTS_BY_CGROUP);
        return NULL;
    }
    return tcp_events_by_cgroup.lookup(&k);
}

int on_tcp_retransmit_skb(struct bpf_raw_tracepoint_args *ctx)
{
    const void *sk = (const void *)ctx->args[0];
    const void *skb = (const void *)ctx->args[1];
#if PODNET_TP_TCP_RETRANSMIT_SKB_NARGS >= 3
    int err = (int)ctx->args[2];   /* added in 6.x; older kernels trace sent skbs only */
#else
    int err = 0;
#endif
    if (err)
        return 0;   /* not sent: the kernel's RetransSegs does not count it either */
    struct tcp_event_counters *c = counters_of(sk);
    if (!c)
        return 0;
    /* One skb may carry several segments (GSO); count segments, like RetransSegs. */
    u16 segs = podnet_read_u16(skb, PODNET_OFF_SKB_CB + PODNET_OFF_TCP_SKB_CB_GSO_SEGS);
    c->retransmits += segs ? segs : 1;
    return 0;
}

int on_tcp_send_reset(struct bpf_raw_tracepoint_args *ctx)
{
    /* sk is NULL for resets answering segments that match no socket (e.g. a closed
     * port): those belong to no pod. */
    struct tcp_event_counters *c = counters_of((const void *)ctx->args[0]);
    if (c)
        c->resets_sent++;
    return 0;
}

int on_tcp_receive_reset(struct bpf_raw_tracepoint_args *ctx)
{
    struct tcp_event_counters *c = counters_of((const void *)ctx->args[0]);
    if (c)
        c->resets_received++;
    return 0;
}
