/* events.c: ZeroMQ publisher and subscriber for dsparkd events (see ds-events.h).
 *
 * Publisher: an XPUB socket with XPUB_VERBOSE, so every subscription message
 * reaches ds_events_pub_process(), which answers it with "ack|<topic>". ZeroMQ
 * delivers a connection's messages in order and a subscription is applied before
 * the publisher sends anything after reading it, so when the subscriber sees the
 * ack, every later event on its topic reaches it, unless the subscriber's queue
 * is past its high-water mark: then ZeroMQ drops it for that subscriber alone,
 * without a word. So the publisher counts the messages published under each
 * subscribed topic (a sorted table; a message counts under every subscribed
 * prefix of its topic) and sends the count with the ack and in checkpoints, on
 * "cp|<length>|<topic>" (which reaches that topic's subscribers alone, unlike
 * "ack|<topic>", a prefix of the acks of longer topics); the subscriber counts
 * what it receives under each topic the same way, and a count that moved by
 * other than that since the last one means a loss. A topic's entry is made anew
 * when it is subscribed after its last subscriber left, with a new generation
 * in "pub", so a count that restarted is not taken for a loss. With CURVE, a
 * REP socket on inproc://zeromq.zap.01 answers the ZAP requests of the
 * handshake from the allow-list; it is served from the same loop, never from
 * another thread.
 *
 * Subscriber: a SUB socket that also subscribes "ack|<topic>" and
 * "cp|<length>|<topic>" before each topic,
 * keeps a list of topics waiting for their ack, and a small queue for events that
 * arrive while ds_events_sub_sync() waits. Acks go to every subscriber of a
 * topic, so with its first topic a subscriber also subscribes a topic of its
 * own ("me|<random>|"), whose ack only it receives. When ZeroMQ connects again
 * (a restarted publisher), it sends the subscriptions again, in the order of
 * its subscription trie, where "ack|" comes before "hb|", "job|" and "me|"; the
 * new publisher's ack of the subscriber's own topic then arrives a second time,
 * and the subscriber hands it to the caller. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <zmq.h>

#include "dspark/ds-events.h"
#include "dspark/ds-log.h"
#include "dspark/ds-notify.h"

#define ZAP_ENDPOINT "inproc://zeromq.zap.01"
#define ALLOW_MAX 4096
#define SUB_QUEUE_MAX 1024
#define SUB_TOPICS_MAX 256
#define PUB_TOPICS_MAX 65536      /* subscribed topics a publisher counts */
#define DS_EVENTS_MAX_SUBSCRIPTION 512   /* bytes of one subscription message (a topic and its prefix byte) */

/* ---- shared helpers ---- */

bool ds_events_endpoint_is_local(const char *e)
{
    if (!e)
        return true;   /* the default is ipc */
    if (strncmp(e, "ipc://", 6) == 0 || strncmp(e, "inproc://", 9) == 0)
        return true;
    if (strncmp(e, "tcp://", 6) != 0)
        return false;
    const char *h = e + 6;
    static const char *local[] = { "127.", "localhost:", "[::1]:", "lo:" };
    for (size_t i = 0; i < sizeof local / sizeof local[0]; i++)
        if (strncmp(h, local[i], strlen(local[i])) == 0)
            return true;
    return false;
}

static bool z85_valid(const char *k)
{
    static const char alphabet[] =
        "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";
    if (strlen(k) != DS_EVENTS_KEY_Z85_LEN)
        return false;
    for (const char *c = k; *c; c++)
        if (!strchr(alphabet, *c))
            return false;
    uint8_t bin[32];
    return zmq_z85_decode(bin, k) != NULL;
}

/* Extract a key from one line: bare, or `name = "key"`. Returns 1 with z85
 * (and the name, "" for a bare key), 0 for a blank or comment line, -1 for
 * anything else. A bare key may start with '#' (a Z85 character): a line that
 * is exactly a valid key is a key, not a comment. */
static int key_from_line(char *line, char z85[DS_EVENTS_KEY_Z85_LEN + 1], char name[32])
{
    char *s = line;
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n > 0 && strchr(" \t\r\n", s[n - 1]))
        s[--n] = 0;
    name[0] = 0;
    if (z85_valid(s)) {
        memcpy(z85, s, DS_EVENTS_KEY_Z85_LEN + 1);
        return 1;
    }
    if (*s == 0 || *s == '#')
        return 0;
    /* name = "key" ('=' is also a Z85 character, so only this quoted form is an assignment) */
    char *q1 = strchr(s, '"'), *q2 = q1 ? strchr(q1 + 1, '"') : NULL;
    char *eq = strchr(s, '=');
    if (!q1 || !q2 || !eq || eq > q1)
        return -1;
    char *ne = eq;
    while (ne > s && (ne[-1] == ' ' || ne[-1] == '\t'))
        ne--;
    if ((size_t)(ne - s) >= 32)
        return -1;
    memcpy(name, s, (size_t)(ne - s));
    name[ne - s] = 0;
    *q2 = 0;
    if (!z85_valid(q1 + 1))
        return -1;
    memcpy(z85, q1 + 1, DS_EVENTS_KEY_Z85_LEN + 1);
    return 1;
}

