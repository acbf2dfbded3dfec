/* Smoothed RTT samples of established TCP sockets per owner, from the raw tracepoint
 * tcp:tcp_probe (sk, skb), which fires for each segment received on an established
 * socket (softirq: the owner comes from the socket, never from the current task).
 */
#include "podnet.h"

#define PODNET_MAPID_TCP_RTT_HIST 0

BPF_F_TABLE("percpu_hash", struct podnet_hist_key, struct podnet_hist_val, tcp_rtt_hist, PODNET_HIST_ENTRIES,
            BPF_F_NO_PREALLOC);

BPF_PERCPU_ARRAY(map_update_failures, u64, PODNET_MAX_MAP_IDS);

static __always_inline void podnet_count_failure(u32 id)
{
    u64 *f = map_update_failures.lookup(&id);
    if (f)
        (*f)++;
}

int on_tcp_probe(struct bpf_raw_tracepoint_args *ctx)
{
    const void *sk = (const void *)ctx->args[0];
    if (!sk || !podnet_sk_is_inet_tcp(sk))
        return 0;
    /* srtt_us holds the smoothed RTT in microseconds << 3. */
    u32 srtt8 = podnet_read_u32(sk, PODNET_OFF_TCP_SRTT_US);
    if (!srtt8)
        return 0;
    u64 cgroup_id = podnet_sk_cgroup_id(sk);
    if (!cgroup_id)
        return 0;
    u64 ns = (u64)srtt8 * 125;
    struct podnet_hist_key k = {.cgroup_id = cgroup_id, .slot = podnet_hist_slot(ns)};
    struct podnet_hist_val *v = tcp_rtt_hist.lookup(&k);
    if (v) {
        v->count++;
        v->sum_ns += ns;
        return 0;
    }
    struct podnet_hist_val init = {.count = 1, .sum_ns = ns};
    if (tcp_rtt_hist.update(&k, &init))
        podnet_count_failure(PODNET_MAPID_TCP_RTT_HIST);
    return 0;
}
