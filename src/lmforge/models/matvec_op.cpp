// lmforge::matvec, the torch operator over the kernels of matvec_kernels.h: the dispatcher calls them directly,
// from eager code and from torch.compile'd steps alike. Built by matvec.py with the host's C++ compiler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <initializer_list>
#include <tuple>
#include <vector>

#include "matvec_kernels.h"

static at::Tensor matvec(const at::Tensor &x_in, const at::Tensor &weight, const std::optional<at::Tensor> &scale) {
    TORCH_CHECK(x_in.dim() >= 1 && weight.dim() == 2 && x_in.size(-1) == weight.size(1),
                "lmforge::matvec takes x (..., K) and weight (N, K), got ", x_in.sizes(), " and ", weight.sizes());
    TORCH_CHECK(x_in.device().is_cpu() && weight.device().is_cpu() && weight.is_contiguous(),
                "lmforge::matvec takes CPU tensors and a contiguous weight");
    // rows of x as they lie where x is contiguous (a decode step's: no reshape, conversion or view to dispatch)
    const at::Tensor x = x_in.is_contiguous() ? x_in : x_in.reshape({-1, x_in.size(-1)}).contiguous();
    TORCH_CHECK(x.size(-1) > 0, "lmforge::matvec takes K > 0, got x ", x_in.sizes());
    const int64_t K = x.size(-1), M = x.numel() / K, N = weight.size(0);
    std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
    shape.back() = N;
    // a bfloat16 x gets a bfloat16 y: each thread rounds the rows it computed from a float32 scratch that the
    // calling thread keeps (a fresh one per call costs page faults: 2 MB for a 10-row step's vocabulary logits)
    const bool bf16_out = x.scalar_type() == at::kBFloat16;
    at::Tensor yb = bf16_out ? at::empty(shape, x.options()) : at::Tensor();
    at::Tensor y = bf16_out ? at::Tensor() : at::empty(shape, x.options().dtype(at::kFloat));
    thread_local std::vector<float> scratch;
    if (bf16_out && scratch.size() < (size_t)(M * N)) scratch.resize(M * N);
    uint16_t *ybp = bf16_out ? reinterpret_cast<uint16_t *>(yb.data_ptr()) : nullptr;
    float *yp = bf16_out ? scratch.data() : y.data_ptr<float>();
    const int threads = at::get_num_threads();
#ifdef MV_BF16DOT
    if (weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16) { // both bfloat16: exact products
        mv_bf16_dot(reinterpret_cast<const uint16_t *>(x.data_ptr()),
                    reinterpret_cast<const uint16_t *>(weight.data_ptr()), yp, M, N, K, threads, ybp);
        return yb;
    }
#endif
    at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const float *xp = xf.data_ptr<float>();
    switch (weight.scalar_type()) {
    case at::kFloat:
        mv_f32(xp, weight.data_ptr<float>(), yp, M, N, K, threads, ybp);
        break;
    case at::kBFloat16:
        mv_bf16(xp, reinterpret_cast<const uint16_t *>(weight.data_ptr()), yp, M, N, K, threads, ybp);
        break;
    case at::kChar: {
        TORCH_CHECK(scale.has_value(), "lmforge::matvec: int8 weights need their scales");
        TORCH_CHECK(M <= mv::MAX_X_ROWS, "lmforge::matvec: int8 weights take at most ", mv::MAX_X_ROWS,
                    " rows of x, got ", M);
        at::Tensor s = scale->to(at::kFloat).contiguous();
        TORCH_CHECK((s.dim() == 1 && s.size(0) == N) || (s.dim() == 2 && s.size(0) == N && K % 32 == 0 &&
                    s.size(1) == K / 32), "lmforge::matvec: int8 scales must be (N,) or (N, K / 32), got ",
                    s.sizes());
        (s.dim() == 1 ? mv_i8 : mv_q8)(xp, weight.data_ptr<int8_t>(), s.data_ptr<float>(), yp, M, N, K, threads,
                                       ybp);
        break;
    }
    default:
        TORCH_CHECK(false, "lmforge::matvec: weights of dtype ", weight.scalar_type(), " are not supported");
    }
    if (yb.defined()) return yb;
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

#ifdef MV_AVX512
// exp of 16 lanes: 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to r^6 (relative
// error below 2e-7); x is taken as at least -87, which keeps 2^n a normal float.
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); // ln 2 in two parts
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}
#endif

