/* supervise.c: the dspark-worker processes of dsparkd: one per configured
 * device, started with the arguments the configuration gives, restarted with
 * exponential back-off when they exit, killed when they hang, drained on stop.
 * Each worker also counts its failures since dsparkd started, so that main.c
 * can tell systemd it is ready without the workers that keep failing.
 *
 * The protocol with a worker (also in dspark-worker(8)): fd 3 is the write end
 * of a pipe; the worker writes "READY\n" when it is about to claim jobs,
 * optionally "WATCHDOG\n" after each round and "STATUS <text>\n". Everything
 * the child does between fork() and execve() is async-signal-safe: argv and
 * the environment are built before the fork. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dspark/ds-log.h"
#include "dsparkd.h"

extern char **environ;

#define MAX_WORKERS 256
#define READY_FD 3
#define STABLE_RUN_US 60000000u   /* a worker up this long resets its back-off */
#define KILL_GRACE_US 10000000u   /* after the drain timeout */
#define LINE_MAX_LEN 256
#define EXIT_CONFIG_STATUS 78

struct worker {
    char device[32];
    pid_t pid;                /* 0 = not running */
    int pipe_fd;              /* read end of the ready pipe, -1 = closed */
    char line[LINE_MAX_LEN];
    size_t line_len;
    bool ready;
    bool wd_seen;
    uint64_t started_us;
    uint64_t last_wd_us;
    unsigned failures;        /* consecutive failed runs */
    unsigned failed_total;    /* failed runs and starts since dsparkd started (never reset) */
    uint64_t restart_at_us;   /* 0 = not scheduled */
    bool killed;              /* we sent SIGKILL (hang or start timeout) */
    char status[128];
};

struct supervisor {
    const struct dsparkd_config *cfg;
    char host[256];
    struct worker *w;
    int n;
    bool draining;
    uint64_t kill_at_us;      /* drain deadline */
    char status_text[1024];
    char not_ready_names[256];
    char not_ready_detail[1024];
};

/* ---- configuration ---- */

/* Parse "0,1,2", "0-3", "0,2-3" or "" into device names (the worker's --device takes an index). */
static int parse_devices(const char *spec, char (**ret)[32], int *ret_n)
{
    char (*devs)[32] = NULL;
    int n = 0;
    const char *p = spec ? spec : "";
    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        if (!*p)
            break;
        const char *end = p;
        while (*end && *end != ',' && *end != ' ')
            end++;
        char tok[32];
        size_t len = (size_t)(end - p);
        if (len >= sizeof tok) {
            free(devs);
            return ds_seterr(DS_ECONFIG, "worker.devices: entry '%.*s' is too long", (int)len, p);
        }
        memcpy(tok, p, len);
        tok[len] = 0;
        p = end;
        /* a number, or a range of two: digits only, each device written as its number ('00' is device 0) */
        char *e1 = tok, *e2 = NULL;
        long lo = -1, hi = -1;
        if (*tok >= '0' && *tok <= '9')
            lo = hi = strtol(tok, &e1, 10);
        if (lo >= 0 && *e1 == '-' && e1[1] >= '0' && e1[1] <= '9') {
            hi = strtol(e1 + 1, &e2, 10);
            if (*e2 || hi < lo || hi - lo >= MAX_WORKERS || hi > INT_MAX) {
                free(devs);
                return ds_seterr(DS_ECONFIG, "worker.devices: invalid range '%s'", tok);
            }
        } else if (lo < 0 || *e1 || lo > INT_MAX) {
            free(devs);
            return ds_seterr(DS_ECONFIG, "worker.devices: invalid device '%s' (expected numbers like '0,1' or '0-3')",
                             tok);
        }
        for (long d = lo; d <= hi; d++) {
            if (n >= MAX_WORKERS) {
                free(devs);
                return ds_seterr(DS_ECONFIG, "worker.devices: more than %d workers", MAX_WORKERS);
            }
            devs = ds_xrealloc(devs, (size_t)(n + 1) * sizeof *devs);
            snprintf(devs[n], sizeof devs[n], "%ld", d);
            for (int k = 0; k < n; k++)
                if (strcmp(devs[k], devs[n]) == 0) {
                    free(devs);
                    return ds_seterr(DS_ECONFIG, "worker.devices: device %ld is listed twice", d);
                }
            n++;
        }
    }
    *ret = devs;
    *ret_n = n;
    return 0;
}

