"""T5 (encoder-decoder) against transformers: logits, saved folders, relative buckets, generation, tokenizer.

References are tiny random transformers T5 models (v1.0: ReLU, tied and scaled head; v1.1: gated GELU, untied
head) built from a seed and saved with `save_pretrained`; lmforge loads the folders with its own converter.
Batches pad the encoder input on both sides and the decoder input on the right; only real positions are
compared (fp32, max abs diff <= 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from lmforge.config import ModelConfig
from lmforge.io import CheckpointError, load_model, save_model
from lmforge.models import build_model
from lmforge.models.seq2seq import EncoderDecoder, relative_buckets, shift_right

ATOL = 1e-4
VOCAB = 96
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
VERSIONS = {"v1.0": dict(_T5, feed_forward_proj="relu"),
            "v1.1": dict(_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def make_reference(version: str, folder: Path, seed: int = 0, encoder_only: bool = False,
                   **overrides) -> torch.nn.Module:
    """A seeded random transformers T5 of `version`, saved to `folder`. v1.1 gets its own LM head (transformers
    5 ties every T5 head to the embeddings unless the file holds a different lm_head.weight, as Flan-T5's do)."""
    torch.manual_seed(seed)
    config = tf.T5Config(**{**VERSIONS[version], **overrides})
    if encoder_only:
        model = tf.T5EncoderModel(config).eval()
    else:
        model = tf.T5ForConditionalGeneration(config).eval()
        if version == "v1.1":
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, config.d_model))
    model.save_pretrained(folder)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder ids (3, 30) (row 1 right-padded, row 2 left-padded: longer than the bucket range) and decoder
    ids (3, 25) starting with the start token (row 1 right-padded)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, :7] = 0
    dec = torch.randint(2, VOCAB, (3, 25), generator=g)
    dec[:, 0] = 0
    dmask = torch.ones_like(dec)
    dmask[1, 15:] = 0
    return ids.masked_fill(mask == 0, 0), mask, dec.masked_fill(dmask == 0, 0), dmask


def both(reference: torch.nn.Module, model: EncoderDecoder) -> tuple[dict, dict]:
    ids, mask, dec, dmask = batch()
    with torch.no_grad():
        r = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
        o = model(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask)
    real, dreal = mask.bool(), dmask.bool()
    return ({"encoder": r.encoder_last_hidden_state[real], "logits": r.logits[dreal]},
            {"encoder": o.encoder_last_hidden_state[real], "logits": o.logits[dreal]})


@pytest.mark.parametrize("version", VERSIONS)
def test_logits_match_transformers(version: str, tmp_path: Path, one_thread) -> None:
    reference = make_reference(version, tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, EncoderDecoder)
    assert model.config.scaled_head == (version == "v1.0")
    assert model.config.tie_embeddings == (version == "v1.0")
    want, got = both(reference, model)
    assert want["logits"].abs().max() > 1.0  # logits large enough that a wrong layout shows
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)


def test_parity_check_detects_a_wrong_weight(tmp_path: Path, one_thread) -> None:
    reference = make_reference("v1.1", tmp_path)
    model = load_model(tmp_path)
    with torch.no_grad():
        model.decoder.layers[2].cross.kv.weight[40] += 0.05  # one value row of the last cross-attention
    want, got = both(reference, model)
    assert (got["logits"] - want["logits"]).abs().max() > 10 * ATOL
    torch.testing.assert_close(got["encoder"], want["encoder"], atol=ATOL, rtol=0)


