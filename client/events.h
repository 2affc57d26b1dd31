/* events.h: where dsparkctl wait/watch hear that jobs may have changed.
 *
 * A source blocks until something may have changed or a timeout passes. Hints
 * may carry job ids; the caller re-reads those rows from PostgreSQL, which
 * stays the truth (a missed hint costs only latency: the caller also re-reads
 * everything now and then). Sources, in the order wait/watch try them: a
 * ZeroMQ subscription to dsparkd's events, PostgreSQL LISTEN on the job
 * channel, and plain polling (sleep). A source opens before the first read
 * of the rows, so that no change falls between the read and the hints. */
#ifndef DS_CTL_EVENTS_H
#define DS_CTL_EVENTS_H

#include <stdint.h>

#include "dspark/ds-db.h"
#include "dspark/ds-events.h"

/* Called for each job id a hint names; id -1 means "anything may have changed". */
typedef void ctl_event_fn(void *ud, int64_t id);

struct ctl_events {
    const char *name; /* "listen", "poll", ... */
    /* Wait up to timeout_ms. Returns the number of hints delivered (0 on
     * timeout), or a negative DS_E* code when the source broke (the caller
     * then falls back to polling). */
    int (*wait)(struct ctl_events *ev, int timeout_ms, ctl_event_fn *fn, void *ud);
    void (*free)(struct ctl_events *ev);
};

/* Subscribe to dsparkd's ZeroMQ events at o->endpoint (with CURVE when
 * o->curve_server_key is set): the topic of one batch (batch_id > 0) or every
 * job, and wait up to sync_ms for the publisher to acknowledge the
 * subscription. -DS_EIO when no publisher answers in time (the caller then
 * falls back to LISTEN); a publisher that refuses this client's CURVE key
 * never answers. The hints carry the job ids. */
int ctl_events_zmq(const struct ds_events_sub_opts *o, int64_t batch_id, int sync_ms,
                   struct ctl_events **ret);
/* Read the CURVE keys of wait/watch: the server's public key from server_file
 * (its "public-key" line, or a bare key; a string that names no file but is a
 * Z85 key itself is taken as the key) and the client's key pair from
 * client_file ("public-key" and "secret-key" lines). Fills o's curve fields,
 * which point into keys. -DS_ECONFIG naming the file when one is bad. */
struct ctl_curve_keys {
    char server[DS_EVENTS_KEY_Z85_LEN + 1];
    char pub[DS_EVENTS_KEY_Z85_LEN + 1];
    char sec[DS_EVENTS_KEY_Z85_LEN + 1];
};
int ctl_events_read_keys(const char *server_file, const char *client_file,
                         struct ctl_curve_keys *keys, struct ds_events_sub_opts *o);
/* LISTEN on DS_DB_EVENTS_CHANNEL over db (borrowed; must stay open). */
int ctl_events_listen(struct ds_db *db, struct ctl_events **ret);
/* Sleep only: every wait is a timeout. */
struct ctl_events *ctl_events_poll(void);
/* Free a source (NULL allowed); returns NULL. */
struct ctl_events *ctl_events_free(struct ctl_events *ev);

#endif
