"""lmforge's CPU matvec kernels (models/matvec_kernels.h as the operator lmforge::matvec) against float64 references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.models.blocks import Linear, RMSNorm
from lmforge.models.linear import BlockInt8Linear, Int8Linear
from lmforge.models.matvec import (
    BF16_ROWS,
    MAX_ROWS,
    available,
    decode_attention,
    matvec,
    rms_norm,
    silu_mul,
    top_k,
    usable,
)

# N not a multiple of the 4-row blocks nor of the 16-row thread blocks; K with a tail after the 16-wide steps.
SHAPES = [(1, 37, 40), (5, 130, 96), (MAX_ROWS, 67, 1568)]


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # rows split between two threads
    yield
    torch.set_num_threads(before)


def test_kernels_are_built_on_this_host():
    assert available(), "the matvec kernels did not build (a C++ compiler with OpenMP is needed)"


@pytest.mark.parametrize(("M", "N", "K"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_weights(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    want = x.double() @ w.double().T
    got = matvec(x, w)
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # float32 sums; a bfloat16 result is rounded once
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * K ** 0.5)


@pytest.mark.parametrize(("M", "N", "K"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_rows_and_blocks(M, N, K, dtype):
    g = torch.Generator().manual_seed(M + N * K)
    x = torch.randn(M, K, generator=g).to(dtype)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    rows = torch.rand(N, generator=g) / 100
    blocks = torch.rand(N, K // 32, generator=g) / 100
    # with VNNI, x is rounded per row to int16 steps of max|x| / 32767 before the exact integer products
    tol = 2e-4 if dtype == torch.float32 else 8e-3
    cases = [(rows, q.double() * rows.double()[:, None])]
    if K % 32 == 0:  # blocks of 32 along K (GGUF's Q8_0) need whole blocks
        cases.append((blocks, q.double() * blocks.double().repeat_interleave(32, 1)))
    for scale, dequantized in cases:
        got = matvec(x, q, scale.to(dtype) if scale.dim() == 1 else scale)
        want = x.double() @ dequantized.T
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_modules_use_the_kernel_for_decode_steps_only():
    g = torch.Generator().manual_seed(0)
    lin = Linear(48, 24)
    x = torch.randn(1, 3, 48, generator=g)
    assert not usable(x, lin.weight)  # autograd on: training keeps F.linear and its gradients
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(24, 1) * x.sum((0, 1))[None])
    with torch.no_grad():
        assert usable(x, lin.weight) and not usable(torch.randn(2, MAX_ROWS, 48), lin.weight)
        assert not usable(torch.randn(BF16_ROWS + 1, 48), lin.weight.bfloat16())
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
        w = torch.randn(24, 64, generator=g)
        for module in (Int8Linear.from_float(w), BlockInt8Linear(*_q8(w))):
            x = torch.randn(2, 64, generator=g)
            assert usable(x, module.weight)
            want = F.linear(x.double(), _dequantized(module).double())  # x rounded to int16 steps (VNNI)
            torch.testing.assert_close(module(x).double(), want, rtol=2e-4, atol=2e-4 * want.abs().max().item())


def _q8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = w.view(w.shape[0], -1, 32)
    scale = blocks.abs().amax(-1) / 127
    return torch.round(blocks / scale[..., None]).to(torch.int8).view_as(w), scale


def _dequantized(module) -> torch.Tensor:
    if isinstance(module, Int8Linear):
        return module.weight.float() * module.scales.float()[:, None]
    return module.weight.float() * module.scales.repeat_interleave(32, 1)


def test_bad_inputs_name_the_shapes():
    with pytest.raises(RuntimeError, match=r"x \(..., K\) and weight \(N, K\)"):
        matvec(torch.randn(1, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="int8 weights need their scales"):
        matvec(torch.randn(1, 8), torch.zeros(4, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"K > 0, got x \[3, 0\]"):
        matvec(torch.randn(3, 0), torch.randn(4, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, H, Hkv, S, D", [(3, 6, 2, 37, 24), (2, 10, 2, 70, 80)])  # G = 3 and 5, D < 64 and > 64
def test_decode_attention_matches_sdpa(dtype, B, H, Hkv, S, D):
    g = torch.Generator().manual_seed(3)
    k = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)[:, :, :S]  # the cache's filled slots: a strided view
    v = torch.randn(B, Hkv, S + 5, D, generator=g).to(dtype)[:, :, :S]
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)  # (B, H, 1, D), not contiguous
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3
    mask[..., -1] = True  # a query always sees itself
    static = torch.ones(B, 1, 1, S, dtype=torch.bool)  # a compiled step's cache: unfilled slots at the end
    static[..., S // 2:] = False
    static[0, ..., :3] = False  # and a left-padded row
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # float32 sums; a bfloat16 result is rounded once
    for m in (None, mask, mask[:1], static):
        got = decode_attention(q, k, v, m, 0.3)
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m, scale=0.3,
                                              enable_gqa=True)
        assert got.dtype == dtype and got.shape == (B, H, 1, D)
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # keys and values whose rows are not contiguous (a transposed layout) are read all the same
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(decode_attention(q, kt, v, None, 0.3), decode_attention(q, k, v, None, 0.3))
    # training (autograd) and several query tokens stay with SDPA
    assert decode_attention(q.float().clone().requires_grad_(), k.float(), v.float(), None, 0.3) is None
    assert decode_attention(torch.cat([q, q], 2), k, v, None, 0.3) is None
    with pytest.raises(RuntimeError, match="mask of"):
        decode_attention(q, k, v, torch.cat([mask, mask]), 0.3)  # 2B mask rows for B rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_kernels_match_torch(dtype):
    """The eager decode step's norm and gated activation equal torch's ops (bfloat16 rounded where they round)."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(10, 1, 75, generator=g) * 3).to(dtype)  # 75: a tail after the 16-wide steps
    w = (1 + torch.randn(75, generator=g) / 4).to(dtype)
    want = (F.rms_norm(x, (75,), w, 1e-5) if dtype == torch.float32
            else w * F.rms_norm(x.float(), (75,), None, 1e-5).to(dtype))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=0)  # 1 bfloat16 step
    torch.testing.assert_close(rms_norm(x, w, 1e-5), want, **tol)
    h = (torch.randn(10, 1, 2 * 83, generator=g) * 4).to(dtype)
    gate, up = h.chunk(2, -1)
    torch.testing.assert_close(silu_mul(h), F.silu(gate) * up, **tol)
    # the modules take them for decode steps only: not for prompts, training or other dtypes
    norm = RMSNorm(75, 1e-5).to(dtype)
    assert rms_norm(x.reshape(-1, 75).repeat(2, 1), norm.weight, 1e-5) is None  # 20 rows: a prompt
    assert rms_norm(x, norm.weight, 1e-5) is None  # a parameter that wants its gradient
    with torch.no_grad():
        torch.testing.assert_close(norm(x), rms_norm(x, norm.weight.detach(), 1e-5))
    assert silu_mul(h.double()) is None  # float64 stays with torch
    assert silu_mul(h[..., :-1].contiguous()) is None  # an odd width has no gate/up halves


