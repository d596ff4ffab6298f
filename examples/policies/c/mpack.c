#include "mpack.h"

#include <stdlib.h>
#include <string.h>

static bool need(mp_reader *r, size_t n) {
    if (r->err || (size_t)(r->end - r->p) < n) {
        r->err = true;
        return false;
    }
    return true;
}

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

mp_type mp_peek(const mp_reader *r) {
    if (r->err || r->p >= r->end) return MP_BAD;
    uint8_t b = *r->p;
    if (b <= 0x7f || b >= 0xe0) return MP_INT;
    if (b >= 0x80 && b <= 0x8f) return MP_MAP;
    if (b >= 0x90 && b <= 0x9f) return MP_ARRAY;
    if (b >= 0xa0 && b <= 0xbf) return MP_STR;
    switch (b) {
    case 0xc0: return MP_NIL;
    case 0xc2: case 0xc3: return MP_BOOL;
    case 0xc4: case 0xc5: case 0xc6: return MP_BIN;
    case 0xca: case 0xcb: return MP_FLOAT;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: return MP_INT;
    case 0xd9: case 0xda: case 0xdb: return MP_STR;
    case 0xdc: case 0xdd: return MP_ARRAY;
    case 0xde: case 0xdf: return MP_MAP;
    case 0xc7: case 0xc8: case 0xc9: case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return MP_EXT;
    default: return MP_BAD;
    }
}

/* Reads a length-prefixed header: fixed form (mask) or 8/16/32-bit forms. */
static uint32_t header(mp_reader *r, uint8_t fix_lo, uint8_t fix_mask, uint8_t b8, uint8_t b16, uint8_t b32) {
    if (!need(r, 1)) return 0;
    uint8_t b = *r->p++;
    if ((b & (uint8_t)~fix_mask) == fix_lo) return b & fix_mask;
    int n = b == b8 && b8 ? 1 : b == b16 ? 2 : b == b32 ? 4 : 0;
    if (n == 0 || !need(r, (size_t)n)) {
        r->err = true;
        return 0;
    }
    uint32_t v = (uint32_t)be(r->p, n);
    r->p += n;
    return v;
}

uint32_t mp_read_map(mp_reader *r) { return header(r, 0x80, 0x0f, 0, 0xde, 0xdf); }
uint32_t mp_read_array(mp_reader *r) { return header(r, 0x90, 0x0f, 0, 0xdc, 0xdd); }

const char *mp_read_str(mp_reader *r, uint32_t *len) {
    *len = header(r, 0xa0, 0x1f, 0xd9, 0xda, 0xdb);
    if (!need(r, *len)) {
        *len = 0;
        return "";
    }
    const char *s = (const char *)r->p;
    r->p += *len;
    return s;
}

bool mp_key_is(mp_reader *r, const char *key) {
    if (mp_peek(r) != MP_STR) {
        mp_skip(r);
        return false;
    }
    uint32_t len;
    const char *s = mp_read_str(r, &len);
    return strlen(key) == len && memcmp(s, key, len) == 0;
}

double mp_read_num(mp_reader *r) {
    if (!need(r, 1)) return 0;
    uint8_t b = *r->p;
    if (b <= 0x7f) { r->p++; return b; }
    if (b >= 0xe0) { r->p++; return (int8_t)b; }
    static const int width[] = {[0xca - 0xca] = 4, [0xcb - 0xca] = 8, [0xcc - 0xca] = 1, [0xcd - 0xca] = 2,
                                [0xce - 0xca] = 4, [0xcf - 0xca] = 8, [0xd0 - 0xca] = 1, [0xd1 - 0xca] = 2,
                                [0xd2 - 0xca] = 4, [0xd3 - 0xca] = 8};
    if (b < 0xca || b > 0xd3) { r->err = true; return 0; }
    int n = width[b - 0xca];
    if (!need(r, 1 + (size_t)n)) return 0;
    uint64_t v = be(r->p + 1, n);
    r->p += 1 + n;
    switch (b) {
    case 0xca: { uint32_t u = (uint32_t)v; float f; memcpy(&f, &u, 4); return f; }
    case 0xcb: { double d; memcpy(&d, &v, 8); return d; }
    case 0xcc: case 0xcd: case 0xce: case 0xcf: return (double)v;
    case 0xd0: return (int8_t)v;
    case 0xd1: return (int16_t)v;
    case 0xd2: return (int32_t)v;
    default: return (double)(int64_t)v;
    }
}

