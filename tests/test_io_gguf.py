"""GGUF import (lmforge.io.gguf): real SmolLM2-135M parity with transformers' own GGUF loading, synthetic GGUF
files for tiny Llama / GPT-2 models in every type gguf.quants can write (F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1,
TQ1_0, TQ2_0, MXFP4) converted by `lmforge convert` and loaded in transformers, the cache, and bad files.

Synthetic files are written the way llama.cpp's converter writes them (GGUF names, Q/K rows permuted for its
rotary layout, GPT-2's Conv1D weights transposed), from tiny random transformers models, so the import is
checked against transformers' logits and not against itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lmforge.io.gguf as lg
from lmforge.io import build_loaded, load_model
from lmforge.io.gguf import cache_file, load_gguf, read_gguf
from lmforge.models.decoder import Decoder

Q = gguf.GGMLQuantizationType
# SmolLM2 chat prompt: "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROMPT = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])


def lmforge_model(config, tensors) -> Decoder:
    model = build_loaded(config, tensors)  # checks names and shapes; ties the head
    assert isinstance(model, Decoder) and next(model.parameters()).dtype == torch.float32
    return model


# --- real SmolLM2-135M: lmforge's import vs transformers' GGUF loading --------------------------------------

@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def smollm2_lmforge(smollm2_gguf, smollm2_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(smollm2_cache))
        config, tensors = load_gguf(smollm2_gguf)  # first load: converts and fills the (temporary) cache
    return config, tensors


@pytest.mark.slow
def test_smollm2_config(smollm2_lmforge, smollm2_transformers):
    config, _ = smollm2_lmforge
    ref = smollm2_transformers.config
    assert (config.family, config.arch, config.position, config.norm) == ("llama", "decoder", "rotary",
                                                                          "rmsnorm")
    ours = (config.n_layer, config.d_model, config.n_head, config.n_kv_head, config.d_ff, config.vocab_size)
    assert ours == (ref.num_hidden_layers, ref.hidden_size, ref.num_attention_heads, ref.num_key_value_heads,
                    ref.intermediate_size, ref.vocab_size)
    assert config.rope_theta == ref.rope_parameters["rope_theta"] and config.norm_eps == ref.rms_norm_eps
    assert config.max_seq_len == ref.max_position_embeddings
    assert config.tie_embeddings and ref.tie_word_embeddings
    special = (config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert special == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_lmforge, smollm2_transformers):
    model = lmforge_model(*smollm2_lmforge)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    with torch.no_grad():
        ours = model(PROMPT).logits
        ref = smollm2_transformers(PROMPT).logits
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_transformers(smollm2_lmforge, smollm2_transformers):
    """transformers' greedy continuation is lmforge's too: at every generated position lmforge's argmax (one
    forward over the whole sequence) is the token transformers picked, which is what a greedy loop checks."""
    model = lmforge_model(*smollm2_lmforge)
    n_new = 8
    with torch.no_grad():
        ref = smollm2_transformers.generate(PROMPT, attention_mask=torch.ones_like(PROMPT),
                                            max_new_tokens=n_new, do_sample=False, pad_token_id=2)
        assert ref.shape[1] == PROMPT.shape[1] + n_new  # no early end-of-sequence: n_new real tokens compared
        ours = model(ref[:, :-1]).logits[:, PROMPT.shape[1] - 1:].argmax(-1)  # (1, n_new)
    assert ours.tolist() == ref[:, PROMPT.shape[1]:].tolist()


@pytest.mark.slow
def test_smollm2_cached_load_is_used_and_equal(smollm2_gguf, smollm2_lmforge, smollm2_cache, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(smollm2_cache))
    assert cache_file(smollm2_gguf).is_file()

    def no_conversion(path, **kwargs):
        raise AssertionError("the cache entry was not used")

    monkeypatch.setattr(lg, "read_gguf", no_conversion)
    config, tensors = load_gguf(smollm2_gguf)
    first_config, first_tensors = smollm2_lmforge
    assert config == first_config
    assert tensors.keys() == first_tensors.keys()
    assert all(torch.equal(tensors[k], first_tensors[k]) for k in tensors)


# --- synthetic files written like llama.cpp's converter -----------------------------------------------------

def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row permutation (the reference the import must undo)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tie, bos_token_id=1,
                      eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def llama_gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    cfg = model.config
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"],
           "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif gg == "attn_k":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gg}.weight"] = w
    return out


def write_gguf(path: Path, arch: str, hparams: dict, tensors: dict[str, np.ndarray], qtype=Q.F32,
               token_list: bool = True, bpe: tuple[list[str], list[str]] | None = None) -> Path:
    """A GGUF file: 2-D weights as `qtype` (quantized with gguf.quants), 1-D tensors as F32 (as llama.cpp).
    bpe: (tokens, merges) of a whole byte-level BPE tokenizer instead of a bare token list."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(hparams["n_layer"])
    w.add_context_length(hparams["n_ctx"])
    w.add_embedding_length(hparams["d_model"])
    w.add_feed_forward_length(hparams["d_ff"])
    w.add_head_count(hparams["n_head"])
    if arch == "llama":
        w.add_head_count_kv(hparams["n_kv_head"])
        w.add_rope_freq_base(hparams["rope_theta"])
        w.add_layer_norm_rms_eps(hparams["eps"])
    else:
        w.add_layer_norm_eps(hparams["eps"])
    if token_list:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(bpe[0] if bpe else [f"tok{i}" for i in range(hparams["vocab"])])
        if bpe:
            w.add_token_merges(bpe[1])
    else:
        w.add_vocab_size(hparams["vocab"])
    w.add_bos_token_id(hparams["bos"])
    w.add_eos_token_id(hparams["eos"])
    for name, array in tensors.items():
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, array)
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_hparams(model: LlamaForCausalLM) -> dict:
    c = model.config
    return dict(n_layer=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_model=c.hidden_size,
                d_ff=c.intermediate_size, n_head=c.num_attention_heads, n_kv_head=c.num_key_value_heads,
                rope_theta=c.rope_parameters["rope_theta"], eps=c.rms_norm_eps, vocab=c.vocab_size,
                bos=c.bos_token_id, eos=c.eos_token_id)


