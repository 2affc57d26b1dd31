/* wire.c: msgpack encoding and decoding of dsparkd events (format in ds-wire.h).
 *
 * The encoder writes keys in a fixed order with the smallest msgpack forms; the
 * decoder accepts any key order, skips keys it does not know, and checks every
 * known key's type, so a malformed or hostile message is refused with a reason
 * instead of being half-read. */
#include "config.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <msgpack.h>

#include "dspark/ds-wire.h"

double ds_wire_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void ds_event_job_init(struct ds_event *ev, int64_t id, const char *state, int64_t version, int attempt)
{
    memset(ev, 0, sizeof *ev);
    ev->type = DS_EVENT_JOB;
    ev->id = id;
    snprintf(ev->state, sizeof ev->state, "%s", state ? state : "");
    ev->version = version;
    ev->attempt = attempt;
    ev->ts = ds_wire_now();
}

void ds_event_set_batch(struct ds_event *ev, int64_t batch_id)
{
    ev->batch_id = batch_id;
    ev->has |= DS_EV_BATCH;
}

void ds_event_set_finish_reason(struct ds_event *ev, const char *reason)
{
    if (!reason) {
        ev->has &= ~(unsigned)DS_EV_FINISH_REASON;
        ev->finish_reason[0] = 0;
        return;
    }
    snprintf(ev->finish_reason, sizeof ev->finish_reason, "%s", reason);
    ev->has |= DS_EV_FINISH_REASON;
}

/* ---- topics ---- */

int ds_wire_topic_job(char *buf, size_t size, int64_t batch_id, int64_t job_id)
{
    int n = batch_id > 0 ? snprintf(buf, size, "job|%" PRId64 "|%" PRId64 "|", batch_id, job_id)
                         : snprintf(buf, size, "job|-|%" PRId64 "|", job_id);
    if (n < 0 || (size_t)n >= size)
        return ds_seterr(DS_ELIMIT, "topic buffer too small");
    return 0;
}

int ds_wire_topic_batch(char *buf, size_t size, int64_t batch_id)
{
    int n = batch_id > 0 ? snprintf(buf, size, "job|%" PRId64 "|", batch_id) : snprintf(buf, size, "job|-|");
    if (n < 0 || (size_t)n >= size)
        return ds_seterr(DS_ELIMIT, "topic buffer too small");
    return 0;
}

int ds_wire_topic_checkpoint(char *buf, size_t size, const char *topic)
{
    int n = snprintf(buf, size, "%s%zu|%s", DS_WIRE_TOPIC_CHECKPOINT, strlen(topic), topic);
    if (n < 0 || (size_t)n >= size)
        return ds_seterr(DS_ELIMIT, "topic buffer too small");
    return 0;
}

int ds_wire_topic(const struct ds_event *ev, char *buf, size_t size)
{
    int n;
    switch (ev->type) {
    case DS_EVENT_JOB:
        return ds_wire_topic_job(buf, size, (ev->has & DS_EV_BATCH) ? ev->batch_id : 0, ev->id);
    case DS_EVENT_HB:
        n = snprintf(buf, size, "%s", DS_WIRE_TOPIC_HEARTBEAT);
        break;
    case DS_EVENT_SUB:
        if (ev->has & DS_EV_CHECKPOINT)
            return ds_wire_topic_checkpoint(buf, size, ev->topic);
        n = snprintf(buf, size, "%s%s", DS_WIRE_TOPIC_ACK, ev->topic);
        break;
    default:
        return ds_seterr(DS_EINVAL, "unknown event type %d", (int)ev->type);
    }
    if (n < 0 || (size_t)n >= size)
        return ds_seterr(DS_ELIMIT, "topic buffer too small");
    return 0;
}

/* ---- encoding ---- */

