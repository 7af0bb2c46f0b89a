/* surgeon's fused streamed merge kernel: W' = round(W + s1*L1*R1 + s2*L2*R2 + ...), row by row.
 *
 * Built at first use (~2 s, once) by surgeon/ops/native_merge.py with the system C compiler
 * (-O3 -march=native -ffp-contract=off: no fused multiply-add the source does not ask for), and
 * called through ctypes (which releases the GIL, so two threads merge two row blocks at once).
 *
 * Exactness, operation by operation as peft/torch do it on the CPU:
 *   - each product element is a chain of fused multiply-adds over the rank, k = 0, 1, ..., r-1,
 *     from zero: the order of the BLAS kernels torch (MKL) uses for these shapes (tested against
 *     torch's whole B@A in tests/test_merge_stream.py);
 *   - then one rounding multiply by the scale, then one rounding add to W (widened exactly to float32),
 *     delta by delta in order;
 *   - one rounding to the output dtype, to nearest with ties to even (torch's conversion).
 * Statistics (Σ ΔW², Σ rounding error², elements changed, non-finite outputs) are accumulated in double
 * precision per lane, without reassociating anything that reaches the output.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

enum { F32 = 0, F16 = 1, BF16 = 2 };
#define TILE 64 /* columns per tile: 4 AVX-512 or 8 AVX2 accumulators */
#define LANES 16

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

#define INLINE static inline __attribute__((always_inline))

INLINE float load(const void *p, int dt, size_t i) {
    if (dt == BF16) return bits_to_f32((uint32_t)((const uint16_t *)p)[i] << 16);
    if (dt == F16) return (float)((const _Float16 *)p)[i];
    return ((const float *)p)[i];
}

INLINE uint32_t raw(const void *p, int dt, size_t i) {
    if (dt == F32) return ((const uint32_t *)p)[i];
    return ((const uint16_t *)p)[i];
}

/* x rounded to dt: its stored bits, and (via *back) its value as float32. Branch-free (vectorizes). */
INLINE uint32_t round_to(float x, int dt, float *back) {
    if (dt == BF16) {
        uint32_t u = f32_to_bits(x);
        uint32_t nearest = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        uint32_t r = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : nearest; /* NaN stays a quiet NaN */
        *back = bits_to_f32(r << 16);
        return r;
    }
    if (dt == F16) {
        _Float16 h = (_Float16)x;
        uint16_t r;
        memcpy(&r, &h, 2);
        *back = (float)h;
        return r;
    }
    *back = x;
    return f32_to_bits(x);
}

INLINE void store(void *p, int dt, size_t i, uint32_t bits) {
    if (dt == F32) ((uint32_t *)p)[i] = bits;
    else ((uint16_t *)p)[i] = (uint16_t)bits;
}

