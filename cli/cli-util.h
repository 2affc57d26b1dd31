/* cli-util.h: small helpers shared by the command-line tools. */
#ifndef DS_CLI_UTIL_H
#define DS_CLI_UTIL_H

#include <jansson.h>
#include <stddef.h>

/* Parse an option value or exit(2) with a message naming the option. */
int ds_cli_int(const char *opt, const char *val, long min, long max);
double ds_cli_double(const char *opt, const char *val, double min, double max);
/* An unsigned decimal integer of 64 bits; exits 2 with a message otherwise. */
unsigned long long ds_cli_u64(const char *opt, const char *val);
/* Print "prog: <ds_errdetail()>" and return 1 (for `return ds_cli_fail(...)` in main). */
int ds_cli_fail(const char *prog);
double ds_cli_now(void);
/* A JSON string of bytes that may not be valid UTF-8 (invalid bytes become U+FFFD). */
json_t *ds_json_text(const char *s, size_t len);

#endif
