/* log.c: service logging to the journal, to stderr with "<N>" prefixes, or to a
 * terminal (see ds-log.h). Every message is formatted into one buffer and
 * written with one call, so concurrent writers never interleave within a line.
 * Logging itself never fails loudly: a message that cannot be written is lost. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifdef HAVE_SYSTEMD
#define SD_JOURNAL_SUPPRESS_LOCATION 1
#include <systemd/sd-journal.h>
#endif

#include "dspark/ds-log.h"

#define LOG_LINE_MAX 4096

static const char *log_ident = "dspark";
static atomic_int log_level = DS_LOG_INFO;
static atomic_int log_sink = DS_LOG_TARGET_PREFIX;

static const struct {
    const char *name;
    const char *label;   /* PostgreSQL-style label for terminals */
    int level;
} level_names[] = {
    { "crit", "FATAL", DS_LOG_CRIT },
    { "error", "ERROR", DS_LOG_ERR },
    { "warning", "WARNING", DS_LOG_WARNING },
    { "notice", "NOTICE", DS_LOG_NOTICE },
    { "info", "LOG", DS_LOG_INFO },
    { "debug", "DEBUG", DS_LOG_DEBUG },
};

/* Does $JOURNAL_STREAM ("device:inode") name the file open on fd 2? */
static int stderr_is_journal(void)
{
    const char *e = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
        return 0;
    if (fstat(STDERR_FILENO, &st) < 0)
        return 0;
    if ((unsigned long long)st.st_dev != dev || (unsigned long long)st.st_ino != ino)
        return 0;
    /* sd_journal_send() drops messages silently when journald is not there */
    return access("/run/systemd/journal/socket", W_OK) == 0;
}

void ds_log_init(const char *ident, int max_level, enum ds_log_target target)
{
    if (ident && *ident)
        log_ident = ident;
    ds_log_set_level(max_level);
    if (target == DS_LOG_TARGET_AUTO) {
        if (stderr_is_journal())
            target = DS_LOG_TARGET_JOURNAL;
        else if (isatty(STDERR_FILENO))
            target = DS_LOG_TARGET_TERMINAL;
        else
            target = DS_LOG_TARGET_PREFIX;
    }
#ifndef HAVE_SYSTEMD
    if (target == DS_LOG_TARGET_JOURNAL)
        target = DS_LOG_TARGET_PREFIX;
#endif
    atomic_store(&log_sink, (int)target);
}

void ds_log_set_level(int max_level)
{
    if (max_level < DS_LOG_CRIT)
        max_level = DS_LOG_CRIT;
    if (max_level > DS_LOG_DEBUG)
        max_level = DS_LOG_DEBUG;
    atomic_store(&log_level, max_level);
}

int ds_log_get_level(void)
{
    return atomic_load(&log_level);
}

enum ds_log_target ds_log_target(void)
{
    return (enum ds_log_target)atomic_load(&log_sink);
}

const char *ds_log_level_name(int level)
{
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++)
        if (level_names[i].level == level)
            return level_names[i].name;
    return level < DS_LOG_CRIT ? "crit" : "debug";
}

static const char *level_label(int level)
{
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++)
        if (level_names[i].level == level)
            return level_names[i].label;
    return level < DS_LOG_CRIT ? "FATAL" : "DEBUG";
}

int ds_log_parse_level(const char *s, int *ret_level)
{
    if (!s)
        return ds_seterr(DS_EINVAL, "missing log level");
    for (size_t i = 0; i < sizeof level_names / sizeof level_names[0]; i++)
        if (strcasecmp(s, level_names[i].name) == 0) {
            *ret_level = level_names[i].level;
            return 0;
        }
    if (strcasecmp(s, "err") == 0) {
        *ret_level = DS_LOG_ERR;
        return 0;
    }
    if (s[0] >= '0' && s[0] <= '7' && s[1] == '\0') {
        *ret_level = s[0] - '0';
        return 0;
    }
    return ds_seterr(DS_EINVAL, "invalid log level '%s' (expected debug, info, notice, warning, error or crit)", s);
}

/* Append the context prefix ("job 17: ") to buf; returns the new length. */
static size_t ctx_prefix(char *buf, size_t cap, size_t len, const struct ds_log_ctx *ctx)
{
    if (!ctx || len >= cap)
        return len;
    int n = 0;
    if (ctx->worker_id && *ctx->worker_id)
        n = snprintf(buf + len, cap - len, "worker %s: ", ctx->worker_id);
    else if (ctx->job_id > 0)
        n = snprintf(buf + len, cap - len, "job %" PRId64 ": ", ctx->job_id);
    else if (ctx->batch_id > 0)
        n = snprintf(buf + len, cap - len, "batch %" PRId64 ": ", ctx->batch_id);
    if (n > 0)
        len += (size_t)n;
    if (ctx->worker_id && *ctx->worker_id && ctx->job_id > 0 && len < cap) {
        n = snprintf(buf + len, cap - len, "job %" PRId64 ": ", ctx->job_id);
        if (n > 0)
            len += (size_t)n;
    }
    return len < cap ? len : cap - 1;
}

