/* TCP connection lifecycle per socket owner: opened/closed/failed/active connections and
 * connect() latency, from the raw tracepoint sock:inet_sock_set_state
 * (const struct sock *sk, int oldstate, int newstate).
 *
 * Every TCP socket ends in TCP_CLOSE (tcp_done(), time-wait hand-off, abort), so
 * per-socket state kept here is always freed by the socket's last transition.
 */
#include "podnet.h"

#define DIR_OUTBOUND 0
#define DIR_INBOUND 1

#define FAIL_REFUSED 0
#define FAIL_TIMEOUT 1
#define FAIL_RESET 2
#define FAIL_OTHER 3

struct tcp_conn_counters {
    u64 opened[2];
    u64 closed[2];
    s64 active[2];     /* per-CPU parts may be negative; their sum is not */
    u64 failed[4];
};

struct tcp_connect_start {
    u64 start_ns;
    u64 cgroup_id;
};

struct tcp_open_sock {
    u64 cgroup_id;
    u32 direction;
    u32 pad;
};

#define PODNET_MAPID_TCP_CONN_BY_CGROUP 0
#define PODNET_MAPID_TCP_CONNECTS_PENDING 1
#define PODNET_MAPID_TCP_SOCKS_OPEN 2
#define PODNET_MAPID_TCP_CONNECT_HIST 3

PODNET_TABLE("percpu_hash", struct podnet_cgroup_key, struct tcp_conn_counters, tcp_conn_by_cgroup,
             PODNET_MAP_ENTRIES, BPF_F_NO_PREALLOC);
PODNET_TABLE("hash", u64, struct tcp_connect_start, tcp_connects_pending, PODNET_SOCK_ENTRIES, BPF_F_NO_PREALLOC);
PODNET_TABLE("hash", u64, struct tcp_open_sock, tcp_socks_open, PODNET_SOCK_ENTRIES, BPF_F_NO_PREALLOC);
/* Connections that were open when podnet started with fresh state, by socket cookie
 * (written by the exporter from sock_diag, which also gives the sockets their cookies):
 * their close is counted like any other. */
PODNET_TABLE("hash", u64, struct tcp_open_sock, tcp_socks_seeded, PODNET_SOCK_ENTRIES, BPF_F_NO_PREALLOC);
PODNET_TABLE("percpu_hash", struct podnet_hist_key, struct podnet_hist_val, tcp_connect_duration_hist,
             PODNET_HIST_ENTRIES, BPF_F_NO_PREALLOC);
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

static __always_inline struct tcp_conn_counters *counters_of(u64 cgroup_id)
{
    struct podnet_cgroup_key k = {.cgroup_id = cgroup_id, .gen = podnet_current_gen()};
    struct tcp_conn_counters *c = tcp_conn_by_cgroup.lookup(&k);
    if (c)
        return c;
    struct tcp_conn_counters zero = {};
    if (tcp_conn_by_cgroup.update(&k, &zero)) {
        podnet_count_failure(PODNET_MAPID_TCP_CONN_BY_CGROUP);
        return NULL;
    }
    return tcp_conn_by_cgroup.lookup(&k);
}

static __always_inline void observe_connect(u64 cgroup_id, u64 ns)
{
    struct podnet_hist_key k = {.cgroup_id = cgroup_id, .slot = podnet_hist_slot(ns), .gen = podnet_current_gen()};
    struct podnet_hist_val *v = tcp_connect_duration_hist.lookup(&k);
    if (v) {
        v->count++;
        v->sum_ns += ns;
        return;
    }
    struct podnet_hist_val init = {.count = 1, .sum_ns = ns};
    if (tcp_connect_duration_hist.update(&k, &init))
        podnet_count_failure(PODNET_MAPID_TCP_CONNECT_HIST);
}

static __always_inline u32 failure_reason(const void *sk)
{
    int err = (int)podnet_read_u32(sk, PODNET_OFF_SK_ERR);
    switch (err) {
    case PODNET_ECONNREFUSED:
        return FAIL_REFUSED;
    /* 0: the application gave up on a pending connect (its own connect timeout) */
    case 0:
    case PODNET_ETIMEDOUT:
        return FAIL_TIMEOUT;
    case PODNET_ECONNRESET:
        return FAIL_RESET;
    default:
        return FAIL_OTHER;
    }
}

