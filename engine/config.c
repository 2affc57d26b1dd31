/* config.c: Hugging Face config.json / generation_config.json for Qwen3 targets
 * and the DeepSpec DSpark/DFlash draft config.json (see ds-config.h and
 * dspark-spec.md §1, §10.4).
 *
 * Keys whose value is JSON null count as absent. Integers must be JSON
 * integers (36, not 36.0); floating-point keys take either. Error codes:
 * DS_EFORMAT for a malformed or inconsistent file, DS_ENOTSUP for a valid
 * setting this engine does not implement (scaled RoPE, sliding windows, other
 * activations), DS_ELIMIT for sizes beyond what the engine accepts, DS_EIO when
 * the file cannot be read, DS_ECONFIG when a draft does not fit its target. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "dspark/ds-config.h"

#define CONFIG_NAME "config.json"
#define GENERATION_NAME "generation_config.json"
#define MAX_CONFIG_BYTES ((size_t)16 << 20)

/* Engine limits on model sizes (not format limits). */
#define MAX_VOCAB (1 << 24)
#define MAX_HIDDEN 65536
#define MAX_INTERMEDIATE (1 << 20)
#define MAX_LAYERS 1024
#define MAX_HEADS 1024
#define MAX_HEAD_DIM 1024
#define MAX_POSITIONS (1 << 30)
#define MAX_BLOCK_SIZE 32
#define MAX_MARKOV_RANK 65536

/* The value of key in obj, NULL when absent or null. */
static json_t *jget(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_null(v) ? NULL : v;
}

/* An integer key in [lo, hi]: a value above hi is DS_ELIMIT when limit is set
 * (an engine limit), else DS_EFORMAT. pfx names an enclosing object ("" or
 * "rope_parameters."). When absent: an error if required, else *out = def. */
static int get_int(const char *fname, json_t *obj, const char *pfx, const char *key,
                   bool required, long long lo, long long hi, bool limit, int def, int *out)
{
    json_t *v = jget(obj, key);
    if (!v) {
        if (required)
            return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' is missing", fname, pfx, key);
        *out = def;
        return 0;
    }
    if (!json_is_integer(v))
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' must be an integer", fname, pfx, key);
    long long x = json_integer_value(v);
    if (x < lo)
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' is %lld, must be at least %lld",
                         fname, pfx, key, x, lo);
    if (x > hi)
        return ds_seterr(limit ? DS_ELIMIT : DS_EFORMAT, "file '%s': key '%s%s' is %lld, "
                         "must be at most %lld", fname, pfx, key, x, hi);
    *out = (int)x;
    return 0;
}

/* A finite number key; *present tells whether it was there. */
static int get_num(const char *fname, json_t *obj, const char *pfx, const char *key,
                   double *out, bool *present)
{
    json_t *v = jget(obj, key);
    *present = v != NULL;
    if (!v)
        return 0;
    if (!json_is_number(v))
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' must be a number", fname, pfx, key);
    double x = json_number_value(v);
    if (!isfinite(x))
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' is not finite", fname, pfx, key);
    *out = x;
    return 0;
}

static int get_bool(const char *fname, json_t *obj, const char *key, bool required, bool def,
                    bool *out)
{
    json_t *v = jget(obj, key);
    if (!v) {
        if (required)
            return ds_seterr(DS_EFORMAT, "file '%s': key '%s' is missing", fname, key);
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v))
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s' must be true or false", fname, key);
    *out = json_is_true(v);
    return 0;
}

/* A string key, NULL when absent. */
static int get_str(const char *fname, json_t *obj, const char *pfx, const char *key,
                   const char **out)
{
    json_t *v = jget(obj, key);
    if (v && !json_is_string(v))
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s%s' must be a string", fname, pfx, key);
    *out = v ? json_string_value(v) : NULL;
    return 0;
}

/* A token id list (an integer or a list of integers, null meaning none) into
 * ids [DS_MAX_EOS]. Ids must lie in [0, hi]. */
