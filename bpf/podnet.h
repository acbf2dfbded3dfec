/* Shared helpers for podnet's eBPF programs.
 *
 * Kernel-internal headers are deliberately not included: their struct layouts are the
 * headers' kernel's, not the running kernel's. Every field is read at an offset that the
 * loader resolved from the running kernel's BTF and passed in as a -D macro
 * (see exporter/kernel/offsets.py; `podnet-exporter bpf-source` prints them).
 */
#ifndef PODNET_H
#define PODNET_H

#ifndef PODNET_OFF_SKC_FAMILY
#error "PODNET_OFF_* macros are missing: load this program through exporter.kernel.programs"
#endif

#ifndef PODNET_MAP_ENTRIES
#define PODNET_MAP_ENTRIES 65536
#endif

/* ---- pinning -----------------------------------------------------------------------
 * With -DPODNET_PIN_PREFIX="<bpffs dir>/<program>-<variant>_" every map is pinned there
 * when the program is first loaded, so the maps (and the attachments the loader pins
 * next to them) outlive the exporter: a restart reads on from where the counts are. The
 * loader versions the directory by a digest of the sources and build options, so a
 * pinned map always has the layout this source declares. Without the macro, maps live
 * as long as the loader. (BCC opens an existing pin through its map id, which needs
 * CAP_SYS_ADMIN: so the loader never builds against existing pins, it opens them itself.)
 */
#ifdef PODNET_PIN_PREFIX
#define PODNET_TABLE(type, k, v, name, n, flags) \
    BPF_TABLE_PINNED(type, k, v, name, n, PODNET_PIN_PREFIX #name, flags)
#define PODNET_MAP_SECTION(type, name) "maps/" type ":" PODNET_PIN_PREFIX #name
#else
#define PODNET_TABLE(type, k, v, name, n, flags) BPF_F_TABLE(type, k, v, name, n, flags)
#define PODNET_MAP_SECTION(type, name) "maps/" type
#endif

/* BCC's BPF_SK_STORAGE and BPF_STACK with a pinnable section. */
#define PODNET_SK_STORAGE(_name, _leaf_type)                                    \
    struct _name##_table_t {                                                    \
        int key;                                                                \
        _leaf_type leaf;                                                        \
        void *(*sk_storage_get)(void *, void *, int);                           \
        int (*sk_storage_delete)(void *);                                       \
        u32 flags;                                                              \
    };                                                                          \
    __attribute__((section(PODNET_MAP_SECTION("sk_storage", _name))))          \
    struct _name##_table_t _name = {.flags = BPF_F_NO_PREALLOC};                \
    BPF_ANNOTATE_KV_PAIR(_name, int, _leaf_type)

#define PODNET_STACK(_name, _leaf_type, _max_entries)                           \
    struct _name##_table_t {                                                    \
        _leaf_type leaf;                                                        \
        int *(*peek)(_leaf_type *);                                             \
        int *(*pop)(_leaf_type *);                                              \
        int *(*push)(_leaf_type *, u64);                                        \
        u32 max_entries;                                                        \
        int flags;                                                              \
    };                                                                          \
    __attribute__((section(PODNET_MAP_SECTION("stack", _name))))               \
    struct _name##_table_t _name = {.flags = 0, .max_entries = (_max_entries)}; \
    BPF_ANNOTATE_KV_PAIR_QUEUESTACK(_name, _leaf_type)

/* ---- generations -------------------------------------------------------------------
 * Every counter map's key carries the generation it was counted in: podnet_gen[0], which
 * the poller advances at each poll (one array per program, all set alike). The poller
 * reads every entry; those of generations at least two behind are final (no program has
 * looked them up for a whole poll interval), so it adds them to its totals and deletes
 * them without losing an event, however long the entry's owner (a cgroup, a peer) lives
 * on. The maps hold only what was counted in the last two intervals.
 * Each program defines podnet_gen (PODNET_GEN_TABLE) and its own podnet_current_gen():
 * BCC rewrites map calls in the main source file only. */
#define PODNET_GEN_TABLE PODNET_TABLE("array", u32, u32, podnet_gen, 1, 0)

#define PODNET_AF_INET 2
#define PODNET_AF_INET6 10
#define PODNET_IPPROTO_TCP 6
#define PODNET_MSG_PEEK 2

/* TCP states (include/net/tcp_states.h): part of the user-visible ABI via /proc/net/tcp. */
#define PODNET_TCP_ESTABLISHED 1
#define PODNET_TCP_SYN_SENT 2
#define PODNET_TCP_SYN_RECV 3
#define PODNET_TCP_TIME_WAIT 6
#define PODNET_TCP_CLOSE 7
#define PODNET_TCP_NEW_SYN_RECV 12

/* errno values (uapi asm-generic/errno.h) used to classify failed connects. */
#define PODNET_ECONNRESET 104
#define PODNET_ETIMEDOUT 110
#define PODNET_ECONNREFUSED 111

static __always_inline u32 podnet_probe_u32(const void *base, u64 off)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (const char *)base + off);
    return v;
}

#ifdef PODNET_TP_BTF
/* BTF-typed programs: `base` is a pointer the verifier knows the type of (a tracepoint
 * argument or a field loaded from one), so a field is one load instruction, checked
 * against BTF at load time and fault-safe at run time. */
#define PODNET_LOAD(type, base, off) (*(const type *)((const char *)(base) + (off)))
#else
#define PODNET_LOAD(type, base, off) ({                                   \
        type __v = 0;                                                     \
        bpf_probe_read_kernel(&__v, sizeof(__v), (const char *)(base) + (off)); \
        __v;                                                              \
    })
#endif

static __always_inline u64 podnet_read_u64(const void *base, u64 off)
{
    return PODNET_LOAD(u64, base, off);
}

