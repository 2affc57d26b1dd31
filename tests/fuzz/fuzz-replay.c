/* fuzz-replay.c: replays tests/fuzz/corpus through the fuzz target without
 * libFuzzer (one TAP test per file). Files named valid-* must open, files named
 * bad-* must be refused with DS_EFORMAT and a message naming the file; any
 * other file (an input the fuzzer found) only has to pass the target's own
 * invariant checks, which abort on failure. */
#include "config.h"

#include <dirent.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-safetensors.h"
#include "testutil.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void replay(void **state)
{
    const char *name = *state;
    char rel[512];
    snprintf(rel, sizeof rel, "tests/fuzz/corpus/%s", name);
    size_t len;
    char *buf = ds_test_read_file(ds_test_path(rel), &len);
    assert_non_null(buf);

    /* an exact-size copy, so that an overread is at least an out-of-bounds heap access */
    uint8_t *img = malloc(len ? len : 1);
    assert_non_null(img);
    memcpy(img, buf, len);
    free(buf);

    assert_int_equal(LLVMFuzzerTestOneInput(img, len), 0);

    struct ds_st *st = NULL;
    int r = ds_st_open_buffer(img, len, name, &st);
    if (strncmp(name, "valid-", 6) == 0) {
        if (r < 0)
            fail_msg("'%s' refused: %s", name, ds_errdetail());
        assert_non_null(st);
    } else if (strncmp(name, "bad-", 4) == 0) {
        assert_int_equal(r, -DS_EFORMAT);
        assert_null(st);
        assert_non_null(strstr(ds_errdetail(), name));
    }
    ds_st_free(st);
    free(img);
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(void)
{
    DIR *d = opendir(ds_test_path("tests/fuzz/corpus"));
    if (!d)
        ds_test_skip_all("no corpus directory '%s'", ds_test_path("tests/fuzz/corpus"));
    char **names = NULL;
    size_t n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        names = realloc(names, (n + 1) * sizeof *names);
        names[n++] = strdup(e->d_name);
    }
    closedir(d);
    if (n == 0)
        ds_test_skip_all("the corpus is empty");
    qsort(names, n, sizeof *names, cmp_name);

    struct CMUnitTest *tests = calloc(n, sizeof *tests);
    for (size_t i = 0; i < n; i++) {
        tests[i].name = names[i];
        tests[i].test_func = replay;
        tests[i].initial_state = names[i];
    }
    int failed = _cmocka_run_group_tests("fuzz-replay", tests, n, NULL, NULL);
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    free(tests);
    return failed;
}
