/* ds-events.h: the ZeroMQ event channel: dsparkd publishes, clients subscribe.
 *
 * Messages are [topic][msgpack] (ds-wire.h). The publisher is an XPUB socket: it
 * sees every subscription and answers each one with an "ack|<topic>" message on
 * the same connection's path, so a client knows when its subscription is live.
 * That closes the slow-joiner gap and makes this pattern exact:
 *   1. ds_events_sub_topic(sub, topic) for the job or batch;
 *   2. ds_events_sub_sync(sub, timeout) -- the subscription is active;
 *   3. read the job row(s) from PostgreSQL (state, version);
 *   4. ds_events_sub_recv() and drop events whose version is at or below the
 *      version read in 3;
 *   5. on a DS_EVENT_SUB event (events may have been lost: the publisher
 *      restarted and answered the subscription again, or this subscriber fell
 *      behind its high-water mark and it dropped messages), read the rows
 *      again as in 3.
 * Losses are found by count: the publisher counts the messages it publishes
 * under each subscribed topic, sends the count with each ack and in checkpoints
 * (ds_events_pub_checkpoint(), with every heartbeat in dsparkd), and the
 * subscriber compares the count's growth with what it received meanwhile. A
 * checkpoint that finds the subscriber's queue still full is dropped too: the
 * subscriber learns at the first one that reaches it.
 * Events are hints that follow commits; the database is the truth. A subscriber
 * that connects late reads the final state from the row in step 3.
 *
 * Endpoints: "ipc:///run/dspark/events.sock" (default), "tcp://127.0.0.1:PORT",
 * "inproc://..." (tests). A tcp endpoint on any other address is refused unless
 * CURVE is configured: the secret key file holds the server's Z85 secret key
 * (the "secret-key" line of `dsparkd --curve-keypair`, or a bare key), the
 * allow file one Z85 client public key per line ('#' comments); clients not on
 * the list are refused at the handshake (ZAP).
 *
 * Not thread-safe: one thread per publisher or subscriber. */
#ifndef DS_EVENTS_H
#define DS_EVENTS_H

#include <stdbool.h>
#include <stddef.h>

#include "dspark/ds-err.h"
#include "dspark/ds-wire.h"

#define DS_EVENTS_DEFAULT_ENDPOINT "ipc:///run/dspark/events.sock"
#define DS_EVENTS_KEY_Z85_LEN 40

struct ds_events_pub;
struct ds_events_sub;

struct ds_events_pub_opts {
    const char *endpoint;               /* NULL: DS_EVENTS_DEFAULT_ENDPOINT */
    int ipc_mode;                       /* permissions of an ipc socket file; 0: leave as created */
    int sndhwm;                         /* queued messages per subscriber (past it the subscriber loses
                                           messages, and learns it from a later checkpoint); 0: 100000 */
    const char *curve_secret_key_file;  /* NULL or "": no CURVE */
    const char *curve_allow_file;       /* required with CURVE */
};

/* Bind a publisher. Errors: -DS_ECONFIG (bad or remote endpoint without CURVE,
 * unreadable key files), -DS_EIO (bind failed), -DS_ENOTSUP (no CURVE in libzmq). */
int ds_events_pub_open(const struct ds_events_pub_opts *o, struct ds_events_pub **ret) DS_MUSTCHECK;
/* Publish one event under its topic; never blocks (a subscriber over its
 * high-water mark loses the message). */
int ds_events_publish(struct ds_events_pub *p, const struct ds_event *ev) DS_MUSTCHECK;
/* Answer pending subscriptions (acks) and CURVE authentication requests. Call it
 * whenever a descriptor from ds_events_pub_fds() is readable and once per loop
 * turn before sleeping (ZeroMQ descriptors are edge-triggered). Returns the
 * number of subscriptions answered, or a negative DS_E* code. */
int ds_events_pub_process(struct ds_events_pub *p);
/* Publish the counts of the topics whose count changed since their last checkpoint, or
 * of every counted topic with all ("sub" maps on "cp|<length>|<topic>"), so that a
 * subscriber that lost messages under a topic learns it. Call it periodically, now and
 * then with all, in case a checkpoint was lost (dsparkd: with each heartbeat, every 16th
 * with all). Returns the number published, or a negative DS_E* code. */
