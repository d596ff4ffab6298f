/* hottest: the C example policy (a CPU policy).
 *
 * Each quantum: find the busiest usable pCPU, and move the hottest vCPU on it
 * that helps to the least-loaded usable pCPU -- one move per quantum, taken
 * only if the busier of the two pCPUs drops by at least `min_gain` of a CPU
 * (so it never flaps). Load of a pCPU = its non-VM busy time plus the demand
 * (usage + steal) of the vCPUs that live there.
 *
 *   [params.hottest]
 *   min_gain = 0.05     # CPUs
 *
 * Built with clang --target=wasm32-wasi, no WASI imports: no stdio, no
 * snprintf; numbers in the reason are formatted by hand. */
#include <stdlib.h>
#include <string.h>

#include "mpack.h"
#include "policy.h"

#define MAX_CPUS 4096

typedef struct {
    const char *domain; /* points into the snapshot bytes */
    uint32_t domain_len, id, home, ran;
    double demand, usage;
} vcpu_t;

typedef struct {
    double min_gain;
    uint32_t ncpu;
    bool usable[MAX_CPUS];
    double background[MAX_CPUS]; /* cpu usage, then minus the usage of the vCPUs that ran there */
    double load[MAX_CPUS];
    vcpu_t *vcpus;
    size_t nvcpu, cap;
} world_t;

static uint64_t decisions; /* state: lives across quanta, reset on a reload or trap */

static void read_cpus(mp_reader *r, world_t *w) {
    for (uint32_t n = mp_read_array(r); n-- && !r->err;) {
        uint32_t id = 0;
        bool online = false, reserved = false;
        double usage = 0;
        for (uint32_t k = mp_read_map(r); k-- && !r->err;) {
            uint32_t len;
            const char *key = mp_peek(r) == MP_STR ? mp_read_str(r, &len) : (mp_skip(r), len = 0, "");
#define KEY(s) (len == sizeof(s) - 1 && memcmp(key, s, len) == 0)
            if (KEY("id")) id = (uint32_t)mp_read_int(r);
            else if (KEY("online")) online = mp_read_bool(r);
            else if (KEY("reserved")) reserved = mp_read_bool(r);
            else if (KEY("usage")) usage = mp_read_num(r);
            else mp_skip(r);
        }
        if (id >= MAX_CPUS) continue;
        if (id + 1 > w->ncpu) w->ncpu = id + 1;
        w->usable[id] = online && !reserved;
        w->background[id] = usage;
    }
}

static void read_vcpus(mp_reader *r, world_t *w, const char *dom, uint32_t dom_len) {
    for (uint32_t n = mp_read_array(r); n-- && !r->err;) {
        vcpu_t v = {dom, dom_len, 0, 0, 0, 0, 0};
        uint32_t cpu = 0, pinned = UINT32_MAX, naff = 0;
        double usage = 0, steal = 0;
        for (uint32_t k = mp_read_map(r); k-- && !r->err;) {
            uint32_t len;
            const char *key = mp_peek(r) == MP_STR ? mp_read_str(r, &len) : (mp_skip(r), len = 0, "");
            if (KEY("id")) v.id = (uint32_t)mp_read_int(r);
            else if (KEY("cpu")) cpu = (uint32_t)mp_read_int(r);
            else if (KEY("usage")) usage = mp_read_num(r);
            else if (KEY("steal")) steal = mp_read_num(r);
            else if (KEY("affinity")) {
                naff = mp_read_array(r);
                for (uint32_t i = 0; i < naff && !r->err; i++) pinned = (uint32_t)mp_read_int(r);
            } else mp_skip(r);
        }
        v.home = naff == 1 ? pinned : cpu; /* pinned to one pCPU, else where it ran */
        v.demand = usage + steal;
        v.ran = cpu;
        v.usage = usage;
        if (w->nvcpu == w->cap) {
            size_t cap = w->cap ? w->cap * 2 : 64;
            vcpu_t *grown = realloc(w->vcpus, cap * sizeof *grown);
            if (!grown) { r->err = true; return; }
            w->vcpus = grown;
            w->cap = cap;
        }
        w->vcpus[w->nvcpu++] = v;
    }
}

static void read_snapshot(mp_reader *r, world_t *w) {
    for (uint32_t k = mp_read_map(r); k-- && !r->err;) {
        uint32_t len;
        const char *key = mp_peek(r) == MP_STR ? mp_read_str(r, &len) : (mp_skip(r), len = 0, "");
        if (KEY("host")) {
            for (uint32_t h = mp_read_map(r); h-- && !r->err;) {
                if (mp_key_is(r, "cpus")) read_cpus(r, w);
                else mp_skip(r);
            }
        } else if (KEY("domains")) {
            for (uint32_t n = mp_read_array(r); n-- && !r->err;) {
                const char *name = "";
                uint32_t name_len = 0;
                /* `name` may come after `vcpus`: read the vCPUs, then fix their domain. */
                size_t first = w->nvcpu;
                for (uint32_t d = mp_read_map(r); d-- && !r->err;) {
                    uint32_t l2;
                    const char *k2 = mp_peek(r) == MP_STR ? mp_read_str(r, &l2) : (mp_skip(r), l2 = 0, "");
                    if (l2 == 4 && memcmp(k2, "name", 4) == 0) name = mp_read_str(r, &name_len);
                    else if (l2 == 5 && memcmp(k2, "vcpus", 5) == 0) read_vcpus(r, w, "", 0);
                    else mp_skip(r);
                }
                for (size_t i = first; i < w->nvcpu; i++) {
                    w->vcpus[i].domain = name;
                    w->vcpus[i].domain_len = name_len;
                }
            }
        } else if (KEY("params")) {
            for (uint32_t p = mp_read_map(r); p-- && !r->err;) {
                if (mp_peek(r) == MP_STR && mp_key_is(r, "hottest") && mp_peek(r) == MP_MAP) {
                    for (uint32_t q = mp_read_map(r); q-- && !r->err;) {
                        if (mp_key_is(r, "min_gain") && (mp_peek(r) == MP_INT || mp_peek(r) == MP_FLOAT))
                            w->min_gain = mp_read_num(r);
                        else mp_skip(r);
                    }
                } else mp_skip(r);
            }
        } else mp_skip(r);
#undef KEY
    }
}

