// lmforge::matvec, the torch operator over the kernels of matvec_kernels.h: the dispatcher calls them directly,
// from eager code and from torch.compile'd steps alike. Built by matvec.py with the host's C++ compiler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include "matvec_kernels.h"

static at::Tensor matvec(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &scale) {
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
                "lmforge::matvec takes x (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
    TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && weight.is_contiguous(),
                "lmforge::matvec takes CPU tensors and a contiguous weight");
    const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
    at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
    const int threads = at::get_num_threads();
#ifdef MV_BF16DOT
    if (weight.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16) { // both bfloat16: exact products
        at::Tensor xb = x.contiguous();
        mv_bf16_dot(reinterpret_cast<const uint16_t *>(xb.data_ptr()),
                    reinterpret_cast<const uint16_t *>(weight.data_ptr()), y.data_ptr<float>(), M, N, K, threads);
        return y.to(at::kBFloat16);
    }
#endif
    at::Tensor xf = x.to(at::kFloat).contiguous();
    const float *xp = xf.data_ptr<float>();
    float *yp = y.data_ptr<float>();
    switch (weight.scalar_type()) {
    case at::kFloat:
        mv_f32(xp, weight.data_ptr<float>(), yp, M, N, K, threads);
        break;
    case at::kBFloat16:
        mv_bf16(xp, reinterpret_cast<const uint16_t *>(weight.data_ptr()), yp, M, N, K, threads);
        break;
    case at::kChar: {
        TORCH_CHECK(scale.has_value(), "lmforge::matvec: int8 weights need their scales");
        TORCH_CHECK(M <= mv::MAX_X_ROWS, "lmforge::matvec: int8 weights take at most ", mv::MAX_X_ROWS,
                    " rows of x, got ", M);
        at::Tensor s = scale->to(at::kFloat).contiguous();
        TORCH_CHECK((s.dim() == 1 && s.size(0) == N) || (s.dim() == 2 && s.size(0) == N && K % 32 == 0 &&
                    s.size(1) == K / 32), "lmforge::matvec: int8 scales must be (N,) or (N, K / 32), got ",
                    s.sizes());
        (s.dim() == 1 ? mv_i8 : mv_q8)(xp, weight.data_ptr<int8_t>(), s.data_ptr<float>(), yp, M, N, K, threads);
        break;
    }
    default:
        TORCH_CHECK(false, "lmforge::matvec: weights of dtype ", weight.scalar_type(), " are not supported");
    }
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// s[i] = exp(s[i] - top) (0 where s[i] is -inf); returns their sum.
static float softmax_numerators(float *s, int64_t S, float top) {
    float total = 0.f;
#ifdef MV_AVX512
    // exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, exp(r) by its Taylor series to r^6 (relative
    // error below 2e-7); x >= -87 keeps 2^n a normal float.
    const __m512 t = _mm512_set1_ps(top), lo = _mm512_set1_ps(-87.f), hidden = _mm512_set1_ps(-INFINITY);
    for (int64_t i = 0; i < S; i += 16) {
        const __mmask16 m = mv::lanes16(S, i);
        const __m512 v = _mm512_maskz_loadu_ps(m, s + i), x = _mm512_max_ps(_mm512_sub_ps(v, t), lo);
        const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); // ln 2 in two parts
        r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
        __m512 p = _mm512_set1_ps(1.f / 720);
        for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, hidden, _CMP_NEQ_OQ) & m, _mm512_scalef_ps(p, n));
        _mm512_mask_storeu_ps(s + i, m, e);
        total += _mm512_reduce_add_ps(e);
    }
#else
    for (int64_t i = 0; i < S; i++) total += (s[i] = s[i] == -INFINITY ? 0.f : std::exp(s[i] - top));
#endif
    return total;
}

// One key or value row (float32 or bfloat16, D elements) against float32 vectors: q . row, and o += p * row.
#ifdef MV_AVX512
static inline __m512 row16(const void *row, bool bf16, int64_t d, __mmask16 m) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + d)), 16))
                : _mm512_maskz_loadu_ps(m, (const float *)row + d);
}
static inline float row_dot(const float *q, const void *row, bool bf16, int64_t D) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = mv::lanes16(D, d);
        acc = _mm512_fmadd_ps(row16(row, bf16, d, m), _mm512_maskz_loadu_ps(m, q + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
static inline void row_axpy(float *o, float p, const void *row, bool bf16, int64_t D) {
    for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = mv::lanes16(D, d);
        _mm512_mask_storeu_ps(o + d, m, _mm512_fmadd_ps(_mm512_set1_ps(p), row16(row, bf16, d, m),
                                                         _mm512_maskz_loadu_ps(m, o + d)));
    }
}
#else
static inline float row_at(const void *row, bool bf16, int64_t d) {
    return bf16 ? __builtin_bit_cast(float, (uint32_t)((const uint16_t *)row)[d] << 16) : ((const float *)row)[d];
}
static inline float row_dot(const float *q, const void *row, bool bf16, int64_t D) {
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < D; d++) dot += q[d] * row_at(row, bf16, d);
    return dot;
}
static inline void row_axpy(float *o, float p, const void *row, bool bf16, int64_t D) {
#pragma omp simd
    for (int64_t d = 0; d < D; d++) o[d] += p * row_at(row, bf16, d);
}
#endif

