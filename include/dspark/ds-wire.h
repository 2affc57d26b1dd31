/* ds-wire.h: the msgpack event format published by dsparkd (format version 1).
 *
 * A ZeroMQ message has two frames: a UTF-8 topic ending in '|', then one msgpack
 * map. Topics (SUB sockets match by prefix):
 *   "job|<batch_id or ->|<job_id>|"   one job's state change
 *   "hb|"                             host heartbeat
 *   "ack|<topic>"                     answer to a subscription to <topic> (see ds-events.h)
 *   "cp|<length>|<topic>"             checkpoint of <topic>'s count (<length>: the topic's
 *                                     length in bytes, so that no checkpoint topic is a
 *                                     prefix of another's)
 *   "me|<token>|"                     a subscriber's own topic, never published on: the ack of
 *                                     it reaches that subscriber alone (ds-events.h)
 * so "job|" is every job, "job|42|" batch 42, "job|-|" jobs without a batch.
 *
 * Maps (keys are strings; readers ignore keys they do not know, so fields can be
 * added without a version change; "v" changes only when a field changes meaning):
 *   job: {"v":1, "type":"job", "id":int, "batch_id":int|nil, "state":str,
 *         "version":int, "attempt":int, "finish_reason":str|nil, "ts":float}
 *        plus, for final states when the statistics exist: "output_tokens":int,
 *        "tokens_per_s":float, "mean_acceptance_length":float
 *   hb:  {"v":1, "type":"hb", "host":str, "ts":float, "queued":int,
 *         "running":int, "workers":int, "counts_ts":float|nil}
 *        counts_ts: when queued and running were read from the database
 *        (the publisher's clock), nil before the first read; while the
 *        database is unreachable it stays behind ts, and the counts are old
 *   sub: {"v":1, "type":"sub", "topic":str, "ts":float}
 *        plus, where the publisher counts the topic: "count":int, the job and
 *        heartbeat messages it has published under the topic (as a prefix)
 *        since the topic was last subscribed with no subscriber before, and
 *        "pub":str, which count that is (the publisher's random instance token
 *        and the topic's generation): counts of one "pub" only can be compared.
 *        On "ack|<topic>" it answers a subscription; on "cp|..." it is a
 *        checkpoint, marked "checkpoint":true, published as the topic's count
 *        changes (ds-events.h). A reader that cannot read "count" or "pub"
 *        ignores both.
 * "ts" is the publisher's wall clock in Unix seconds. Events never carry prompts
 * or outputs. */
#ifndef DS_WIRE_H
#define DS_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-err.h"

#define DS_WIRE_VERSION 1
#define DS_WIRE_TOPIC_MAX 256
#define DS_WIRE_MSG_MAX 4096   /* decoders refuse larger payloads */

enum ds_event_type {
    DS_EVENT_JOB = 1,
    DS_EVENT_HB = 2,
    DS_EVENT_SUB = 3,
};

/* Which optional members of struct ds_event are present. */
enum {
    DS_EV_BATCH = 1u << 0,           /* batch_id (else nil) */
    DS_EV_FINISH_REASON = 1u << 1,   /* finish_reason (else nil) */
    DS_EV_OUTPUT_TOKENS = 1u << 2,
    DS_EV_TOKENS_PER_S = 1u << 3,
    DS_EV_MEAN_ACCEPT = 1u << 4,     /* mean_acceptance_length */
    DS_EV_COUNTS_TS = 1u << 5,       /* hb: counts_ts (else nil) */
    DS_EV_COUNT = 1u << 6,           /* sub: count and pub (else absent) */
    DS_EV_CHECKPOINT = 1u << 7,      /* sub: a checkpoint on "cp|...", not an ack */
};

struct ds_event {
    enum ds_event_type type;
    double ts;                       /* Unix seconds */
    unsigned has;                    /* DS_EV_* */
    /* job */
    int64_t id;
    int64_t batch_id;
    char state[16];                  /* queued, running, succeeded, failed, cancelled */
    int64_t version;
    int attempt;
    char finish_reason[32];
    int64_t output_tokens;
    double tokens_per_s;
    double mean_acceptance_length;
    /* hb */
    char host[256];
    int64_t queued;
    int64_t running;
    int workers;
    double counts_ts;                /* Unix seconds when queued and running were read */
    /* sub */
    char topic[DS_WIRE_TOPIC_MAX];
    int64_t count;                   /* messages published under topic (DS_EV_COUNT) */
    char pub[40];                    /* which count: the publisher's instance and the topic's generation */
};

/* Encode ev into a malloc'ed buffer (*ret_buf, *ret_len; the caller frees).
 * Fails with -DS_EINVAL on strings too long for the format. */
int ds_wire_encode(const struct ds_event *ev, char **ret_buf, size_t *ret_len) DS_MUSTCHECK;
/* Decode one map; -DS_EFORMAT on malformed input (the detail says what),
 * -DS_ENOTSUP on another format version. *ret is written only on success. */
int ds_wire_decode(const void *buf, size_t len, struct ds_event *ret) DS_MUSTCHECK;

/* The topic an event is published under, NUL-terminated into buf. */
int ds_wire_topic(const struct ds_event *ev, char *buf, size_t size) DS_MUSTCHECK;
/* Subscription prefixes: one job (batch_id <= 0: the job has no batch), one batch. */
int ds_wire_topic_job(char *buf, size_t size, int64_t batch_id, int64_t job_id) DS_MUSTCHECK;
int ds_wire_topic_batch(char *buf, size_t size, int64_t batch_id) DS_MUSTCHECK;
/* The topic of a checkpoint of topic's count: "cp|<length>|<topic>". */
int ds_wire_topic_checkpoint(char *buf, size_t size, const char *topic) DS_MUSTCHECK;
#define DS_WIRE_TOPIC_ALL_JOBS "job|"
#define DS_WIRE_TOPIC_HEARTBEAT "hb|"
#define DS_WIRE_TOPIC_ACK "ack|"
#define DS_WIRE_TOPIC_SELF "me|"
#define DS_WIRE_TOPIC_CHECKPOINT "cp|"

/* Helpers for filling events. */
void ds_event_job_init(struct ds_event *ev, int64_t id, const char *state, int64_t version, int attempt);
void ds_event_set_batch(struct ds_event *ev, int64_t batch_id);
void ds_event_set_finish_reason(struct ds_event *ev, const char *reason);
/* The current wall-clock time in Unix seconds (for "ts"). */
double ds_wire_now(void);

#endif
