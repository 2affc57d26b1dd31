/* test-events.c: the ZeroMQ event channel over real sockets (ipc in a temporary
 * directory, tcp on loopback): subscription acks, prefix topics per job, batch
 * and all, a publisher that restarts (its new acks reach the caller), heartbeats,
 * losses past the high-water mark found by the topics' counts,
 * malformed messages, the refusal of remote binds without
 * CURVE, and CURVE with an allow-list (allowed and refused clients). */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <zmq.h>

#include "testutil.h"
#include "dspark/ds-events.h"
#include "dspark/ds-notify.h"

static char *tmpdir;

static int setup(void **state)
{
    (void)state;
    tmpdir = ds_test_tmpdir();
    return tmpdir ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    ds_test_rmtree(tmpdir);
    free(tmpdir);
    tmpdir = NULL;
    return 0;
}

static void ipc_endpoint(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "ipc://%s/%s", tmpdir, name);
}

/* Drive the publisher until the subscriber's topics are acknowledged. */
static int sync_with(struct ds_events_pub *p, struct ds_events_sub *s, int max_ms)
{
    uint64_t end = ds_now_usec() + (uint64_t)max_ms * 1000;
    while (ds_now_usec() < end) {
        int r = ds_events_pub_process(p);
        if (r < 0)
            return r;
        r = ds_events_sub_sync(s, 10);
        if (r != 0)
            return r;
    }
    return 0;
}

static void job(struct ds_event *ev, int64_t batch, int64_t id, const char *state, int64_t version)
{
    ds_event_job_init(ev, id, state, version, 1);
    if (batch > 0)
        ds_event_set_batch(ev, batch);
}

static void test_job_topic(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "events.sock");
    struct ds_events_pub_opts po = { .endpoint = ep, .ipc_mode = 0666 };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    struct stat st;
    assert_int_equal(stat(ep + 6, &st), 0);
    assert_true(S_ISSOCK(st.st_mode));
    assert_int_equal(st.st_mode & 0777, 0666);

    /* a second publisher must not take the endpoint of a running one */
    struct ds_events_pub *p2 = NULL;
    assert_int_equal(ds_events_pub_open(&po, &p2), -DS_EIO);
    assert_non_null(strstr(ds_errdetail(), "in use by another process"));
    assert_null(p2);

    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    char t[64];
    assert_int_equal(ds_wire_topic_job(t, sizeof t, 7, 12), 0);
    assert_int_equal(ds_events_sub_topic(s, t), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);

    /* job 12 of batch 7, three versions; job 123 of batch 7 and job 12 without
     * a batch must not reach a subscriber of "job|7|12|" */
    struct ds_event ev;
    const char *states[] = { "queued", "running", "succeeded" };
    for (int v = 1; v <= 3; v++) {
        job(&ev, 7, 123, states[v - 1], v);
        assert_int_equal(ds_events_publish(p, &ev), 0);
        job(&ev, 0, 12, states[v - 1], v);
        assert_int_equal(ds_events_publish(p, &ev), 0);
        job(&ev, 7, 12, states[v - 1], v);
        if (v == 3) {
            ds_event_set_finish_reason(&ev, "stop");
            ev.output_tokens = 9;
            ev.has |= DS_EV_OUTPUT_TOKENS;
        }
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    struct ds_event got;
    for (int v = 1; v <= 3; v++) {
        assert_int_equal(ds_events_sub_recv(s, 2000, &got), 1);
        assert_int_equal(got.type, DS_EVENT_JOB);
        assert_int_equal(got.id, 12);
        assert_int_equal(got.batch_id, 7);
        assert_int_equal(got.version, v);
        assert_string_equal(got.state, states[v - 1]);
    }
    assert_string_equal(got.finish_reason, "stop");
    assert_int_equal(got.output_tokens, 9);
    assert_int_equal(ds_events_sub_recv(s, 200, &got), 0);   /* nothing else */
    ds_events_sub_close(s);
    ds_events_pub_close(p);
    /* the socket file goes away with the publisher */
    assert_int_not_equal(stat(ep + 6, &st), 0);
    /* a stale socket file (a crashed publisher) does not block a new one */
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    assert_true(strlen(ep + 6) < sizeof sa.sun_path);
    memcpy(sa.sun_path, ep + 6, strlen(ep + 6) + 1);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    close(fd);
    assert_int_equal(stat(ep + 6, &st), 0);
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    ds_events_pub_close(p);
}

/* A publisher that restarts on the same endpoint: ZeroMQ connects the subscriber again and sends its
 * subscriptions again; the new publisher's ack of the subscriber's own topic reaches the caller as a
 * DS_EVENT_SUB event (events may have been missed), and events flow again. No ack reaches the caller
 * before: not the first ones, not another subscriber's of the same topic, not a topic subscribed twice. */