static void write_all(const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(STDERR_FILENO, buf, len);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        buf += w;
        len -= (size_t)w;
    }
}

#ifdef HAVE_SYSTEMD
static void journal_send(int level, const struct ds_log_ctx *ctx, const char *msg)
{
    char f_msg[LOG_LINE_MAX + 16], f_prio[32], f_ident[128], f_job[48], f_batch[48], f_worker[160];
    struct iovec iov[6];
    int n = 0;
    snprintf(f_msg, sizeof f_msg, "MESSAGE=%s", msg);
    snprintf(f_prio, sizeof f_prio, "PRIORITY=%d", level);
    snprintf(f_ident, sizeof f_ident, "SYSLOG_IDENTIFIER=%s", log_ident);
    iov[n++] = (struct iovec){ f_msg, strlen(f_msg) };
    iov[n++] = (struct iovec){ f_prio, strlen(f_prio) };
    iov[n++] = (struct iovec){ f_ident, strlen(f_ident) };
    if (ctx && ctx->job_id > 0) {
        snprintf(f_job, sizeof f_job, "JOB_ID=%" PRId64, ctx->job_id);
        iov[n++] = (struct iovec){ f_job, strlen(f_job) };
    }
    if (ctx && ctx->batch_id > 0) {
        snprintf(f_batch, sizeof f_batch, "BATCH_ID=%" PRId64, ctx->batch_id);
        iov[n++] = (struct iovec){ f_batch, strlen(f_batch) };
    }
    if (ctx && ctx->worker_id && *ctx->worker_id) {
        snprintf(f_worker, sizeof f_worker, "WORKER_ID=%s", ctx->worker_id);
        iov[n++] = (struct iovec){ f_worker, strlen(f_worker) };
    }
    if (sd_journal_sendv(iov, n) < 0) {
        /* the journal went away: fall back to the stream for this and later messages */
        atomic_store(&log_sink, DS_LOG_TARGET_PREFIX);
        char line[LOG_LINE_MAX + 8];
        int k = snprintf(line, sizeof line, "<%d>%s\n", level, msg);
        if (k > 0)
            write_all(line, (size_t)k < sizeof line ? (size_t)k : sizeof line - 1);
    }
}
#endif

static void emit(int level, const struct ds_log_ctx *ctx, const char *fmt, va_list ap)
{
    if (level > atomic_load(&log_level))
        return;
    int saved_errno = errno;
    char msg[LOG_LINE_MAX];
    size_t len = ctx_prefix(msg, sizeof msg, 0, ctx);
    int n = vsnprintf(msg + len, sizeof msg - len, fmt, ap);
    if (n < 0)
        n = 0;
    len = len + (size_t)n < sizeof msg ? len + (size_t)n : sizeof msg - 1;
    /* one line: fold embedded newlines so log collectors see one record */
    for (size_t i = 0; i < len; i++)
        if (msg[i] == '\n')
            msg[i] = ' ';

    int sink = atomic_load(&log_sink);
#ifdef HAVE_SYSTEMD
    if (sink == DS_LOG_TARGET_JOURNAL) {
        journal_send(level, ctx, msg);
        errno = saved_errno;
        return;
    }
#endif
    char line[LOG_LINE_MAX + 256];
    int k;
    if (sink == DS_LOG_TARGET_TERMINAL)
        k = snprintf(line, sizeof line, "%s: %s:  %s\n", log_ident, level_label(level), msg);
    else
        k = snprintf(line, sizeof line, "<%d>%s\n", level, msg);
    if (k > 0) {
        size_t w = (size_t)k < sizeof line ? (size_t)k : sizeof line - 1;
        if ((size_t)k >= sizeof line)
            line[w - 1] = '\n';
        write_all(line, w);
    }
    errno = saved_errno;
}

void ds_logv(int level, const char *fmt, va_list ap)
{
    emit(level, NULL, fmt, ap);
}

void ds_log(int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emit(level, NULL, fmt, ap);
    va_end(ap);
}

void ds_log_ctx(int level, const struct ds_log_ctx *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    emit(level, ctx, fmt, ap);
    va_end(ap);
}

void ds_log_job(int level, int64_t job_id, const char *fmt, ...)
{
    struct ds_log_ctx ctx = { .job_id = job_id };
    va_list ap;
    va_start(ap, fmt);
    emit(level, &ctx, fmt, ap);
    va_end(ap);
}

int ds_log_errdetail(int level, int r, const char *fmt, ...)
{
    char head[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(head, sizeof head, fmt, ap);
    va_end(ap);
    ds_log(level, "%s: %s", head, ds_errdetail());
    return r;
}
