/* test-daemon-sub.c: a ZeroMQ subscriber for the dsparkd integration tests.
 *
 *   test-daemon-sub --endpoint EP --topic T [--topic T]... [--count N] [--timeout SEC]
 *          [--pause SEC] [--job ID --dsn CONNINFO] [--server-key Z85 --client-keys FILE]
 *
 * Subscribes, waits for the publisher's acks ("synced" on stdout, exit 2 when
 * none comes), then prints one line per event until --count events arrived
 * (exit 0) or --timeout passed (exit 1); "again" stands for the library's
 * read-again event (a restarted publisher, or events lost). --pause waits that
 * long after the acks before reading anything (a subscriber that falls
 * behind). With --job it follows the documented
 * late-subscriber pattern: after the acks it reads the job's row ("row STATE
 * VERSION"), ignores events at or below that version, and stops at the first
 * final state, printing "final STATE VERSION row|event". With --server-key it
 * connects with CURVE, its key pair read from FILE (as dsparkd --curve-keypair
 * prints it). */
#include "config.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "dspark/ds-events.h"
#include "dspark/ds-notify.h"

static void print_event(const struct ds_event *ev)
{
    if (ev->type == DS_EVENT_SUB) {   /* the library's "read again": a restart, or events lost */
        printf("again\n");
        return;
    }
    if (ev->type == DS_EVENT_HB) {
        printf("hb host=%s queued=%" PRId64 " running=%" PRId64 " workers=%d", ev->host, ev->queued, ev->running,
               ev->workers);
        if (ev->has & DS_EV_COUNTS_TS)
            printf(" counts_age=%.1f\n", ev->ts - ev->counts_ts);
        else
            printf(" counts_age=-\n");
        return;
    }
    printf("job id=%" PRId64, ev->id);
    if (ev->has & DS_EV_BATCH)
        printf(" batch=%" PRId64, ev->batch_id);
    else
        printf(" batch=-");
    printf(" state=%s version=%" PRId64 " attempt=%d finish=%s", ev->state, ev->version, ev->attempt,
           (ev->has & DS_EV_FINISH_REASON) ? ev->finish_reason : "-");
    if (ev->has & DS_EV_OUTPUT_TOKENS)
        printf(" tokens=%" PRId64, ev->output_tokens);
    if (ev->has & DS_EV_TOKENS_PER_S)
        printf(" tps=%.2f", ev->tokens_per_s);
    if (ev->has & DS_EV_MEAN_ACCEPT)
        printf(" tau=%.3f", ev->mean_acceptance_length);
    printf("\n");
}

