/* Request recognition for tcp_traffic.bpf.c: roles, protocols and a peek at HTTP/1.x.
 *
 * The payload is read from the user buffer of the syscall in progress: the kernel keeps the
 * task's syscall registers (bpf_task_pt_regs), whose layout (pt_regs.si, .orig_ax) comes
 * from BTF and whose syscall numbers come from the loader (-DPODNET_NR_*). Where any of
 * those is missing, or the syscall passes no user buffer (sendfile, splice, io_uring),
 * requests are still counted, as protocol "other".
 */
#ifndef PODNET_REQUESTS_H
#define PODNET_REQUESTS_H

#define PODNET_ROLE_SERVER 1
#define PODNET_ROLE_CLIENT 2

#define PODNET_PROTO_OTHER 1
#define PODNET_PROTO_HTTP 2
#define PODNET_PROTO_HTTP2 3
#define PODNET_PROTO_GRPC 4

/* HTTP methods; keep in step with exporter/metrics/raw.py HTTP_METHODS. */
#define PODNET_HTTP_GET 1
#define PODNET_HTTP_POST 2
#define PODNET_HTTP_PUT 3
#define PODNET_HTTP_DELETE 4
#define PODNET_HTTP_HEAD 5
#define PODNET_HTTP_PATCH 6
#define PODNET_HTTP_OPTIONS 7
#define PODNET_HTTP_CONNECT 8
#define PODNET_HTTP_TRACE 9
#define PODNET_HTTP_OTHER 10    /* HTTP/2: a method podnet does not decode */
#define PODNET_HTTP2_PREFACE 0xff   /* not a method: the HTTP/2 connection preface */
#define PODNET_TLS_RECORD 0xfe      /* not a method: a TLS handshake record (ClientHello) */

/* One map counts requests and their durations: a request's end is one map update. */
struct podnet_request_key {
    u64 cgroup_id;
    u8 role;
    u8 protocol;
    u8 method;
    u8 status_class;   /* 1..5 for 1xx..5xx, 0 unknown */
    u32 slot;          /* duration histogram slot (podnet_hist_slot) */
    u32 gen;           /* podnet_gen when counted */
    u8 grpc_status;    /* gRPC status + 1, 0 unknown */
    u8 pad[3];
};

#define PODNET_PEEK_BYTES 16

#if defined(PODNET_OFF_PT_REGS_SI) && defined(PODNET_OFF_PT_REGS_DX) && defined(PODNET_OFF_PT_REGS_ORIG_AX) && \
    defined(PODNET_NR_READ) && \
    !defined(PODNET_NO_PEEK) && !defined(PODNET_NO_REQUESTS)
#define PODNET_CAN_PEEK 1
static long (*podnet_task_pt_regs)(struct task_struct *task) = (void *)BPF_FUNC_task_pt_regs;

/* The user buffer of the read/write/send/recv syscall in progress: a flat buffer, or an
 * iovec array and its length. */
struct podnet_sysbuf {
    const char *buf;
    const char *iov;
    u64 cnt;
};

static __always_inline int podnet_syscall_buffer(struct podnet_sysbuf *b)
{
    struct task_struct *task = bpf_get_current_task_btf();
    const char *regs = (const char *)podnet_task_pt_regs(task);
    u64 nr = 0, arg = 0, arg3 = 0;
    if (!regs)
        return -1;
#if defined(PODNET_TP_BTF)
    /* The registers are a BTF-typed struct pt_regs: plain loads. */
    arg = PODNET_LOAD(u64, regs, PODNET_OFF_PT_REGS_SI);
    arg3 = PODNET_LOAD(u64, regs, PODNET_OFF_PT_REGS_DX);
    nr = PODNET_LOAD(u64, regs, PODNET_OFF_PT_REGS_ORIG_AX);
#elif PODNET_OFF_PT_REGS_ORIG_AX == PODNET_OFF_PT_REGS_SI + 16 && PODNET_OFF_PT_REGS_DX + 8 == PODNET_OFF_PT_REGS_SI
    /* x86-64: dx, si, di, orig_ax are adjacent; one read instead of three. */
    u64 r[4] = {};
    bpf_probe_read_kernel(r, sizeof(r), regs + PODNET_OFF_PT_REGS_DX);
    arg3 = r[0];
    arg = r[1];
    nr = r[3];
#else
    bpf_probe_read_kernel(&nr, sizeof(nr), regs + PODNET_OFF_PT_REGS_ORIG_AX);
    bpf_probe_read_kernel(&arg, sizeof(arg), regs + PODNET_OFF_PT_REGS_SI);
    bpf_probe_read_kernel(&arg3, sizeof(arg3), regs + PODNET_OFF_PT_REGS_DX);
#endif
    b->buf = 0;
    b->iov = 0;
    b->cnt = 0;
    if (nr == PODNET_NR_READ || nr == PODNET_NR_WRITE || nr == PODNET_NR_SENDTO || nr == PODNET_NR_RECVFROM) {
        b->buf = (const char *)arg;
        return 0;
    }
    if (nr == PODNET_NR_READV || nr == PODNET_NR_WRITEV) {
        b->iov = (const char *)arg;
        b->cnt = arg3;
        return 0;
    }
    if (nr == PODNET_NR_SENDMSG || nr == PODNET_NR_RECVMSG) {
        /* struct user_msghdr (UAPI): msg_iov at offset 16, msg_iovlen at 24 */
        u64 m[2] = {};
        if (bpf_probe_read_user(m, sizeof(m), (const char *)arg + 16))
            return -1;
        b->iov = (const char *)m[0];
        b->cnt = m[1];
        return 0;
    }
    return -1;
}