def test_encoder_model_matches_transformers(tmp_path: Path, one_thread) -> None:
    reference = make_reference("v1.1", tmp_path, encoder_only=True)
    model = load_model(tmp_path)
    assert model.config.head == "none" and model.decoder is None
    ids, mask, _, _ = batch()
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask)
    assert got.logits is None
    real = mask.bool()
    torch.testing.assert_close(got.last_hidden_state[real], want[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(model.encode(ids, mask)[real], want[real], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no decoder"):
        model(ids, attention_mask=mask, decoder_input_ids=ids)


def test_full_checkpoint_read_as_encoder_alone(tmp_path: Path, one_thread) -> None:
    reference = make_reference("v1.0", tmp_path)
    model = load_model(tmp_path, head="none")
    ids, mask, _, _ = batch()
    with torch.no_grad():
        want = reference.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(model.encode(ids, mask)[real], want[real], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="head='classify'"):
        load_model(tmp_path, head="classify")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_lmforge_save_loads_in_transformers(version: str, shard: str | None, tmp_path: Path, one_thread) -> None:
    make_reference(version, tmp_path / "ref")
    model = load_model(tmp_path / "ref")
    files = save_model(model, tmp_path / "out", **({"max_shard_size": shard} if shard else {}))
    assert any(f.name == "model.safetensors.index.json" for f in files) == (shard is not None)
    reloaded = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    want, got = both(reloaded, model)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
    again = load_model(tmp_path / "out")  # and back
    assert again.config.tie_embeddings == model.config.tie_embeddings
    for name, t in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_transformers_own_v11_folder(tmp_path: Path, one_thread) -> None:
    """transformers 5 saves a v1.1 config with its head tied and scale_decoder_outputs=False: tied, unscaled."""
    torch.manual_seed(0)
    reference = tf.T5ForConditionalGeneration(tf.T5Config(**VERSIONS["v1.1"])).eval()
    reference.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    model = load_model(tmp_path)
    assert model.config.tie_embeddings and model.config.scaled_head == raw["scale_decoder_outputs"]
    want, got = both(reference, model)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=0)
    save_model(model, tmp_path / "out")
    want, got = both(tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval(), model)
    torch.testing.assert_close(got["logits"], want["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_buckets_match_transformers(bidirectional: bool) -> None:
    distance = torch.arange(-300, 301)[None, :]
    for n_buckets, max_distance in ((32, 128), (8, 20), (16, 64)):
        want = tf.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            distance, bidirectional=bidirectional, num_buckets=n_buckets, max_distance=max_distance)
        assert torch.equal(relative_buckets(distance, bidirectional, n_buckets, max_distance), want)


def test_shift_right() -> None:
    labels = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
    assert shift_right(labels).tolist() == [[0, 5, 6, 1], [0, 7, 1, 0]]
    with pytest.raises(ValueError, match="labels must be"):
        shift_right(labels[0])


def test_bad_t5_configs(tmp_path: Path) -> None:
    make_reference("v1.0", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "feed_forward_proj": "swiglu-gelu"}))
    with pytest.raises(CheckpointError, match="feed_forward_proj"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="n_decoder_layer applies to encoder-decoder"):
        ModelConfig.from_name("tiny-gpt2", n_decoder_layer=2)
    with pytest.raises(ValueError, match="relative_max_distance above half"):
        ModelConfig.from_name("tiny-t5", relative_buckets=32, relative_max_distance=16)
    with pytest.raises(ValueError, match="position='relative'"):
        ModelConfig.from_name("tiny-t5", position="learned")
    with pytest.raises(ValueError, match="head 'lm'.*or 'none'"):
        build_model(ModelConfig.from_name("tiny-t5", head="classify"))


def test_training_forward_has_gradients() -> None:
    """The same forward trains: teacher-forced cross-entropy back-propagates into both stacks."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_name("tiny-t5")).train()
    ids, mask, dec, dmask = batch()
    labels = torch.randint(2, VOCAB, dec.shape)
    logits = model(ids, attention_mask=mask, decoder_input_ids=shift_right(labels)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).backward()
    assert model.encoder.layers[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.encoder.relative_bias.weight.grad.abs().sum() > 0
    assert model.decoder.layers[-1].cross.kv.weight.grad.abs().sum() > 0



@pytest.mark.parametrize("gated", [False, True])
def test_feed_forward_drops_after_the_activation(gated: bool) -> None:
    """T5 (as transformers' T5DenseActDense / T5DenseGatedActDense) drops the activation inside the
    feed-forward while training: with rate 1 the block's feed-forward gives zeros, in eval mode it does not;
    decoders and encoders of the other families have no such dropout."""
    cfg = ModelConfig.from_name("tiny-t5", dropout=1.0, gated_mlp=gated,
                                activation="gelu_tanh" if gated else "relu")
    mlp = build_model(cfg).decoder.layers[0].mlp
    x = torch.randn(2, 3, cfg.d_model)
    assert torch.equal(mlp.train()(x), torch.zeros_like(x))
    assert mlp.eval()(x).abs().sum() > 0
    gpt = build_model(ModelConfig.from_name("tiny-gpt2", dropout=1.0)).layers[0].mlp.train()
    assert gpt(torch.ones(2, 3, gpt.up.in_features)).abs().sum() > 0

# --- generation ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(VERSIONS))
def t5_pair(request, tmp_path_factory):
    """(transformers T5, the same weights as an lmforge EncoderDecoder). As many decoder as encoder layers:
    transformers 5.23's generate sizes its decoder cache by the encoder's layer count (IndexError otherwise)."""
    folder = tmp_path_factory.mktemp(f"t5-{request.param}")
    return make_reference(request.param, folder, num_decoder_layers=2), load_model(folder)


def _sources(lengths: list[int], side: str = "right", seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random encoder inputs (B, max(lengths)) of ids in [2, VOCAB), padded with 0 on `side`, and the mask."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.zeros(len(lengths), S, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(S - n, S)
        ids[i, span] = torch.randint(2, VOCAB, (n,), generator=g)
        mask[i, span] = 1
    return ids, mask


SEQ2SEQ_DECODING = [
    dict(max_new_tokens=16),
    dict(max_length=20, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, length_penalty=0.5),
    dict(max_new_tokens=10, num_beams=3, early_stopping=True),
    dict(max_new_tokens=10, num_beams=3, early_stopping="never", length_penalty=2.0),
]


@pytest.mark.parametrize("kw", SEQ2SEQ_DECODING, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("lengths", [[7], [9, 4, 6]], ids=["single", "padded-batch"])
def test_generation_matches_transformers(t5_pair, kw, lengths, one_thread):
    hf, model = t5_pair
    ids, mask = _sources(lengths)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    out = model.generate(ids, mask, **kw)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_eos_mid_generation_matches_transformers(t5_pair, num_beams, one_thread):
    """An eos the first row reaches at step 5: rows finish at different steps, padded as transformers pads."""
    hf, model = t5_pair
    ids, mask = _sources([8, 5, 7], side="left")
    kw = dict(max_new_tokens=12, no_repeat_ngram_size=1, num_beams=num_beams)  # no token twice: varied rows
    if num_beams > 1:
        kw["length_penalty"] = 0.0  # summed log-probabilities: a hypothesis that ends early wins
    free = model.generate(ids, mask, eos_token_id=[], **kw)
    eos = int(free[0, 1 + 5])
    kw.update(eos_token_id=eos, min_new_tokens=2)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, **kw)
    out = model.generate(ids, mask, **kw)
    assert torch.equal(out, ref), f"\n{out}\n{ref}"
    assert (out[:, 1:] == eos).any(), "eos never occurred: the test would not test finishing"


def test_padding_side_and_batch_do_not_change_a_row(t5_pair, one_thread):
    _, model = t5_pair
    right, rmask = _sources([9, 3, 6], side="right")
    left, lmask = _sources([9, 3, 6], side="left")
    kw = dict(max_new_tokens=12, num_beams=2)
    a, b = model.generate(right, rmask, **kw), model.generate(left, lmask, **kw)
    assert torch.equal(a, b)
    for i, n in enumerate([9, 3, 6]):
        alone = model.generate(right[i:i + 1, :n], **kw)
        assert torch.equal(a[i, :alone.shape[1]], alone[0]) and (a[i, alone.shape[1]:] == 0).all()


def test_decode_steps_equal_the_full_forward(t5_pair, one_thread):
    """The cached path (remembered cross keys/values, one token per step) gives the teacher-forced logits."""
    _, model = t5_pair
    ids, mask = _sources([9, 5], side="left")
    dec = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=dec).logits
        model.setup_cache(2, 8)
        model.remember(model.encode(ids, mask))
        first = model.decode(dec[:, :3], memory_mask=mask, input_pos=torch.arange(3)).logits
        steps = [model.decode(dec[:, t:t + 1], memory_mask=mask, input_pos=torch.tensor([t])).logits
                 for t in range(3, 8)]
    model.drop_cache()
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=ATOL, rtol=0)


def test_sampling(t5_pair, one_thread):
    """Seeds repeat, top_k=1 is greedy, and one-step sample frequencies follow softmax(logits / T)."""
    _, model = t5_pair
    ids, mask = _sources([6, 4])
    kw = dict(max_new_tokens=10, do_sample=True, num_return_sequences=3, temperature=1.3, top_p=0.9)
    a, b = model.generate(ids, mask, seed=5, **kw), model.generate(ids, mask, seed=5, **kw)
    assert torch.equal(a, b) and a.shape[0] == 6
    assert not torch.equal(a, model.generate(ids, mask, seed=6, **kw))
    greedy = model.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=10, do_sample=True, top_k=1, seed=1), greedy)
    n, temperature = 4000, 2.0
    out = model.generate(ids[:1, :6], max_new_tokens=1, do_sample=True, temperature=temperature, top_k=0,
                         num_return_sequences=n, eos_token_id=[], seed=11)
    with torch.no_grad():
        logits = model(ids[:1, :6], decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, -1]
    probs = (logits / temperature).softmax(-1)
    freq = torch.bincount(out[:, 1], minlength=VOCAB).double() / n
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max()  # 4 standard errors


def test_decoder_prompt_and_start_token(t5_pair, one_thread):
    hf, model = t5_pair
    ids, mask = _sources([7, 5])
    prefix = torch.tensor([[0, 5, 9], [0, 7, 7]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, decoder_input_ids=prefix, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids, mask, decoder_input_ids=prefix, max_new_tokens=6), ref)
    assert (model.generate(ids, mask, decoder_start_token_id=4, max_new_tokens=3)[:, 0] == 4).all()


# --- tokenizer, command line, bad input ---------------------------------------------------------------------

TEXTS = ["The quick brown fox jumps over the lazy dog.", "summarize: the cat sat on the mat, twice!",
         "Numbers 12 345 and ünïcödé too.", "A  double   space and a tab\there."]


def t5_tokenizer_folder(folder: Path, extra_ids: int = 10) -> tf.PreTrainedTokenizerBase:
    """A SentencePiece-style Unigram vocabulary trained with `tokenizers` on TEXTS, wrapped in transformers'
    T5 tokenizer (Metaspace pre-tokenizer, '</s>' appended, <extra_id_N> sentinels) and saved to `folder`."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    backend.train_from_iterator(TEXTS * 10, trainer)
    vocab = [tuple(piece) for piece in json.loads(backend.to_str())["model"]["vocab"]]
    reference = tf.T5Tokenizer(vocab=vocab, extra_ids=extra_ids)
    reference.save_pretrained(folder)
    return reference


def test_tokenizer_ids_match_transformers(tmp_path: Path) -> None:
    from lmforge.tokenizer import Tokenizer

    reference = t5_tokenizer_folder(tmp_path / "tok")
    tok = Tokenizer.for_model(tmp_path / "tok")
    texts = [*TEXTS, "summarize: <extra_id_0> cat <extra_id_9> mat", "unseen zqx words ÿ"]
    for text in texts:
        ids = reference(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ids[-1] == tok.eos_token_id == reference.eos_token_id
    assert (tok.pad_token_id, tok.unk_token_id, tok.vocab_size) == (reference.pad_token_id, reference.unk_token_id,
                                                                     len(reference))
    assert tok.sentinel_ids == reference.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(10)])
    batch = tok.encode_batch(texts, padding_side="right")
    want = reference(texts, padding=True).input_ids
    assert batch.input_ids.tolist() == want
    tok.save(tmp_path / "saved")  # what lmforge convert writes: transformers reads the same vocabulary back
    again = tf.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert len(again) == len(reference) and again(texts[-2]).input_ids == reference(texts[-2]).input_ids


@pytest.fixture(scope="module")
def t5_cli_folder(tmp_path_factory) -> tuple[Path, torch.nn.Module, tf.PreTrainedTokenizerBase]:
    """A tiny random v1.1 T5 over the test tokenizer's vocabulary, with the tokenizer: (folder, hf model, hf tok)."""
    folder = tmp_path_factory.mktemp("t5-cli")
    reference_tok = t5_tokenizer_folder(folder)
    torch.manual_seed(0)
    config = tf.T5Config(**{**VERSIONS["v1.1"], "vocab_size": len(reference_tok), "num_decoder_layers": 2})
    hf = tf.T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(folder)
    return folder, hf, reference_tok


def test_cli_generate_matches_transformers(t5_cli_folder, run_cli, one_thread) -> None:
    folder, hf, reference_tok = t5_cli_folder
    prompts = ["summarize: the cat sat on the mat", "translate: lazy dog"]
    for options in ([], ["--num-beams", "3", "--num-return-sequences", "2"]):
        code, out, err = run_cli("generate", "--model", folder, *prompts, "--max-new-tokens", "8",
                                 "--json", *options)
        assert code == 0, err
        texts = [o["text"] for o in json.loads(out)["outputs"]]
        batch = reference_tok(prompts, return_tensors="pt", padding=True)
        kw = dict(num_beams=3, num_return_sequences=2) if options else {}
        with torch.no_grad():
            ref = hf.generate(**batch, max_new_tokens=8, do_sample=False, **kw)
        assert texts == reference_tok.batch_decode(ref, skip_special_tokens=True)
        assert any(texts), "every text is empty: the comparison would be vacuous"
    code, plain, _ = run_cli("generate", "--model", folder, prompts[0], "--max-new-tokens", "8", "--seed", "3",
                             "--do-sample")
    code2, streamed, _ = run_cli("generate", "--model", folder, prompts[0], "--max-new-tokens", "8", "--seed",
                                 "3", "--do-sample", "--stream")
    assert code == code2 == 0 and plain == streamed and not plain.startswith("Generated 0: summarize")


def test_cli_info_and_convert(t5_cli_folder, run_cli, tmp_path: Path, one_thread) -> None:
    folder, hf, reference_tok = t5_cli_folder
    code, out, _ = run_cli("info", folder)
    assert code == 0 and "T5ForConditionalGeneration (t5 encoder-decoder, head lm)" in out
    assert "2 encoder + 2 decoder layers" in out
    code, out, err = run_cli("convert", folder, tmp_path / "out", "--dtype", "bfloat16")
    assert code == 0, err
    converted = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], t.to(torch.bfloat16).float(), atol=0, rtol=0)
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tok) == len(reference_tok) and tok(TEXTS[1]).input_ids == reference_tok(TEXTS[1]).input_ids


