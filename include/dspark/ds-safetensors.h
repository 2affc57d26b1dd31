/* ds-safetensors.h: read-only, mmap'ed safetensors checkpoints (single file or sharded).
 *
 * File format (https://huggingface.co/docs/safetensors): 8 bytes little-endian
 * u64 N, then N bytes of UTF-8 JSON {"name": {"dtype": "BF16", "shape": [..],
 * "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}, then the data
 * buffer; offsets are relative to the start of the data buffer, end exclusive.
 * Every tensor must lie inside the buffer, tensors must not overlap, and the
 * byte size must equal prod(shape) * sizeof(dtype). A sharded checkpoint has
 * model.safetensors.index.json {"weight_map": {"name": "shard file"}}.
 *
 * Ownership: a ds_st owns its mappings; ds_tensor pointers and their data stay
 * valid until ds_st_free(). Thread-safe for concurrent readers once opened. */
#ifndef DS_SAFETENSORS_H
#define DS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-err.h"

#define DS_ST_MAX_DIMS 8
/* Refuse headers larger than this (the format's own reference limit is 100 MB). */
#define DS_ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

enum ds_dtype {
    DS_DTYPE_F32 = 0,
    DS_DTYPE_F16,
    DS_DTYPE_BF16,
    DS_DTYPE_F64,
    DS_DTYPE_I64,
    DS_DTYPE_I32,
    DS_DTYPE_I16,
    DS_DTYPE_I8,
    DS_DTYPE_U8,
    DS_DTYPE_BOOL,
    DS_DTYPE_F8_E4M3,
    DS_DTYPE_F8_E5M2,
    DS_DTYPE_COUNT
};

struct ds_tensor {
    const char *name;       /* tensor name as stored */
    const char *file;       /* path of the file holding it */
    enum ds_dtype dtype;
    int ndim;
    int64_t shape[DS_ST_MAX_DIMS];
    int64_t numel;
    const void *data;       /* [numel] elements of dtype, in the mapping; may be unaligned */
    size_t nbytes;
};

struct ds_st;

/* Open "DIR/model.safetensors", or the shards listed by
 * "DIR/model.safetensors.index.json" when that exists. */
int ds_st_open_dir(const char *dir, struct ds_st **ret) DS_MUSTCHECK;
/* Open one .safetensors file. */
int ds_st_open_file(const char *path, struct ds_st **ret) DS_MUSTCHECK;
/* Parse and validate a complete in-memory file image (header and data);
 * fname is used in messages only. The ds_st borrows buf (it must outlive it).
 * This is the fuzzing entry point. */
int ds_st_open_buffer(const void *buf, size_t len, const char *fname, struct ds_st **ret) DS_MUSTCHECK;
struct ds_st *ds_st_free(struct ds_st *st);

size_t ds_st_count(const struct ds_st *st);
const struct ds_tensor *ds_st_at(const struct ds_st *st, size_t i);
/* NULL when absent. */
const struct ds_tensor *ds_st_find(const struct ds_st *st, const char *name);
/* Refuse tensors of a layer the config does not have: a name "PREFIX N." (prefix
 * "model.layers.") with N >= n_layers is DS_EFORMAT naming the tensor, its file
 * and `key`, the config key that gave n_layers. A checkpoint of more layers than
 * its config says would otherwise run with some of them left out. */
int ds_st_check_layers(const struct ds_st *st, const char *prefix, int n_layers, const char *key) DS_MUSTCHECK;
/* Find a tensor and check its shape (ndim values in shape); a missing tensor or
 * a shape mismatch is DS_EFORMAT with a message naming file and tensor.
 * Only floating dtypes F32, F16 and BF16 are accepted. */
int ds_st_get(const struct ds_st *st, const char *name, int ndim, const int64_t *shape,
              const struct ds_tensor **ret) DS_MUSTCHECK;

const char *ds_dtype_name(enum ds_dtype dt);   /* "BF16" */
size_t ds_dtype_size(enum ds_dtype dt);         /* bytes per element */

/* Convert n elements starting at element offset `first` of t to f32. */
void ds_tensor_to_f32(const struct ds_tensor *t, size_t first, size_t n, float *out /* [n] */);

float ds_bf16_to_f32(uint16_t h);
float ds_f16_to_f32(uint16_t h);
uint16_t ds_f32_to_bf16(float f);   /* round to nearest even, as torch does */

#endif