static int get_ids(const char *fname, json_t *obj, const char *key, long long hi,
                   int *ids, int *n)
{
    json_t *v = jget(obj, key);
    size_t cnt;
    *n = 0;
    if (!v)
        return 0;
    if (json_is_integer(v))
        cnt = 1;
    else if (json_is_array(v))
        cnt = json_array_size(v);
    else
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s' must be an integer or a list of integers",
                         fname, key);
    if (cnt > DS_MAX_EOS)
        return ds_seterr(DS_ELIMIT, "file '%s': key '%s' lists %zu ids, at most %d are supported",
                         fname, key, cnt, DS_MAX_EOS);
    for (size_t i = 0; i < cnt; i++) {
        json_t *e = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_integer(e))
            return ds_seterr(DS_EFORMAT, "file '%s': key '%s' must be an integer or a list of integers",
                             fname, key);
        long long x = json_integer_value(e);
        if (x < 0 || x > hi)
            return ds_seterr(DS_EFORMAT, "file '%s': key '%s' holds token id %lld, outside [0, %lld]",
                             fname, key, x, hi);
        ids[i] = (int)x;
    }
    *n = (int)cnt;
    return 0;
}

/* A single token id (integer, or the first of a list), -1 when absent. */
static int get_id(const char *fname, json_t *obj, const char *key, long long hi, int *out)
{
    int ids[DS_MAX_EOS], n;
    int r = get_ids(fname, obj, key, hi, ids, &n);
    if (r < 0)
        return r;
    *out = n > 0 ? ids[0] : -1;
    return 0;
}

static int parse_dtype(const char *fname, const char *key, const char *s, enum ds_dtype *out)
{
    if (!s)
        *out = DS_DTYPE_F32;
    else if (strcmp(s, "bfloat16") == 0)
        *out = DS_DTYPE_BF16;
    else if (strcmp(s, "float16") == 0)
        *out = DS_DTYPE_F16;
    else if (strcmp(s, "float32") == 0)
        *out = DS_DTYPE_F32;
    else
        return ds_seterr(DS_ENOTSUP, "file '%s': %s '%s' is not supported (use bfloat16, float16 "
                         "or float32)", fname, key, s);
    return 0;
}

/* The RoPE base from rope_theta or rope_parameters.rope_theta (transformers
 * 5.x); scaled variants are refused. */
static int parse_rope(const char *fname, json_t *root, double *theta)
{
    double top = 0, inner = 0, prf;
    bool have_top, have_inner = false, have_prf;
    const char *type;
    int r;

    if ((r = get_num(fname, root, "", "rope_theta", &top, &have_top)) < 0)
        return r;
    json_t *rp = jget(root, "rope_parameters");
    if (rp) {
        if (!json_is_object(rp))
            return ds_seterr(DS_EFORMAT, "file '%s': key 'rope_parameters' must be an object", fname);
        if ((r = get_str(fname, rp, "rope_parameters.", "rope_type", &type)) < 0)
            return r;
        if (type && strcmp(type, "default") != 0)
            return ds_seterr(DS_ENOTSUP, "file '%s': rope_parameters.rope_type '%s' is not supported "
                             "(only 'default')", fname, type);
        if ((r = get_num(fname, rp, "rope_parameters.", "rope_theta", &inner, &have_inner)) < 0)
            return r;
        if ((r = get_num(fname, rp, "rope_parameters.", "partial_rotary_factor", &prf, &have_prf)) < 0)
            return r;
        if (have_prf && prf != 1.0)
            return ds_seterr(DS_ENOTSUP, "file '%s': rope_parameters.partial_rotary_factor %g is not "
                             "supported (only 1)", fname, prf);
    }
    json_t *rs = jget(root, "rope_scaling");
    if (rs) {
        if (!json_is_object(rs))
            return ds_seterr(DS_EFORMAT, "file '%s': key 'rope_scaling' must be an object or null",
                             fname);
        if ((r = get_str(fname, rs, "rope_scaling.", "rope_type", &type)) < 0)
            return r;
        if (!type && (r = get_str(fname, rs, "rope_scaling.", "type", &type)) < 0)
            return r;
        if (!type || strcmp(type, "default") != 0)
            return ds_seterr(DS_ENOTSUP, "file '%s': rope_scaling of type '%s' is not supported "
                             "(only unscaled RoPE)", fname, type ? type : "(none)");
    }
    if ((r = get_num(fname, root, "", "partial_rotary_factor", &prf, &have_prf)) < 0)
        return r;
    if (have_prf && prf != 1.0)
        return ds_seterr(DS_ENOTSUP, "file '%s': partial_rotary_factor %g is not supported (only 1)",
                         fname, prf);

    if (!have_top && !have_inner)
        return ds_seterr(DS_EFORMAT, "file '%s': key 'rope_theta' is missing (neither 'rope_theta' "
                         "nor 'rope_parameters.rope_theta' is set)", fname);
    if (have_top && have_inner && top != inner)
        return ds_seterr(DS_EFORMAT, "file '%s': rope_theta %g and rope_parameters.rope_theta %g "
                         "disagree", fname, top, inner);
    *theta = have_inner ? inner : top;
    if (!(*theta > 0))
        return ds_seterr(DS_EFORMAT, "file '%s': rope_theta %g must be positive", fname, *theta);
    return 0;
}