// s[i] = exp(s[i] - top) (0 where s[i] is -inf); returns their sum.
static float softmax_numerators(float *s, int64_t S, float top) {
    float total = 0.f;
#ifdef MV_AVX512
    const __m512 t = _mm512_set1_ps(top), hidden = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < S; i += 16) {
        const __mmask16 m = mv::lanes16(S, i);
        const __m512 v = _mm512_maskz_loadu_ps(m, s + i);
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, hidden, _CMP_NEQ_OQ) & m,
                                             exp16(_mm512_sub_ps(v, t)));
        _mm512_mask_storeu_ps(s + i, m, e);
        total += _mm512_reduce_add_ps(e);
    }
#else
    for (int64_t i = 0; i < S; i++) total += (s[i] = s[i] == -INFINITY ? 0.f : std::exp(s[i] - top));
#endif
    return total;
}

// --- the element-wise steps of a decode step, one pass each (eager decoding spends more on their many small torch
// ops than on the arithmetic); results rounded as torch's own ops round them --------------------------------------

// Values of x (float32 or bfloat16) as float32, 16 at a time.
#ifdef MV_AVX512
static inline __m512 load16(const void *x, bool bf16, int64_t i, __mmask16 m) {
    return bf16 ? mv::BF16::w((const uint16_t *)x + i, m) : _mm512_maskz_loadu_ps(m, (const float *)x + i);
}
#endif
static inline float value_at(const void *x, bool bf16, int64_t i) {
    return bf16 ? __builtin_bit_cast(float, (uint32_t)((const uint16_t *)x)[i] << 16) : ((const float *)x)[i];
}
// float32 values out as x's dtype (bfloat16 rounded to nearest even).
static inline void put(void *y, bool bf16, int64_t i, const float *v, int64_t n) {
    if (bf16) mv::to_bf16(v, (uint16_t *)y + i, n);
    else std::copy(v, v + n, (float *)y + i);
}
static void check_rows(const at::Tensor &x, const char *op) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 &&
                (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
                "lmforge::", op, " takes a contiguous float32 or bfloat16 CPU tensor, got ", x.scalar_type(), " of ",
                x.sizes());
}

// RMSNorm of each row of x (..., C) as lmforge's RMSNorm computes it: float32, y = x * rsqrt(mean(x^2) + eps) *
// weight; bfloat16, t = bf16(x * rsqrt(mean(x^2) + eps)) in float32, then y = bf16(weight * t).
static at::Tensor rms_norm(const at::Tensor &x, const at::Tensor &weight, double eps) {
    check_rows(x, "rms_norm");
    const int64_t C = x.size(-1), rows = x.numel() / std::max<int64_t>(C, 1);
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && weight.scalar_type() == x.scalar_type() &&
                weight.is_contiguous(), "lmforge::rms_norm: weight must be (", C, ",) of x's dtype, got ",
                weight.scalar_type(), " of ", weight.sizes());
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    at::Tensor y = at::empty_like(x);
    const void *xp = x.const_data_ptr(), *wp = weight.const_data_ptr();
    void *yp = y.data_ptr();
    std::vector<float> out(C);
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * C;
        float ss = 0.f;
