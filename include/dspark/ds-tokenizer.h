/* ds-tokenizer.h: Hugging Face tokenizer.json byte-level BPE, as Qwen3 uses it,
 * with ids identical to the `tokenizers` library, and Qwen3 chat rendering.
 *
 * Pipeline (encode): added/special tokens are split out first (longest match,
 * as the reference does), each remaining piece is NFC-normalized, split by the
 * pre-tokenizer regex (PCRE2, Unicode properties), mapped to byte-level
 * characters and merged by BPE rank. Decode maps ids back to tokens, tokens
 * back to bytes (added tokens verbatim).
 *
 * A loaded tokenizer is immutable and safe to use from many threads at once. */
#ifndef DS_TOKENIZER_H
#define DS_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dspark/ds-err.h"

struct ds_tokenizer;

/* path: a tokenizer.json file, or a directory holding one. */
int ds_tokenizer_load(const char *path, struct ds_tokenizer **ret) DS_MUSTCHECK;
struct ds_tokenizer *ds_tokenizer_free(struct ds_tokenizer *tok);

/* Encode len bytes of UTF-8 text (invalid UTF-8 is DS_EINVAL). *ret_ids is
 * malloc'ed and owned by the caller. No BOS/EOS is added (Qwen3 adds none). */
int ds_tokenizer_encode(const struct ds_tokenizer *tok, const char *text, size_t len,
                        int32_t **ret_ids, size_t *ret_n) DS_MUSTCHECK;
/* Decode ids to bytes (not necessarily valid UTF-8 for a partial sequence);
 * special tokens are kept, as `tokenizers` decode(skip_special_tokens=False).
 * *ret_text is malloc'ed, NUL-terminated, owned by the caller. */
int ds_tokenizer_decode(const struct ds_tokenizer *tok, const int32_t *ids, size_t n,
                        char **ret_text, size_t *ret_len) DS_MUSTCHECK;
/* The same, but an id the tokenizer has no token for adds nothing (as `tokenizers` decode skips it):
 * a model's vocab_size is often larger than its tokenizer (Qwen3: 151,936 rows, 151,669 tokens), and
 * sampling can draw the rest. Fails only for lack of memory. */
int ds_tokenizer_decode_known(const struct ds_tokenizer *tok, const int32_t *ids, size_t n,
                              char **ret_text, size_t *ret_len) DS_MUSTCHECK;
/* Append the bytes of one token to buf (for streaming); returns the byte count
 * or a negative DS_E* for an unknown id. buf needs room for 256 bytes. */
int ds_tokenizer_token_bytes(const struct ds_tokenizer *tok, int32_t id, char *buf, size_t cap);

/* Number of ids (base vocab + added tokens, max id + 1). */
int ds_tokenizer_vocab_size(const struct ds_tokenizer *tok);
/* The id of a token string (vocab or added token), or -1. */
int32_t ds_tokenizer_token_id(const struct ds_tokenizer *tok, const char *token);
/* True if id is an added token flagged special. */
bool ds_tokenizer_is_special(const struct ds_tokenizer *tok, int32_t id);

/* Qwen3 chat template (ChatML). role: "system", "user" or "assistant". */
struct ds_chat_message {
    const char *role;
    const char *content;
};

/* Render messages as Qwen3's chat template does, with add_generation_prompt;
 * enable_thinking=false appends the empty "<think>\n\n</think>\n\n" block the
 * template emits in non-thinking mode. *ret is malloc'ed, NUL-terminated. */
int ds_chat_render(const struct ds_chat_message *msgs, size_t n, bool add_generation_prompt,
                   bool enable_thinking, char **ret) DS_MUSTCHECK;

/* The text of a message's content as OpenAI's chat API gives it (jansson): a
 * string, or an array of {"type": "text", "text": ...} parts joined with
 * newlines (as vLLM and TensorRT-LLM join them). Returns it malloc'ed, or NULL
 * with *why saying what is wrong ("missing", "null (tool calls are not
 * supported)", ...) and *part the index of the part at fault (-1: the content
 * itself). dsparkctl and dspark-generate read messages with it. */
struct json_t;
char *ds_chat_content_text(const struct json_t *content, const char **why, long *part);

#endif
