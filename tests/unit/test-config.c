/* test-config.c: config.json, generation_config.json and the DSpark draft config
 * (engine/config.c).
 *
 * The valid configs follow the published Qwen3 and DeepSpec files in both the
 * transformers 4.x (rope_theta, torch_dtype) and 5.x (rope_parameters, dtype)
 * spellings. Each bad case starts from a valid config, changes one key with
 * jansson, and checks the error code and that the message names the file and
 * the key. */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "dspark/ds-config.h"
#include "testutil.h"

/* Qwen/Qwen3-4B config.json as transformers 4.51 writes it. */
static const char QWEN3_4B[] =
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"bos_token_id\":151643,\"eos_token_id\":151645,\"head_dim\":128,\"hidden_act\":\"silu\","
    "\"hidden_size\":2560,\"initializer_range\":0.02,\"intermediate_size\":9728,"
    "\"max_position_embeddings\":40960,\"max_window_layers\":36,\"model_type\":\"qwen3\","
    "\"num_attention_heads\":32,\"num_hidden_layers\":36,\"num_key_value_heads\":8,"
    "\"rms_norm_eps\":1e-06,\"rope_scaling\":null,\"rope_theta\":1000000,\"sliding_window\":null,"
    "\"tie_word_embeddings\":true,\"torch_dtype\":\"bfloat16\",\"transformers_version\":\"4.51.0\","
    "\"use_cache\":true,\"use_sliding_window\":false,\"vocab_size\":151936}";

/* Qwen3-8B-like, as transformers 5.x writes it (dtype, rope_parameters, layer_types). */
static const char QWEN3_8B_V5[] =
    "{\"architectures\":[\"Qwen3ForCausalLM\"],\"attention_bias\":false,\"bos_token_id\":151643,"
    "\"dtype\":\"bfloat16\",\"eos_token_id\":[151645,151643],\"head_dim\":128,\"hidden_act\":\"silu\","
    "\"hidden_size\":4096,\"intermediate_size\":12288,"
    "\"max_position_embeddings\":40960,\"model_type\":\"qwen3\",\"num_attention_heads\":32,"
    "\"num_hidden_layers\":36,\"num_key_value_heads\":8,\"pad_token_id\":null,\"rms_norm_eps\":1e-06,"
    "\"rope_parameters\":{\"rope_theta\":1000000.0,\"rope_type\":\"default\"},\"sliding_window\":null,"
    "\"tie_word_embeddings\":false,\"transformers_version\":\"5.0.0\",\"use_sliding_window\":false,"
    "\"vocab_size\":151936}";

/* deepseek-ai/dspark_qwen3_4b_block7 config.json (a copy of the target's plus the draft keys). */
static const char DSPARK_4B[] =
    "{\"architectures\":[\"Qwen3DSparkModel\"],\"attention_bias\":false,\"attention_dropout\":0.0,"
    "\"block_size\":7,\"bos_token_id\":151643,\"confidence_head_with_markov\":true,"
    "\"enable_confidence_head\":true,\"eos_token_id\":151645,\"head_dim\":128,\"hidden_act\":\"silu\","
    "\"hidden_size\":2560,\"intermediate_size\":9728,\"layer_types\":[\"full_attention\","
    "\"full_attention\",\"full_attention\",\"full_attention\",\"full_attention\"],"
    "\"markov_head_type\":\"vanilla\",\"markov_rank\":256,\"mask_token_id\":151669,"
    "\"max_position_embeddings\":40960,\"model_type\":\"qwen3\",\"num_anchors\":512,"
    "\"num_attention_heads\":32,\"num_hidden_layers\":5,\"num_key_value_heads\":8,"
    "\"num_target_layers\":36,\"rms_norm_eps\":1e-06,\"rope_scaling\":null,\"rope_theta\":1000000,"
    "\"target_layer_ids\":[1,9,17,25,33],\"tie_word_embeddings\":false,\"torch_dtype\":\"bfloat16\","
    "\"use_cache\":true,\"use_sliding_window\":false,\"vocab_size\":151936}";

/* Qwen/Qwen3-4B generation_config.json */
static const char GEN_4B[] =
    "{\"bos_token_id\":151643,\"do_sample\":true,\"eos_token_id\":[151645,151643],"
    "\"pad_token_id\":151643,\"temperature\":0.6,\"top_k\":20,\"top_p\":0.95,"
    "\"transformers_version\":\"4.51.0\"}";

static char *tmpdir;

static int group_setup(void **state)
{
    tmpdir = ds_test_tmpdir();
    return tmpdir ? 0 : -1;
}

static int group_teardown(void **state)
{
    ds_test_rmtree(tmpdir);
    free(tmpdir);
    return 0;
}

