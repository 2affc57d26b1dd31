/* metrics.c: dsparkd's Prometheus endpoint: GET /metrics over HTTP/1.0 on
 * [metrics] listen (off unless configured).
 *
 * Served from the main loop without ever blocking it: the listening socket
 * and every connection are non-blocking, and at most METRICS_CONNS
 * connections are open at once. A client gets METRICS_REQUEST_US to send its
 * request and METRICS_TIMEOUT_US in all to take the answer; when every slot
 * is taken, a new connection pushes out the oldest one still waiting for its
 * request, so idle connections cannot lock scrapes out. When accept fails for
 * want of descriptors or memory, the listening socket is left alone for a
 * second (the pending connection would wake poll at once, over and over).
 * The page comes from a callback that writes what dsparkd already knows (no
 * database query per scrape); the connection closes after one answer. */
#include "config.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "dspark/ds-err.h"
#include "dspark/ds-log.h"
#include "dsparkd.h"

#define METRICS_CONNS 8
#define METRICS_REQUEST_US 1000000u   /* to send the request */
#define METRICS_TIMEOUT_US 5000000u   /* to take the answer too */
#define METRICS_PAUSE_US 1000000u     /* the listening socket's rest after accept ran out of resources */
#define METRICS_REQUEST_MAX 4096   /* a request's line and headers, at most */

struct metrics_conn {
    int fd;                        /* -1: free */
    uint64_t opened_us;
    char req[METRICS_REQUEST_MAX + 1];
    size_t req_len;
    struct ds_buf out;             /* the answer, once the request is read */
    size_t sent;
};

struct metrics {
    int fd;
    metrics_render_fn render;
    void *arg;
    uint64_t paused_until_us;      /* accept is not tried before (0: not paused) */
    uint64_t now_us;               /* of the last metrics_handle */
    struct metrics_conn conns[METRICS_CONNS];
};

/* "HOST:PORT", "[V6]:PORT" or ":PORT" (every address) into host and port; 0 or -1. */
static int split_address(const char *address, char *host, size_t hsize, char *port, size_t psize)
{
    const char *colon = strrchr(address, ':');
    if (!colon || !colon[1] || strlen(colon + 1) >= psize)
        return -1;
    const char *h = address;
    size_t hl = (size_t)(colon - address);
    if (hl >= 2 && h[0] == '[' && h[hl - 1] == ']') {
        h++;
        hl -= 2;
    }
    if (hl >= hsize)
        return -1;
    memcpy(host, h, hl);
    host[hl] = 0;
    snprintf(port, psize, "%s", colon + 1);
    return 0;
}

int metrics_check_address(const char *address)
{
    char host[256], port[16], *end;
    long p = 0;
    if (split_address(address, host, sizeof host, port, sizeof port) == 0)
        p = strtol(port, &end, 10);
    if (p < 1 || p > 65535 || *end)
        return ds_seterr(DS_ECONFIG, "metrics.listen '%s' is not HOST:PORT, [IPV6]:PORT or :PORT", address);
    return 0;
}

/* A listening socket on the first address of (host, port, family) that can be bound; -1 with *err set. An
 * IPv6 socket also takes IPv4 connections where the system allows (for ":PORT"). */
static int listen_on(const char *host, const char *port, int family, int *gai_err, int *err)
{
    struct addrinfo hints = { .ai_family = family, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE | AI_NUMERICSERV };
    struct addrinfo *ai = NULL;
    *gai_err = getaddrinfo(*host ? host : NULL, port, &hints, &ai);
    if (*gai_err != 0)
        return -1;
    int fd = -1;
    for (struct addrinfo *a = ai; a && fd < 0; a = a->ai_next) {
        /* close-on-exec: the workers dsparkd starts must not hold the port */
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            *err = errno;
            continue;
        }
        int one = 1, zero = 0;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (a->ai_family == AF_INET6)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 16) < 0) {
            *err = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(ai);
    return fd;
}

