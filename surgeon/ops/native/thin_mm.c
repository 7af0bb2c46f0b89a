/* surgeon's thin matrix products: a big matrix D times a block of at most a few dozen vectors, in float64.
 *
 * Built at first use by surgeon/ops/native_thin.py with the system C compiler (-O3, fused multiply-adds
 * allowed: nothing here has to reproduce another library's bits) and called through ctypes (the GIL is
 * released during a call). One thread per call; the caller may share the output rows between threads.
 *
 * The iterations of the spectral routes spend their time in products of a 2048 x 5632 matrix with 8-30
 * vectors, which a general GEMM runs at 40% of the processor's peak (OpenBLAS, one thread of the AMD EPYC
 * the benchmarks run on: 14 GFLOP/s against 36 for a square product). Here four rows of D at a time meet
 * twelve columns of the block held in registers (12 accumulators, 3 vector loads and 4 broadcasts per 12
 * fused multiply-adds): 33-35 GFLOP/s (float32 products are left to the BLAS: OpenBLAS's SGEMM already
 * runs these shapes near its peak). A float32 or bfloat16 D is widened to float64 four rows at a time (the
 * products and sums are float64 whatever D's storage).
 *
 * thin_rows  Y (R x wp) = D (R x C) · X (C x wp)
 * thin_cols  Y (C x wp) = Dᵀ · X, X (R x wp)
 *
 * D is row-major with a row stride of ld elements (ld >= C): float64, float32 or bfloat16. X and Y are
 * contiguous, row-major float64, wp columns (any number: the last 1-3 columns go through partial vectors,
 * lane for lane the chains a zero-padded block would give, so no caller pads). Each output element is
 * one chain of multiply-adds in the order of D's columns (thin_rows) or rows (thin_cols), so the result
 * does not depend on how the caller splits the output rows between threads, as long as it splits D's rows
 * (thin_rows) at multiples of 4: a group of four and a lone row may round differently. Both return 0, or -1 when the
 * widening buffer cannot be had.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 2, F64 = 3 };
#define INLINE static inline __attribute__((always_inline))
#if defined(__AVX__)
#define KEEP(x) __asm__("" : "+x"(x)) /* a loaded vector stays in its register (no reload per use) */
#else
#define KEEP(x) (void)0 /* other processors: the compiler's choice */
#endif

typedef double v4 __attribute__((vector_size(32), aligned(8)));
#define LD(p) (*(const v4 *)(p))
#define ST(p, x) (*(v4 *)(p) = (x))
#define B(s) ((v4){(s), (s), (s), (s)})

/* The first t (1-3) elements at p as a vector (the rest 0), and back. */
INLINE v4 LDT(const double *p, size_t t) {
    return (v4){p[0], t > 1 ? p[1] : 0.0, t > 2 ? p[2] : 0.0, 0.0};
}
INLINE void STT(double *p, v4 x, size_t t) {
    p[0] = x[0];
    if (t > 1) p[1] = x[1];
    if (t > 2) p[2] = x[2];
}

/* Row `row` of D from column `col` on, n elements, as float64: a pointer into D when it is float64, else
 * widened into buf. */
static const double *row_f64(const void *d, int code, size_t ld, size_t row, size_t col, size_t n, double *buf) {
    size_t at = row * ld + col;
    if (code == F64) return (const double *)d + at;
    if (code == F32) {
        const float *s = (const float *)d + at;
        for (size_t j = 0; j < n; j++) buf[j] = (double)s[j];
    } else {
        const uint16_t *s = (const uint16_t *)d + at;
        for (size_t j = 0; j < n; j++) {
            uint32_t u = (uint32_t)s[j] << 16;
            float f;
            memcpy(&f, &u, 4);
            buf[j] = (double)f;
        }
    }
    return buf;
}

