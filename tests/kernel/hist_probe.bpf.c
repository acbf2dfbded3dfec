/* Test probe: returns podnet_hist_slot(args[0]) so tests can check the kernel's
 * histogram bucketing through BPF_PROG_TEST_RUN. */
#include "podnet.h"

int hist_slot_of(struct bpf_raw_tracepoint_args *ctx)
{
    return podnet_hist_slot(ctx->args[0]);
}