#ifdef MV_AVX512
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < C; i += 16) {
            const __m512 v = load16(xp, bf16, base + i, mv::lanes16(C, i));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        ss = _mm512_reduce_add_ps(acc);
#else
        for (int64_t i = 0; i < C; i++) ss += value_at(xp, bf16, base + i) * value_at(xp, bf16, base + i);
#endif
        const float rstd = 1.f / std::sqrt(ss / (float)C + (float)eps);
        int64_t i = 0;
#ifdef MV_AVX512
        for (; i < C; i += 16) {
            const __mmask16 m = mv::lanes16(C, i);
            __m512 t = _mm512_mul_ps(load16(xp, bf16, base + i, m), _mm512_set1_ps(rstd));
            if (bf16) t = mv::round_bf16(t);
            _mm512_mask_storeu_ps(out.data() + i, m, _mm512_mul_ps(t, load16(wp, bf16, i, m)));
        }
#endif
        for (; i < C; i++) {
            const float t = value_at(xp, bf16, base + i) * rstd;
            out[i] = (bf16 ? mv::round_bf16(t) : t) * value_at(wp, bf16, i);
        }
        put(yp, bf16, base, out.data(), C);
    }
    return y;
}

// silu(gate) * up for h (..., 2F) holding gate then up: bfloat16, a = bf16(silu(gate)), y = bf16(a * up).
static at::Tensor silu_mul(const at::Tensor &h) {
    check_rows(h, "silu_mul");
    TORCH_CHECK(h.size(-1) % 2 == 0, "lmforge::silu_mul takes h (..., 2F), got ", h.sizes());
    const int64_t F = h.size(-1) / 2, rows = h.numel() / std::max<int64_t>(2 * F, 1);
    const bool bf16 = h.scalar_type() == at::kBFloat16;
    std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
    shape.back() = F;
    at::Tensor y = at::empty(shape, h.options());
    const void *hp = h.const_data_ptr();
    void *yp = y.data_ptr();
    // rows in parallel where there are enough of them (10 sampled sequences: 10 rows of 1536 in a SmolLM2 step)
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)), [&](int64_t begin, int64_t end) {
        std::vector<float> out(F);
        for (int64_t r = begin; r < end; r++) {
            const int64_t g0 = r * 2 * F, u0 = g0 + F;
            int64_t i = 0;
#ifdef MV_AVX512
            for (; i < F; i += 16) {
                const __mmask16 m = mv::lanes16(F, i);
                const __m512 g = load16(hp, bf16, g0 + i, m);
                __m512 a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f),
                                                          exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
                if (bf16) a = mv::round_bf16(a); // as torch's silu returns it, before the product
                _mm512_mask_storeu_ps(out.data() + i, m, _mm512_mul_ps(a, load16(hp, bf16, u0 + i, m)));
            }
#else
            for (; i < F; i++) {
                const float g = value_at(hp, bf16, g0 + i), a = g / (1.f + std::exp(-g));
                out[i] = (bf16 ? mv::round_bf16(a) : a) * value_at(hp, bf16, u0 + i);
            }
#endif
            put(yp, bf16, r * F, out.data(), F);
        }
    });
    return y;
}

// The k largest values of each row of x (B, V) float32 and their indices, largest first; equal values in index
// order, NaN above all numbers (as torch.topk ranks it). One pass per row: 16 values at a time are compared with the
// row's k-th largest so far, and the few that beat it are inserted into the sorted k (sampling's top_k: 50 of a
// 49,152-token vocabulary, where torch.topk took ~1.3 ms per step for 10 rows).
static inline bool above(float a, float b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }
static std::tuple<at::Tensor, at::Tensor> topk(const at::Tensor &x, int64_t k) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(),
                "lmforge::topk takes a contiguous float32 CPU tensor (B, V), got ", x.scalar_type(), " of ", x.sizes());
    const int64_t B = x.size(0), V = x.size(1);
    TORCH_CHECK(1 <= k && k <= V, "lmforge::topk: k must be in [1, ", V, "], got ", k);
    at::Tensor values = at::empty({B, k}, x.options()), index = at::empty({B, k}, x.options().dtype(at::kLong));
    const float *xp = x.const_data_ptr<float>();
    float *vp = values.data_ptr<float>();
    int64_t *ip = index.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; b++) {
            const float *row = xp + b * V;
            float *val = vp + b * k;
            int64_t *idx = ip + b * k;
            for (int64_t i = 0; i < k; i++) idx[i] = i;
            std::stable_sort(idx, idx + k, [&](int64_t i, int64_t j) { return above(row[i], row[j]); });
            for (int64_t i = 0; i < k; i++) val[i] = row[idx[i]];
            const auto offer = [&](int64_t j) {
                const float v = row[j];
                if (!above(v, val[k - 1])) return;
                int64_t p = k - 1;
                for (; p > 0 && above(v, val[p - 1]); p--) {
                    val[p] = val[p - 1];
                    idx[p] = idx[p - 1];
                }
                val[p] = v;
                idx[p] = j;
            };
            int64_t j = k;
#ifdef MV_AVX512
            for (; j + 16 <= V; j += 16) { // "not <=": NaN candidates too; offer decides
                __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), _mm512_set1_ps(val[k - 1]), _CMP_NLE_UQ);
                for (; m; m &= m - 1) offer(j + __builtin_ctz(m));
            }
