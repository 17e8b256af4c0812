"""Generation: token-identical to transformers' generate (greedy, beams, padded batches), sampling statistics,
length and stop rules, streaming, the CLI, and a clear error for every bad input."""

from __future__ import annotations

import copy
import json
import math
import weakref

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

import lmforge.generation.decode as decode
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    generate,
    generate_ids,
    min_p_filter,
    process_logits,
    resolve_settings,
    stream,
    stream_rows,
    top_k_filter,
    top_p_filter,
)
from lmforge.io import load_model
from lmforge.models import Decoder
from lmforge.models.linear import quantize
from lmforge.tokenizer import Tokenizer

# --- fixtures: tiny random transformers models, saved and loaded back with lmforge.io -----------------------

def _hf_tiny(kind: str, vocab_size: int = 128):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_pair(request, tmp_path_factory):
    """(transformers model, the same weights as an lmforge Decoder)."""
    hf = _hf_tiny(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    return hf, load_model(folder)


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Tokenizer:
    return Tokenizer.for_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_text_model(smollm2_tokenizer, tmp_path_factory):
    """A tiny random Llama over SmolLM2's vocabulary, saved with the tokenizer: (folder, model)."""
    hf = _hf_tiny("llama", vocab_size=smollm2_tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("tiny-text")
    hf.save_pretrained(folder)
    smollm2_tokenizer.save(folder)
    return folder, load_model(folder)


def _prompts(lengths: list[int], pad: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts (B, max(lengths)) of ids in [3, 128) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(3, 128, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _hf_generate(hf, ids, mask, **kw) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=hf.config.eos_token_id,
                           **kw)


# --- parity with transformers -------------------------------------------------------------------------------

DECODING = [
    dict(max_new_tokens=16),
    dict(max_length=24, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, length_penalty=0.5),
    dict(max_new_tokens=10, num_beams=3, early_stopping=True),
    dict(max_new_tokens=10, num_beams=3, early_stopping="never", length_penalty=2.0),
]


@pytest.mark.parametrize("kw", DECODING, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("lengths", [[7], [9, 4, 6]], ids=["single", "padded-batch"])
def test_matches_transformers(tiny_pair, kw, lengths):
    hf, model = tiny_pair
    ids, mask = _prompts(lengths, pad=hf.config.eos_token_id)
    ref = _hf_generate(hf, ids, mask, **kw)
    out = generate_ids(model, ids, mask, **kw)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_eos_mid_generation_matches_transformers(tiny_pair, num_beams):
    """An eos the first row reaches at step 5: rows finish at different steps, padded as transformers pads."""
    hf, model = tiny_pair
    ids, mask = _prompts([8, 5, 7], pad=0)
    kw = dict(max_new_tokens=12, no_repeat_ngram_size=1, num_beams=num_beams)  # no token twice: varied rows
    if num_beams > 1:
        kw["length_penalty"] = 0.0  # summed log-probabilities: a hypothesis that ends early wins
    free = generate_ids(model, ids, mask, eos_token_id=[], pad_token_id=0, **kw)
    eos = int(free[0, 8 + 5])
    kw.update(eos_token_id=eos, min_new_tokens=2)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)
    out = generate_ids(model, ids, mask, pad_token_id=0, **kw)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"
    assert (out[:, 8:] == eos).any(), "eos never occurred: the test would not test finishing"


def test_each_padded_row_equals_running_it_alone(tiny_pair):
    _, model = tiny_pair
    ids, mask = _prompts([9, 3, 6], pad=0)
    batch = generate_ids(model, ids, mask, max_new_tokens=10, eos_token_id=[])
    for i in range(3):
        alone = generate_ids(model, ids[i:i + 1, mask[i].bool()], max_new_tokens=10, eos_token_id=[])
        assert torch.equal(batch[i, 9:], alone[0, -10:])


def test_transformers_style_call(tiny_pair):
    """`model.generate(ids, max_length=40, temperature=0.9, num_return_sequences=10, do_sample=True)`."""
    _, model = tiny_pair
    ids, _ = _prompts([5], pad=0)
    out = model.generate(ids, max_length=40, temperature=0.9, num_return_sequences=10, do_sample=True)
    assert out.dtype == torch.long and out.shape[0] == 10 and out.shape[1] <= 40
    assert torch.equal(out[:, :5], ids.expand(10, 5))
    assert len({tuple(r) for r in out.tolist()}) > 1  # samples differ


@pytest.mark.parametrize("kw", [dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)])
def test_static_cuda_graph_path_matches(tiny_pair, kw, monkeypatch):
    """The CUDA path's shapes (a cache rounded up and reused, every step reading all of it under a mask, beams
    reordered in place), with the compiled step replaced by the plain forward."""
    _, model = tiny_pair
    monkeypatch.setattr(decode, "compiled_step", lambda m: m.forward)
    ids, mask = _prompts([7, 3], pad=0)
    expected = generate_ids(model, ids, mask, **kw)
    buffers = None
    for _ in range(2):  # the second call reuses the first call's cache buffers
        assert torch.equal(generate_ids(model, ids, mask, compile=True, **kw), expected)
        assert model.cache_shape[1] == min(decode.STATIC_CACHE_STEP, model.config.max_seq_len)
        k = model.layers[0].attn.kv_cache.k
        assert buffers is None or k.data_ptr() == buffers
        buffers = k.data_ptr()


@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_compiled_step_traces_whole_and_matches(tiny_pair, weights, monkeypatch):
    """`compile=True` as it runs on the CPU: the model's forward compiled whole by inductor (fullgraph: no graph
    break anywhere in a decode step, quantized linears included), the same tokens as eager."""
    _, model = tiny_pair
    if weights == "int8":
        model = quantize(copy.deepcopy(model), "int8")
    torch._dynamo.reset()
    monkeypatch.setattr(decode, "_compiled_steps", weakref.WeakKeyDictionary())
    ids, mask = _prompts([5, 3], pad=0)
    expected = generate_ids(model, ids, mask, max_new_tokens=6)
    assert torch.equal(generate_ids(model, ids, mask, max_new_tokens=6, compile=True), expected)
    assert model in decode._compiled_steps  # the compiled step ran, not a fallback


def test_compiled_steps_pick_the_right_graph_without_all_guards(tiny_pair, monkeypatch):
    """Steps after a call's first skip dynamo's guards that never told graphs apart: models of other formats
    (an int8 swap of the same model), other batch sizes and a model seen again, in turn, all give eager's tokens
    (the steps of a call reusing the first step's graph with another model's weights would not, or would fail)."""
    _, model = tiny_pair
    int8 = quantize(copy.deepcopy(model), "int8")
    torch._dynamo.reset()
    monkeypatch.setattr(decode, "_compiled_steps", weakref.WeakKeyDictionary())
    ids, mask = _prompts([5, 3], pad=0)
    for m, rows in ((model, 2), (int8, 2), (model, 2), (model, 1), (int8, 1), (model, 2)):
        expected = generate_ids(m, ids[:rows], mask[:rows], max_new_tokens=5)
        assert torch.equal(generate_ids(m, ids[:rows], mask[:rows], max_new_tokens=5, compile=True), expected)


def _decode_vs_full(model, ids, mask, extra: torch.Tensor):
    """Logits of each token of `extra` (B, N) fed one at a time after a prefill of ids (B, P), and the logits of
    the full-sequence forward at the same positions."""
    B, P = ids.shape
    N = extra.shape[1]
    full = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones(B, N, dtype=torch.long)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model(full, attention_mask=full_mask, position_ids=positions).logits[:, P - 1:].float()
        model.setup_cache(B, P + N + 3)  # longer than needed: slots past the written ones must not matter
        got = [model(ids, attention_mask=mask, position_ids=positions[:, :P],
                     input_pos=torch.arange(P)).logits[:, -1]]
        for i in range(N):
            s = P + i
            got.append(model(full[:, s:s + 1], attention_mask=full_mask[:, :s + 1], position_ids=positions[:, s:s + 1],
                             input_pos=torch.tensor([s])).logits[:, -1])
    return torch.stack(got, 1).float(), expected


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_mode_equals_full_forward(tiny_pair, dtype, tol):
    """The one forward in decode mode (prefill, then one token at a time through the attention modules' caches)
    gives the logits of the full-sequence forward, with left padding."""
    model = copy.deepcopy(tiny_pair[1]).to(dtype)
    ids, mask = _prompts([6, 3], pad=0)
    got, expected = _decode_vs_full(model, ids, mask, torch.tensor([[5, 17, 30], [9, 2, 44]]))
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_cache_is_explicit_and_reusable():
    """Nothing advances behind the caller's back: writing the same slot twice gives the same logits; a cached
    forward without setup_cache is an error; reorder_cache copies rows."""
    model = Decoder(ModelConfig.from_name("tiny-llama")).eval()
    ids = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with pytest.raises(ValueError, match="setup_cache"):
        model(ids, input_pos=torch.arange(3))
    model.setup_cache(2, 8)
    with torch.no_grad():
        first = model(ids, input_pos=torch.arange(3)).logits
        again = model(ids, input_pos=torch.arange(3)).logits
        torch.testing.assert_close(first, again, rtol=0, atol=0)
        model.reorder_cache(torch.tensor([1, 1]))
        k = model.layers[1].attn.kv_cache.k
        assert torch.equal(k[0], k[1])
    model.drop_cache()
    assert model.cache_shape is None
    with pytest.raises(ValueError, match="exceeds the model context"):
        Decoder(ModelConfig.from_name("tiny-gpt2")).setup_cache(1, 65)


def test_per_row_slots_equal_each_row_alone(tiny_pair):
    """Rows at different positions (input_pos (B, T), as a continuously batched server decodes them) give
    each row's logits of decoding it alone: rows prefilled one by one into chosen cache rows (`cache_rows`)
    while others are mid-decode, a finished row's cache moved onto another row (`copy_cache_row`)."""
    model = tiny_pair[1]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (5, 2, 7)]
    steps = torch.randint(3, 128, (3, 4), generator=g)  # the tokens fed back, per row

    def alone(i: int) -> torch.Tensor:
        model.setup_cache(1, 16)
        P = len(prompts[i])
        out = [model(prompts[i][None], input_pos=torch.arange(P)).logits[0, -1]]
        for n in range(steps.shape[1]):
            out.append(model(steps[i, n].view(1, 1), input_pos=torch.tensor([P + n])).logits[0, -1])
        return torch.stack(out)  # (1 + steps, V)

    with torch.inference_mode():  # as generation runs (the caches other tests left are inference tensors)
        expected = [alone(i) for i in range(3)]
        model.setup_cache(5, 16)
        got: list[list[torch.Tensor]] = [[], [], []]
        pos = torch.zeros(3, dtype=torch.long)
        fed = [0, 0, 0]

        def join(i: int) -> None:  # row i lives in cache row i + 1
            P = len(prompts[i])
            logits = model(prompts[i][None], input_pos=torch.arange(P), cache_rows=slice(i + 1, i + 2)).logits
            got[i].append(logits[0, -1])
            pos[i] = P

        def step(rows: list[int]) -> None:  # one forward over cache rows rows[0] + 1 ... (contiguous)
            token = torch.stack([steps[i, fed[i]] for i in rows])[:, None]  # (b, 1)
            logits = model(token, input_pos=pos[rows][:, None], cache_rows=slice(rows[0] + 1, rows[-1] + 2)).logits
            for j, i in enumerate(rows):
                got[i].append(logits[j, -1])
                pos[i] += 1
                fed[i] += 1

        join(0)
        step([0])
        join(1)
        step([0, 1])
        join(2)
        step([0, 1, 2])
        step([0, 1, 2])
        step([1, 2])
        model.copy_cache_row(3, 0)  # row 2 moves to cache row 0 (no longer contiguous with row 1: step it alone)
        token = steps[2, fed[2]].view(1, 1)
        got[2].append(model(token, input_pos=pos[2].view(1, 1), cache_rows=slice(0, 1)).logits[0, -1])
        fed[2] += 1
        assert fed == [4, 4, 4]
    for i in range(3):
        torch.testing.assert_close(torch.stack(got[i]), expected[i], rtol=1e-5, atol=1e-5)


# --- the real model: SmolLM2-135M, against transformers loading the same GGUF -------------------------------

@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf, smollm2_transformers):
    return smollm2_transformers, load_model(smollm2_gguf, dtype=torch.float32)


