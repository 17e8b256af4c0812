/* lmforge's matrix-vector kernels: y (M, N) = x (M, K) . W^T for the few rows of a decode step (M <= 16), W (N, K)
   row-major in float32, bfloat16, or int8 with one scale per row or per block of 32 along K; x and y float32. Built by matvec.py with the host
   compiler (-O3 -march=native -fopenmp); AVX-512 code where the host has it, else loops the compiler vectorises.
   Each 4-row block of W is read once for all M rows of x (they stay in L1). Rows of W are split between
   `threads` OpenMP threads in blocks of 16 rows; the library links libgomp.so.1, which resolves to the copy torch
   has loaded, so the threads are torch's own pool. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_ROWS_C 64 /* rows of x a call takes on the int16 path (the callers send at most 16) */

/* Load 16 weights of row r at k as float32 (AVX-512), for each weight format. */
#ifdef __AVX512F__
static inline __m512 ld_f32(const float *w, __mmask16 m) { return _mm512_maskz_loadu_ps(m, w); }
static inline __m512 ld_bf16(const uint16_t *w, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w)), 16));
}
static inline __m512 ld_i8(const int8_t *w, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, w)));
}
/* G rows of x (G = 1, 2 or 4, a constant once inlined) against the 4 weight rows wr: each 16 weights are loaded
   and converted once for all G rows of x. */
#define ROWS4(NAME, T, LD)                                                                                  \
static inline __attribute__((always_inline)) void NAME##_group(const float *x, const T *const *wr,          \
        float *out, int64_t N, int64_t K, int64_t n, int64_t R, int64_t m0, const int G) {                 \
    __m512 a[4][4];                                                                                         \
    for (int i = 0; i < 4; i++) for (int j = 0; j < G; j++) a[i][j] = _mm512_setzero_ps();                  \
    for (int64_t k = 0; k < K; k += 16) {                                                                   \
        __mmask16 mk = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);                             \
        __m512 wv[4];                                                                                       \
        for (int i = 0; i < 4; i++) wv[i] = LD(wr[i] + k, mk);                                              \
        for (int j = 0; j < G; j++) {                                                                       \
            __m512 xv = _mm512_maskz_loadu_ps(mk, x + (m0 + j) * K + k);                                    \
            for (int i = 0; i < 4; i++) a[i][j] = _mm512_fmadd_ps(wv[i], xv, a[i][j]);                     \
        }                                                                                                   \
    }                                                                                                       \
    for (int i = 0; i < R; i++)                                                                             \
        for (int j = 0; j < G; j++) out[(m0 + j) * N + n + i] = _mm512_reduce_add_ps(a[i][j]);              \
}                                                                                                           \
static void NAME##_rows(const float *x, const T *w, float *out, int64_t N, int64_t K, int64_t n0,           \
                        int64_t n1, int64_t M) {                                                            \
    for (int64_t n = n0; n < n1; n += 4) {                                                                  \
        int64_t R = n1 - n < 4 ? n1 - n : 4;                                                                \
        const T *wr[4];                                                                                     \
        for (int i = 0; i < 4; i++) wr[i] = w + (n + (i < R ? i : 0)) * K;                                 \
        for (int64_t m0 = 0; m0 < M;) {                                                                     \
            if (M - m0 >= 4) { NAME##_group(x, wr, out, N, K, n, R, m0, 4); m0 += 4; }                      \
            else if (M - m0 >= 2) { NAME##_group(x, wr, out, N, K, n, R, m0, 2); m0 += 2; }                 \
            else { NAME##_group(x, wr, out, N, K, n, R, m0, 1); m0 += 1; }                                  \
        }                                                                                                   \
    }                                                                                                       \
}
#else
#define ROWS4(NAME, T, LD)                                                                                  \
static void NAME##_rows(const float *x, const T *w, float *out, int64_t N, int64_t K, int64_t n0,           \
                        int64_t n1, int64_t M) {                                                            \
    for (int64_t n = n0; n < n1; n++)                                                                       \
        for (int64_t m = 0; m < M; m++) {                                                                   \
            const float *xr = x + m * K; const T *wr = w + n * K; float acc = 0.f;                          \
            _Pragma("omp simd reduction(+:acc)")                                                            \
            for (int64_t k = 0; k < K; k++) acc += LD(wr[k]) * xr[k];                                       \
            out[m * N + n] = acc;                                                                           \
        }                                                                                                   \
}
static inline float ld_f32(float v) { return v; }
static inline float ld_bf16(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
static inline float ld_i8(int8_t v) { return (float)v; }
#endif

ROWS4(f32, float, ld_f32)
ROWS4(bf16, uint16_t, ld_bf16)
ROWS4(i8, int8_t, ld_i8)

/* int8 W with one scale per block of 32 along K (GGUF's Q8_0), K a multiple of 32: each block's dot product is
   scaled before it is added. */
static void q8_rows(const float *x, const int8_t *w, const float *scale, float *out, int64_t N, int64_t K,
                    int64_t n0, int64_t n1, int64_t M) {
    int64_t nb = K / 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        const float *sr = scale + n * nb;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
#ifdef __AVX512F__
            __m512 acc = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *wb = wr + b * 32; const float *xb = xr + b * 32;
                __m512 t = _mm512_mul_ps(ld_i8(wb, 0xFFFF), _mm512_loadu_ps(xb));
                t = _mm512_fmadd_ps(ld_i8(wb + 16, 0xFFFF), _mm512_loadu_ps(xb + 16), t);
                acc = _mm512_fmadd_ps(t, _mm512_set1_ps(sr[b]), acc);
            }
            out[m * N + n] = _mm512_reduce_add_ps(acc);
#else
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                float t = 0.f;
                _Pragma("omp simd reduction(+:t)")
                for (int64_t k = 0; k < 32; k++) t += (float)wr[b * 32 + k] * xr[b * 32 + k];
                acc += t * sr[b];
            }
            out[m * N + n] = acc;
#endif
        }
    }
}

