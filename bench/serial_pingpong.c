/* One thread, one connection over loopback, ping-pong: each iteration is exactly four
 * socket events (client send, server recv, server send, client recv) on one CPU, so the
 * time per iteration moves by 4x what each hook run costs.
 *   mode "byte": 1-byte request and response (send/recv);
 *   mode "http": an HTTP/1.1 GET written with write(), read with read(); a 1 KiB response
 *                written with writev() (status line + headers, body), as nginx does.
 * usage: serial_pingpong ITERATIONS REPEATS [byte|http]   (prints ns per iteration) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void read_exact(int fd, char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t k = read(fd, buf + got, n - got);
        if (k <= 0)
            exit(1);
        got += k;
    }
}

int main(int argc, char **argv)
{
    long n = atol(argv[1]);
    int reps = atoi(argv[2]);
    int http = argc > 3 && strcmp(argv[3], "http") == 0;
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t al = sizeof a;
    bind(l, (void *)&a, al);
    listen(l, 1);
    getsockname(l, (void *)&a, &al);
    int c = socket(AF_INET, SOCK_STREAM, 0);
    connect(c, (void *)&a, al);
    int s = accept(l, 0, 0);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, 4);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, 4);
    static const char req[] = "GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n\r\n";
    static const char head[] = "HTTP/1.1 200 OK\r\nServer: bench\r\nContent-Type: text/html\r\n"
                               "Content-Length: 1024\r\nConnection: keep-alive\r\n\r\n";
    static char body[1024], buf[4096];
    memset(body, 'x', sizeof body);
    struct iovec iov[2] = {{(void *)head, sizeof head - 1}, {body, sizeof body}};
    size_t resp = sizeof head - 1 + sizeof body;
    char b = 1;
    for (int r = 0; r < reps; r++) {
        double t0 = now();
        for (long i = 0; i < n; i++) {
            if (http) {
                if (write(c, req, sizeof req - 1) != sizeof req - 1)
                    return 1;
                read_exact(s, buf, sizeof req - 1);
                if (writev(s, iov, 2) != (ssize_t)resp)
                    return 1;
                read_exact(c, buf, resp);
            } else {
                send(c, &b, 1, 0);
                recv(s, &b, 1, 0);
                send(s, &b, 1, 0);
                recv(c, &b, 1, 0);
            }
        }
        printf("%.1f\n", (now() - t0) * 1e9 / n);
        fflush(stdout);
    }
    return 0;
}