/* ---- thin_rows: y_r[c..c+W) += Σ_j d_r[j] · x[j][c..c+W) for the 4 rows r of a group ---- */
INLINE void rows_w12(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    double *y0 = y, *y1 = y + wp, *y2 = y + 2 * wp, *y3 = y + 3 * wp;
    v4 a0 = LD(y0), b0 = LD(y0 + 4), c0 = LD(y0 + 8), a1 = LD(y1), b1 = LD(y1 + 4), c1 = LD(y1 + 8);
    v4 a2 = LD(y2), b2 = LD(y2 + 4), c2 = LD(y2 + 8), a3 = LD(y3), b3 = LD(y3 + 4), c3 = LD(y3 + 8);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, x += wp) {
        v4 xa = LD(x), xb = LD(x + 4), xc = LD(x + 8);
        KEEP(xa); KEEP(xb); KEEP(xc);
        v4 e = B(d0[j]); a0 += e * xa; b0 += e * xb; c0 += e * xc;
        e = B(d1[j]); a1 += e * xa; b1 += e * xb; c1 += e * xc;
        e = B(d2[j]); a2 += e * xa; b2 += e * xb; c2 += e * xc;
        e = B(d3[j]); a3 += e * xa; b3 += e * xb; c3 += e * xc;
    }
    ST(y0, a0); ST(y0 + 4, b0); ST(y0 + 8, c0); ST(y1, a1); ST(y1 + 4, b1); ST(y1 + 8, c1);
    ST(y2, a2); ST(y2 + 4, b2); ST(y2 + 8, c2); ST(y3, a3); ST(y3 + 4, b3); ST(y3 + 8, c3);
}

INLINE void rows_w8(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    double *y0 = y, *y1 = y + wp, *y2 = y + 2 * wp, *y3 = y + 3 * wp;
    v4 a0 = LD(y0), b0 = LD(y0 + 4), a1 = LD(y1), b1 = LD(y1 + 4);
    v4 a2 = LD(y2), b2 = LD(y2 + 4), a3 = LD(y3), b3 = LD(y3 + 4);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, x += wp) {
        v4 xa = LD(x), xb = LD(x + 4);
        KEEP(xa); KEEP(xb);
        v4 e = B(d0[j]); a0 += e * xa; b0 += e * xb;
        e = B(d1[j]); a1 += e * xa; b1 += e * xb;
        e = B(d2[j]); a2 += e * xa; b2 += e * xb;
        e = B(d3[j]); a3 += e * xa; b3 += e * xb;
    }
    ST(y0, a0); ST(y0 + 4, b0); ST(y1, a1); ST(y1 + 4, b1);
    ST(y2, a2); ST(y2 + 4, b2); ST(y3, a3); ST(y3 + 4, b3);
}

INLINE void rows_w4(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    double *y0 = y, *y1 = y + wp, *y2 = y + 2 * wp, *y3 = y + 3 * wp;
    v4 a0 = LD(y0), a1 = LD(y1), a2 = LD(y2), a3 = LD(y3);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, x += wp) {
        v4 xa = LD(x);
        KEEP(xa);
        a0 += B(d0[j]) * xa; a1 += B(d1[j]) * xa; a2 += B(d2[j]) * xa; a3 += B(d3[j]) * xa;
    }
    ST(y0, a0); ST(y1, a1); ST(y2, a2); ST(y3, a3);
}

INLINE void rows_wt(const double *const *d, size_t n, const double *x, size_t wp, double *y, size_t t) {
    double *y0 = y, *y1 = y + wp, *y2 = y + 2 * wp, *y3 = y + 3 * wp;
    v4 a0 = LDT(y0, t), a1 = LDT(y1, t), a2 = LDT(y2, t), a3 = LDT(y3, t);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, x += wp) {
        v4 xa = LDT(x, t);
        a0 += B(d0[j]) * xa; a1 += B(d1[j]) * xa; a2 += B(d2[j]) * xa; a3 += B(d3[j]) * xa;
    }
    STT(y0, a0, t); STT(y1, a1, t); STT(y2, a2, t); STT(y3, a3, t);
}

