/* dspark-generate: run the engine on prompts from the command line or a JSONL
 * file and print outputs (text, or one JSON object per prompt with --json),
 * then a summary table on stderr. */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dspark/ds-draft.h"
#include "dspark/ds-engine.h"
#include "dspark/ds-gemm.h"
#include "dspark/ds-model.h"
#include "dspark/ds-sched.h"
#include "dspark/ds-tokenizer.h"
#include "cli-util.h"

struct prompt {
    int32_t *ids;
    int n;
    struct ds_result *result;
};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: dspark-generate --target DIR (--prompt TEXT | --prompt-ids \"1 2 3\" | --prompts FILE.jsonl)\n"
            "                       [options]\n"
            "\n"
            "Generate text with a Qwen3 target model, optionally with a DSpark draft.\n"
            "\n"
            "input:\n"
            "  --target DIR          Hugging Face Qwen3 model directory\n"
            "  --draft DIR           DeepSpec DSpark/DFlash draft directory (enables speculation)\n"
            "  --prompt TEXT         one prompt\n"
            "  --prompt-ids IDS      one prompt as token ids separated by spaces or commas\n"
            "  --prompts FILE        JSONL: {\"turns\": [...]} (first turn), {\"prompt\": ...},\n"
            "                        {\"prompt_ids\": [...]} or an OpenAI Batch request line\n"
            "                        ({\"body\": {\"prompt\" | \"messages\"}}); '-' reads stdin\n"
            "  --chat                render text prompts as a user turn of the chat template\n"
            "                        (non-thinking, with the generation prompt)\n"
            "generation:\n"
            "  --max-tokens N        new tokens per prompt (default 128)\n"
            "  --temperature T       0 = greedy (default 0)\n"
            "  --top-p P             nucleus sampling (default 1)\n"
            "  --top-k K             top-k sampling (default 0 = off)\n"
            "  --seed S              base seed; prompt i uses S + i (default 0)\n"
            "  --stop STR            stop string (repeatable)\n"
            "  --ignore-eos          do not stop at the model's end-of-sequence ids\n"
            "  --spec MODE           none | dspark | dspark-async | fixed:N | threshold:X\n"
            "                        (default dspark with --draft, else none)\n"
            "engine:\n"
            "  --concurrency N       sequences decoded together (default 1)\n"
            "  --threads N           CPU threads (default: all)\n"
            "  --backend B           where target and draft run: auto (default: cuda where a\n"
            "                        GPU exists), cpu or cuda\n"
            "  --device N            CUDA device index (default 0)\n"
            "  --cublas              CUDA: cuBLAS products (faster, not batch-invariant: speculative\n"
            "                        output may then differ from target-only output)\n"
            "  --gemm-ranges N       CUDA: split the products' k (target and draft) into at most\n"
            "                        N ranges (default 0: as many as one row needs to fill the\n"
            "                        GPU; 4 is faster for speculation and batches of 4 or more)\n"
            "  --max-context N       context length (default: the model's)\n"
            "  --sps FILE            load the step-time profile SPS(B) instead of measuring it\n"
            "  --save-sps FILE       write the measured profile\n"
            "  --sps-context N       measure the profile with every sequence at N tokens of context\n"
            "                        (default 128)\n"
            "output:\n"
            "  --json                one JSON object per prompt, in input order\n"
            "  --logits-out FILE     logits of every prompt position, raw f32 in the machine's byte\n"
            "                        order [prompt_tokens, vocab], prompts concatenated in order\n"
            "                        (a failed prompt writes none)\n"
            "  --trace FILE          one JSON line per round and sequence (with --draft): drafts,\n"
            "                        raw confidence logits, the draft's probability of each draft\n"
            "                        (null for drafts sampled on the GPU), the calibrated prefix\n"
            "                        survival the scheduler used, verify length, accepted count,\n"
            "                        committed ids\n"
            "  --round-log FILE      one JSON line per round: the target pass's tokens, sequences that\n"
            "                        drafted, seconds in the draft phase, the pass and the rest, and\n"
            "                        the profile's seconds for that pass\n"
            "  --sync-rounds         (with --round-log) each round and pass waits for the GPU at its\n"
            "                        end, so that a phase's time is its own work; slower\n"
            "  --quiet               no summary table\n"
            "  -h, --help            this help\n"
            "  -V, --version         the version\n");
}