static void pack_cstr(msgpack_packer *pk, const char *s)
{
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

static void pack_key(msgpack_packer *pk, const char *k)
{
    pack_cstr(pk, k);
}

int ds_wire_encode(const struct ds_event *ev, char **ret_buf, size_t *ret_len)
{
    if (ev->type == DS_EVENT_JOB && (!memchr(ev->state, 0, sizeof ev->state) || !ev->state[0]))
        return ds_seterr(DS_EINVAL, "job event without a state");
    if (ev->type == DS_EVENT_JOB && (ev->has & DS_EV_FINISH_REASON) &&
        !memchr(ev->finish_reason, 0, sizeof ev->finish_reason))
        return ds_seterr(DS_EINVAL, "finish reason too long");
    if (ev->type == DS_EVENT_HB && !memchr(ev->host, 0, sizeof ev->host))
        return ds_seterr(DS_EINVAL, "heartbeat host name too long");
    if (ev->type == DS_EVENT_SUB && !memchr(ev->topic, 0, sizeof ev->topic))
        return ds_seterr(DS_EINVAL, "subscription topic too long");
    if (ev->type == DS_EVENT_SUB && (ev->has & DS_EV_COUNT) &&
        (!memchr(ev->pub, 0, sizeof ev->pub) || ev->count < 0))
        return ds_seterr(DS_EINVAL, "subscription count without a valid publisher token");

    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);

    switch (ev->type) {
    case DS_EVENT_JOB: {
        size_t n = 9;
        bool stats[3] = { ev->has & DS_EV_OUTPUT_TOKENS, ev->has & DS_EV_TOKENS_PER_S, ev->has & DS_EV_MEAN_ACCEPT };
        n += stats[0] + stats[1] + stats[2];
        msgpack_pack_map(&pk, n);
        pack_key(&pk, "v");
        msgpack_pack_int(&pk, DS_WIRE_VERSION);
        pack_key(&pk, "type");
        pack_cstr(&pk, "job");
        pack_key(&pk, "id");
        msgpack_pack_int64(&pk, ev->id);
        pack_key(&pk, "batch_id");
        if (ev->has & DS_EV_BATCH)
            msgpack_pack_int64(&pk, ev->batch_id);
        else
            msgpack_pack_nil(&pk);
        pack_key(&pk, "state");
        pack_cstr(&pk, ev->state);
        pack_key(&pk, "version");
        msgpack_pack_int64(&pk, ev->version);
        pack_key(&pk, "attempt");
        msgpack_pack_int(&pk, ev->attempt);
        pack_key(&pk, "finish_reason");
        if (ev->has & DS_EV_FINISH_REASON)
            pack_cstr(&pk, ev->finish_reason);
        else
            msgpack_pack_nil(&pk);
        pack_key(&pk, "ts");
        msgpack_pack_double(&pk, ev->ts);
        if (stats[0]) {
            pack_key(&pk, "output_tokens");
            msgpack_pack_int64(&pk, ev->output_tokens);
        }
        if (stats[1]) {
            pack_key(&pk, "tokens_per_s");
            msgpack_pack_double(&pk, ev->tokens_per_s);
        }
        if (stats[2]) {
            pack_key(&pk, "mean_acceptance_length");
            msgpack_pack_double(&pk, ev->mean_acceptance_length);
        }
        break;
    }
    case DS_EVENT_HB:
        msgpack_pack_map(&pk, 8);
        pack_key(&pk, "v");
        msgpack_pack_int(&pk, DS_WIRE_VERSION);
        pack_key(&pk, "type");
        pack_cstr(&pk, "hb");
        pack_key(&pk, "host");
        pack_cstr(&pk, ev->host);
        pack_key(&pk, "ts");
        msgpack_pack_double(&pk, ev->ts);
        pack_key(&pk, "queued");
        msgpack_pack_int64(&pk, ev->queued);
        pack_key(&pk, "running");
        msgpack_pack_int64(&pk, ev->running);
        pack_key(&pk, "workers");
        msgpack_pack_int(&pk, ev->workers);
        pack_key(&pk, "counts_ts");
        if (ev->has & DS_EV_COUNTS_TS)
            msgpack_pack_double(&pk, ev->counts_ts);
        else
            msgpack_pack_nil(&pk);
        break;
    case DS_EVENT_SUB:
        msgpack_pack_map(&pk, 4 + ((ev->has & DS_EV_COUNT) ? 2 : 0) + ((ev->has & DS_EV_CHECKPOINT) ? 1 : 0));
        pack_key(&pk, "v");
        msgpack_pack_int(&pk, DS_WIRE_VERSION);
        pack_key(&pk, "type");
        pack_cstr(&pk, "sub");
        pack_key(&pk, "topic");
        pack_cstr(&pk, ev->topic);
        pack_key(&pk, "ts");
        msgpack_pack_double(&pk, ev->ts);
        if (ev->has & DS_EV_COUNT) {
            pack_key(&pk, "count");
            msgpack_pack_int64(&pk, ev->count);
            pack_key(&pk, "pub");
            pack_cstr(&pk, ev->pub);
        }
        if (ev->has & DS_EV_CHECKPOINT) {
            pack_key(&pk, "checkpoint");
            msgpack_pack_true(&pk);
        }
        break;
    default:
        msgpack_sbuffer_destroy(&sb);
        return ds_seterr(DS_EINVAL, "unknown event type %d", (int)ev->type);
    }
    /* the sbuffer's storage is malloc'ed: hand it over */
    *ret_len = sb.size;
    *ret_buf = msgpack_sbuffer_release(&sb);
    msgpack_sbuffer_destroy(&sb);
    return 0;
}

