/* test-wire.c: the msgpack event format: round trips of every event type and of
 * every optional field, the exact bytes of one job event against a hand-written
 * encoding, topics, and refusal of malformed, truncated and future-version input. */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <msgpack.h>

#include "testutil.h"
#include "dspark/ds-wire.h"

static void roundtrip(const struct ds_event *in, struct ds_event *out)
{
    char *buf;
    size_t len;
    assert_int_equal(ds_wire_encode(in, &buf, &len), 0);
    assert_true(len > 0 && len < DS_WIRE_MSG_MAX);
    memset(out, 0x5a, sizeof *out);
    assert_int_equal(ds_wire_decode(buf, len, out), 0);
    free(buf);
}

static void test_job_minimal(void **state)
{
    (void)state;
    struct ds_event ev, got;
    ds_event_job_init(&ev, 17, "queued", 1, 0);
    roundtrip(&ev, &got);
    assert_int_equal(got.type, DS_EVENT_JOB);
    assert_int_equal(got.id, 17);
    assert_string_equal(got.state, "queued");
    assert_int_equal(got.version, 1);
    assert_int_equal(got.attempt, 0);
    assert_int_equal(got.has, 0);   /* batch_id and finish_reason nil, no stats */
    assert_true(fabs(got.ts - ev.ts) < 1e-6);
    assert_true(got.ts > 1.6e9);
}

static void test_job_full(void **state)
{
    (void)state;
    struct ds_event ev, got;
    ds_event_job_init(&ev, 9007199254740993LL, "succeeded", 123456789012LL, 3);
    ds_event_set_batch(&ev, 42);
    ds_event_set_finish_reason(&ev, "stop");
    ev.output_tokens = 512;
    ev.tokens_per_s = 1234.5;
    ev.mean_acceptance_length = 3.25;
    ev.has |= DS_EV_OUTPUT_TOKENS | DS_EV_TOKENS_PER_S | DS_EV_MEAN_ACCEPT;
    roundtrip(&ev, &got);
    assert_int_equal(got.id, 9007199254740993LL);   /* beyond double precision: kept as an integer */
    assert_int_equal(got.batch_id, 42);
    assert_int_equal(got.version, 123456789012LL);
    assert_int_equal(got.attempt, 3);
    assert_string_equal(got.finish_reason, "stop");
    assert_int_equal(got.output_tokens, 512);
    assert_true(got.tokens_per_s == 1234.5);
    assert_true(got.mean_acceptance_length == 3.25);
    assert_int_equal(got.has, DS_EV_BATCH | DS_EV_FINISH_REASON | DS_EV_OUTPUT_TOKENS | DS_EV_TOKENS_PER_S |
                                  DS_EV_MEAN_ACCEPT);
    /* each optional statistic alone */
    unsigned bits[] = { DS_EV_OUTPUT_TOKENS, DS_EV_TOKENS_PER_S, DS_EV_MEAN_ACCEPT };
    for (int i = 0; i < 3; i++) {
        ev.has = bits[i];
        roundtrip(&ev, &got);
        assert_int_equal(got.has, bits[i]);
    }
}

static void test_heartbeat_and_ack(void **state)
{
    (void)state;
    struct ds_event hb = { .type = DS_EVENT_HB, .ts = 1700000000.25, .queued = 1000000, .running = 64, .workers = 8 };
    strcpy(hb.host, "gpu-host-07.example");
    struct ds_event got;
    roundtrip(&hb, &got);
    assert_int_equal(got.type, DS_EVENT_HB);
    assert_string_equal(got.host, "gpu-host-07.example");
    assert_true(got.ts == 1700000000.25);
    assert_int_equal(got.queued, 1000000);
    assert_int_equal(got.running, 64);
    assert_int_equal(got.workers, 8);
    assert_false(got.has & DS_EV_COUNTS_TS);   /* never read: nil */
    hb.has |= DS_EV_COUNTS_TS;
    hb.counts_ts = 1699999990.5;
    roundtrip(&hb, &got);
    assert_true((got.has & DS_EV_COUNTS_TS) && got.counts_ts == 1699999990.5);

    struct ds_event ack = { .type = DS_EVENT_SUB, .ts = 5 };
    strcpy(ack.topic, "job|42|");
    roundtrip(&ack, &got);
    assert_int_equal(got.type, DS_EVENT_SUB);
    assert_string_equal(got.topic, "job|42|");
    assert_false(got.has & DS_EV_COUNT);   /* an ack without a count: neither key */
    /* with the publisher's count and instance (a checkpoint) */
    ack.has |= DS_EV_COUNT;
    ack.count = 123456789012;
    strcpy(ack.pub, "00ff10ee20dd30cc");
    roundtrip(&ack, &got);
    assert_true(got.has & DS_EV_COUNT);
    assert_true(got.count == 123456789012);
    assert_string_equal(got.pub, "00ff10ee20dd30cc");
    assert_string_equal(got.topic, "job|42|");
    char t[64];
    assert_int_equal(ds_wire_topic(&ack, t, sizeof t), 0);
    assert_string_equal(t, "ack|job|42|");
    /* a checkpoint: marked, and on a topic of its own */
    ack.has |= DS_EV_CHECKPOINT;
    roundtrip(&ack, &got);
    assert_true((got.has & DS_EV_CHECKPOINT) && (got.has & DS_EV_COUNT) && got.count == 123456789012);
    assert_int_equal(ds_wire_topic(&ack, t, sizeof t), 0);
    assert_string_equal(t, "cp|7|job|42|");
    assert_int_equal(ds_wire_topic_checkpoint(t, sizeof t, ""), 0);
    assert_string_equal(t, "cp|0|");
    assert_int_equal(ds_wire_topic_checkpoint(t, 8, "job|42|"), -DS_ELIMIT);
    ack.count = -1;   /* counts never go below zero */
    char *buf;
    size_t len;
    assert_int_equal(ds_wire_encode(&ack, &buf, &len), -DS_EINVAL);
}