static int parse_ids(const char *s, int32_t **ret, int *ret_n)
{
    int cap = 16, n = 0;
    int32_t *ids = ds_xmalloc((size_t)cap * sizeof *ids);
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n')
            p++;
        if (!*p)
            break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX) {
            free(ids);
            return ds_seterr(DS_EINVAL, "bad token id near '%.20s'", p);
        }
        if (n == cap)
            ids = ds_xrealloc(ids, (size_t)(cap *= 2) * sizeof *ids);
        ids[n++] = (int32_t)v;
        p = end;
    }
    *ret = ids;
    *ret_n = n;
    return 0;
}

/* Turn one text prompt into ids (chat-rendered when asked). */
static int encode_text(const struct ds_tokenizer *tok, const char *text, bool chat, int32_t **ids, int *n)
{
    if (!tok)
        return ds_seterr(DS_EINVAL, "the target has no tokenizer.json: give token ids instead of text");
    char *rendered = NULL;
    int r;
    if (chat) {
        struct ds_chat_message msg = {"user", text};
        if ((r = ds_chat_render(&msg, 1, true, false, &rendered)) < 0)
            return r;
        text = rendered;
    }
    size_t nn;
    r = ds_tokenizer_encode(tok, text, strlen(text), ids, &nn);
    free(rendered);
    if (r == 0)
        *n = (int)nn;
    return r;
}

/* Chat messages [{role, content}] rendered with the chat template (non-thinking); a content is a string
 * or text parts, as dsparkctl reads them (ds_chat_content_text). */
static int encode_messages(const struct ds_tokenizer *tok, json_t *msgs, int32_t **ids, int *n)
{
    size_t nm = json_array_size(msgs);
    if (nm == 0)
        return ds_seterr(DS_EFORMAT, "\"messages\" is empty");
    struct ds_chat_message *m = ds_xcalloc(nm, sizeof *m);
    char **contents = ds_xcalloc(nm, sizeof *contents);
    int r = 0;
    for (size_t i = 0; i < nm && r == 0; i++) {
        json_t *e = json_array_get(msgs, i);
        const char *why = NULL;
        long part = -1;
        m[i].role = json_string_value(json_object_get(e, "role"));
        m[i].content = contents[i] = ds_chat_content_text(json_object_get(e, "content"), &why, &part);
        if (!m[i].role)
            r = ds_seterr(DS_EFORMAT, "messages[%zu] needs a string \"role\"", i);
        else if (!contents[i] && part >= 0)
            r = ds_seterr(DS_EFORMAT, "messages[%zu].content[%ld]: %s", i, part, why);
        else if (!contents[i])
            r = ds_seterr(DS_EFORMAT, "messages[%zu].content: %s", i, why);
    }
    char *text = NULL;
    if (r == 0)
        r = ds_chat_render(m, nm, true, false, &text);
    for (size_t i = 0; i < nm; i++)
        free(contents[i]);
    free(contents);
    free(m);
    if (r < 0)
        return r;
    r = encode_text(tok, text, false, ids, n);
    free(text);
    return r;
}