/* ---- decoding ---- */

static bool key_is(const msgpack_object_kv *kv, const char *name)
{
    size_t n = strlen(name);
    return kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == n &&
           memcmp(kv->key.via.str.ptr, name, n) == 0;
}

static int get_int(const msgpack_object *o, const char *key, int64_t lo, int64_t hi, int64_t *ret)
{
    int64_t v;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
        if (o->via.u64 > (uint64_t)INT64_MAX)
            return ds_seterr(DS_EFORMAT, "event key '%s': integer out of range", key);
        v = (int64_t)o->via.u64;
    } else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        v = o->via.i64;
    } else {
        return ds_seterr(DS_EFORMAT, "event key '%s': expected an integer", key);
    }
    if (v < lo || v > hi)
        return ds_seterr(DS_EFORMAT, "event key '%s': value %" PRId64 " out of range", key, v);
    *ret = v;
    return 0;
}

static int get_double(const msgpack_object *o, const char *key, double *ret)
{
    if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32)
        *ret = o->via.f64;
    else if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        *ret = (double)o->via.u64;
    else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        *ret = (double)o->via.i64;
    else
        return ds_seterr(DS_EFORMAT, "event key '%s': expected a number", key);
    if (!isfinite(*ret))
        return ds_seterr(DS_EFORMAT, "event key '%s': number is not finite", key);
    return 0;
}

static int get_str(const msgpack_object *o, const char *key, char *buf, size_t size)
{
    if (o->type != MSGPACK_OBJECT_STR)
        return ds_seterr(DS_EFORMAT, "event key '%s': expected a string", key);
    if (o->via.str.size >= size)
        return ds_seterr(DS_EFORMAT, "event key '%s': string longer than %zu bytes", key, size - 1);
    if (memchr(o->via.str.ptr, 0, o->via.str.size))
        return ds_seterr(DS_EFORMAT, "event key '%s': string contains a NUL byte", key);
    memcpy(buf, o->via.str.ptr, o->via.str.size);
    buf[o->via.str.size] = 0;
    return 0;
}

enum {
    SEEN_V = 1u << 0, SEEN_TYPE = 1u << 1, SEEN_TS = 1u << 2, SEEN_ID = 1u << 3,
    SEEN_STATE = 1u << 4, SEEN_VERSION = 1u << 5, SEEN_ATTEMPT = 1u << 6, SEEN_HOST = 1u << 7,
    SEEN_QUEUED = 1u << 8, SEEN_RUNNING = 1u << 9, SEEN_WORKERS = 1u << 10, SEEN_TOPIC = 1u << 11,
    SEEN_COUNT = 1u << 12, SEEN_PUB = 1u << 13, SEEN_BAD_COUNT = 1u << 14,
};

