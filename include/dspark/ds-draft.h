/* ds-draft.h: the DSpark / DFlash draft model (DeepSpec checkpoint directories,
 * dspark-spec.md §1–§3) on the CPU backend. */
#ifndef DS_DRAFT_H
#define DS_DRAFT_H

#include <stdio.h>

#include "dspark/ds-config.h"
#include "dspark/ds-err.h"

struct ds_model;
struct ds_engine;
struct ds_draft;

/* Load DIR (config.json, model.safetensors, optional sts.json) for this target;
 * embedding and LM head come from the target when absent or equal. */
int ds_draft_load(const char *dir, const struct ds_model *target, struct ds_draft **ret) DS_MUSTCHECK;
struct ds_draft *ds_draft_free(struct ds_draft *d);
const struct ds_dspark_config *ds_draft_config(const struct ds_draft *d);
/* The checkpoint's identity (16 hex digits, as struct ds_model's checksum); borrowed. */
const char *ds_draft_checksum(const struct ds_draft *d);

/* Write one JSON line per round and sequence to f (NULL: off). */
void ds_engine_set_trace(struct ds_engine *e, FILE *f);

/* With the CUDA backend the engine's draft runs from its GPU copy: free the
 * host copy of the draft's weights (gigabytes for a full-size draft). The draft
 * keeps its configuration and calibration but serves no other engine and no
 * CPU pass afterwards (ds_engine_new and the CPU draft refuse it). Returns the
 * bytes freed: 0 when the engine does not run its draft on the GPU. */
size_t ds_engine_release_draft_weights(struct ds_engine *e);

#endif