static void test_publisher_restart(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "restart.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    char t[64];
    assert_int_equal(ds_wire_topic_batch(t, sizeof t, 5), 0);
    assert_int_equal(ds_events_sub_topic(s, t), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    assert_int_equal(ds_events_sub_topic(s, t), 0);   /* again: nothing new to answer */
    struct ds_events_sub *other;
    assert_int_equal(ds_events_sub_open(ep, &other), 0);
    assert_int_equal(ds_events_sub_topic(other, t), 0);
    assert_int_equal(sync_with(p, other, 5000), 1);
    ds_events_sub_close(other);
    struct ds_event got;
    for (int i = 0; i < 20; i++) {
        assert_true(ds_events_pub_process(p) >= 0);
        assert_int_equal(ds_events_sub_recv(s, 10, &got), 0);   /* no ack is handed out */
    }
    ds_events_pub_close(p);

    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    int r = 0;
    uint64_t end = ds_now_usec() + 10000000u;
    while (r == 0 && ds_now_usec() < end) {
        assert_true(ds_events_pub_process(p) >= 0);
        r = ds_events_sub_recv(s, 20, &got);
    }
    assert_int_equal(r, 1);
    assert_int_equal(got.type, DS_EVENT_SUB);
    assert_string_equal(got.topic, "");
    struct ds_event ev;
    job(&ev, 5, 77, "succeeded", 4);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    assert_int_equal(ds_events_sub_recv(s, 2000, &got), 1);
    assert_int_equal(got.type, DS_EVENT_JOB);
    assert_int_equal(got.id, 77);
    ds_events_sub_close(s);
    ds_events_pub_close(p);
}

static void test_prefixes(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "prefix.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    struct ds_events_sub *all, *batch, *hb, *nobatch;
    char t[64];
    assert_int_equal(ds_events_sub_open(ep, &all), 0);
    assert_int_equal(ds_events_sub_topic(all, DS_WIRE_TOPIC_ALL_JOBS), 0);
    assert_int_equal(ds_events_sub_open(ep, &batch), 0);
    assert_int_equal(ds_wire_topic_batch(t, sizeof t, 7), 0);
    assert_int_equal(ds_events_sub_topic(batch, t), 0);
    assert_int_equal(ds_events_sub_open(ep, &nobatch), 0);
    assert_int_equal(ds_wire_topic_batch(t, sizeof t, 0), 0);
    assert_int_equal(ds_events_sub_topic(nobatch, t), 0);
    assert_int_equal(ds_events_sub_open(ep, &hb), 0);
    assert_int_equal(ds_events_sub_topic(hb, DS_WIRE_TOPIC_HEARTBEAT), 0);
    assert_int_equal(sync_with(p, all, 5000), 1);
    assert_int_equal(sync_with(p, batch, 5000), 1);
    assert_int_equal(sync_with(p, nobatch, 5000), 1);
    assert_int_equal(sync_with(p, hb, 5000), 1);

    struct ds_event ev;
    job(&ev, 7, 1, "queued", 1);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    job(&ev, 70, 2, "queued", 1);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    job(&ev, 0, 3, "queued", 1);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    struct ds_event h = { .type = DS_EVENT_HB, .ts = ds_wire_now(), .queued = 5, .running = 2, .workers = 1 };
    strcpy(h.host, "here");
    assert_int_equal(ds_events_publish(p, &h), 0);
    /* acks of later subscribers never show up as events for earlier ones */
    struct ds_events_sub *late;
    assert_int_equal(ds_events_sub_open(ep, &late), 0);
    assert_int_equal(ds_events_sub_topic(late, DS_WIRE_TOPIC_ALL_JOBS), 0);
    assert_int_equal(sync_with(p, late, 5000), 1);

    struct ds_event got;
    int64_t ids[3];
    for (int i = 0; i < 3; i++) {
        assert_int_equal(ds_events_sub_recv(all, 2000, &got), 1);
        assert_int_equal(got.type, DS_EVENT_JOB);
        ids[i] = got.id;
    }
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[1], 2);
    assert_int_equal(ids[2], 3);
    assert_int_equal(ds_events_sub_recv(all, 100, &got), 0);
    assert_int_equal(ds_events_sub_recv(batch, 2000, &got), 1);
    assert_int_equal(got.id, 1);
    assert_int_equal(ds_events_sub_recv(batch, 100, &got), 0);   /* batch 70 is not batch 7 */
    assert_int_equal(ds_events_sub_recv(nobatch, 2000, &got), 1);
    assert_int_equal(got.id, 3);
    assert_int_equal(ds_events_sub_recv(nobatch, 100, &got), 0);
    assert_int_equal(ds_events_sub_recv(hb, 2000, &got), 1);
    assert_int_equal(got.type, DS_EVENT_HB);
    assert_int_equal(got.queued, 5);
    assert_string_equal(got.host, "here");
    assert_int_equal(ds_events_sub_recv(hb, 100, &got), 0);
    assert_int_equal(ds_events_sub_recv(late, 100, &got), 0);   /* joined after: sees nothing old */
    ds_events_sub_close(late);
    ds_events_sub_close(all);
    ds_events_sub_close(batch);
    ds_events_sub_close(nobatch);
    ds_events_sub_close(hb);
    ds_events_pub_close(p);
}

