/* Lory's merged SwiGLU on CPU, fused: merged weights and merged-weight gradients exist only as
 * cache-sized tiles (docs/kernels.md, "The fused CPU path").
 *
 * Built by megamoe/ops/lory_cpu.py once per machine, with REAL = float or double; the small GEMMs
 * go through the BLAS gemm that libtorch exports (MKL on x86), passed in as a function pointer, and
 * run single-threaded inside this file's OpenMP loop. Row-major tensors, all contiguous:
 *   x, dy, dx (S, T, D); w (S, E); gate, up, down (E, F, D), down transposed; gu (S, T, 2F).
 * Work splits over `threads` workers: `groups` groups of segments (an even split of S), and within
 * a group over F tiles of ft columns (a tile's expert weights and their gradients stay in cache for
 * a block of sb segments). Each worker sums its tiles' share of y (or dx) for the block in a private
 * buffer, and a group's buffers are summed in worker order; each group folds its segments onto its
 * own expert gradients (group 0: the outputs), added in group order at the end. Same thread count,
 * same result.
 */
#include <math.h>
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
    int S, T, D, F, E, ft, sb, threads, groups;
} dims_t;

/* Scratch per worker (in REALs): the block's partial sums of y or dx, then the tiles. */
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

/* Segments [*lo, *hi) of group g's block b; the groups split S evenly (groups <= S: none is empty). */
static void block_range(const dims_t *d, int g, int b, int *lo, int *hi) {
    const int first = (int)((long)d->S * g / d->groups), last = (int)((long)d->S * (g + 1) / d->groups);
    *lo = first + b * d->sb < last ? first + b * d->sb : last;
    *hi = *lo + d->sb < last ? *lo + d->sb : last;
}

/* Blocks of the largest group: the groups pass through their blocks in step. */
static int group_blocks(const dims_t *d) {
    const int most = (d->S + d->groups - 1) / d->groups;
    return (most + d->sb - 1) / d->sb;
}

/* Workers per group: workers g * per ... (g + 1) * per - 1 make up group g. */
static int per_group(const dims_t *d) { return d->threads / d->groups; }

/* Worker v's share of block b: its group's segments [*lo, *hi), and tiles [*t0, *t1) (the group's tiles split
 * evenly and contiguously among its workers). */
static void worker_share(const dims_t *d, int v, int b, int *lo, int *hi, int *t0, int *t1) {
    const int per = per_group(d), tt = v % per, tiles = (d->F + d->ft - 1) / d->ft;
    block_range(d, v / per, b, lo, hi);
    *t0 = tt * tiles / per;
    *t1 = (tt + 1) * tiles / per;
}

/* Block b of y (or dx) for every group: the sum of the group's workers' partial buffers (stride own apart),
 * in worker order (inside a parallel region; ends with a barrier). */