@pytest.mark.parametrize("B, V, k", [(10, 49152, 50), (3, 1000, 1), (2, 37, 37), (4, 10, 3)])
def test_top_k_matches_torch(B, V, k):
    """Sampling's top_k: the values of torch.topk, largest first, and indices that hold them, with ties (repeated
    values, in index order), -inf (banned tokens) and NaN (which torch ranks above every number); V not a multiple
    of 16, and below 16."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(B, V, generator=g).mul(4).round().div(4)  # many equal values
    x[0, ::3] = -float("inf")
    x[-1, V // 2] = float("nan")
    values, index = top_k(x, k)
    torch.testing.assert_close(values, torch.topk(x, k).values, equal_nan=True)
    torch.testing.assert_close(x.gather(1, index), values, equal_nan=True)
    ties = values[:, 1:] == values[:, :-1]
    assert bool((index[:, 1:] > index[:, :-1])[ties].all())
    if k == 1:  # greedy decoding's argmax: the first of equal maxima (and the first NaN)
        assert torch.equal(index[:, 0], x.argmax(-1))
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.lmforge.topk(x, V + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # rotary and grouped heads; learned positions, biases
def test_decode_step_attention_matches_the_torch_ops(dtype, name, monkeypatch):
    """An eager decode step's fused attention (rotation, cache writes, attention) against the same step run by torch's
    ops: equal keys and values in the cache (bit for bit in bfloat16), logits to the dtype's tolerance."""
    from lmforge.config import ModelConfig
    from lmforge.generation.decode import Decoding
    from lmforge.models import blocks, build_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_name(name, n_head=6, n_kv_head=2 if name == "tiny-llama" else 6, d_model=96)
    model = build_model(cfg).to(dtype).eval()
    ids = torch.randint(3, cfg.vocab_size, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row: its hidden keys and shifted positions
    runs, kernel, used = [], blocks.decode_step_attention, []
    for fused in (True, False):  # the kernel (each call counted), then torch's ops alone
        monkeypatch.setattr(blocks, "decode_step_attention",
                            (lambda *args: used.append(kernel(*args)) or used[-1]) if fused else (lambda *args: None))
        with torch.inference_mode():
            run = Decoding(model, ids, mask, 4, use_compile=False)
            logits = [run.prefill(ids)]
            for n in range(3):
                logits.append(run.step(torch.tensor([5 + n, 9, 11 + n])))
        runs.append((torch.stack(logits), [(a.kv_cache.k.clone(), a.kv_cache.v.clone()) for a in
                                           (layer.attn for layer in model.layers)]))
    assert len(used) == 3 * cfg.n_layer and all(y is not None for y in used)  # every decode step's every layer
    (fused_logits, fused_cache), (torch_logits, torch_cache) = runs
    for (k1, v1), (k2, v2) in zip(fused_cache, torch_cache, strict=True):
        exact = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(k1, k2, **exact)
        torch.testing.assert_close(v1, v2, **exact)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fused_logits, torch_logits, rtol=tol, atol=tol)