static int decode_map(const msgpack_object *root, struct ds_event *ev)
{
    if (root->type != MSGPACK_OBJECT_MAP)
        return ds_seterr(DS_EFORMAT, "event is not a msgpack map");
    const msgpack_object_map *m = &root->via.map;
    unsigned seen = 0;
    int64_t iv;
    int r;
    char type[8] = "";

    /* the version and type come first in meaning, whatever their position */
    for (uint32_t i = 0; i < m->size; i++) {
        const msgpack_object_kv *kv = &m->ptr[i];
        if (key_is(kv, "v")) {
            if ((r = get_int(&kv->val, "v", INT64_MIN, INT64_MAX, &iv)) < 0)
                return r;
            if (iv != DS_WIRE_VERSION)
                return ds_seterr(DS_ENOTSUP, "event format version %" PRId64 " is not supported (this build reads %d)",
                                 iv, DS_WIRE_VERSION);
            seen |= SEEN_V;
        } else if (key_is(kv, "type")) {
            if ((r = get_str(&kv->val, "type", type, sizeof type)) < 0)
                return r;
            seen |= SEEN_TYPE;
        }
    }
    if (!(seen & SEEN_V))
        return ds_seterr(DS_EFORMAT, "event has no format version 'v'");
    if (!(seen & SEEN_TYPE))
        return ds_seterr(DS_EFORMAT, "event has no 'type'");
    if (strcmp(type, "job") == 0)
        ev->type = DS_EVENT_JOB;
    else if (strcmp(type, "hb") == 0)
        ev->type = DS_EVENT_HB;
    else if (strcmp(type, "sub") == 0)
        ev->type = DS_EVENT_SUB;
    else
        return ds_seterr(DS_EFORMAT, "unknown event type '%s'", type);

    for (uint32_t i = 0; i < m->size; i++) {
        const msgpack_object_kv *kv = &m->ptr[i];
        const msgpack_object *val = &kv->val;
        bool nil = val->type == MSGPACK_OBJECT_NIL;
        if (kv->key.type != MSGPACK_OBJECT_STR)
            return ds_seterr(DS_EFORMAT, "event map has a key that is not a string");
        if (key_is(kv, "ts")) {
            if ((r = get_double(val, "ts", &ev->ts)) < 0)
                return r;
            seen |= SEEN_TS;
        } else if (ev->type == DS_EVENT_JOB) {
            if (key_is(kv, "id")) {
                if ((r = get_int(val, "id", 1, INT64_MAX, &ev->id)) < 0)
                    return r;
                seen |= SEEN_ID;
            } else if (key_is(kv, "batch_id")) {
                if (!nil) {
                    if ((r = get_int(val, "batch_id", 1, INT64_MAX, &ev->batch_id)) < 0)
                        return r;
                    ev->has |= DS_EV_BATCH;
                }
            } else if (key_is(kv, "state")) {
                if ((r = get_str(val, "state", ev->state, sizeof ev->state)) < 0)
                    return r;
                if (!ev->state[0])
                    return ds_seterr(DS_EFORMAT, "event key 'state' is empty");
                seen |= SEEN_STATE;
            } else if (key_is(kv, "version")) {
                if ((r = get_int(val, "version", 0, INT64_MAX, &ev->version)) < 0)
                    return r;
                seen |= SEEN_VERSION;
            } else if (key_is(kv, "attempt")) {
                if ((r = get_int(val, "attempt", 0, INT32_MAX, &iv)) < 0)
                    return r;
                ev->attempt = (int)iv;
                seen |= SEEN_ATTEMPT;
            } else if (key_is(kv, "finish_reason")) {
                if (!nil) {
                    if ((r = get_str(val, "finish_reason", ev->finish_reason, sizeof ev->finish_reason)) < 0)
                        return r;
                    ev->has |= DS_EV_FINISH_REASON;
                }
            } else if (key_is(kv, "output_tokens")) {
                if (!nil) {
                    if ((r = get_int(val, "output_tokens", 0, INT64_MAX, &ev->output_tokens)) < 0)
                        return r;
                    ev->has |= DS_EV_OUTPUT_TOKENS;
                }
            } else if (key_is(kv, "tokens_per_s")) {
                if (!nil) {
                    if ((r = get_double(val, "tokens_per_s", &ev->tokens_per_s)) < 0)
                        return r;
                    ev->has |= DS_EV_TOKENS_PER_S;
                }
            } else if (key_is(kv, "mean_acceptance_length")) {
                if (!nil) {
                    if ((r = get_double(val, "mean_acceptance_length", &ev->mean_acceptance_length)) < 0)
                        return r;
                    ev->has |= DS_EV_MEAN_ACCEPT;
                }
            }
        } else if (ev->type == DS_EVENT_HB) {
            if (key_is(kv, "host")) {
                if ((r = get_str(val, "host", ev->host, sizeof ev->host)) < 0)
                    return r;
                seen |= SEEN_HOST;
            } else if (key_is(kv, "queued")) {
                if ((r = get_int(val, "queued", 0, INT64_MAX, &ev->queued)) < 0)
                    return r;
                seen |= SEEN_QUEUED;
            } else if (key_is(kv, "running")) {
                if ((r = get_int(val, "running", 0, INT64_MAX, &ev->running)) < 0)
                    return r;
                seen |= SEEN_RUNNING;
            } else if (key_is(kv, "workers")) {
                if ((r = get_int(val, "workers", 0, INT32_MAX, &iv)) < 0)
                    return r;
                ev->workers = (int)iv;
                seen |= SEEN_WORKERS;
            } else if (key_is(kv, "counts_ts")) {
                if (!nil) {
                    if ((r = get_double(val, "counts_ts", &ev->counts_ts)) < 0)
                        return r;
                    ev->has |= DS_EV_COUNTS_TS;
                }
            }
        } else if (ev->type == DS_EVENT_SUB) {
            if (key_is(kv, "topic")) {
                if ((r = get_str(val, "topic", ev->topic, sizeof ev->topic)) < 0)
                    return r;
                seen |= SEEN_TOPIC;
            } else if (key_is(kv, "count")) {   /* count and pub: read where they can be, else both ignored */
                if (get_int(val, "count", 0, INT64_MAX, &ev->count) == 0)
                    seen |= SEEN_COUNT;
                else
                    seen |= SEEN_BAD_COUNT;
            } else if (key_is(kv, "pub")) {
                if (get_str(val, "pub", ev->pub, sizeof ev->pub) == 0)
                    seen |= SEEN_PUB;
                else
                    seen |= SEEN_BAD_COUNT;
            } else if (key_is(kv, "checkpoint")) {
                if (val->type == MSGPACK_OBJECT_BOOLEAN && val->via.boolean)
                    ev->has |= DS_EV_CHECKPOINT;
            }
        }
    }

    static const struct { unsigned bit; const char *name; enum ds_event_type type; } required[] = {
        { SEEN_TS, "ts", 0 },
        { SEEN_ID, "id", DS_EVENT_JOB }, { SEEN_STATE, "state", DS_EVENT_JOB },
        { SEEN_VERSION, "version", DS_EVENT_JOB }, { SEEN_ATTEMPT, "attempt", DS_EVENT_JOB },
        { SEEN_HOST, "host", DS_EVENT_HB }, { SEEN_QUEUED, "queued", DS_EVENT_HB },
        { SEEN_RUNNING, "running", DS_EVENT_HB }, { SEEN_WORKERS, "workers", DS_EVENT_HB },
        { SEEN_TOPIC, "topic", DS_EVENT_SUB },
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++)
        if ((required[i].type == 0 || required[i].type == ev->type) && !(seen & required[i].bit))
            return ds_seterr(DS_EFORMAT, "%s event has no '%s'", type, required[i].name);
    /* a count means nothing without the "pub" it belongs to: both, readable, or neither (the map stays an ack) */
    if (ev->type == DS_EVENT_SUB) {
        if ((seen & SEEN_COUNT) && (seen & SEEN_PUB) && !(seen & SEEN_BAD_COUNT))
            ev->has |= DS_EV_COUNT;
        else {
            ev->count = 0;
            ev->pub[0] = 0;
        }
    }
    return 0;
}