def test_options_that_do_not_fit_the_model_kind(t5_cli_folder, run_cli, tmp_path: Path) -> None:
    """Decoder-only options on a T5 and T5-only options on a decoder fail naming the option."""
    folder, _, _ = t5_cli_folder
    code, _, err = run_cli("generate", "--model", folder, "hi", "--chat")
    assert code == 2 and "--chat" in err and "encoder-decoder" in err
    code, _, err = run_cli("generate", "--model", folder, "hi", "--compile")
    assert code == 2 and "--compile" in err and "encoder-decoder" in err
    code, _, err = run_cli("serve", "--model", folder)
    assert code == 2 and f"--model {folder}" in err and "encoder-decoder" in err
    t5 = load_model(folder)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="compile=True"):
        t5.generate(ids, compile=True)
    with pytest.raises(ValueError, match="decoder_start_token_id must be"):
        t5.generate(ids, decoder_start_token_id=10**6)
    with pytest.raises(ValueError, match="decoder_input_ids is required"):
        t5(ids)
    torch.manual_seed(0)
    save_model(build_model(ModelConfig.from_name("tiny-gpt2")), tmp_path / "gpt2")
    gpt2 = load_model(tmp_path / "gpt2")
    for option in ("decoder_input_ids", "decoder_start_token_id"):
        value = ids if option == "decoder_input_ids" else 0
        with pytest.raises(ValueError, match=f"{option} applies to encoder-decoder models"):
            gpt2.generate(ids, **{option: value})
    with pytest.raises(ValueError, match="head='classify'"):
        load_model(folder, head="classify")


