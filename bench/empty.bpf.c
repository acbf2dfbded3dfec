/* The floor of the data-path benchmark: programs that do nothing, on the same tracepoints
 * as podnet's hot path, loaded the same way (tp_btf). What is left is the cost of the
 * tracepoint and the program call themselves. */
int on_sock_send_length(u64 *ctx)
{
    return 0;
}

int on_sock_recv_length(u64 *ctx)
{
    return 0;
}

/* An empty uprobe program (bench/tls_cost.py: what a uprobe costs by itself). */
int on_uprobe(void *ctx)
{
    return 0;
}