/* Walk one msgpack object without building it: the end of the object, or NULL
 * when it is malformed, truncated or nested deeper than 8. msgpack-c allocates
 * a container's elements from its declared count before it reads them, so a
 * 5-byte message could ask for gigabytes; checking every count against the
 * bytes left (each element takes at least one) keeps decoding proportional to
 * the input. */
static const uint8_t *mp_skip(const uint8_t *p, const uint8_t *end, int depth)
{
    if (p >= end || depth > 8)
        return NULL;
    uint8_t b = *p++;
    size_t left = (size_t)(end - p);
    uint64_t n = 0;       /* container elements (maps: 2 per entry) */
    uint64_t skip = 0;    /* payload bytes after the header */
    size_t lenbytes = 0;  /* size of a length field that follows */
    int extra = 0;        /* ext type byte */
    if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3)
        return p;
    if ((b & 0xf0) == 0x80)
        n = 2u * (b & 0x0f);
    else if ((b & 0xf0) == 0x90)
        n = b & 0x0f;
    else if ((b & 0xe0) == 0xa0)
        skip = b & 0x1f;
    else
        switch (b) {
        case 0xc4: case 0xd9: lenbytes = 1; break;
        case 0xc5: case 0xda: lenbytes = 2; break;
        case 0xc6: case 0xdb: lenbytes = 4; break;
        case 0xc7: lenbytes = 1; extra = 1; break;
        case 0xc8: lenbytes = 2; extra = 1; break;
        case 0xc9: lenbytes = 4; extra = 1; break;
        case 0xca: skip = 4; break;
        case 0xcb: skip = 8; break;
        case 0xcc: case 0xd0: skip = 1; break;
        case 0xcd: case 0xd1: skip = 2; break;
        case 0xce: case 0xd2: skip = 4; break;
        case 0xcf: case 0xd3: skip = 8; break;
        case 0xd4: skip = 2; break;
        case 0xd5: skip = 3; break;
        case 0xd6: skip = 5; break;
        case 0xd7: skip = 9; break;
        case 0xd8: skip = 17; break;
        case 0xdc: case 0xde: lenbytes = 2; break;
        case 0xdd: case 0xdf: lenbytes = 4; break;
        default: return NULL;   /* 0xc1 is never used */
        }
    if (lenbytes) {
        if (left < lenbytes)
            return NULL;
        uint64_t v = 0;
        for (size_t i = 0; i < lenbytes; i++)
            v = v << 8 | p[i];
        p += lenbytes;
        left -= lenbytes;
        if (b == 0xdc || b == 0xdd)
            n = v;
        else if (b == 0xde || b == 0xdf)
            n = 2 * v;
        else
            skip = v + (uint64_t)extra;
    }
    if (skip > left)
        return NULL;
    p += skip;
    if (n > (uint64_t)(end - p))
        return NULL;
    for (uint64_t i = 0; i < n; i++)
        if (!(p = mp_skip(p, end, depth + 1)))
            return NULL;
    return p;
}