INLINE void rows_one(const double *d0, size_t n, const double *x, size_t wp, double *y) {
    size_t c = 0;
    for (; c + 4 <= wp; c += 4) {
        v4 a = LD(y + c);
        const double *xc = x + c;
        for (size_t j = 0; j < n; j++, xc += wp) a += B(d0[j]) * LD(xc);
        ST(y + c, a);
    }
    if (c < wp) {
        size_t t = wp - c;
        v4 a = LDT(y + c, t);
        const double *xc = x + c;
        for (size_t j = 0; j < n; j++, xc += wp) a += B(d0[j]) * LDT(xc, t);
        STT(y + c, a, t);
    }
}

/* A group of 4 rows against the block's columns: 12 at a time, then 8, then 4, then the last 1-3. The
 * kernels are constants at every call, so the compiler inlines them here. */
typedef void (*group_kernel)(const double *const *d, size_t n, const double *x, size_t wp, double *y);
typedef void (*tail_kernel)(const double *const *d, size_t n, const double *x, size_t wp, double *y, size_t t);
INLINE void by_chunks(group_kernel w12, group_kernel w8, group_kernel w4, tail_kernel wt, const double *const *r,
                      size_t n, const double *x, size_t wp, double *y) {
    size_t c = 0;
    for (; c + 12 <= wp; c += 12) w12(r, n, x + c, wp, y + c);
    if (c + 8 <= wp) {
        w8(r, n, x + c, wp, y + c);
        c += 8;
    }
    if (c + 4 <= wp) {
        w4(r, n, x + c, wp, y + c);
        c += 4;
    }
    if (c < wp) wt(r, n, x + c, wp, y + c, wp - c);
}

/* Columns of D per pass: the block's rows for them (X's tile) stay in the second-level cache. */
static size_t tile_of(size_t cols, size_t wp) {
    size_t tile = (512u * 1024u) / (wp * sizeof(double));
    tile = tile < 256 ? 256 : tile - tile % 4;
    return tile < cols ? tile : cols;
}

int thin_rows(const void *d, int code, size_t rows, size_t cols, size_t ld, const double *x, size_t wp, double *y) {
    memset(y, 0, rows * wp * sizeof(double));
    if (!rows || !cols) return 0;
    size_t tile = tile_of(cols, wp);
    double *buf = code == F64 ? NULL : malloc(4 * tile * sizeof(double));
    if (code != F64 && !buf) return -1;
    for (size_t j0 = 0; j0 < cols; j0 += tile) {
        size_t n = cols - j0 < tile ? cols - j0 : tile;
        const double *xt = x + j0 * wp;
        size_t i = 0;
        for (; i + 4 <= rows; i += 4) {
            const double *r[4];
            for (int k = 0; k < 4; k++) r[k] = row_f64(d, code, ld, i + k, j0, n, buf ? buf + k * tile : NULL);
            by_chunks(rows_w12, rows_w8, rows_w4, rows_wt, r, n, xt, wp, y + i * wp);
        }
        for (; i < rows; i++) rows_one(row_f64(d, code, ld, i, j0, n, buf), n, xt, wp, y + i * wp);
    }
    free(buf);
    return 0;
}

/* ---- thin_cols: y[j][c..c+W) += Σ_r d_r[j] · x_r[c..c+W) over the 4 rows r of a group, for each column j ---- */
INLINE void cols_w12(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    const double *x0 = x, *x1 = x + wp, *x2 = x + 2 * wp, *x3 = x + 3 * wp;
    v4 p0 = LD(x0), q0 = LD(x0 + 4), r0 = LD(x0 + 8), p1 = LD(x1), q1 = LD(x1 + 4), r1 = LD(x1 + 8);
    v4 p2 = LD(x2), q2 = LD(x2 + 4), r2 = LD(x2 + 8), p3 = LD(x3), q3 = LD(x3 + 4), r3 = LD(x3 + 8);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, y += wp) {
        v4 a = LD(y), b = LD(y + 4), c = LD(y + 8);
        v4 e = B(d0[j]); a += e * p0; b += e * q0; c += e * r0;
        e = B(d1[j]); a += e * p1; b += e * q1; c += e * r1;
        e = B(d2[j]); a += e * p2; b += e * q2; c += e * r2;
        e = B(d3[j]); a += e * p3; b += e * q3; c += e * r3;
        ST(y, a); ST(y + 4, b); ST(y + 8, c);
    }
}