/* The contract's bytes: a map of 9 keys in the documented order. */
static void test_exact_encoding(void **state)
{
    (void)state;
    struct ds_event ev;
    ds_event_job_init(&ev, 5, "running", 2, 1);
    ev.ts = 0.5;
    char *buf;
    size_t len;
    assert_int_equal(ds_wire_encode(&ev, &buf, &len), 0);
    static const unsigned char want[] = {
        0x89,
        0xa1, 'v', 0x01,
        0xa4, 't', 'y', 'p', 'e', 0xa3, 'j', 'o', 'b',
        0xa2, 'i', 'd', 0x05,
        0xa8, 'b', 'a', 't', 'c', 'h', '_', 'i', 'd', 0xc0,
        0xa5, 's', 't', 'a', 't', 'e', 0xa7, 'r', 'u', 'n', 'n', 'i', 'n', 'g',
        0xa7, 'v', 'e', 'r', 's', 'i', 'o', 'n', 0x02,
        0xa7, 'a', 't', 't', 'e', 'm', 'p', 't', 0x01,
        0xad, 'f', 'i', 'n', 'i', 's', 'h', '_', 'r', 'e', 'a', 's', 'o', 'n', 0xc0,
        0xa2, 't', 's', 0xcb, 0x3f, 0xe0, 0, 0, 0, 0, 0, 0,
    };
    assert_int_equal(len, sizeof want);
    assert_memory_equal(buf, want, sizeof want);
    free(buf);
}

static void test_topics(void **state)
{
    (void)state;
    char t[DS_WIRE_TOPIC_MAX];
    struct ds_event ev;
    ds_event_job_init(&ev, 123, "queued", 1, 0);
    assert_int_equal(ds_wire_topic(&ev, t, sizeof t), 0);
    assert_string_equal(t, "job|-|123|");
    ds_event_set_batch(&ev, 7);
    assert_int_equal(ds_wire_topic(&ev, t, sizeof t), 0);
    assert_string_equal(t, "job|7|123|");
    /* prefix subscriptions select what they should */
    char b7[64], b71[64], j[64];
    assert_int_equal(ds_wire_topic_batch(b7, sizeof b7, 7), 0);
    assert_int_equal(ds_wire_topic_batch(b71, sizeof b71, 71), 0);
    assert_int_equal(ds_wire_topic_job(j, sizeof j, 7, 12), 0);
    assert_true(strncmp(t, b7, strlen(b7)) == 0);
    assert_false(strncmp(t, b71, strlen(b71)) == 0);
    assert_false(strncmp(t, j, strlen(j)) == 0);   /* job 12 must not match job 123 */
    assert_true(strncmp(t, DS_WIRE_TOPIC_ALL_JOBS, strlen(DS_WIRE_TOPIC_ALL_JOBS)) == 0);
    char small[6];
    assert_int_equal(ds_wire_topic(&ev, small, sizeof small), -DS_ELIMIT);
    struct ds_event hb = { .type = DS_EVENT_HB };
    assert_int_equal(ds_wire_topic(&hb, t, sizeof t), 0);
    assert_string_equal(t, "hb|");
}

/* Encode an arbitrary map with msgpack-c directly. */
static size_t pack_custom(char *out, size_t cap, void (*fill)(msgpack_packer *))
{
    msgpack_sbuffer sb;
    msgpack_packer pk;
    msgpack_sbuffer_init(&sb);
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    fill(&pk);
    assert_true(sb.size <= cap);
    memcpy(out, sb.data, sb.size);
    size_t n = sb.size;
    msgpack_sbuffer_destroy(&sb);
    return n;
}

