// lmforge's matrix-vector kernels: y (M, N) = x (M, K) . W^T for the few rows of a decode step (M <= 16), W (N, K)
// row-major in float32, bfloat16, or int8 with one scale per row or per block of 32 along K; y float32. Built by
// matvec.py with the host compiler (-O3 -march=native -fopenmp) as part of matvec_op.cpp; AVX-512 code where the
// host has it, else loops the compiler vectorises.
//
// A tile is 4 rows of W against up to 4 rows of x: 16 accumulators in registers, each vector of W loaded (and
// converted) once for the tile's x rows, the 16 sums reduced together at the end; the next 4 rows are prefetched
// meanwhile. Where the host has AMX, bfloat16 W against 2 to 16 rows of bfloat16 x runs on the tile unit instead
// (16 rows of W by 32 columns a step, straight from W's row-major layout). Rows of W are split between
// `threads` OpenMP threads in blocks of 16 rows; the library links libgomp.so.1, which resolves to the copy torch
// has loaded, so the threads are torch's own pool.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define MV_AVX512 1
#if defined(__AVX512VNNI__)
#define MV_VNNI 1 // int8 rows by vpdpwssd against x rounded to int16
#endif
#if defined(__AVX512BF16__)
#define MV_BF16DOT 1 // bfloat16 rows by vdpbf16ps against bfloat16 x
#endif
#endif

namespace mv {

constexpr int64_t MAX_X_ROWS = 64; // rows of x an int8 call takes (the callers send at most 16)

#ifdef MV_AVX512
// The mask of the lanes of 16 from position i that lie before n.
static inline __mmask16 lanes16(int64_t n, int64_t i) {
    return n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
}

// Weight formats: S weights per vector step, Acc the accumulator, CHUNK the steps summed before the accumulators
// are turned into float32 (int32 sums of 8192 products of 127 * 32767 cannot overflow).
struct F32 { // float32 W, float32 x
    using W = float; using X = float; using Acc = __m512;
    static constexpr int S = 16; static constexpr int64_t CHUNK = INT64_MAX;
    static Acc zero() { return _mm512_setzero_ps(); }
    static __m512 w(const W *p, uint32_t m) { return _mm512_maskz_loadu_ps((__mmask16)m, p); }
    static __m512 x(const X *p, uint32_t m) { return _mm512_maskz_loadu_ps((__mmask16)m, p); }
    static Acc madd(Acc a, __m512 w, __m512 x) { return _mm512_fmadd_ps(w, x, a); }
    static __m512 f(Acc a) { return a; }
};
struct BF16 : F32 { // bfloat16 W widened in registers, float32 x
    using W = uint16_t;
    static __m512 w(const W *p, uint32_t m) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    }
};
struct I8 : F32 { // int8 W widened in registers, float32 x (no VNNI)
    using W = int8_t;
    static __m512 w(const W *p, uint32_t m) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
    }
};
#ifdef MV_BF16DOT
struct BF16Dot { // bfloat16 W and x: vdpbf16ps multiplies 32 pairs exactly and sums them in float32
    using W = uint16_t; using X = uint16_t; using Acc = __m512;
    static constexpr int S = 32; static constexpr int64_t CHUNK = INT64_MAX;
    static Acc zero() { return _mm512_setzero_ps(); }
    static __m512bh w(const W *p, uint32_t m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
    static __m512bh x(const X *p, uint32_t m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
    static Acc madd(Acc a, __m512bh w, __m512bh x) { return _mm512_dpbf16_ps(a, w, x); }
    static __m512 f(Acc a) { return a; }
};
#endif
#ifdef MV_VNNI
struct I8Vnni { // int8 W widened to int16 in registers, x rounded to int16: vpdpwssd sums exact products in int32
    using W = int8_t; using X = int16_t; using Acc = __m512i;
    static constexpr int S = 32; static constexpr int64_t CHUNK = 8192;
    static Acc zero() { return _mm512_setzero_si512(); }
    static __m512i w(const W *p, uint32_t m) { return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p)); }
    static __m512i x(const X *p, uint32_t m) { return _mm512_maskz_loadu_epi16(m, p); }
    static Acc madd(Acc a, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(a, w, x); }
    static __m512 f(Acc a) { return _mm512_cvtepi32_ps(a); }
};
// x rounded to int16 steps of max|x| / 32767 (nearest, ties to even); returns the step.
static float to_int16(const float *x, int16_t *q, int64_t K) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_maskz_loadu_ps(lanes16(K, k), x + k)));
    const float top = _mm512_reduce_max_ps(amax), step = top > 0.f ? top / 32767.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / step);
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes16(K, k), x + k), inv);
        _mm256_mask_storeu_epi16(q + k, lanes16(K, k), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(scaled)));
    }
    return step;
}
#endif

