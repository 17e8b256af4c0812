"""Weight formats (lmforge.models.linear): each product against the dequantized weight, GGUF blocks read as
llama.cpp defines them (checked against the `gguf` package's own dequantizer), swaps that leave one copy of
every weight, and held-out perplexity of SmolLM2-135M in each format against float32."""

from __future__ import annotations

import math
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_io_gguf import llama_gguf_tensors, llama_hparams, tiny_llama, write_gguf

from lmforge.config import ModelConfig
from lmforge.data import bbc_news
from lmforge.io import load_model, save_model
from lmforge.io.gguf import _blocks, read_gguf
from lmforge.models import Decoder
from lmforge.models.linear import (
    BlockInt8Linear,
    Int4Linear,
    Int8Linear,
    PackedLinear,
    RowEmbedding,
    quantize,
)
from lmforge.tokenizer import Tokenizer


def _weight(out: int = 96, inn: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g) * 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_product_equals_the_dequantized_weight(dtype):
    w = _weight()
    m = Int8Linear.from_float(w.to(dtype))
    deq = m.weight.float() * m.scales.float()[:, None]
    assert (deq - w).abs().max() <= m.scales.float().max() / 2 + 1e-3 * w.abs().max()  # rounding: half a step
    x = torch.randn(3, 5, 128).to(dtype)
    # 15 rows: lmforge's matvec kernel, which with VNNI rounds x per row to int16 steps of max|x| / 32767
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(m(x).float(), x.float() @ deq.t(), rtol=tol, atol=tol)


def test_int8_weights_at_any_address():
    """Tensors read from a safetensors file need not start on a 64-byte boundary; the kernel's vector loads
    must still see aligned weights (a misaligned one crashed the process for 4+ rows)."""
    m = Int8Linear.from_float(_weight(64, 128))
    storage = torch.zeros(64 * 128 + 8, dtype=torch.int8)
    shifted = storage[8:].view(64, 128)
    shifted.copy_(m.weight)
    assert shifted.data_ptr() % 64 != 0
    moved = Int8Linear(shifted, m.scales.clone())
    x = torch.randn(8, 128)
    torch.testing.assert_close(moved(x), m(x), rtol=0, atol=0)


def test_int4_product_equals_its_blocks():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 96), generator=g)
    scale, zero = torch.rand(64, 3, generator=g) * 0.01, torch.randn(64, 3, generator=g) * 0.01
    m = Int4Linear.from_blocks(q, scale, zero)
    # the kernel keeps scale and zero in bfloat16: the reference uses the same rounded values
    s, z = (t.bfloat16().float().repeat_interleave(32, 1) for t in (scale, zero))
    w = (q.float() - 8) * s + z
    x = torch.randn(4, 96)
    torch.testing.assert_close(m(x), x.bfloat16().float() @ w.t(), rtol=2e-2, atol=2e-2 * w.abs().max().item())
    bad = torch.randint(0, 16, (64, 90))
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4Linear.from_blocks(bad, scale, zero)


def test_packed_linear_equals_f_linear():
    w, b = _weight(), torch.randn(96)
    x = torch.randn(2, 7, 128)
    torch.testing.assert_close(PackedLinear(w, b)(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16 CPU weight"):
        PackedLinear(w.half())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_gguf_blocks_decode_as_gguf_dequantizes(qtype):
    """Our reading of the block bytes (scales, offsets, nibble order) against gguf.quants.dequantize."""
    w = _weight(48, 96, seed=2).numpy()
    raw = gguf.quants.quantize(w, qtype)
    reference = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).float()
    parts = _blocks(SimpleNamespace(tensor_type=qtype, data=raw))
    if qtype == Q.Q8_0:
        q, d = parts
        ours = BlockInt8Linear(q, d).rows(slice(None), torch.float32)
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
        x = torch.randn(3, 96)
        torch.testing.assert_close(BlockInt8Linear(q, d)(x), x @ reference.t(), rtol=1e-5, atol=1e-5)
    else:
        q, d, z = parts
        exact = (q.float() - 8) * d.repeat_interleave(32, 1) + z.repeat_interleave(32, 1)
        torch.testing.assert_close(exact, reference, rtol=0, atol=1e-6)
        ours = Int4Linear.from_blocks(q, d, z)(torch.eye(96)).t()  # (48, 96): the weight as the kernel sees it
        step = d.max().item()
        assert (ours - reference).abs().max() <= 0.02 * step * 8 + 1e-3 * reference.abs().max()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_kept_gguf_blocks_give_the_dequantized_models_logits(qtype, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    ref = tiny_llama()
    path = write_gguf(tmp_path / f"tiny.{qtype.name}.gguf", "llama", llama_hparams(ref), llama_gguf_tensors(ref),
                      qtype=qtype)
    _, state = read_gguf(path, keep_quantized=True)
    kinds = {type(v).__name__ for v in state.values() if isinstance(v, torch.nn.Module)}
    assert kinds == {"BlockInt8Linear" if qtype == Q.Q8_0 else "Int4Linear"}
    kept = load_model(path, keep_quantized=True)
    dequantized = load_model(path, dtype=torch.float32)
    assert not any(type(m) is torch.nn.Linear for m in kept.modules())
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = kept(ids).logits, dequantized(ids).logits
    tol = 1e-4 if qtype == Q.Q8_0 else 0.05 * b.abs().max().item()  # int4 runs in bfloat16
    torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert torch.equal(kept.generate(ids, max_new_tokens=6)[:, :12], ids)


def test_quantize_swaps_in_place_and_keeps_one_copy():
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_name("tiny-llama", tie_embeddings=True)).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(ids).logits
        float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert quantize(model, "int8") is model
        got = model(ids).logits
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.embed_tokens, RowEmbedding) and model.embed_tokens.table is model.lm_head
    held = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert sum(held.values()) < 0.4 * float_bytes  # int8 weights, no float copy left behind
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())
    with pytest.raises(ValueError, match="quantized"):
        save_model(model, "unused")
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        quantize(model, "int3")


