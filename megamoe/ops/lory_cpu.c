/* Lory's merged SwiGLU on CPU, fused: merged weights and merged-weight gradients exist only as
 * cache-sized tiles (docs/kernels.md, "The fused CPU path").
 *
 * Built by megamoe/ops/lory_cpu.py once per machine, with REAL = float or double; the small GEMMs
 * go through the BLAS gemm that libtorch exports (MKL on x86), passed in as a function pointer, and
 * run single-threaded inside this file's OpenMP loop. Row-major tensors, all contiguous:
 *   x, dy, dx (S, T, D); w (S, E); gate, up, down (E, F, D), down transposed; gu (S, T, 2F).
 * Work splits over F tiles of ft columns (a tile's expert weights and their gradients stay in
 * cache for a block of sb segments); each thread sums its tiles' share of y (or dx) for the block
 * in a private buffer, and the buffers are summed in thread order. Same thread count, same result.
 */
#include <math.h>
#include <omp.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif

__attribute__((simd("notinbranch"))) float expf(float);
__attribute__((simd("notinbranch"))) double exp(double);
#define EXP(v) _Generic((v), float: expf, double: exp)(v)

typedef void (*gemm_t)(const char *, const char *, const int *, const int *, const int *, const REAL *,
                       const REAL *, const int *, const REAL *, const int *, const REAL *, REAL *, const int *);

typedef struct {
    int S, T, D, F, E, ft, sb, threads;
} dims_t;

/* Scratch per thread (in REALs): the block's partial sums of y or dx, then the tiles. */
long lory_scratch(dims_t d) {
    return (long)d.sb * d.T * d.D + 3L * d.sb * d.ft * d.D + 3L * d.ft * d.D + 4L * d.T * d.ft + (long)d.sb * d.E;
}

/* Row-major C (M x N, ldc) = op(A) op(B) + beta C: the column-major gemm on the transposed problem. */
static void rm_gemm(gemm_t gemm, char ta, char tb, int M, int N, int K, const REAL *A, int lda,
                    const REAL *B, int ldb, REAL beta, REAL *C, int ldc) {
    const REAL one = 1;
    gemm(&tb, &ta, &N, &M, &K, &one, B, &ldb, A, &lda, &beta, C, &ldc);
}

/* out[j] = sum_e w[e] W[e * lde + j], j < n: one tile of the segment's merged matrix, MERGE_CHUNK columns at a
 * time summed in registers (one store per output). */
#define MERGE_CHUNK 32
static void merge_tile(const REAL *w, int E, const REAL *W, long lde, int n, REAL *restrict out) {
    int j0 = 0;
    for (; j0 + MERGE_CHUNK <= n; j0 += MERGE_CHUNK) {
        REAL acc[MERGE_CHUNK];
        const REAL *restrict w0 = W + j0;
#pragma omp simd
        for (int j = 0; j < MERGE_CHUNK; j++) acc[j] = w[0] * w0[j];
        for (int e = 1; e < E; e++) {
            const REAL *restrict we = W + e * lde + j0;
#pragma omp simd
            for (int j = 0; j < MERGE_CHUNK; j++) acc[j] += w[e] * we[j];
        }
#pragma omp simd
        for (int j = 0; j < MERGE_CHUNK; j++) out[j0 + j] = acc[j];
    }
    for (int j = j0; j < n; j++) {
        REAL acc = w[0] * W[j];
        for (int e = 1; e < E; e++) acc += w[e] * W[e * lde + j];
        out[j] = acc;
    }
}

/* h = SiLU(g) u for a (T, n) tile of g, u (row stride ld) into h (row stride n). */
static void swiglu_tile(const REAL *g, const REAL *u, int ld, int T, int n, REAL *restrict h) {
    for (int t = 0; t < T; t++) {
        const REAL *restrict gt = g + (long)t * ld, *restrict ut = u + (long)t * ld;
        REAL *restrict ht = h + (long)t * n;
#pragma omp simd
        for (int j = 0; j < n; j++) ht[j] = gt[j] / (1 + EXP(-gt[j])) * ut[j];
    }
}

/* From dh (row stride n): h = SiLU(g) u (row stride n), and dg | du = dh u SiLU'(g) | dh SiLU(g) side by
 * side in dgu (row stride 2n); g, u of row stride ld. */