static const char *tpath(const char *name)
{
    static char buf[8][4096];
    static int slot;
    char *b = buf[slot++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", tmpdir, name);
    return b;
}

static void assert_msg_has(const char *needle)
{
    if (!strstr(ds_errdetail(), needle))
        fail_msg("message '%s' does not contain '%s'", ds_errdetail(), needle);
}

static json_t *load(const char *text)
{
    json_error_t e;
    json_t *j = json_loads(text, 0, &e);
    if (!j)
        fail_msg("test JSON does not parse: %s", e.text);
    return j;
}

static json_t *qwen3_8b_v5(void)
{
    json_t *j = load(QWEN3_8B_V5), *lt = json_array();
    for (int i = 0; i < 36; i++)
        json_array_append_new(lt, json_string("full_attention"));
    json_object_set_new(j, "layer_types", lt);
    return j;
}

/* Parse j (consumed) as a target config named cfg.json. */
static int parse_q(json_t *j, struct ds_qwen3_config *c)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    int r = ds_qwen3_config_parse(s, strlen(s), "cfg.json", c);
    free(s);
    return r;
}

static int parse_d(json_t *j, struct ds_dspark_config *d)
{
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    int r = ds_dspark_config_parse(s, strlen(s), "draft.json", d);
    free(s);
    return r;
}

/* j (consumed) must be refused with code; the message names the file and needle. */
static void bad_q(json_t *j, int code, const char *needle)
{
    struct ds_qwen3_config c;
    memset(&c, 0x5a, sizeof c);
    int r = parse_q(j, &c);
    if (r != -code)
        fail_msg("expected %s, got %d (%s) for '%s'", ds_strerror(code), r, ds_errdetail(), needle);
    assert_msg_has("file 'cfg.json'");
    assert_msg_has(needle);
    /* the out-parameter is untouched */
    assert_int_equal(c.vocab_size, 0x5a5a5a5a);
}

static void bad_d(json_t *j, int code, const char *needle)
{
    struct ds_dspark_config d;
    memset(&d, 0x5a, sizeof d);
    int r = parse_d(j, &d);
    if (r != -code)
        fail_msg("expected %s, got %d (%s) for '%s'", ds_strerror(code), r, ds_errdetail(), needle);
    assert_msg_has("file 'draft.json'");
    assert_msg_has(needle);
    assert_int_equal(d.block_size, 0x5a5a5a5a);
}

static json_t *with(json_t *j, const char *key, json_t *v)
{
    json_object_set_new(j, key, v);
    return j;
}

static json_t *without(json_t *j, const char *key)
{
    json_object_del(j, key);
    return j;
}

/* ------------------------------------------------------------------------ */
/* Qwen3 config.json                                                          */

static void test_qwen3_4b(void **state)
{
    struct ds_qwen3_config c;
    assert_int_equal(ds_qwen3_config_parse(QWEN3_4B, strlen(QWEN3_4B), "cfg.json", &c), 0);
    assert_string_equal(c.architecture, "Qwen3ForCausalLM");
    assert_int_equal(c.vocab_size, 151936);
    assert_int_equal(c.hidden_size, 2560);
    assert_int_equal(c.intermediate_size, 9728);
    assert_int_equal(c.num_hidden_layers, 36);
    assert_int_equal(c.num_attention_heads, 32);
    assert_int_equal(c.num_key_value_heads, 8);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.max_position_embeddings, 40960);
    assert_true(c.rms_norm_eps == 1e-6);
    assert_true(c.rope_theta == 1e6);
    assert_true(c.tie_word_embeddings);
    assert_false(c.attention_bias);
    assert_int_equal(c.torch_dtype, DS_DTYPE_BF16);
    assert_int_equal(c.bos_token_id, 151643);
    assert_int_equal(c.n_eos, 1);
    assert_int_equal(c.eos_token_id[0], 151645);

    /* not NUL-terminated: only len bytes are read */
    char *copy = malloc(strlen(QWEN3_4B) + 5);
    memcpy(copy, QWEN3_4B, strlen(QWEN3_4B));
    memcpy(copy + strlen(QWEN3_4B), "xxxx", 5);
    assert_int_equal(ds_qwen3_config_parse(copy, strlen(QWEN3_4B), "cfg.json", &c), 0);
    free(copy);
}

static void test_qwen3_v5_untied(void **state)
{
    struct ds_qwen3_config c;
    assert_int_equal(parse_q(qwen3_8b_v5(), &c), 0);
    assert_int_equal(c.hidden_size, 4096);
    assert_false(c.tie_word_embeddings);
    assert_true(c.rope_theta == 1e6);
    assert_int_equal(c.torch_dtype, DS_DTYPE_BF16);
    assert_int_equal(c.n_eos, 2);
    assert_int_equal(c.eos_token_id[0], 151645);
    assert_int_equal(c.eos_token_id[1], 151643);

    /* rope_parameters without rope_type, and both spellings agreeing */
    json_t *j = qwen3_8b_v5();
    json_object_del(json_object_get(j, "rope_parameters"), "rope_type");
    assert_int_equal(parse_q(j, &c), 0);
    assert_int_equal(parse_q(with(qwen3_8b_v5(), "rope_theta", json_integer(1000000)), &c), 0);
    assert_true(c.rope_theta == 1e6);
    /* an explicit default rope_scaling is plain RoPE */
    assert_int_equal(parse_q(with(load(QWEN3_4B), "rope_scaling",
                                  load("{\"rope_type\":\"default\"}")), &c), 0);
    /* dtype wins over a stale torch_dtype */
    assert_int_equal(parse_q(with(with(load(QWEN3_4B), "dtype", json_string("float16")),
                                  "torch_dtype", json_string("bfloat16")), &c), 0);
    assert_int_equal(c.torch_dtype, DS_DTYPE_F16);
    assert_int_equal(parse_q(with(load(QWEN3_4B), "torch_dtype", json_string("float32")), &c), 0);
    assert_int_equal(c.torch_dtype, DS_DTYPE_F32);
}