@pytest.mark.parametrize("kind", ["int8", "int4", "packed"])
def test_quantized_at_load_equals_quantized_in_place(kind, tmp_path, monkeypatch):
    """load_model(quantize=...) converts tensor by tensor while loading (through the GGUF cache for GGUF files):
    the same weights, and the same logits, as quantizing the loaded float model in place."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    ref = tiny_llama(tie=True)
    path = write_gguf(tmp_path / "tiny.gguf", "llama", llama_hparams(ref), llama_gguf_tensors(ref))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = quantize(load_model(path, dtype=torch.float32), kind)
    for _ in range(2):  # the second load reads the cache entry of this format
        got = load_model(path, dtype=torch.float32, quantize=kind)
        assert [type(m).__name__ for m in got.modules()] == [type(m).__name__ for m in expected.modules()]
        with torch.no_grad():
            torch.testing.assert_close(got(ids).logits, expected(ids).logits, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown weight format"):
        load_model(path, quantize="int3")


def test_keep_quantized_needs_a_gguf_file(tmp_path):
    model = Decoder(ModelConfig.from_name("tiny-llama"))
    save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="keep_quantized applies to GGUF files"):
        load_model(tmp_path / "m", keep_quantized=True)


def test_cli_generate_with_quantized_weights(capsys):
    from lmforge.cli import main

    assert main(["generate", "The capital of France is", "--max-new-tokens", "4", "--dtype", "int8"]) == 0
    assert main(["generate", "The capital of France is", "--max-new-tokens", "4", "--keep-quantized"]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Generated")]
    assert len(out) == 2 and all("Paris" in line for line in out), out
    assert main(["generate", "x", "--dtype", "int8", "--keep-quantized"]) == 2
    assert "cannot be combined" in capsys.readouterr().err


# --- held-out perplexity of the real model in each format ------------------------------------------------------

def _perplexity(model, blocks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(blocks).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
    return math.exp(nll.item())


def _q8_0(model: Decoder) -> Decoder:
    """Every linear of `model` as GGUF Q8_0 blocks (quantized by the gguf package), computed as kept blocks."""
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear:
            raw = gguf.quants.quantize(m.weight.detach().numpy(), Q.Q8_0)
            model.set_submodule(name, BlockInt8Linear(*_blocks(SimpleNamespace(tensor_type=Q.Q8_0, data=raw))))
    return model


@pytest.mark.slow
def test_held_out_perplexity_of_each_format(smollm2_gguf, capsys):
    """BBC test split, 4,096 tokens in 8 blocks of 512: int8 and kept Q8_0 within 1% of float32; the file's own
    Q4_1 blocks kept as they are (bfloat16 products) reported."""
    tokenizer = Tokenizer.for_model(smollm2_gguf)
    ids = [t for text in bbc_news("test").texts for t in tokenizer.encode(text)][:4096]
    blocks = torch.tensor(ids).view(8, 512)
    fp32 = load_model(smollm2_gguf, dtype=torch.float32)
    ppl = {"float32": _perplexity(fp32, blocks)}
    ppl["int8"] = _perplexity(load_model(smollm2_gguf, dtype=torch.float32, quantize="int8"), blocks)
    ppl["kept Q8_0"] = _perplexity(_q8_0(fp32), blocks)
    del fp32
    ppl["kept Q4_1"] = _perplexity(load_model(smollm2_gguf, keep_quantized=True), blocks)
    with capsys.disabled():
        print("\nheld-out perplexity (BBC test, 4,096 tokens): " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    assert 5 < ppl["float32"] < 100  # a working model on English news text
    assert abs(ppl["int8"] / ppl["float32"] - 1) < 0.01
    assert abs(ppl["kept Q8_0"] / ppl["float32"] - 1) < 0.01
    assert abs(ppl["kept Q4_1"] / ppl["float32"] - 1) < 0.05
    assert np.isfinite(list(ppl.values())).all()
