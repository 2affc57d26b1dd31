/* load-util.h: loading checked tensors from a safetensors set into the CPU
 * backend's forms (f32 arrays, packed matrices); shared by model.c and draft.c. */
#ifndef DS_LOAD_UTIL_H
#define DS_LOAD_UTIL_H

#include <stdint.h>

#include "dspark/ds-gemm.h"
#include "dspark/ds-safetensors.h"

/* A tensor of exactly this shape as a new f32 array (caller frees). */
int ds_load_f32(const struct ds_st *st, const char *name, int ndim, const int64_t *shape, float **ret);
int ds_load_vec(const struct ds_st *st, const char *name, int64_t n, float **ret);
/* Several 1-D tensors of lengths lens[i], concatenated into one new f32 array (caller frees). */
int ds_load_concat(const struct ds_st *st, const char *const *names, const int64_t *lens, int n, float **ret);
/* A [rows, cols] tensor packed for ds_gemm. */
int ds_load_mat(const struct ds_st *st, const char *name, int64_t rows, int64_t cols, struct ds_mat *m);
/* Several [rows_i, cols] tensors stacked into one packed matrix (at most 16). */
int ds_load_stacked(const struct ds_st *st, const char *const *names, const int64_t *rows, int n, int64_t cols,
                    struct ds_mat *out);

/* A cheap identity for a checkpoint: FNV-1a over tensor names, dtypes, shapes and
 * the first 4 KiB of each tensor's data, as 16 hex digits (not a cryptographic digest). */
void ds_st_checksum(const struct ds_st *st, char out[17]);

#endif
