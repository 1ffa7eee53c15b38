/* probekit's CPU row kernel: a block of attention logits -> probabilities and per-row sums.
 *
 * Built at first use by probekit/cpu_kernel.py (cc -O3 -march=native -fopenmp -fno-math-errno) and
 * loaded with ctypes. Work is split across `threads` OpenMP threads: the libgomp.so.1 that torch
 * has loaded, so the same pool as torch's own kernels (a second pool would spin against it on the
 * same cores). Built without -fopenmp, one call runs on the calling thread.
 *
 * One call handles a block of logits z [nb, H, R, T] (contiguous: images, heads, query rows, keys)
 * for the query tokens row0 .. row0 + R - 1, the (image, row) pairs u = img * R + rr in [u0, u1);
 * each pair's distances to every key are made once and serve its H heads' rows. The terms of the
 * row (img, h, rr) go to index (img * H + h) * ot + rr of each output (ot = T: a layer's [B, H, T]
 * terms, the pointers at the block's first row). Per row, with m = max z and
 * e_j = exp(z_j - m), l = sum e (every row stays in L1 across the three passes):
 *   p_j = e_j / l                         written to p (torch's softmax to float32 rounding)
 *   lse   = m + ln l
 *   mass  = sum_{j >= n0} p_j             (patch keys; n0 prefix tokens first)
 *   plog  = sum_{j >= n0, p_j > 0} p_j z_j
 *   dgr   = sum_{j >= n0} p_j |pos(i) - pos(j)|  in grid steps; dpx the same in pixels
 *           (positions from the grid width on the fly, no distance matrix; 0 for prefix queries)
 *   pre   = p_j for j < n0                ([..., n0] at index * n0)
 * Outputs passed as NULL are not computed (plog, dpx with dgr, pre). With `inv_out` (indexed by g), p
 * is left unnormalized (p_j = e_j) and 1 / l goes there: a caller that only needs P @ V scales
 * that [R, dv] product's rows instead of the [R, T] block (one pass over the block saved). p may
 * be z itself (in place: one buffer less to bring through the cache).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* exp(x) for x <= 0 (a logit minus its row maximum), to ~1 ulp: Cephes' expf polynomial after
 * x = n ln2 + r, |r| <= ln2 / 2. Below -87 (float32's normal range ends near -87.3) and for
 * -inf (masked keys) it is 0. Branch-free so that gcc vectorizes the loops that call it. */
static inline float pk_exp(float x) {
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest, |t| < 2^22 */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float r2 = r * r;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r2 + r + 1.0f;
    int32_t bits = ((int32_t)(x < -87.0f ? 0.0f : n) + 127) << 23;
    float s;
    memcpy(&s, &bits, 4);
    return x < -87.0f ? 0.0f : y * s;
}

int pk_abi_version(void) { return 8; }

int pk_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* One patch key j of row_terms' loops: e written to p and the sums every variant keeps. A macro,
 * not a function, so that each variant's loop stays one flat `omp simd` body with its own
 * reductions (the distance sums differ). */
#define PK_PATCH_KEY(j)                                                                     \
    const float x = zp[j] - ms, e = pk_exp(x); /* z read once: p may be z (in place) */    \
    pp[j] = e;                                                                              \
    s += e;                                                                                 \
    sz += e * (x > -87.0f ? x : -87.0f) /* e = 0 below -87 (masked keys: x = -inf) */

/* One row: softmax and sums. drow/prow: the query's distances to the patch keys (grid steps,
 * pixels; prow NULL: pixels = grid steps * py) or NULL (no distance terms). */