@pytest.mark.slow
def test_smollm2_greedy_and_beam_match_transformers(smollm2_pair, smollm2_tokenizer):
    hf, model = smollm2_pair
    batch = smollm2_tokenizer.encode_batch(["Men on the moon", "The capital of France is a city that"])
    ids = batch.input_ids[1:]  # the longer prompt alone
    for kw in (dict(max_new_tokens=16), dict(max_new_tokens=6, num_beams=2)):
        ref = _hf_generate(hf, ids, torch.ones_like(ids), **kw)
        assert torch.equal(generate_ids(model, ids, **kw), ref), kw
    ref = _hf_generate(hf, batch.input_ids, batch.attention_mask, max_new_tokens=16)  # a padded batch
    assert torch.equal(generate_ids(model, batch.input_ids, batch.attention_mask, max_new_tokens=16), ref)


@pytest.mark.slow
def test_smollm2_chat_cli_and_stream(smollm2_pair, smollm2_tokenizer, capsys):
    _, model = smollm2_pair
    text = generate(model, smollm2_tokenizer, "What is 2 + 2?", chat=True, max_new_tokens=12)[0]
    assert text and "<|im" not in text  # the reply, without special tokens
    streamed = "".join(stream(model, smollm2_tokenizer, "What is 2 + 2?", chat=True, max_new_tokens=12))
    assert streamed == text
    assert main(["generate", "What is 2 + 2?", "--chat", "--max-new-tokens", "12", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out == f"Generated 0: {text}\n"


@pytest.mark.slow
def test_smollm2_chat_default_length_answers(capsys):
    """`lmforge generate "What is the capital of France?" --chat` with no other option: the default length
    leaves room for the chat template and the answer, and the default dtype gives coherent text."""
    assert main(["generate", "What is the capital of France?", "--chat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Generated 0: ") and "Paris" in out


# --- sampling -----------------------------------------------------------------------------------------------

def test_top_k_1_equals_greedy(tiny_pair):
    _, model = tiny_pair
    ids, mask = _prompts([7, 4], pad=0)
    greedy = generate_ids(model, ids, mask, max_new_tokens=15)
    sampled = generate_ids(model, ids, mask, max_new_tokens=15, do_sample=True, top_k=1, seed=3)
    assert torch.equal(sampled, greedy)
    zero = generate_ids(model, ids, mask, max_new_tokens=15, do_sample=True, temperature=0)
    assert torch.equal(zero, greedy)


def test_same_seed_same_output(tiny_pair):
    _, model = tiny_pair
    ids, _ = _prompts([5], pad=0)
    kw = dict(max_new_tokens=20, do_sample=True, num_return_sequences=4, temperature=1.5, top_k=0)
    a, b = generate_ids(model, ids, seed=7, **kw), generate_ids(model, ids, seed=7, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, generate_ids(model, ids, seed=8, **kw))
    g = torch.Generator().manual_seed(7)
    assert torch.equal(generate_ids(model, ids, generator=g, **kw), a)


TOL = 1e-5  # float32 softmax/cumsum rounding


def _probs(logits: np.ndarray) -> np.ndarray:
    p = np.exp(logits.astype(np.float64) - logits.max())
    return p / p.sum()


def _top_k_sets(logits: np.ndarray, k: int) -> tuple[set[int], set[int]]:
    """(must keep, may keep): the k highest, ties with the k-th included."""
    kth = np.sort(logits)[::-1][min(k, len(logits)) - 1]
    allowed = {i for i, x in enumerate(logits) if x >= kth}
    return allowed, allowed


def _top_p_sets(logits: np.ndarray, p: float) -> tuple[set[int], set[int]]:
    """A token is in the nucleus when the mass of the tokens ranked before it is below p; ties may rank
    either way, so "before" is bounded by the strictly more likely (may keep) and the at-least-as-likely
    (must keep) tokens."""
    q = _probs(logits)
    must, may = set(), set()
    for r, qr in enumerate(q):
        if q[q > qr].sum() < p + TOL:
            may.add(r)
        if q[q >= qr].sum() - qr < p - TOL:
            must.add(r)
    return must, may


def _min_p_sets(logits: np.ndarray, min_p: float) -> tuple[set[int], set[int]]:
    q = _probs(logits)
    cut = min_p * q.max()
    return ({i for i, x in enumerate(q) if x >= cut + TOL} | {int(q.argmax())},
            {i for i, x in enumerate(q) if x >= cut - TOL})


logit_rows = st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(logits=logit_rows, k=st.integers(1, 45), p=st.floats(0.05, 1.0), min_p=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_filters_never_sample_outside_their_set(logits, k, p, min_p, seed):
    """Each filter keeps its defined set (up to rounding at the border); draws never leave what it kept."""
    scores = torch.tensor([logits], dtype=torch.float32)
    row = np.array(logits, dtype=np.float32)
    g = torch.Generator().manual_seed(seed)
    for filtered, (must, may) in ((top_k_filter(scores, k), _top_k_sets(row, k)),
                                  (top_p_filter(scores, p), _top_p_sets(row, p)),
                                  (min_p_filter(scores, min_p), _min_p_sets(row, min_p))):
        kept = set(torch.isfinite(filtered[0]).nonzero().flatten().tolist())
        assert must <= kept <= may
        draws = torch.multinomial(filtered.softmax(-1).expand(200, -1), 1, generator=g).flatten()
        assert set(draws.tolist()) <= kept


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8)).flatten().tolist()
    assert kept == [True, True, False, False]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.81)).flatten().tolist()
    assert kept == [True, True, True, False]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, 0, 1.0), (1.0, 0, 1.0), (2.0, 0, 1.0),
                                                       (1.5, 6, 1.0), (2.0, 8, 0.8)])
