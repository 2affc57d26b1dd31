/* test-cfg.c: the INI configuration reader: types, units, bounds, quoting,
 * defaults, "line N" errors that leave everything unchanged, skipped sections,
 * SIGHUP semantics (reloadable keys change, others keep their value), and a
 * table's check across keys at load and at reload. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "dspark/ds-cfg.h"
#include "dspark/ds-log.h"

static int n_workers;
static double ratio;
static bool verbose;
static char *dsn;
static char *password;
static int64_t interval_ms;
static int level;

static const char *const level_choices[] = { "low", "mid", "high", NULL };
static const char *const skipped[] = { "worker", NULL };

static const struct ds_cfg_key keys[] = {
    { "dsparkd", "workers", DS_CFG_INT, &n_workers, 0, 64, "2", 0, NULL, "workers" },
    { "dsparkd", "ratio", DS_CFG_DOUBLE, &ratio, 0.0, 1.0, "0.5", DS_CFG_RELOADABLE, NULL, "ratio" },
    { "dsparkd", "verbose", DS_CFG_BOOL, &verbose, 0, 0, "off", DS_CFG_RELOADABLE, NULL, "verbose" },
    { "dsparkd", "interval", DS_CFG_DURATION, &interval_ms, 100, 86400000, "5s", DS_CFG_RELOADABLE, NULL, "interval" },
    { "dsparkd", "level", DS_CFG_ENUM, &level, 0, 0, "mid", 0, level_choices, "level" },
    { "database", "dsn", DS_CFG_STRING, &dsn, 0, 1024, "dbname=dspark", 0, NULL, "dsn" },
    { "database", "password", DS_CFG_STRING, &password, 0, 0, NULL, DS_CFG_RELOADABLE | DS_CFG_SECRET, NULL, "pw" },
};
static const struct ds_cfg_table table = { keys, sizeof keys / sizeof keys[0], skipped };

static int setup(void **state)
{
    (void)state;
    ds_log_init("test-cfg", DS_LOG_CRIT, DS_LOG_TARGET_PREFIX);   /* keep reload warnings quiet */
    return ds_cfg_defaults(&table) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    ds_cfg_free(&table);
    return 0;
}

static void test_defaults(void **state)
{
    (void)state;
    assert_int_equal(ds_cfg_load_string(&table, "# nothing\n\n", "t"), 0);
    assert_int_equal(n_workers, 2);
    assert_true(ratio == 0.5);
    assert_false(verbose);
    assert_int_equal(interval_ms, 5000);
    assert_int_equal(level, 1);
    assert_string_equal(dsn, "dbname=dspark");
    assert_string_equal(password, "");
}

static void test_values(void **state)
{
    (void)state;
    const char *text =
        "; comment\n"
        "[dsparkd]\n"
        "workers = 8\n"
        "ratio=0.25   # trailing comment\n"
        "verbose = Yes\n"
        "interval = 250ms\n"
        "level = HIGH\n"
        "\n"
        "[worker]\n"
        "anything = goes here  # read by another program\n"
        "[database]\n"
        "  dsn = \"host=/run/postgresql dbname=x password=a#b\\\"c\"  ; quoted\n"
        "password = s3cret\n";
    assert_int_equal(ds_cfg_load_string(&table, text, "t"), 0);
    assert_int_equal(n_workers, 8);
    assert_true(ratio == 0.25);
    assert_true(verbose);
    assert_int_equal(interval_ms, 250);
    assert_int_equal(level, 2);
    assert_string_equal(dsn, "host=/run/postgresql dbname=x password=a#b\"c");
    assert_string_equal(password, "s3cret");
    char buf[64];
    assert_string_equal(ds_cfg_format(&keys[5 + 1], buf, sizeof buf), "********");
    assert_string_equal(ds_cfg_format(&keys[3], buf, sizeof buf), "250ms");
    assert_string_equal(ds_cfg_format(&keys[2], buf, sizeof buf), "on");
    /* a key left out returns to its default on the next load */
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nworkers = 3\n", "t"), 0);
    assert_int_equal(n_workers, 3);
    assert_true(ratio == 0.5);
    assert_string_equal(dsn, "dbname=dspark");
}

