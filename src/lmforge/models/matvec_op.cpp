// lmforge::matvec, the torch operator over the kernels of matvec_kernels.h: the dispatcher calls them directly,
// from eager code and from torch.compile'd steps alike. Built by matvec.py with the host's C++ compiler.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
    m.impl("matvec", &matvec);
}