/* Split worker.args on blanks; single and double quotes group, backslash escapes.
 * Appends to argv (malloc'ed strings). */
static int split_args(const char *s, char ***argv, int *argc)
{
    const char *p = s ? s : "";
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p)
            return 0;
        char *arg = ds_xmalloc(strlen(p) + 1);
        size_t len = 0;
        char quote = 0;
        for (; *p && (quote || (*p != ' ' && *p != '\t')); p++) {
            if (quote) {
                if (*p == quote)
                    quote = 0;
                else if (*p == '\\' && quote == '"' && (p[1] == '"' || p[1] == '\\'))
                    arg[len++] = *++p;
                else
                    arg[len++] = *p;
            } else if (*p == '\'' || *p == '"') {
                quote = *p;
            } else if (*p == '\\' && p[1]) {
                arg[len++] = *++p;
            } else {
                arg[len++] = *p;
            }
        }
        arg[len] = 0;
        if (quote) {
            free(arg);
            return ds_seterr(DS_ECONFIG, "worker.args: unterminated quote");
        }
        *argv = ds_xrealloc(*argv, (size_t)(*argc + 2) * sizeof **argv);
        (*argv)[(*argc)++] = arg;
        (*argv)[*argc] = NULL;
    }
}

static void free_argv(char **argv)
{
    if (!argv)
        return;
    for (char **a = argv; *a; a++)
        free(*a);
    free(argv);
}

int supervisor_check_config(const struct dsparkd_config *cfg, const void **ret_key)
{
    char (*devs)[32];
    int n;
    *ret_key = &cfg->devices;
    int r = parse_devices(cfg->devices, &devs, &n);
    if (r < 0)
        return r;
    free(devs);
    char **argv = NULL;
    int argc = 0;
    *ret_key = &cfg->args;
    r = split_args(cfg->args, &argv, &argc);
    free_argv(argv);
    if (r < 0)
        return r;
    *ret_key = &cfg->program;
    if (n > 0 && (!cfg->program || !*cfg->program))
        return ds_seterr(DS_ECONFIG, "worker.program is empty but worker.devices lists %d device%s", n,
                         n == 1 ? "" : "s");
    *ret_key = &cfg->restart_delay_max;
    if (cfg->restart_delay_max < cfg->restart_delay)
        return ds_seterr(DS_ECONFIG, "worker.restart_delay_max is smaller than worker.restart_delay");
    *ret_key = NULL;
    return 0;
}

struct supervisor *supervisor_new(const struct dsparkd_config *cfg, const char *host)
{
    struct supervisor *s = ds_xcalloc(1, sizeof *s);
    s->cfg = cfg;
    snprintf(s->host, sizeof s->host, "%s", host);
    char (*devs)[32] = NULL;
    int n = 0;
    if (parse_devices(cfg->devices, &devs, &n) < 0)
        n = 0;   /* checked at start-up; cannot happen */
    s->w = ds_xcalloc((size_t)(n ? n : 1), sizeof *s->w);
    s->n = n;
    for (int i = 0; i < n; i++) {
        snprintf(s->w[i].device, sizeof s->w[i].device, "%s", devs[i]);
        s->w[i].pipe_fd = -1;
        s->w[i].restart_at_us = 1;   /* due at once */
    }
    free(devs);
    return s;
}

struct supervisor *supervisor_free(struct supervisor *s)
{
    if (!s)
        return NULL;
    for (int i = 0; i < s->n; i++)
        if (s->w[i].pipe_fd >= 0)
            close(s->w[i].pipe_fd);
    free(s->w);
    free(s);
    return NULL;
}

/* ---- starting ---- */