#endif
            for (; j < V; j++) offer(j);
        }
    });
    return {values, index};
}

// The scores of one task: s (G, S) = q (G, D) . K^T over keys [0, S) of one key/value head, K's rows at stride D
// (float32 or bfloat16, `bf16`); q float32, or bfloat16 where K is and the build multiplies bfloat16 pairs.
static void scores_of(const void *q, const void *k, bool bf16, float *s, int64_t G, int64_t S, int64_t D) {
#ifdef MV_AVX512
    // the decode kernels' tiles: 4 keys against the G query rows at a time, the sums reduced together
#ifdef MV_BF16DOT
    if (bf16) return mv::rows<mv::BF16Dot>((const uint16_t *)q, (const uint16_t *)k, s, G, S, D, 0, S);
#endif
    if (bf16) return mv::rows<mv::BF16>((const float *)q, (const uint16_t *)k, s, G, S, D, 0, S);
    return mv::rows<mv::F32>((const float *)q, (const float *)k, s, G, S, D, 0, S);
#else
    const float *qf = (const float *)q;
    for (int64_t g = 0; g < G; g++)
        for (int64_t j = 0; j < S; j++) {
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; d++)
                dot += qf[g * D + d] * (bf16 ? __builtin_bit_cast(float, (uint32_t)((const uint16_t *)k)[j * D + d] << 16)
                                             : ((const float *)k)[j * D + d]);
            s[g * S + j] = dot;
        }
#endif
}

// o (G, D) = p (G, S) . V over the keys j < S that `seen` lets through (all when null), V's rows at stride D.
#ifdef MV_AVX512
// G2 <= 4 heads by 64 columns at a time: 16 accumulators in registers, each value vector loaded once for them.
template <int G2>
static void weighted_block(const float *p, int64_t S, const void *v, bool bf16, const bool *seen, int64_t D,
                           int64_t d0, float *o) {
    __m512 acc[G2][4];
    __mmask16 m[4];
    for (int i = 0; i < 4; i++) m[i] = d0 + 16 * i < D ? mv::lanes16(D, d0 + 16 * i) : 0;
    for (int g = 0; g < G2; g++)
        for (int i = 0; i < 4; i++) acc[g][i] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        if (seen && !seen[j]) continue;
        __m512 row[4];
        for (int i = 0; i < 4; i++)
            row[i] = bf16 ? mv::BF16::w((const uint16_t *)v + j * D + d0 + 16 * i, m[i])
                          : _mm512_maskz_loadu_ps(m[i], (const float *)v + j * D + d0 + 16 * i);
        for (int g = 0; g < G2; g++) {
            const __m512 pg = _mm512_set1_ps(p[g * S + j]);
            for (int i = 0; i < 4; i++) acc[g][i] = _mm512_fmadd_ps(pg, row[i], acc[g][i]);
        }
    }
    for (int g = 0; g < G2; g++)
        for (int i = 0; i < 4; i++) _mm512_mask_storeu_ps(o + g * D + d0 + 16 * i, m[i], acc[g][i]);
}
#endif
static void weighted_sum(const float *p, int64_t S, const void *v, bool bf16, const bool *seen, int64_t G,
                         int64_t D, float *o) {
#ifdef MV_AVX512
    for (int64_t d0 = 0; d0 < D; d0 += 64)
        for (int64_t g = 0; g < G; g += 4) {
            const float *pg = p + g * S;
            float *og = o + g * D;
            switch (G - g < 4 ? G - g : 4) {
            case 1: weighted_block<1>(pg, S, v, bf16, seen, D, d0, og); break;
            case 2: weighted_block<2>(pg, S, v, bf16, seen, D, d0, og); break;
            case 3: weighted_block<3>(pg, S, v, bf16, seen, D, d0, og); break;
            default: weighted_block<4>(pg, S, v, bf16, seen, D, d0, og);
            }
        }
#else
    std::fill(o, o + G * D, 0.f);
    for (int64_t j = 0; j < S; j++) {
        if (seen && !seen[j]) continue;
        for (int64_t g = 0; g < G; g++) {
            const float pj = p[g * S + j];
#pragma omp simd
            for (int64_t d = 0; d < D; d++)
                o[g * D + d] += pj * (bf16 ? __builtin_bit_cast(float, (uint32_t)((const uint16_t *)v)[j * D + d] << 16)
                                           : ((const float *)v)[j * D + d]);
        }
    }
#endif
}

