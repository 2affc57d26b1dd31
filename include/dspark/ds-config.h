/* ds-config.h: Hugging Face config.json / generation_config.json for Qwen3
 * targets, and the DeepSpec DSpark/DFlash draft config (dspark-spec.md §1). */
#ifndef DS_CONFIG_H
#define DS_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include "dspark/ds-err.h"
#include "dspark/ds-safetensors.h"

#define DS_MAX_EOS 8
#define DS_MAX_TARGET_LAYERS 16

/* The fields Qwen3ForCausalLM uses. */
struct ds_qwen3_config {
    char architecture[64];        /* "Qwen3ForCausalLM" */
    int vocab_size;
    int hidden_size;              /* H */
    int intermediate_size;        /* I */
    int num_hidden_layers;        /* L */
    int num_attention_heads;      /* nH */
    int num_key_value_heads;      /* nKV; nH % nKV == 0 */
    int head_dim;                 /* hd; defaults to H / nH when absent */
    int max_position_embeddings;
    double rms_norm_eps;
    double rope_theta;            /* from rope_theta or rope_parameters.rope_theta */
    bool tie_word_embeddings;
    bool attention_bias;          /* Qwen3 has none; true adds q/k/v/o biases */
    enum ds_dtype torch_dtype;    /* storage dtype named by the config (F32 if absent) */
    int bos_token_id;             /* -1 if absent */
    int eos_token_id[DS_MAX_EOS]; /* from config.json eos_token_id (int or list) */
    int n_eos;
};

/* generation_config.json; absent fields keep the defaults set by _load
 * (no eos, temperature 1, top_p 1, top_k 0 meaning off). */
struct ds_generation_config {
    int eos_token_id[DS_MAX_EOS];
    int n_eos;
    int bos_token_id;
    int pad_token_id;
    bool do_sample;
    double temperature;
    double top_p;
    int top_k;
};

enum ds_markov_head {
    DS_MARKOV_NONE = 0,   /* markov_rank 0: DFlash form */
    DS_MARKOV_VANILLA,
    DS_MARKOV_GATED,
    DS_MARKOV_RNN,
};

/* DeepSpec draft config: a copy of the target config plus the draft keys. */
struct ds_dspark_config {
    struct ds_qwen3_config base;  /* hidden_size..rope as in the file; num_hidden_layers = draft layers */
    int num_target_layers;
    int block_size;               /* gamma */
    int mask_token_id;
    int target_layer_ids[DS_MAX_TARGET_LAYERS];
    int n_target_layers;          /* m */
    int markov_rank;              /* r; 0 = none */
    enum ds_markov_head markov_head;
    bool enable_confidence_head;
    bool confidence_head_with_markov;
    int num_anchors;
};

/* Parse DIR/config.json or a config.json path. Messages name the file and key. */
int ds_qwen3_config_load(const char *path, struct ds_qwen3_config *ret) DS_MUSTCHECK;
/* Parse from a JSON text (len bytes, need not be NUL-terminated). */
int ds_qwen3_config_parse(const char *json, size_t len, const char *fname,
                          struct ds_qwen3_config *ret) DS_MUSTCHECK;
/* DIR/generation_config.json or a path; a missing file gives the defaults and 0. */
int ds_generation_config_load(const char *path, struct ds_generation_config *ret) DS_MUSTCHECK;
/* Parse from a JSON text (len bytes); absent keys keep the defaults above. */
int ds_generation_config_parse(const char *json, size_t len, const char *fname,
                               struct ds_generation_config *ret) DS_MUSTCHECK;
/* DIR/config.json of a DeepSpec draft checkpoint. */
int ds_dspark_config_load(const char *path, struct ds_dspark_config *ret) DS_MUSTCHECK;
int ds_dspark_config_parse(const char *json, size_t len, const char *fname,
                           struct ds_dspark_config *ret) DS_MUSTCHECK;
/* Check a draft config against its target config (layer ids in range, final
 * layer refused, mask id inside the vocab, matching hidden size and vocab). */
int ds_dspark_config_check(const struct ds_dspark_config *d, const struct ds_qwen3_config *t) DS_MUSTCHECK;

#endif
