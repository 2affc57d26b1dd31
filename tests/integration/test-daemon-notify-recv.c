/* test-daemon-notify-recv.c: a stand-in for the service manager's notification socket
 * in the dsparkd tests.
 *
 *   test-daemon-notify-recv SOCKET_PATH [SECONDS]
 *
 * Binds an AF_UNIX datagram socket at SOCKET_PATH (give it to the daemon as
 * $NOTIFY_SOCKET) and prints every datagram as one line, "MILLISECONDS TEXT",
 * newlines in TEXT shown as spaces, milliseconds counted from the start. Exits
 * after SECONDS (default 120) or on SIGTERM, removing the socket. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test-daemon-notify-recv SOCKET_PATH [SECONDS]\n");
        return 64;
    }
    double limit = argc > 2 ? atof(argv[2]) : 120;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(argv[1]) >= sizeof sa.sun_path) {
        fprintf(stderr, "test-daemon-notify-recv: path too long\n");
        return 64;
    }
    strcpy(sa.sun_path, argv[1]);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    unlink(argv[1]);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        fprintf(stderr, "test-daemon-notify-recv: %s\n", strerror(errno));
        return 1;
    }
    struct sigaction act = { .sa_handler = on_term };
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    double t0 = now_ms();
    while (!stop && now_ms() - t0 < limit * 1e3) {
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, 200) <= 0)
            continue;
        char buf[4096];
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        if (n < 0)
            continue;
        buf[n] = 0;
        for (ssize_t i = 0; i < n; i++)
            if (buf[i] == '\n')
                buf[i] = ' ';
        printf("%.0f %s\n", now_ms() - t0, buf);
    }
    close(fd);
    unlink(argv[1]);
    return 0;
}