static void sum_partials(const dims_t *d, const REAL *part, long own, int b, REAL *out) {
    const int per = per_group(d);
    const long seg = (long)d->T * d->D;
    for (int g = 0; g < d->groups; g++) {
        int lo, hi;
        block_range(d, g, b, &lo, &hi);
        const REAL *first = part + (long)g * per * own;
#pragma omp for schedule(static) nowait
        for (long k = 0; k < (hi - lo) * seg; k++) {
            REAL s = 0;
            for (int p = 0; p < per; p++) s += first[p * own + k];
            out[lo * seg + k] = s;
        }
    }
#pragma omp barrier
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
    const long seg = (long)d.T * d.D, sgu = 2L * d.T * d.F, block = (long)d.sb * seg, own = lory_scratch(d);
    const long tile = (long)d.ft * d.D;
    const REAL *experts[3] = {gate, up, down};
#pragma omp parallel num_threads(d.threads)
    for (int b = 0; b < group_blocks(&d); b++) {
#pragma omp for schedule(static)
        for (int v = 0; v < d.threads; v++) {
            int lo, hi, t0, t1;
            worker_share(&d, v, b, &lo, &hi, &t0, &t1);
            REAL *mine = scratch + v * own, *merged = mine + block, *h = merged + 3 * tile;
            memset(mine, 0, sizeof(REAL) * (hi - lo) * seg);
            for (int t = t0; t < t1; t++) {
                const int f0 = t * d.ft, n = d.F - f0 < d.ft ? d.F - f0 : d.ft;
                for (long s = lo; s < hi; s++) {
                    REAL *gs = gu + s * sgu + 2L * f0;
                    merge_tiles(&d, w + s * d.E, experts, f0, n, 1, merged);
                    rm_gemm(gemm, 'N', 'T', d.T, 2 * n, d.D, x + s * seg, d.D, merged, d.D, 0, gs, 2 * d.F);
                    swiglu_tile(gs, gs + n, 2 * d.F, d.T, n, h);
                    rm_gemm(gemm, 'N', 'N', d.T, d.D, n, h, n, merged + 2 * tile, d.D, 1, mine + (s - lo) * seg, d.D);
                }
            }
        }
        sum_partials(&d, scratch, own, b, y);
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

/* grads[m] += the other groups' expert gradients (acc: groups - 1 sets of three E·F·D), in group order. */
static void add_groups(const dims_t *d, const REAL *acc, REAL *const *grads) {
    const long efd = (long)d->E * d->F * d->D;
    for (int m = 0; m < 3; m++) {
#pragma omp for schedule(static) nowait
        for (long k = 0; k < efd; k++) {
            REAL s = grads[m][k];
            for (int g = 1; g < d->groups; g++) s += acc[((g - 1) * 3L + m) * efd + k];
            grads[m][k] = s;
        }
    }
}

/* One worker's share of block b: its tiles of its group's segments, folded onto the group's expert gradients. */
static void backward_work(gemm_t gemm, const dims_t *d, int v, int b, const REAL *x, const REAL *w,
                          const REAL *const *experts, const REAL *gu, const REAL *dy, int dx, double *dot, REAL *const *out,
                          REAL *acc, REAL *mine) {
    const long seg = (long)d->T * d->D, sgu = 2L * d->T * d->F, ptile = (long)d->sb * d->ft * d->D;
    const long efd = (long)d->E * d->F * d->D;
    const int g = v / per_group(d);
    int lo, hi, t0, t1;
    worker_share(d, v, b, &lo, &hi, &t0, &t1);
    if (hi == lo) return;
    REAL *p_gu = mine + d->sb * seg, *p_down = p_gu + 2 * ptile, *work_buf = p_down + ptile;
    REAL *inner = work_buf + 3L * d->ft * d->D + 4L * d->T * d->ft;
    REAL *own_grads[3] = {out[0], out[1], out[2]};
    for (int m = 0; g && m < 3; m++) own_grads[m] = acc + ((g - 1) * 3L + m) * efd;
    if (dx) memset(mine, 0, sizeof(REAL) * (hi - lo) * seg);
    for (int t = t0; t < t1; t++) {
        const int f0 = t * d->ft, n = d->F - f0 < d->ft ? d->F - f0 : d->ft, cols = n * d->D;
        for (long s = lo; s < hi; s++) {
            const long i = s - lo;
            segment_tile(gemm, d, x + s * seg, w + s * d->E, experts, gu + s * sgu + 2L * f0, dy + s * seg, f0, n,
                         work_buf, p_gu + 2 * i * cols, p_down + i * cols, dx ? mine + i * seg : NULL);
        }
        const REAL *p[3] = {p_gu, p_gu + cols, p_down};
        const int ldp[3] = {2 * cols, 2 * cols, cols};
        fold_block(gemm, d, w + (long)lo * d->E, hi - lo, b == 0, experts, own_grads, (long)f0 * d->D, cols, p, ldp,
                   inner, dot + ((long)t * d->S + lo) * d->E);
    }
}

/* Backward: dgate, dup, ddown written whole (the first block's fold overwrites); dot[tile, s, e] (zeroed) is the
 * tile's share of dw[s, e]; dx (S, T, D) when not NULL. acc: (groups - 1) * 3 * E * F * D (NULL for one group).
 * scratch: threads * lory_scratch(d). */
void lory_backward(gemm_t gemm, dims_t d, const REAL *x, const REAL *w, const REAL *gate, const REAL *up,
                   const REAL *down, const REAL *gu, const REAL *dy, REAL *dx, double *dot, REAL *dgate, REAL *dup,
                   REAL *ddown, REAL *acc, REAL *scratch) {
    const long own = lory_scratch(d);
    const REAL *experts[3] = {gate, up, down};
    REAL *const grads[3] = {dgate, dup, ddown};
#pragma omp parallel num_threads(d.threads)
    {
        for (int b = 0; b < group_blocks(&d); b++) {
#pragma omp for schedule(static)
            for (int v = 0; v < d.threads; v++)
                backward_work(gemm, &d, v, b, x, w, experts, gu, dy, dx != NULL, dot, grads, acc, scratch + v * own);
            if (dx) sum_partials(&d, scratch, own, b, dx);
        }
        if (d.groups > 1) add_groups(&d, acc, grads);
    }
}