// The sums of a, b, c and d as the 4 lanes of one vector.
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Rows n..n+R-1 of W (R <= 4; w points to row n) against rows 0..G-1 of x (stride K) into y (stride N): y[j][i]
// = sum_k w[i][k] x[j][k], times rscale[i] * xscale[j] where given.
template <class F, int G>
static inline __attribute__((always_inline)) void tile(const typename F::X *x, const typename F::W *w, float *y,
        int64_t N, int64_t K, int R, const float *rscale, const float *xscale) {
    const typename F::W *wr[4] = {w, R > 1 ? w + K : w, R > 2 ? w + 2 * K : w, R > 3 ? w + 3 * K : w};
    __m128 total[G];
    for (int j = 0; j < G; j++) total[j] = _mm_setzero_ps();
    for (int64_t c = 0; c < K; c += F::CHUNK) {
        const int64_t end = K - c > F::CHUNK ? c + F::CHUNK : K;
        typename F::Acc a[4][G];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < G; j++) a[i][j] = F::zero();
        auto step = [&](int64_t k, uint32_t m) __attribute__((always_inline)) {
            decltype(F::w(w, m)) wv[4];
            for (int i = 0; i < 4; i++) wv[i] = F::w(wr[i] + k, m);
            for (int i = 0; i < 4; i++) _mm_prefetch((const char *)(wr[i] + 4 * K + k), _MM_HINT_T0); // next block
            for (int j = 0; j < G; j++) {
                auto xv = F::x(x + j * K + k, m);
                for (int i = 0; i < 4; i++) a[i][j] = F::madd(a[i][j], wv[i], xv);
            }
        };
        int64_t k = c;
        for (; k + F::S <= end; k += F::S) step(k, 0xFFFFFFFFu);
        if (k < end) step(k, (uint32_t)((1ull << (end - k)) - 1));
        for (int j = 0; j < G; j++)
            total[j] = _mm_add_ps(total[j], hsum4(F::f(a[0][j]), F::f(a[1][j]), F::f(a[2][j]), F::f(a[3][j])));
    }
    const __mmask8 keep = (__mmask8)((1u << R) - 1);
    for (int j = 0; j < G; j++) {
        __m128 t = total[j];
        if (rscale) t = _mm_mul_ps(_mm_mul_ps(t, _mm_maskz_loadu_ps(keep, rscale)), _mm_set1_ps(xscale[j]));
        _mm_mask_storeu_ps(y + j * N, keep, t);
    }
}