// One task: o (G, D) = softmax(scale * q . K^T over the keys j < S that `seen` lets through) . V, with scratch
// scores (G, S).
static void attend(const void *q, const void *k, const void *v, bool bf16, const bool *seen, float scale,
                   float *scores, int64_t G, int64_t S, int64_t D, float *o) {
    scores_of(q, k, bf16, scores, G, S, D);
    for (int64_t g = 0; g < G; g++) { // scores to probabilities
        float *sg = scores + g * S, top = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            sg[j] = seen && !seen[j] ? -INFINITY : sg[j] * scale;
            top = std::max(top, sg[j]);
        }
        const float inv = 1.f / softmax_numerators(sg, S, top);
        for (int64_t j = 0; j < S; j++) sg[j] *= inv;
    }
    weighted_sum(scores, S, v, bf16, seen, G, D, o);
}

#ifdef MV_BF16DOT
constexpr bool FLOAT_QUERIES = false; // bfloat16 queries against bfloat16 keys by vdpbf16ps; float32 with float32
#else
constexpr bool FLOAT_QUERIES = true; // bfloat16 keys are widened against float32 queries
#endif

// A boolean key mask as (1 or B, S), checked against B rows and S keys; undefined when there is none.
static at::Tensor key_mask(const std::optional<at::Tensor> &mask, int64_t B, int64_t S, const char *op) {
    if (!mask.has_value()) return at::Tensor();
    at::Tensor m = mask->to(at::kBool).reshape({-1, S}).contiguous();
    TORCH_CHECK(m.size(0) == 1 || m.size(0) == B, "lmforge::", op, ": mask of ", mask->sizes(), " for ", B,
                " rows and ", S, " keys");
    return m;
}

// One task's result into out (G, D) in the dtype of k and v: keys up to the row's last visible one (NaN where none
// is, as SDPA gives), summed in float32 (`sums` holds a bfloat16 result before it is rounded).
static void attend_task(const void *q, const void *k, const void *v, bool bf16, const bool *seen, float scale,
                        int64_t G, int64_t S, int64_t D, float *scores, float *sums, void *out) {
    int64_t n = S;
    while (seen && n > 0 && !seen[n - 1]) n--;
    float *o = bf16 ? sums : (float *)out;
    if (n == 0) std::fill(o, o + G * D, NAN);
    else attend(q, k, v, bf16, seen, scale, scores, G, n, D, o);
    if (bf16) mv::to_bf16(o, (uint16_t *)out, G * D);
}