static void push(char ***argv, int *argc, const char *a)
{
    *argv = ds_xrealloc(*argv, (size_t)(*argc + 2) * sizeof **argv);
    (*argv)[(*argc)++] = ds_xstrdup(a);
    (*argv)[*argc] = NULL;
}

static void push_opt(char ***argv, int *argc, const char *opt, const char *val)
{
    if (!val || !*val)
        return;
    push(argv, argc, opt);
    push(argv, argc, val);
}

static void push_int(char ***argv, int *argc, const char *opt, int64_t v)
{
    if (v <= 0)
        return;
    char buf[32];
    snprintf(buf, sizeof buf, "%" PRId64, v);
    push_opt(argv, argc, opt, buf);
}

static char **build_argv(const struct supervisor *s, const struct worker *w)
{
    const struct dsparkd_config *c = s->cfg;
    char **argv = NULL;
    int argc = 0;
    push(&argv, &argc, c->program);
    push_opt(&argv, &argc, "--device", w->device);
    push_opt(&argv, &argc, "--target", c->target);
    push_opt(&argv, &argc, "--draft", c->draft);
    push_opt(&argv, &argc, "--spec", c->spec);
    push_opt(&argv, &argc, "--backend", c->backend);
    push_int(&argv, &argc, "--max-batch", c->max_batch);
    push_int(&argv, &argc, "--kv-tokens", c->kv_tokens);
    push_int(&argv, &argc, "--concurrency", c->concurrency);
    push_int(&argv, &argc, "--drain-timeout", (c->drain_timeout + 999) / 1000);
    if (split_args(c->args, &argv, &argc) < 0)
        ds_log(DS_LOG_ERR, "%s", ds_errdetail());   /* checked at start-up */
    return argv;
}

/* The environment: ours without the service manager's variables, plus the worker's. */
static char **build_envp(const struct supervisor *s, const struct worker *w)
{
    static const char *drop[] = { "NOTIFY_SOCKET=", "WATCHDOG_USEC=", "WATCHDOG_PID=", "DSPARK_DSN=",
                                  "DSPARK_WORKER_ID=", "DSPARK_READY_FD=", "LISTEN_FDS=", "LISTEN_PID=",
                                  "LISTEN_FDNAMES=" };
    size_t n = 0;
    for (char **e = environ; *e; e++)
        n++;
    char **envp = ds_xcalloc(n + 4, sizeof *envp);
    size_t k = 0;
    for (char **e = environ; *e; e++) {
        bool skip = false;
        for (size_t d = 0; d < sizeof drop / sizeof drop[0] && !skip; d++)
            skip = strncmp(*e, drop[d], strlen(drop[d])) == 0;
        if (!skip)
            envp[k++] = ds_xstrdup(*e);
    }
    const char *dsn = s->cfg->worker_dsn && *s->cfg->worker_dsn ? s->cfg->worker_dsn : s->cfg->dsn;
    char buf[4096];
    if (dsn && *dsn) {
        snprintf(buf, sizeof buf, "DSPARK_DSN=%s", dsn);
        envp[k++] = ds_xstrdup(buf);
    }
    snprintf(buf, sizeof buf, "DSPARK_WORKER_ID=%s/%s", s->host, w->device);
    envp[k++] = ds_xstrdup(buf);
    snprintf(buf, sizeof buf, "DSPARK_READY_FD=%d", READY_FD);
    envp[k++] = ds_xstrdup(buf);
    envp[k] = NULL;
    return envp;
}

static void schedule_restart(struct supervisor *s, struct worker *w, uint64_t now_us, bool config_error)
{
    uint64_t delay = (uint64_t)s->cfg->restart_delay * 1000u;
    uint64_t cap = (uint64_t)s->cfg->restart_delay_max * 1000u;
    for (unsigned i = 1; i < w->failures && delay < cap; i++)
        delay *= 2;
    if (delay > cap || config_error)
        delay = cap;
    w->restart_at_us = now_us + (delay ? delay : 1);
    ds_log(DS_LOG_INFO, "restarting the worker for device '%s' in %.1f s", w->device, (double)delay / 1e6);
}