static int parse_qwen3(const char *fname, json_t *root, struct ds_qwen3_config *c)
{
    int r;
    const char *s;
    bool b, present;

    memset(c, 0, sizeof *c);

    json_t *arch = jget(root, "architectures");
    if (arch) {
        if (!json_is_array(arch) || json_array_size(arch) == 0 ||
            !json_is_string(json_array_get(arch, 0)))
            return ds_seterr(DS_EFORMAT, "file '%s': key 'architectures' must be a non-empty list "
                             "of strings", fname);
        s = json_string_value(json_array_get(arch, 0));
        if (strlen(s) >= sizeof c->architecture)
            return ds_seterr(DS_EFORMAT, "file '%s': architecture name '%.40s...' is too long",
                             fname, s);
        strcpy(c->architecture, s);
    }

    if ((r = get_int(fname, root, "", "vocab_size", true, 1, MAX_VOCAB, true, 0,
                     &c->vocab_size)) < 0 ||
        (r = get_int(fname, root, "", "hidden_size", true, 1, MAX_HIDDEN, true, 0,
                     &c->hidden_size)) < 0 ||
        (r = get_int(fname, root, "", "intermediate_size", true, 1, MAX_INTERMEDIATE, true, 0,
                     &c->intermediate_size)) < 0 ||
        (r = get_int(fname, root, "", "num_hidden_layers", true, 1, MAX_LAYERS, true, 0,
                     &c->num_hidden_layers)) < 0 ||
        (r = get_int(fname, root, "", "num_attention_heads", true, 1, MAX_HEADS, true, 0,
                     &c->num_attention_heads)) < 0 ||
        (r = get_int(fname, root, "", "num_key_value_heads", true, 1, MAX_HEADS, true, 0,
                     &c->num_key_value_heads)) < 0 ||
        (r = get_int(fname, root, "", "head_dim", false, 1, MAX_HEAD_DIM, true, 0, &c->head_dim)) < 0 ||
        (r = get_int(fname, root, "", "max_position_embeddings", false, 1, MAX_POSITIONS, true,
                     32768, &c->max_position_embeddings)) < 0)
        return r;

    if (c->num_attention_heads % c->num_key_value_heads != 0)
        return ds_seterr(DS_EFORMAT, "file '%s': num_attention_heads %d is not a multiple of "
                         "num_key_value_heads %d", fname, c->num_attention_heads,
                         c->num_key_value_heads);
    if (c->head_dim == 0) {
        if (c->hidden_size % c->num_attention_heads != 0)
            return ds_seterr(DS_EFORMAT, "file '%s': head_dim is absent and hidden_size %d is not a "
                             "multiple of num_attention_heads %d", fname, c->hidden_size,
                             c->num_attention_heads);
        c->head_dim = c->hidden_size / c->num_attention_heads;
    }
    if (c->head_dim % 2 != 0)
        return ds_seterr(DS_EFORMAT, "file '%s': head_dim %d must be even (RoPE rotates pairs)",
                         fname, c->head_dim);

    if ((r = get_num(fname, root, "", "rms_norm_eps", &c->rms_norm_eps, &present)) < 0)
        return r;
    if (!present)
        return ds_seterr(DS_EFORMAT, "file '%s': key 'rms_norm_eps' is missing", fname);
    if (!(c->rms_norm_eps > 0))
        return ds_seterr(DS_EFORMAT, "file '%s': rms_norm_eps %g must be positive", fname,
                         c->rms_norm_eps);
    if ((r = parse_rope(fname, root, &c->rope_theta)) < 0)
        return r;

    if ((r = get_bool(fname, root, "tie_word_embeddings", false, false, &c->tie_word_embeddings)) < 0 ||
        (r = get_bool(fname, root, "attention_bias", false, false, &c->attention_bias)) < 0)
        return r;
    if ((r = get_bool(fname, root, "mlp_bias", false, false, &b)) < 0)
        return r;
    if (b)
        return ds_seterr(DS_ENOTSUP, "file '%s': mlp_bias true is not supported", fname);

    if ((r = get_str(fname, root, "", "hidden_act", &s)) < 0)
        return r;
    if (s && strcmp(s, "silu") != 0)
        return ds_seterr(DS_ENOTSUP, "file '%s': hidden_act '%s' is not supported (only 'silu')",
                         fname, s);

    /* transformers 5.x writes "dtype"; older versions "torch_dtype" */
    const char *dkey = jget(root, "dtype") ? "dtype" : "torch_dtype";
    if ((r = get_str(fname, root, "", dkey, &s)) < 0 ||
        (r = parse_dtype(fname, dkey, s, &c->torch_dtype)) < 0)
        return r;

    if ((r = get_bool(fname, root, "use_sliding_window", false, false, &b)) < 0)
        return r;
    if (b)
        return ds_seterr(DS_ENOTSUP, "file '%s': use_sliding_window true is not supported", fname);
    json_t *lt = jget(root, "layer_types");
    if (lt) {
        if (!json_is_array(lt))
            return ds_seterr(DS_EFORMAT, "file '%s': key 'layer_types' must be a list", fname);
        if (json_array_size(lt) != (size_t)c->num_hidden_layers)
            return ds_seterr(DS_EFORMAT, "file '%s': layer_types has %zu entries for %d layers",
                             fname, json_array_size(lt), c->num_hidden_layers);
        for (size_t i = 0; i < json_array_size(lt); i++) {
            const char *t = json_string_value(json_array_get(lt, i));
            if (!t)
                return ds_seterr(DS_EFORMAT, "file '%s': layer_types[%zu] must be a string", fname, i);
            if (strcmp(t, "full_attention") != 0)
                return ds_seterr(DS_ENOTSUP, "file '%s': layer_types[%zu] '%s' is not supported "
                                 "(only 'full_attention')", fname, i, t);
        }
    }

    if ((r = get_id(fname, root, "bos_token_id", c->vocab_size - 1, &c->bos_token_id)) < 0 ||
        (r = get_ids(fname, root, "eos_token_id", c->vocab_size - 1, c->eos_token_id, &c->n_eos)) < 0)
        return r;
    return 0;
}