// Attention of one new token per row: q (B, H, 1, D), k and v (B, Hkv, S, D) (the cache's filled slots: any batch
// and head strides), H a multiple of Hkv (query head h reads key/value head h / (H / Hkv)), mask None or boolean
// (B or 1, 1, 1, S), True where a key may be seen. Scores, softmax and sums in float32, the result in q's dtype.
// One task per (row, key/value head): the G = H / Hkv query heads that share it are multiplied together, so each
// key and value row is read once per task; keys after a row's last visible one (a compiled step's unfilled cache
// slots) are not read at all, and hidden values are skipped.
static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k_in, const at::Tensor &v_in,
                                   const std::optional<at::Tensor> &mask, double scale) {
    TORCH_CHECK(q.dim() == 4 && k_in.dim() == 4 && v_in.sizes() == k_in.sizes() && q.size(2) == 1 &&
                q.size(0) == k_in.size(0) && q.size(3) == k_in.size(3) && q.size(1) % k_in.size(1) == 0,
                "lmforge::decode_attention takes q (B, H, 1, D) and k, v (B, Hkv, S, D), got ", q.sizes(), ", ",
                k_in.sizes(), " and ", v_in.sizes());
    TORCH_CHECK(q.scalar_type() == k_in.scalar_type() && k_in.scalar_type() == v_in.scalar_type() &&
                (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
                "lmforge::decode_attention takes float32 or bfloat16 q, k, v of one dtype");
    const int64_t B = k_in.size(0), Hkv = k_in.size(1), S = k_in.size(2), D = k_in.size(3), G = q.size(1) / Hkv;
    // key and value rows at stride D (the cache's layout; anything else is copied into it)
    const at::Tensor k = k_in.stride(3) == 1 && k_in.stride(2) == D ? k_in : k_in.contiguous();
    const at::Tensor v = v_in.stride(3) == 1 && v_in.stride(2) == D ? v_in : v_in.contiguous();
    const bool bf16 = q.scalar_type() == at::kBFloat16, qf32 = FLOAT_QUERIES || !bf16;
    at::Tensor qs = qf32 ? q.to(at::kFloat) : q; // a task's G query rows at stride D, as the split of a projection gives
    if (qs.stride(3) != 1 || qs.stride(1) != D) qs = qs.contiguous();
    const at::Tensor m = key_mask(mask, B, S, "decode_attention");
    const bool *mp = m.defined() ? m.data_ptr<bool>() : nullptr;
    const int64_t mrows = m.defined() ? m.size(0) : 0, elem = bf16 ? 2 : 4, qelem = qf32 ? 4 : 2;
    const char *kp = static_cast<const char *>(k.const_data_ptr()), *vp = static_cast<const char *>(v.const_data_ptr());
    const char *qp = static_cast<const char *>(qs.const_data_ptr());
    at::Tensor out = at::empty({B, q.size(1), 1, D}, q.options());
    char *obase = static_cast<char *>(out.data_ptr());
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(G * S), sums(bf16 ? G * D : 0); // a bfloat16 result is summed here, then rounded
        for (int64_t task = begin; task < end; task++) {
            const int64_t b = task / Hkv, h = task % Hkv;
            attend_task(qp + (b * qs.stride(0) + h * G * D) * qelem, kp + (b * k.stride(0) + h * k.stride(1)) * elem,
                        vp + (b * v.stride(0) + h * v.stride(1)) * elem, bf16,
                        mp ? mp + (mrows == 1 ? 0 : b) * S : nullptr, (float)scale, G, S, D, scores.data(),
                        sums.data(), obase + task * G * D * elem);
        }
    });
    return out;
}