static int read_prompts(const char *path, const struct ds_tokenizer *tok, bool chat, struct prompt **ret,
                        int *ret_n)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "r");
    if (!f)
        return ds_seterr(DS_EIO, "could not open '%s': %s", path, strerror(errno));
    struct prompt *ps = NULL;
    int n = 0, cap = 0, lineno = 0, r = 0;
    char *line = NULL;
    size_t lcap = 0;
    ssize_t len;
    while ((len = getline(&line, &lcap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = 0;
        if (lineno == 1 && len >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) {   /* a byte order mark */
            memmove(line, line + 3, (size_t)len - 2);
            len -= 3;
        }
        size_t sp = strspn(line, " \t");
        if ((ssize_t)sp == len)
            continue;   /* blank, as dsparkctl submit -f skips */
        json_error_t jerr;
        json_t *o = json_loadb(line, (size_t)len, 0, &jerr);
        if (!o || !json_is_object(o)) {
            json_decref(o);
            r = ds_seterr(DS_EFORMAT, "'%s' line %d: not a JSON object (%s)", path, lineno,
                          o ? "wrong type" : jerr.text);
            break;
        }
        if (n == cap)
            ps = ds_xrealloc(ps, (size_t)(cap = cap ? 2 * cap : 64) * sizeof *ps);
        struct prompt *p = &ps[n];
        memset(p, 0, sizeof *p);
        json_t *turns = json_object_get(o, "turns"), *prompt = json_object_get(o, "prompt"),
               *pids = json_object_get(o, "prompt_ids"), *body = json_object_get(o, "body");
        if (json_is_object(body)) {
            /* an OpenAI Batch request line: body.prompt, or body.messages rendered as chat */
            prompt = json_object_get(body, "prompt");
            json_t *msgs = json_object_get(body, "messages");
            if (!json_is_string(prompt) && json_is_array(msgs))
                r = encode_messages(tok, msgs, &p->ids, &p->n);
            else if (!json_is_string(prompt))
                r = ds_seterr(DS_EFORMAT, "\"body\" has neither a \"prompt\" string nor \"messages\"");
            else
                r = encode_text(tok, json_string_value(prompt), chat, &p->ids, &p->n);
        } else if (json_is_array(turns) && json_array_size(turns) > 0 && json_is_string(json_array_get(turns, 0))) {
            r = encode_text(tok, json_string_value(json_array_get(turns, 0)), chat, &p->ids, &p->n);
        } else if (json_is_string(prompt)) {
            r = encode_text(tok, json_string_value(prompt), chat, &p->ids, &p->n);
        } else if (json_is_array(pids)) {
            p->n = (int)json_array_size(pids);
            p->ids = ds_xmalloc((size_t)(p->n + 1) * sizeof *p->ids);
            for (int i = 0; i < p->n && r == 0; i++) {
                json_t *v = json_array_get(pids, (size_t)i);
                if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > INT32_MAX)
                    r = ds_seterr(DS_EFORMAT, "prompt_ids[%d] is not a token id", i);
                else
                    p->ids[i] = (int32_t)json_integer_value(v);
            }
        } else {
            r = ds_seterr(DS_EFORMAT, "expected \"turns\", \"prompt\" or \"prompt_ids\"");
        }
        json_decref(o);
        if (r < 0) {
            free(p->ids);
            ds_prefixerr(r, "'%s' line %d", path, lineno);
            break;
        }
        n++;
    }
    if (r == 0 && ferror(f))
        r = ds_seterr(DS_EIO, "could not read '%s': %s", path, strerror(errno));
    free(line);
    if (f != stdin)
        fclose(f);
    if (r < 0) {
        for (int i = 0; i < n; i++)
            free(ps[i].ids);
        free(ps);
        return r;
    }
    if (n == 0) {
        free(ps);
        return ds_seterr(DS_EFORMAT, "'%s' holds no prompts", path);
    }
    *ret = ps;
    *ret_n = n;
    return 0;
}

/* (gamma: the draft's block size, 0 without one: a failed prompt's line has the
 * draft fields too, with nothing counted) */
