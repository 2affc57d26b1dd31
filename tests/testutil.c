/* testutil.c: helpers for the C tests (see testutil.h). */
#include "config.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

const char *ds_test_path(const char *rel)
{
    static _Thread_local char buf[8][4096];
    static _Thread_local int slot;
    const char *src = getenv("DS_SRCDIR");
    char *b = buf[slot++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", src && *src ? src : DS_SRCDIR, rel);
    return b;
}

char *ds_test_tmpdir(void)
{
    const char *t = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/dspark-test-XXXXXX", t && *t ? t : "/tmp");
    char *d = mkdtemp(tmpl);
    return d ? strdup(d) : NULL;
}

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb; (void)flag; (void)ftw;
    return remove(p);
}

void ds_test_rmtree(const char *dir)
{
    if (dir)
        nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

char *ds_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (buf) {
        buf[n] = 0;
        if (len)
            *len = (size_t)n;
    }
    return buf;
}

int ds_test_write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = fwrite(data, 1, len, f);
    return fclose(f) == 0 && w == len ? 0 : -1;
}

void ds_test_skip_all(const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    printf("1..0 # SKIP %s\n", msg);
    fprintf(stderr, "SKIPPED: %s\n", msg);
    exit(0);
}

const char *ds_test_qwen3_tokenizer(void)
{
    static char buf[4096];
    const char *e = getenv("DS_QWEN3_TOKENIZER");
    if (e && *e)
        return access(e, R_OK) == 0 ? e : NULL;
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    if (xdg && *xdg)
        snprintf(buf, sizeof buf, "%s/dspark/qwen3/tokenizer.json", xdg);
    else
        snprintf(buf, sizeof buf, "%s/.cache/dspark/qwen3/tokenizer.json", home ? home : "/root");
    return access(buf, R_OK) == 0 ? buf : NULL;
}

/* ---- a random-weight Qwen3 directory ---- */
float ds_test_frand(uint64_t *state)
{
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    return (float)((*state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static int put_tensor(FILE *f, unsigned *state, long n, int is_norm)
{
    float buf[1024];
    for (long i = 0; i < n; i += 1024) {
        long m = n - i < 1024 ? n - i : 1024;
        for (long j = 0; j < m; j++) {
            *state = *state * 1664525u + 1013904223u;
            float u = (float)(*state >> 8) / 16777216.0f - 0.5f;
            buf[j] = is_norm ? 1.0f + 0.1f * u : 0.1f * u;
        }
        if (fwrite(buf, sizeof(float), (size_t)m, f) != (size_t)m)
            return -1;
    }
    return 0;
}

int ds_test_write_random_qwen3(const char *dir, const struct ds_test_shape *s, unsigned seed)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    fprintf(f,
            "{\"architectures\":[\"Qwen3ForCausalLM\"],\"model_type\":\"qwen3\",\"vocab_size\":%d,"
            "\"hidden_size\":%d,\"intermediate_size\":%d,\"num_hidden_layers\":%d,\"num_attention_heads\":%d,"
            "\"num_key_value_heads\":%d,\"head_dim\":%d,\"max_position_embeddings\":4096,\"rms_norm_eps\":1e-6,"
            "\"rope_theta\":1000000.0,\"tie_word_embeddings\":true,\"hidden_act\":\"silu\",\"torch_dtype\":\"float32\"}\n",
            s->vocab, s->hidden, s->inter, s->layers, s->heads, s->kv_heads, s->head_dim);
    fclose(f);
    snprintf(path, sizeof path, "%s/generation_config.json", dir);
    if (ds_test_write_file(path, "{}\n", 3) < 0)
        return -1;
    struct { char name[96]; long r, c; } *t = calloc((size_t)(2 + 11 * s->layers), sizeof *t);
    int n = 0;
#define ADD(R, C, ...) (snprintf(t[n].name, sizeof t[n].name, __VA_ARGS__), t[n].r = (R), t[n].c = (C), n++)
    ADD(s->vocab, s->hidden, "model.embed_tokens.weight");
    ADD(s->hidden, 0, "model.norm.weight");
    long q = (long)s->heads * s->head_dim, kv = (long)s->kv_heads * s->head_dim;
    for (int l = 0; l < s->layers; l++) {
        ADD(s->hidden, 0, "model.layers.%d.input_layernorm.weight", l);
        ADD(s->hidden, 0, "model.layers.%d.post_attention_layernorm.weight", l);
        ADD(s->head_dim, 0, "model.layers.%d.self_attn.q_norm.weight", l);
        ADD(s->head_dim, 0, "model.layers.%d.self_attn.k_norm.weight", l);
        ADD(q, s->hidden, "model.layers.%d.self_attn.q_proj.weight", l);
        ADD(kv, s->hidden, "model.layers.%d.self_attn.k_proj.weight", l);
        ADD(kv, s->hidden, "model.layers.%d.self_attn.v_proj.weight", l);
        ADD(s->hidden, q, "model.layers.%d.self_attn.o_proj.weight", l);
        ADD(s->inter, s->hidden, "model.layers.%d.mlp.gate_proj.weight", l);
        ADD(s->inter, s->hidden, "model.layers.%d.mlp.up_proj.weight", l);
        ADD(s->hidden, s->inter, "model.layers.%d.mlp.down_proj.weight", l);
    }
#undef ADD
    size_t cap = (size_t)n * 160 + 16, hl = 0, off = 0;
    char *hdr = malloc(cap);
    hl += (size_t)snprintf(hdr, cap, "{");
    for (int i = 0; i < n; i++) {
        long cnt = t[i].c ? t[i].r * t[i].c : t[i].r;
        if (t[i].c)
            hl += (size_t)snprintf(hdr + hl, cap - hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%ld,%ld],\"data_offsets\":[%zu,%zu]}",
                                   i ? "," : "", t[i].name, t[i].r, t[i].c, off, off + (size_t)cnt * 4);
        else
            hl += (size_t)snprintf(hdr + hl, cap - hl, "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%ld],\"data_offsets\":[%zu,%zu]}",
                                   i ? "," : "", t[i].name, t[i].r, off, off + (size_t)cnt * 4);
        off += (size_t)cnt * 4;
    }
    hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
    while (hl % 8)
        hdr[hl++] = ' ';
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    f = fopen(path, "wb");
    int r = f ? 0 : -1;
    uint64_t h64 = hl;
    if (r == 0 && (fwrite(&h64, 8, 1, f) != 1 || fwrite(hdr, 1, hl, f) != hl))
        r = -1;
    for (int i = 0; i < n && r == 0; i++)
        r = put_tensor(f, &seed, t[i].c ? t[i].r * t[i].c : t[i].r, t[i].c == 0);
    if (f && fclose(f) != 0)
        r = -1;
    free(hdr);
    free(t);
    return r;
}