/* Parse json [len] into an object root. */
static int load_json(const char *json, size_t len, const char *fname, json_t **ret)
{
    json_error_t jerr;
    json_t *root = json_loadb(json ? json : "", json ? len : 0, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return ds_seterr(DS_EFORMAT, "file '%s' is not valid JSON: %s (line %d, column %d)",
                         fname, jerr.text, jerr.line, jerr.column);
    if (!json_is_object(root)) {
        json_decref(root);
        return ds_seterr(DS_EFORMAT, "file '%s' is not a JSON object", fname);
    }
    *ret = root;
    return 0;
}

/* "DIR/name" when path is a directory, else path itself (malloc'ed). */
static char *resolve(const char *path, const char *name)
{
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        size_t n = strlen(path) + 1 + strlen(name) + 1;
        char *p = ds_xmalloc(n);
        snprintf(p, n, "%s/%s", path, name);
        return p;
    }
    return ds_xstrdup(path);
}

/* Read a whole (small) regular file. *missing, when given, is set instead of
 * failing when the file does not exist. */
static int read_file(const char *path, char **ret, size_t *ret_len, bool *missing)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (missing && errno == ENOENT) {
            *missing = true;
            return 0;
        }
        return ds_seterr(DS_EIO, "could not open file '%s': %s", path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return ds_seterr(DS_EIO, "file '%s' is not a regular file", path);
    }
    if ((uintmax_t)sb.st_size > MAX_CONFIG_BYTES) {
        close(fd);
        return ds_seterr(DS_ELIMIT, "file '%s' is larger than %zu bytes", path, MAX_CONFIG_BYTES);
    }
    size_t cap = (size_t)sb.st_size + 1, len = 0;
    char *buf = ds_xmalloc(cap);
    for (;;) {
        ssize_t got = read(fd, buf + len, cap - len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0) {
            int e = errno;
            close(fd);
            free(buf);
            return ds_seterr(DS_EIO, "could not read file '%s': %s", path, strerror(e));
        }
        if (got == 0)
            break;
        len += (size_t)got;
        if (len == cap) {          /* the file grew while being read */
            if (cap > MAX_CONFIG_BYTES) {
                close(fd);
                free(buf);
                return ds_seterr(DS_ELIMIT, "file '%s' is larger than %zu bytes", path,
                                 MAX_CONFIG_BYTES);
            }
            cap *= 2;
            buf = ds_xrealloc(buf, cap);
        }
    }
    close(fd);
    if (missing)
        *missing = false;
    *ret = buf;
    *ret_len = len;
    return 0;
}