static json_t *result_json(const struct prompt *p, int index, int gamma)
{
    const struct ds_result *r = p->result;
    json_t *o = json_object();
    json_object_set_new(o, "index", json_integer(index));
    json_t *ids = json_array();
    for (int i = 0; i < r->n_ids; i++)
        json_array_append_new(ids, json_integer(r->ids[i]));
    json_object_set_new(o, "output_ids", ids);
    if (r->text)
        json_object_set_new(o, "output_text", ds_json_text(r->text, r->text_len));
    json_object_set_new(o, "prompt_tokens", json_integer(p->n));
    json_object_set_new(o, "output_tokens", json_integer(r->n_ids));
    json_object_set_new(o, "finish_reason", json_string(r->finish_reason));
    /* (a speed needs two tokens: the time runs from the first to the last) */
    json_object_set_new(o, "tokens_per_s", r->n_ids >= 2 ? json_real(r->stats.decode_tokens_per_s) : json_null());
    json_object_set_new(o, "time_to_first_token", r->n_ids > 0 ? json_real(r->stats.time_to_first_token_s) : json_null());
    json_object_set_new(o, "e2e_latency", r->error && r->n_ids == 0 ? json_null() : json_real(r->stats.e2e_latency_s));
    int block = r->stats.block_size > 0 ? r->stats.block_size : gamma;
    if (block > DS_MAX_BLOCK)
        block = DS_MAX_BLOCK;
    if (block > 0) {
        json_object_set_new(o, "rounds", json_integer(r->stats.rounds));
        json_object_set_new(o, "num_draft_tokens", json_integer(r->stats.num_draft_tokens));
        json_object_set_new(o, "num_verified_tokens", json_integer(r->stats.num_verified_tokens));
        json_object_set_new(o, "num_accepted_tokens", json_integer(r->stats.num_accepted_tokens));
        json_object_set_new(o, "mean_acceptance_length",
                            r->stats.rounds > 0 ? json_real(r->stats.mean_acceptance_length) : json_null());
        json_t *acc = json_array();
        for (int k = 0; k < block; k++) {
            int v = r->stats.verified_by_position[k];
            json_array_append_new(acc, v > 0 ? json_real((double)r->stats.accepted_by_position[k] / v) : json_null());
        }
        json_object_set_new(o, "acceptance_by_position", acc);
        /* conditional: accepted at k given 1..k-1 accepted (the paper's per-position rate) */
        json_t *cond = json_array();
        for (int k = 0; k < block; k++) {
            int v = r->stats.reached_by_position[k];
            json_array_append_new(cond, v > 0 ? json_real((double)r->stats.accepted_by_position[k] / v) : json_null());
        }
        json_object_set_new(o, "conditional_acceptance_by_position", cond);
    }
    if (r->error)
        json_object_set_new(o, "error", json_string(r->error_detail));
    return o;
}

/* The aggregate table printed at the end. */
static void print_summary(FILE *f, const struct ds_draft *draft, const struct ds_spec_mode *spec,
                          const struct prompt *ps, int n, double t_load, double t_total, long total_out,
                          const struct ds_engine_time *tm)
{
    long prompt_tokens = 0, rounds = 0, drafted = 0, verified = 0, accepted = 0, emitted = 0;
    long ver_pos[DS_MAX_BLOCK] = {0}, acc_pos[DS_MAX_BLOCK] = {0}, reach_pos[DS_MAX_BLOCK] = {0};
    int gamma = 0, generated = 0;   /* generated: the prompts that did not fail */
    double ttft = 0;
    for (int i = 0; i < n; i++) {
        const struct ds_result *r = ps[i].result;
        if (!r || r->error)
            continue;
        const struct ds_seq_stats *st = &r->stats;
        generated++;
        prompt_tokens += ps[i].n;
        ttft += st->time_to_first_token_s;
        rounds += st->rounds;
        drafted += st->num_draft_tokens;
        verified += st->num_verified_tokens;
        accepted += st->num_accepted_tokens;
        emitted += (long)llround(st->mean_acceptance_length * st->rounds);
        gamma = st->block_size > gamma ? st->block_size : gamma;
        for (int k = 0; k < st->block_size; k++) {
            ver_pos[k] += st->verified_by_position[k];
            acc_pos[k] += st->accepted_by_position[k];
            reach_pos[k] += st->reached_by_position[k];
        }
    }
    char mode[64];
    ds_spec_mode_format(spec, mode, sizeof mode);
    fprintf(f, "\n%-28s %s\n", "speculation", draft ? mode : "none (no draft)");
    fprintf(f, "%-28s %d\n", "prompts", n);
    if (generated < n)
        fprintf(f, "%-28s %d\n", "failed prompts", n - generated);
    fprintf(f, "%-28s %ld\n", "prompt tokens", prompt_tokens);
    fprintf(f, "%-28s %ld\n", "output tokens", total_out);
    fprintf(f, "%-28s %.2f s\n", "load time", t_load);
    fprintf(f, "%-28s %.2f s\n", "generation time", t_total);
    fprintf(f, "%-28s %.1f\n", "output tokens/s", t_total > 0 ? total_out / t_total : 0);
    fprintf(f, "%-28s %.3f s\n", "mean time to first token", generated > 0 ? ttft / generated : 0);
    if (tm->steps > 0) {
        double st = tm->step_s > 0 ? tm->step_s : 1, rest = tm->step_s - tm->pass_s - tm->draft_s;
        fprintf(f, "%-28s %ld (%ld drafting)\n", "engine steps", tm->steps, tm->drafting_steps);
        fprintf(f, "%-28s %.3f s (%.0f %% of the steps)\n", "  in target passes", tm->pass_s, 100 * tm->pass_s / st);
        if (draft)
            fprintf(f, "%-28s %.3f s (%.0f %%)\n", "  in draft phases", tm->draft_s, 100 * tm->draft_s / st);
        fprintf(f, "%-28s %.3f s (%.0f %%)\n", "  in the rest", rest, 100 * rest / st);
        if (tm->profile_pass_s > 0)
            fprintf(f, "%-28s %.3f s\n", "  the profile's passes", tm->profile_pass_s);
    }
    if (draft && rounds > 0) {
        fprintf(f, "%-28s %ld\n", "rounds", rounds);
        fprintf(f, "%-28s %.3f\n", "mean acceptance length (tau)", (double)emitted / rounds);
        fprintf(f, "%-28s %.3f\n", "mean verify length", (double)verified / rounds);
        fprintf(f, "%-28s %ld / %ld / %ld\n", "drafted / verified / accepted", drafted, verified, accepted);
        fprintf(f, "acceptance by position: accepted / verified, and conditional on 1..k-1 accepted\n");
        for (int k = 0; k < gamma; k++)
            fprintf(f, "  %2d  %8ld / %-8ld %6.3f   conditional %6.3f\n", k + 1, acc_pos[k], ver_pos[k],
                    ver_pos[k] ? (double)acc_pos[k] / ver_pos[k] : 0.0,
                    reach_pos[k] ? (double)acc_pos[k] / reach_pos[k] : 0.0);
    }
}