INLINE void cols_w8(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    const double *x0 = x, *x1 = x + wp, *x2 = x + 2 * wp, *x3 = x + 3 * wp;
    v4 p0 = LD(x0), q0 = LD(x0 + 4), p1 = LD(x1), q1 = LD(x1 + 4);
    v4 p2 = LD(x2), q2 = LD(x2 + 4), p3 = LD(x3), q3 = LD(x3 + 4);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, y += wp) {
        v4 a = LD(y), b = LD(y + 4);
        v4 e = B(d0[j]); a += e * p0; b += e * q0;
        e = B(d1[j]); a += e * p1; b += e * q1;
        e = B(d2[j]); a += e * p2; b += e * q2;
        e = B(d3[j]); a += e * p3; b += e * q3;
        ST(y, a); ST(y + 4, b);
    }
}

INLINE void cols_w4(const double *const *d, size_t n, const double *x, size_t wp, double *y) {
    v4 p0 = LD(x), p1 = LD(x + wp), p2 = LD(x + 2 * wp), p3 = LD(x + 3 * wp);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, y += wp) {
        v4 a = LD(y);
        a += B(d0[j]) * p0; a += B(d1[j]) * p1; a += B(d2[j]) * p2; a += B(d3[j]) * p3;
        ST(y, a);
    }
}

INLINE void cols_wt(const double *const *d, size_t n, const double *x, size_t wp, double *y, size_t t) {
    v4 p0 = LDT(x, t), p1 = LDT(x + wp, t), p2 = LDT(x + 2 * wp, t), p3 = LDT(x + 3 * wp, t);
    const double *d0 = d[0], *d1 = d[1], *d2 = d[2], *d3 = d[3];
    for (size_t j = 0; j < n; j++, y += wp) {
        v4 a = LDT(y, t);
        a += B(d0[j]) * p0; a += B(d1[j]) * p1; a += B(d2[j]) * p2; a += B(d3[j]) * p3;
        STT(y, a, t);
    }
}

INLINE void cols_one(const double *d0, size_t n, const double *x0, size_t wp, double *y) {
    size_t c = 0;
    for (; c + 4 <= wp; c += 4) {
        v4 p = LD(x0 + c);
        double *yc = y + c;
        for (size_t j = 0; j < n; j++, yc += wp) ST(yc, LD(yc) + B(d0[j]) * p);
    }
    if (c < wp) {
        size_t t = wp - c;
        v4 p = LDT(x0 + c, t);
        double *yc = y + c;
        for (size_t j = 0; j < n; j++, yc += wp) STT(yc, LDT(yc, t) + B(d0[j]) * p, t);
    }
}

int thin_cols(const void *d, int code, size_t rows, size_t cols, size_t ld, const double *x, size_t wp, double *y) {
    memset(y, 0, cols * wp * sizeof(double));
    if (!rows || !cols) return 0;
    size_t tile = tile_of(cols, wp); /* Y's rows per pass, kept in the second-level cache */
    double *buf = code == F64 ? NULL : malloc(4 * tile * sizeof(double));
    if (code != F64 && !buf) return -1;
    for (size_t j0 = 0; j0 < cols; j0 += tile) {
        size_t n = cols - j0 < tile ? cols - j0 : tile;
        double *yt = y + j0 * wp;
        size_t i = 0;
        for (; i + 4 <= rows; i += 4) {
            const double *r[4];
            for (int k = 0; k < 4; k++) r[k] = row_f64(d, code, ld, i + k, j0, n, buf ? buf + k * tile : NULL);
            by_chunks(cols_w12, cols_w8, cols_w4, cols_wt, r, n, x + i * wp, wp, yt);
        }
        for (; i < rows; i++) cols_one(row_f64(d, code, ld, i, j0, n, buf), n, x + i * wp, wp, yt);
    }
    free(buf);
    return 0;
}