static void test_qwen3_head_dim(void **state)
{
    struct ds_qwen3_config c;
    /* absent: hidden / heads */
    assert_int_equal(parse_q(without(load(QWEN3_4B), "head_dim"), &c), 0);
    assert_int_equal(c.head_dim, 2560 / 32);
    /* present and different from hidden / heads (as in Qwen3-0.6B: 1024 / 16 heads, hd 128) */
    json_t *j = load(QWEN3_4B);
    json_object_set_new(j, "hidden_size", json_integer(1024));
    json_object_set_new(j, "num_attention_heads", json_integer(16));
    assert_int_equal(parse_q(j, &c), 0);
    assert_int_equal(c.head_dim, 128);
    assert_int_equal(c.hidden_size, 1024);
}

static void test_qwen3_defaults(void **state)
{
    static const char minimal[] =
        "{\"vocab_size\":1000,\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
        "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"rms_norm_eps\":1e-5,"
        "\"rope_theta\":10000.0}";
    struct ds_qwen3_config c;
    memset(&c, 0x5a, sizeof c);
    assert_int_equal(ds_qwen3_config_parse(minimal, strlen(minimal), "min.json", &c), 0);
    assert_string_equal(c.architecture, "");
    assert_int_equal(c.head_dim, 16);
    assert_int_equal(c.max_position_embeddings, 32768);
    assert_false(c.tie_word_embeddings);
    assert_false(c.attention_bias);
    assert_int_equal(c.torch_dtype, DS_DTYPE_F32);
    assert_int_equal(c.bos_token_id, -1);
    assert_int_equal(c.n_eos, 0);
    assert_true(c.rope_theta == 10000);

    /* nulls count as absent */
    json_t *j = load(minimal);
    json_object_set_new(j, "tie_word_embeddings", json_null());
    json_object_set_new(j, "eos_token_id", json_null());
    json_object_set_new(j, "bos_token_id", json_null());
    json_object_set_new(j, "head_dim", json_null());
    json_object_set_new(j, "rope_scaling", json_null());
    json_object_set_new(j, "attention_bias", json_true());
    assert_int_equal(parse_q(j, &c), 0);
    assert_false(c.tie_word_embeddings);
    assert_true(c.attention_bias);
    assert_int_equal(c.n_eos, 0);
    assert_int_equal(c.bos_token_id, -1);
    /* a bos list gives its first id */
    assert_int_equal(parse_q(with(load(minimal), "bos_token_id", load("[7,8]")), &c), 0);
    assert_int_equal(c.bos_token_id, 7);
}

static void test_qwen3_missing(void **state)
{
    static const char *const required[] = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
    };
    char needle[64];
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        snprintf(needle, sizeof needle, "key '%s' is missing", required[i]);
        bad_q(without(load(QWEN3_4B), required[i]), DS_EFORMAT, needle);
        bad_q(with(load(QWEN3_4B), required[i], json_null()), DS_EFORMAT, needle);
    }
    bad_q(without(load(QWEN3_4B), "rope_theta"), DS_EFORMAT, "rope_theta");
    json_t *j = qwen3_8b_v5();
    json_object_del(json_object_get(j, "rope_parameters"), "rope_theta");
    bad_q(j, DS_EFORMAT, "rope_theta");
}