int64_t mp_read_int(mp_reader *r) { return (int64_t)mp_read_num(r); }

bool mp_read_bool(mp_reader *r) {
    if (!need(r, 1)) return false;
    uint8_t b = *r->p++;
    if (b != 0xc2 && b != 0xc3) r->err = true;
    return b == 0xc3;
}

void mp_skip(mp_reader *r) {
    uint32_t n, len;
    switch (mp_peek(r)) {
    case MP_NIL: case MP_BOOL: r->p++; break;
    case MP_INT: case MP_FLOAT: (void)mp_read_num(r); break;
    case MP_STR: (void)mp_read_str(r, &len); break;
    case MP_ARRAY: n = mp_read_array(r); while (n-- && !r->err) mp_skip(r); break;
    case MP_MAP: n = mp_read_map(r); while (n-- && !r->err) { mp_skip(r); mp_skip(r); } break;
    case MP_BIN: {
        uint8_t b = *r->p++;
        int w = b == 0xc4 ? 1 : b == 0xc5 ? 2 : 4;
        if (!need(r, (size_t)w)) break;
        len = (uint32_t)be(r->p, w);
        r->p += w;
        if (need(r, len)) r->p += len;
        break;
    }
    case MP_EXT: {
        uint8_t b = *r->p++;
        size_t fixed = b == 0xd4 ? 1 : b == 0xd5 ? 2 : b == 0xd6 ? 4 : b == 0xd7 ? 8 : b == 0xd8 ? 16 : 0;
        if (fixed) { if (need(r, 1 + fixed)) r->p += 1 + fixed; break; }
        int w = b == 0xc7 ? 1 : b == 0xc8 ? 2 : 4;
        if (!need(r, (size_t)w)) break;
        len = (uint32_t)be(r->p, w);
        r->p += w;
        if (need(r, 1 + (size_t)len)) r->p += 1 + len;
        break;
    }
    default: r->err = true;
    }
}

static void put(mp_writer *w, const void *data, size_t n) {
    if (w->err) return;
    if (w->len + n > w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 256;
        while (cap < w->len + n) cap *= 2;
        uint8_t *buf = realloc(w->buf, cap);
        if (!buf) { w->err = true; return; }
        w->buf = buf;
        w->cap = cap;
    }
    memcpy(w->buf + w->len, data, n);
    w->len += n;
}

/* Tag byte + big-endian value of `n` bytes. */
static void put_be(mp_writer *w, uint8_t tag, uint64_t v, int n) {
    uint8_t b[9];
    b[0] = tag;
    for (int i = 0; i < n; i++) b[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    put(w, b, 1 + (size_t)n);
}

static void put_header(mp_writer *w, uint32_t n, uint8_t fix, uint32_t fix_max, uint8_t b8, uint8_t b16, uint8_t b32) {
    if (n <= fix_max) { uint8_t b = (uint8_t)(fix | n); put(w, &b, 1); }
    else if (b8 && n <= 0xff) put_be(w, b8, n, 1);
    else if (n <= 0xffff) put_be(w, b16, n, 2);
    else put_be(w, b32, n, 4);
}

void mp_write_map(mp_writer *w, uint32_t n) { put_header(w, n, 0x80, 15, 0, 0xde, 0xdf); }
void mp_write_array(mp_writer *w, uint32_t n) { put_header(w, n, 0x90, 15, 0, 0xdc, 0xdd); }
void mp_write_str(mp_writer *w, const char *s, size_t len) {
    put_header(w, (uint32_t)len, 0xa0, 31, 0xd9, 0xda, 0xdb);
    put(w, s, len);
}
void mp_write_cstr(mp_writer *w, const char *s) { mp_write_str(w, s, strlen(s)); }
void mp_write_uint(mp_writer *w, uint64_t v) {
    if (v <= 0x7f) { uint8_t b = (uint8_t)v; put(w, &b, 1); }
    else if (v <= 0xff) put_be(w, 0xcc, v, 1);
    else if (v <= 0xffff) put_be(w, 0xcd, v, 2);
    else if (v <= 0xffffffffu) put_be(w, 0xce, v, 4);
    else put_be(w, 0xcf, v, 8);
}
