/* A small MessagePack reader and writer: just what a vm-balancer policy
 * needs (maps, arrays, strings, ints, floats, bools, nil), no allocation in
 * the reader, a growable buffer for the writer, no libc formatting (snprintf
 * would pull in WASI imports). */
#ifndef MPACK_H
#define MPACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Reader: a cursor over the snapshot. Any malformed input sets `err`; every
 * later call then returns a zero value, so callers check once at the end. */
typedef struct {
    const uint8_t *p, *end;
    bool err;
} mp_reader;

typedef enum { MP_NIL, MP_BOOL, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT, MP_BAD } mp_type;

mp_type mp_peek(const mp_reader *r);
uint32_t mp_read_map(mp_reader *r);   /* number of key/value pairs */
uint32_t mp_read_array(mp_reader *r); /* number of elements */
/* A string, not NUL-terminated; *len gets its length. */
const char *mp_read_str(mp_reader *r, uint32_t *len);
/* True if the next value is the string `key` (consumed either way). */
bool mp_key_is(mp_reader *r, const char *key);
int64_t mp_read_int(mp_reader *r);    /* ints; floats are truncated */
double mp_read_num(mp_reader *r);     /* ints or floats */
bool mp_read_bool(mp_reader *r);
void mp_skip(mp_reader *r);           /* any value, nested ones included */

/* Writer: appends to a malloc'd buffer; `err` on allocation failure. */
typedef struct {
    uint8_t *buf;
    size_t len, cap;
    bool err;
} mp_writer;

void mp_write_map(mp_writer *w, uint32_t n);
void mp_write_array(mp_writer *w, uint32_t n);
void mp_write_str(mp_writer *w, const char *s, size_t len);
void mp_write_cstr(mp_writer *w, const char *s);
void mp_write_uint(mp_writer *w, uint64_t v);

#endif