static void test_qwen3_types(void **state)
{
    static const char *const ints[] = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    };
    char needle[64];
    for (size_t i = 0; i < sizeof ints / sizeof *ints; i++) {
        snprintf(needle, sizeof needle, "key '%s' must be an integer", ints[i]);
        bad_q(with(load(QWEN3_4B), ints[i], json_string("36")), DS_EFORMAT, needle);
        bad_q(with(load(QWEN3_4B), ints[i], json_real(36.0)), DS_EFORMAT, needle);
        bad_q(with(load(QWEN3_4B), ints[i], json_true()), DS_EFORMAT, needle);
        snprintf(needle, sizeof needle, "key '%s' is 0", ints[i]);
        bad_q(with(load(QWEN3_4B), ints[i], json_integer(0)), DS_EFORMAT, needle);
        snprintf(needle, sizeof needle, "key '%s' is -8", ints[i]);
        bad_q(with(load(QWEN3_4B), ints[i], json_integer(-8)), DS_EFORMAT, needle);
        bad_q(with(load(QWEN3_4B), ints[i], json_integer(1LL << 40)), DS_ELIMIT, ints[i]);
    }
    bad_q(with(load(QWEN3_4B), "rms_norm_eps", json_string("1e-6")), DS_EFORMAT, "rms_norm_eps");
    bad_q(with(load(QWEN3_4B), "rope_theta", json_string("1e6")), DS_EFORMAT, "rope_theta");
    bad_q(with(load(QWEN3_4B), "tie_word_embeddings", json_string("true")), DS_EFORMAT,
          "tie_word_embeddings");
    bad_q(with(load(QWEN3_4B), "tie_word_embeddings", json_integer(1)), DS_EFORMAT,
          "tie_word_embeddings");
    bad_q(with(load(QWEN3_4B), "attention_bias", json_integer(0)), DS_EFORMAT, "attention_bias");
    bad_q(with(load(QWEN3_4B), "hidden_act", json_integer(1)), DS_EFORMAT, "hidden_act");
    bad_q(with(load(QWEN3_4B), "torch_dtype", json_integer(16)), DS_EFORMAT, "torch_dtype");
    bad_q(with(load(QWEN3_4B), "architectures", json_string("Qwen3ForCausalLM")), DS_EFORMAT,
          "architectures");
    bad_q(with(load(QWEN3_4B), "architectures", load("[]")), DS_EFORMAT, "architectures");
    bad_q(with(load(QWEN3_4B), "architectures", load("[3]")), DS_EFORMAT, "architectures");
    bad_q(with(load(QWEN3_4B), "architectures",
               load("[\"Qwen3ForCausalLMWithAnExtremelyLongNameThatDoesNotFitInSixtyFourBytes\"]")),
          DS_EFORMAT, "too long");
    bad_q(with(load(QWEN3_4B), "rope_parameters", json_string("default")), DS_EFORMAT,
          "rope_parameters");
    bad_q(with(load(QWEN3_4B), "rope_scaling", json_integer(2)), DS_EFORMAT, "rope_scaling");
    bad_q(with(load(QWEN3_4B), "layer_types", json_string("full_attention")), DS_EFORMAT,
          "layer_types");
    bad_q(with(load(QWEN3_4B), "eos_token_id", json_string("151645")), DS_EFORMAT, "eos_token_id");
    bad_q(with(load(QWEN3_4B), "eos_token_id", load("[151645, \"x\"]")), DS_EFORMAT, "eos_token_id");
    bad_q(with(load(QWEN3_4B), "bos_token_id", json_real(1.0)), DS_EFORMAT, "bos_token_id");
}

static void test_qwen3_values(void **state)
{
    bad_q(with(load(QWEN3_4B), "num_key_value_heads", json_integer(7)), DS_EFORMAT,
          "num_attention_heads 32 is not a multiple of num_key_value_heads 7");
    bad_q(with(load(QWEN3_4B), "num_key_value_heads", json_integer(64)), DS_EFORMAT,
          "not a multiple");
    bad_q(with(load(QWEN3_4B), "head_dim", json_integer(127)), DS_EFORMAT, "head_dim 127 must be even");
    bad_q(with(without(load(QWEN3_4B), "head_dim"), "num_attention_heads", json_integer(24)),
          DS_EFORMAT, "hidden_size 2560 is not a multiple of num_attention_heads 24");
    bad_q(with(load(QWEN3_4B), "vocab_size", json_integer((1 << 24) + 1)), DS_ELIMIT,
          "key 'vocab_size' is 16777217");
    struct ds_qwen3_config c;
    json_t *j = with(load(QWEN3_4B), "vocab_size", json_integer(1 << 24));
    assert_int_equal(parse_q(j, &c), 0);
    bad_q(with(load(QWEN3_4B), "rms_norm_eps", json_real(0)), DS_EFORMAT, "rms_norm_eps");
    bad_q(with(load(QWEN3_4B), "rms_norm_eps", json_real(-1e-6)), DS_EFORMAT, "rms_norm_eps");
    bad_q(with(load(QWEN3_4B), "rope_theta", json_integer(0)), DS_EFORMAT, "rope_theta");
    bad_q(with(load(QWEN3_4B), "rope_theta", json_real(-10000)), DS_EFORMAT, "rope_theta");
    bad_q(with(qwen3_8b_v5(), "rope_theta", json_integer(10000)), DS_EFORMAT, "disagree");
    /* token ids outside the vocabulary or too many */
    bad_q(with(load(QWEN3_4B), "eos_token_id", json_integer(151936)), DS_EFORMAT, "eos_token_id");
    bad_q(with(load(QWEN3_4B), "eos_token_id", json_integer(-1)), DS_EFORMAT, "eos_token_id");
    bad_q(with(load(QWEN3_4B), "bos_token_id", json_integer(200000)), DS_EFORMAT, "bos_token_id");
    bad_q(with(load(QWEN3_4B), "eos_token_id", load("[1,2,3,4,5,6,7,8,9]")), DS_ELIMIT, "eos_token_id");
    assert_int_equal(parse_q(with(load(QWEN3_4B), "eos_token_id", load("[1,2,3,4,5,6,7,8]")), &c), 0);
    assert_int_equal(c.n_eos, 8);
    assert_int_equal(c.eos_token_id[7], 8);
    assert_int_equal(parse_q(with(load(QWEN3_4B), "eos_token_id", load("[]")), &c), 0);
    assert_int_equal(c.n_eos, 0);
    /* a layer_types list of the wrong length */
    bad_q(with(load(QWEN3_4B), "layer_types", load("[\"full_attention\"]")), DS_EFORMAT,
          "layer_types has 1 entries for 36 layers");
}