int metrics_new(const char *address, metrics_render_fn render, void *arg, struct metrics **ret)
{
    char host[256], port[16];
    *ret = NULL;
    int r = metrics_check_address(address);
    if (r < 0)
        return r;
    split_address(address, host, sizeof host, port, sizeof port);
    int gai_err = 0, err = 0, fd = -1;
    if (!*host)   /* every address: IPv6 and IPv4 on one socket, else IPv4 alone */
        fd = listen_on(host, port, AF_INET6, &gai_err, &err);
    if (fd < 0)
        fd = listen_on(host, port, *host ? AF_UNSPEC : AF_INET, &gai_err, &err);
    if (gai_err != 0)
        return ds_seterr(DS_ECONFIG, "metrics.listen '%s': %s", address, gai_strerror(gai_err));
    if (fd < 0)
        return ds_seterr(DS_EIO, "metrics.listen '%s': %s", address, strerror(err));
    struct metrics *m = ds_xcalloc(1, sizeof *m);
    m->fd = fd;
    m->render = render;
    m->arg = arg;
    for (int i = 0; i < METRICS_CONNS; i++)
        m->conns[i].fd = -1;
    *ret = m;
    return 0;
}

static void conn_close(struct metrics_conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->req_len = c->sent = 0;
    ds_buf_free(&c->out);
}

struct metrics *metrics_free(struct metrics *m)
{
    if (!m)
        return NULL;
    for (int i = 0; i < METRICS_CONNS; i++)
        conn_close(&m->conns[i]);
    close(m->fd);
    free(m);
    return NULL;
}

/* The slot for a new connection: a free one, else the oldest connection still waiting for its request
 * (closed), else NULL (every slot is sending an answer). */
static struct metrics_conn *slot_for_new(struct metrics *m)
{
    struct metrics_conn *oldest = NULL;
    for (int i = 0; i < METRICS_CONNS; i++) {
        struct metrics_conn *c = &m->conns[i];
        if (c->fd < 0)
            return c;
        if (!c->out.data && (!oldest || c->opened_us < oldest->opened_us))
            oldest = c;
    }
    if (oldest)
        conn_close(oldest);
    return oldest;
}

int metrics_pollfds(struct metrics *m, struct pollfd *fds, int max)
{
    int n = 0;
    if (!m)
        return 0;
    if (n < max && m->now_us >= m->paused_until_us)
        fds[n++] = (struct pollfd){ .fd = m->fd, .events = POLLIN };
    for (int i = 0; i < METRICS_CONNS && n < max; i++) {
        struct metrics_conn *c = &m->conns[i];
        if (c->fd >= 0)
            fds[n++] = (struct pollfd){ .fd = c->fd, .events = c->out.data ? POLLOUT : POLLIN };
    }
    return n;
}

/* When c is dropped: its request's time, or, once it was read, the whole connection's. */
static uint64_t conn_deadline(const struct metrics_conn *c)
{
    return c->opened_us + (c->out.data ? METRICS_TIMEOUT_US : METRICS_REQUEST_US);
}

/* The answer to the request in c->req (complete: it ends with an empty line). */
static void answer(struct metrics *m, struct metrics_conn *c)
{
    struct ds_buf body = { 0 };
    const char *status = "200 OK", *type = "text/plain; version=0.0.4; charset=utf-8", *extra = "";
    bool head = strncmp(c->req, "HEAD ", 5) == 0;
    const char *path = strchr(c->req, ' ');
    size_t plen = path ? strcspn(path + 1, " ?\r\n") : 0;
    if (!head && strncmp(c->req, "GET ", 4) != 0) {
        status = "405 Method Not Allowed";
        type = "text/plain; charset=utf-8";
        extra = "Allow: GET, HEAD\r\n";   /* (RFC 9110: a 405 names the methods) */
        ds_buf_puts(&body, "only GET /metrics\n");
    } else if (!path || plen != 8 || strncmp(path + 1, "/metrics", 8) != 0) {
        status = "404 Not Found";
        type = "text/plain; charset=utf-8";
        ds_buf_puts(&body, "dsparkd serves /metrics only\n");
    } else {
        m->render(&body, m->arg);
    }
    ds_buf_printf(&c->out, "HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%sConnection: close\r\n\r\n",
                  status, type, body.len, extra);
    if (!head && body.len)
        ds_buf_put(&c->out, body.data, body.len);
    ds_buf_free(&body);
}

