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

/* Subscribe to dsparkd's ZeroMQ events at endpoint: the topic of one batch
 * (batch_id > 0) or every job, and wait up to sync_ms for the publisher to
 * acknowledge the subscription. -DS_EIO when no publisher answers in time
 * (the caller then falls back to LISTEN); the hints carry the job ids. */
int ctl_events_zmq(const char *endpoint, int64_t batch_id, int sync_ms, struct ctl_events **ret);
/* LISTEN on DS_DB_EVENTS_CHANNEL over db (borrowed; must stay open). */
int ctl_events_listen(struct ds_db *db, struct ctl_events **ret);
/* Sleep only: every wait is a timeout. */
struct ctl_events *ctl_events_poll(void);
/* Free a source (NULL allowed); returns NULL. */
struct ctl_events *ctl_events_free(struct ctl_events *ev);

#endif