int ds_events_read_key_file(const char *path, const char *want, char z85[DS_EVENTS_KEY_Z85_LEN + 1])
{
    FILE *f = fopen(path, "r");
    if (!f)
        return ds_seterr(DS_ECONFIG, "could not open key file '%s': %s", path, strerror(errno));
    char line[512], key[DS_EVENTS_KEY_Z85_LEN + 1], name[32];
    char first[DS_EVENTS_KEY_Z85_LEN + 1] = "";
    bool first_named = false, found = false;
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        int r = key_from_line(line, key, name);
        if (r == 0)
            continue;
        if (r < 0) {
            fclose(f);
            return ds_seterr(DS_ECONFIG, "key file '%s' line %d: expected a 40-character Z85 key", path, lineno);
        }
        if (want && strcmp(name, want) == 0) {
            memcpy(z85, key, sizeof key);
            found = true;
            break;
        }
        if (!first[0]) {
            memcpy(first, key, sizeof key);
            first_named = name[0] != 0;
        }
    }
    fclose(f);
    if (found)
        return 0;
    /* no line of that name: a file holding one bare key */
    if (first[0] && (!want || !first_named)) {
        memcpy(z85, first, sizeof first);
        return 0;
    }
    if (want)
        return ds_seterr(DS_ECONFIG, "key file '%s' holds no '%s'", path, want);
    return ds_seterr(DS_ECONFIG, "key file '%s' holds no key", path);
}

int ds_events_curve_keypair(char pub[DS_EVENTS_KEY_Z85_LEN + 1], char sec[DS_EVENTS_KEY_Z85_LEN + 1])
{
    if (!zmq_has("curve"))
        return ds_seterr(DS_ENOTSUP, "this libzmq has no CURVE support");
    if (zmq_curve_keypair(pub, sec) != 0)
        return ds_seterr(DS_EIO, "could not make a CURVE key pair: %s", zmq_strerror(zmq_errno()));
    return 0;
}

/* ---- publisher ---- */

/* A subscribed topic and the messages published under it (as a prefix) since it was last subscribed with no
 * subscriber before. */
struct pub_topic {
    char *topic;
    size_t len;
    int64_t count;
    int64_t sent;              /* the count at its last checkpoint (-1: none yet) */
    uint64_t gen;              /* which entry of this topic: counts of different entries do not compare */
};

struct ds_events_pub {
    void *ctx;
    void *xpub;
    void *zap;                 /* REP for ZAP, CURVE only */
    char endpoint[512];
    char ipc_path[512];        /* file to remove on close */
    uint8_t (*allow)[32];      /* [n_allow] client public keys */
    size_t n_allow;
    char token[17];            /* this publisher's instance: the counts below are its own */
    struct pub_topic *topics;  /* [n_topics] subscribed topics, counted, in byte order */
    size_t n_topics, cap_topics;
    uint32_t n_by_len[DS_WIRE_TOPIC_MAX];   /* counted topics of each length: the prefixes worth looking up */
    uint64_t next_gen;
    bool full_said;            /* the table's bound was logged */
};

static int load_allow(const char *path, uint8_t (**ret)[32], size_t *ret_n)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return ds_seterr(DS_ECONFIG, "could not open CURVE allow file '%s': %s", path, strerror(errno));
    uint8_t (*keys)[32] = NULL;
    size_t n = 0;
    char line[512], z85[DS_EVENTS_KEY_Z85_LEN + 1], name[32];
    int lineno = 0;
    while (fgets(line, sizeof line, f)) {
        lineno++;
        int r = key_from_line(line, z85, name);
        if (r == 0)
            continue;
        if (r > 0 && strcmp(name, "secret-key") == 0) {
            fclose(f);
            free(keys);
            return ds_seterr(DS_ECONFIG, "CURVE allow file '%s' line %d holds a secret key: list public keys only",
                             path, lineno);
        }
        if (r < 0 || n >= ALLOW_MAX) {
            fclose(f);
            free(keys);
            if (r < 0)
                return ds_seterr(DS_ECONFIG, "CURVE allow file '%s' line %d: expected a 40-character Z85 public key",
                                 path, lineno);
            return ds_seterr(DS_ECONFIG, "CURVE allow file '%s' has more than %d keys", path, ALLOW_MAX);
        }
        keys = ds_xrealloc(keys, (n + 1) * sizeof *keys);
        zmq_z85_decode(keys[n], z85);
        n++;
    }
    fclose(f);
    *ret = keys;
    *ret_n = n;
    return 0;
}

int ds_events_pub_reload_allow(struct ds_events_pub *p, const char *allow_file)
{
    if (!p->zap)
        return ds_seterr(DS_EINVAL, "the publisher does not use CURVE");
    uint8_t (*keys)[32];
    size_t n;
    int r = load_allow(allow_file, &keys, &n);
    if (r < 0)
        return r;
    free(p->allow);
    p->allow = keys;
    p->n_allow = n;
    return 0;
}

struct ds_events_pub *ds_events_pub_close(struct ds_events_pub *p)
{
    if (!p)
        return NULL;
    if (p->xpub)
        zmq_close(p->xpub);
    if (p->zap)
        zmq_close(p->zap);
    if (p->ctx)
        zmq_ctx_term(p->ctx);
    if (p->ipc_path[0])
        unlink(p->ipc_path);
    free(p->allow);
    for (size_t i = 0; i < p->n_topics; i++)
        free(p->topics[i].topic);
    free(p->topics);
    free(p);
    return NULL;
}