def test_spiece_model_reads_without_sentencepiece(tmp_path: Path) -> None:
    """A SentencePiece Unigram model (trained here by the sentencepiece package, a test-only dependency) read by
    lmforge's own protobuf reader gives the ids of transformers' T5 tokenizer (sentinels in T5's order: the
    highest id is <extra_id_0>) and, without sentinels, those of sentencepiece itself."""
    import sentencepiece

    from lmforge.tokenizer import Tokenizer

    folder = tmp_path / "spm"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 30), model_prefix=str(folder / "spiece"), vocab_size=50,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 5}))
    reference = tf.T5Tokenizer.from_pretrained(folder)
    tok = Tokenizer.for_model(folder)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    for text in [*TEXTS, "The lazy  fox <extra_id_0> sat.", "<extra_id_4>x<extra_id_1> y", "unseen ÿ zq"]:
        ids = reference(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids) == reference.decode(ids)
        if "<extra_id" not in text:
            assert ids == [*spm.encode(text), 1]
    assert tok.sentinel_ids == reference.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(5)])
    assert tok.sentinel_ids[0] == tok.vocab_size - 1 == len(reference) - 1
    (folder / "spiece.model").write_bytes(b"\x0a\x05abc")  # a piece field cut short
    with pytest.raises(ValueError, match="spiece.model"):
        Tokenizer.for_model(folder)