static int start_worker(struct supervisor *s, struct worker *w, uint64_t now_us)
{
    int pfd[2], efd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0)
        return ds_seterr(DS_EIO, "could not create a pipe: %s", strerror(errno));
    if (pipe2(efd, O_CLOEXEC) < 0) {
        int e = errno;
        close(pfd[0]);
        close(pfd[1]);
        return ds_seterr(DS_EIO, "could not create a pipe: %s", strerror(e));
    }
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    char **argv = build_argv(s, w);
    char **envp = build_envp(s, w);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        /* child: async-signal-safe calls only */
        sigset_t none;
        sigemptyset(&none);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);
        setpgid(0, 0);
        struct sigaction dfl = { .sa_handler = SIG_DFL };
        for (int sig = 1; sig < NSIG; sig++)
            sigaction(sig, &dfl, NULL);   /* ignored dispositions survive exec otherwise */
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (devnull >= 0)
            dup2(devnull, STDIN_FILENO);
        /* the ready pipe becomes fd 3, the exec-error pipe fd 4 (close-on-exec),
         * and nothing else we or our parent had open reaches the worker */
        int rd = fcntl(pfd[1], F_DUPFD_CLOEXEC, READY_FD + 2);
        int ed = fcntl(efd[1], F_DUPFD_CLOEXEC, READY_FD + 2);
        if (rd < 0 || ed < 0 || dup2(rd, READY_FD) < 0 || dup2(ed, READY_FD + 1) < 0)
            _exit(127);
        fcntl(READY_FD + 1, F_SETFD, FD_CLOEXEC);
        efd[1] = READY_FD + 1;
        closefrom(READY_FD + 2);
        execve(argv[0], argv, envp);
        int e = errno;
        ssize_t wr = write(efd[1], &e, sizeof e);
        (void)wr;
        _exit(127);
    }
    int fork_errno = errno;
    free_argv(argv);
    free_argv(envp);
    if (devnull >= 0)
        close(devnull);
    close(pfd[1]);
    close(efd[1]);
    if (pid < 0) {
        close(pfd[0]);
        close(efd[0]);
        return ds_seterr(DS_EIO, "could not fork: %s", strerror(fork_errno));
    }
    /* the error pipe closes on a successful exec; otherwise it carries errno */
    int child_errno = 0;
    ssize_t rd;
    do
        rd = read(efd[0], &child_errno, sizeof child_errno);
    while (rd < 0 && errno == EINTR);
    close(efd[0]);
    if (rd == (ssize_t)sizeof child_errno) {
        close(pfd[0]);
        waitpid(pid, NULL, 0);
        return ds_seterr(DS_EIO, "could not execute '%s': %s", s->cfg->program, strerror(child_errno));
    }
    fcntl(pfd[0], F_SETFL, fcntl(pfd[0], F_GETFL) | O_NONBLOCK);
    w->pid = pid;
    w->pipe_fd = pfd[0];
    w->line_len = 0;
    w->ready = false;
    w->wd_seen = false;
    w->killed = false;
    w->started_us = now_us;
    w->last_wd_us = now_us;
    w->restart_at_us = 0;
    w->status[0] = 0;
    ds_log(DS_LOG_INFO, "started worker for device '%s' (pid %d)", w->device, (int)pid);
    return 0;
}

void supervisor_start_due(struct supervisor *s, uint64_t now_us)
{
    if (s->draining)
        return;
    for (int i = 0; i < s->n; i++) {
        struct worker *w = &s->w[i];
        if (w->pid || !w->restart_at_us || w->restart_at_us > now_us)
            continue;
        if (start_worker(s, w, now_us) < 0) {
            ds_log(DS_LOG_ERR, "could not start the worker for device '%s': %s", w->device, ds_errdetail());
            w->failures++;
            w->failed_total++;
            schedule_restart(s, w, now_us, false);
        }
    }
}

/* ---- running ---- */