/* Appends the decimal form of v to s. */
static char *put_u(char *s, uint64_t v) {
    char tmp[24];
    int n = 0;
    do tmp[n++] = (char)('0' + v % 10); while (v /= 10);
    while (n) *s++ = tmp[--n];
    return s;
}

/* Appends x with two decimals (x >= 0). */
static char *put_f2(char *s, double x) {
    uint64_t c = (uint64_t)(x * 100 + 0.5);
    s = put_u(s, c / 100);
    *s++ = '.';
    *s++ = (char)('0' + c / 10 % 10);
    *s++ = (char)('0' + c % 10);
    return s;
}

static char *put_s(char *s, const char *t) {
    while (*t) *s++ = *t++;
    return s;
}

/* Decides; writes {"actions": [...]} to out. Returns NULL or an error message. */
static const char *plan(const uint8_t *bytes, size_t len, mp_writer *out) {
    static world_t w; /* large arrays: static, not on the 64 KiB-ish stack */
    free(w.vcpus);
    memset(&w, 0, sizeof w);
    w.min_gain = 0.05;
    mp_reader r = {bytes, bytes + len, false};
    read_snapshot(&r, &w);
    if (r.err) return "cannot decode snapshot (malformed MessagePack)";

    /* Non-VM load: what a pCPU was busy with besides the vCPUs that ran there. */
    for (size_t i = 0; i < w.nvcpu; i++)
        if (w.vcpus[i].ran < w.ncpu) w.background[w.vcpus[i].ran] -= w.vcpus[i].usage;
    for (uint32_t c = 0; c < w.ncpu; c++) w.load[c] = w.background[c] > 0 ? w.background[c] : 0;
    for (size_t i = 0; i < w.nvcpu; i++)
        if (w.vcpus[i].home < w.ncpu) w.load[w.vcpus[i].home] += w.vcpus[i].demand;

    int64_t busiest = -1, idlest = -1;
    for (uint32_t c = 0; c < w.ncpu; c++) {
        if (!w.usable[c]) continue;
        if (busiest < 0 || w.load[c] > w.load[busiest]) busiest = c;
        if (idlest < 0 || w.load[c] < w.load[idlest]) idlest = c;
    }
    const vcpu_t *best = NULL;
    if (busiest >= 0 && busiest != idlest) {
        double b = w.load[busiest], l = w.load[idlest];
        for (size_t i = 0; i < w.nvcpu; i++) {
            const vcpu_t *v = &w.vcpus[i];
            double after = b - v->demand > l + v->demand ? b - v->demand : l + v->demand;
            if (v->home == (uint32_t)busiest && b - after >= w.min_gain && (!best || v->demand > best->demand)) best = v;
        }
    }
    mp_write_map(out, 1);
    mp_write_cstr(out, "actions");
    mp_write_array(out, best ? 1 : 0);
    if (best) {
        char reason[160], *s = reason;
        s = put_s(s, "hottest vCPU (");
        s = put_f2(s, best->demand);
        s = put_s(s, ") off busiest pCPU ");
        s = put_u(s, (uint64_t)busiest);
        s = put_s(s, " (");
        s = put_f2(s, w.load[busiest]);
        s = put_s(s, ") to ");
        s = put_u(s, (uint64_t)idlest);
        s = put_s(s, " (");
        s = put_f2(s, w.load[idlest]);
        s = put_s(s, ")");
        mp_write_map(out, 5);
        mp_write_cstr(out, "kind");
        mp_write_cstr(out, "pin");
        mp_write_cstr(out, "domain");
        mp_write_str(out, best->domain, best->domain_len);
        mp_write_cstr(out, "vcpu");
        mp_write_uint(out, best->id);
        mp_write_cstr(out, "cpus");
        mp_write_array(out, 1);
        mp_write_uint(out, (uint64_t)idlest);
        mp_write_cstr(out, "reason");
        mp_write_str(out, reason, (size_t)(s - reason));
    }
    return out->err ? "out of memory" : NULL;
}

/* ---- the world's exports (names from the generated policy.h) ---- */

static void set_string(policy_string_t *s, const char *text) {
    policy_string_dup(s, text); /* malloc'd: the canonical ABI frees it after the call */
}

void exports_policy_describe(policy_policy_info_t *ret) {
    set_string(&ret->name, "hottest-c");
    set_string(&ret->version, "0.1.0");
    ret->cpu = true;
    ret->memory = false;
}

bool exports_policy_decide(policy_list_u8_t *snapshot, policy_list_u8_t *ret, policy_string_t *err) {
    mp_writer out = {0};
    const char *error = plan(snapshot->ptr, snapshot->len, &out);
    policy_list_u8_free(snapshot);
    if (decisions++ == 0) {
        policy_string_t msg;
        set_string(&msg, "hottest-c: first quantum");
        policy_log(POLICY_LEVEL_INFO, &msg);
        policy_string_free(&msg);
    }
    if (error) {
        free(out.buf);
        set_string(err, error);
        return false;
    }
    ret->ptr = out.buf;
    ret->len = out.len;
    return true;
}