int ds_qwen3_config_parse(const char *json, size_t len, const char *fname,
                          struct ds_qwen3_config *ret)
{
    struct ds_qwen3_config c;
    json_t *root;
    int r = load_json(json, len, fname, &root);
    if (r < 0)
        return r;
    r = parse_qwen3(fname, root, &c);
    json_decref(root);
    if (r < 0)
        return r;
    *ret = c;
    return 0;
}

int ds_qwen3_config_load(const char *path, struct ds_qwen3_config *ret)
{
    char *p = resolve(path, CONFIG_NAME), *buf;
    size_t len;
    int r = read_file(p, &buf, &len, NULL);
    if (r == 0) {
        r = ds_qwen3_config_parse(buf, len, p, ret);
        free(buf);
    }
    free(p);
    return r;
}

/* ------------------------------------------------------------------------ */
/* generation_config.json                                                     */

static void generation_defaults(struct ds_generation_config *g)
{
    memset(g, 0, sizeof *g);
    g->n_eos = 0;
    g->bos_token_id = -1;
    g->pad_token_id = -1;
    g->do_sample = false;
    g->temperature = 1.0;
    g->top_p = 1.0;
    g->top_k = 0;
}

int ds_generation_config_parse(const char *json, size_t len, const char *fname,
                               struct ds_generation_config *ret)
{
    struct ds_generation_config g;
    json_t *root;
    bool present;
    int r = load_json(json, len, fname, &root);
    if (r < 0)
        return r;
    generation_defaults(&g);
    if ((r = get_ids(fname, root, "eos_token_id", INT32_MAX, g.eos_token_id, &g.n_eos)) < 0 ||
        (r = get_id(fname, root, "bos_token_id", INT32_MAX, &g.bos_token_id)) < 0 ||
        (r = get_id(fname, root, "pad_token_id", INT32_MAX, &g.pad_token_id)) < 0 ||
        (r = get_bool(fname, root, "do_sample", false, false, &g.do_sample)) < 0 ||
        (r = get_int(fname, root, "", "top_k", false, 0, INT32_MAX, false, 0, &g.top_k)) < 0)
        goto out;
    if ((r = get_num(fname, root, "", "temperature", &g.temperature, &present)) < 0)
        goto out;
    if (g.temperature < 0) {
        r = ds_seterr(DS_EFORMAT, "file '%s': temperature %g must not be negative", fname,
                      g.temperature);
        goto out;
    }
    if ((r = get_num(fname, root, "", "top_p", &g.top_p, &present)) < 0)
        goto out;
    if (!(g.top_p > 0 && g.top_p <= 1)) {
        r = ds_seterr(DS_EFORMAT, "file '%s': top_p %g must be in (0, 1]", fname, g.top_p);
        goto out;
    }
out:
    json_decref(root);
    if (r < 0)
        return r;
    *ret = g;
    return 0;
}