/* Events that arrive while sync waits are kept, not lost. */
static void test_sync_keeps_events(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "keep.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    struct ds_events_sub *s;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "job|"), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    /* a second topic: its ack is still pending while job events flow */
    assert_int_equal(ds_events_sub_topic(s, "hb|"), 0);
    struct ds_event ev;
    for (int i = 1; i <= 5; i++) {
        job(&ev, 0, i, "queued", 1);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    assert_int_equal(sync_with(p, s, 5000), 1);
    struct ds_event got;
    for (int i = 1; i <= 5; i++) {
        assert_int_equal(ds_events_sub_recv(s, 1000, &got), 1);
        assert_int_equal(got.id, i);
    }
    assert_int_equal(ds_events_sub_dropped(s), 0);
    ds_events_sub_close(s);
    ds_events_pub_close(p);
}

/* More events during sync than the subscriber keeps: the oldest go, and after the kept ones the caller is
 * told to read again. */
static void test_sync_overflow(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "overflow.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    struct ds_events_sub *s;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "job|"), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    assert_int_equal(ds_events_sub_topic(s, "hb|"), 0);
    struct ds_event ev, got;
    for (int i = 1; i <= 1100; i++) {
        job(&ev, 0, i, "queued", 1);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    assert_int_equal(sync_with(p, s, 5000), 1);
    size_t dropped = ds_events_sub_dropped(s);
    assert_true(dropped > 0 && dropped < 1100);
    for (int i = (int)dropped + 1; i <= 1100; i++) {
        assert_int_equal(ds_events_sub_recv(s, 1000, &got), 1);
        assert_int_equal(got.type, DS_EVENT_JOB);
        assert_int_equal(got.id, i);
    }
    assert_int_equal(ds_events_sub_recv(s, 1000, &got), 1);
    assert_int_equal(got.type, DS_EVENT_SUB);
    assert_string_equal(got.topic, "");
    assert_int_equal(ds_events_sub_recv(s, 100, &got), 0);   /* told once */
    ds_events_sub_close(s);
    ds_events_pub_close(p);
}

/* Receive until nothing comes within idle_ms, driving the publisher; counts job and read-again events. */
static void drain_idle(struct ds_events_pub *p, struct ds_events_sub *s, int idle_ms, int *jobs, int *again)
{
    struct ds_event got;
    *jobs = *again = 0;
    for (;;) {
        assert_true(ds_events_pub_process(p) >= 0);
        int r = ds_events_sub_recv(s, idle_ms, &got);
        assert_true(r >= 0);
        if (r == 0)
            return;
        if (got.type == DS_EVENT_JOB)
            (*jobs)++;
        else if (got.type == DS_EVENT_SUB && got.topic[0] == 0)
            (*again)++;
    }
}

static void drain(struct ds_events_pub *p, struct ds_events_sub *s, int *jobs, int *again)
{
    drain_idle(p, s, 300, jobs, again);
}

/* A subscriber that falls behind the publisher's high-water mark loses messages, which ZeroMQ does not
 * say; the next checkpoint of the topics' counts does. Counts under nested topics agree, a subscriber of
 * a topic that lost nothing is not told, and once told, counting starts afresh. */
static void test_lost_messages(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "lost.sock");
    struct ds_events_pub_opts po = { .endpoint = ep, .sndhwm = 100 };
    struct ds_events_pub *p;
    struct ds_events_sub *slow, *other;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    assert_int_equal(ds_events_sub_open(ep, &slow), 0);
    assert_int_equal(ds_events_sub_topic(slow, "job|"), 0);
    assert_int_equal(ds_events_sub_topic(slow, "job|5|"), 0);
    assert_int_equal(ds_events_sub_open(ep, &other), 0);
    assert_int_equal(ds_events_sub_topic(other, "job|6|"), 0);
    assert_int_equal(sync_with(p, slow, 5000), 1);
    assert_int_equal(sync_with(p, other, 5000), 1);
    assert_int_equal(ds_events_pub_topics(p), 3);   /* the subscribers' own topics are not counted */

    /* nothing lost: every checkpoint agrees with what arrived */
    struct ds_event ev;
    for (int i = 1; i <= 60; i++) {
        job(&ev, i % 2 ? 5 : 6, i, "queued", 1);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    assert_int_equal(ds_events_pub_checkpoint(p, false), 3);   /* every count changed */
    int jobs, again;
    drain(p, slow, &jobs, &again);
    assert_int_equal(jobs, 60);
    assert_int_equal(again, 0);
    drain(p, other, &jobs, &again);
    assert_int_equal(jobs, 30);
    assert_int_equal(again, 0);

    /* the slow subscriber reads nothing while batch 5 floods it past the mark */
    const int flood = 50000;
    for (int i = 1; i <= flood; i++) {
        job(&ev, 5, 1000 + i, "running", 2);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    drain(p, slow, &jobs, &again);
    printf("# %d of %d events reached the slow subscriber\n", jobs, flood);
    assert_true(jobs > 0 && jobs < flood);
    assert_int_equal(again, 0);   /* nothing says so before the checkpoint */
    assert_int_equal(ds_events_pub_checkpoint(p, false), 2);   /* "job|6|" did not change */
    drain(p, slow, &jobs, &again);
    assert_int_equal(jobs, 0);
    assert_int_equal(again, 2);   /* one for each of its topics that lost messages: "job|" and "job|5|" */
    drain(p, other, &jobs, &again);   /* batch 6 lost nothing */
    assert_int_equal(jobs, 0);
    assert_int_equal(again, 0);

    /* counted afresh from that checkpoint */
    for (int i = 1; i <= 10; i++) {
        job(&ev, i % 2 ? 5 : 6, 100000 + i, "succeeded", 3);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    assert_int_equal(ds_events_pub_checkpoint(p, true), 3);
    drain(p, slow, &jobs, &again);
    assert_int_equal(jobs, 10);
    assert_int_equal(again, 0);
    drain(p, other, &jobs, &again);
    assert_int_equal(jobs, 5);
    assert_int_equal(again, 0);

    /* a subscriber that leaves takes its topic out of the count table */
    ds_events_sub_close(other);
    uint64_t end = ds_now_usec() + 5000000u;
    while (ds_events_pub_topics(p) != 2 && ds_now_usec() < end) {
        assert_true(ds_events_pub_process(p) >= 0);
        usleep(10000);
    }
    assert_int_equal(ds_events_pub_topics(p), 2);
    ds_events_sub_close(slow);
    ds_events_pub_close(p);
}

/* A raw SUB socket on ep with these subscriptions, then "me|<name>|": once its ack has come back, ZeroMQ has
 * applied them all (a connection's subscriptions are applied in order). */
static void *raw_sub(void *ctx, struct ds_events_pub *p, const char *ep, const char *name, const char *const *topics,
                     int n)
{
    void *s = zmq_socket(ctx, ZMQ_SUB);
    int zero = 0;
    assert_non_null(s);
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero);   /* subscriptions past the mark would be dropped */
    assert_int_equal(zmq_connect(s, ep), 0);
    for (int i = 0; i < n; i++)
        assert_int_equal(zmq_setsockopt(s, ZMQ_SUBSCRIBE, topics[i], strlen(topics[i])), 0);
    char self[64], ack[80];
    snprintf(self, sizeof self, "me|%s|", name);
    snprintf(ack, sizeof ack, "ack|%s", self);
    assert_int_equal(zmq_setsockopt(s, ZMQ_SUBSCRIBE, ack, strlen(ack)), 0);
    assert_int_equal(zmq_setsockopt(s, ZMQ_SUBSCRIBE, self, strlen(self)), 0);
    uint64_t end = ds_now_usec() + 5000000u;
    for (;;) {
        assert_true(ds_now_usec() < end);
        assert_true(ds_events_pub_process(p) >= 0);
        char t[DS_WIRE_TOPIC_MAX + 8], payload[DS_WIRE_MSG_MAX];
        int rt = zmq_recv(s, t, sizeof t - 1, ZMQ_DONTWAIT);
        if (rt < 0) {
            usleep(2000);
            continue;
        }
        assert_true(zmq_recv(s, payload, sizeof payload, 0) >= 0);
        t[rt] = 0;
        if (strcmp(t, ack) == 0)
            return s;
    }
}

/* The next checkpoint on a raw socket: its topic and count. */
static void next_checkpoint(void *s, struct ds_event *ev)
{
    for (int k = 0; k < 100000; k++) {
        zmq_pollitem_t it = { .socket = s, .events = ZMQ_POLLIN };
        assert_true(zmq_poll(&it, 1, 2000) == 1);
        char t[DS_WIRE_TOPIC_MAX + 8], payload[DS_WIRE_MSG_MAX];
        int rt = zmq_recv(s, t, sizeof t - 1, 0);
        int rp = zmq_recv(s, payload, sizeof payload, 0);
        assert_true(rt >= 0 && rp >= 0);
        t[rt] = 0;
        if (strncmp(t, "cp|", 3) != 0)
            continue;
        assert_int_equal(ds_wire_decode(payload, (size_t)rp, ev), 0);
        assert_true(ev->type == DS_EVENT_SUB && (ev->has & DS_EV_CHECKPOINT) && (ev->has & DS_EV_COUNT));
        char want[DS_WIRE_TOPIC_MAX + 8];
        assert_int_equal(ds_wire_topic_checkpoint(want, sizeof want, ev->topic), 0);
        assert_string_equal(t, want);   /* published on its own topic */
        return;
    }
    fail_msg("no checkpoint");
}

/* The count table: topics subscribed out of order, nested, empty; a message counts under every subscribed
 * prefix of its topic; topics leave from the middle of the table, and the others' counts go on. Read from
 * the checkpoints of every topic. */
static void test_checkpoint_counts(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "counts.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    void *ctx = zmq_ctx_new();
    const char *cp_all[] = { "cp|" };
    void *reader = raw_sub(ctx, p, ep, "reader", cp_all, 1);
    enum { NT = 8 };
    const char *topics[NT] = { "job|1|", "job|", "job|10|", "", "j", "job|1|5|", "hb|", "job|2|" };
    void *subs[NT];
    char name[16];
    for (int i = 0; i < NT; i++) {
        snprintf(name, sizeof name, "s%d", i);
        subs[i] = raw_sub(ctx, p, ep, name, &topics[i], 1);
    }
    assert_int_equal(ds_events_pub_topics(p), NT);   /* "cp|" and the "me|" topics are not counted */
    int64_t expect[NT] = { 0 };
    bool gone[NT] = { false };
    for (int phase = 0; phase < 2; phase++) {
        struct ds_event ev;
        int64_t jobs[][2] = { { 1, 5 }, { 1, 50 }, { 10, 3 }, { 2, 1 }, { 0, 7 }, { 100, 1 } };
        for (size_t i = 0; i < sizeof jobs / sizeof jobs[0]; i++) {
            job(&ev, jobs[i][0], jobs[i][1], "queued", 1);
            assert_int_equal(ds_events_publish(p, &ev), 0);
        }
        struct ds_event h = { .type = DS_EVENT_HB, .ts = ds_wire_now() };
        strcpy(h.host, "here");
        assert_int_equal(ds_events_publish(p, &h), 0);
        /* the expected counts, by prefix over the same topics */
        for (int k = 0; k < NT; k++) {
            char t[64];
            for (size_t i = 0; i < sizeof jobs / sizeof jobs[0]; i++) {
                assert_int_equal(ds_wire_topic_job(t, sizeof t, jobs[i][0], jobs[i][1]), 0);
                expect[k] += strncmp(t, topics[k], strlen(topics[k])) == 0;
            }
            expect[k] += strncmp("hb|", topics[k], strlen(topics[k])) == 0;
        }
        int live = 0;
        for (int k = 0; k < NT; k++)
            live += !gone[k];
        assert_int_equal(ds_events_pub_checkpoint(p, true), live);
        for (int n = 0; n < live; n++) {
            next_checkpoint(reader, &ev);
            int k = 0;
            while (k < NT && (gone[k] || strcmp(topics[k], ev.topic) != 0))
                k++;
            assert_true(k < NT);
            if (ev.count != expect[k])
                printf("# phase %d, topic '%s': count %" PRId64 ", expected %" PRId64 "\n", phase, topics[k],
                       ev.count, expect[k]);
            assert_int_equal(ev.count, expect[k]);
        }
        /* nothing changed since: a checkpoint of the changed topics sends nothing */
        assert_int_equal(ds_events_pub_checkpoint(p, false), 0);
        if (phase == 0) {   /* "job|" and "j" leave: entries from the middle of the table */
            for (int k = 1; k <= 4; k += 3) {
                zmq_close(subs[k]);
                subs[k] = NULL;
                gone[k] = true;
            }
            uint64_t end = ds_now_usec() + 5000000u;
            while (ds_events_pub_topics(p) != NT - 2 && ds_now_usec() < end) {
                assert_true(ds_events_pub_process(p) >= 0);
                usleep(2000);
            }
            assert_int_equal(ds_events_pub_topics(p), NT - 2);
        }
    }
    for (int k = 0; k < NT; k++)
        if (subs[k])
            zmq_close(subs[k]);
    zmq_close(reader);
    zmq_ctx_term(ctx);
    ds_events_pub_close(p);
}

/* The checkpoints of other topics never reach a subscriber of a shorter one ("job|" is a prefix of
 * "job|00001|", but "cp|4|job|" is not a prefix of "cp|10|job|00001|"), so a subscriber of "job|" that keeps
 * up is not pushed past its high-water mark by 5,000 batches' checkpoints. */
static void test_checkpoints_stay_apart(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "apart.sock");
    struct ds_events_pub_opts po = { .endpoint = ep, .sndhwm = 100 };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "job|"), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    enum { NB = 5000 };
    char (*batch)[24] = calloc(NB, sizeof *batch);
    const char **bt = calloc(NB, sizeof *bt);
    for (int i = 0; i < NB; i++) {
        snprintf(batch[i], sizeof batch[i], "job|%05d|", i + 1);   /* in byte order: appended to the table */
        bt[i] = batch[i];
    }
    void *ctx = zmq_ctx_new();
    void *many = raw_sub(ctx, p, ep, "many", bt, NB);
    assert_int_equal(ds_events_pub_topics(p), NB + 1);
    int jobs, again;
    drain(p, s, &jobs, &again);   /* the acks of the batches' subscriptions: "ack|job|" is a prefix of theirs */
    assert_int_equal(again, 0);
    struct ds_event ev;
    for (int i = 0; i < NB; i += 50) {   /* every batch's count changes; the subscriber keeps up */
        for (int k = i; k < i + 50; k++) {
            job(&ev, k + 1, 1, "queued", 1);
            assert_int_equal(ds_events_publish(p, &ev), 0);
        }
        drain_idle(p, s, 30, &jobs, &again);
        assert_int_equal(jobs, 50);
        assert_int_equal(again, 0);
    }
    assert_int_equal(ds_events_pub_checkpoint(p, false), NB + 1);
    for (int k = 1; k <= 50; k++) {
        job(&ev, 77, k, "running", 2);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    assert_int_equal(ds_events_pub_checkpoint(p, false), 1);   /* "job|" alone changed (batch 77 is not counted) */
    drain(p, s, &jobs, &again);
    assert_int_equal(jobs, 50);
    assert_int_equal(again, 0);
    zmq_close(many);
    zmq_ctx_term(ctx);
    free(bt);
    free(batch);
    ds_events_sub_close(s);
    ds_events_pub_close(p);
}

/* A topic's last subscriber leaves and a new one subscribes while a checkpoint of the old entry is on its
 * way: the new subscriber takes no checkpoint for its ack, and the renewed entry's count (from 0, another
 * generation) is not compared with the old one's. Nothing was lost, and nothing says so. */
static void test_entry_renewed(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "renew.sock");
    struct ds_events_pub_opts po = { .endpoint = ep };
    struct ds_events_pub *p;
    struct ds_events_sub *a, *b;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    assert_int_equal(ds_events_sub_open(ep, &a), 0);
    assert_int_equal(ds_events_sub_topic(a, "job|"), 0);
    assert_int_equal(sync_with(p, a, 5000), 1);
    struct ds_event ev;
    for (int i = 1; i <= 5; i++) {
        job(&ev, 1, i, "queued", 1);
        assert_int_equal(ds_events_publish(p, &ev), 0);
    }
    ds_events_sub_close(a);
    usleep(100000);
    struct ds_event h = { .type = DS_EVENT_HB, .ts = ds_wire_now() };
    strcpy(h.host, "here");
    assert_int_equal(ds_events_publish(p, &h), 0);   /* libzmq takes A's leave; the app has not read it */
    assert_int_equal(ds_events_sub_open(ep, &b), 0);
    assert_int_equal(ds_events_sub_topic(b, "job|"), 0);
    usleep(200000);
    assert_int_equal(ds_events_pub_checkpoint(p, true), 1);   /* the old entry, count 5 */
    job(&ev, 1, 6, "queued", 1);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    assert_int_equal(sync_with(p, b, 5000), 1);
    assert_int_equal(ds_events_pub_checkpoint(p, true), 1);   /* the renewed entry */
    int jobs, again;
    drain(p, b, &jobs, &again);
    assert_int_equal(again, 0);
    job(&ev, 1, 7, "queued", 1);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    assert_int_equal(ds_events_pub_checkpoint(p, false), 1);
    drain(p, b, &jobs, &again);
    assert_int_equal(jobs, 1);
    assert_int_equal(again, 0);
    ds_events_sub_close(b);
    ds_events_pub_close(p);
}

static void test_no_publisher(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "nobody.sock");
    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "job|"), 0);
    uint64_t t0 = ds_now_usec();
    assert_int_equal(ds_events_sub_sync(s, 150), 0);
    assert_true(ds_now_usec() - t0 >= 140000);
    struct ds_event got;
    assert_int_equal(ds_events_sub_recv(s, 50, &got), 0);
    ds_events_sub_close(s);
}

