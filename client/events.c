/* events.c: event sources for dsparkctl wait/watch (see events.h). */
#include "config.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "dspark/ds-events.h"
#include "dspark/ds-notify.h"
#include "dspark/ds-wire.h"
#include "events.h"

struct listen_source {
    struct ctl_events base;
    struct ds_db *db;
};

struct listen_ctx {
    ctl_event_fn *fn;
    void *ud;
    int hints;
};

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct listen_ctx *ctx = ud;
    int64_t *ids;
    size_t n;
    (void)channel;
    /* a probe, or delayed jobs come due: no job changed */
    if (strncmp(payload, DS_DB_PROBE_PREFIX, strlen(DS_DB_PROBE_PREFIX)) == 0 ||
        strncmp(payload, DS_DB_DUE_PREFIX, strlen(DS_DB_DUE_PREFIX)) == 0)
        return;
    if (ds_db_parse_ids(payload, &ids, &n) < 0 || n == 0) {
        ctx->fn(ctx->ud, -1);
        ctx->hints++;
        return;
    }
    for (size_t i = 0; i < n; i++)
        ctx->fn(ctx->ud, ids[i]);
    ctx->hints += (int)n;
    free(ids);
}

static int listen_wait(struct ctl_events *ev, int timeout_ms, ctl_event_fn *fn, void *ud)
{
    struct listen_source *s = (struct listen_source *)ev;
    struct listen_ctx ctx = { fn, ud, 0 };
    int r = ds_db_wait_notify(s->db, timeout_ms, on_notify, &ctx);
    return r < 0 ? r : ctx.hints;
}

static void listen_free(struct ctl_events *ev)
{
    free(ev);
}

int ctl_events_listen(struct ds_db *db, struct ctl_events **ret)
{
    int r = ds_db_listen(db, DS_DB_EVENTS_CHANNEL);
    if (r < 0)
        return r;
    struct listen_source *s = ds_xcalloc(1, sizeof *s);
    s->base.name = "listen";
    s->base.wait = listen_wait;
    s->base.free = listen_free;
    s->db = db;
    *ret = &s->base;
    return 0;
}

static int poll_wait(struct ctl_events *ev, int timeout_ms, ctl_event_fn *fn, void *ud)
{
    (void)ev;
    (void)fn;
    (void)ud;
    if (timeout_ms < 0)
        timeout_ms = 1000;
    struct timespec ts = { timeout_ms / 1000, (long)(timeout_ms % 1000) * 1000000L };
    nanosleep(&ts, NULL); /* EINTR: an early wake-up is harmless */
    return 0;
}

static void poll_free(struct ctl_events *ev)
{
    free(ev);
}

struct ctl_events *ctl_events_poll(void)
{
    struct ctl_events *ev = ds_xcalloc(1, sizeof *ev);
    ev->name = "poll";
    ev->wait = poll_wait;
    ev->free = poll_free;
    return ev;
}

struct zmq_source {
    struct ctl_events base;
    struct ds_events_sub *sub;
};

static int zmq_wait(struct ctl_events *ev, int timeout_ms, ctl_event_fn *fn, void *ud)
{
    struct zmq_source *s = (struct zmq_source *)ev;
    struct ds_event e;
    int hints = 0;
    uint64_t deadline = ds_now_usec() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000u;
    for (;;) {
        /* block for the first event, but only until timeout_ms has passed (messages that carry no hint, a
         * newer publisher's among them, do not put it off), then take what else is queued */
        uint64_t now = ds_now_usec();
        int left_ms = now >= deadline ? 0 : (int)((deadline - now + 999) / 1000);
        int r = ds_events_sub_recv(s->sub, hints ? 0 : left_ms, &e);
        if (r == -DS_EFORMAT || r == -DS_ENOTSUP) {
            if (!hints && left_ms == 0)
                return 0;
            continue; /* a message we cannot read: skipped */
        }
        if (r < 0)
            return hints ? hints : r;
        if (r == 0)
            return hints;
        if (e.type == DS_EVENT_SUB) {
            fn(ud, -1);   /* the publisher answered the subscription again: what it missed, re-read */
            hints++;
            continue;
        }
        if (e.type != DS_EVENT_JOB) {
            if (!hints && left_ms == 0)
                return 0;
            continue;
        }
        fn(ud, e.id);
        hints++;
        if (hints >= 100000)
            return hints;
    }
}