def hf_llama_tensor(ref: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The transformers tensor(s) behind an lmforge Llama parameter (q/k/v and gate/up stacked by rows)."""
    if name == "lm_head.weight":
        return ref[name]
    if name.startswith("layers."):
        i, rest = name.split(".", 2)[1:]
        base = f"model.layers.{i}."
        parts = {"attn.qkv.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
                 "attn.out.weight": ["self_attn.o_proj.weight"], "attn_norm.weight": ["input_layernorm.weight"],
                 "mlp_norm.weight": ["post_attention_layernorm.weight"],
                 "mlp.up.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
                 "mlp.down.weight": ["mlp.down_proj.weight"]}[rest]
        return torch.cat([ref[base + p] for p in parts])
    return ref["model." + name]


@pytest.fixture(scope="module")
def llama_ref() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def llama_f32(llama_ref, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.f32.gguf"
    return write_gguf(path, "llama", llama_hparams(llama_ref), llama_gguf_tensors(llama_ref))


def test_f32_llama_is_exact(llama_ref, llama_f32):
    config, tensors = read_gguf(llama_f32)
    assert (config.family, config.n_head, config.n_kv_head, config.head_dim, config.rope_theta) == (
        "llama", 4, 2, 16, 500.0)
    assert not config.tie_embeddings and (config.bos_token_id, config.eos_token_id) == (1, 2)
    ref = llama_ref.state_dict()
    for name, t in tensors.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, hf_llama_tensor(ref, name)), name  # incl. Q/K rows un-permuted
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = lmforge_model(config, tensors)(ids).logits
        theirs = llama_ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_load_model_reads_gguf_files(llama_ref, llama_f32, cache_env):
    model = load_model(llama_f32)
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert (model(ids).logits - llama_ref(ids).logits).abs().max().item() <= 1e-5
    assert cache_file(llama_f32).is_file()


def test_tied_llama_without_token_list(tmp_path):
    ref = tiny_llama(tie=True)
    path = write_gguf(tmp_path / "tied.gguf", "llama", llama_hparams(ref), llama_gguf_tensors(ref),
                      token_list=False)
    config, tensors = read_gguf(path)
    assert config.tie_embeddings and config.vocab_size == 128 and "lm_head.weight" not in tensors
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (lmforge_model(config, tensors)(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5


# Largest dequantization error allowed, as a fraction of the tensor's largest |weight|: half a quantization
# step (Q8_0: absmax/127, Q4_1: range/15 <= 2 absmax/15; Q4_0 clips one end of its range by a full step of
# absmax/8), plus a margin for the fp16 rounding of the block scales (up to 127 * 2^-11 of a step for Q8_0).
QUANT_TOLERANCE = {Q.F16: 2**-11, Q.BF16: 2**-8, Q.Q8_0: 0.6 / 127, Q.Q4_0: 1.1 / 8, Q.Q4_1: 1.1 / 15}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_llama_within_quantization_error(llama_ref, qtype, tmp_path):
    path = write_gguf(tmp_path / f"tiny-llama.{qtype.name}.gguf", "llama", llama_hparams(llama_ref),
                      llama_gguf_tensors(llama_ref), qtype=qtype)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {qtype, Q.F32}
    config, tensors = read_gguf(path)
    ref = llama_ref.state_dict()
    for name, t in tensors.items():
        original = hf_llama_tensor(ref, name)
        err = (t - original).abs().max().item()
        if original.dim() == 1:
            assert err == 0.0, name
        else:
            assert 0.0 < err <= QUANT_TOLERANCE[qtype] * original.abs().max().item(), name


def test_quantized_llama_matches_transformers_gguf_loading(llama_ref, tmp_path):
    """Both loaders dequantize the same Q4_1 file; their logits must agree like fp32 implementations do."""
    path = write_gguf(tmp_path / "tiny-llama.Q4_1.gguf", "llama", llama_hparams(llama_ref),
                      llama_gguf_tensors(llama_ref), qtype=Q.Q4_1)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = lmforge_model(*read_gguf(path))(ids).logits
        theirs = ref(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def gpt2_gguf_tensors(ref: GPT2LMHeadModel) -> dict[str, np.ndarray]:
    """GPT-2 tensors under llama.cpp's GGUF names and layouts."""
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    tensors = {"token_embd.weight": sd["transformer.wte.weight"],
               "position_embd.weight": sd["transformer.wpe.weight"],
               "output_norm.weight": sd["transformer.ln_f.weight"],
               "output_norm.bias": sd["transformer.ln_f.bias"],
               "output.weight": sd["transformer.wte.weight"]}  # llama.cpp writes the tied head out
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    conv1d = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}  # (in, out); llama.cpp transposes
    for i in range(ref.config.n_layer):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                w = sd[f"transformer.h.{i}.{hf}.{kind}"]
                tensors[f"blk.{i}.{gg}.{kind}"] = w.T if kind == "weight" and hf in conv1d else w
    return tensors