/* The first PODNET_PEEK_BYTES of `plain` (a TLS library's plaintext), or without it of the
 * current read/write/send/recv syscall's buffer. */
static __always_inline int podnet_peek(u8 *buf, const char *plain)
{
    if (plain)
        return bpf_probe_read_user(buf, PODNET_PEEK_BYTES, plain);
    struct podnet_sysbuf b;
    if (podnet_syscall_buffer(&b))
        return -1;
    const void *ubuf = b.buf;
    if (b.iov && bpf_probe_read_user(&ubuf, sizeof(ubuf), b.iov))   /* struct iovec: iov_base first */
        return -1;
    return bpf_probe_read_user(buf, PODNET_PEEK_BYTES, ubuf);
}
#else
static __always_inline int podnet_peek(u8 *buf, const char *plain)
{
    return -1;
}
#endif

static __always_inline int podnet_is(const u8 *b, char c0, char c1, char c2, char c3)
{
    return b[0] == c0 && b[1] == c1 && b[2] == c2 && b[3] == c3;
}

/* The HTTP method that starts this request, 0 if it is not HTTP/1.x. */
static __always_inline u8 podnet_peek_method(int len, const char *plain)
{
    u8 b[PODNET_PEEK_BYTES] = {};
    if (len < 4 || podnet_peek(b, plain))
        return 0;
    if (podnet_is(b, 'G', 'E', 'T', ' '))
        return PODNET_HTTP_GET;
    /* TLS: a handshake record, version 3.x */
    if (b[0] == 0x16 && b[1] == 0x03 && b[2] <= 0x04)
        return PODNET_TLS_RECORD;
    if (podnet_is(b, 'P', 'U', 'T', ' '))
        return PODNET_HTTP_PUT;
    /* "PRI * HTTP/2.0\r\n": the first 16 bytes of the HTTP/2 client connection preface. */
    if (len >= 24 && podnet_is(b, 'P', 'R', 'I', ' ') && podnet_is(b + 4, '*', ' ', 'H', 'T') &&
        podnet_is(b + 8, 'T', 'P', '/', '2') && podnet_is(b + 12, '.', '0', '\r', '\n'))
        return PODNET_HTTP2_PREFACE;
    if (len < 5)
        return 0;
    if (podnet_is(b, 'P', 'O', 'S', 'T') && b[4] == ' ')
        return PODNET_HTTP_POST;
    if (podnet_is(b, 'H', 'E', 'A', 'D') && b[4] == ' ')
        return PODNET_HTTP_HEAD;
    if (len < 6)
        return 0;
    if (podnet_is(b, 'P', 'A', 'T', 'C') && b[4] == 'H' && b[5] == ' ')
        return PODNET_HTTP_PATCH;
    if (podnet_is(b, 'T', 'R', 'A', 'C') && b[4] == 'E' && b[5] == ' ')
        return PODNET_HTTP_TRACE;
    if (len < 7)
        return 0;
    if (podnet_is(b, 'D', 'E', 'L', 'E') && b[4] == 'T' && b[5] == 'E' && b[6] == ' ')
        return PODNET_HTTP_DELETE;
    if (len < 8)
        return 0;
    if (podnet_is(b, 'O', 'P', 'T', 'I') && podnet_is(b + 4, 'O', 'N', 'S', ' '))
        return PODNET_HTTP_OPTIONS;
    if (podnet_is(b, 'C', 'O', 'N', 'N') && podnet_is(b + 4, 'E', 'C', 'T', ' '))
        return PODNET_HTTP_CONNECT;
    return 0;
}

/* 1..5 from an "HTTP/1.x NNN" status line that starts this response, else 0. */
static __always_inline u8 podnet_peek_status_class(int len, const char *plain)
{
    u8 b[PODNET_PEEK_BYTES] = {};
    if (len < 12 || podnet_peek(b, plain))
        return 0;
    if (!podnet_is(b, 'H', 'T', 'T', 'P') || b[4] != '/' || b[5] != '1' || b[6] != '.' || b[8] != ' ')
        return 0;
    if (b[9] < '1' || b[9] > '5' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return 0;
    return b[9] - '0';
}

#endif /* PODNET_REQUESTS_H */
