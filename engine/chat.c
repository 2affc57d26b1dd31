/* chat.c: Qwen3's chat template (ChatML), rendered as its Jinja template in
 * tokenizer_config.json does for system, user, assistant and tool messages
 * without tool definitions:
 *
 *   - a leading system message opens the conversation;
 *   - user messages, and system messages after the first, are
 *     "<|im_start|>role\ncontent<|im_end|>\n";
 *   - an assistant message loses its "<think>...</think>" reasoning unless it
 *     follows the last real user query (a user message that is not a wrapped
 *     tool response); there the reasoning is kept in a "<think>" block, which
 *     the final message always gets, empty or not;
 *   - consecutive tool messages share one user turn of <tool_response> blocks;
 *   - the generation prompt is "<|im_start|>assistant\n", followed by an empty
 *     think block when thinking is off. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "dspark/ds-tokenizer.h"

struct sbuf {
    char *p;
    size_t n, cap;
};

static void sb_add(struct sbuf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = ds_xrealloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void sb_str(struct sbuf *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

/* A view of part of a string: Python's str methods on [p, p + n). */
struct span {
    const char *p;
    size_t n;
};

static struct span lstrip_nl(struct span s)
{
    while (s.n && *s.p == '\n') {
        s.p++;
        s.n--;
    }
    return s;
}

static struct span rstrip_nl(struct span s)
{
    while (s.n && s.p[s.n - 1] == '\n')
        s.n--;
    return s;
}

/* Position of the first (last) occurrence of needle in s, or NULL. */
static const char *find_first(struct span s, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= s.n; i++)
        if (memcmp(s.p + i, needle, k) == 0)
            return s.p + i;
    return NULL;
}

static const char *find_last(struct span s, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = s.n; i >= k; i--)
        if (memcmp(s.p + i - k, needle, k) == 0)
            return s.p + i - k;
    return NULL;
}

static bool starts_with(const char *s, const char *pre)
{
    return strncmp(s, pre, strlen(pre)) == 0;
}

static bool ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && memcmp(s + n - k, suf, k) == 0;
}

int ds_chat_render(const struct ds_chat_message *msgs, size_t n, bool add_generation_prompt, bool enable_thinking,
                   char **ret)
{
    if (n == 0 || !msgs)
        return ds_seterr(DS_EINVAL, "chat has no messages");
    for (size_t i = 0; i < n; i++) {
        const char *r = msgs[i].role;
        if (!r || (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 && strcmp(r, "assistant") != 0 &&
                   strcmp(r, "tool") != 0))
            return ds_seterr(DS_EINVAL, "chat message %zu: unknown role '%s'", i, r ? r : "(null)");
    }
#define ROLE(i, name) (strcmp(msgs[i].role, name) == 0)
#define CONTENT(i) (msgs[i].content ? msgs[i].content : "")
    /* the last user message that is a real query, not a tool response */
    size_t last_query = n - 1;
    for (size_t k = n; k-- > 0;) {
        if (ROLE(k, "user") && !(starts_with(CONTENT(k), "<tool_response>") &&
                                  ends_with(CONTENT(k), "</tool_response>"))) {
            last_query = k;
            break;
        }
    }
    struct sbuf b = { 0 };
    sb_str(&b, "");
    if (ROLE(0, "system")) {
        sb_str(&b, "<|im_start|>system\n");
        sb_str(&b, CONTENT(0));
        sb_str(&b, "<|im_end|>\n");
    }
    for (size_t i = 0; i < n; i++) {
        const char *c = CONTENT(i);
        if (ROLE(i, "user") || (ROLE(i, "system") && i > 0)) {
            sb_str(&b, "<|im_start|>");
            sb_str(&b, msgs[i].role);
            sb_str(&b, "\n");
            sb_str(&b, c);
            sb_str(&b, "<|im_end|>\n");
        } else if (ROLE(i, "assistant")) {
            struct span all = { c, strlen(c) }, content = all, reasoning = { "", 0 };
            const char *close = find_first(all, "</think>");
            if (close) {
                const char *lastc = find_last(all, "</think>");
                content = lstrip_nl((struct span){ lastc + 8, (size_t)(all.p + all.n - (lastc + 8)) });
                struct span before = rstrip_nl((struct span){ all.p, (size_t)(close - all.p) });
                const char *open = find_last(before, "<think>");
                if (open)
                    before = (struct span){ open + 7, (size_t)(before.p + before.n - (open + 7)) };
                reasoning = lstrip_nl(before);
            }
            sb_str(&b, "<|im_start|>assistant\n");
            if (i > last_query && (i == n - 1 || reasoning.n)) {
                reasoning = rstrip_nl(lstrip_nl(reasoning));
                content = lstrip_nl(content);
                sb_str(&b, "<think>\n");
                sb_add(&b, reasoning.p, reasoning.n);
                sb_str(&b, "\n</think>\n\n");
            }
            sb_add(&b, content.p, content.n);
            sb_str(&b, "<|im_end|>\n");
        } else if (ROLE(i, "tool")) {
            if (i == 0 || !ROLE(i - 1, "tool"))
                sb_str(&b, "<|im_start|>user");
            sb_str(&b, "\n<tool_response>\n");
            sb_str(&b, c);
            sb_str(&b, "\n</tool_response>");
            if (i == n - 1 || !ROLE(i + 1, "tool"))
                sb_str(&b, "<|im_end|>\n");
        }
    }
#undef ROLE
#undef CONTENT
    if (add_generation_prompt) {
        sb_str(&b, "<|im_start|>assistant\n");
        if (!enable_thinking)
            sb_str(&b, "<think>\n\n</think>\n\n");
    }
    *ret = b.p;
    return 0;
}

char *ds_chat_content_text(const json_t *content, const char **why, long *part)
{
    json_t *c = (json_t *)content;   /* jansson's readers take no const */
    *part = -1;
    if (json_is_string(c)) {
        if (strlen(json_string_value(c)) != json_string_length(c)) {   /* (a reader with JSON_ALLOW_NUL) */
            *why = "contains a NUL character";
            return NULL;
        }
        return ds_xstrdup(json_string_value(c));
    }
    if (!c) {
        *why = "missing";
        return NULL;
    }
    if (json_is_null(c)) {
        *why = "null (tool calls are not supported)";
        return NULL;
    }
    if (!json_is_array(c)) {
        *why = "must be a string or an array of text parts";
        return NULL;
    }
    size_t len = 0, k;
    json_t *p;
    json_array_foreach(c, k, p) {
        json_t *type = json_object_get(p, "type"), *text = json_object_get(p, "text");
        if (!json_is_string(type) || strcmp(json_string_value(type), "text") != 0 || !json_is_string(text)) {
            *why = "only {\"type\": \"text\", \"text\": ...} parts are supported";
            *part = (long)k;
            return NULL;
        }
        len += json_string_length(text) + 1;
    }
    char *s = ds_xmalloc(len + 1);
    size_t off = 0;
    json_array_foreach(c, k, p) {
        json_t *text = json_object_get(p, "text");
        if (k > 0)
            s[off++] = '\n';
        memcpy(s + off, json_string_value(text), json_string_length(text));
        off += json_string_length(text);
    }
    s[off] = 0;
    if (strlen(s) != off) {
        free(s);
        *why = "contains a NUL character";
        return NULL;
    }
    return s;
}