/* A foreign publisher sends garbage: the subscriber reports it and goes on. */
static void test_malformed(void **state)
{
    (void)state;
    char ep[4200];
    ipc_endpoint(ep, sizeof ep, "raw.sock");
    void *ctx = zmq_ctx_new();
    void *pub = zmq_socket(ctx, ZMQ_PUB);
    assert_int_equal(zmq_bind(pub, ep), 0);
    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(ep, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "job|"), 0);
    struct ds_event ev, got;
    job(&ev, 0, 44, "running", 2);
    char *buf;
    size_t len;
    assert_int_equal(ds_wire_encode(&ev, &buf, &len), 0);
    /* no acks from a plain PUB: repeat until the subscription has landed */
    int r = 0;
    for (int i = 0; i < 200 && r != 1; i++) {
        zmq_send(pub, "job|-|44|", 9, ZMQ_SNDMORE);
        zmq_send(pub, buf, len, 0);
        r = ds_events_sub_recv(s, 20, &got);
    }
    assert_int_equal(r, 1);
    while (ds_events_sub_recv(s, 50, &got) == 1)
        ;
    zmq_send(pub, "job|-|44|", 9, ZMQ_SNDMORE);
    zmq_send(pub, "\xc1junk", 5, 0);
    zmq_send(pub, "job|-|44|", 9, 0);   /* one frame only */
    zmq_send(pub, "job|-|44|", 9, ZMQ_SNDMORE);
    zmq_send(pub, buf, len, 0);
    assert_int_equal(ds_events_sub_recv(s, 2000, &got), -DS_EFORMAT);
    assert_int_equal(ds_events_sub_recv(s, 2000, &got), -DS_EFORMAT);
    assert_non_null(strstr(ds_errdetail(), "no payload"));
    assert_int_equal(ds_events_sub_recv(s, 2000, &got), 1);
    assert_int_equal(got.id, 44);
    free(buf);
    ds_events_sub_close(s);
    zmq_close(pub);
    zmq_ctx_term(ctx);
}