static struct worker *by_pid(struct supervisor *s, pid_t pid)
{
    for (int i = 0; i < s->n; i++)
        if (s->w[i].pid == pid)
            return &s->w[i];
    return NULL;
}

static void handle_line(struct worker *w, char *line, uint64_t now_us)
{
    if (strcmp(line, "READY") == 0) {
        if (!w->ready)
            ds_log(DS_LOG_INFO, "worker for device '%s' (pid %d) is ready after %.1f s", w->device, (int)w->pid,
                   (double)(now_us - w->started_us) / 1e6);
        w->ready = true;
    } else if (strcmp(line, "WATCHDOG") == 0) {
        w->wd_seen = true;
        w->last_wd_us = now_us;
    } else if (strncmp(line, "STATUS ", 7) == 0) {
        snprintf(w->status, sizeof w->status, "%s", line + 7);
        ds_log(DS_LOG_DEBUG, "worker for device '%s': %s", w->device, w->status);
    }
}

static void read_pipe(struct worker *w, uint64_t now_us)
{
    char buf[512];
    for (;;) {
        ssize_t n = read(w->pipe_fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return;   /* EAGAIN */
        if (n == 0) {
            close(w->pipe_fd);
            w->pipe_fd = -1;
            return;
        }
        for (ssize_t i = 0; i < n; i++) {
            char c = buf[i];
            if (c == '\n') {
                w->line[w->line_len] = 0;
                handle_line(w, w->line, now_us);
                w->line_len = 0;
            } else if (w->line_len < sizeof w->line - 1) {
                w->line[w->line_len++] = c;
            }
        }
    }
}

int supervisor_pollfds(struct supervisor *s, struct pollfd *fds, int max)
{
    int k = 0;
    for (int i = 0; i < s->n && k < max; i++)
        if (s->w[i].pipe_fd >= 0)
            fds[k++] = (struct pollfd){ .fd = s->w[i].pipe_fd, .events = POLLIN };
    return k;
}

void supervisor_read(struct supervisor *s, uint64_t now_us)
{
    for (int i = 0; i < s->n; i++)
        if (s->w[i].pipe_fd >= 0)
            read_pipe(&s->w[i], now_us);
}

void supervisor_reap(struct supervisor *s, uint64_t now_us)
{
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        struct worker *w = by_pid(s, pid);
        if (!w)
            continue;
        if (w->pipe_fd >= 0) {
            read_pipe(w, now_us);   /* last words */
            if (w->pipe_fd >= 0) {
                close(w->pipe_fd);
                w->pipe_fd = -1;
            }
        }
        w->pid = 0;
        bool was_ready = w->ready;
        w->ready = false;
        double ran = (double)(now_us - w->started_us) / 1e6;
        bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        bool config_error = WIFEXITED(status) && WEXITSTATUS(status) == EXIT_CONFIG_STATUS;
        if (s->draining) {
            if (clean)
                ds_log(DS_LOG_INFO, "worker for device '%s' (pid %d) stopped", w->device, (int)pid);
            else if (WIFSIGNALED(status))
                ds_log(DS_LOG_WARNING, "worker for device '%s' (pid %d) was terminated by signal %d while draining",
                       w->device, (int)pid, WTERMSIG(status));
            else
                ds_log(DS_LOG_WARNING, "worker for device '%s' (pid %d) exited with status %d while draining",
                       w->device, (int)pid, WEXITSTATUS(status));
            continue;
        }
        if (WIFSIGNALED(status))
            ds_log(DS_LOG_ERR, "worker for device '%s' (pid %d) was terminated by signal %d%s after %.1f s",
                   w->device, (int)pid, WTERMSIG(status), w->killed ? " (killed by dsparkd)" : "", ran);
        else if (config_error)
            ds_log(DS_LOG_ERR, "worker for device '%s' (pid %d) exited with status 78 (configuration error) "
                   "after %.1f s", w->device, (int)pid, ran);
        else
            ds_log(clean ? DS_LOG_WARNING : DS_LOG_ERR, "worker for device '%s' (pid %d) exited with status %d "
                   "after %.1f s%s", w->device, (int)pid, WEXITSTATUS(status), ran,
                   was_ready ? "" : " before it was ready");
        if (now_us - w->started_us >= STABLE_RUN_US && was_ready)
            w->failures = 0;
        w->failures++;
        w->failed_total++;
        schedule_restart(s, w, now_us, config_error);
    }
}

