/* Worst case for a per-event TCP probe: 1-byte request/response over loopback on several
 * connections (most events per byte). Prints round trips completed in the given seconds.
 * usage: pingpong CONNECTIONS SECONDS [PAYLOAD_BYTES] */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long total;
static int payload = 1;

static void *server(void *arg)
{
    int fd = (int)(long)arg;
    char buf[65536];
    for (;;) {
        ssize_t n = recv(fd, buf, payload, MSG_WAITALL);
        if (n <= 0)
            break;
        if (send(fd, buf, n, 0) != n)
            break;
    }
    close(fd);
    return NULL;
}

static void *client(void *arg)
{
    int fd = (int)(long)arg;
    char buf[65536];
    long n = 0;
    memset(buf, 'x', sizeof(buf));
    while (!atomic_load(&stop)) {
        if (send(fd, buf, payload, 0) != payload)
            break;
        if (recv(fd, buf, payload, MSG_WAITALL) != payload)
            break;
        n++;
    }
    atomic_fetch_add(&total, n);
    shutdown(fd, SHUT_WR);
    close(fd);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s CONNECTIONS SECONDS [PAYLOAD_BYTES]\n", argv[0]);
        return 2;
    }
    int conns = atoi(argv[1]);
    double secs = atof(argv[2]);
    if (argc > 3)
        payload = atoi(argv[3]);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    bind(lfd, (struct sockaddr *)&a, sizeof(a));
    listen(lfd, 128);
    getsockname(lfd, (struct sockaddr *)&a, &alen);
    pthread_t th[2 * 256];
    int one = 1;
    for (int i = 0; i < conns && i < 256; i++) {
        int c = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(c, (struct sockaddr *)&a, sizeof(a)) != 0) {
            perror("connect");
            return 1;
        }
        int s = accept(lfd, NULL, NULL);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        pthread_create(&th[2 * i], NULL, server, (void *)(long)s);
        pthread_create(&th[2 * i + 1], NULL, client, (void *)(long)c);
    }
    struct timespec ts = {.tv_sec = (time_t)secs, .tv_nsec = (long)((secs - (time_t)secs) * 1e9)};
    nanosleep(&ts, NULL);
    atomic_store(&stop, 1);
    for (int i = 0; i < 2 * conns && i < 512; i++)
        pthread_join(th[i], NULL);
    printf("%ld\n", atomic_load(&total));
    return 0;
}
