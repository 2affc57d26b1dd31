/* worker.h: dspark-worker internals shared by its files: the options, the
 * jobs the worker holds, and the state that the decoding thread (main.c) and
 * the database thread (dbthread.c) share. */
#ifndef DS_WORKER_H
#define DS_WORKER_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <jansson.h>

#include "dspark/ds-engine.h"

struct ds_db;
struct ds_model;

/* ---- options ---- */
struct wopts {
    const char *dsn;              /* NULL: $DSPARK_DSN, else libpq's environment */
    const char *target_dir;
    const char *draft_dir;
    const char *spec;             /* default speculation for jobs that name none */
    const char *backend;          /* "cpu" */
    int device;                   /* -1: not given */
    int threads;                  /* 0: all CPUs */
    int max_batch;                /* sequences decoded at once */
    int concurrency;              /* jobs held at once (claimed, running or queued in the engine) */
    long kv_tokens;               /* 0: the engine's default */
    double gpu_memory;            /* share of free GPU memory for the KV cache (0: the engine's default) */
    int gemm_ranges;              /* cuda: k ranges of the products (target and draft) at most (0: the kernels') */
    int max_context;              /* 0: the model's */
    double drain_timeout;         /* seconds */
    const char *worker_id;
    double db_timeout;            /* seconds: statement_timeout where the session has none */
    double lease;                 /* seconds */
    double heartbeat;             /* seconds between heartbeats */
    double poll;                  /* seconds between claims while the queue looks empty */
    double unknown_model_timeout; /* seconds a due job of an unserved model waits before failing; 0: never */
    const char *sps_file;
    const char *model_name;
    bool once;
    int log_level;
};

/* ---- one job ---- */
struct wjob {
    int64_t id;
    int attempt;
    int64_t batch_id;             /* 0: none */
    char *model;
    char *prompt;                 /* exactly one of prompt, messages, prompt_ids is set */
    char *messages;               /* JSON text: [{"role", "content"}...] */
    char *prompt_ids;             /* JSON text: [1, 2, ...] */
    int max_tokens;
    double temperature, top_p;
    int top_k;
    bool has_seed;
    int64_t seed;
    char *stop;                   /* JSON text: ["...", ...] or NULL */
    char *spec_mode;
    double queue_wait_s;          /* started_at - max(created_at, run_after), from the row */
    double t_claimed;             /* monotonic seconds when the claim's answer arrived */
    /* set by the decoding thread */
    int engine_id;                /* 0: not in the engine */
    int n_prompt;                 /* prompt tokens after tokenization (0: not tokenized) */
    double t_submit;              /* monotonic seconds of ds_engine_submit */
    struct wjob *next;
};

void wjob_free(struct wjob *j);

/* ---- identity written with every result ---- */
struct widentity {
    char worker_id[256];
    char host[256];
    char device[64];
    char model[257];              /* the model name jobs ask for */
    char draft[257];              /* the draft's name ("" without a draft) */
    char model_checksum[17];
    char draft_checksum[17];
    char instance[33];            /* 32 hex digits this process drew at start: which process holds the row */
};

/* One claim of a job: the job and its attempt (a job claimed again after its
 * lease expired is another claim). */
struct wclaim {
    int64_t id;
    int attempt;
};

/* ---- what the two threads share (under mu) ---- */
struct wshared {
    pthread_mutex_t mu;
    pthread_cond_t main_cv;       /* the decoding thread waits on it while idle */
    int wake_fd;                  /* eventfd: wakes the database thread */

    /* decoding thread -> database thread */
    json_t *results;              /* array of finish_jobs items not yet handed over */
    int64_t *rel_ids;             /* jobs to hand back (release_jobs) */
    int *rel_attempts;
    int n_rel, cap_rel;
    long cap_budget;              /* free KV tokens for new jobs */
    int cap_slots;                /* more jobs the worker can take */
    bool cap_idle;                /* nothing in the engine, nothing waiting */
    uint64_t cap_consumed;        /* jobs taken from the inbox when the capacity was measured */
    bool draining;                /* stop claiming */
    bool quit;                    /* write what is left, then end */
    double quit_deadline;         /* monotonic seconds: give up writing after this */

    /* database thread -> decoding thread */
    struct wjob *inbox, **inbox_tail;
    uint64_t delivered;           /* jobs ever put into the inbox */
    struct wclaim *stops;         /* claims to stop (cancel requested, or no longer ours): a stale stop spares a newer claim */
    int n_stop, cap_stop;
    bool queue_empty;             /* an idle claim found nothing */
    bool db_up;
    bool taken_over;              /* another process took this worker id over (dspark.heartbeat): stop */
    int unwritten;                /* results the database thread gave up on at quit */
};

struct wctx {
    struct wopts o;
    struct widentity id;
    struct wshared sh;
    struct ds_db *db;             /* owned by the database thread once it runs */
    int job_tokens;               /* KV room a job takes beyond its prompt and output (a speculative block, pages) */
    char *sps_text;               /* the step-time profile registered with the row (JSON; NULL: none) */
};

/* main.c */
/* Register (upsert) the worker's row once on db: dspark.register_worker with its identity. */
int wregister_row(struct wctx *w, struct ds_db *db);

/* dbthread.c */
int wdb_start(struct wctx *w, pthread_t *ret_thread);
/* Wake the database thread (after changing the shared state). */
void wdb_wake(struct wctx *w);
double wnow(void);

/* job.c */
/* Build a struct wjob from one row of the claim query (see WJOB_COLUMNS). */
struct wjob *wjob_from_row(const void *pgresult, int row);
#define WJOB_COLUMNS                                                                               \
    "id, attempt, coalesce(batch_id, 0), model, prompt, messages::text,"                           \
    " array_to_json(prompt_ids)::text, max_tokens, temperature, top_p, top_k, seed,"               \
    " array_to_json(stop)::text, spec_mode,"                                                       \
    " greatest(extract(epoch FROM started_at - greatest(created_at, run_after))::float8, 0)"
/* Turn a job's prompt into token ids (*ret malloc'ed). */
int wjob_tokenize(const struct ds_model *m, const char *name, const struct wjob *j, int32_t **ret, int *ret_n) DS_MUSTCHECK;
/* Fill a request from the job (sampling, stop strings, speculation). The
 * strings and arrays it points to live in *keep (free with wreq_keep_done). */
struct wreq_keep {
    char **stop;
    int n_stop;
    struct ds_spec_mode spec;
};
int wjob_request(const struct wjob *j, struct ds_request *req, struct wreq_keep *keep) DS_MUSTCHECK;
void wreq_keep_done(struct wreq_keep *k);
/* A JSON string from bytes that may not be valid UTF-8 or may hold NULs
 * (each bad byte becomes U+FFFD: PostgreSQL text holds neither). */
json_t *wjson_text(const char *s, size_t len);
/* The finish_jobs item of a job that ended in the engine, or failed before it. */
json_t *wresult_json(const struct widentity *id, const struct wjob *j, const struct ds_result *r, double ttft_extra);
json_t *wfailed_json(const struct widentity *id, const struct wjob *j, const char *error);

/* Logging with the worker id (and job id when > 0) as context. */
void wlog(int level, int64_t job_id, const char *fmt, ...) DS_PRINTF(3, 4);
extern const char *wlog_worker_id;

#endif