static void test_durations(void **state)
{
    (void)state;
    int64_t ms;
    struct { const char *in; int64_t ms; } ok[] = {
        { "5", 5000 }, { "1.5s", 1500 }, { "10min", 600000 }, { "2h", 7200000 }, { "7d", 604800000 },
        { "250 ms", 250 }, { "0", 0 },
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        assert_int_equal(ds_cfg_parse_duration(ok[i].in, &ms), 0);
        assert_int_equal(ms, ok[i].ms);
    }
    /* (decimal only: strtod reads "0x10" as 16 and "1e3" as 1000) */
    const char *bad[] = { "", "s", "5 parsecs", "nan", "1e300d", "5m", "0x10", "0x10s", "1e3", "inf", " 5s" };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(ds_cfg_parse_duration(bad[i], &ms), -DS_ECONFIG);
}

/* Each bad file fails with "line N" and leaves every value as it was. */
static void test_errors(void **state)
{
    (void)state;
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nworkers = 4\n", "t"), 0);
    struct { const char *text; const char *needle; } cases[] = {
        { "[dsparkd]\nworkers = 4\nwrokers = 5\n", "'t' line 3: unknown key 'wrokers' in section [dsparkd]" },
        { "[dsparkd]\nworkers = 65\n", "line 2: value 65 for key 'workers' is out of range (0 .. 64)" },
        { "[dsparkd]\nworkers = 4x\n", "line 2: invalid value '4x' for key 'workers'" },
        { "[dsparkd]\nratio = nan\n", "line 2: invalid value 'nan' for key 'ratio'" },
        { "[dsparkd]\nratio = 0x1p-2\n", "line 2: invalid value '0x1p-2' for key 'ratio'" },
        { "[dsparkd]\ninterval = 0x10\n", "line 2: key 'interval': invalid duration '0x10'" },
        { "[dsparkd]\nratio = 1.5\n", "line 2: value 1.5 for key 'ratio' is out of range" },
        { "[dsparkd]\nverbose = maybe\n", "line 2: invalid value 'maybe' for key 'verbose'" },
        { "[dsparkd]\ninterval = 10ms\n", "line 2: value '10ms' for key 'interval' is out of range (100ms .. 1d)" },
        { "[dsparkd]\nlevel = top\n", "expected one of low, mid, high" },
        { "workers = 1\n", "line 1: key 'workers' appears before any [section]" },
        { "[nope]\nx = 1\n", "line 1: unknown section [nope]" },
        { "[dsparkd\n", "line 1: malformed section header" },
        { "[dsparkd]\nworkers\n", "line 2: expected 'key = value'" },
        { "[dsparkd]\nworkers = 1\nworkers = 2\n", "line 3: key 'workers' in section [dsparkd] is already set on line 2" },
        { "[database]\ndsn = \"open\n", "line 2: key 'dsn': unterminated quoted value" },
        { "[database]\npassword = \n[dsparkd]\nworkers = -1\nratio = 2\n", "(and 1 more error)" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        assert_int_equal(ds_cfg_load_string(&table, cases[i].text, "t"), -DS_ECONFIG);
        if (!strstr(ds_errdetail(), cases[i].needle))
            fail_msg("case %zu: detail '%s' lacks '%s'", i, ds_errdetail(), cases[i].needle);
        assert_int_equal(n_workers, 4);
    }
    /* a double may have an exponent */
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nworkers = 4\nratio = 2.5e-1\n", "t"), 0);
    assert_true(ratio == 0.25);
    /* a secret value never appears in a message */
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nlevel = hunter2\n", "t"), -DS_ECONFIG);
    assert_non_null(strstr(ds_errdetail(), "hunter2"));   /* not secret: shown */
    static const struct ds_cfg_key secret_int[] = {
        { "database", "password", DS_CFG_ENUM, &level, 0, 0, "low", DS_CFG_SECRET, level_choices, "x" },
    };
    const struct ds_cfg_table st = { secret_int, 1, NULL };
    assert_int_equal(ds_cfg_load_string(&st, "[database]\npassword = hunter2\n", "t"), -DS_ECONFIG);
    assert_null(strstr(ds_errdetail(), "hunter2"));
    /* ... nor the text after a secret's closing quote (a DSN's password written outside the quotes) */
    assert_int_equal(ds_cfg_load_string(&table, "[database]\npassword = \"host=db\" password=hunter2\n", "t"),
                     -DS_ECONFIG);
    assert_null(strstr(ds_errdetail(), "hunter2"));
    assert_non_null(strstr(ds_errdetail(), "unexpected text after quoted value"));
}

static void test_file(void **state)
{
    (void)state;
    char *dir = ds_test_tmpdir();
    assert_non_null(dir);
    char path[4096];
    snprintf(path, sizeof path, "%s/dspark.conf", dir);
    const char *text = "[dsparkd]\nworkers = 6\n\n[database]\nbogus = 1\n";
    assert_int_equal(ds_test_write_file(path, text, strlen(text)), 0);
    assert_int_equal(ds_cfg_load(&table, path), -DS_ECONFIG);
    char want[4200];
    snprintf(want, sizeof want, "'%s' line 5: unknown key 'bogus' in section [database]", path);
    assert_string_equal(ds_errdetail(), want);
    text = "[dsparkd]\nworkers = 6\n";
    assert_int_equal(ds_test_write_file(path, text, strlen(text)), 0);
    assert_int_equal(ds_cfg_load(&table, path), 0);
    assert_int_equal(n_workers, 6);
    snprintf(path, sizeof path, "%s/missing.conf", dir);
    assert_int_equal(ds_cfg_load(&table, path), -DS_ECONFIG);
    assert_non_null(strstr(ds_errdetail(), "could not open configuration file"));
    ds_test_rmtree(dir);
    free(dir);
}

static void test_reload(void **state)
{
    (void)state;
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nworkers = 4\nratio = 0.1\n", "t"), 0);
    int changed = -1, ignored = -1;
    const char *next = "[dsparkd]\nworkers = 9\nratio = 0.9\ninterval = 1min\n[database]\ndsn = other\n";
    assert_int_equal(ds_cfg_reload_string(&table, next, "t", &changed, &ignored), 0);
    assert_int_equal(changed, 2);         /* ratio and interval */
    assert_int_equal(ignored, 2);         /* workers and dsn need a restart */
    assert_true(ratio == 0.9);
    assert_int_equal(interval_ms, 60000);
    assert_int_equal(n_workers, 4);
    assert_string_equal(dsn, "dbname=dspark");
    /* reloading the same text again changes nothing */
    assert_int_equal(ds_cfg_reload_string(&table, next, "t", &changed, &ignored), 0);
    assert_int_equal(changed, 0);
    assert_int_equal(ignored, 2);
    /* a bad file changes nothing at all, not even reloadable keys before the error */
    assert_int_equal(ds_cfg_reload_string(&table, "[dsparkd]\nratio = 0.3\nworkers = x\n", "t", &changed, &ignored),
                     -DS_ECONFIG);
    assert_true(ratio == 0.9);
}

/* A check across keys: the interval must give each worker a second. */
static int check_interval(const void **ret_key)
{
    *ret_key = &interval_ms;
    if (interval_ms < (int64_t)n_workers * 1000)
        return ds_seterr(DS_ECONFIG, "dsparkd.interval is below a second a worker");
    return 0;
}

static const struct ds_cfg_table checked_table = { keys, sizeof keys / sizeof keys[0], skipped, check_interval };

static void test_check(void **state)
{
    (void)state;
    /* a load the check refuses changes nothing, and names the line of the key it names */
    assert_int_equal(ds_cfg_load_string(&checked_table, "[dsparkd]\nworkers = 4\nratio = 0.2\ninterval = 2s\n", "f"),
                     -DS_ECONFIG);
    assert_string_equal(ds_errdetail(), "'f' line 4: dsparkd.interval is below a second a worker");
    assert_int_equal(n_workers, 2);
    assert_true(ratio == 0.5);
    assert_int_equal(interval_ms, 5000);
    /* the key it names left at its default: the file alone */
    assert_int_equal(ds_cfg_load_string(&checked_table, "[dsparkd]\nworkers = 6\n", "f"), -DS_ECONFIG);
    assert_string_equal(ds_errdetail(), "'f': dsparkd.interval is below a second a worker");
    assert_int_equal(n_workers, 2);
    assert_int_equal(ds_cfg_load_string(&checked_table, "[dsparkd]\nworkers = 4\ninterval = 10s\n", "f"), 0);
    assert_int_equal(n_workers, 4);

    /* a reload of a file that a start would refuse changes nothing, not even a
     * reloadable key the check does not name */
    int changed = -1, ignored = -1;
    assert_int_equal(ds_cfg_reload_string(&checked_table, "[dsparkd]\nworkers = 20\nratio = 0.7\ninterval = 10s\n",
                                          "f", &changed, &ignored), -DS_ECONFIG);
    assert_string_equal(ds_errdetail(), "'f' line 4: dsparkd.interval is below a second a worker");
    assert_true(ratio == 0.5);
    assert_int_equal(interval_ms, 10000);
    /* a file that passes alone, refused with the restart-only keys kept (4 workers, not 1) */
    assert_int_equal(ds_cfg_reload_string(&checked_table, "[dsparkd]\nworkers = 1\nratio = 0.7\ninterval = 3s\n",
                                          "f", &changed, &ignored), -DS_ECONFIG);
    assert_string_equal(ds_errdetail(), "'f' line 4: with the keys that need a restart unchanged, "
                                        "dsparkd.interval is below a second a worker");
    assert_true(ratio == 0.5);
    assert_int_equal(interval_ms, 10000);
    assert_int_equal(n_workers, 4);
    /* and one both pass */
    assert_int_equal(ds_cfg_reload_string(&checked_table, "[dsparkd]\nworkers = 4\nratio = 0.7\ninterval = 6s\n",
                                          "f", &changed, &ignored), 0);
    assert_int_equal(changed, 2);
    assert_int_equal(ignored, 0);
    assert_true(ratio == 0.7);
    assert_int_equal(interval_ms, 6000);
}

static void test_dump(void **state)
{
    (void)state;
    char *dir = ds_test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/dump.conf", dir);
    /* (a newline and a tab in a quoted value go back out as escapes: raw, they broke the line) */
    assert_int_equal(ds_cfg_load_string(&table, "[dsparkd]\nworkers = 7\n[database]\ndsn = \"a # b\\n\\tc\"\n", "t"), 0);
    assert_string_equal(dsn, "a # b\n\tc");
    FILE *f = fopen(path, "w");
    ds_cfg_dump(&table, f, true);
    fclose(f);
    /* what dump writes loads back to the same values (the secret is masked, so skip it) */
    n_workers = 0;
    free(dsn);
    dsn = NULL;
    char *text = ds_test_read_file(path, NULL);
    assert_non_null(text);
    assert_non_null(strstr(text, "workers = 7"));
    char *pw = strstr(text, "password = ");
    assert_non_null(pw);
    pw[0] = '#';
    assert_int_equal(ds_cfg_load_string(&table, text, "dump"), 0);
    assert_int_equal(n_workers, 7);
    assert_string_equal(dsn, "a # b\n\tc");
    free(text);
    ds_test_rmtree(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_defaults, setup, teardown),
        cmocka_unit_test_setup_teardown(test_values, setup, teardown),
        cmocka_unit_test(test_durations),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reload, setup, teardown),
        cmocka_unit_test_setup_teardown(test_check, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dump, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