INLINE int is_finite32(float x) { return (f32_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

/* acc[j] = fma(l[r-1], R[r-1][j], ... fma(l[1], R[1][j], fma(l[0], R[0][j], 0))): the product's chain over the
 * rank, from +0, one rounding per step. chain_part reads R with row stride ``cols``; chain_tile reads a
 * packed tile (rank x TILE, contiguous: no cache-set conflicts) and keeps the accumulators in registers. */
static void chain_part(const float *l, const float *r, size_t cols, int rank, size_t width, float *acc) {
    for (size_t j = 0; j < width; j++) acc[j] = 0.0f;
    for (int k = 0; k < rank; k++)
        for (size_t j = 0; j < width; j++) acc[j] = __builtin_fmaf(l[k], r[(size_t)k * cols + j], acc[j]);
}

#if defined(__AVX512F__)
#include <immintrin.h>
INLINE void chain_tile(const float *l, const float *r, size_t cols, int rank, float *acc) {
    (void)cols; /* a packed tile's rows are TILE apart */
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < rank; k++) {
        __m512 lk = _mm512_set1_ps(l[k]);
        const float *rk = r + (size_t)k * TILE;
        a0 = _mm512_fmadd_ps(lk, _mm512_loadu_ps(rk), a0);
        a1 = _mm512_fmadd_ps(lk, _mm512_loadu_ps(rk + 16), a1);
        a2 = _mm512_fmadd_ps(lk, _mm512_loadu_ps(rk + 32), a2);
        a3 = _mm512_fmadd_ps(lk, _mm512_loadu_ps(rk + 48), a3);
    }
    _mm512_storeu_ps(acc, a0);
    _mm512_storeu_ps(acc + 16, a1);
    _mm512_storeu_ps(acc + 32, a2);
    _mm512_storeu_ps(acc + 48, a3);
}

#define ROWS4 1
/* chain_tile for four rows at once (left rows l, l + lstride, ...): each R vector loaded once serves four
 * rows, 16 accumulators in registers. Every element's chain is the same as chain_tile's. */
INLINE void chain_tile4(const float *l, size_t lstride, const float *r, int rank, float *acc) {
    __m512 a[4][4];
    for (int row = 0; row < 4; row++)
        for (int v = 0; v < 4; v++) a[row][v] = _mm512_setzero_ps();
    for (int k = 0; k < rank; k++) {
        const float *rk = r + (size_t)k * TILE;
        __m512 r0 = _mm512_loadu_ps(rk), r1 = _mm512_loadu_ps(rk + 16);
        __m512 r2 = _mm512_loadu_ps(rk + 32), r3 = _mm512_loadu_ps(rk + 48);
        for (int row = 0; row < 4; row++) {
            __m512 lk = _mm512_set1_ps(l[row * lstride + k]);
            a[row][0] = _mm512_fmadd_ps(lk, r0, a[row][0]);
            a[row][1] = _mm512_fmadd_ps(lk, r1, a[row][1]);
            a[row][2] = _mm512_fmadd_ps(lk, r2, a[row][2]);
            a[row][3] = _mm512_fmadd_ps(lk, r3, a[row][3]);
        }
    }
    for (int row = 0; row < 4; row++)
        for (int v = 0; v < 4; v++) _mm512_storeu_ps(acc + row * TILE + 16 * v, a[row][v]);
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
INLINE void chain_tile(const float *l, const float *r, size_t cols, int rank, float *acc) {
    (void)cols; /* a packed tile's rows are TILE apart */
    __m256 a[8];
    for (int v = 0; v < 8; v++) a[v] = _mm256_setzero_ps();
    for (int k = 0; k < rank; k++) {
        __m256 lk = _mm256_set1_ps(l[k]);
        const float *rk = r + (size_t)k * TILE;
        for (int v = 0; v < 8; v++) a[v] = _mm256_fmadd_ps(lk, _mm256_loadu_ps(rk + 8 * v), a[v]);
    }
    for (int v = 0; v < 8; v++) _mm256_storeu_ps(acc + 8 * v, a[v]);
}
#else
INLINE void chain_tile(const float *l, const float *r, size_t cols, int rank, float *acc) {
    (void)cols; /* a packed tile's rows are TILE apart */
    chain_part(l, r, TILE, rank, TILE, acc);
}
#endif

/* One tile of ``width`` (<= TILE) elements of row i starting at column j0. ``given``: the first (only) delta's chain for
 * this tile when the caller computed it, else NULL. */
INLINE void tile(const void *w, int wdt, void *out, int odt, size_t i, size_t j0, size_t width, size_t cols,
                 int nd, const float *const *L, const size_t *lstride, const float *const *R, const float *const *Rp,
                 const int *ranks, const float *scales, double *dsq, double *esq, int64_t *changed, int64_t *bad,
                 const float *given) {
    float base[TILE], m[TILE], d[TILE], back[TILE], e[TILE];
    uint32_t bits[TILE], before[TILE];
    size_t at = i * cols + j0;
    for (size_t j = 0; j < width; j++) base[j] = m[j] = load(w, wdt, at + j);
    for (int q = 0; q < nd; q++) {
        const float *l = L[q] + i * lstride[q];
        float acc[TILE];
        if (given != NULL) memcpy(acc, given, sizeof acc); /* one delta, its chain already done for 4 rows */
        else if (width == TILE) chain_tile(l, Rp[q] + (j0 / TILE) * (size_t)ranks[q] * TILE, cols, ranks[q], acc);
        else chain_part(l, R[q] + j0, cols, ranks[q], width, acc);
        float s = scales[q];
        for (size_t j = 0; j < width; j++) {
            d[j] = acc[j] * s;
            m[j] = m[j] + d[j];
        }
    }
    if (nd != 1)
        for (size_t j = 0; j < width; j++) d[j] = m[j] - base[j];
    for (size_t j = 0; j < width; j++) bits[j] = round_to(m[j], odt, &back[j]);
    if (wdt == odt)
        for (size_t j = 0; j < width; j++) before[j] = raw(w, wdt, at + j);
    else
        for (size_t j = 0; j < width; j++) { float cast; before[j] = round_to(base[j], odt, &cast); }
    for (size_t j = 0; j < width; j++) store(out, odt, at + j, bits[j]);
    for (size_t j = 0; j < width; j++) e[j] = back[j] - m[j];
    for (size_t j = width; j < TILE; j++) d[j] = e[j] = 0.0f, bits[j] = before[j] = 0, m[j] = back[j] = 0.0f;
    float pd[LANES] = {0}, pe[LANES] = {0};
    int32_t pc[LANES] = {0}, pb[LANES] = {0};
    for (size_t j0l = 0; j0l < TILE; j0l += LANES)
        for (size_t l = 0; l < LANES; l++) {
            size_t j = j0l + l;
            pd[l] += d[j] * d[j];
            pe[l] += e[j] * e[j];
            pc[l] += bits[j] != before[j];
            pb[l] += !(is_finite32(m[j]) & is_finite32(back[j]));
        }
    for (size_t l = 0; l < LANES; l++) {
        dsq[l] += pd[l];
        esq[l] += pe[l];
        changed[l] += pc[l];
        bad[l] += pb[l];
    }
}

INLINE void rows_of(const void *w, int wdt, void *out, int odt, size_t rows, size_t cols,
                    int nd, const float *const *L, const size_t *lstride, const float *const *R, const float *const *Rp,
                    const int *ranks, const float *scales, double *stats, int64_t *counts) {
    double dsq[LANES] = {0}, esq[LANES] = {0};
    int64_t changed[LANES] = {0}, bad[LANES] = {0};
    size_t i = 0;
#ifdef ROWS4
    if (nd == 1) /* four rows at a time: the tile of R is read once for the four */
        for (; i + 4 <= rows; i += 4) {
            size_t j0 = 0;
            for (; j0 + TILE <= cols; j0 += TILE) {
                float acc4[4 * TILE];
                chain_tile4(L[0] + i * lstride[0], lstride[0], Rp[0] + (j0 / TILE) * (size_t)ranks[0] * TILE, ranks[0],
                            acc4);
                for (size_t rr = 0; rr < 4; rr++)
                    tile(w, wdt, out, odt, i + rr, j0, TILE, cols, nd, L, lstride, R, Rp, ranks, scales, dsq, esq,
                         changed, bad, acc4 + rr * TILE);
            }
            if (j0 < cols)
                for (size_t rr = 0; rr < 4; rr++)
                    tile(w, wdt, out, odt, i + rr, j0, cols - j0, cols, nd, L, lstride, R, Rp, ranks, scales, dsq, esq,
                         changed, bad, NULL);
        }
#endif
    for (; i < rows; i++) {
        size_t j0 = 0;
        for (; j0 + TILE <= cols; j0 += TILE)
            tile(w, wdt, out, odt, i, j0, TILE, cols, nd, L, lstride, R, Rp, ranks, scales, dsq, esq, changed, bad,
                 NULL);
        if (j0 < cols)
            tile(w, wdt, out, odt, i, j0, cols - j0, cols, nd, L, lstride, R, Rp, ranks, scales, dsq, esq, changed, bad,
                 NULL);
    }
    for (int l = 0; l < LANES; l++) {
        stats[0] += dsq[l];
        stats[1] += odt == F32 ? 0.0 : esq[l];
        counts[0] += changed[l];
        counts[1] += bad[l];
    }
}

/* rows x cols elements of W (dtype wdt, row-major) -> out (dtype odt).
 * Delta q: L[q] points at this block's first row of an (rows x ranks[q]) float32 matrix with row
 * stride lstride[q]; R[q] is (ranks[q] x cols) float32, row-major, and Rp[q] the same packed tile by
 * tile ((cols / TILE) x ranks[q] x TILE, full tiles only); scales[q] its scale.
 * stats[0] += Σ ΔW², stats[1] += Σ (round(W') - W')²; counts[0] += elements whose output bits differ
 * from W's (cast to odt), counts[1] += non-finite outputs.
 * One instance for every dtype pair: -O3 unswitches the dtype tests out of the loops, as fast as code
 * specialised per pair (measured) and compiled in a fraction of the time. */
void merge_rows(const void *w, int wdt, void *out, int odt, size_t rows, size_t cols,
                int nd, const float *const *L, const size_t *lstride, const float *const *R, const float *const *Rp,
                const int *ranks, const float *scales, double *stats, int64_t *counts) {
    rows_of(w, wdt, out, odt, rows, cols, nd, L, lstride, R, Rp, ranks, scales, stats, counts);
}