// Attention of one new token per row: q (B, H, 1, D), k and v (B, Hkv, S, D) (the cache's filled slots; any
// strides but a contiguous last dimension), H a multiple of Hkv (query head h reads key/value head h / (H / Hkv)),
// mask None or boolean (B or 1, 1, 1, S), True where a key may be seen. Scores, softmax and sums in float32; one
// task per (row, key/value head), so each key and value row is read once for the heads that share it, and hidden
// keys are not read at all (a compiled step's mask hides the cache's unfilled slots).
static at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                                   const std::optional<at::Tensor> &mask, double scale) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1 && q.size(0) == k.size(0) &&
                q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
                "lmforge::decode_attention takes q (B, H, 1, D) and k, v (B, Hkv, S, D), got ", q.sizes(), ", ",
                k.sizes(), " and ", v.sizes());
    TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) && k.stride(3) == 1 &&
                v.stride(3) == 1, "lmforge::decode_attention takes float32 or bfloat16 q, k, v of one dtype with "
                "a contiguous last dimension");
    const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), G = q.size(1) / Hkv;
    at::Tensor qf = q.to(at::kFloat).contiguous(), out = at::empty({B, q.size(1), 1, D}, qf.options());
    at::Tensor m;
    if (mask.has_value()) {
        m = mask->to(at::kBool).reshape({-1, S}).contiguous();
        TORCH_CHECK(m.size(0) == 1 || m.size(0) == B, "lmforge::decode_attention: mask of ", mask->sizes(),
                    " for ", B, " rows and ", S, " keys");
    }
    const bool *mp = m.defined() ? m.data_ptr<bool>() : nullptr;
    const int64_t mrows = m.defined() ? m.size(0) : 0;
    const bool bf16 = q.scalar_type() == at::kBFloat16;
    const int64_t elem = bf16 ? 2 : 4;
    const char *kp = static_cast<const char *>(k.const_data_ptr()), *vp = static_cast<const char *>(v.const_data_ptr());
    const int64_t ks[3] = {k.stride(0) * elem, k.stride(1) * elem, k.stride(2) * elem}; // in bytes
    const int64_t vs[3] = {v.stride(0) * elem, v.stride(1) * elem, v.stride(2) * elem};
    const float *qbase = qf.const_data_ptr<float>();
    float *obase = out.data_ptr<float>();
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(G * S);
        for (int64_t task = begin; task < end; task++) {
            const int64_t b = task / Hkv, h = task % Hkv;
            const float *qp = qbase + task * G * D; // the G query heads that read key/value head h
            float *op = obase + task * G * D;
            const bool *mb = mp ? mp + (mrows == 1 ? 0 : b) * S : nullptr;
            const char *kr = kp + b * ks[0] + h * ks[1], *vr = vp + b * vs[0] + h * vs[1];
            for (int64_t s = 0; s < S; s++)
                for (int64_t g = 0; g < G; g++)
                    scores[g * S + s] = mb && !mb[s] ? -INFINITY
                                                     : row_dot(qp + g * D, kr + s * ks[2], bf16, D) * (float)scale;
            for (int64_t g = 0; g < G; g++) { // scores to probabilities
                float *sg = scores.data() + g * S, top = -INFINITY;
                for (int64_t s = 0; s < S; s++) top = std::max(top, sg[s]);
                const float total = softmax_numerators(sg, S, top);
                for (int64_t s = 0; s < S; s++) sg[s] /= total;
                std::fill(op + g * D, op + (g + 1) * D, 0.f);
            }
            for (int64_t s = 0; s < S; s++)
                if (!mb || mb[s])
                    for (int64_t g = 0; g < G; g++) row_axpy(op + g * D, scores[g * S + s], vr + s * vs[2], bf16, D);
        }
    });
    return bf16 ? out.to(at::kBFloat16) : out;
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
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
    m.impl("matvec", &matvec);
    m.impl("decode_attention", &decode_attention);
}