/* Read what the client sent; 1 when its request is complete, 0 for more, -1 to drop it. */
static int conn_read(struct metrics_conn *c)
{
    for (;;) {
        if (c->req_len == METRICS_REQUEST_MAX)
            return -1;   /* too long for a scrape */
        ssize_t r = read(c->fd, c->req + c->req_len, METRICS_REQUEST_MAX - c->req_len);
        if (r < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
        if (r == 0)
            return -1;   /* closed before the request ended */
        c->req_len += (size_t)r;
        c->req[c->req_len] = 0;
        if (strstr(c->req, "\r\n\r\n") || strstr(c->req, "\n\n"))
            return 1;
    }
}

/* Send what is left of the answer; 1 when all went out, 0 for more, -1 to drop it. */
static int conn_write(struct metrics_conn *c)
{
    while (c->sent < c->out.len) {
        ssize_t r = send(c->fd, c->out.data + c->sent, c->out.len - c->sent, MSG_NOSIGNAL);
        if (r < 0)
            return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
        c->sent += (size_t)r;
    }
    return 1;
}

/* Accept the pending connections while a slot can be had; answer those whose request came with them. */
static void accept_new(struct metrics *m, uint64_t now_us)
{
    if (now_us < m->paused_until_us)
        return;
    for (;;) {
        int fd = accept4(m->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* the connection stays pending and poll would return at once, over and over */
                ds_log(DS_LOG_WARNING, "metrics: accept failed: %s; not accepting for %.0f s", strerror(errno),
                       METRICS_PAUSE_US / 1e6);
                m->paused_until_us = now_us + METRICS_PAUSE_US;
            } else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR && errno != ECONNABORTED) {
                ds_log(DS_LOG_WARNING, "metrics: accept failed: %s", strerror(errno));
            }
            return;
        }
        struct metrics_conn *c = slot_for_new(m);
        if (!c) {   /* every slot is sending an answer: this one waited its turn long enough */
            close(fd);
            return;
        }
        c->fd = fd;
        c->opened_us = now_us;
        /* a request that came with the connection is answered at once */
        int r = conn_read(c);
        if (r < 0) {
            conn_close(c);
            continue;
        }
        if (r == 1) {
            answer(m, c);
            if (conn_write(c) != 0)
                conn_close(c);
        }
    }
}

void metrics_handle(struct metrics *m, uint64_t now_us)
{
    if (!m)
        return;
    m->now_us = now_us;
    for (int i = 0; i < METRICS_CONNS; i++) {
        struct metrics_conn *c = &m->conns[i];
        if (c->fd < 0)
            continue;
        if (now_us >= conn_deadline(c)) {
            conn_close(c);
            continue;
        }
        if (!c->out.data) {
            int r = conn_read(c);
            if (r < 0) {
                conn_close(c);
                continue;
            }
            if (r == 0)
                continue;
            answer(m, c);
        }
        if (conn_write(c) != 0)
            conn_close(c);   /* all sent, or the client went away */
    }
    accept_new(m, now_us);
}

uint64_t metrics_next_due(const struct metrics *m)
{
    uint64_t next = UINT64_MAX;
    if (!m)
        return next;
    if (m->paused_until_us > m->now_us)
        next = m->paused_until_us;
    for (int i = 0; i < METRICS_CONNS; i++)
        if (m->conns[i].fd >= 0 && conn_deadline(&m->conns[i]) < next)
            next = conn_deadline(&m->conns[i]);
    return next;
}