static void kstr(msgpack_packer *pk, const char *s)
{
    msgpack_pack_str(pk, strlen(s));
    msgpack_pack_str_body(pk, s, strlen(s));
}

static void fill_v2(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 2);
    kstr(pk, "v");
    msgpack_pack_int(pk, 2);
    kstr(pk, "type");
    kstr(pk, "job");
}

static void fill_no_state(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 6);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "job");
    kstr(pk, "id"); msgpack_pack_int(pk, 1);
    kstr(pk, "version"); msgpack_pack_int(pk, 1);
    kstr(pk, "attempt"); msgpack_pack_int(pk, 0);
    kstr(pk, "ts"); msgpack_pack_double(pk, 1.0);
}

static void fill_bad_types(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 7);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "job");
    kstr(pk, "id"); kstr(pk, "17");   /* a string where an integer belongs */
    kstr(pk, "state"); kstr(pk, "queued");
    kstr(pk, "version"); msgpack_pack_int(pk, 1);
    kstr(pk, "attempt"); msgpack_pack_int(pk, 0);
    kstr(pk, "ts"); msgpack_pack_double(pk, 1.0);
}

static void fill_unknown_keys(msgpack_packer *pk)
{
    /* keys in another order, an unknown key with a nested value: accepted */
    msgpack_pack_map(pk, 8);
    kstr(pk, "ts"); msgpack_pack_int(pk, 3);
    kstr(pk, "future"); msgpack_pack_array(pk, 2); msgpack_pack_int(pk, 1); msgpack_pack_nil(pk);
    kstr(pk, "attempt"); msgpack_pack_int(pk, 2);
    kstr(pk, "version"); msgpack_pack_int(pk, 9);
    kstr(pk, "state"); kstr(pk, "failed");
    kstr(pk, "id"); msgpack_pack_int(pk, 77);
    kstr(pk, "type"); kstr(pk, "job");
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
}

static void fill_nan(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 7);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "hb");
    kstr(pk, "host"); kstr(pk, "h");
    kstr(pk, "ts"); msgpack_pack_double(pk, NAN);
    kstr(pk, "queued"); msgpack_pack_int(pk, 0);
    kstr(pk, "running"); msgpack_pack_int(pk, 0);
    kstr(pk, "workers"); msgpack_pack_int(pk, 0);
}

static void fill_count_without_pub(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 5);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "sub");
    kstr(pk, "topic"); kstr(pk, "job|");
    kstr(pk, "ts"); msgpack_pack_double(pk, 1.0);
    kstr(pk, "count"); msgpack_pack_int(pk, 3);
}

static void fill_pub_without_count(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 5);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "sub");
    kstr(pk, "topic"); kstr(pk, "job|");
    kstr(pk, "ts"); msgpack_pack_double(pk, 1.0);
    kstr(pk, "pub"); kstr(pk, "abc");
}

static void fill_bad_count(msgpack_packer *pk)
{
    msgpack_pack_map(pk, 6);
    kstr(pk, "v"); msgpack_pack_int(pk, 1);
    kstr(pk, "type"); kstr(pk, "sub");
    kstr(pk, "topic"); kstr(pk, "job|");
    kstr(pk, "ts"); msgpack_pack_double(pk, 1.0);
    kstr(pk, "count"); msgpack_pack_int(pk, -5);   /* a count below zero */
    kstr(pk, "pub"); kstr(pk, "abc.1");
}

