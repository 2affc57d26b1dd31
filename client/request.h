/* request.h: generation requests as dsparkctl reads them (OpenAI Batch JSONL
 * lines, DeepSpec {"turns": [...]} lines, or one prompt), validated with the
 * same rules as the database, and written as COPY rows. */
#ifndef DS_CTL_REQUEST_H
#define DS_CTL_REQUEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-buf.h"

/* Bounds shared with sql/001-schema.sql. */
#define CTL_MAX_TOKENS_MAX 1000000
#define CTL_TEMPERATURE_MAX 100.0
#define CTL_STOP_MAX 16
#define CTL_STOP_BYTES_MAX 256
#define CTL_CUSTOM_ID_BYTES_MAX 512
#define CTL_MODEL_BYTES_MAX 256
#define CTL_PROMPT_IDS_MAX 1000000
#define CTL_PROMPT_BYTES_MAX 16777216   /* a prompt, or chat messages as JSON */

/* Sampling parameters, and the defaults a line or a prompt falls back to. */
struct ctl_params {
    const char *model;      /* borrowed in defaults; NULL = none */
    int64_t max_tokens;
    double temperature;
    double top_p;
    int64_t top_k;
    bool has_seed;
    int64_t seed;
    char **stop;            /* borrowed in defaults */
    size_t nstop;
};

/* The database defaults (sql/001-schema.sql). */
void ctl_params_init(struct ctl_params *p);
/* "" when valid, else a message naming the parameter ("max_tokens must be ..."). */
const char *ctl_params_check(const struct ctl_params *p, char *buf, size_t size);

/* One job, normalized. Strings are owned (ctl_request_done frees them). */
struct ctl_request {
    char *custom_id;      /* NULL = none */
    char *model;
    char *prompt;         /* exactly one of prompt, messages, prompt_ids */
    char *messages;       /* compact JSON array of {"role","content"} */
    int64_t *prompt_ids;
    size_t nprompt_ids;
    int64_t max_tokens;
    double temperature, top_p;
    int64_t top_k;
    bool has_seed;
    int64_t seed;
    char **stop;
    size_t nstop;
};

void ctl_request_done(struct ctl_request *r);

/* Parse one JSONL line (OpenAI Batch request or DeepSpec turns) into *ret.
 * lineno is used for the default custom_id of turns lines ("line-N").
 * On error returns -1 and writes a message without the line prefix to err
 * ("body.max_tokens: must be an integer between 1 and 1000000, got -5"). */
int ctl_request_parse_line(const char *line, size_t len, long lineno,
                           const struct ctl_params *defaults, struct ctl_request *ret,
                           char *err, size_t errsize);

/* A request for one prompt: as a user message when chat (with an optional
 * system message), else raw text. -1 with a message on error. */
int ctl_request_from_prompt(const char *prompt, bool chat, const char *system,
                            const struct ctl_params *params, struct ctl_request *ret,
                            char *err, size_t errsize);

/* Append the request as one row of COPY text format, columns:
 * seq custom_id model prompt messages prompt_ids max_tokens temperature top_p
 * top_k seed stop. */
void ctl_request_copy_row(const struct ctl_request *r, long seq, struct ds_buf *out);
#define CTL_COPY_COLUMNS \
    "seq, custom_id, model, prompt, messages, prompt_ids, max_tokens, temperature, " \
    "top_p, top_k, seed, stop"

#endif