int main(int argc, char **argv)
{
    const char *target_dir = NULL, *draft_dir = NULL, *prompt_text = NULL, *prompt_ids = NULL,
               *prompts_file = NULL, *logits_out = NULL, *trace_file = NULL, *spec_text = NULL,
               *sps_file = NULL, *save_sps = NULL, *round_log_file = NULL;
    bool chat = false, json_out = false, quiet = false, ignore_eos = false;
    int max_tokens = 128, top_k = 0, concurrency = 1, threads = 0, max_context = 0, device = 0;
    const char *backend_text = "auto";
    bool cublas = false, sync_rounds = false;
    int sps_context = 128, gemm_ranges = 0;
    double temperature = 0, top_p = 1;
    unsigned long long seed = 0;
    const char **stops = NULL;
    int n_stops = 0;
    enum { O_TARGET = 256, O_DRAFT, O_PROMPT, O_PROMPT_IDS, O_PROMPTS, O_CHAT, O_MAX_TOKENS, O_TEMP, O_TOP_P,
           O_TOP_K, O_SEED, O_STOP, O_IGNORE_EOS, O_SPEC, O_CONC, O_THREADS, O_MAXCTX, O_JSON, O_LOGITS,
           O_TRACE, O_QUIET, O_SPS, O_SAVE_SPS, O_BACKEND, O_DEVICE, O_CUBLAS, O_SPS_CONTEXT, O_ROUND_LOG,
           O_SYNC_ROUNDS, O_GEMM_RANGES };
    static const struct option longopts[] = {
        {"target", required_argument, NULL, O_TARGET}, {"draft", required_argument, NULL, O_DRAFT},
        {"prompt", required_argument, NULL, O_PROMPT}, {"prompt-ids", required_argument, NULL, O_PROMPT_IDS},
        {"prompts", required_argument, NULL, O_PROMPTS}, {"chat", no_argument, NULL, O_CHAT},
        {"max-tokens", required_argument, NULL, O_MAX_TOKENS}, {"temperature", required_argument, NULL, O_TEMP},
        {"top-p", required_argument, NULL, O_TOP_P}, {"top-k", required_argument, NULL, O_TOP_K},
        {"seed", required_argument, NULL, O_SEED}, {"stop", required_argument, NULL, O_STOP},
        {"ignore-eos", no_argument, NULL, O_IGNORE_EOS}, {"spec", required_argument, NULL, O_SPEC},
        {"concurrency", required_argument, NULL, O_CONC}, {"threads", required_argument, NULL, O_THREADS},
        {"max-context", required_argument, NULL, O_MAXCTX}, {"json", no_argument, NULL, O_JSON},
        {"logits-out", required_argument, NULL, O_LOGITS}, {"trace", required_argument, NULL, O_TRACE},
        {"quiet", no_argument, NULL, O_QUIET}, {"sps", required_argument, NULL, O_SPS},
        {"backend", required_argument, NULL, O_BACKEND}, {"device", required_argument, NULL, O_DEVICE},
        {"cublas", no_argument, NULL, O_CUBLAS}, {"sps-context", required_argument, NULL, O_SPS_CONTEXT},
        {"round-log", required_argument, NULL, O_ROUND_LOG}, {"sync-rounds", no_argument, NULL, O_SYNC_ROUNDS},
        {"gemm-ranges", required_argument, NULL, O_GEMM_RANGES}, {"save-sps", required_argument, NULL, O_SAVE_SPS},
        {"help", no_argument, NULL, 'h'}, {"version", no_argument, NULL, 'V'}, {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "hV", longopts, NULL)) != -1) {
        switch (c) {
        case O_TARGET: target_dir = optarg; break;
        case O_DRAFT: draft_dir = optarg; break;
        case O_PROMPT: prompt_text = optarg; break;
        case O_PROMPT_IDS: prompt_ids = optarg; break;
        case O_PROMPTS: prompts_file = optarg; break;
        case O_CHAT: chat = true; break;
        case O_MAX_TOKENS: max_tokens = ds_cli_int("--max-tokens", optarg, 1, 1 << 24); break;
        case O_TEMP: temperature = ds_cli_double("--temperature", optarg, 0, 100); break;
        case O_TOP_P: top_p = ds_cli_double("--top-p", optarg, 1e-9, 1); break;
        case O_TOP_K: top_k = ds_cli_int("--top-k", optarg, 0, 1 << 24); break;
        case O_SEED: seed = ds_cli_u64("--seed", optarg); break;
        case O_STOP:
            stops = ds_xrealloc(stops, (size_t)(n_stops + 1) * sizeof *stops);
            stops[n_stops++] = optarg;
            break;
        case O_IGNORE_EOS: ignore_eos = true; break;
        case O_SPEC: spec_text = optarg; break;
        case O_CONC: concurrency = ds_cli_int("--concurrency", optarg, 1, 4096); break;
        case O_THREADS: threads = ds_cli_int("--threads", optarg, 1, DS_POOL_MAX_THREADS); break;
        case O_BACKEND: backend_text = optarg; break;
        case O_DEVICE: device = ds_cli_int("--device", optarg, 0, 1024); break;
        case O_CUBLAS: cublas = true; break;
        case O_GEMM_RANGES: gemm_ranges = ds_cli_int("--gemm-ranges", optarg, 0, 64); break;
        case O_MAXCTX: max_context = ds_cli_int("--max-context", optarg, 1, 1 << 24); break;
        case O_JSON: json_out = true; break;
        case O_LOGITS: logits_out = optarg; break;
        case O_TRACE: trace_file = optarg; break;
        case O_QUIET: quiet = true; break;
        case O_SPS: sps_file = optarg; break;
        case O_SAVE_SPS: save_sps = optarg; break;
        case O_SPS_CONTEXT: sps_context = ds_cli_int("--sps-context", optarg, 1, 1 << 20); break;
        case O_ROUND_LOG: round_log_file = optarg; break;
        case O_SYNC_ROUNDS: sync_rounds = true; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("dspark-generate (dspark) %s\n", PACKAGE_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "dspark-generate: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!target_dir || (!!prompt_text + !!prompt_ids + !!prompts_file) != 1) {
        fprintf(stderr, "dspark-generate: give --target and exactly one of --prompt, --prompt-ids, --prompts\n");
        usage(stderr);
        return 2;
    }
    if (trace_file && !draft_dir) {
        fprintf(stderr, "dspark-generate: --trace needs --draft\n");
        return 2;
    }
    /* every bad option value is a usage error (2), found before anything loads */
    struct ds_spec_mode spec = {.kind = draft_dir ? DS_SPEC_DSPARK : DS_SPEC_NONE};
    if (spec_text && ds_spec_mode_parse(spec_text, &spec) < 0) {
        fprintf(stderr, "dspark-generate: --spec: %s\n", ds_errdetail());
        return 2;
    }

    struct ds_model *model = NULL;
    struct ds_draft *draft = NULL;
    struct ds_engine *engine = NULL;
    enum ds_backend backend;
    if (ds_backend_parse(backend_text, &backend) < 0) {
        fprintf(stderr, "dspark-generate: --backend: %s\n", ds_errdetail());
        return 2;
    }
    /* the GPU reads the layers from the checkpoint itself: the host keeps only what the draft shares */
    struct ds_model_opts mopts = {.load_tokenizer = true, .skip_layers = backend == DS_BACKEND_CUDA};
    double t0 = ds_cli_now();
    if (ds_model_load(target_dir, &mopts, &model) < 0)
        return ds_cli_fail("dspark-generate");
    if (draft_dir && ds_draft_load(draft_dir, model, &draft) < 0)
        return ds_cli_fail("dspark-generate");
    double t_load = ds_cli_now() - t0;

    struct prompt *ps = NULL;
    int n_prompts = 0, r = 0;
    if (prompts_file) {
        r = read_prompts(prompts_file, model->tok, chat, &ps, &n_prompts);
    } else {
        ps = ds_xcalloc(1, sizeof *ps);
        n_prompts = 1;
        r = prompt_text ? encode_text(model->tok, prompt_text, chat, &ps[0].ids, &ps[0].n)
                        : parse_ids(prompt_ids, &ps[0].ids, &ps[0].n);
    }
    if (r < 0)
        return ds_cli_fail("dspark-generate");

    struct ds_engine_opts eopts = {.backend = backend, .device = device, .cublas = cublas, .cuda_graphs = true,
                                   .gemm_ranges = gemm_ranges, .n_threads = threads, .max_seqs = concurrency,
                                   .max_context = max_context, .spec = spec};
    if (ds_engine_new(model, draft, &eopts, &engine) < 0)
        return ds_cli_fail("dspark-generate");
    ds_engine_release_draft_weights(engine);   /* with CUDA the draft runs from its GPU copy */
    if (draft) {
        /* the dspark schedulers price verification with the step-time curve */
        struct ds_sps table;
        if (sps_file) {
            if (ds_sps_load(sps_file, &table) < 0 || ds_engine_set_sps(engine, &table) < 0)
                return ds_cli_fail("dspark-generate");
            ds_sps_done(&table);
        } else if (spec.kind == DS_SPEC_DSPARK || spec.kind == DS_SPEC_DSPARK_ASYNC || save_sps) {
            if (ds_engine_profile_sps(engine, sps_context, 3) < 0)
                return ds_cli_fail("dspark-generate");
        }
        if (save_sps && ds_sps_save(ds_engine_sps(engine), save_sps) < 0)
            return ds_cli_fail("dspark-generate");
    }
    FILE *trace = NULL;
    if (trace_file) {
        if (!(trace = fopen(trace_file, "w"))) {
            fprintf(stderr, "dspark-generate: could not open '%s': %s\n", trace_file, strerror(errno));
            return 1;
        }
        ds_engine_set_trace(engine, trace);
    }
    FILE *round_log = NULL;
    if (round_log_file) {
        if (!(round_log = fopen(round_log_file, "w"))) {
            fprintf(stderr, "dspark-generate: could not open '%s': %s\n", round_log_file, strerror(errno));
            return 1;
        }
        ds_engine_set_round_log(engine, round_log, sync_rounds);
    }
    FILE *logits_f = NULL;
    if (logits_out && !(logits_f = fopen(logits_out, "wb"))) {
        fprintf(stderr, "dspark-generate: could not open '%s': %s\n", logits_out, strerror(errno));
        return 1;
    }

    int32_t no_stop = -1;
    int next_submit = 0, next_print = 0, failed = 0;
    long total_out = 0;
    double t_gen = ds_cli_now();
    while (next_print < n_prompts) {
        while (next_submit < n_prompts && ds_engine_active(engine) < concurrency) {
            struct prompt *p = &ps[next_submit];
            struct ds_request req = {
                .prompt = p->ids, .n_prompt = p->n, .max_tokens = max_tokens,
                .sampling = {.temperature = (float)temperature, .top_p = (float)top_p, .top_k = top_k,
                             .seed = seed + (unsigned long long)next_submit},
                .stop = stops, .n_stop = n_stops, .prompt_logits = logits_f != NULL, .user = p,
            };
            if (ignore_eos) {
                req.stop_ids = &no_stop;
                req.n_stop_ids = 0;
            }
            int id;
            if (ds_engine_submit(engine, &req, &id) < 0) {
                /* a bad prompt fails alone */
                struct ds_result *res = ds_xcalloc(1, sizeof *res);
                res->finish_reason = "error";
                res->error = -DS_EINVAL;
                snprintf(res->error_detail, sizeof res->error_detail, "%s", ds_errdetail());
                res->ids = ds_xmalloc(sizeof *res->ids);
                p->result = res;
            }
            next_submit++;
        }
        if (ds_engine_active(engine) > 0 && ds_engine_step(engine) < 0)
            return ds_cli_fail("dspark-generate");
        struct ds_result *fin[64];
        int nf;
        while ((nf = ds_engine_take_finished(engine, fin, 64)) > 0)
            for (int i = 0; i < nf; i++)
                ((struct prompt *)fin[i]->user)->result = fin[i];
        while (next_print < n_prompts && ps[next_print].result) {
            struct prompt *p = &ps[next_print];
            struct ds_result *res = p->result;
            if (res->error) {
                failed++;
                fprintf(stderr, "dspark-generate: prompt %d: %s\n", next_print, res->error_detail);
            }
            total_out += res->n_ids;
            if (logits_f && res->prompt_logits &&
                fwrite(res->prompt_logits, sizeof(float) * (size_t)model->cfg.vocab_size, (size_t)p->n, logits_f) !=
                    (size_t)p->n) {
                fprintf(stderr, "dspark-generate: could not write '%s': %s\n", logits_out, strerror(errno));
                return 1;
            }
            if (json_out) {
                json_t *o = result_json(p, next_print, draft ? ds_draft_config(draft)->block_size : 0);
                json_dumpf(o, stdout, JSON_COMPACT);
                fputc('\n', stdout);
                json_decref(o);
            } else if (res->text) {
                fwrite(res->text, 1, res->text_len, stdout);
                fputc('\n', stdout);
            } else {
                for (int i = 0; i < res->n_ids; i++)
                    printf("%s%d", i ? " " : "", res->ids[i]);
                fputc('\n', stdout);
            }
            fflush(stdout);
            next_print++;
        }
    }
    double t_total = ds_cli_now() - t_gen;
    if (!quiet) {
        struct ds_engine_time tm;
        ds_engine_time(engine, &tm);
        print_summary(stderr, draft, &spec, ps, n_prompts, t_load, t_total, total_out, &tm);
    }
    if (logits_f && fclose(logits_f) != 0) {
        fprintf(stderr, "dspark-generate: could not write '%s': %s\n", logits_out, strerror(errno));
        return 1;
    }
    /* (a full disk shows at the last writes: each file's close, and stdout's flush) */
    if (round_log && fclose(round_log) != 0) {
        fprintf(stderr, "dspark-generate: could not write '%s': %s\n", round_log_file, strerror(errno));
        failed = 1;
    }
    if (trace && fclose(trace) != 0) {
        fprintf(stderr, "dspark-generate: could not write '%s': %s\n", trace_file, strerror(errno));
        failed = 1;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "dspark-generate: could not write the output: %s\n", strerror(errno));
        failed = 1;
    }
    for (int i = 0; i < n_prompts; i++) {
        free(ps[i].ids);
        ds_result_free(ps[i].result);
    }
    free(ps);
    free(stops);
    ds_engine_free(engine);
    ds_draft_free(draft);
    ds_model_free(model);
    return failed ? 1 : 0;
}