static void test_refusals(void **state)
{
    (void)state;
    char buf[512];
    struct ds_event got;
    memset(&got, 0x33, sizeof got);
    struct ds_event before = got;

    size_t n = pack_custom(buf, sizeof buf, fill_v2);
    assert_int_equal(ds_wire_decode(buf, n, &got), -DS_ENOTSUP);
    assert_non_null(strstr(ds_errdetail(), "version 2"));

    n = pack_custom(buf, sizeof buf, fill_no_state);
    assert_int_equal(ds_wire_decode(buf, n, &got), -DS_EFORMAT);
    assert_non_null(strstr(ds_errdetail(), "'state'"));

    n = pack_custom(buf, sizeof buf, fill_bad_types);
    assert_int_equal(ds_wire_decode(buf, n, &got), -DS_EFORMAT);
    assert_non_null(strstr(ds_errdetail(), "'id'"));

    n = pack_custom(buf, sizeof buf, fill_nan);
    assert_int_equal(ds_wire_decode(buf, n, &got), -DS_EFORMAT);
    assert_non_null(strstr(ds_errdetail(), "'ts'"));


    /* out-param untouched after all these failures */
    assert_memory_equal(&got, &before, sizeof got);

    /* a count is only meaningful with the "pub" it belongs to: without it (or with a count it cannot read)
     * the map is still an ack, with no count */
    n = pack_custom(buf, sizeof buf, fill_count_without_pub);
    assert_int_equal(ds_wire_decode(buf, n, &got), 0);
    assert_true(got.type == DS_EVENT_SUB && !(got.has & DS_EV_COUNT) && got.count == 0);
    assert_string_equal(got.topic, "job|");
    n = pack_custom(buf, sizeof buf, fill_pub_without_count);
    assert_int_equal(ds_wire_decode(buf, n, &got), 0);
    assert_true(got.type == DS_EVENT_SUB && !(got.has & DS_EV_COUNT) && got.pub[0] == 0);
    n = pack_custom(buf, sizeof buf, fill_bad_count);
    assert_int_equal(ds_wire_decode(buf, n, &got), 0);
    assert_true(got.type == DS_EVENT_SUB && !(got.has & DS_EV_COUNT));

    n = pack_custom(buf, sizeof buf, fill_unknown_keys);
    assert_int_equal(ds_wire_decode(buf, n, &got), 0);
    assert_int_equal(got.id, 77);
    assert_string_equal(got.state, "failed");
    assert_int_equal(got.version, 9);
    assert_true(got.ts == 3.0);

    /* every truncation of a valid message is refused, never read past */
    struct ds_event ev;
    ds_event_job_init(&ev, 5, "succeeded", 4, 1);
    ds_event_set_finish_reason(&ev, "length");
    char *enc;
    size_t len;
    assert_int_equal(ds_wire_encode(&ev, &enc, &len), 0);
    for (size_t cut = 0; cut < len; cut++) {
        char *copy = malloc(cut ? cut : 1);   /* exact-size copy so overreads are visible to sanitizers */
        memcpy(copy, enc, cut);
        assert_true(ds_wire_decode(copy, cut, &got) < 0);
        free(copy);
    }
    /* trailing garbage */
    char *longer = malloc(len + 1);
    memcpy(longer, enc, len);
    longer[len] = 0x01;
    assert_int_equal(ds_wire_decode(longer, len + 1, &got), -DS_EFORMAT);
    free(longer);
    free(enc);

    /* containers that announce more elements than there are bytes: refused
     * before anything is allocated for them */
    const unsigned char huge_array[] = { 0xdd, 0xff, 0xff, 0xff, 0xff, 0x01 };
    const unsigned char huge_map[] = { 0x81, 0xa1, 'v', 0xdf, 0x7f, 0xff, 0xff, 0xff };
    const unsigned char huge_str[] = { 0x81, 0xdb, 0xff, 0xff, 0xff, 0xf0, 'v' };
    assert_int_equal(ds_wire_decode(huge_array, sizeof huge_array, &got), -DS_EFORMAT);
    assert_int_equal(ds_wire_decode(huge_map, sizeof huge_map, &got), -DS_EFORMAT);
    assert_int_equal(ds_wire_decode(huge_str, sizeof huge_str, &got), -DS_EFORMAT);
    /* nesting deeper than any event needs */
    unsigned char deep[40];
    memset(deep, 0x91, sizeof deep);
    deep[sizeof deep - 1] = 0x01;
    assert_int_equal(ds_wire_decode(deep, sizeof deep, &got), -DS_EFORMAT);

    /* not a map */
    const unsigned char arr[] = { 0x91, 0x01 };
    assert_int_equal(ds_wire_decode(arr, sizeof arr, &got), -DS_EFORMAT);

    /* the encoder refuses what the format cannot carry */
    struct ds_event bad;
    ds_event_job_init(&bad, 1, "", 1, 0);
    assert_int_equal(ds_wire_encode(&bad, &enc, &len), -DS_EINVAL);
}

/* Deterministic pseudo-random bytes never crash the decoder. */
static void test_garbage(void **state)
{
    (void)state;
    uint32_t x = 12345;
    unsigned char buf[64];
    struct ds_event got;
    int accepted = 0;
    for (int iter = 0; iter < 20000; iter++) {
        size_t n = 1 + (size_t)(iter % (int)sizeof buf);
        for (size_t i = 0; i < n; i++) {
            x = x * 1664525u + 1013904223u;
            buf[i] = (unsigned char)(x >> 24);
        }
        if (iter % 3 == 0)
            buf[0] = 0x80 | (buf[0] & 0x0f);   /* start with a fixmap sometimes */
        if (ds_wire_decode(buf, n, &got) == 0)
            accepted++;
    }
    assert_int_equal(accepted, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_job_minimal),
        cmocka_unit_test(test_job_full),
        cmocka_unit_test(test_heartbeat_and_ack),
        cmocka_unit_test(test_exact_encoding),
        cmocka_unit_test(test_topics),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_garbage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