static void test_qwen3_unsupported(void **state)
{
    bad_q(with(load(QWEN3_4B), "rope_scaling", load("{\"rope_type\":\"yarn\",\"factor\":4.0,"
          "\"original_max_position_embeddings\":32768}")), DS_ENOTSUP, "rope_scaling of type 'yarn'");
    bad_q(with(load(QWEN3_4B), "rope_scaling", load("{\"type\":\"linear\",\"factor\":2.0}")),
          DS_ENOTSUP, "'linear'");
    bad_q(with(load(QWEN3_4B), "rope_scaling", load("{\"factor\":2.0}")), DS_ENOTSUP, "rope_scaling");
    json_t *j = qwen3_8b_v5();
    json_object_set_new(json_object_get(j, "rope_parameters"), "rope_type", json_string("yarn"));
    bad_q(j, DS_ENOTSUP, "rope_parameters.rope_type 'yarn'");
    j = qwen3_8b_v5();
    json_object_set_new(json_object_get(j, "rope_parameters"), "rope_type", json_integer(1));
    bad_q(j, DS_EFORMAT, "rope_parameters.rope_type");
    j = qwen3_8b_v5();
    json_object_set_new(json_object_get(j, "rope_parameters"), "partial_rotary_factor", json_real(0.5));
    bad_q(j, DS_ENOTSUP, "partial_rotary_factor");
    bad_q(with(load(QWEN3_4B), "hidden_act", json_string("gelu")), DS_ENOTSUP, "hidden_act 'gelu'");
    bad_q(with(load(QWEN3_4B), "use_sliding_window", json_true()), DS_ENOTSUP, "use_sliding_window");
    bad_q(with(load(QWEN3_4B), "torch_dtype", json_string("float64")), DS_ENOTSUP, "'float64'");
    bad_q(with(qwen3_8b_v5(), "dtype", json_string("int8")), DS_ENOTSUP, "dtype 'int8'");
    bad_q(with(load(QWEN3_4B), "mlp_bias", json_true()), DS_ENOTSUP, "mlp_bias");
    j = qwen3_8b_v5();
    json_array_set_new(json_object_get(j, "layer_types"), 3, json_string("sliding_attention"));
    bad_q(j, DS_ENOTSUP, "layer_types[3] 'sliding_attention'");
}

static void test_not_json(void **state)
{
    static const char *const texts[] = {
        "", "{", "[]", "\"config\"", "{\"vocab_size\":1,\"vocab_size\":2}", "{\"a\":1} x",
        "{\"a\":\"\xff\"}",
    };
    struct ds_qwen3_config c;
    struct ds_dspark_config d;
    struct ds_generation_config g;
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        assert_int_equal(ds_qwen3_config_parse(texts[i], strlen(texts[i]), "x.json", &c), -DS_EFORMAT);
        assert_msg_has("file 'x.json'");
        assert_int_equal(ds_dspark_config_parse(texts[i], strlen(texts[i]), "x.json", &d), -DS_EFORMAT);
        assert_msg_has("file 'x.json'");
        assert_int_equal(ds_generation_config_parse(texts[i], strlen(texts[i]), "x.json", &g),
                         -DS_EFORMAT);
        assert_msg_has("file 'x.json'");
    }
    assert_int_equal(ds_qwen3_config_parse("{\"a\":1}\0", 8, "nul.json", &c), -DS_EFORMAT);
}

static void test_load_files(void **state)
{
    struct ds_qwen3_config c;
    assert_int_equal(mkdir(tpath("model"), 0700), 0);
    assert_int_equal(ds_test_write_file(tpath("model/config.json"), QWEN3_4B, strlen(QWEN3_4B)), 0);
    assert_int_equal(ds_qwen3_config_load(tpath("model"), &c), 0);
    assert_int_equal(c.hidden_size, 2560);
    memset(&c, 0, sizeof c);
    assert_int_equal(ds_qwen3_config_load(tpath("model/config.json"), &c), 0);
    assert_int_equal(c.hidden_size, 2560);

    /* messages name the file read */
    assert_int_equal(ds_test_write_file(tpath("model/bad.json"), "{\"vocab_size\":1}", 16), 0);
    assert_int_equal(ds_qwen3_config_load(tpath("model/bad.json"), &c), -DS_EFORMAT);
    assert_msg_has(tpath("model/bad.json"));
    assert_int_equal(mkdir(tpath("empty"), 0700), 0);
    assert_int_equal(ds_qwen3_config_load(tpath("empty"), &c), -DS_EIO);
    assert_msg_has(tpath("empty/config.json"));
    assert_int_equal(mkfifo(tpath("model/fifo.json"), 0600), 0);
    assert_int_equal(ds_qwen3_config_load(tpath("model/fifo.json"), &c), -DS_EIO);
    assert_msg_has("not a regular file");
    assert_int_equal(ds_qwen3_config_load(tpath("nowhere/config.json"), &c), -DS_EIO);
    assert_msg_has(tpath("nowhere/config.json"));
}

/* ------------------------------------------------------------------------ */
/* generation_config.json                                                     */

