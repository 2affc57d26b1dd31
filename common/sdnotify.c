/* sdnotify.c: service manager notifications (see ds-notify.h).
 *
 * With libsystemd the calls go through sd_notify() and sd_watchdog_enabled();
 * without it, a datagram is sent to $NOTIFY_SOCKET directly, which is the stable
 * protocol systemd documents for daemons that do not link it. */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifdef HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "dspark/ds-notify.h"

uint64_t ds_now_usec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

void ds_random_hex(char *out, size_t bytes)
{
    unsigned char b[64];
    if (bytes > sizeof b)
        bytes = sizeof b;
    if (getrandom(b, bytes, 0) != (ssize_t)bytes) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        uint64_t x = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
        for (size_t i = 0; i < bytes; i++) {
            x = x * 6364136223846793005u + ds_now_usec() + (uint64_t)getpid();
            b[i] = (unsigned char)(x >> 56);
        }
    }
    for (size_t i = 0; i < bytes; i++)
        snprintf(out + 2 * i, 3, "%02x", b[i]);
    out[2 * bytes] = 0;
}

#ifndef HAVE_SYSTEMD
static int notify_send(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return 0;
    if (path[0] != '/' && path[0] != '@')
        return ds_seterr(DS_EIO, "unsupported NOTIFY_SOCKET '%s'", path);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    size_t plen = strlen(path);
    if (plen >= sizeof sa.sun_path)
        return ds_seterr(DS_EIO, "NOTIFY_SOCKET path is too long");
    memcpy(sa.sun_path, path, plen);
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = 0;   /* abstract namespace */
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen + (path[0] == '/' ? 1 : 0));
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return ds_seterr(DS_EIO, "could not create notification socket: %s", strerror(errno));
    ssize_t n;
    do
        n = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
    while (n < 0 && errno == EINTR);
    int saved = errno;
    close(fd);
    if (n < 0)
        return ds_seterr(DS_EIO, "could not send to NOTIFY_SOCKET '%s': %s", path, strerror(saved));
    return 1;
}
#endif

int ds_notify(const char *state)
{
#ifdef HAVE_SYSTEMD
    int r = sd_notify(0, state);
    if (r < 0)
        return ds_seterr(DS_EIO, "could not notify the service manager: %s", strerror(-r));
    return r > 0 ? 1 : 0;
#else
    return notify_send(state);
#endif
}

int ds_notifyf(const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return ds_seterr(DS_EINVAL, "could not format notification");
    return ds_notify(buf);
}

int ds_notify_reloading(void)
{
    return ds_notifyf("RELOADING=1\nMONOTONIC_USEC=%llu", (unsigned long long)ds_now_usec());
}

bool ds_watchdog_enabled(uint64_t *ret_usec)
{
#ifdef HAVE_SYSTEMD
    uint64_t usec = 0;
    if (sd_watchdog_enabled(0, &usec) <= 0)
        return false;
    if (ret_usec)
        *ret_usec = usec;
    return true;
#else
    const char *e = getenv("WATCHDOG_USEC");
    if (!e || !*e)
        return false;
    char *end;
    errno = 0;
    unsigned long long usec = strtoull(e, &end, 10);
    if (*end || errno || usec == 0)
        return false;
    const char *p = getenv("WATCHDOG_PID");
    if (p && *p) {
        long pid = strtol(p, &end, 10);
        if (*end || pid != (long)getpid())
            return false;
    }
    if (ret_usec)
        *ret_usec = usec;
    return true;
#endif
}

void ds_notify_unset_env(void)
{
    unsetenv("NOTIFY_SOCKET");
    unsetenv("WATCHDOG_USEC");
    unsetenv("WATCHDOG_PID");
}