static bool is_final(const char *state)
{
    return strcmp(state, "succeeded") == 0 || strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        { "endpoint", required_argument, NULL, 'e' }, { "topic", required_argument, NULL, 't' },
        { "count", required_argument, NULL, 'n' },    { "timeout", required_argument, NULL, 'w' },
        { "job", required_argument, NULL, 'j' },      { "dsn", required_argument, NULL, 'd' },
        { "server-key", required_argument, NULL, 's' }, { "client-keys", required_argument, NULL, 'k' },
        { "pause", required_argument, NULL, 'p' },    { NULL, 0, NULL, 0 },
    };
    const char *endpoint = NULL, *dsn = NULL, *topics[16], *server_key = NULL, *client_keys = NULL;
    int ntopics = 0, count = -1;
    double timeout = 10, pause = 0;
    int64_t job = 0;
    int c;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'e': endpoint = optarg; break;
        case 't':
            if (ntopics < 16)
                topics[ntopics++] = optarg;
            break;
        case 'n': count = atoi(optarg); break;
        case 'w': timeout = atof(optarg); break;
        case 'j': job = strtoll(optarg, NULL, 10); break;
        case 'd': dsn = optarg; break;
        case 's': server_key = optarg; break;
        case 'k': client_keys = optarg; break;
        case 'p': pause = atof(optarg); break;
        default: return 64;
        }
    }
    if (!endpoint || ntopics == 0 || (job && !dsn)) {
        fprintf(stderr, "usage: test-daemon-sub --endpoint EP --topic T... [--count N] [--timeout S] [--job ID --dsn DSN]\n");
        return 64;
    }
    struct ds_events_sub_opts so = { .endpoint = endpoint };
    char pub[DS_EVENTS_KEY_Z85_LEN + 1], sec[DS_EVENTS_KEY_Z85_LEN + 1];
    if (server_key) {
        if (!client_keys || ds_events_read_key_file(client_keys, "public-key", pub) < 0 ||
            ds_events_read_key_file(client_keys, "secret-key", sec) < 0) {
            fprintf(stderr, "test-daemon-sub: %s\n", client_keys ? ds_errdetail() : "--server-key needs --client-keys");
            return 64;
        }
        so.curve_server_key = server_key;
        so.curve_public_key = pub;
        so.curve_secret_key = sec;
    }
    struct ds_events_sub *s;
    if (ds_events_sub_open_opts(&so, &s) < 0) {
        fprintf(stderr, "test-daemon-sub: %s\n", ds_errdetail());
        return 3;
    }
    for (int i = 0; i < ntopics; i++)
        if (ds_events_sub_topic(s, topics[i]) < 0) {
            fprintf(stderr, "test-daemon-sub: %s\n", ds_errdetail());
            return 3;
        }
    if (ds_events_sub_sync(s, 5000) != 1) {
        printf("nosync\n");
        ds_events_sub_close(s);
        return 2;
    }
    printf("synced\n");
    if (pause > 0)
        usleep((useconds_t)(pause * 1e6));

    int64_t row_version = -1;
    if (job) {
        PGconn *conn = PQconnectdb(dsn);
        if (PQstatus(conn) != CONNECTION_OK) {
            fprintf(stderr, "test-daemon-sub: %s", PQerrorMessage(conn));
            return 3;
        }
        char id[32];
        snprintf(id, sizeof id, "%" PRId64, job);
        const char *params[1] = { id };
        PGresult *res = PQexecParams(conn, "SELECT state, version FROM dspark.jobs WHERE id = $1::bigint", 1, NULL,
                                     params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
            fprintf(stderr, "test-daemon-sub: job %s not found: %s", id, PQerrorMessage(conn));
            return 3;
        }
        char state[32];
        snprintf(state, sizeof state, "%s", PQgetvalue(res, 0, 0));
        row_version = strtoll(PQgetvalue(res, 0, 1), NULL, 10);
        PQclear(res);
        PQfinish(conn);
        printf("row %s %" PRId64 "\n", state, row_version);
        if (is_final(state)) {
            printf("final %s %" PRId64 " row\n", state, row_version);
            ds_events_sub_close(s);
            return 0;
        }
    }

    uint64_t deadline = ds_now_usec() + (uint64_t)(timeout * 1e6);
    int got = 0, rc = 1;
    while (count < 0 || got < count) {
        uint64_t now = ds_now_usec();
        if (now >= deadline)
            break;
        struct ds_event ev;
        int r = ds_events_sub_recv(s, (int)((deadline - now) / 1000) + 1, &ev);
        if (r == -DS_EFORMAT) {
            printf("malformed %s\n", ds_errdetail());
            continue;
        }
        if (r < 0) {
            fprintf(stderr, "test-daemon-sub: %s\n", ds_errdetail());
            rc = 3;
            break;
        }
        if (r == 0)
            continue;
        if (job) {
            if (ev.type != DS_EVENT_JOB || ev.id != job || ev.version <= row_version)
                continue;
            print_event(&ev);
            if (is_final(ev.state)) {
                printf("final %s %" PRId64 " event\n", ev.state, ev.version);
                rc = 0;
                break;
            }
            continue;
        }
        print_event(&ev);
        got++;
    }
    if (!job && count >= 0 && got >= count)
        rc = 0;
    if (!job && count < 0)
        rc = 0;
    ds_events_sub_close(s);
    return rc;
}