int ds_generation_config_load(const char *path, struct ds_generation_config *ret)
{
    char *p = resolve(path, GENERATION_NAME), *buf;
    size_t len;
    bool missing;
    int r = read_file(p, &buf, &len, &missing);
    if (r == 0 && missing) {
        generation_defaults(ret);
    } else if (r == 0) {
        r = ds_generation_config_parse(buf, len, p, ret);
        free(buf);
    }
    free(p);
    return r;
}

/* ------------------------------------------------------------------------ */
/* DSpark / DFlash draft config                                               */

static int draft_missing(const char *fname, const struct ds_qwen3_config *base, const char *key)
{
    if (strcmp(base->architecture, "Qwen3ForCausalLM") == 0)
        return ds_seterr(DS_EFORMAT, "file '%s': key '%s' is missing; this is the config of a "
                         "target model ('Qwen3ForCausalLM'), not of a DSpark draft", fname, key);
    return ds_seterr(DS_EFORMAT, "file '%s': key '%s' is missing (a DSpark draft config needs it)",
                     fname, key);
}

static int parse_dspark(const char *fname, json_t *root, struct ds_dspark_config *d)
{
    static const char *const required[] = {
        "num_target_layers", "block_size", "mask_token_id", "target_layer_ids",
        "markov_rank", "enable_confidence_head", "num_anchors",
    };
    int r;

    memset(d, 0, sizeof *d);
    if ((r = parse_qwen3(fname, root, &d->base)) < 0)
        return r;
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        if (!jget(root, required[i]))
            return draft_missing(fname, &d->base, required[i]);
    }

    if ((r = get_int(fname, root, "", "num_target_layers", true, 1, MAX_LAYERS, true, 0,
                     &d->num_target_layers)) < 0 ||
        (r = get_int(fname, root, "", "block_size", true, 1, MAX_BLOCK_SIZE, true, 0,
                     &d->block_size)) < 0 ||
        (r = get_int(fname, root, "", "mask_token_id", true, 0, d->base.vocab_size - 1, false, 0,
                     &d->mask_token_id)) < 0 ||
        (r = get_int(fname, root, "", "markov_rank", true, 0, MAX_MARKOV_RANK, true, 0,
                     &d->markov_rank)) < 0 ||
        (r = get_int(fname, root, "", "num_anchors", true, 0, INT32_MAX, false, 0,
                     &d->num_anchors)) < 0)
        return r;

    json_t *ids = jget(root, "target_layer_ids");
    if (!json_is_array(ids))
        return ds_seterr(DS_EFORMAT, "file '%s': key 'target_layer_ids' must be a list of integers",
                         fname);
    size_t m = json_array_size(ids);
    if (m == 0)
        return ds_seterr(DS_EFORMAT, "file '%s': target_layer_ids is empty", fname);
    if (m > DS_MAX_TARGET_LAYERS)
        return ds_seterr(DS_ELIMIT, "file '%s': target_layer_ids lists %zu layers, at most %d are "
                         "supported", fname, m, DS_MAX_TARGET_LAYERS);
    for (size_t i = 0; i < m; i++) {
        json_t *e = json_array_get(ids, i);
        if (!json_is_integer(e))
            return ds_seterr(DS_EFORMAT, "file '%s': target_layer_ids[%zu] must be an integer",
                             fname, i);
        long long id = json_integer_value(e);
        long long last = d->num_target_layers - 1;
        if (id == last)
            return ds_seterr(DS_ENOTSUP, "file '%s': target_layer_ids[%zu] is %lld, the final layer "
                             "of the %d-layer target, which a draft cannot use (its output is "
                             "replaced by the final norm; use at most %lld)", fname, i, id,
                             d->num_target_layers, last - 1);
        if (id < -1 || id > last)
            return ds_seterr(DS_EFORMAT, "file '%s': target_layer_ids[%zu] is %lld, outside -1..%lld "
                             "for num_target_layers %d", fname, i, id, last - 1,
                             d->num_target_layers);
        if (i > 0 && id <= d->target_layer_ids[i - 1])
            return ds_seterr(DS_EFORMAT, "file '%s': target_layer_ids must be strictly increasing "
                             "(%d then %lld)", fname, d->target_layer_ids[i - 1], id);
        d->target_layer_ids[i] = (int)id;
    }
    d->n_target_layers = (int)m;

    d->markov_head = DS_MARKOV_NONE;
    if (d->markov_rank > 0) {
        const char *type;
        if ((r = get_str(fname, root, "", "markov_head_type", &type)) < 0)
            return r;
        if (!type || strcasecmp(type, "vanilla") == 0)
            d->markov_head = DS_MARKOV_VANILLA;
        else if (strcasecmp(type, "gated") == 0)
            d->markov_head = DS_MARKOV_GATED;
        else if (strcasecmp(type, "rnn") == 0)
            d->markov_head = DS_MARKOV_RNN;
        else
            return ds_seterr(DS_ENOTSUP, "file '%s': markov_head_type '%s' is not supported (use "
                             "'vanilla', 'gated' or 'rnn')", fname, type);
    }

    if ((r = get_bool(fname, root, "enable_confidence_head", true, false,
                      &d->enable_confidence_head)) < 0)
        return r;
    if (d->enable_confidence_head) {
        /* DeepSpec asserts this key exists whenever the head is enabled */
        if ((r = get_bool(fname, root, "confidence_head_with_markov", true, false,
                          &d->confidence_head_with_markov)) < 0)
            return r;
        if (d->confidence_head_with_markov && d->markov_rank == 0)
            return ds_seterr(DS_EFORMAT, "file '%s': confidence_head_with_markov is true but "
                             "markov_rank is 0", fname);
    }
    return 0;
}

