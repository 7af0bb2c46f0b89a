/* surgeon's kernels for mergekit's generalized task arithmetic (ties, breadcrumbs, magnitude_prune, ...).
 *
 * Built at first use by surgeon/ops/native_gta.py with the system C compiler (-O3 -ffp-contract=off: no fused
 * multiply-add the source does not ask for) and called through ctypes (the GIL is released during a call).
 *
 * tau_abs      |θ − θ_base| (or |τ|) of one block in float32, its L1 norm in double, whether any is non-zero;
 *              tau_abs_pairs the same as (value, index) pairs, what sorted_range permutes.
 * sorted_range which elements of a float32 array land at positions [lo, hi) of torch's CPU sort (not stable:
 *              introsort, median of three, Hoare partition, insertion sort of runs of at most 16), that is which
 *              of the values tied at a threshold mergekit's argsort keeps. Only the partitions that contain a
 *              boundary are carried out (a quickselect along those paths), each exactly as the full sort does
 *              it, so the kept set is the sort's without sorting. Returns -1 where the sort would have switched
 *              to heapsort (its depth limit): the caller then runs the sort itself.
 * gta_block    one block of θ_base + λ·mix(w_i·mask_i·s_i·τ_i) rounded once to the output dtype, per element and
 *              in mergekit's order of float32 operations (sign election by sum or count, divisor the sum of the
 *              agreeing weights).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };
#define INLINE static inline __attribute__((always_inline))
#define RUN 16 /* the sort leaves runs of at most this many to its final insertion sort */

INLINE float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float load(const void *p, int dt, size_t i) {
    if (dt == BF16) return bits_to_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dt == F16) return (float)((const _Float16 *)p)[i];
    return ((const float *)p)[i];
}

INLINE void store(void *p, int dt, size_t i, float x) {
    if (dt == BF16) {
        uint32_t u = f32_to_bits(x);
        uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16; /* to nearest, ties to even (torch's cast) */
        ((uint16_t *)p)[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : nearest);
    } else if (dt == F16) {
        ((_Float16 *)p)[i] = (_Float16)x;
    } else {
        ((float *)p)[i] = x;
    }
}

/* out[i] = |a[i] − b[i]| (b NULL: |a[i]|) in float32; *l1 = Σ out (double) unless l1 is NULL. Returns 1 when
 * any out[i] != 0.
 * Loops split by dtype so that each one vectorizes. */
#define ABS_LOOP(EXPR)                                       \
    for (size_t i = 0; i < n; i++) out[i] = fabsf(EXPR);
int tau_abs(const void *a, int adt, const void *b, int bdt, size_t n, float *out, double *l1) {
    if (b && adt == BF16 && bdt == BF16) {
        ABS_LOOP(load(a, BF16, i) - load(b, BF16, i))
    } else if (b) {
        ABS_LOOP(load(a, adt, i) - load(b, bdt, i))
    } else if (adt == BF16) {
        ABS_LOOP(load(a, BF16, i))
    } else {
        ABS_LOOP(load(a, adt, i))
    }
    uint32_t any = 0;
    for (size_t i = 0; i < n; i++) any |= f32_to_bits(out[i]); /* |x| >= +0: non-zero bits are a non-zero */
    if (l1) {
        double sum = 0.0;
        for (size_t i = 0; i < n; i++) sum += out[i];
        *l1 = sum;
    }
    return any != 0;
}

/* -- torch's CPU sort, followed only where a boundary lies ------------------------------------------------ */
typedef struct {
    float v;    /* the value sorted */
    int32_t ix; /* where it was */
} Pair;         /* values and indices side by side: a swap moves one 8-byte word */

/* out[i] = (|a[i] − b[i]| or |a[i]|, start + i) for one block; *l1 = Σ |.| unless NULL; 1 when any is non-zero */
int tau_abs_pairs(const void *a, int adt, const void *b, int bdt, size_t n, int64_t start, Pair *out, double *l1) {
    float block[1024];
    uint32_t any = 0;
    double sum = 0.0;
    if (l1) *l1 = 0.0;
    for (size_t off = 0; off < n; off += 1024) {
        size_t m = n - off < 1024 ? n - off : 1024;
        int nz = tau_abs((const char *)a + off * (adt == F32 ? 4 : 2), adt,
                         b ? (const char *)b + off * (bdt == F32 ? 4 : 2) : NULL, bdt, m, block, l1 ? &sum : NULL);
        any |= (uint32_t)nz;
        if (l1) *l1 += sum;
        for (size_t i = 0; i < m; i++) {
            out[off + i].v = block[i];
            out[off + i].ix = (int32_t)(start + (int64_t)(off + i));
        }
    }
    return any != 0;
}