// Rows [n0, n1) of W against all M rows of x: 4 rows of W at a time, x in tiles of 4, 3, 2 or 1 rows.
template <class F>
static void rows(const typename F::X *x, const typename F::W *w, float *y, int64_t M, int64_t N, int64_t K,
                 int64_t n0, int64_t n1, const float *rscale = nullptr, const float *xscale = nullptr) {
    for (int64_t n = n0; n < n1; n += 4) {
        const int R = n1 - n < 4 ? (int)(n1 - n) : 4;
        const typename F::W *wn = w + n * K;
        const float *rs = rscale ? rscale + n : nullptr;
        int64_t m = 0;
        for (; M - m >= 4; m += 4) tile<F, 4>(x + m * K, wn, y + m * N + n, N, K, R, rs, xscale + (rs ? m : 0));
        const float *xs = xscale + (rs ? m : 0);
        if (M - m == 3) tile<F, 3>(x + m * K, wn, y + m * N + n, N, K, R, rs, xs);
        else if (M - m == 2) tile<F, 2>(x + m * K, wn, y + m * N + n, N, K, R, rs, xs);
        else if (M - m == 1) tile<F, 1>(x + m * K, wn, y + m * N + n, N, K, R, rs, xs);
    }
}
#else
// Portable: one dot product at a time, vectorised by the compiler.
struct F32 { using W = float; using X = float; static float w(float v) { return v; } };
struct BF16 : F32 {
    using W = uint16_t;
    static float w(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }
};
struct I8 : F32 { using W = int8_t; static float w(int8_t v) { return (float)v; } };
template <class F>
static void rows(const float *x, const typename F::W *w, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                 int64_t n1, const float *rscale = nullptr, const float * = nullptr) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K; const typename F::W *wr = w + n * K; float acc = 0.f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < K; k++) acc += F::w(wr[k]) * xr[k];
            y[m * N + n] = rscale ? acc * rscale[n] : acc;
        }
}
#endif

// float32 to bfloat16, rounded to nearest even (NaN stays NaN): torch's own conversion, bit for bit.
static inline uint16_t bf16_bits(float v) {
    const uint32_t u = __builtin_bit_cast(uint32_t, v);
    return v != v ? 0x7FC0 : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
#ifdef MV_AVX512
static inline __m512i bf16_bits(__m512 v) { // in the low half of each 32-bit lane
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}
static inline __m512 round_bf16(__m512 v) { // v rounded to bfloat16, as float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}
#endif
static inline void to_bf16(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#ifdef MV_AVX512
    for (; i < n; i += 16) {
        const __mmask16 m = lanes16(n, i);
        _mm256_mask_storeu_epi16(dst + i, m, _mm512_cvtepi32_epi16(bf16_bits(_mm512_maskz_loadu_ps(m, src + i))));
    }
#endif
    for (; i < n; i++) dst[i] = bf16_bits(src[i]);
}
static inline float round_bf16(float v) { return __builtin_bit_cast(float, (uint32_t)bf16_bits(v) << 16); }

// Rows [0, N) of y (M, N) split between the threads in blocks of 16 rows; where `yb` is given, each thread then
// writes its rows rounded to bfloat16 into yb (M, N) while they are in its cache.
template <class Body>
static void split(int64_t N, int threads, Body body, const float *y = nullptr, uint16_t *yb = nullptr,
                  int64_t M = 0) {
    const int64_t blocks = (N + 15) / 16;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t b0 = blocks * t / T, b1 = blocks * (t + 1) / T;
        const int64_t n0 = b0 * 16, n1 = b1 * 16 < N ? b1 * 16 : N;
        if (n0 < n1) {
            body(n0, n1);
            if (yb)
                for (int64_t m = 0; m < M; m++) to_bf16(y + m * N + n0, yb + m * N + n0, n1 - n0);
        }
    }
}

// int8 W with one scale per block of 32 along K (GGUF's Q8_0), K a multiple of 32: each block's dot product is
// scaled before it is added.
static void q8_rows(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
                    int64_t n0, int64_t n1) {
    const int64_t nb = K / 32;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *wr = w + n * K;
        const float *sr = scale + n * nb;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
#ifdef MV_AVX512
            __m512 acc = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m512 t = _mm512_mul_ps(I8::w(wr + b * 32, 0xFFFF), _mm512_loadu_ps(xr + b * 32));
                t = _mm512_fmadd_ps(I8::w(wr + b * 32 + 16, 0xFFFF), _mm512_loadu_ps(xr + b * 32 + 16), t);
                acc = _mm512_fmadd_ps(t, _mm512_set1_ps(sr[b]), acc);
            }
            y[m * N + n] = _mm512_reduce_add_ps(acc);
#else
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                float t = 0.f;
#pragma omp simd reduction(+ : t)
                for (int64_t k = 0; k < 32; k++) t += (float)wr[b * 32 + k] * xr[b * 32 + k];
                acc += t * sr[b];
            }
            y[m * N + n] = acc;