static void row_terms(const float* zr, float* pr, int64_t T, int64_t n0, const float* drow, const float* prow,
                      float py, float* lse, float* mass, float* plog, float* dpx, float* dgr, float* pre,
                      float* inv_out) {
    const int64_t N = T - n0;
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < T; ++j) m = zr[j] > m ? zr[j] : m; /* vmaxps; fmaxf does not vectorize */
    const float ms = m == -INFINITY ? 0.0f : m;                   /* an all-masked row: p = NaN, as torch */
    float lp = 0.0f;
    for (int64_t j = 0; j < n0; ++j) {
        float e = pk_exp(zr[j] - ms);
        pr[j] = e;
        lp += e;
    }
    const float* zp = zr + n0;
    float* pp = pr + n0;
    float s = 0.0f, sz = 0.0f, d1 = 0.0f, d2 = 0.0f;
    if (drow && prow) {
#pragma omp simd reduction(+ : s, sz, d1, d2)
        for (int64_t j = 0; j < N; ++j) {
            PK_PATCH_KEY(j);
            d1 += e * drow[j];
            d2 += e * prow[j];
        }
    } else if (drow && !plog) { /* MAD's terms alone: no <p, z> sum (a tenth of the loop's work) */
#pragma omp simd reduction(+ : s, d1)
        for (int64_t j = 0; j < N; ++j) {
            const float e = pk_exp(zp[j] - ms);
            pp[j] = e;
            s += e;
            d1 += e * drow[j];
        }
        d2 = d1 * py;
    } else if (drow) {
#pragma omp simd reduction(+ : s, sz, d1)
        for (int64_t j = 0; j < N; ++j) {
            PK_PATCH_KEY(j);
            d1 += e * drow[j];
        }
        d2 = d1 * py;
    } else {
#pragma omp simd reduction(+ : s, sz)
        for (int64_t j = 0; j < N; ++j) {
            PK_PATCH_KEY(j);
        }
    }
    const float l = lp + s;
    const float inv = 1.0f / l;
    if (inv_out) {
        *inv_out = inv;
    } else {
#pragma omp simd
        for (int64_t j = 0; j < T; ++j) pr[j] *= inv;
    }
    *lse = m + logf(l);
    *mass = s * inv;
    if (plog) *plog = (sz + ms * s) * inv; /* sum p (z - m) + m sum p */
    if (dgr) {
        *dgr = d1 * inv;
        *dpx = d2 * inv;
    }
    if (pre)
        for (int64_t j = 0; j < n0; ++j) pre[j] = inv_out ? pr[j] * inv : pr[j];
}

/* Query qi's distances to the N patch keys (positions ky, kx from token indices, grid width gw): in grid
 * steps into drow, and where prow is not NULL in pixels (steps scaled by the patch's py2 = py^2, px2 = px^2). */
static inline void query_distances(int64_t qi, int64_t gw, const float* ky, const float* kx, int64_t N, float py2,
                                   float px2, float* drow, float* prow) {
    const float qy = (float)(qi / gw), qx = (float)(qi % gw);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) {
        float dy = qy - ky[j], dx = qx - kx[j];
        drow[j] = sqrtf(dy * dy + dx * dx);
    }
    if (prow) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
            float dy = qy - ky[j], dx = qx - kx[j];
            prow[j] = sqrtf(dy * dy * py2 + dx * dx * px2);
        }
    }
}

void pk_softmax_terms(const float* z, float* p, int64_t H, int64_t R, int64_t T, int64_t u0, int64_t u1,
                      int64_t row0, int64_t ot, int64_t n0, const float* ky, const float* kx, int64_t gw,
                      float py, float px, float* lse, float* mass, float* plog, float* dpx, float* dgr,
                      float* pre, float* inv_out, int threads) {
    const int64_t N = T - n0;
    const int square = py == px;
    const float py2 = py * py, px2 = px * px;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
        float* drow = dgr ? (float*)malloc(sizeof(float) * (size_t)(2 * N + 1)) : NULL;
        float* prow = drow && !square ? drow + N : NULL;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t u = u0; u < u1; ++u) {
            const int64_t img = u / R, rr = u % R, qi = row0 + rr - n0;
            const float* dq = NULL;
            if (drow && qi >= 0) { /* this query's distances, for its H rows */
                query_distances(qi, gw, ky, kx, N, py2, px2, drow, prow);
                dq = drow;
            }
            for (int64_t h = 0; h < H; ++h) {
                const int64_t g = (img * H + h) * R + rr, oi = (img * H + h) * ot + rr;
                row_terms(z + g * T, p + g * T, T, n0, dq, dq ? prow : NULL, py, lse + oi, mass + oi,
                          plog ? plog + oi : NULL, dq ? dpx + oi : NULL, dq ? dgr + oi : NULL,
                          pre ? pre + oi * n0 : NULL, inv_out ? inv_out + g : NULL);
                if (dgr && !dq) { /* a prefix query: no position, distance sums 0 */
                    dpx[oi] = 0.0f;
                    dgr[oi] = 0.0f;
                }
            }
        }
        free(drow);
    }
}

/* ---- One attention pass: q, k, v in, the layer's output and every row's terms out ----------------
 *
 * pk_attention computes, for images b, heads h and query rows i of one layer (no bias),
 *   z_i = scale * q_i . k_j for every key j,  then row_terms (softmax and sums, as above),
 *   out_i = sum_j p_ij v_j
 * without a [T, T] buffer: per thread, k of one (image, head) laid out in panels of PK_W keys (kp,
 * D x Tp floats, Tp = T rounded up to PK_W; the last panel's columns past T make logits that are
 * never read) and v copied to contiguous rows (vc), then PK_R query rows at a time, whose logits
 * (zt, PK_R x Tp) stay in L1 from their dot products through the softmax to P V. The products
 * are register tiles of PK_R rows x PK_NV vectors (6 x 64 floats on AVX-512, 4 x 16 elsewhere:
 * the compiler maps the vector type onto AVX-512, AVX2 or SSE registers); a tile's rows past the
 * chunk repeat its first row and are never kept. Work items are (image, head, chunk of `rc` query rows), split across
 * `threads` OpenMP threads in one parallel region; items [w0, w1) are done by this call (the
 * Python-thread fallback hands each thread its range). Thread n works in scratch + n *
 * pk_attention_floats(...) (no allocation per call: the caller keeps the buffer across layers).
 *
 * Tensors are strided: element (b, h, t, d) of q at q[b*s[0] + h*s[1] + t*s[2] + d] (d contiguous),
 * of k at s[3..5], of v at s[6..8], of out at s[9..11]. dims = {B, H, T, D, DV}. Terms as
 * pk_softmax_terms, at (b*H + h)*T + i; outputs passed as NULL are not computed (out NULL: no
 * P V and v is never read, for a layer whose output nothing will use). */