/* pairs (values[i], i): for callers that hold the values alone */
void fill_pairs(const float *values, int64_t n, Pair *out) {
    for (int64_t i = 0; i < n; i++) {
        out[i].v = values[i];
        out[i].ix = (int32_t)i;
    }
}

typedef struct {
    Pair *a;
    int desc;
    int64_t lo, hi;
    uint8_t *mask;
    double kept_l1;
} Sel;

/* torch's comparators: descending puts NaN first, ascending last */
INLINE int comes_before(const Sel *s, float a, float b) {
    if (s->desc) return (isnan(a) && !isnan(b)) || a > b;
    return (!isnan(a) && isnan(b)) || a < b;
}

INLINE void swap_at(Sel *s, int64_t i, int64_t j) {
    Pair t = s->a[i];
    s->a[i] = s->a[j];
    s->a[j] = t;
}

/* the median of the values at a, b, c moved to position r */
static void median_to(Sel *s, int64_t r, int64_t a, int64_t b, int64_t c) {
    const Pair *v = s->a;
    if (comes_before(s, v[a].v, v[b].v)) {
        if (comes_before(s, v[b].v, v[c].v)) swap_at(s, r, b);
        else if (comes_before(s, v[a].v, v[c].v)) swap_at(s, r, c);
        else swap_at(s, r, a);
    } else if (comes_before(s, v[a].v, v[c].v)) {
        swap_at(s, r, a);
    } else if (comes_before(s, v[b].v, v[c].v)) {
        swap_at(s, r, c);
    } else {
        swap_at(s, r, b);
    }
}

/* Hoare partition of [first, last) around the value at ``pivot`` (outside the range, a sentinel below it) */
static int64_t partition(Sel *s, int64_t first, int64_t last, int64_t pivot) {
    const float p = s->a[pivot].v;
    for (;;) {
        while (comes_before(s, s->a[first].v, p)) first++;
        last--;
        while (comes_before(s, p, s->a[last].v)) last--;
        if (!(first < last)) return first;
        swap_at(s, first, last);
        first++;
    }
}

/* stable insertion sort of a short run (what the final insertion sort does to it) */
static void insertion_sort(Sel *s, int64_t first, int64_t last) {
    for (int64_t i = first + 1; i < last; i++) {
        Pair x = s->a[i];
        int64_t j = i;
        while (j > first && comes_before(s, x.v, s->a[j - 1].v)) {
            s->a[j] = s->a[j - 1];
            j--;
        }
        s->a[j] = x;
    }
}

INLINE int splits(const Sel *s, int64_t first, int64_t last) {
    return (first < s->lo && s->lo < last) || (first < s->hi && s->hi < last);
}

/* the positions of [first, last) inside [lo, hi) hold kept elements */
static void mark(Sel *s, int64_t first, int64_t last) {
    int64_t a = first > s->lo ? first : s->lo, b = last < s->hi ? last : s->hi;
    double sum = 0.0;
    for (int64_t p = a; p < b; p++) {
        int32_t i = s->a[p].ix;
        s->mask[i >> 3] |= (uint8_t)(1u << (i & 7)); /* bits: the mask stays in cache */
        sum += s->a[p].v;
    }
    s->kept_l1 += sum;
}

static int follow(Sel *s, int64_t first, int64_t last, int depth) {
    while (last - first > RUN) {
        if (!splits(s, first, last)) {
            mark(s, first, last);
            return 0;
        }
        if (depth == 0) return -1; /* the sort would heapsort this range */
        depth--;
        int64_t mid = first + (last - first) / 2;
        median_to(s, first, first + 1, mid, last - 1);
        int64_t cut = partition(s, first + 1, last, first);
        if (follow(s, cut, last, depth)) return -1;
        last = cut;
    }
    if (splits(s, first, last)) insertion_sort(s, first, last);
    mark(s, first, last);
    return 0;
}

/* bit i of mask (little-endian bit order, zeroed by the caller) set for the elements of ``a`` (n pairs
 * (value, i), permuted in place) that torch.sort(values,
 * descending=desc) puts at positions [lo, hi); *kept_l1 = their sum. 0, or -1 (the caller sorts). */
int sorted_range(Pair *a, int64_t n, int desc, int64_t lo, int64_t hi, uint8_t *mask, double *kept_l1) {
    Sel s = {a, desc, lo, hi, mask, 0.0};
    int depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++;
    int rc = n > 0 ? follow(&s, 0, n, 2 * depth) : 0;
    *kept_l1 = s.kept_l1;
    return rc;
}