static void test_generation(void **state)
{
    struct ds_generation_config g;
    assert_int_equal(mkdir(tpath("gen"), 0700), 0);
    assert_int_equal(ds_test_write_file(tpath("gen/generation_config.json"), GEN_4B, strlen(GEN_4B)), 0);
    assert_int_equal(ds_generation_config_load(tpath("gen"), &g), 0);
    assert_int_equal(g.n_eos, 2);
    assert_int_equal(g.eos_token_id[0], 151645);
    assert_int_equal(g.eos_token_id[1], 151643);
    assert_int_equal(g.bos_token_id, 151643);
    assert_int_equal(g.pad_token_id, 151643);
    assert_true(g.do_sample);
    assert_true(g.temperature == 0.6);
    assert_true(g.top_p == 0.95);
    assert_int_equal(g.top_k, 20);
    assert_int_equal(ds_generation_config_load(tpath("gen/generation_config.json"), &g), 0);
    assert_int_equal(g.top_k, 20);

    /* a missing file gives the defaults: no such path, or a directory without the file */
    assert_int_equal(mkdir(tpath("empty-gen"), 0700), 0);
    const char *missing[2] = { tpath("nodir"), tpath("empty-gen") };
    for (int i = 0; i < 2; i++) {
        memset(&g, 0x5a, sizeof g);
        assert_int_equal(ds_generation_config_load(missing[i], &g), 0);
        assert_int_equal(g.n_eos, 0);
        assert_int_equal(g.bos_token_id, -1);
        assert_int_equal(g.pad_token_id, -1);
        assert_false(g.do_sample);
        assert_true(g.temperature == 1.0);
        assert_true(g.top_p == 1.0);
        assert_int_equal(g.top_k, 0);
    }
    /* the same defaults for absent keys; eos as a plain integer */
    const char *e5 = "{\"eos_token_id\":5}";
    assert_int_equal(ds_generation_config_parse(e5, strlen(e5), "g.json", &g), 0);
    assert_int_equal(g.n_eos, 1);
    assert_int_equal(g.eos_token_id[0], 5);
    assert_true(g.temperature == 1.0 && g.top_p == 1.0 && g.top_k == 0 && !g.do_sample);
    const char *t0 = "{\"temperature\":0,\"top_k\":null}";
    assert_int_equal(ds_generation_config_parse(t0, strlen(t0), "g.json", &g), 0);
    assert_true(g.temperature == 0);

    /* a malformed file is an error naming it */
    assert_int_equal(ds_test_write_file(tpath("gen/generation_config.json"), "{\"top_k\":", 9), 0);
    assert_int_equal(ds_generation_config_load(tpath("gen"), &g), -DS_EFORMAT);
    assert_msg_has(tpath("gen/generation_config.json"));

    static const struct {
        const char *text;
        int code;
        const char *needle;
    } bad[] = {
        { "{\"temperature\":-0.5}", DS_EFORMAT, "temperature" },
        { "{\"temperature\":\"hot\"}", DS_EFORMAT, "temperature" },
        { "{\"top_p\":0}", DS_EFORMAT, "top_p" },
        { "{\"top_p\":1.5}", DS_EFORMAT, "top_p" },
        { "{\"top_k\":-1}", DS_EFORMAT, "top_k" },
        { "{\"top_k\":2.5}", DS_EFORMAT, "top_k" },
        { "{\"do_sample\":\"yes\"}", DS_EFORMAT, "do_sample" },
        { "{\"eos_token_id\":[1,2,3,4,5,6,7,8,9]}", DS_ELIMIT, "eos_token_id" },
        { "{\"eos_token_id\":[-1]}", DS_EFORMAT, "eos_token_id" },
        { "{\"eos_token_id\":{}}", DS_EFORMAT, "eos_token_id" },
        { "{\"pad_token_id\":\"0\"}", DS_EFORMAT, "pad_token_id" },
        { "{\"bos_token_id\":true}", DS_EFORMAT, "bos_token_id" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        memset(&g, 0x5a, sizeof g);
        assert_int_equal(ds_generation_config_parse(bad[i].text, strlen(bad[i].text), "g.json", &g),
                         -bad[i].code);
        assert_msg_has("file 'g.json'");
        assert_msg_has(bad[i].needle);
        assert_int_equal(g.top_k, 0x5a5a5a5a);
    }
}

/* ------------------------------------------------------------------------ */
/* DSpark draft config                                                        */

static void test_dspark_valid(void **state)
{
    struct ds_dspark_config d;
    assert_int_equal(ds_dspark_config_parse(DSPARK_4B, strlen(DSPARK_4B), "draft.json", &d), 0);
    assert_string_equal(d.base.architecture, "Qwen3DSparkModel");
    assert_int_equal(d.base.num_hidden_layers, 5);
    assert_int_equal(d.base.hidden_size, 2560);
    assert_false(d.base.tie_word_embeddings);
    assert_int_equal(d.num_target_layers, 36);
    assert_int_equal(d.block_size, 7);
    assert_int_equal(d.mask_token_id, 151669);
    assert_int_equal(d.n_target_layers, 5);
    const int ids[5] = { 1, 9, 17, 25, 33 };
    assert_memory_equal(d.target_layer_ids, ids, sizeof ids);
    assert_int_equal(d.markov_rank, 256);
    assert_int_equal(d.markov_head, DS_MARKOV_VANILLA);
    assert_true(d.enable_confidence_head);
    assert_true(d.confidence_head_with_markov);
    assert_int_equal(d.num_anchors, 512);

    /* gated and rnn heads, compared without case; vanilla when the type is absent */
    assert_int_equal(parse_d(with(load(DSPARK_4B), "markov_head_type", json_string("Gated")), &d), 0);
    assert_int_equal(d.markov_head, DS_MARKOV_GATED);
    assert_int_equal(parse_d(with(load(DSPARK_4B), "markov_head_type", json_string("RNN")), &d), 0);
    assert_int_equal(d.markov_head, DS_MARKOV_RNN);
    assert_int_equal(parse_d(with(load(DSPARK_4B), "markov_head_type", json_string("Vanilla")), &d), 0);
    assert_int_equal(d.markov_head, DS_MARKOV_VANILLA);
    assert_int_equal(parse_d(without(load(DSPARK_4B), "markov_head_type"), &d), 0);
    assert_int_equal(d.markov_head, DS_MARKOV_VANILLA);
    /* confidence head without the Markov input */
    assert_int_equal(parse_d(with(load(DSPARK_4B), "confidence_head_with_markov", json_false()), &d), 0);
    assert_true(d.enable_confidence_head);
    assert_false(d.confidence_head_with_markov);
    /* -1 (the embedding output) and the layer before the last are allowed */
    assert_int_equal(parse_d(with(load(DSPARK_4B), "target_layer_ids", load("[-1,0,34]")), &d), 0);
    assert_int_equal(d.n_target_layers, 3);
    assert_int_equal(d.target_layer_ids[0], -1);
    assert_int_equal(d.target_layer_ids[2], 34);
    /* block size bounds */
    assert_int_equal(parse_d(with(load(DSPARK_4B), "block_size", json_integer(1)), &d), 0);
    assert_int_equal(parse_d(with(load(DSPARK_4B), "block_size", json_integer(32)), &d), 0);
    assert_int_equal(d.block_size, 32);
}

/* DFlash: the same format with the Markov and confidence heads off. */
static void test_dflash(void **state)
{
    json_t *j = load(DSPARK_4B);
    json_object_set_new(j, "markov_rank", json_integer(0));
    json_object_del(j, "markov_head_type");
    json_object_set_new(j, "enable_confidence_head", json_false());
    json_object_del(j, "confidence_head_with_markov");
    struct ds_dspark_config d;
    assert_int_equal(parse_d(j, &d), 0);
    assert_int_equal(d.markov_rank, 0);
    assert_int_equal(d.markov_head, DS_MARKOV_NONE);
    assert_false(d.enable_confidence_head);
    assert_false(d.confidence_head_with_markov);

    /* with rank 0 a leftover head type is ignored */
    j = with(load(DSPARK_4B), "markov_rank", json_integer(0));
    json_object_set_new(j, "enable_confidence_head", json_false());
    assert_int_equal(parse_d(j, &d), 0);
    assert_int_equal(d.markov_head, DS_MARKOV_NONE);
    assert_false(d.confidence_head_with_markov);
}

static void test_dspark_bad(void **state)
{
    static const char *const required[] = {
        "num_anchors", "target_layer_ids", "mask_token_id", "enable_confidence_head", "markov_rank",
        "num_target_layers", "block_size",
    };
    char needle[64];
    for (size_t i = 0; i < sizeof required / sizeof *required; i++) {
        snprintf(needle, sizeof needle, "key '%s' is missing", required[i]);
        bad_d(without(load(DSPARK_4B), required[i]), DS_EFORMAT, needle);
        bad_d(with(load(DSPARK_4B), required[i], json_null()), DS_EFORMAT, needle);
    }
    /* a target config passed as a draft says so */
    struct ds_dspark_config d;
    assert_int_equal(ds_dspark_config_parse(QWEN3_4B, strlen(QWEN3_4B), "draft.json", &d), -DS_EFORMAT);
    assert_msg_has("not of a DSpark draft");
    /* the base keys are checked as for a target */
    bad_d(without(load(DSPARK_4B), "hidden_size"), DS_EFORMAT, "key 'hidden_size' is missing");

    bad_d(with(load(DSPARK_4B), "block_size", json_integer(0)), DS_EFORMAT, "block_size");
    bad_d(with(load(DSPARK_4B), "block_size", json_integer(33)), DS_ELIMIT, "block_size");
    bad_d(with(load(DSPARK_4B), "block_size", json_string("7")), DS_EFORMAT, "block_size");
    bad_d(with(load(DSPARK_4B), "num_target_layers", json_integer(0)), DS_EFORMAT, "num_target_layers");
    bad_d(with(load(DSPARK_4B), "mask_token_id", json_integer(151936)), DS_EFORMAT, "mask_token_id");
    bad_d(with(load(DSPARK_4B), "mask_token_id", json_integer(-1)), DS_EFORMAT, "mask_token_id");
    bad_d(with(load(DSPARK_4B), "num_anchors", json_integer(-1)), DS_EFORMAT, "num_anchors");

    /* target_layer_ids */
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[1,9,9,25]")), DS_EFORMAT, "strictly increasing");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[9,1]")), DS_EFORMAT, "strictly increasing");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[-2,1]")), DS_EFORMAT, "target_layer_ids[0] is -2");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[1,36]")), DS_EFORMAT, "target_layer_ids[1] is 36");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[1,9,17,25,35]")), DS_ENOTSUP, "final layer");
    assert_msg_has("target_layer_ids[4] is 35");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[]")), DS_EFORMAT, "target_layer_ids");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", load("[1,\"9\"]")), DS_EFORMAT, "target_layer_ids[1]");
    bad_d(with(load(DSPARK_4B), "target_layer_ids", json_integer(1)), DS_EFORMAT, "target_layer_ids");
    bad_d(with(load(DSPARK_4B), "target_layer_ids",
               load("[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]")), DS_ELIMIT, "target_layer_ids");
    assert_int_equal(parse_d(with(load(DSPARK_4B), "target_layer_ids",
                                  load("[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]")), &d), 0);
    assert_int_equal(d.n_target_layers, DS_MAX_TARGET_LAYERS);

    /* Markov and confidence heads */
    bad_d(with(load(DSPARK_4B), "markov_rank", json_integer(-1)), DS_EFORMAT, "markov_rank");
    bad_d(with(load(DSPARK_4B), "markov_head_type", json_string("lstm")), DS_ENOTSUP,
          "markov_head_type 'lstm'");
    bad_d(with(load(DSPARK_4B), "markov_head_type", json_integer(1)), DS_EFORMAT, "markov_head_type");
    bad_d(with(load(DSPARK_4B), "enable_confidence_head", json_string("true")), DS_EFORMAT,
          "enable_confidence_head");
    bad_d(without(load(DSPARK_4B), "confidence_head_with_markov"), DS_EFORMAT,
          "key 'confidence_head_with_markov' is missing");
    bad_d(with(load(DSPARK_4B), "markov_rank", json_integer(0)), DS_EFORMAT,
          "confidence_head_with_markov is true but markov_rank is 0");
}