#if defined(__AVX512F__)
#define PK_W 16 /* floats per vector register */
#define PK_R 6  /* query rows per tile */
#define PK_NV 4 /* vectors per tile row: PK_R * PK_NV accumulators + PK_NV + 1 of 32 registers */
#else
#define PK_W 8
#define PK_R 4
#define PK_NV 2 /* 8 accumulators + 3 of AVX2's 16 registers */
#endif
typedef float pk_vec __attribute__((vector_size(4 * PK_W)));

static inline pk_vec pk_load(const float* p) {
    pk_vec x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void pk_store(float* p, pk_vec x) { memcpy(p, &x, sizeof x); }

/* Logits of PK_R query rows q[r] against NV * PK_W keys from panel jp of kp (k transposed in panels
 * of PK_W keys: kp[(jp * D + d) * PK_W + c] = k[jp * PK_W + c][d]), scaled, into zt rows (stride Tp). */
#define PK_LOGIT_TILE(NAME, NV)                                                                              \
    static inline void NAME(const float* const* q, const float* kp, int64_t D, int64_t jp,  \
                                         float scale, float* zt, int64_t Tp) {                          \
        pk_vec a[PK_R][NV];                                                                            \
        for (int r = 0; r < PK_R; ++r)                                                                 \
            for (int c = 0; c < NV; ++c) a[r][c] = (pk_vec){0};                                        \
        const float* kc[NV];                                                                           \
        for (int c = 0; c < NV; ++c) kc[c] = kp + (jp + c) * D * PK_W;                                 \
        for (int64_t d = 0; d < D; ++d) {                                                              \
            pk_vec x[NV];                                                                              \
            for (int c = 0; c < NV; ++c) x[c] = pk_load(kc[c] + d * PK_W);                             \
            for (int r = 0; r < PK_R; ++r) {                                                           \
                const float qd = q[r][d];                                                              \
                for (int c = 0; c < NV; ++c) a[r][c] += qd * x[c];                                     \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < PK_R; ++r)                                                                 \
            for (int c = 0; c < NV; ++c) pk_store(zt + r * Tp + (jp + c) * PK_W, a[r][c] * scale);     \
    }
PK_LOGIT_TILE(pk_logit_tileN, PK_NV)
PK_LOGIT_TILE(pk_logit_tile1, 1)

/* Output rows o[r][c0 .. c0 + NV * PK_W) = inv[r] * sum_j p[r][j] v_j[c0 ..] for PK_R rows (o[r] NULL: not kept) */
#define PK_PV_TILE(NAME, NV)                                                                                 \
    static inline void NAME(const float* zt, int64_t Tp, int64_t T, const float* v, int64_t svt, \
                                      int64_t c0, const float* inv, float* const* o) {                \
        pk_vec a[PK_R][NV];                                                                            \
        for (int r = 0; r < PK_R; ++r)                                                                 \
            for (int c = 0; c < NV; ++c) a[r][c] = (pk_vec){0};                                        \
        for (int64_t j = 0; j < T; ++j) {                                                              \
            const float* vj = v + j * svt + c0;                                                        \
            pk_vec x[NV];                                                                              \
            for (int c = 0; c < NV; ++c) x[c] = pk_load(vj + PK_W * c);                                \
            for (int r = 0; r < PK_R; ++r) {                                                           \
                const float p = zt[r * Tp + j];                                                        \
                for (int c = 0; c < NV; ++c) a[r][c] += p * x[c];                                      \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < PK_R; ++r)                                                                 \
            if (o[r])                                                                                  \
                for (int c = 0; c < NV; ++c) pk_store(o[r] + c0 + PK_W * c, a[r][c] * inv[r]);         \
    }
PK_PV_TILE(pk_pv_tileN, PK_NV)
PK_PV_TILE(pk_pv_tile1, 1)

/* Floats of scratch each thread of pk_attention uses (its caller hands over threads times as many). */
int64_t pk_attention_floats(int64_t T, int64_t D, int64_t DV, int64_t n0) {
    const int64_t Tp = (T + PK_W - 1) / PK_W * PK_W;
    return D * Tp + PK_R * Tp + 2 * (T - n0) + 1 + T * DV;
}

void pk_attention(const float* q, const float* k, const float* v, float* out, const int64_t* dims,
                  const int64_t* s, float scale, int64_t rc, int64_t w0, int64_t w1, int64_t n0,
                  const float* ky, const float* kx, int64_t gw, float py, float px, float* lse, float* mass,
                  float* plog, float* dpx, float* dgr, float* pre, float* scratch, int threads) {
    const int64_t H = dims[1], T = dims[2], D = dims[3], DV = dims[4];
    const int64_t N = T - n0, np = (T + PK_W - 1) / PK_W, Tp = np * PK_W, chunks = (T + rc - 1) / rc;
    const int square = py == px;
    const float py2 = py * py, px2 = px * px;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
        float* kp = scratch + omp_get_thread_num() * pk_attention_floats(T, D, DV, n0);
#else
        float* kp = scratch;
#endif
        float* zt = kp + D * Tp;
        float* vc = zt + PK_R * Tp + 2 * N + 1; /* v of the (image, head), rows contiguous */
        float* drow = zt + PK_R * Tp;
        float* prow = dgr && !square ? drow + N : NULL;
        int64_t held = -1; /* the (image, head) whose k is in kp */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t w = w0; w < w1; ++w) {
            const int64_t bh = w / chunks, b = bh / H, h = bh % H;
            const int64_t i0 = (w % chunks) * rc, i1 = i0 + rc < T ? i0 + rc : T;
            const float* qb = q + b * s[0] + h * s[1];
            float* ob = out ? out + b * s[9] + h * s[10] : NULL;
            if (held != bh) { /* k of this (image, head) in panels of PK_W keys (the last one padded with 0) */
                const float* kb = k + b * s[3] + h * s[4];
                for (int64_t j = 0; j < T; ++j) /* the last panel's columns past T make logits never read */
                    for (int64_t d = 0; d < D; ++d) kp[((j / PK_W) * D + d) * PK_W + j % PK_W] = kb[j * s[5] + d];
                const float* vs = v + b * s[6] + h * s[7];
                if (out)
                    for (int64_t j = 0; j < T; ++j) memcpy(vc + j * DV, vs + j * s[8], sizeof(float) * (size_t)DV);
                held = bh;
            }
            for (int64_t i = i0; i < i1; i += PK_R) {
                const int64_t nr = i1 - i < PK_R ? i1 - i : PK_R;
                const float* qr[PK_R];
                float* orow[PK_R];
                float inv[PK_R];
                for (int r = 0; r < PK_R; ++r) {
                    qr[r] = qb + (i + (r < nr ? r : 0)) * s[2]; /* rows past the chunk: its first again, never kept */
                    orow[r] = r < nr && ob ? ob + (i + r) * s[11] : NULL;
                    inv[r] = 0.0f;
                }
                int64_t jp = 0;
                for (; jp + PK_NV <= np; jp += PK_NV) pk_logit_tileN(qr, kp, D, jp, scale, zt, Tp);
                for (; jp < np; ++jp) pk_logit_tile1(qr, kp, D, jp, scale, zt, Tp);
                for (int r = 0; r < nr; ++r) {
                    const int64_t qi = i + r - n0, oi = bh * T + i + r;
                    const float* dq = NULL;
                    if (dgr && qi >= 0) {
                        query_distances(qi, gw, ky, kx, N, py2, px2, drow, prow);
                        dq = drow;
                    }
                    row_terms(zt + r * Tp, zt + r * Tp, T, n0, dq, dq ? prow : NULL, py, lse + oi, mass + oi,
                              plog ? plog + oi : NULL, dq ? dpx + oi : NULL, dq ? dgr + oi : NULL,
                              pre ? pre + oi * n0 : NULL, inv + r);
                    if (dgr && !dq) {
                        dpx[oi] = 0.0f;
                        dgr[oi] = 0.0f;
                    }
                }
                if (!ob) continue; /* no output wanted: the terms are all */
                int64_t c0 = 0;
                for (; c0 + PK_NV * PK_W <= DV; c0 += PK_NV * PK_W)
                    pk_pv_tileN(zt, Tp, T, vc, DV, c0, inv, orow);
                for (; c0 + PK_W <= DV; c0 += PK_W) pk_pv_tile1(zt, Tp, T, vc, DV, c0, inv, orow);
                for (; c0 < DV; ++c0) /* the last DV % PK_W columns */
                    for (int r = 0; r < nr; ++r) {
                        float acc = 0.0f;
                        for (int64_t j = 0; j < T; ++j) acc += zt[r * Tp + j] * vc[j * DV + c0];
                        orow[r][c0] = acc * inv[r];
                    }
            }
        }
    }
}