int ds_wire_decode(const void *buf, size_t len, struct ds_event *ret)
{
    if (len == 0)
        return ds_seterr(DS_EFORMAT, "empty event message");
    if (len > DS_WIRE_MSG_MAX)
        return ds_seterr(DS_EFORMAT, "event message of %zu bytes exceeds the limit of %d", len, DS_WIRE_MSG_MAX);
    const uint8_t *end = mp_skip(buf, (const uint8_t *)buf + len, 0);
    if (!end)
        return ds_seterr(DS_EFORMAT, "event is not valid msgpack");
    if (end != (const uint8_t *)buf + len)
        return ds_seterr(DS_EFORMAT, "event has %zu trailing bytes", (size_t)((const uint8_t *)buf + len - end));
    msgpack_unpacked up;
    size_t off = 0;
    msgpack_unpacked_init(&up);
    msgpack_unpack_return ur = msgpack_unpack_next(&up, buf, len, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS) {
        msgpack_unpacked_destroy(&up);
        return ds_seterr(DS_EFORMAT, "event is not valid msgpack");
    }
    if (off != len) {
        msgpack_unpacked_destroy(&up);
        return ds_seterr(DS_EFORMAT, "event has %zu trailing bytes", len - off);
    }
    struct ds_event ev;
    memset(&ev, 0, sizeof ev);
    int r = decode_map(&up.data, &ev);
    msgpack_unpacked_destroy(&up);
    if (r < 0)
        return r;
    *ret = ev;
    return 0;
}