int ds_events_pub_checkpoint(struct ds_events_pub *p, bool all);
/* Topics subscribed now and counted (at most 65,536, the first ones subscribed; a
 * subscriber's own topic is not). */
size_t ds_events_pub_topics(const struct ds_events_pub *p);
/* Descriptors to poll for POLLIN (at most 2); returns how many were written. */
int ds_events_pub_fds(struct ds_events_pub *p, int *fds, int max);
/* Replace the CURVE allow-list from its file (SIGHUP). */
int ds_events_pub_reload_allow(struct ds_events_pub *p, const char *allow_file) DS_MUSTCHECK;
/* The endpoint actually bound (tcp port 0 resolved), borrowed. */
const char *ds_events_pub_endpoint(const struct ds_events_pub *p);
struct ds_events_pub *ds_events_pub_close(struct ds_events_pub *p);

struct ds_events_sub_opts {
    const char *endpoint;               /* NULL: DS_EVENTS_DEFAULT_ENDPOINT */
    const char *curve_server_key;       /* Z85 public key of the server; NULL: no CURVE */
    const char *curve_public_key;       /* the client's Z85 key pair (on the server's allow-list) */
    const char *curve_secret_key;
};

/* Connect a subscriber (no topic yet). Connecting succeeds even when nothing
 * listens yet; ds_events_sub_sync() tells whether a publisher answers. */
int ds_events_sub_open(const char *endpoint, struct ds_events_sub **ret) DS_MUSTCHECK;
int ds_events_sub_open_opts(const struct ds_events_sub_opts *o, struct ds_events_sub **ret) DS_MUSTCHECK;
/* Subscribe to a topic prefix (DS_WIRE_TOPIC_ALL_JOBS, ds_wire_topic_job() ...). */
int ds_events_sub_topic(struct ds_events_sub *s, const char *topic) DS_MUSTCHECK;
/* Wait until the publisher has acknowledged every topic subscribed so far.
 * Returns 1 when all are live, 0 on timeout (or a signal), negative on error.
 * Events that arrive meanwhile are kept for ds_events_sub_recv(). */
int ds_events_sub_sync(struct ds_events_sub *s, int timeout_ms);
/* Receive the next event (timeout_ms < 0: wait forever; 0: poll). Returns 1 with
 * *out filled, 0 on timeout or when a signal interrupted the wait, -DS_EFORMAT
 * for a malformed message (skipped; call again), other negative codes on error.
 * Subscription acks and checkpoints are consumed here, but a DS_EVENT_SUB event
 * with an empty topic is handed out when events may have been missed: the
 * publisher saw this subscriber's subscriptions again (it restarted, or the
 * connection was made anew), a topic's count says that messages under it were
 * dropped (this subscriber fell behind the publisher's high-water mark), or the
 * events kept during ds_events_sub_sync() overflowed. Read the rows again.
 * Subscribing to a topic that is subscribed already does nothing. */
int ds_events_sub_recv(struct ds_events_sub *s, int timeout_ms, struct ds_event *out);
/* A descriptor that becomes readable when messages may be waiting (edge-triggered:
 * drain with ds_events_sub_recv(s, 0, ...) until it returns 0). */
int ds_events_sub_fd(struct ds_events_sub *s);
/* Events dropped because the internal queue overflowed during sync. */
size_t ds_events_sub_dropped(const struct ds_events_sub *s);
struct ds_events_sub *ds_events_sub_close(struct ds_events_sub *s);

/* Read a Z85 key (40 characters) from a file. Lines are blank, '#' comments,
 * bare keys, or `name = "key"` as `dsparkd --curve-keypair` prints them. With
 * name (e.g. "secret-key") the line of that name is taken, or else the file's
 * only bare key; with NULL the first key. */
int ds_events_read_key_file(const char *path, const char *name,
                            char z85[DS_EVENTS_KEY_Z85_LEN + 1]) DS_MUSTCHECK;
/* Make a new CURVE key pair (Z85). */
int ds_events_curve_keypair(char pub[DS_EVENTS_KEY_Z85_LEN + 1], char sec[DS_EVENTS_KEY_Z85_LEN + 1]) DS_MUSTCHECK;
/* Is this endpoint reachable only from this host (ipc, inproc, tcp loopback)? */
bool ds_events_endpoint_is_local(const char *endpoint);

#endif