// y (D) = x * cos + rotate_half(x) * sin (rotate_half(x) = (-x2, x1) for the halves x1, x2), each product and the
// sum rounded to x's dtype as torch's ops round them.
static void rotate(const void *x, const void *cos, const void *sin, bool bf16, int64_t D, void *y) {
    const int64_t half = D / 2;
    float out[512];
    int64_t i = 0;
#ifdef MV_AVX512
    for (; i < half; i += 16) { // the same products and roundings, 16 lanes at a time
        const __mmask16 m = mv::lanes16(half, i);
        const __m512 x1 = load16(x, bf16, i, m), x2 = load16(x, bf16, half + i, m);
        __m512 a = _mm512_mul_ps(x1, load16(cos, bf16, i, m)), b = _mm512_mul_ps(x2, load16(sin, bf16, i, m));
        __m512 c = _mm512_mul_ps(x2, load16(cos, bf16, half + i, m));
        __m512 d = _mm512_mul_ps(x1, load16(sin, bf16, half + i, m));
        if (bf16) { a = mv::round_bf16(a); b = mv::round_bf16(b); c = mv::round_bf16(c); d = mv::round_bf16(d); }
        _mm512_mask_storeu_ps(out + i, m, _mm512_sub_ps(a, b)); // a + (-x2 sin): rounding is symmetric
        _mm512_mask_storeu_ps(out + half + i, m, _mm512_add_ps(c, d));
    }
#endif
    for (; i < half; i++) {
        const float x1 = value_at(x, bf16, i), x2 = value_at(x, bf16, half + i);
        float a = x1 * value_at(cos, bf16, i), b = -x2 * value_at(sin, bf16, i);
        float c = x2 * value_at(cos, bf16, half + i), d = x1 * value_at(sin, bf16, half + i);
        if (bf16) { a = mv::round_bf16(a); b = mv::round_bf16(b); c = mv::round_bf16(c); d = mv::round_bf16(d); }
        out[i] = a + b;
        out[half + i] = c + d;
    }
    put(y, bf16, 0, out, D);
}