static void kill_worker(struct worker *w, const char *why)
{
    if (!w->pid)
        return;
    ds_log(DS_LOG_ERR, "killing worker for device '%s' (pid %d): %s", w->device, (int)w->pid, why);
    w->killed = true;
    kill(w->pid, SIGKILL);
}

void supervisor_tick(struct supervisor *s, uint64_t now_us)
{
    const struct dsparkd_config *c = s->cfg;
    for (int i = 0; i < s->n; i++) {
        struct worker *w = &s->w[i];
        if (!w->pid || w->killed)
            continue;
        if (s->draining) {
            if (now_us >= s->kill_at_us)
                kill_worker(w, "drain timeout");
            continue;
        }
        if (!w->ready && c->start_timeout > 0 && now_us - w->started_us > (uint64_t)c->start_timeout * 1000u)
            kill_worker(w, "not ready within worker.start_timeout");
        else if (w->ready && w->wd_seen && c->watchdog_timeout > 0 &&
                 now_us - w->last_wd_us > (uint64_t)c->watchdog_timeout * 1000u)
            kill_worker(w, "no WATCHDOG within worker.watchdog_timeout");
    }
}

uint64_t supervisor_next_due(const struct supervisor *s)
{
    uint64_t next = UINT64_MAX;
    const struct dsparkd_config *c = s->cfg;
    for (int i = 0; i < s->n; i++) {
        const struct worker *w = &s->w[i];
        uint64_t t = UINT64_MAX;
        if (w->pid && w->killed)
            continue;   /* its deadline has passed and stays so until its SIGCHLD wakes the loop */
        if (!w->pid && w->restart_at_us && !s->draining)
            t = w->restart_at_us;
        else if (w->pid && s->draining && !w->killed)
            t = s->kill_at_us;
        else if (w->pid && !w->ready && c->start_timeout > 0)
            t = w->started_us + (uint64_t)c->start_timeout * 1000u + 1000u;
        else if (w->pid && w->ready && w->wd_seen && c->watchdog_timeout > 0)
            t = w->last_wd_us + (uint64_t)c->watchdog_timeout * 1000u + 1000u;
        if (t < next)
            next = t;
    }
    return next;
}

void supervisor_drain(struct supervisor *s, uint64_t now_us)
{
    if (s->draining)
        return;
    s->draining = true;
    /* the worker's own drain timeout, then a grace period (10 s, or the drain timeout when shorter) */
    uint64_t drain = (uint64_t)s->cfg->drain_timeout * 1000u;
    s->kill_at_us = now_us + drain + (drain < KILL_GRACE_US ? drain : KILL_GRACE_US);
    for (int i = 0; i < s->n; i++) {
        struct worker *w = &s->w[i];
        w->restart_at_us = 0;
        if (w->pid) {
            ds_log(DS_LOG_INFO, "asking the worker for device '%s' (pid %d) to drain", w->device, (int)w->pid);
            kill(w->pid, SIGTERM);
        }
    }
}

void supervisor_kill_all(struct supervisor *s)
{
    for (int i = 0; i < s->n; i++)
        if (s->w[i].pid && !s->w[i].killed)
            kill_worker(&s->w[i], "immediate shutdown");
}

int supervisor_count(const struct supervisor *s)
{
    return s->n;
}

int supervisor_running(const struct supervisor *s)
{
    int k = 0;
    for (int i = 0; i < s->n; i++)
        k += s->w[i].pid != 0;
    return k;
}

static bool is_ready(const struct worker *w)
{
    return w->pid != 0 && w->ready;
}