/* Does a process accept connections on this unix socket? (ZeroMQ removes the
 * file of an ipc endpoint before binding, which would silently take the
 * endpoint away from a running daemon.) */
static bool ipc_in_use(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        return false;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return false;
    bool used = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0;
    close(fd);
    return used;
}

static int setopt_int(void *s, int opt, int v)
{
    return zmq_setsockopt(s, opt, &v, sizeof v);
}

int ds_events_pub_open(const struct ds_events_pub_opts *o, struct ds_events_pub **ret)
{
    const char *ep = o && o->endpoint && *o->endpoint ? o->endpoint : DS_EVENTS_DEFAULT_ENDPOINT;
    bool curve = o && o->curve_secret_key_file && *o->curve_secret_key_file;
    int r;

    if (strlen(ep) >= sizeof ((struct ds_events_pub *)0)->endpoint)
        return ds_seterr(DS_ECONFIG, "events endpoint '%s' is too long", ep);
    if (strncmp(ep, "ipc://", 6) != 0 && strncmp(ep, "tcp://", 6) != 0 && strncmp(ep, "inproc://", 9) != 0)
        return ds_seterr(DS_ECONFIG, "events endpoint '%s' is not ipc://, tcp:// or inproc://", ep);
    if (!curve && !ds_events_endpoint_is_local(ep))
        return ds_seterr(DS_ECONFIG,
                         "refusing to publish events on '%s' without CURVE: set events.curve_secret_key_file "
                         "and events.curve_allow_file, or bind to ipc:// or tcp://127.0.0.1", ep);
    if (curve && !(o->curve_allow_file && *o->curve_allow_file))
        return ds_seterr(DS_ECONFIG, "events.curve_secret_key_file needs events.curve_allow_file");
    if (curve && !zmq_has("curve"))
        return ds_seterr(DS_ENOTSUP, "this libzmq has no CURVE support");

    struct ds_events_pub *p = ds_xcalloc(1, sizeof *p);
    ds_random_hex(p->token, 8);
    char secret[DS_EVENTS_KEY_Z85_LEN + 1];
    if (curve) {
        if ((r = ds_events_read_key_file(o->curve_secret_key_file, "secret-key", secret)) < 0)
            goto fail;
        if ((r = load_allow(o->curve_allow_file, &p->allow, &p->n_allow)) < 0)
            goto fail;
    }

    p->ctx = zmq_ctx_new();
    if (!p->ctx) {
        r = ds_seterr(DS_EIO, "could not create a ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (curve) {
        p->zap = zmq_socket(p->ctx, ZMQ_REP);
        if (!p->zap || zmq_bind(p->zap, ZAP_ENDPOINT) != 0) {
            r = ds_seterr(DS_EIO, "could not start the CURVE authenticator: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    if (strncmp(ep, "ipc://", 6) == 0 && ep[6] != '@' && ipc_in_use(ep + 6)) {
        r = ds_seterr(DS_EIO, "events endpoint '%s' is in use by another process", ep);
        goto fail;
    }
    p->xpub = zmq_socket(p->ctx, ZMQ_XPUB);
    if (!p->xpub) {
        r = ds_seterr(DS_EIO, "could not create the event socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    int hwm = o && o->sndhwm > 0 ? o->sndhwm : 100000;
    /* what subscribers send is subscriptions (topics of a few dozen bytes):
     * a longer message drops the peer, so that no client can make the
     * publisher keep megabytes of topics */
    int64_t max_in = DS_EVENTS_MAX_SUBSCRIPTION;
    if (setopt_int(p->xpub, ZMQ_XPUB_VERBOSE, 1) != 0 || setopt_int(p->xpub, ZMQ_SNDHWM, hwm) != 0 ||
        setopt_int(p->xpub, ZMQ_LINGER, 200) != 0 ||
        zmq_setsockopt(p->xpub, ZMQ_MAXMSGSIZE, &max_in, sizeof max_in) != 0) {
        r = ds_seterr(DS_EIO, "could not configure the event socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (curve) {
        if (setopt_int(p->xpub, ZMQ_CURVE_SERVER, 1) != 0 ||
            zmq_setsockopt(p->xpub, ZMQ_CURVE_SECRETKEY, secret, DS_EVENTS_KEY_Z85_LEN) != 0 ||
            zmq_setsockopt(p->xpub, ZMQ_ZAP_DOMAIN, "dspark", 6) != 0) {
            r = ds_seterr(DS_ECONFIG, "could not configure CURVE: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    /* ZeroMQ binds to addresses and interfaces, not host names: 'localhost' is bound as 127.0.0.1, and an
     * IPv6 address such as [::1] needs the socket's IPv6 option */
    char bind_ep[sizeof p->endpoint];
    const char *bep = ep;
    if (strncmp(ep, "tcp://localhost:", 16) == 0) {
        snprintf(bind_ep, sizeof bind_ep, "tcp://127.0.0.1:%s", ep + 16);
        bep = bind_ep;
    }
    if (strncmp(ep, "tcp://[", 7) == 0 && setopt_int(p->xpub, ZMQ_IPV6, 1) != 0) {
        r = ds_seterr(DS_EIO, "could not configure the event socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_bind(p->xpub, bep) != 0) {
        r = ds_seterr(DS_EIO, "could not bind the event socket to '%s': %s", ep, zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t len = sizeof p->endpoint;
    if (zmq_getsockopt(p->xpub, ZMQ_LAST_ENDPOINT, p->endpoint, &len) != 0)
        snprintf(p->endpoint, sizeof p->endpoint, "%s", ep);
    if (strncmp(ep, "ipc://", 6) == 0 && ep[6] != '@') {
        snprintf(p->ipc_path, sizeof p->ipc_path, "%s", ep + 6);
        if (o && o->ipc_mode > 0 && chmod(p->ipc_path, (mode_t)o->ipc_mode) != 0) {
            r = ds_seterr(DS_EIO, "could not set the mode of '%s': %s", p->ipc_path, strerror(errno));
            goto fail;
        }
    }
    *ret = p;
    return 0;
fail:
    ds_events_pub_close(p);
    return r;
}

const char *ds_events_pub_endpoint(const struct ds_events_pub *p)
{
    return p->endpoint;
}

int ds_events_pub_fds(struct ds_events_pub *p, int *fds, int max)
{
    int n = 0;
    void *socks[2] = { p->xpub, p->zap };
    for (int i = 0; i < 2 && n < max; i++) {
        if (!socks[i])
            continue;
        int fd;
        size_t len = sizeof fd;
        if (zmq_getsockopt(socks[i], ZMQ_FD, &fd, &len) == 0)
            fds[n++] = fd;
    }
    return n;
}

/* Whether a topic (its first len bytes) is one the publisher answers on: an ack's or a checkpoint's. Such
 * topics are neither acknowledged nor counted, by the publisher or by a subscriber. */
static bool answer_topic(const char *topic, size_t len)
{
    static const char *const prefixes[] = {DS_WIRE_TOPIC_ACK, DS_WIRE_TOPIC_CHECKPOINT};
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        size_t n = strlen(prefixes[i]);
        if (len >= n && memcmp(topic, prefixes[i], n) == 0)
            return true;
    }
    return false;
}

static int key_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    int c = memcmp(a, b, alen < blen ? alen : blen);
    return c ? c : (alen > blen) - (alen < blen);
}

/* Whether the first len bytes of key are a counted topic (*at: its index), or where it would go (*at). */
static bool pub_topic_find(const struct ds_events_pub *p, const char *key, size_t len, size_t *at)
{
    size_t lo = 0, hi = p->n_topics;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = key_cmp(p->topics[mid].topic, p->topics[mid].len, key, len);
        if (c == 0) {
            *at = mid;
            return true;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *at = lo;
    return false;
}

static int send_frames(void *sock, const char *topic, const char *payload, size_t len)
{
    if (zmq_send(sock, topic, strlen(topic), ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0)
        return -1;
    if (zmq_send(sock, payload, len, ZMQ_DONTWAIT) < 0)
        return -1;
    return 0;
}

int ds_events_publish(struct ds_events_pub *p, const struct ds_event *ev)
{
    char topic[DS_WIRE_TOPIC_MAX + 8], *buf;
    size_t len;
    int r = ds_wire_topic(ev, topic, sizeof topic);
    if (r < 0)
        return r;
    if ((r = ds_wire_encode(ev, &buf, &len)) < 0)
        return r;
    /* counted whether or not every subscriber's queue takes it (what a subscriber lost is the difference),
     * under each subscribed topic that is a prefix of its own */
    if (ev->type != DS_EVENT_SUB && p->n_topics > 0)
        for (size_t n = 0, tlen = strlen(topic); n <= tlen && n < DS_WIRE_TOPIC_MAX; n++) {
            size_t at;
            if (p->n_by_len[n] > 0 && pub_topic_find(p, topic, n, &at))
                p->topics[at].count++;
        }
    int s = send_frames(p->xpub, topic, buf, len);
    int err = zmq_errno();
    free(buf);
    /* XPUB never blocks; EAGAIN cannot happen, but a terminated context can */
    if (s < 0 && err != EAGAIN)
        return ds_seterr(DS_EIO, "could not publish an event: %s", zmq_strerror(err));
    return 0;
}

/* One ZAP request: answer 200 for allow-listed CURVE keys, 400 otherwise. */
static int zap_serve_one(struct ds_events_pub *p)
{
    char frames[7][256];
    size_t sizes[7];
    int n = 0, more = 1;
    while (more) {
        int rc = zmq_recv(p->zap, n < 7 ? frames[n] : frames[6], 255, n == 0 ? ZMQ_DONTWAIT : 0);
        if (rc < 0)
            return n == 0 && zmq_errno() == EAGAIN ? 0 : -1;
        if (n < 7)
            sizes[n] = (size_t)rc > 255 ? 255 : (size_t)rc;
        n++;
        size_t ml = sizeof more;
        if (zmq_getsockopt(p->zap, ZMQ_RCVMORE, &more, &ml) != 0)
            more = 0;
    }
    bool ok = false;
    if (n >= 7 && sizes[5] == 5 && memcmp(frames[5], "CURVE", 5) == 0 && sizes[6] == 32)
        for (size_t i = 0; i < p->n_allow && !ok; i++)
            ok = memcmp(p->allow[i], frames[6], 32) == 0;
    const char *status = ok ? "200" : "400";
    const char *text = ok ? "OK" : "client key not allowed";
    zmq_send(p->zap, "1.0", 3, ZMQ_SNDMORE);
    zmq_send(p->zap, n > 1 ? frames[1] : "", n > 1 ? sizes[1] : 0, ZMQ_SNDMORE);
    zmq_send(p->zap, status, 3, ZMQ_SNDMORE);
    zmq_send(p->zap, text, strlen(text), ZMQ_SNDMORE);
    zmq_send(p->zap, "", 0, ZMQ_SNDMORE);
    zmq_send(p->zap, "", 0, 0);
    return 1;
}

/* The sub map of a topic: its ack, or a checkpoint of its count (on "cp|<length>|<topic>", which reaches the
 * topic's subscribers alone); with the count where the topic is counted. */
static int publish_sub(struct ds_events_pub *p, const char *topic, const struct pub_topic *t, bool checkpoint)
{
    struct ds_event ack = { .type = DS_EVENT_SUB, .ts = ds_wire_now() };
    snprintf(ack.topic, sizeof ack.topic, "%s", topic);
    if (t) {
        ack.has |= DS_EV_COUNT;
        ack.count = t->count;
        snprintf(ack.pub, sizeof ack.pub, "%s.%" PRIx64, p->token, t->gen);
    }
    if (checkpoint)
        ack.has |= DS_EV_CHECKPOINT;
    return ds_events_publish(p, &ack);
}

int ds_events_pub_checkpoint(struct ds_events_pub *p, bool all)
{
    int sent = 0;
    for (size_t i = 0; i < p->n_topics; i++) {
        struct pub_topic *t = &p->topics[i];
        if (!all && t->count == t->sent)
            continue;
        int r = publish_sub(p, t->topic, t, true);
        if (r < 0)
            return r;
        t->sent = t->count;
        sent++;
    }
    return sent;
}

size_t ds_events_pub_topics(const struct ds_events_pub *p)
{
    return p->n_topics;
}

int ds_events_pub_process(struct ds_events_pub *p)
{
    int answered = 0;
    if (p->zap)
        while (zap_serve_one(p) > 0)
            ;
    for (;;) {
        char msg[DS_WIRE_TOPIC_MAX + 8];
        int rc = zmq_recv(p->xpub, msg, sizeof msg, ZMQ_DONTWAIT);
        if (rc < 0) {
            if (zmq_errno() == EAGAIN || zmq_errno() == EINTR)
                break;
            return ds_seterr(DS_EIO, "could not read subscriptions: %s", zmq_strerror(zmq_errno()));
        }
        /* subscribe = 1 + topic; unsubscribe = 0 + topic (its last subscriber left); too long = ignored */
        if (rc < 1 || (size_t)rc > sizeof msg - 1 || (msg[0] != 0 && msg[0] != 1))
            continue;
        msg[rc] = 0;
        const char *topic = msg + 1;
        size_t tlen = (size_t)rc - 1;
        /* the subscribers' ack and checkpoint topics are answered on themselves: neither acked nor counted */
        if (tlen != strlen(topic) || answer_topic(topic, tlen) ||
            tlen + strlen(DS_WIRE_TOPIC_CHECKPOINT) + 4 >= DS_WIRE_TOPIC_MAX)
            continue;
        size_t at;
        bool known = pub_topic_find(p, topic, tlen, &at);
        if (msg[0] == 0) {
            if (known) {
                free(p->topics[at].topic);
                memmove(&p->topics[at], &p->topics[at + 1], (p->n_topics - at - 1) * sizeof *p->topics);
                p->n_topics--;
                p->n_by_len[tlen]--;
            }
            continue;
        }
        /* counted from now on: every topic but a subscriber's own (nothing is published there), up to a bound
         * (past it, acks carry no count and those subscribers are not told of losses) */
        bool own = strncmp(topic, DS_WIRE_TOPIC_SELF, strlen(DS_WIRE_TOPIC_SELF)) == 0;
        if (!known && !own && p->n_topics >= PUB_TOPICS_MAX && !p->full_said) {
            ds_log(DS_LOG_WARNING, "events: %d topics subscribed: later ones are not counted, and their subscribers "
                   "are not told of lost events", PUB_TOPICS_MAX);
            p->full_said = true;
        }
        if (!known && !own && p->n_topics < PUB_TOPICS_MAX) {
            if (p->n_topics == p->cap_topics) {
                p->cap_topics = p->cap_topics ? 2 * p->cap_topics : 16;
                p->topics = ds_xrealloc(p->topics, p->cap_topics * sizeof *p->topics);
            }
            memmove(&p->topics[at + 1], &p->topics[at], (p->n_topics - at) * sizeof *p->topics);
            p->topics[at] = (struct pub_topic){ .topic = ds_xstrdup(topic), .len = tlen, .count = 0, .sent = -1,
                                                .gen = ++p->next_gen };
            p->n_topics++;
            p->n_by_len[tlen]++;
            known = true;
        }
        int r = publish_sub(p, topic, known ? &p->topics[at] : NULL, false);
        if (r < 0)
            return r;
        answered++;
    }
    if (p->zap)
        while (zap_serve_one(p) > 0)
            ;
    return answered;
}

/* ---- subscriber ---- */

struct sub_topic {
    char *topic;
    size_t len;
    bool acked;
    bool counted;              /* the last ack carried the publisher's count: base and seen below hold */
    int64_t base;              /* that count */
    int64_t seen;              /* messages received under the topic since that ack */
    char pub[40];              /* which count (publisher instance and topic entry) base belongs to */
};

struct ds_events_sub {
    void *ctx;
    void *sock;
    struct sub_topic *topics;
    size_t n_topics;
    char self[40];             /* "me|<16 hex digits>|": its ack reaches this subscriber alone; "" before the first topic */
    bool self_acked;
    struct ds_event *queue;    /* ring of SUB_QUEUE_MAX */
    size_t q_head, q_len;
    size_t dropped;
    bool dropped_unsaid;       /* the queue dropped events since the caller was last told to read again */
};

struct ds_events_sub *ds_events_sub_close(struct ds_events_sub *s)
{
    if (!s)
        return NULL;
    if (s->sock)
        zmq_close(s->sock);
    if (s->ctx)
        zmq_ctx_term(s->ctx);
    for (size_t i = 0; i < s->n_topics; i++)
        free(s->topics[i].topic);
    free(s->topics);
    free(s->queue);
    free(s);
    return NULL;
}

int ds_events_sub_open(const char *endpoint, struct ds_events_sub **ret)
{
    struct ds_events_sub_opts o = { .endpoint = endpoint };
    return ds_events_sub_open_opts(&o, ret);
}

int ds_events_sub_open_opts(const struct ds_events_sub_opts *o, struct ds_events_sub **ret)
{
    const char *ep = o && o->endpoint && *o->endpoint ? o->endpoint : DS_EVENTS_DEFAULT_ENDPOINT;
    bool curve = o && o->curve_server_key && *o->curve_server_key;
    int r;
    if (curve) {
        if (!zmq_has("curve"))
            return ds_seterr(DS_ENOTSUP, "this libzmq has no CURVE support");
        if (!z85_valid(o->curve_server_key))
            return ds_seterr(DS_ECONFIG, "the server's CURVE key is not a 40-character Z85 key");
        if (!o->curve_public_key || !o->curve_secret_key || !z85_valid(o->curve_public_key) ||
            !z85_valid(o->curve_secret_key))
            return ds_seterr(DS_ECONFIG, "CURVE needs the client's public and secret keys (40-character Z85)");
    }
    struct ds_events_sub *s = ds_xcalloc(1, sizeof *s);
    s->ctx = zmq_ctx_new();
    if (!s->ctx) {
        r = ds_seterr(DS_EIO, "could not create a ZeroMQ context: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    s->sock = zmq_socket(s->ctx, ZMQ_SUB);
    /* no high-water mark on what a SUB sends: its subscriptions (three a topic), which ZeroMQ would drop past
     * the mark while they wait for the connection */
    if (!s->sock || setopt_int(s->sock, ZMQ_LINGER, 0) != 0 || setopt_int(s->sock, ZMQ_SNDHWM, 0) != 0) {
        r = ds_seterr(DS_EIO, "could not create the subscriber socket: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (curve &&
        (zmq_setsockopt(s->sock, ZMQ_CURVE_SERVERKEY, o->curve_server_key, DS_EVENTS_KEY_Z85_LEN) != 0 ||
         zmq_setsockopt(s->sock, ZMQ_CURVE_PUBLICKEY, o->curve_public_key, DS_EVENTS_KEY_Z85_LEN) != 0 ||
         zmq_setsockopt(s->sock, ZMQ_CURVE_SECRETKEY, o->curve_secret_key, DS_EVENTS_KEY_Z85_LEN) != 0)) {
        r = ds_seterr(DS_ECONFIG, "could not configure CURVE: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_connect(s->sock, ep) != 0) {
        r = ds_seterr(DS_EIO, "could not connect to events endpoint '%s': %s", ep, zmq_strerror(zmq_errno()));
        goto fail;
    }
    s->queue = ds_xcalloc(SUB_QUEUE_MAX, sizeof *s->queue);
    *ret = s;
    return 0;
fail:
    ds_events_sub_close(s);
    return r;
}

int ds_events_sub_topic(struct ds_events_sub *s, const char *topic)
{
    size_t n = strlen(topic);
    char ack[DS_WIRE_TOPIC_MAX + 8], checkpoint[DS_WIRE_TOPIC_MAX + 8];
    if (n + strlen(DS_WIRE_TOPIC_CHECKPOINT) + 4 >= DS_WIRE_TOPIC_MAX)   /* as the publisher answers it */
        return ds_seterr(DS_EINVAL, "topic '%s' is too long", topic);
    for (size_t i = 0; i < s->n_topics; i++)
        if (strcmp(s->topics[i].topic, topic) == 0)
            return 0;   /* subscribed already: one subscription, one ack */
    if (s->n_topics >= SUB_TOPICS_MAX)
        return ds_seterr(DS_ELIMIT, "more than %d topics on one subscriber", SUB_TOPICS_MAX);
    if (!s->self[0]) {   /* this subscriber's own topic, its ack subscription first */
        char token[17], self[sizeof s->self], self_ack[sizeof s->self + 8];
        ds_random_hex(token, 8);
        snprintf(self, sizeof self, "%s%s|", DS_WIRE_TOPIC_SELF, token);
        snprintf(self_ack, sizeof self_ack, "%s%s", DS_WIRE_TOPIC_ACK, self);
        if (zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, self_ack, strlen(self_ack)) != 0 ||
            zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, self, strlen(self)) != 0)
            return ds_seterr(DS_EIO, "could not subscribe: %s", zmq_strerror(zmq_errno()));
        memcpy(s->self, self, sizeof self);
    }
    snprintf(ack, sizeof ack, "%s%s", DS_WIRE_TOPIC_ACK, topic);
    if (ds_wire_topic_checkpoint(checkpoint, sizeof checkpoint, topic) < 0)
        return -DS_EINVAL;
    /* the ack and checkpoint subscriptions go first, so they are in place when the ack comes back */
    if (zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, ack, strlen(ack)) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, checkpoint, strlen(checkpoint)) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_SUBSCRIBE, topic, n) != 0)
        return ds_seterr(DS_EIO, "could not subscribe to '%s': %s", topic, zmq_strerror(zmq_errno()));
    s->topics = ds_xrealloc(s->topics, (s->n_topics + 1) * sizeof *s->topics);
    s->topics[s->n_topics++] = (struct sub_topic){ .topic = ds_xstrdup(topic), .len = n };
    return 0;
}

int ds_events_sub_fd(struct ds_events_sub *s)
{
    int fd = -1;
    size_t len = sizeof fd;
    if (zmq_getsockopt(s->sock, ZMQ_FD, &fd, &len) != 0)
        return ds_seterr(DS_EIO, "could not get the subscriber descriptor: %s", zmq_strerror(zmq_errno()));
    return fd;
}

size_t ds_events_sub_dropped(const struct ds_events_sub *s)
{
    return s->dropped;
}

/* A job or heartbeat message under topic (its first tlen bytes): one more received under every subscribed topic
 * that is a prefix of it, as the publisher counts it. Acks are not counted on either side. */
static void count_received(struct ds_events_sub *s, const char *topic, size_t tlen)
{
    if (answer_topic(topic, tlen))
        return;
    for (size_t i = 0; i < s->n_topics; i++) {
        struct sub_topic *t = &s->topics[i];
        if (t->counted && t->len <= tlen && memcmp(topic, t->topic, t->len) == 0)
            t->seen++;
    }
}

/* Read one message without waiting. Returns 1 with *out (acks included), 0 when
 * none is waiting, negative on error or malformed input (message consumed). */
static int recv_one(struct ds_events_sub *s, struct ds_event *out)
{
    char topic[DS_WIRE_TOPIC_MAX + 8];
    char payload[DS_WIRE_MSG_MAX + 1];
    int rc = zmq_recv(s->sock, topic, sizeof topic - 1, ZMQ_DONTWAIT);
    if (rc < 0) {
        int e = zmq_errno();
        if (e == EAGAIN || e == EINTR)
            return 0;
        return ds_seterr(DS_EIO, "could not receive an event: %s", zmq_strerror(e));
    }
    size_t tlen = (size_t)rc;
    int more = 0;
    size_t ml = sizeof more;
    zmq_getsockopt(s->sock, ZMQ_RCVMORE, &more, &ml);
    if (!more)
        return ds_seterr(DS_EFORMAT, "event message has no payload frame");
    rc = zmq_recv(s->sock, payload, sizeof payload, 0);
    if (rc < 0)
        return ds_seterr(DS_EIO, "could not receive an event: %s", zmq_strerror(zmq_errno()));
    size_t plen = (size_t)rc;
    zmq_getsockopt(s->sock, ZMQ_RCVMORE, &more, &ml);
    if (more) {
        /* drain unexpected frames */
        char junk[64];
        while (more && zmq_recv(s->sock, junk, sizeof junk, 0) >= 0)
            zmq_getsockopt(s->sock, ZMQ_RCVMORE, &more, &ml);
        return ds_seterr(DS_EFORMAT, "event message has more than two frames");
    }
    count_received(s, topic, tlen);
    if (tlen >= sizeof topic - 1)
        return ds_seterr(DS_EFORMAT, "event topic is too long");
    if (plen > DS_WIRE_MSG_MAX)
        return ds_seterr(DS_EFORMAT, "event payload is larger than %d bytes", DS_WIRE_MSG_MAX);
    topic[tlen] = 0;
    struct ds_event ev;
    int r = ds_wire_decode(payload, plen, &ev);
    if (r < 0)
        return ds_prefixerr(r, "event on topic '%.*s'", (int)(tlen > 80 ? 80 : tlen), topic);
    *out = ev;
    return 1;
}

/* The event that tells the caller to read the rows again: a sub event with an empty topic. */
static void read_again_event(struct ds_event *ev)
{
    *ev = (struct ds_event){ .type = DS_EVENT_SUB, .ts = ds_wire_now() };
}

/* Mark acks and check counts. Returns ACK_NONE when ev is no ack, ACK_KEPT for one consumed here, and
 * ACK_AGAIN, with ev made the caller's "read again" event, when events may have been missed: the
 * subscriber's own topic answered again (the publisher saw its subscriptions again, because it
 * restarted or the connection was made anew), or a topic's count moved by other than the messages received
 * under it since its last ack or checkpoint (the publisher dropped some: this subscriber was past its
 * high-water mark). A count is compared only with the last one of the same "pub" (publisher instance and
 * the topic's entry there). A checkpoint never acknowledges a subscription: it may arrive before the
 * publisher has applied it. */
enum { ACK_NONE, ACK_KEPT, ACK_AGAIN };
static int take_ack(struct ds_events_sub *s, struct ds_event *ev)
{
    if (ev->type != DS_EVENT_SUB)
        return ACK_NONE;
    if (s->self[0] && strcmp(ev->topic, s->self) == 0) {
        if (!s->self_acked) {
            s->self_acked = true;
            return ACK_KEPT;
        }
        read_again_event(ev);
        return ACK_AGAIN;
    }
    bool lost = false;
    for (size_t i = 0; i < s->n_topics; i++) {
        struct sub_topic *t = &s->topics[i];
        if (strcmp(t->topic, ev->topic) != 0)
            continue;
        if ((ev->has & DS_EV_CHECKPOINT) && !t->acked)
            continue;
        bool compare = t->acked && t->counted && (ev->has & DS_EV_COUNT) && strcmp(t->pub, ev->pub) == 0;
        if (compare && ev->count - t->base != t->seen)
            lost = true;
        t->acked = true;
        t->counted = (ev->has & DS_EV_COUNT) != 0;
        t->base = ev->count;
        t->seen = 0;
        memcpy(t->pub, ev->pub, sizeof t->pub);
    }
    if (!lost)
        return ACK_KEPT;
    read_again_event(ev);
    return ACK_AGAIN;
}

static bool all_acked(const struct ds_events_sub *s)
{
    for (size_t i = 0; i < s->n_topics; i++)
        if (!s->topics[i].acked)
            return false;
    return true;
}

static void enqueue(struct ds_events_sub *s, const struct ds_event *ev)
{
    if (s->q_len == SUB_QUEUE_MAX) {
        s->q_head = (s->q_head + 1) % SUB_QUEUE_MAX;
        s->q_len--;
        s->dropped++;
        s->dropped_unsaid = true;
    }
    s->queue[(s->q_head + s->q_len) % SUB_QUEUE_MAX] = *ev;
    s->q_len++;
}

/* Wait for the socket to become readable. 1 readable, 0 timeout/signal, <0 error. */
static int wait_readable(struct ds_events_sub *s, int64_t deadline_us, int timeout_ms)
{
    long t = -1;
    if (timeout_ms >= 0) {
        int64_t left = deadline_us - (int64_t)ds_now_usec();
        t = left <= 0 ? 0 : (long)((left + 999) / 1000);
    }
    zmq_pollitem_t it = { .socket = s->sock, .events = ZMQ_POLLIN };
    int rc = zmq_poll(&it, 1, t);
    if (rc < 0) {
        if (zmq_errno() == EINTR)
            return 0;
        return ds_seterr(DS_EIO, "could not wait for events: %s", zmq_strerror(zmq_errno()));
    }
    return rc > 0;
}

int ds_events_sub_sync(struct ds_events_sub *s, int timeout_ms)
{
    int64_t deadline = (int64_t)ds_now_usec() + (int64_t)timeout_ms * 1000;
    for (;;) {
        struct ds_event ev;
        int r;
        while ((r = recv_one(s, &ev)) != 0) {
            if (r == -DS_EFORMAT)
                continue;   /* a malformed message does not stop the wait */
            if (r < 0)
                return r;
            if (take_ack(s, &ev) != ACK_KEPT)
                enqueue(s, &ev);
        }
        if (all_acked(s))
            return 1;
        if (timeout_ms >= 0 && (int64_t)ds_now_usec() >= deadline)
            return 0;
        r = wait_readable(s, deadline, timeout_ms);
        if (r < 0)
            return r;
        if (r == 0 && timeout_ms >= 0 && (int64_t)ds_now_usec() >= deadline)
            return 0;
        if (r == 0 && timeout_ms < 0)
            return 0;   /* interrupted by a signal */
    }
}

int ds_events_sub_recv(struct ds_events_sub *s, int timeout_ms, struct ds_event *out)
{
    if (s->q_len > 0) {
        *out = s->queue[s->q_head];
        s->q_head = (s->q_head + 1) % SUB_QUEUE_MAX;
        s->q_len--;
        return 1;
    }
    if (s->dropped_unsaid) {   /* the events kept during sync overflowed: read again, after those kept */
        s->dropped_unsaid = false;
        read_again_event(out);
        return 1;
    }
    int64_t deadline = (int64_t)ds_now_usec() + (int64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000;
    for (;;) {
        struct ds_event ev;
        int r = recv_one(s, &ev);
        if (r < 0)
            return r;
        if (r > 0) {
            if (take_ack(s, &ev) == ACK_KEPT)
                continue;
            *out = ev;
            return 1;
        }
        if (timeout_ms == 0)
            return 0;
        r = wait_readable(s, deadline, timeout_ms);
        if (r <= 0)
            return r;
    }
}