#endif
        }
    }
}

} // namespace mv

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(MV_BF16DOT)
#define MV_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
namespace mv {
// Whether this process may use AMX tiles (Linux grants the tile state on request, once per process).
static bool amx_ready() {
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}
struct alignas(64) TileConfig { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
constexpr int AMX_BLOCKS = 4; // 16-row blocks of W in flight: accumulators tmm0-3, W tiles tmm4-5, x tile tmm6
// x (M <= 16, K) bfloat16 as AMX's B operand: per 32 columns of K, a 16 x 16 tile of pairs (k, k + 1) by row of x,
// in a buffer of this thread's that is kept between calls (rows of the tiles past M stay zero).
static const uint32_t *amx_pack_x(const uint16_t *x, int64_t M, int64_t K) {
    struct Buffer { uint32_t *p = nullptr; int64_t size = 0; ~Buffer() { free(p); } };
    thread_local Buffer buf;
    const int64_t need = K / 32 * 256;
    if (need > buf.size) {
        free(buf.p);
        buf.p = (uint32_t *)aligned_alloc(64, (size_t)need * 4);
        buf.size = buf.p ? need : 0;
        if (!buf.p) return nullptr;
    }
    uint32_t *xt = buf.p;
    memset(xt, 0, (size_t)need * 4);
    const __m512i to_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(16));
    for (int64_t m = 0; m < M; m++) { // row m's 16 pairs of each block go down column m of the block's tile
        const uint16_t *xm = x + m * K;
        for (int64_t kb = 0; kb < K / 32; kb++)
            _mm512_i32scatter_epi32(xt + kb * 256 + m, to_rows, _mm512_loadu_si512(xm + kb * 32), 4);
    }
    return xt;
}
// Rows [n0, n1) of W, n1 - n0 a multiple of 16, K a multiple of 32.
static void amx_rows(const uint32_t *xt, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                     int64_t n1) {
    TileConfig cfg = {};
    cfg.palette = 1;
    for (int t = 0; t < 7; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) float c[16 * 16];
    const int64_t stride = K * 2;
    for (int64_t n = n0; n < n1; n += 16 * AMX_BLOCKS) {
        const int blocks = (n1 - n) / 16 < AMX_BLOCKS ? (int)((n1 - n) / 16) : AMX_BLOCKS;
        const uint16_t *wn = w + n * K;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        // the next group's rows (contiguous) are prefetched into L2 while this one is multiplied
        const char *next = (const char *)(wn + 16 * AMX_BLOCKS * K), *end = (const char *)(w + n1 * K);
        const int64_t span = 16 * AMX_BLOCKS * K * 2, per = (span / 64 + K / 32 - 1) / (K / 32);
        for (int64_t kb = 0; kb < K / 32; kb++) {
            for (int64_t l = 0; l < per; l++) {
                const char *p = next + (kb * per + l) * 64;
                if (p < end) _mm_prefetch(p, _MM_HINT_T0);
            }
            _tile_loadd(6, xt + kb * 256, 64);
            _tile_loadd(4, wn + kb * 32, stride);
            _tile_dpbf16ps(0, 4, 6);
            if (blocks > 1) { _tile_loadd(5, wn + 16 * K + kb * 32, stride); _tile_dpbf16ps(1, 5, 6); }
            if (blocks > 2) { _tile_loadd(4, wn + 32 * K + kb * 32, stride); _tile_dpbf16ps(2, 4, 6); }
            if (blocks > 3) { _tile_loadd(5, wn + 48 * K + kb * 32, stride); _tile_dpbf16ps(3, 5, 6); }
        }
        for (int b = 0; b < blocks; b++) {
            switch (b) {
            case 0: _tile_stored(0, c, 64); break;
            case 1: _tile_stored(1, c, 64); break;
            case 2: _tile_stored(2, c, 64); break;
            default: _tile_stored(3, c, 64);
            }
            for (int64_t m = 0; m < M; m++)
                for (int r = 0; r < 16; r++) y[m * N + n + b * 16 + r] = c[r * 16 + m];
        }
    }
    _tile_release();
}
} // namespace mv
#endif