static void zmq_free(struct ctl_events *ev)
{
    struct zmq_source *s = (struct zmq_source *)ev;
    ds_events_sub_close(s->sub);
    free(s);
}

int ctl_events_zmq(const struct ds_events_sub_opts *o, int64_t batch_id, int sync_ms,
                   struct ctl_events **ret)
{
    const char *ep = o->endpoint && *o->endpoint ? o->endpoint : DS_EVENTS_DEFAULT_ENDPOINT;
    bool curve = o->curve_server_key && *o->curve_server_key;
    struct ds_events_sub *sub;
    int r = ds_events_sub_open_opts(o, &sub);
    if (r < 0)
        return r;
    char topic[DS_WIRE_TOPIC_MAX];
    if (batch_id > 0)
        r = ds_wire_topic_batch(topic, sizeof topic, batch_id);
    else
        r = snprintf(topic, sizeof topic, "%s", DS_WIRE_TOPIC_ALL_JOBS) < 0 ? -DS_EINVAL : 0;
    if (r == 0)
        r = ds_events_sub_topic(sub, topic);
    if (r == 0) {
        r = ds_events_sub_sync(sub, sync_ms);
        /* a CURVE handshake that fails looks the same: nothing answers */
        if (r == 0 && curve)
            r = ds_seterr(DS_EIO,
                          "no event publisher answered at '%s' within %d ms; with CURVE, check"
                          " that the server key is dsparkd's and that this client's public key"
                          " is on its allow-list", ep, sync_ms);
        else if (r == 0)
            r = ds_seterr(DS_EIO, "no event publisher answered at '%s' within %d ms", ep,
                          sync_ms);
    }
    if (r < 0) {
        ds_events_sub_close(sub);
        return r;
    }
    struct zmq_source *s = ds_xcalloc(1, sizeof *s);
    s->base.name = "zeromq";
    s->base.wait = zmq_wait;
    s->base.free = zmq_free;
    s->sub = sub;
    *ret = &s->base;
    return 0;
}

/* A 40-character string of the Z85 alphabet (dsparkd checks the rest). */
static bool looks_z85(const char *s)
{
    static const char alphabet[] =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
    if (strlen(s) != DS_EVENTS_KEY_Z85_LEN)
        return false;
    for (; *s; s++)
        if (!strchr(alphabet, *s))
            return false;
    return true;
}

int ctl_events_read_keys(const char *server_file, const char *client_file,
                         struct ctl_curve_keys *keys, struct ds_events_sub_opts *o)
{
    struct ctl_curve_keys k;
    int r;
    if (access(server_file, F_OK) != 0 && errno == ENOENT && looks_z85(server_file))
        memcpy(k.server, server_file, sizeof k.server);
    else if ((r = ds_events_read_key_file(server_file, "public-key", k.server)) < 0)
        return r;
    if ((r = ds_events_read_key_file(client_file, "public-key", k.pub)) < 0 ||
        (r = ds_events_read_key_file(client_file, "secret-key", k.sec)) < 0)
        return r;
    /* a file of one bare key answers both names with it: that is no key pair */
    if (strcmp(k.pub, k.sec) == 0)
        return ds_seterr(DS_ECONFIG,
                         "key file '%s' holds no key pair: it needs a 'public-key' and a"
                         " 'secret-key' line, as 'dsparkctl keygen' prints them", client_file);
    *keys = k;
    o->curve_server_key = keys->server;
    o->curve_public_key = keys->pub;
    o->curve_secret_key = keys->sec;
    return 0;
}

struct ctl_events *ctl_events_free(struct ctl_events *ev)
{
    if (ev)
        ev->free(ev);
    return NULL;
}