static void swiglu_grad_tile(const REAL *g, const REAL *u, int ld, int T, int n, const REAL *dh, REAL *restrict h,
                             REAL *restrict dgu) {
    for (int t = 0; t < T; t++) {
        const REAL *restrict gt = g + (long)t * ld, *restrict ut = u + (long)t * ld, *restrict dht = dh + (long)t * n;
        REAL *restrict ht = h + (long)t * n, *restrict dgt = dgu + 2L * t * n, *restrict dut = dgt + n;
#pragma omp simd
        for (int j = 0; j < n; j++) {
            const REAL sig = 1 / (1 + EXP(-gt[j])), silu = gt[j] * sig;
            ht[j] = silu * ut[j];
            dut[j] = dht[j] * silu;
            dgt[j] = dht[j] * ut[j] * (sig * (1 + gt[j] * (1 - sig)));
        }
    }
}

/* out[k] = sum over threads of part[thread][k], k < n, in thread order (inside a parallel region). */
static void sum_partials(const REAL *part, long stride, int threads, long n, REAL *out) {
#pragma omp for schedule(static)
    for (long k = 0; k < n; k++) {
        REAL s = 0;
        for (int p = 0; p < threads; p++) s += part[p * stride + k];
        out[k] = s;
    }
}

/* Segment s's merged tiles for F rows [f0, f0 + n): gate then up as one (2n, D) matrix at merged, down
 * (n, D) at merged + 2 ft D; only down when gate_up is 0. */
static void merge_tiles(const dims_t *d, const REAL *ws, const REAL *const *experts, int f0, int n, int gate_up,
                        REAL *merged) {
    const long fd = (long)d->F * d->D, rows = (long)f0 * d->D, cols = (long)n * d->D;
    if (gate_up) {
        merge_tile(ws, d->E, experts[0] + rows, fd, cols, merged);
        merge_tile(ws, d->E, experts[1] + rows, fd, cols, merged + cols);
    }
    merge_tile(ws, d->E, experts[2] + rows, fd, cols, merged + 2L * d->ft * d->D);
}

/* Forward: gu (saved for backward; per tile the tile's g columns, then its u columns) and y for every
 * segment. scratch: threads * lory_scratch(d). */
void lory_forward(gemm_t gemm, dims_t d, const REAL *x, const REAL *w, const REAL *gate, const REAL *up,
                  const REAL *down, REAL *gu, REAL *y, REAL *scratch) {
    const int tiles = (d.F + d.ft - 1) / d.ft;
    const long seg = (long)d.T * d.D, sgu = 2L * d.T * d.F, block = (long)d.sb * seg, own = lory_scratch(d);
    const long tile = (long)d.ft * d.D;
    const REAL *experts[3] = {gate, up, down};
#pragma omp parallel num_threads(d.threads)
    {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        REAL *mine = scratch + me * own, *merged = mine + block, *h = merged + 3 * tile;
        for (int s0 = 0; s0 < d.S; s0 += d.sb) {
            const int ns = d.S - s0 < d.sb ? d.S - s0 : d.sb;
            memset(mine, 0, sizeof(REAL) * ns * seg);
#pragma omp for schedule(static)
            for (int t = 0; t < tiles; t++) {
                const int f0 = t * d.ft, n = d.F - f0 < d.ft ? d.F - f0 : d.ft;
                for (int i = 0; i < ns; i++) {
                    const long s = s0 + i;
                    REAL *gs = gu + s * sgu + 2L * f0;
                    merge_tiles(&d, w + s * d.E, experts, f0, n, 1, merged);
                    rm_gemm(gemm, 'N', 'T', d.T, 2 * n, d.D, x + s * seg, d.D, merged, d.D, 0, gs, 2 * d.F);
                    swiglu_tile(gs, gs + n, 2 * d.F, d.T, n, h);
                    rm_gemm(gemm, 'N', 'N', d.T, d.D, n, h, n, merged + 2 * tile, d.D, 1, mine + i * seg, d.D);
                }
            }
            sum_partials(scratch, own, threads, ns * seg, y + s0 * seg);
        }
    }
}

/* One segment of a (block, tile): its P tiles, [dgᵀx; duᵀx] (2n, D) at p_gu and hᵀdy (n, D) at p_down;
 * dg·W̄_gate + du·W̄_up added to dxs when given. work: 3 merged tiles of ft * D, then 4 of T * ft. */
