#include <stdio.h>
#include <stdlib.h>
#include <time.h>
/* Three functions that differ only in their first instruction, where a uprobe goes: the
 * kernel emulates nop and push (x86 uprobes), and single-steps `sub $0x18,%rsp` out of line
 * (OpenSSL 3's SSL_read and SSL_write start with it). */
__attribute__((noinline, naked)) long f_nop(long x) { asm volatile("nop\n\tlea 1(%rdi),%rax\n\tret"); }
__attribute__((noinline, naked)) long f_push(long x)
{ asm volatile("push %rbp\n\tpop %rbp\n\tlea 1(%rdi),%rax\n\tret"); }
__attribute__((noinline, naked)) long f_sub(long x)
{ asm volatile("sub $0x18,%rsp\n\tadd $0x18,%rsp\n\tlea 1(%rdi),%rax\n\tret"); }
int main(int argc, char **argv)
{
    long (*fn)(long) = argv[1][0] == 'n' ? f_nop : argv[1][0] == 'p' ? f_push : f_sub;
    int n = atoi(argv[2]);
    long s = 0;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++)
        s += fn(i);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.1f %ld\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, s);
    return 0;
}