int ds_dspark_config_parse(const char *json, size_t len, const char *fname,
                           struct ds_dspark_config *ret)
{
    struct ds_dspark_config d;
    json_t *root;
    int r = load_json(json, len, fname, &root);
    if (r < 0)
        return r;
    r = parse_dspark(fname, root, &d);
    json_decref(root);
    if (r < 0)
        return r;
    *ret = d;
    return 0;
}

int ds_dspark_config_load(const char *path, struct ds_dspark_config *ret)
{
    char *p = resolve(path, CONFIG_NAME), *buf;
    size_t len;
    int r = read_file(p, &buf, &len, NULL);
    if (r == 0) {
        r = ds_dspark_config_parse(buf, len, p, ret);
        free(buf);
    }
    free(p);
    return r;
}

int ds_dspark_config_check(const struct ds_dspark_config *d, const struct ds_qwen3_config *t)
{
    if (d->base.hidden_size != t->hidden_size)
        return ds_seterr(DS_ECONFIG, "draft hidden_size %d does not match the target's %d",
                         d->base.hidden_size, t->hidden_size);
    if (d->base.vocab_size != t->vocab_size)
        return ds_seterr(DS_ECONFIG, "draft vocab_size %d does not match the target's %d",
                         d->base.vocab_size, t->vocab_size);
    if (d->num_target_layers != t->num_hidden_layers)
        return ds_seterr(DS_ECONFIG, "draft was trained for a %d-layer target, but the target has "
                         "%d layers", d->num_target_layers, t->num_hidden_layers);
    if (d->n_target_layers < 1 || d->n_target_layers > DS_MAX_TARGET_LAYERS)
        return ds_seterr(DS_ECONFIG, "draft captures %d target layers, must be 1..%d",
                         d->n_target_layers, DS_MAX_TARGET_LAYERS);
    for (int i = 0; i < d->n_target_layers; i++) {
        int id = d->target_layer_ids[i];
        if (id == t->num_hidden_layers - 1)
            return ds_seterr(DS_ENOTSUP, "draft target layer %d is the final layer of the target, "
                             "which a draft cannot use", id);
        if (id < -1 || id >= t->num_hidden_layers)
            return ds_seterr(DS_ECONFIG, "draft target layer %d is outside -1..%d", id,
                             t->num_hidden_layers - 2);
        if (i > 0 && id <= d->target_layer_ids[i - 1])
            return ds_seterr(DS_ECONFIG, "draft target layer ids are not strictly increasing");
    }
    if (d->mask_token_id < 0 || d->mask_token_id >= t->vocab_size)
        return ds_seterr(DS_ECONFIG, "draft mask_token_id %d is outside the target vocabulary of %d",
                         d->mask_token_id, t->vocab_size);
    return 0;
}