static void test_endpoints(void **state)
{
    (void)state;
    assert_true(ds_events_endpoint_is_local("ipc:///run/dspark/events.sock"));
    assert_true(ds_events_endpoint_is_local("tcp://127.0.0.1:5555"));
    assert_true(ds_events_endpoint_is_local("tcp://localhost:5555"));
    assert_true(ds_events_endpoint_is_local("tcp://[::1]:5555"));
    assert_false(ds_events_endpoint_is_local("tcp://*:5555"));
    assert_false(ds_events_endpoint_is_local("tcp://0.0.0.0:5555"));
    assert_false(ds_events_endpoint_is_local("tcp://10.1.2.3:5555"));
    struct ds_events_pub *p = NULL;
    struct ds_events_pub_opts po = { .endpoint = "tcp://0.0.0.0:0" };
    assert_int_equal(ds_events_pub_open(&po, &p), -DS_ECONFIG);
    assert_non_null(strstr(ds_errdetail(), "without CURVE"));
    assert_null(p);
    po.endpoint = "udp://127.0.0.1:1";
    assert_int_equal(ds_events_pub_open(&po, &p), -DS_ECONFIG);
    /* loopback tcp with an ephemeral port: the bound endpoint names the port */
    po.endpoint = "tcp://127.0.0.1:*";
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    const char *bound = ds_events_pub_endpoint(p);
    assert_true(strncmp(bound, "tcp://127.0.0.1:", 16) == 0);
    assert_true(atoi(bound + 16) > 0);
    struct ds_events_sub *s;
    assert_int_equal(ds_events_sub_open(bound, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "hb|"), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    ds_events_sub_close(s);
    ds_events_pub_close(p);
    /* 'localhost' (a documented loopback endpoint) binds: as 127.0.0.1 (ZeroMQ binds no host names) */
    po.endpoint = "tcp://localhost:*";
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    bound = ds_events_pub_endpoint(p);
    assert_true(strncmp(bound, "tcp://127.0.0.1:", 16) == 0);
    assert_int_equal(ds_events_sub_open(bound, &s), 0);
    assert_int_equal(ds_events_sub_topic(s, "hb|"), 0);
    assert_int_equal(sync_with(p, s, 5000), 1);
    ds_events_sub_close(s);
    ds_events_pub_close(p);
}

static void write_text(const char *path, const char *text)
{
    assert_int_equal(ds_test_write_file(path, text, strlen(text)), 0);
}

static void test_curve(void **state)
{
    (void)state;
    if (!zmq_has("curve")) {
        skip();
        return;
    }
    char spub[41], ssec[41], apub[41], asec[41], bpub[41], bsec[41];
    assert_int_equal(ds_events_curve_keypair(spub, ssec), 0);
    assert_int_equal(ds_events_curve_keypair(apub, asec), 0);
    assert_int_equal(ds_events_curve_keypair(bpub, bsec), 0);
    char keyfile[4200], allowfile[4200], text[512];
    snprintf(keyfile, sizeof keyfile, "%s/server.key", tmpdir);
    snprintf(allowfile, sizeof allowfile, "%s/allow", tmpdir);
    /* the whole output of --curve-keypair: the secret-key line is taken, not the first key */
    snprintf(text, sizeof text, "# server keys\npublic-key = \"%s\"\nsecret-key = \"%s\"\n", spub, ssec);
    write_text(keyfile, text);
    snprintf(text, sizeof text, "# allowed clients\n%s\n\n", apub);
    write_text(allowfile, text);
    char k[41];
    assert_int_equal(ds_events_read_key_file(keyfile, "secret-key", k), 0);
    assert_string_equal(k, ssec);
    assert_int_equal(ds_events_read_key_file(keyfile, "public-key", k), 0);
    assert_string_equal(k, spub);
    assert_int_equal(ds_events_read_key_file(keyfile, NULL, k), 0);
    assert_string_equal(k, spub);
    assert_int_equal(ds_events_read_key_file(allowfile, "secret-key", k), 0);   /* one bare key */
    assert_string_equal(k, apub);
    assert_int_equal(ds_events_read_key_file(keyfile, "other-key", k), -DS_ECONFIG);
    /* a bare key that starts with '#' is a key, not a comment */
    char hashkey[41] = "#";
    memcpy(hashkey + 1, apub + 1, 39);
    uint8_t bin[32];
    if (zmq_z85_decode(bin, hashkey)) {
        char path2[4300];
        snprintf(path2, sizeof path2, "%s/hash.key", tmpdir);
        snprintf(text, sizeof text, "# comment\n%s\n", hashkey);
        write_text(path2, text);
        assert_int_equal(ds_events_read_key_file(path2, NULL, k), 0);
        assert_string_equal(k, hashkey);
    }

    /* a remote bind is fine with CURVE */
    struct ds_events_pub_opts po = { .endpoint = "tcp://0.0.0.0:*", .curve_secret_key_file = keyfile,
                                     .curve_allow_file = allowfile };
    struct ds_events_pub *p;
    assert_int_equal(ds_events_pub_open(&po, &p), 0);
    const char *bound = ds_events_pub_endpoint(p);
    const char *port = strrchr(bound, ':');
    assert_non_null(port);
    char ep[128];
    snprintf(ep, sizeof ep, "tcp://127.0.0.1%s", port);

    struct ds_events_sub_opts ao = { .endpoint = ep, .curve_server_key = spub, .curve_public_key = apub,
                                     .curve_secret_key = asec };
    struct ds_events_sub_opts bo = { .endpoint = ep, .curve_server_key = spub, .curve_public_key = bpub,
                                     .curve_secret_key = bsec };
    struct ds_events_sub_opts plain = { .endpoint = ep };
    struct ds_events_sub *a, *b, *c;
    assert_int_equal(ds_events_sub_open_opts(&ao, &a), 0);
    assert_int_equal(ds_events_sub_open_opts(&bo, &b), 0);
    assert_int_equal(ds_events_sub_open_opts(&plain, &c), 0);
    assert_int_equal(ds_events_sub_topic(a, "job|"), 0);
    assert_int_equal(ds_events_sub_topic(b, "job|"), 0);
    assert_int_equal(ds_events_sub_topic(c, "job|"), 0);
    assert_int_equal(sync_with(p, a, 5000), 1);
    assert_int_equal(sync_with(p, b, 600), 0);   /* not on the allow-list */
    assert_int_equal(sync_with(p, c, 300), 0);   /* no CURVE at all */
    struct ds_event ev, got;
    job(&ev, 3, 99, "cancelled", 4);
    assert_int_equal(ds_events_publish(p, &ev), 0);
    assert_int_equal(ds_events_sub_recv(a, 2000, &got), 1);
    assert_int_equal(got.id, 99);
    assert_int_equal(ds_events_sub_recv(b, 200, &got), 0);
    assert_int_equal(ds_events_sub_recv(c, 100, &got), 0);

    /* SIGHUP-style: allow b, and b gets in on its next handshake attempt */
    snprintf(text, sizeof text, "%s\n%s\n", apub, bpub);
    write_text(allowfile, text);
    assert_int_equal(ds_events_pub_reload_allow(p, allowfile), 0);
    ds_events_sub_close(b);
    assert_int_equal(ds_events_sub_open_opts(&bo, &b), 0);
    assert_int_equal(ds_events_sub_topic(b, "job|"), 0);
    assert_int_equal(sync_with(p, b, 5000), 1);

    /* bad key material is refused with the file and line */
    write_text(allowfile, "not-a-key\n");
    assert_int_equal(ds_events_pub_reload_allow(p, allowfile), -DS_ECONFIG);
    assert_non_null(strstr(ds_errdetail(), "line 1"));
    ds_events_sub_close(a);
    ds_events_sub_close(b);
    ds_events_sub_close(c);
    ds_events_pub_close(p);

    po.curve_allow_file = NULL;
    assert_int_equal(ds_events_pub_open(&po, &p), -DS_ECONFIG);
    assert_non_null(strstr(ds_errdetail(), "curve_allow_file"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_job_topic, setup, teardown),
        cmocka_unit_test_setup_teardown(test_publisher_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_prefixes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_keeps_events, setup, teardown),
        cmocka_unit_test_setup_teardown(test_sync_overflow, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lost_messages, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_counts, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoints_stay_apart, setup, teardown),
        cmocka_unit_test_setup_teardown(test_entry_renewed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_no_publisher, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_endpoints, setup, teardown),
        cmocka_unit_test_setup_teardown(test_curve, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