/* -- one block of the combination ------------------------------------------------------------------------ */
#define CHUNK 256
#define LOAD_LOOP(DST, SRC, DT)                                                      \
    if ((DT) == BF16) for (size_t j = 0; j < m; j++) DST[j] = load(SRC, BF16, off + j); \
    else if ((DT) == F32) for (size_t j = 0; j < m; j++) DST[j] = load(SRC, F32, off + j); \
    else for (size_t j = 0; j < m; j++) DST[j] = load(SRC, F16, off + j);

/* out = round(base + λ·mixed/divisor): for each input i, d_i = w_i·(s_i·(m_i·τ_i)) with τ_i = in_i − base
 * (finetune[i]) or in_i, m_i its keep bit (bit start + j of masks[i], little-endian; NULL: all kept);
 * consensus 0 (none: mixed = Σ d_i, divisor
 * ``divisor_all``), 1 (sum) or 2 (count): only d_i whose sign is the elected one count, divisor Σ of their
 * w_i (1 where none agrees). normalize 0 leaves the divisor out. Each element sees the same float32 operations
 * in the same order as mergekit's tensor code; the chunked loops only let the compiler vectorize them. */
void gta_block(size_t n, const void *base, int bdt, int nt, const void *const *ins, const int *idt,
               const int *finetune, const uint8_t *const *masks, int64_t start, const float *scales,
               const float *weights, int consensus, int normalize, float divisor_all, float lambda, void *out,
               int odt) {
    float b[CHUNK], t[CHUNK], d[64][CHUNK], acc[CHUNK], mixed[CHUNK], div[CHUNK], major[CHUNK];
    for (size_t off = 0; off < n; off += CHUNK) {
        size_t m = n - off < CHUNK ? n - off : CHUNK;
        LOAD_LOOP(b, base, bdt)
        for (int i = 0; i < nt; i++) {
            float *di = d[i];
            const float w = weights[i], sc = scales[i];
            LOAD_LOOP(t, ins[i], idt[i])
            if (finetune[i]) for (size_t j = 0; j < m; j++) t[j] = t[j] - b[j];
            if (masks[i]) {
                const uint8_t *mk = masks[i];
                const int64_t at = start + (int64_t)off;
                for (size_t j = 0; j < m; j++) {
                    int64_t bit = at + (int64_t)j;
                    t[j] = t[j] * (float)((mk[bit >> 3] >> (bit & 7)) & 1);
                }
            }
            if (sc != 1.0f) for (size_t j = 0; j < m; j++) t[j] = t[j] * sc;
            for (size_t j = 0; j < m; j++) di[j] = t[j] * w;
        }
        for (size_t j = 0; j < m; j++) mixed[j] = 0.0f;
        if (consensus) {
            for (size_t j = 0; j < m; j++) acc[j] = 0.0f;
            for (int i = 0; i < nt; i++) {
                const float *di = d[i];
                if (consensus == 1) for (size_t j = 0; j < m; j++) acc[j] = acc[j] + di[j];
                else for (size_t j = 0; j < m; j++) acc[j] = acc[j] + (float)((di[j] > 0.0f) - (di[j] < 0.0f));
            }
            for (size_t j = 0; j < m; j++) {
                major[j] = acc[j] >= 0.0f ? 1.0f : -1.0f;
                div[j] = 0.0f;
            }
            for (int i = 0; i < nt; i++) {
                const float *di = d[i];
                const float w = weights[i];
                for (size_t j = 0; j < m; j++) {
                    float sign = (float)((di[j] > 0.0f) - (di[j] < 0.0f));
                    float agree = sign == major[j] ? 1.0f : 0.0f;
                    mixed[j] = mixed[j] + di[j] * agree;
                    div[j] = div[j] + w * agree;
                }
            }
            for (size_t j = 0; j < m; j++) div[j] = div[j] == 0.0f ? 1.0f : div[j];
        } else {
            for (int i = 0; i < nt; i++) {
                const float *di = d[i];
                for (size_t j = 0; j < m; j++) mixed[j] = mixed[j] + di[j];
            }
            for (size_t j = 0; j < m; j++) div[j] = divisor_all;
        }
        if (normalize) for (size_t j = 0; j < m; j++) mixed[j] = mixed[j] / div[j];
        if (lambda != 1.0f) for (size_t j = 0; j < m; j++) mixed[j] = mixed[j] * lambda;
        if (odt == BF16) for (size_t j = 0; j < m; j++) store(out, BF16, off + j, b[j] + mixed[j]);
        else if (odt == F32) for (size_t j = 0; j < m; j++) store(out, F32, off + j, b[j] + mixed[j]);
        else for (size_t j = 0; j < m; j++) store(out, F16, off + j, b[j] + mixed[j]);
    }
}