int supervisor_ready(const struct supervisor *s)
{
    int k = 0;
    for (int i = 0; i < s->n; i++)
        k += is_ready(&s->w[i]);
    return k;
}

bool supervisor_worker(const struct supervisor *s, int i, struct supervisor_worker_info *ret)
{
    if (i < 0 || i >= s->n)
        return false;
    const struct worker *w = &s->w[i];
    ret->device = w->device;
    ret->running = w->pid != 0;
    ret->ready = is_ready(w);
    ret->failed_total = w->failed_total;
    return true;
}

bool supervisor_all_ready(const struct supervisor *s)
{
    return supervisor_ready(s) == s->n;
}

uint64_t supervisor_first_start_deadline(const struct supervisor *s)
{
    uint64_t last = 0;
    if (s->cfg->start_timeout <= 0)
        return 0;
    for (int i = 0; i < s->n; i++) {
        const struct worker *w = &s->w[i];
        if (w->pid && !w->ready && !w->killed && w->failed_total == 0) {
            uint64_t t = w->started_us + (uint64_t)s->cfg->start_timeout * 1000u;
            if (t > last)
                last = t;
        }
    }
    return last;
}

int supervisor_failed_not_ready(const struct supervisor *s)
{
    int k = 0;
    for (int i = 0; i < s->n; i++)
        k += !is_ready(&s->w[i]) && s->w[i].failed_total > 0;
    return k;
}

/* Append to buf, which holds *len characters; what does not fit is cut and
 * marked with "...", and later appends are dropped. */
static void append(char *buf, size_t size, size_t *len, const char *fmt, ...) DS_PRINTF(4, 5);

static void append(char *buf, size_t size, size_t *len, const char *fmt, ...)
{
    if (*len >= size - 1)
        return;
    va_list ap;
    va_start(ap, fmt);
    int r = vsnprintf(buf + *len, size - *len, fmt, ap);
    va_end(ap);
    if (r >= 0 && (size_t)r < size - *len) {
        *len += (size_t)r;
        return;
    }
    memcpy(buf + size - 4, "...", 4);
    *len = size - 1;
}

const char *supervisor_not_ready_names(struct supervisor *s)
{
    char *buf = s->not_ready_names;
    size_t len = 0;
    int missing = s->n - supervisor_ready(s);
    buf[0] = 0;
    for (int i = 0; i < s->n; i++)
        if (!is_ready(&s->w[i]))
            append(buf, sizeof s->not_ready_names, &len, "%s%s", len ? ", " : missing == 1 ? "device " : "devices ",
                   s->w[i].device);
    return buf;
}

const char *supervisor_not_ready_detail(struct supervisor *s, uint64_t now_us)
{
    char *buf = s->not_ready_detail;
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < s->n; i++) {
        const struct worker *w = &s->w[i];
        if (is_ready(w))
            continue;
        append(buf, sizeof s->not_ready_detail, &len, "%sdevice '%s' (", len ? ", " : "", w->device);
        if (w->failed_total > 0)
            append(buf, sizeof s->not_ready_detail, &len, "failed %u time%s, ", w->failed_total,
                   w->failed_total == 1 ? "" : "s");
        if (w->pid)
            append(buf, sizeof s->not_ready_detail, &len, "%s)", w->failed_total ? "starting again" : "starting");
        else if (w->restart_at_us > now_us)
            append(buf, sizeof s->not_ready_detail, &len, "restarting in %.1f s)",
                   (double)(w->restart_at_us - now_us) / 1e6);
        else
            append(buf, sizeof s->not_ready_detail, &len, "restarting)");
    }
    return buf;
}

const char *supervisor_status_text(struct supervisor *s)
{
    size_t len = 0;
    s->status_text[0] = 0;
    for (int i = 0; i < s->n && len < sizeof s->status_text; i++)
        if (s->w[i].pid && s->w[i].status[0])
            len += (size_t)snprintf(s->status_text + len, sizeof s->status_text - len, "%s[%s] %s",
                                    len ? "; " : "", s->w[i].device, s->w[i].status);
    return s->status_text;
}