static __always_inline void track_open(u64 skaddr, u64 cgroup_id, u32 dir)
{
    struct tcp_conn_counters *c = counters_of(cgroup_id);
    if (!c)
        return;
    c->opened[dir]++;
    struct tcp_open_sock os = {.cgroup_id = cgroup_id, .direction = dir};
    /* Only tracked sockets are counted as active, so a full map skews nothing else. */
    if (tcp_socks_open.update(&skaddr, &os)) {
        podnet_count_failure(PODNET_MAPID_TCP_SOCKS_OPEN);
        return;
    }
    c->active[dir]++;
}

static __always_inline void count_close(const struct tcp_open_sock *os)
{
    u32 dir = os->direction ? DIR_INBOUND : DIR_OUTBOUND;
    struct tcp_conn_counters *c = counters_of(os->cgroup_id);
    if (c) {
        c->closed[dir]++;
        c->active[dir]--;
    }
}

static __always_inline void track_close(const void *sk, u64 skaddr)
{
    struct tcp_open_sock *os = tcp_socks_open.lookup(&skaddr);
    if (os) {
        count_close(os);
        tcp_socks_open.delete(&skaddr);
        return;
    }
#ifdef PODNET_OFF_SKC_COOKIE
    /* Deleted first: of this close and the exporter's check for vanished sockets, the
     * one whose delete succeeds counts the close. */
    u64 cookie = podnet_read_u64(sk, PODNET_OFF_SKC_COOKIE);
    if (!cookie)
        return;
    struct tcp_open_sock *seeded = tcp_socks_seeded.lookup(&cookie);
    if (!seeded)
        return;
    struct tcp_open_sock copy = *seeded;
    if (!tcp_socks_seeded.delete(&cookie))
        count_close(&copy);
#endif
}

int on_inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
    const void *sk = (const void *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    u64 skaddr = (u64)sk;

    if (!sk || !podnet_sk_is_inet_tcp(sk))
        return 0;

    if (newstate == PODNET_TCP_SYN_SENT) {
        u64 cgroup_id = podnet_sk_cgroup_id(sk);
        if (!cgroup_id)
            return 0;
        struct tcp_connect_start st = {.start_ns = bpf_ktime_get_ns(), .cgroup_id = cgroup_id};
        if (tcp_connects_pending.update(&skaddr, &st))
            podnet_count_failure(PODNET_MAPID_TCP_CONNECTS_PENDING);
        return 0;
    }

    if (newstate == PODNET_TCP_ESTABLISHED) {
        if (oldstate == PODNET_TCP_SYN_SENT) {
            struct tcp_connect_start *st = tcp_connects_pending.lookup(&skaddr);
            if (!st)
                return 0;   /* connect began before podnet attached */
            u64 cgroup_id = st->cgroup_id;
            observe_connect(cgroup_id, bpf_ktime_get_ns() - st->start_ns);
            tcp_connects_pending.delete(&skaddr);
            track_open(skaddr, cgroup_id, DIR_OUTBOUND);
        } else if (oldstate == PODNET_TCP_SYN_RECV) {
            u64 cgroup_id = podnet_sk_cgroup_id(sk);
            if (cgroup_id)
                track_open(skaddr, cgroup_id, DIR_INBOUND);
        }
        return 0;
    }

    if (newstate == PODNET_TCP_CLOSE) {
        if (oldstate == PODNET_TCP_SYN_SENT) {
            struct tcp_connect_start *st = tcp_connects_pending.lookup(&skaddr);
            if (!st)
                return 0;
            struct tcp_conn_counters *c = counters_of(st->cgroup_id);
            if (c)
                c->failed[failure_reason(sk)]++;
            tcp_connects_pending.delete(&skaddr);
            return 0;
        }
        track_close(sk, skaddr);
    }
    return 0;
}
