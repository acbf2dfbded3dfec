/* One thread, one connection over loopback, 1-byte ping-pong: each iteration is exactly
 * four socket events (client send, server recv, server send, client recv) on one CPU, so
 * the time per iteration moves by 4x what each hook run costs.
 * usage: serial_pingpong ITERATIONS REPEATS   (prints ns per iteration, one line per repeat) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  long n=atol(argv[1]); int reps=atoi(argv[2]);
  int l=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={.sin_family=AF_INET,.sin_addr.s_addr=htonl(0x7f000001)};
  socklen_t al=sizeof a; bind(l,(void*)&a,al); listen(l,1); getsockname(l,(void*)&a,&al);
  int c=socket(AF_INET,SOCK_STREAM,0); connect(c,(void*)&a,al); int s=accept(l,0,0);
  int one=1; setsockopt(c,IPPROTO_TCP,TCP_NODELAY,&one,4); setsockopt(s,IPPROTO_TCP,TCP_NODELAY,&one,4);
  char b=1;
  for(int r=0;r<reps;r++){
    double t0=now();
    for(long i=0;i<n;i++){ send(c,&b,1,0); recv(s,&b,1,0); send(s,&b,1,0); recv(c,&b,1,0);}
    printf("%.1f\n",(now()-t0)*1e9/n); fflush(stdout);
  }
}