static void test_dspark_load_and_check(void **state)
{
    assert_int_equal(mkdir(tpath("draft"), 0700), 0);
    assert_int_equal(ds_test_write_file(tpath("draft/config.json"), DSPARK_4B, strlen(DSPARK_4B)), 0);
    struct ds_dspark_config d;
    struct ds_qwen3_config t;
    assert_int_equal(ds_dspark_config_load(tpath("draft"), &d), 0);
    assert_int_equal(ds_qwen3_config_parse(QWEN3_4B, strlen(QWEN3_4B), "cfg.json", &t), 0);
    assert_int_equal(ds_dspark_config_check(&d, &t), 0);
    assert_int_equal(ds_dspark_config_load(tpath("no-draft"), &d), -DS_EIO);
    assert_msg_has(tpath("no-draft"));

    /* a draft for the 4B does not fit the 8B (hidden 4096) */
    struct ds_qwen3_config t8;
    assert_int_equal(parse_q(qwen3_8b_v5(), &t8), 0);
    assert_int_equal(ds_dspark_config_check(&d, &t8), -DS_ECONFIG);
    assert_msg_has("hidden_size 2560");
    assert_msg_has("4096");

    struct ds_qwen3_config tv = t;
    tv.vocab_size = 152064;
    assert_int_equal(ds_dspark_config_check(&d, &tv), -DS_ECONFIG);
    assert_msg_has("vocab_size");

    struct ds_qwen3_config tl = t;
    tl.num_hidden_layers = 40;
    assert_int_equal(ds_dspark_config_check(&d, &tl), -DS_ECONFIG);
    assert_msg_has("36-layer");
    assert_msg_has("40 layers");

    /* values that bypassed the parser are checked again */
    struct ds_dspark_config dd = d;
    dd.target_layer_ids[4] = 35;
    assert_int_equal(ds_dspark_config_check(&dd, &t), -DS_ENOTSUP);
    assert_msg_has("final layer");
    dd = d;
    dd.target_layer_ids[0] = -2;
    assert_int_equal(ds_dspark_config_check(&dd, &t), -DS_ECONFIG);
    dd = d;
    dd.target_layer_ids[1] = 1;
    assert_int_equal(ds_dspark_config_check(&dd, &t), -DS_ECONFIG);
    dd = d;
    dd.mask_token_id = 151936;
    assert_int_equal(ds_dspark_config_check(&dd, &t), -DS_ECONFIG);
    assert_msg_has("mask_token_id 151936");
    dd = d;
    dd.n_target_layers = 0;
    assert_int_equal(ds_dspark_config_check(&dd, &t), -DS_ECONFIG);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3_4b),
        cmocka_unit_test(test_qwen3_v5_untied),
        cmocka_unit_test(test_qwen3_head_dim),
        cmocka_unit_test(test_qwen3_defaults),
        cmocka_unit_test(test_qwen3_missing),
        cmocka_unit_test(test_qwen3_types),
        cmocka_unit_test(test_qwen3_values),
        cmocka_unit_test(test_qwen3_unsupported),
        cmocka_unit_test(test_not_json),
        cmocka_unit_test(test_load_files),
        cmocka_unit_test(test_generation),
        cmocka_unit_test(test_dspark_valid),
        cmocka_unit_test(test_dflash),
        cmocka_unit_test(test_dspark_bad),
        cmocka_unit_test(test_dspark_load_and_check),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