// One decode step's attention from the fused projection qkv (B, 1, (H + 2 Hkv) D), eager: queries and keys rotated
// by cos, sin (B, 1, 1, D) where given, keys and values written at slot `slot` of k_cache, v_cache (B, Hkv, L, D)
// (rows at stride D), then decode_attention's computation over slots [0, kv_len); result (B, 1, H D) in qkv's dtype.
// The ~25 small torch ops this replaces (split, views, rotation, cache writes) cost eager decoding more than the
// attention itself.
static at::Tensor decode_step_attention(const at::Tensor &qkv, const std::optional<at::Tensor> &cos,
                                        const std::optional<at::Tensor> &sin, at::Tensor &k_cache,
                                        at::Tensor &v_cache, int64_t slot, int64_t kv_len,
                                        const std::optional<at::Tensor> &mask, double scale, int64_t n_head) {
    const int64_t B = qkv.size(0), Hkv = k_cache.size(1), D = k_cache.size(3), H = n_head;
    check_rows(qkv, "decode_step_attention");
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == 1 && qkv.size(2) == (H + 2 * Hkv) * D && H % Hkv == 0 &&
                k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == B &&
                0 <= slot && slot < kv_len && kv_len <= k_cache.size(2) && D % 2 == 0 && D <= 512,
                "lmforge::decode_step_attention: qkv ", qkv.sizes(), ", caches ", k_cache.sizes(), ", slot ", slot,
                ", kv_len ", kv_len, " and ", n_head, " heads do not fit together");
    TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type() &&
                k_cache.stride(3) == 1 && v_cache.stride(3) == 1 && k_cache.stride(2) == D && v_cache.stride(2) == D,
                "lmforge::decode_step_attention: caches of qkv's dtype with rows at stride D");
    const bool rope = cos.has_value();
    at::Tensor c, s;
    if (rope) {
        c = cos->expand({B, 1, 1, D}).contiguous();
        s = sin->expand({B, 1, 1, D}).contiguous();
        TORCH_CHECK(c.scalar_type() == qkv.scalar_type() && s.scalar_type() == qkv.scalar_type(),
                    "lmforge::decode_step_attention: cos and sin of qkv's dtype");
    }
    const bool bf16 = qkv.scalar_type() == at::kBFloat16, qf32 = FLOAT_QUERIES || !bf16;
    const at::Tensor m = key_mask(mask, B, kv_len, "decode_step_attention");
    const bool *mp = m.defined() ? m.data_ptr<bool>() : nullptr;
    const int64_t mrows = m.defined() ? m.size(0) : 0, G = H / Hkv, elem = bf16 ? 2 : 4, W = (H + 2 * Hkv) * D;
    const char *qkvp = static_cast<const char *>(qkv.const_data_ptr());
    const char *cp = rope ? static_cast<const char *>(c.const_data_ptr()) : nullptr;
    const char *sp = rope ? static_cast<const char *>(s.const_data_ptr()) : nullptr;
    char *kp = static_cast<char *>(k_cache.data_ptr()), *vp = static_cast<char *>(v_cache.data_ptr());
    at::Tensor out = at::empty({B, 1, H * D}, qkv.options());
    char *obase = static_cast<char *>(out.data_ptr());
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(G * kv_len), sums(G * D), qf(G * D);
        std::vector<uint16_t> qb(bf16 ? G * D : 0);
        for (int64_t task = begin; task < end; task++) {
            const int64_t b = task / Hkv, h = task % Hkv;
            const char *row = qkvp + b * W * elem, *cb = cp + b * D * elem, *sb = sp + b * D * elem;
            char *kc = kp + (b * k_cache.stride(0) + h * k_cache.stride(1)) * elem;
            char *vc = vp + (b * v_cache.stride(0) + h * v_cache.stride(1)) * elem;
            const char *knew = row + (H + h) * D * elem, *vnew = row + (H + Hkv + h) * D * elem;
            if (rope) rotate(knew, cb, sb, bf16, D, kc + slot * D * elem);
            else std::memcpy(kc + slot * D * elem, knew, D * elem);
            std::memcpy(vc + slot * D * elem, vnew, D * elem);
            for (int64_t g = 0; g < G; g++) { // the task's queries, rotated, as scores_of takes them
                const char *qsrc = row + (h * G + g) * D * elem;
                void *qdst = bf16 ? (void *)(qb.data() + g * D) : (void *)(qf.data() + g * D);
                if (rope) rotate(qsrc, cb, sb, bf16, D, qdst);
                else std::memcpy(qdst, qsrc, D * elem);
                if (bf16 && qf32)
                    for (int64_t d = 0; d < D; d++) qf[g * D + d] = value_at(qb.data(), true, g * D + d);
            }
            attend_task(qf32 ? (const void *)qf.data() : (const void *)qb.data(), kc, vc, bf16,
                        mp ? mp + (mrows == 1 ? 0 : b) * kv_len : nullptr, (float)scale, G, kv_len, D,
                        scores.data(), sums.data(), obase + task * G * D * elem);
        }
    });
    return out;
}

// What the build uses on this host: 1 AVX-512, 2 int8 by VNNI, 4 bfloat16 by vdpbf16ps, 8 AMX tiles for bfloat16.
static int64_t features() {
    int64_t f = 0;
#ifdef MV_AVX512
    f |= 1;
#endif
#ifdef MV_VNNI
    f |= 2;
#endif
#ifdef MV_BF16DOT
    f |= 4;
#endif
#ifdef MV_AMX
    if (mv::amx_ready()) f |= 8;
#endif
    return f;
}

TORCH_LIBRARY(lmforge, m) {
    m.def("matvec(Tensor x, Tensor weight, Tensor? scale) -> Tensor");
    m.def("matvec_features() -> int", &features);
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
    m.def("silu_mul(Tensor h) -> Tensor");
    m.def("topk(Tensor x, int k) -> (Tensor, Tensor)");
    m.def("decode_step_attention(Tensor qkv, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "int slot, int kv_len, Tensor? mask, float scale, int n_head) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
    m.impl("matvec", &matvec);
    m.impl("decode_attention", &decode_attention);
    m.impl("rms_norm", &rms_norm);
    m.impl("silu_mul", &silu_mul);
    m.impl("topk", &topk);
    m.impl("decode_step_attention", &decode_step_attention);
}