def gpt2_hparams(ref: GPT2LMHeadModel) -> dict:
    c = ref.config
    return dict(n_layer=c.n_layer, n_ctx=c.n_positions, d_model=c.n_embd, d_ff=c.n_inner or 4 * c.n_embd,
                n_head=c.n_head, eps=c.layer_norm_epsilon, vocab=c.vocab_size, bos=c.bos_token_id,
                eos=c.eos_token_id)


def test_gpt2_matches_transformers(tmp_path):
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=0, eos_token_id=0)).eval()
    path = write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2", gpt2_hparams(ref), gpt2_gguf_tensors(ref))
    config, weights = read_gguf(path)
    kind = (config.family, config.position, config.norm, config.activation, config.tie_embeddings)
    assert kind == ("gpt2", "learned", "layernorm", "gelu_tanh", False)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (lmforge_model(config, weights)(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5


# --- `lmforge convert`: every type gguf.quants writes, llama and gpt2, checked in transformers ---------------

# Largest error of a converted weight against the unquantized one, as a fraction of the tensor's largest |weight|
# (bounds of the writers in gguf.quants). Q5_0 clips one end of its range by a full step of absmax/16; Q5_1 has
# half a step of range/31 <= 2 absmax/31. TQ1_0/TQ2_0 are ternary (-d, 0, d with d the block's absmax): half of d,
# plus the fp16 rounding of d. MXFP4 has a power-of-two scale s = 2^floor(log2 absmax) / 4 and values 0..6 s:
# at most s (the 4 s -> 6 s gap) in range and under 2 s beyond 6 s, both below absmax / 4.
WRITABLE_TOLERANCE = {**QUANT_TOLERANCE, Q.Q5_0: 1.1 / 16, Q.Q5_1: 1.1 / 31, Q.TQ1_0: 0.5 + 2**-10,
                      Q.TQ2_0: 0.5 + 2**-10, Q.MXFP4: 0.25}


def test_the_tolerance_table_covers_every_type_gguf_can_write():
    weights = np.random.default_rng(0).standard_normal((1, 256), dtype=np.float32)
    writable = set()
    for qtype in Q:
        try:
            quantize(weights, qtype)
        except NotImplementedError:
            continue
        writable.add(qtype)
    assert writable - {Q.F32} == set(WRITABLE_TOLERANCE)


def wide_llama() -> LlamaForCausalLM:
    """One Llama layer whose every weight row has 256 values: a whole block of the 256-value (TQ) types."""
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def wide_gpt2() -> GPT2LMHeadModel:
    """One GPT-2 layer of width 256. GPT-2's default 1024 positions and 4x MLP: transformers' GGUF loading (the
    reference) ignores the file's context and feed-forward lengths for gpt2."""
    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_positions=1024, n_embd=256, n_layer=1, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def wide_models() -> dict:
    llama, gpt2 = wide_llama(), wide_gpt2()
    return {"llama": (llama, llama_hparams(llama), llama_gguf_tensors(llama)),
            "gpt2": (gpt2, gpt2_hparams(gpt2), gpt2_gguf_tensors(gpt2))}


def convert(src: Path, dst: Path) -> Path:
    from lmforge.cli import main

    assert main(["convert", str(src), str(dst)]) == 0
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("qtype", [Q.F32, *WRITABLE_TOLERANCE], ids=lambda q: q.name)
def test_convert_every_writable_type_within_its_bound_and_as_transformers_loads_it(arch, qtype, wide_models,
                                                                                   tmp_path, cache_env):
    """GGUF -> HF folder with `lmforge convert`: each weight (in transformers' names and layout, read from the
    safetensors file) within the type's bound of the unquantized weight; the folder loaded in transformers gives
    the logits of transformers' own loading of the GGUF file (F32: of the original model)."""
    from safetensors.torch import load_file

    ref, hparams, tensors = wide_models[arch]
    bpe = (["a", "b", "ab", *(f"tok{i}" for i in range(3, hparams["vocab"]))], ["a b"])
    path = write_gguf(tmp_path / f"{arch}.{qtype.name}.gguf", arch, hparams, tensors, qtype=qtype, bpe=bpe)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {qtype, Q.F32}
    dst = convert(path, tmp_path / "hf")
    converted = load_file(dst / "model.safetensors")
    original = ref.state_dict()
    assert converted.keys() <= original.keys() and len(converted) >= len(tensors)
    for name, weight in converted.items():
        err = (weight - original[name]).abs().max().item()
        if qtype == Q.F32 or original[name].dim() == 1:
            assert err == 0.0, name
        else:
            assert 0.0 < err <= WRITABLE_TOLERANCE[qtype] * original[name].abs().max().item(), name

    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(4))
    ours = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    theirs = ref if qtype == Q.F32 else AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        want = theirs(ids).logits
        assert want.std() > 0.01
        torch.testing.assert_close(ours(ids).logits, want, rtol=0, atol=1e-5)


# --- cache --------------------------------------------------------------------------------------------------

@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def count_conversions(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = lg.read_gguf

    def counting(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(lg, "read_gguf", counting)
    return calls


def assert_same(a, b) -> None:
    assert a[0] == b[0] and a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_cache_hit_is_used_and_equal(llama_f32, cache_env, monkeypatch):
    calls = count_conversions(monkeypatch)
    first = load_gguf(llama_f32)
    entry = cache_file(llama_f32)
    assert entry.is_file() and entry.parent == cache_env / "gguf"
    assert list(entry.parent.iterdir()) == [entry]  # no temporary file left behind
    second = load_gguf(llama_f32)
    assert len(calls) == 1
    assert_same(first, second)
    assert_same(first, read_gguf(llama_f32))
    load_gguf(llama_f32, cache=False)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["flip-data-byte", "truncate", "garbage"])
def test_corrupt_cache_entry_is_rebuilt(llama_f32, cache_env, monkeypatch, damage):
    good = load_gguf(llama_f32)
    entry = cache_file(llama_f32)
    data = bytearray(entry.read_bytes())
    if damage == "flip-data-byte":
        data[-5] ^= 0x40  # inside the last tensor: structure intact, only the checksum can tell
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(data))
    calls = count_conversions(monkeypatch)
    with pytest.warns(UserWarning, match="corrupt GGUF cache entry"):
        rebuilt = load_gguf(llama_f32)
    assert len(calls) == 1
    assert_same(good, rebuilt)
    assert_same(good, load_gguf(llama_f32))  # and the rebuilt entry is good again
    assert len(calls) == 1


def test_stale_cache_entry_is_rebuilt(llama_ref, tmp_path, cache_env, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "llama", llama_hparams(llama_ref), llama_gguf_tensors(llama_ref))
    load_gguf(path)
    changed = dict(llama_gguf_tensors(llama_ref))
    changed["output_norm.weight"] = changed["output_norm.weight"] * 2
    write_gguf(path, "llama", llama_hparams(llama_ref), changed)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    calls = count_conversions(monkeypatch)
    _, tensors = load_gguf(path)
    assert len(calls) == 1
    assert torch.equal(tensors["norm.weight"], torch.from_numpy(changed["output_norm.weight"]))


def test_interrupted_cache_write_keeps_previous_entry(llama_ref, tmp_path, cache_env, monkeypatch):
    path = write_gguf(tmp_path / "m.gguf", "llama", llama_hparams(llama_ref), llama_gguf_tensors(llama_ref))
    load_gguf(path)
    entry = cache_file(path)
    before = entry.read_bytes()
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # make the entry stale

    def killed_mid_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(lg, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        load_gguf(path)
    assert entry.read_bytes() == before
    assert list(entry.parent.iterdir()) == [entry]


def test_unwritable_cache_warns_and_still_loads(llama_f32, tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("LMFORGE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the GGUF cache entry"):
        config, tensors = load_gguf(llama_f32)
    assert_same((config, tensors), read_gguf(llama_f32))


# --- bad files ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.5, 0.9, 100])
def test_truncated_file_names_the_file(llama_f32, tmp_path, keep):
    data = llama_f32.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ValueError, match=r"truncated\.gguf.*truncated or corrupt|truncated\.gguf: truncated"):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("{\"hello\": 1}")
    with pytest.raises(ValueError, match=r"model\.gguf is not a GGUF file"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="directory"):
        load_gguf(tmp_path)


def test_unsupported_quantization_type_names_tensor_and_type(llama_ref, tmp_path):
    tensors = llama_gguf_tensors(llama_ref)
    path = tmp_path / "q8_1.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    hp = llama_hparams(llama_ref)
    w.add_block_count(hp["n_layer"])
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["d_model"])
    w.add_feed_forward_length(hp["d_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_kv_head"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_vocab_size(hp["vocab"])
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    for name, array in tensors.items():
        if name == "blk.1.ffn_up.weight":  # raw Q8_1 blocks: a type gguf.quants cannot dequantize
            rows, cols = array.shape
            w.add_tensor(name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(name, np.ascontiguousarray(array, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"q8_1\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type Q8_1"):
        read_gguf(path)


def test_unsupported_architecture_and_bad_tensors(llama_ref, tmp_path):
    hp, tensors = llama_hparams(llama_ref), llama_gguf_tensors(llama_ref)
    bad_arch = tmp_path / "falcon.gguf"
    write_gguf(bad_arch, "falcon", dict(hp), tensors)
    with pytest.raises(ValueError, match=r"falcon\.gguf: unsupported GGUF architecture 'falcon'"):
        read_gguf(bad_arch)

    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_gate.weight"}
    with pytest.raises(ValueError, match=r"lacks tensors for layers\.1\.mlp\.up\.weight.*only blk\.1\.ffn_up\.weight"):
        read_gguf(write_gguf(tmp_path / "missing.gguf", "llama", hp, missing))

    wrong = dict(tensors, **{"blk.0.attn_k.weight": tensors["blk.0.attn_q.weight"]})
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' has shape \(64, 64\), expected \(32, 64"):
        read_gguf(write_gguf(tmp_path / "shape.gguf", "llama", hp, wrong))

    extra = dict(tensors, **{"blk.0.ffn_gate_exps.weight": tensors["blk.0.ffn_gate.weight"]})
    with pytest.raises(ValueError, match=r"unexpected tensor 'blk\.0\.ffn_gate_exps\.weight'"):
        read_gguf(write_gguf(tmp_path / "extra.gguf", "llama", hp, extra))