// y (M, N) = x (M, K) . W^T, x and y float32, W (N, K) row-major.
static void mv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads,
                   uint16_t *yb = nullptr) {
    mv::split(N, threads, [&](int64_t n0, int64_t n1) { mv::rows<mv::F32>(x, w, y, M, N, K, n0, n1); }, y, yb, M);
}
static void mv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads,
                    uint16_t *yb = nullptr) {
    mv::split(N, threads, [&](int64_t n0, int64_t n1) { mv::rows<mv::BF16>(x, w, y, M, N, K, n0, n1); }, y, yb, M);
}
#ifdef MV_BF16DOT
// x bfloat16 too: exact products, float32 sums; on AMX's tiles from 2 rows of x where the host has them.
static void mv_bf16_dot(const uint16_t *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K,
                        int threads, uint16_t *yb = nullptr) {
#ifdef MV_AMX
    const uint32_t *xt = M >= 2 && M <= 16 && K % 32 == 0 && mv::amx_ready() ? mv::amx_pack_x(x, M, K) : nullptr;
    if (xt != nullptr) {
        mv::split(N, threads, [&](int64_t n0, int64_t n1) {
            const int64_t whole = n0 + (n1 - n0) / 16 * 16; // whole 16-row blocks on the tiles, the rest here
            if (whole > n0) mv::amx_rows(xt, w, y, M, N, K, n0, whole);
            if (whole < n1) mv::rows<mv::BF16Dot>(x, w, y, M, N, K, whole, n1);
        }, y, yb, M);
        return;
    }
#endif
    mv::split(N, threads, [&](int64_t n0, int64_t n1) { mv::rows<mv::BF16Dot>(x, w, y, M, N, K, n0, n1); }, y, yb,
              M);
}
#endif
// int8 W with one scale per row: y = (x . q^T) * scale. With VNNI, x is first rounded per row to int16 steps of
// max|x| / 32767 (finer than the bfloat16 activations int8 models run in) and the products are exact integers.
static void mv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
                  int threads, uint16_t *yb = nullptr) {
#ifdef MV_VNNI
    int16_t *xq = (int16_t *)malloc((size_t)(M * K) * sizeof(int16_t));
    if (xq != nullptr) {
        float xs[mv::MAX_X_ROWS];
        for (int64_t m = 0; m < M; m++) xs[m] = mv::to_int16(x + m * K, xq + m * K, K);
        mv::split(N, threads, [&](int64_t n0, int64_t n1) {
            mv::rows<mv::I8Vnni>(xq, w, y, M, N, K, n0, n1, scale, xs);
        }, y, yb, M);
        free(xq);
        return;
    }
#endif
    float ones[mv::MAX_X_ROWS]; // M <= MAX_X_ROWS (matvec_op.cpp checks)
    for (float &o : ones) o = 1.f;
    mv::split(N, threads, [&](int64_t n0, int64_t n1) {
        mv::rows<mv::I8>(x, w, y, M, N, K, n0, n1, scale, ones);
    }, y, yb, M);
}
// int8 W with one scale per block of 32 along K (scale (N, K / 32)).
static void mv_q8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K,
                  int threads, uint16_t *yb = nullptr) {
    mv::split(N, threads, [&](int64_t n0, int64_t n1) { mv::q8_rows(x, w, scale, y, M, N, K, n0, n1); }, y, yb, M);
}