static void segment_tile(gemm_t gemm, const dims_t *d, const REAL *x, const REAL *ws, const REAL *const *experts,
                         const REAL *gs, const REAL *dys, int f0, int n, REAL *work, REAL *p_gu, REAL *p_down,
                         REAL *dxs) {
    const long tile = (long)d->ft * d->D, tf = (long)d->T * d->ft;
    REAL *merged = work, *dh = work + 3 * tile, *h = dh + tf, *dgu = h + tf;
    merge_tiles(d, ws, experts, f0, n, dxs != NULL, merged);
    rm_gemm(gemm, 'N', 'T', d->T, n, d->D, dys, d->D, merged + 2 * tile, d->D, 0, dh, n);
    swiglu_grad_tile(gs, gs + n, 2 * d->F, d->T, n, dh, h, dgu);
    rm_gemm(gemm, 'T', 'N', 2 * n, d->D, d->T, dgu, 2 * n, x, d->D, 0, p_gu, d->D);
    rm_gemm(gemm, 'T', 'N', n, d->D, d->T, h, n, dys, d->D, 0, p_down, d->D);
    if (dxs) rm_gemm(gemm, 'N', 'N', d->T, d->D, 2 * n, dgu, 2 * n, merged, d->D, 1, dxs, d->D);
}

/* A block's P tiles folded onto the experts: dW_e = (first block ? 0 : dW_e) + sum_s w[s, e] P_s and dot[s, e] +=
 * <P_s, W_e> (the tile's share of dw, over the three matrices), one GEMM each. P_s of matrix m: ns rows of
 * cols = n D at p[m] with row stride ldp[m]. */
static void fold_block(gemm_t gemm, const dims_t *d, const REAL *w, int ns, int first, const REAL *const *experts,
                       REAL *const *grads, long offset, int cols, const REAL *const *p, const int *ldp, REAL *inner,
                       double *dot) {
    const int fd = d->F * d->D;
    for (int m = 0; m < 3; m++) {
        rm_gemm(gemm, 'T', 'N', d->E, cols, ns, w, d->E, p[m], ldp[m], first ? 0 : 1, grads[m] + offset, fd);
        rm_gemm(gemm, 'N', 'T', ns, d->E, cols, p[m], ldp[m], experts[m] + offset, fd, m ? 1 : 0, inner, d->E);
    }
    for (long k = 0; k < (long)ns * d->E; k++) dot[k] += inner[k];
}

/* Backward: dgate, dup, ddown written whole (the first block's fold overwrites); dot[tile, s, e] (zeroed) is the
 * tile's share of dw[s, e]; dx (S, T, D) when not NULL. scratch: threads * lory_scratch(d). */
void lory_backward(gemm_t gemm, dims_t d, const REAL *x, const REAL *w, const REAL *gate, const REAL *up,
                   const REAL *down, const REAL *gu, const REAL *dy, REAL *dx, double *dot, REAL *dgate, REAL *dup,
                   REAL *ddown, REAL *scratch) {
    const int tiles = (d.F + d.ft - 1) / d.ft;
    const long seg = (long)d.T * d.D, sgu = 2L * d.T * d.F, block = (long)d.sb * seg, own = lory_scratch(d);
    const long ptile = (long)d.sb * d.ft * d.D, work = 3L * d.ft * d.D + 4L * d.T * d.ft;
    const REAL *experts[3] = {gate, up, down};
    REAL *grads[3] = {dgate, dup, ddown};
#pragma omp parallel num_threads(d.threads)
    {
        const int threads = omp_get_num_threads(), me = omp_get_thread_num();
        REAL *mine = scratch + me * own, *p_gu = mine + block, *p_down = p_gu + 2 * ptile;
        REAL *work_buf = p_down + ptile, *inner = work_buf + work;
        for (int s0 = 0; s0 < d.S; s0 += d.sb) {
            const int ns = d.S - s0 < d.sb ? d.S - s0 : d.sb;
            if (dx) memset(mine, 0, sizeof(REAL) * ns * seg);
#pragma omp for schedule(static)
            for (int t = 0; t < tiles; t++) {
                const int f0 = t * d.ft, n = d.F - f0 < d.ft ? d.F - f0 : d.ft, cols = n * d.D;
                for (int i = 0; i < ns; i++) {
                    const long s = s0 + i;
                    segment_tile(gemm, &d, x + s * seg, w + s * d.E, experts, gu + s * sgu + 2L * f0, dy + s * seg,
                                 f0, n, work_buf, p_gu + 2L * i * cols, p_down + (long)i * cols,
                                 dx ? mine + i * seg : NULL);
                }
                const REAL *p[3] = {p_gu, p_gu + cols, p_down};
                const int ldp[3] = {2 * cols, 2 * cols, cols};
                fold_block(gemm, &d, w + (long)s0 * d.E, ns, s0 == 0, experts, grads, (long)f0 * d.D, cols, p, ldp,
                           inner, dot + ((long)t * d.S + s0) * d.E);
            }
            if (dx) sum_partials(scratch, own, threads, ns * seg, dx + s0 * seg);
        }
    }
}