static __always_inline u32 podnet_read_u32(const void *base, u64 off)
{
    return PODNET_LOAD(u32, base, off);
}

static __always_inline u16 podnet_read_u16(const void *base, u64 off)
{
    return PODNET_LOAD(u16, base, off);
}

static __always_inline const void *podnet_read_ptr(const void *base, u64 off)
{
    return PODNET_LOAD(const void *, base, off);
}

/* The cgroup v2 id of the socket's owner: sk->sk_cgrp_data.cgroup->kn->id. Taken from the
 * socket rather than the current task so that it is right in softirq context too; an
 * accepted socket inherits its listener's cgroup. Only valid on full sockets. */
static __always_inline u64 podnet_sk_cgroup_id(const void *sk)
{
    const void *cgrp = podnet_read_ptr(sk, PODNET_OFF_SK_CGROUP);
    if (!cgrp)
        return 0;
    const void *kn = podnet_read_ptr(cgrp, PODNET_OFF_CGROUP_KN);
    if (!kn)
        return 0;
    return podnet_read_u64(kn, PODNET_OFF_KERNFS_ID);
}

static __always_inline int podnet_sk_is_inet_tcp(const void *sk)
{
    u16 family = podnet_read_u16(sk, PODNET_OFF_SKC_FAMILY);
    if (family != PODNET_AF_INET && family != PODNET_AF_INET6)
        return 0;
    return podnet_read_u16(sk, PODNET_OFF_SK_PROTOCOL) == PODNET_IPPROTO_TCP;
}

/* Time-wait and request sockets are smaller than struct sock: reading sk_cgrp_data from
 * them would read past the object. */
static __always_inline int podnet_sk_is_full(const void *sk)
{
    u8 state = PODNET_LOAD(u8, sk, PODNET_OFF_SKC_STATE);
    return state != PODNET_TCP_TIME_WAIT && state != PODNET_TCP_NEW_SYN_RECV;
}

/* Remote address as 16 bytes: IPv4 as v4-mapped IPv6 (::ffff:a.b.c.d), so one key type
 * serves both families and userspace parses it with one rule. */
static __always_inline void podnet_sk_peer(const void *sk, u8 *addr16)
{
    u16 family = podnet_read_u16(sk, PODNET_OFF_SKC_FAMILY);
    if (family == PODNET_AF_INET) {
        u32 v4 = podnet_read_u32(sk, PODNET_OFF_SKC_DADDR);
        __builtin_memset(addr16, 0, 10);
        addr16[10] = 0xff;
        addr16[11] = 0xff;
        __builtin_memcpy(addr16 + 12, &v4, 4);
    } else {
        bpf_probe_read_kernel(addr16, 16, (const char *)sk + PODNET_OFF_SKC_V6_DADDR);
    }
}

/* ---- histograms ------------------------------------------------------------------
 * Buckets are those of an OpenTelemetry exponential histogram at scale 2 (four per
 * octave) over durations in units of 2^-30 s, so Prometheus boundaries are exact powers
 * of 2^(1/4) seconds and OTLP gets the kernel's buckets without re-bucketing.
 * Slot i covers (2^((i - 120) / 4), 2^((i - 119) / 4)] seconds; slot 0 also takes
 * everything shorter, the last slot (up to 2^11 s) everything longer.
 */
#define PODNET_HIST_SLOTS 164
#define PODNET_HIST_MAX_OCTAVE 40  /* slots 4*40 .. 4*40+3 are the last octave */

struct podnet_hist_key {
    u64 cgroup_id;
    u32 slot;
    u32 gen;        /* podnet_gen when counted */
};

/* Key of the per-owner counter maps. */
struct podnet_cgroup_key {
    u64 cgroup_id;
    u32 gen;
    u32 pad;
};

struct podnet_hist_val {
    u64 count;
    u64 sum_ns;
};

static __always_inline u32 podnet_msb64(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

static __always_inline u32 podnet_hist_slot(u64 ns)
{
    /* ns >= 2^41 (2199 s) is more than 2^41 units (2048 s), past the last slot's lower
     * edge 2^(MAX_OCTAVE + 3/4) units (2^10.75 s = 1722 s): the last slot, by a margin no
     * rounding below can cross. This also keeps ns * 1125900 under 2^62: it would wrap
     * u64 from 2^64 / 1125900 ns (4.55 h) on and bucket such durations low. */
    if (ns >> 41)
        return PODNET_HIST_SLOTS - 1;
    /* 2^30 / 1e9 = 1.073741824; 1125900 / 2^20 matches it to 1e-7. */
    u64 v = (ns * 1125900ULL) >> 20;
    if (v <= 1)
        return 0;
    u64 x = v - 1;          /* upper-inclusive buckets, as in OTLP and Prometheus */
    u32 m = podnet_msb64(x);
    if (m > PODNET_HIST_MAX_OCTAVE)
        return PODNET_HIST_SLOTS - 1;
    /* v relative to 2^m in 1/65536ths; thresholds are 2^(j/4) * 65536, rounded up. */
    u64 q = (v << 16) >> m;
    u32 j = 0;
    if (q > 77935)
        j = 1;
    if (q > 92681)
        j = 2;
    if (q > 110217)
        j = 3;
    return m * 4 + j;
}

/* ---- map-update failures -----------------------------------------------------------
 * A full map must never be silent: each program counts failed inserts per map in its
 * own per-CPU array `map_update_failures`, indexed by its PODNET_MAPID_* constants.
 * BCC rewrites map calls only in the main source file, so each program defines the
 * array and its podnet_count_failure() itself. */
#define PODNET_MAX_MAP_IDS 16

#endif /* PODNET_H */