def test_sampling_frequencies_match_softmax_over_temperature(temperature, top_k, top_p):
    """Chi-square goodness of fit of 6000 one-token samples against softmax(logits / T) on a toy model, after
    the full-vocabulary top_k / top_p filters (the sampler itself draws among the top k only)."""
    torch.manual_seed(0)
    model = Decoder(ModelConfig.from_name("tiny-gpt2", vocab_size=12)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits with a spread of ~1, so that temperature matters
        ids = torch.tensor([[3, 5, 7]])
        logits = model(ids).logits[0, -1]
    n = 6000
    out = generate_ids(model, ids, max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k,
                       top_p=top_p, num_return_sequences=n, eos_token_id=[], seed=11)
    counts = torch.bincount(out[:, -1], minlength=12).double()

    def p_value(t: float) -> float:
        scores = logits[None] / t
        if top_k:
            scores = top_k_filter(scores, top_k)
        if top_p < 1.0:
            scores = top_p_filter(scores, top_p)
        expected = torch.softmax(scores[0].double(), -1) * n
        assert counts[expected == 0].sum() == 0  # nothing drawn outside the filtered set
        keep, rare = expected >= 5, (expected > 0) & (expected < 5)
        obs, exp = counts[keep], expected[keep]
        if rare.any():  # pool the rare tokens into one bin
            obs = torch.cat([obs, counts[rare].sum()[None]])
            exp = torch.cat([exp, expected[rare].sum()[None]])
        return chisquare(obs.numpy(), exp.numpy()).pvalue

    assert p_value(temperature) > 1e-3
    assert p_value(temperature * 1.6) < 1e-6  # the test can tell temperatures apart


# --- lengths, eos, stop strings, streaming ------------------------------------------------------------------

def test_max_length_and_max_new_tokens(tiny_pair):
    _, model = tiny_pair
    ids, _ = _prompts([6], pad=0)
    assert generate_ids(model, ids, max_length=17, eos_token_id=[]).shape == (1, 17)
    assert generate_ids(model, ids, max_new_tokens=9, eos_token_id=[]).shape == (1, 15)
    assert generate_ids(model, ids, eos_token_id=[]).shape == (1, 20)  # transformers' default max_length


def test_eos_stops_and_min_new_tokens_delays_it(tiny_pair):
    _, model = tiny_pair
    ids, _ = _prompts([6], pad=0)
    free = generate_ids(model, ids, max_new_tokens=12, eos_token_id=[])[0, 6:].tolist()
    eos = free[2]
    first = free.index(eos)
    out = generate_ids(model, ids, max_new_tokens=12, eos_token_id=eos)[0, 6:].tolist()
    assert out == free[:first + 1]
    delayed = generate_ids(model, ids, max_new_tokens=12, eos_token_id=eos, min_new_tokens=first + 2)[0, 6:]
    assert eos not in delayed[:first + 2].tolist() and len(delayed) > first + 1


def test_stop_strings(tiny_text_model, smollm2_tokenizer):
    _, model = tiny_text_model
    tok = smollm2_tokenizer
    free = generate(model, tok, "Men on the moon", max_new_tokens=20, eos_token_id=[])[0]
    stop = free[len(free) // 2:len(free) // 2 + 3]
    assert len(stop) == 3 and free.find(stop) > 0
    text = generate(model, tok, "Men on the moon", max_new_tokens=20, eos_token_id=[], stop_strings=[stop])[0]
    assert text == free[:free.find(stop) + len(stop)]
    ids = torch.tensor([tok.encode("Men on the moon")])
    out = generate_ids(model, ids, max_new_tokens=20, eos_token_id=[], stop_strings=stop, tokenizer=tok)
    new = out[0, ids.shape[1]:].tolist()
    assert stop in tok.decode(new) and stop not in tok.decode(new[:-1])  # stopped on the completing token


def test_stream_equals_generate(tiny_text_model, smollm2_tokenizer):
    _, model = tiny_text_model
    for kw in (dict(max_new_tokens=30), dict(max_new_tokens=30, do_sample=True, seed=5)):
        pieces = list(stream(model, smollm2_tokenizer, "Men on the moon", **kw))
        assert "".join(pieces) == generate(model, smollm2_tokenizer, "Men on the moon", **kw)[0]
        assert all(pieces)


def test_generate_text_batch_and_names(tiny_text_model, smollm2_tokenizer):
    folder, model = tiny_text_model
    prompts = ["Men on the moon", "A much longer prompt about the moon and the stars"]
    texts = generate(model, smollm2_tokenizer, prompts, max_new_tokens=8)
    assert texts == [generate(model, smollm2_tokenizer, p, max_new_tokens=8)[0] for p in prompts]
    assert generate(str(folder), None, prompts, max_new_tokens=8) == texts  # a path loads model and tokenizer


def test_cli_generate(tiny_text_model, capsys):
    folder, _ = tiny_text_model
    args = ["generate", "Men on the moon", "--model", str(folder), "--max-length", "12", "--dtype", "float32"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert plain.startswith("Generated 0: Men on the moon") and plain.count("\n") >= 1
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--do-sample", "--num-return-sequences", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("Generated")] == \
        ["Generated 0", "Generated 1", "Generated 2"]


def _cli_lines(capsys, argv: list[str]) -> list[str]:
    assert main(argv) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("options", [[], ["--do-sample", "--num-return-sequences", "3", "--seed", "4"],
                                     ["--temperature", "1.3", "--top-p", "0.9", "--seed", "2",
                                      "--repetition-penalty", "1.2"]])
def test_cli_stream_prints_what_generate_prints(tiny_text_model, capsys, options):
    """Several prompts of different lengths, several sampled sequences: --stream prints the same lines."""
    folder, _ = tiny_text_model
    args = ["generate", "Men on the moon", "A longer prompt about the sea", "--model", str(folder),
            "--max-new-tokens", "12", "--dtype", "float32", *options]
    plain = _cli_lines(capsys, args)
    n = 3 if "--num-return-sequences" in options else 1
    assert [line.split(":")[0] for line in plain if line.startswith("Generated")] == \
        [f"Generated {j} (prompt {i})" for i in range(2) for j in range(n)]  # texts may hold newlines
    assert _cli_lines(capsys, args + ["--stream"]) == plain


def test_stream_rows_equal_generate_sampled(tiny_text_model, smollm2_tokenizer):
    _, model = tiny_text_model
    prompts = ["Men on the moon", "A much longer prompt about the moon and the stars"]
    kw = dict(max_new_tokens=16, do_sample=True, num_return_sequences=2, top_k=0, temperature=1.4)
    texts = generate(model, smollm2_tokenizer, prompts, seed=7, **kw)
    joined = [""] * len(texts)
    lasts = []
    for piece in stream_rows(model, smollm2_tokenizer, prompts, seed=7, **kw):
        joined[piece.row] += piece.text
        lasts += [piece.row] if piece.last else []
    assert joined == texts and sorted(lasts) == [0, 1, 2, 3]
    assert len(set(texts)) == 4  # the sequences are really sampled (otherwise the equality says little)


def test_cli_sampling_options_enable_sampling(tiny_text_model, capsys):
    """--temperature / --top-k without --do-sample sample (never silently ignored); temperature 0 is greedy."""
    folder, _ = tiny_text_model
    args = ["generate", "Men on the moon", "--model", str(folder), "--max-new-tokens", "12", "--dtype",
            "float32", "--num-return-sequences", "4", "--seed", "3"]
    implied = _cli_lines(capsys, args + ["--temperature", "1.5", "--top-k", "5"])
    assert implied == _cli_lines(capsys, args + ["--temperature", "1.5", "--top-k", "5", "--do-sample"])
    assert len(set(implied)) == 4
    greedy = _cli_lines(capsys, args[:-4] + ["--temperature", "0"])
    assert greedy == _cli_lines(capsys, args[:-4])


def test_cli_json_and_default_length(tiny_text_model, smollm2_tokenizer, capsys):
    folder, model = tiny_text_model
    prompts = ["Men on the moon", "Stars"]
    assert main(["generate", *prompts, "--model", str(folder), "--dtype", "float32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    texts = generate(model, smollm2_tokenizer, prompts)
    assert report["dtype"] == "float32"
    assert report["outputs"] == [{"prompt_index": i, "sequence": 0, "prompt": p, "text": t}
                                 for i, (p, t) in enumerate(zip(prompts, texts, strict=True))]
    # No length given: DEFAULT_MAX_NEW_TOKENS new tokens whatever the prompt length (capped by the context).
    ids = generate_ids(model, torch.tensor([smollm2_tokenizer.encode("Men on the moon")]), eos_token_id=[])
    assert ids.shape[1] == 20  # the token-level call keeps transformers' max_length=20
    long_prompt = "one two three " * 10
    n_prompt = len(smollm2_tokenizer.encode(long_prompt))
    expected = min(DEFAULT_MAX_NEW_TOKENS, model.config.max_seq_len - n_prompt)
    text = generate(model, smollm2_tokenizer, long_prompt, eos_token_id=[])[0]
    assert n_prompt > 20 and expected > 20  # more than transformers' max_length=20 would leave: none
    assert text == generate(model, smollm2_tokenizer, long_prompt, eos_token_id=[], max_new_tokens=expected)[0]
    assert text != generate(model, smollm2_tokenizer, long_prompt, eos_token_id=[],
                            max_new_tokens=expected - 2)[0]


# --- errors -------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_return_sequences=0), "num_return_sequences"),
    (dict(num_beams=0), "num_beams"),
    (dict(max_length=4), "max_length"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=100), "context"),
    (dict(num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(max_length=10, max_new_tokens=4), "max_length"),
]


@pytest.mark.parametrize("kw,name", BAD_SETTINGS, ids=[n + str(i) for i, (_, n) in enumerate(BAD_SETTINGS)])
def test_bad_settings_name_the_argument(kw, name):
    model = Decoder(ModelConfig.from_name("tiny-gpt2")).eval()
    with pytest.raises(ValueError, match=name):
        generate_ids(model, torch.tensor([[1, 2, 3, 4, 5]]), **kw)


def test_bad_inputs():
    model = Decoder(ModelConfig.from_name("tiny-gpt2")).eval()
    with pytest.raises(TypeError, match="unknown generation arguments"):
        generate_ids(model, torch.tensor([[1, 2]]), max_tokens=3)
    with pytest.raises(ValueError, match="non-empty"):
        generate_ids(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate_ids(model, torch.ones(1, 70, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(ValueError, match="out of range"):
        generate_ids(model, torch.tensor([[1, 500]]))
    with pytest.raises(ValueError, match="left-padded"):
        generate_ids(model, torch.tensor([[1, 2]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="stop_strings needs tokenizer"):
        generate_ids(model, torch.tensor([[1, 2]]), stop_strings=["x"])
    with pytest.raises(TypeError, match="Decoder"):
        generate_ids(torch.nn.Linear(2, 2), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="seed"):
        generate_ids(model, torch.tensor([[1, 2]]), do_sample=True, seed="x")


def test_bad_text_inputs(tiny_text_model, smollm2_tokenizer, capsys):
    folder, model = tiny_text_model
    with pytest.raises(ValueError, match="prompt 1 must be a non-empty string"):
        generate(model, smollm2_tokenizer, ["fine", ""])
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        generate("no-such-model", None, "hello")
    with pytest.raises(ValueError, match="num_beams"):
        list(stream(model, smollm2_tokenizer, "hello", num_beams=2))
    assert main(["generate", "hi", "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(folder), "--temperature", "-1", "--do-sample"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(folder), "--stream", "--num-beams", "2"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "num-beams" in out.err  # refused before any output


def test_settings_defaults_follow_transformers():
    cfg = ModelConfig.from_name("tiny-llama")
    s = resolve_settings(cfg, 5)
    got = (s.max_new_tokens, s.top_k, s.top_p, s.do_sample, s.eos_ids, s.pad_id)
    assert got == (15, 50, 1.0, False, (2,), 2)
    assert not resolve_settings(cfg, 5, do_sample=True, temperature=0.0).do_sample  # 0 means greedy
    scores = torch.randn(2, 128)
    s = resolve_settings(cfg, 5, do_sample=False, top_k=3, temperature=0.5)
    assert torch.equal(process_logits(scores, torch.ones(2, 5, dtype=torch.long),
                                      torch.ones(2, 5, dtype=torch.bool), 0, s), scores)  # greedy: no warpers