/* Rows [0, N) split between the threads in blocks of 16 rows. */
#define SPLIT(CALL)                                                                                         \
    int64_t blocks = (N + 15) / 16;                                                                         \
    _Pragma("omp parallel num_threads(threads)")                                                            \
    {                                                                                                       \
        int t = omp_get_thread_num(), T = omp_get_num_threads();                                            \
        int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;                                             \
        int64_t n0 = b0 * 16, n1 = b1 * 16 < N ? b1 * 16 : N;                                               \
        if (n0 < n1) CALL;                                                                                  \
    }

/* y (M, N) = x (M, K) . W^T, x and y float32, W (N, K) row-major. */
void mv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    SPLIT(f32_rows(x, w, y, N, K, n0, n1, M))
}
void mv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    SPLIT(bf16_rows(x, w, y, N, K, n0, n1, M))
}
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI 1
#define CHUNK 8192 /* int32 sums of 8192 products of 127 * 32767 cannot overflow: added in float per chunk */
/* int8 rows against x quantized per row to int16 (xq, Kp = K rounded up to 32, zero tail; xs the row scales):
   VNNI's vpdpwssd sums 32 products a step in int32. */
static void i8_rows_vnni(const int16_t *xq, const float *xs, const int8_t *w, float *out, int64_t N, int64_t K,
                         int64_t Kp, int64_t n0, int64_t n1, int64_t M) {
    for (int64_t n = n0; n < n1; n += 4) {
        int64_t R = n1 - n < 4 ? n1 - n : 4;
        const int8_t *w0 = w + n * K, *w1 = R > 1 ? w0 + K : w0, *w2 = R > 2 ? w0 + 2 * K : w0,
                     *w3 = R > 3 ? w0 + 3 * K : w0;
        for (int64_t m = 0; m < M; m++) {
            const int16_t *xr = xq + m * Kp;
            __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
            for (int64_t c = 0; c < K; c += CHUNK) {
                int64_t end = K - c > CHUNK ? c + CHUNK : K;
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t k = c; k < end; k += 32) {
                    __mmask32 mk = end - k >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << (end - k)) - 1);
                    __m512i xv = _mm512_loadu_si512(xr + k);
                    a0 = _mm512_dpwssd_epi32(a0, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w0 + k)), xv);
                    a1 = _mm512_dpwssd_epi32(a1, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w1 + k)), xv);
                    a2 = _mm512_dpwssd_epi32(a2, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w2 + k)), xv);
                    a3 = _mm512_dpwssd_epi32(a3, _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, w3 + k)), xv);
                }
                f0 = _mm512_add_ps(f0, _mm512_cvtepi32_ps(a0));
                f1 = _mm512_add_ps(f1, _mm512_cvtepi32_ps(a1));
                f2 = _mm512_add_ps(f2, _mm512_cvtepi32_ps(a2));
                f3 = _mm512_add_ps(f3, _mm512_cvtepi32_ps(a3));
            }
            float r[4] = {_mm512_reduce_add_ps(f0), _mm512_reduce_add_ps(f1), _mm512_reduce_add_ps(f2),
                          _mm512_reduce_add_ps(f3)};
            for (int64_t i = 0; i < R; i++) out[m * N + n + i] = r[i] * xs[m];
        }
    }
}
#endif

/* int8 W with one scale per row: y = (x . q^T) * scale. With VNNI, x is first rounded per row to int16 steps of
   max|x| / 32767 (finer than the bfloat16 activations int8 models run in) and the products are exact integers. */
void mv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
           int threads) {
#ifdef VNNI
    int64_t Kp = (K + 31) / 32 * 32;
    int16_t *xq = (int16_t *)calloc((size_t)(M * Kp), sizeof(int16_t));
    float xs[MAX_ROWS_C];
    if (xq != NULL && M <= MAX_ROWS_C) {
        for (int64_t m = 0; m < M; m++) {
            float amax = 0.f;
            for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(x[m * K + k]));
            float step = amax > 0.f ? amax / 32767.f : 1.f, inv = 1.f / step;
            for (int64_t k = 0; k < K; k++) xq[m * Kp + k] = (int16_t)lrintf(x[m * K + k] * inv);
            xs[m] = step;
        }
        SPLIT({ i8_rows_vnni(xq, xs, w, y, N, K, Kp, n0, n1, M);
                for (int64_t m = 0; m < M; m++) for (int64_t n = n0; n < n1; n++) y[m * N + n] *= scale[n]; })
        free(xq);
        return;
    }
    free(xq);
#endif
    SPLIT({ i8_rows(x, w, y, N, K, n0, n1, M);
            for (int64_t m = 0; m < M; m++) for (int64_t n = n0; n < n1; n++) y[m * N + n] *= scale[n]; })
}
/* int8 W with one scale per block of 32 along K (scale (N, K / 32)) */
void mv_q8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
           int threads) {
    SPLIT(q8_rows(x, w, scale, y, N, K, n0, n1, M))
}
