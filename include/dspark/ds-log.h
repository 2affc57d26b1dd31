/* ds-log.h: service logging (dsparkd, dspark-worker, dsparkctl; never the engine).
 *
 * One line per message, written with a single write(2) so that threads and
 * processes sharing stderr do not interleave. Three sinks, chosen by ds_log_init():
 *   - the systemd journal with structured fields (PRIORITY=, JOB_ID=, BATCH_ID=,
 *     WORKER_ID=) when the build has libsystemd and stderr is connected to the
 *     journal ($JOURNAL_STREAM names stderr's device and inode);
 *   - "<N>message" lines on stderr (sd-daemon(3) priority prefixes, which journald
 *     and most log collectors parse) when stderr is a pipe or a file;
 *   - "ident: LEVEL:  message" on a terminal, as PostgreSQL's tools write.
 * Messages follow PostgreSQL's style: lower case, factual, user values in single
 * quotes, no trailing period. */
#ifndef DS_LOG_H
#define DS_LOG_H

#include <stdarg.h>
#include <stdint.h>

#include "dspark/ds-err.h"

/* syslog(3) priorities; lower is more severe. */
enum ds_log_level {
    DS_LOG_CRIT = 2,
    DS_LOG_ERR = 3,
    DS_LOG_WARNING = 4,
    DS_LOG_NOTICE = 5,
    DS_LOG_INFO = 6,
    DS_LOG_DEBUG = 7,
};

enum ds_log_target {
    DS_LOG_TARGET_AUTO = 0,  /* journal if stderr is the journal, else prefix/terminal */
    DS_LOG_TARGET_JOURNAL,   /* structured journal fields (falls back to PREFIX without libsystemd) */
    DS_LOG_TARGET_PREFIX,    /* "<N>message" on stderr */
    DS_LOG_TARGET_TERMINAL,  /* "ident: LEVEL:  message" on stderr */
};

/* Context attached to one message: shown as a prefix ("job 17: ...") and sent as
 * journal fields. Zero/NULL members are left out. */
struct ds_log_ctx {
    int64_t job_id;          /* JOB_ID= */
    int64_t batch_id;        /* BATCH_ID= */
    const char *worker_id;   /* WORKER_ID= */
};

/* Set the program name (borrowed; must outlive logging), the most verbose level
 * printed and the sink. Safe to call again (e.g. after a config reload). */
void ds_log_init(const char *ident, int max_level, enum ds_log_target target);
void ds_log_set_level(int max_level);
int ds_log_get_level(void);
/* The sink actually in use after ds_log_init() resolved AUTO. */
enum ds_log_target ds_log_target(void);

void ds_log(int level, const char *fmt, ...) DS_PRINTF(2, 3);
void ds_logv(int level, const char *fmt, va_list ap) DS_PRINTF(2, 0);
/* With context: ds_log_ctx(DS_LOG_INFO, &(struct ds_log_ctx){.job_id = id}, "...") */
void ds_log_ctx(int level, const struct ds_log_ctx *ctx, const char *fmt, ...) DS_PRINTF(3, 4);
/* Per-job shorthand: prefix "job <id>: " and field JOB_ID=<id>. */
void ds_log_job(int level, int64_t job_id, const char *fmt, ...) DS_PRINTF(3, 4);

/* Log ds_errdetail() for error r, prefixed with a context message:
 * ds_log_errdetail(DS_LOG_ERR, r, "could not load configuration") writes
 * "could not load configuration: <detail>". Returns r. */
int ds_log_errdetail(int level, int r, const char *fmt, ...) DS_PRINTF(3, 4);

/* "debug", "info", "notice", "warning", "error", "crit" (and syslog numbers). */
int ds_log_parse_level(const char *s, int *ret_level) DS_MUSTCHECK;
const char *ds_log_level_name(int level);

#define ds_log_error(...) ds_log(DS_LOG_ERR, __VA_ARGS__)
#define ds_log_warning(...) ds_log(DS_LOG_WARNING, __VA_ARGS__)
#define ds_log_notice(...) ds_log(DS_LOG_NOTICE, __VA_ARGS__)
#define ds_log_info(...) ds_log(DS_LOG_INFO, __VA_ARGS__)
#define ds_log_debug(...) ds_log(DS_LOG_DEBUG, __VA_ARGS__)

#endif
