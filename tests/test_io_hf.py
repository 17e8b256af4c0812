"""Hugging Face checkpoints: round trips with transformers both ways (sharded too), head replacement, atomic
writes, every kind of bad input, and the `info` / `convert` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lmforge import cli
from lmforge.config import ModelConfig
from lmforge.io import (
    CheckpointError,
    describe_checkpoint,
    load_config,
    load_model,
    resolve_source,
    save_model,
)
from lmforge.io import hf as hf_io
from lmforge.io.gguf import load_gguf
from lmforge.models import build_model

# (preset, overrides) -> the transformers Auto class that must load what lmforge saves
ROUND_TRIPS = {
    "gpt2": ("tiny-gpt2", {}, tf.AutoModelForCausalLM, "GPT2LMHeadModel"),
    "llama": ("tiny-llama", {}, tf.AutoModelForCausalLM, "LlamaForCausalLM"),
    "llama-untied": ("tiny-llama", dict(tie_embeddings=False, n_kv_head=1), tf.AutoModelForCausalLM,
                     "LlamaForCausalLM"),
    "bert-mlm": ("tiny-bert", {}, tf.AutoModelForMaskedLM, "BertForMaskedLM"),
    "bert-classify": ("tiny-bert", dict(head="classify", n_labels=3), tf.AutoModelForSequenceClassification,
                      "BertForSequenceClassification"),
    "bert-base": ("tiny-bert", dict(head="none"), tf.AutoModel, "BertModel"),
    "distilbert-mlm": ("tiny-distilbert", {}, tf.AutoModelForMaskedLM, "DistilBertForMaskedLM"),
    "distilbert-classify": ("tiny-distilbert", dict(head="classify", n_labels=4),
                            tf.AutoModelForSequenceClassification, "DistilBertForSequenceClassification"),
    "roberta-mlm": ("tiny-roberta", {}, tf.AutoModelForMaskedLM, "RobertaForMaskedLM"),
    "roberta-classify": ("tiny-roberta", dict(head="classify"), tf.AutoModelForSequenceClassification,
                         "RobertaForSequenceClassification"),
}


def random_model(preset: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """An lmforge model with wide random weights (norm scales near 1), so outputs are O(1)."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_name(preset, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.3 * torch.randn_like(p))
    return model


def padded_batch(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids.masked_fill(mask == 0, config.pad_token_id or 0), mask


def real_outputs(out, mask: torch.Tensor) -> torch.Tensor:
    result = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return result[mask.bool()] if result.dim() == 3 else result


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_lmforge_save_loads_in_transformers(case: str, tmp_path: Path) -> None:
    preset, overrides, auto_cls, architecture = ROUND_TRIPS[case]
    model = random_model(preset, **overrides)
    save_model(model, tmp_path)
    reference = auto_cls.from_pretrained(tmp_path).eval()
    assert type(reference).__name__ == architecture
    ids, mask = padded_batch(model.config)
    with torch.no_grad():
        want = real_outputs(model(ids, attention_mask=mask), mask)
        got = real_outputs(reference(input_ids=ids, attention_mask=mask), mask)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # ... and lmforge reads back exactly what it wrote.
    again = load_model(tmp_path)
    assert again.config.head == model.config.head and again.config.n_labels == model.config.n_labels
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_sharded_save_round_trip(tmp_path: Path) -> None:
    model = random_model("tiny-llama", tie_embeddings=False)
    files = save_model(model, tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert {p.name for p in files} == {"config.json", "model.safetensors.index.json", *shards}
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    for shard in shards[:-1]:  # every shard but a lone oversized tensor stays under the limit
        assert (tmp_path / shard).stat().st_size < 20_000 + 2_000 or len(load_file(tmp_path / shard)) == 1
    ids, mask = padded_batch(model.config)
    reference = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    again = load_model(tmp_path)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(reference(input_ids=ids, attention_mask=mask).logits[mask.bool()], want,
                                   atol=1e-4, rtol=0)
        assert torch.equal(again(ids, attention_mask=mask).logits[mask.bool()], want)


def test_transformers_sharded_and_bin_checkpoints_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = tf.BertForMaskedLM(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, intermediate_size=48,
                                                 initializer_range=0.2)).eval()
    sharded, binary = tmp_path / "sharded", tmp_path / "bin"
    reference.save_pretrained(sharded, max_shard_size="30KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary.mkdir()
    (binary / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(reference.state_dict(), binary / "pytorch_model.bin")
    ids, mask = padded_batch(ModelConfig.from_name("tiny-bert", vocab_size=64))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        for folder in (sharded, binary):
            got = load_model(folder)(ids, attention_mask=mask).logits[mask.bool()]
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_bin_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    save_model(random_model("tiny-gpt2"), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({"weights": Path("not a tensor")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights-only"):
        load_model(tmp_path)


# --- heads -------------------------------------------------------------------------------------------------


def test_minilm_body_with_a_new_classifier(minilm_dir: Path) -> None:
    model = load_model("all-minilm-l6-v2", head="classify", n_labels=5)
    assert model.config.head == "classify" and model.cls_head.out.weight.shape == (5, 384)
    with safe_open(minilm_dir / "model.safetensors", "pt") as f:
        pooler = f.get_tensor("pooler.dense.weight")
    assert torch.equal(model.cls_head.dense.weight, pooler)  # as transformers does: the pooler is kept
    assert model.cls_head.out.weight.std() > 0.01 and torch.all(model.cls_head.out.bias == 0)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 102, 0]])
    logits = model(ids, attention_mask=(ids != 0).long()).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_new_number_of_labels_keeps_the_dense_layer(tmp_path: Path) -> None:
    model = random_model("tiny-bert", head="classify", n_labels=3)
    save_model(model, tmp_path)
    five = load_model(tmp_path, n_labels=5)
    assert torch.equal(five.cls_head.dense.weight, model.cls_head.dense.weight)
    assert five.cls_head.out.weight.shape == (5, 32)
    assert torch.equal(five.embed_tokens.weight, model.embed_tokens.weight)


def test_mlm_checkpoint_as_bare_body(tmp_path: Path) -> None:
    model = random_model("tiny-roberta")
    save_model(model, tmp_path)
    body = load_model(tmp_path, head="none")
    assert body.mlm_head is None and body.cls_head is None
    ids, mask = padded_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(body(ids, attention_mask=mask).last_hidden_state,
                                   model(ids, attention_mask=mask).last_hidden_state)


def test_head_arguments_are_checked(tmp_path: Path, smollm2_gguf: Path) -> None:
    save_model(random_model("tiny-gpt2"), tmp_path)
    with pytest.raises(ValueError, match="only has an 'lm' head"):
        load_model(tmp_path, head="classify")
    with pytest.raises(ValueError, match="GGUF decoder only has its language-model head"):
        load_model(smollm2_gguf, head="classify")
    save_model(random_model("tiny-bert"), tmp_path / "bert")
    with pytest.raises(ValueError, match="head must be"):
        load_model(tmp_path / "bert", head="pooler")
    with pytest.raises(ValueError, match="n_labels must be a positive integer"):
        load_model(tmp_path / "bert", head="classify", n_labels=0)


# --- sources, dtypes, writing ------------------------------------------------------------------------------


def test_resolve_source(tmp_path: Path, minilm_dir: Path) -> None:
    assert resolve_source("minilm") == minilm_dir == resolve_source("all-minilm-l6-v2")
    assert resolve_source(str(tmp_path)) == tmp_path
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*smollm2-135m-instruct.*all-minilm"):
        resolve_source("no-such-model")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        resolve_source(tmp_path / "weights.txt")
    with pytest.raises(TypeError, match="path or a name"):
        resolve_source(3)


def test_load_config(minilm_dir: Path, smollm2_gguf: Path) -> None:
    minilm = load_config("minilm")
    assert (minilm.family, minilm.head, minilm.n_layer, minilm.d_model) == ("bert", "none", 6, 384)
    smollm2 = load_config(smollm2_gguf)
    assert (smollm2.family, smollm2.n_kv_head, smollm2.vocab_size) == ("llama", 3, 49152)


def test_dtype_argument(tmp_path: Path) -> None:
    model = random_model("tiny-llama")
    save_model(model, tmp_path)
    half = load_model(tmp_path, dtype="bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert half.lm_head.weight is half.embed_tokens.weight  # still tied
    assert load_model(tmp_path, dtype=torch.float16).embed_tokens.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(tmp_path, dtype="int8")
    save_model(half, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path / "bf16").embed_tokens.weight.dtype == torch.bfloat16  # stored dtype kept


def test_save_rejects_what_transformers_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Decoder or Encoder"):
        save_model(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(ValueError, match=r"ModelConfig\.norm is 'rmsnorm'"):
        save_model(random_model("tiny-gpt2", norm="rmsnorm"), tmp_path)
    assert not any(tmp_path.iterdir())


def test_parse_size() -> None:
    assert hf_io.parse_size("2GB") == 2 * 10**9 and hf_io.parse_size("1KiB") == 1024
    assert hf_io.parse_size(512) == 512
    for bad in ("lots", 0, -3, "0MB", True):
        with pytest.raises(ValueError, match="max_shard_size"):
            hf_io.parse_size(bad)


def test_save_keeps_other_files_and_drops_stale_weights(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_model(random_model("tiny-gpt2"), folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    save_model(random_model("tiny-gpt2", seed=1), folder, max_shard_size="10KB")
    names = {p.name for p in folder.iterdir()}
    assert "tokenizer.json" in names and "model.safetensors" not in names and "pytorch_model.bin" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left behind
    assert folder.stat().st_mode & 0o055 == (0o755 & ~_umask()) & 0o055


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_interrupted_save_leaves_the_previous_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "model"
    save_model(random_model("tiny-gpt2"), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    calls = []

    def failing_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill while the second shard is written
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(hf_io, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(random_model("tiny-gpt2", seed=1), folder, max_shard_size="10KB")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpt2_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "gpt2"
    save_model(random_model("tiny-gpt2"), folder)
    return folder


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["T5Model"]), r"unsupported architecture 'T5Model'"),
    (dict(architectures=None, model_type="bart"), r"unknown model_type 'bart'"),
    (dict(model_type="llama"), r"model_type 'llama' does not match architecture 'GPT2LMHeadModel'"),
    (dict(n_embd="wide"), r"field 'n_embd' must be int, got 'wide'"),
    (dict(n_layer=None), r"required field 'n_layer' is missing"),
    (dict(activation_function="mish"), r"field 'activation_function' = 'mish' is not supported"),
    (dict(scale_attn_by_inverse_layer_idx=True), r"'scale_attn_by_inverse_layer_idx' = True is not "),
    (dict(n_head=5), r"config\.json: d_model \(32\) must be divisible by n_head \(5\)"),
])
def test_bad_config_fields(gpt2_folder: Path, changes: dict, message: str) -> None:
    _edit_config(gpt2_folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_model(gpt2_folder)
    with pytest.raises(CheckpointError, match="config.json"):
        load_config(gpt2_folder)


def test_missing_and_malformed_config(gpt2_folder: Path) -> None:
    (gpt2_folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: malformed JSON"):
        load_model(gpt2_folder)
    (gpt2_folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        load_model(gpt2_folder)
    (gpt2_folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(gpt2_folder)


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    save_model(random_model("tiny-llama"), tmp_path)
    _edit_config(tmp_path, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0})
    with pytest.raises(CheckpointError, match=r"rope type 'llama3'"):
        load_model(tmp_path)


def test_truncated_and_corrupt_safetensors(gpt2_folder: Path) -> None:
    weights = gpt2_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file.*truncated"):
        load_model(gpt2_folder)
    weights.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_model(gpt2_folder)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_model(gpt2_folder)


def _rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor(gpt2_folder: Path) -> None:
    _edit_config(gpt2_folder, vocab_size=100)
    with pytest.raises(CheckpointError, match=r"'transformer\.wte\.weight' has shape \(128, 32\), "
                                              r"expected \(100, 32\)"):
        load_model(gpt2_folder)


def test_missing_unexpected_and_harmless_tensors(gpt2_folder: Path) -> None:
    _rewrite_weights(gpt2_folder, lambda t: t.update({"transformer.h.0.attn.bias": torch.ones(1, 1, 64, 64)}))
    load_model(gpt2_folder)  # a causal-mask buffer from older checkpoints is ignored
    _rewrite_weights(gpt2_folder, lambda t: t.update({"transformer.h.0.adapter.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors 'transformer\.h\.0\.adapter\.weight'"):
        load_model(gpt2_folder)
    _rewrite_weights(gpt2_folder, lambda t: [t.pop("transformer.h.0.adapter.weight"),
                                             t.pop("transformer.h.1.ln_2.bias")])
    with pytest.raises(CheckpointError, match=r"missing tensors 'transformer\.h\.1\.ln_2\.bias'"):
        load_model(gpt2_folder)


def test_bad_shards(tmp_path: Path) -> None:
    save_model(random_model("tiny-gpt2"), tmp_path, max_shard_size="10KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    moved = tmp_path / "elsewhere.bin"
    (tmp_path / first).rename(moved)
    with pytest.raises(CheckpointError, match=rf"index\.json: lists shard '{first}', which does not exist"):
        load_model(tmp_path)
    moved.rename(tmp_path / first)
    tensors = load_file(tmp_path / first)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, tmp_path / first)
    with pytest.raises(CheckpointError, match=rf"{first}: lacks tensor '{dropped}'"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    with pytest.raises(CheckpointError, match="weight_map"):
        load_model(tmp_path)


def test_folder_without_weights(gpt2_folder: Path) -> None:
    (gpt2_folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights; expected model\.safetensors"):
        load_model(gpt2_folder)


# --- command line ------------------------------------------------------------------------------------------


def test_info_command(gpt2_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = load_model(gpt2_folder)
    assert cli.main(["info", str(gpt2_folder)]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in model.parameters())
    assert "GPT2LMHeadModel" in out and f"{params:,}" in out and "64 tokens" in out
    assert "model.safetensors" in out and "float32 when loaded; stored tensors: F32 x" in out
    d = describe_checkpoint(gpt2_folder)
    assert d["parameters"] == params and d["context_length"] == 64 and d["format"] == "hf-safetensors"


def test_info_on_real_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "minilm"]) == 0
    out = capsys.readouterr().out
    assert "BertModel" in out and "22,713,216" in out and "512 tokens" in out and "90.9 MB" in out
    assert cli.main(["info", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def bf16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every weight rounded to bfloat16 (and kept in float32): what a bf16 conversion must hold."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("source", ["minilm", "llama"])
def test_convert_hf_folder_to_bf16_loads_in_transformers(source: str, tmp_path: Path, minilm_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge convert --dtype bfloat16`: transformers loads the folder in bfloat16, and in float32 it gives the
    outputs of the original model with its weights rounded to bfloat16 (same config, every tensor carried)."""
    if source == "minilm":
        auto, src = tf.AutoModel, minilm_dir
    else:
        auto, src = tf.AutoModelForCausalLM, tmp_path / "llama"
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                           max_position_embeddings=64)).save_pretrained(src)
    dst = tmp_path / "bf16"
    assert cli.main(["convert", str(src), str(dst), "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (dst / "tokenizer.json").exists() == (source == "minilm")
    assert auto.from_pretrained(dst).dtype == torch.bfloat16
    converted = auto.from_pretrained(dst, dtype=torch.float32).eval()
    want = bf16_rounded(auto.from_pretrained(src, dtype=torch.float32)).eval()
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        got, ref = (m(input_ids=ids, attention_mask=mask) for m in (converted, want))
    got, ref = (o.logits if source == "llama" else o.last_hidden_state for o in (got, ref))
    real = mask.bool()
    assert ref[real].abs().max() > 0.1
    torch.testing.assert_close(got[real], ref[real], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_convert_gguf(tmp_path: Path, smollm2_gguf: Path) -> None:
    dst = tmp_path / "smollm2"
    assert cli.main(["convert", str(smollm2_gguf), str(dst), "--dtype", "bf16"]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in dst.iterdir()}
    converted = load_model(dst)
    config, tensors = load_gguf(smollm2_gguf)
    assert converted.config.n_kv_head == 3 and converted.config.tie_embeddings
    assert converted.config.rope_theta == config.rope_theta and converted.config.max_seq_len == 8192
    state = converted.state_dict()
    assert set(tensors) == set(state) - {"lm_head.weight"}
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor.to(torch.bfloat16)), name


_SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=66)
_DISTIL = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
# transformers' own classes, randomly initialised: the sources a convert must copy without losing anything
CONVERT_SOURCES = {
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4,
                                                       n_positions=64)),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_SMALL, num_key_value_heads=2)),
    "llama-untied": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_SMALL, num_key_value_heads=2,
                                                                 tie_word_embeddings=False)),
    "bert": (tf.BertModel, lambda: tf.BertConfig(**_SMALL)),  # with its pooler
    "bert-mlm": (tf.BertForMaskedLM, lambda: tf.BertConfig(**_SMALL)),
    "bert-classify": (tf.BertForSequenceClassification, lambda: tf.BertConfig(**_SMALL, num_labels=3)),
    "bert-regress": (tf.BertForSequenceClassification, lambda: tf.BertConfig(**_SMALL, num_labels=1)),
    "distilbert": (tf.DistilBertModel, lambda: tf.DistilBertConfig(**_DISTIL)),
    "distilbert-mlm": (tf.DistilBertForMaskedLM, lambda: tf.DistilBertConfig(**_DISTIL)),
    "distilbert-classify": (tf.DistilBertForSequenceClassification, lambda: tf.DistilBertConfig(**_DISTIL)),
    "roberta": (tf.RobertaModel, lambda: tf.RobertaConfig(**_SMALL)),
    "roberta-mlm": (tf.RobertaForMaskedLM, lambda: tf.RobertaConfig(**_SMALL)),
    "roberta-classify": (tf.RobertaForSequenceClassification, lambda: tf.RobertaConfig(**_SMALL)),
}


@pytest.mark.parametrize("case", list(CONVERT_SOURCES))
def test_convert_keeps_every_tensor(case: str, tmp_path: Path) -> None:
    """Every key and value transformers saved is in the converted folder, and transformers loading the
    converted folder finds nothing missing (a BERT / RoBERTa pooler included)."""
    cls, make_config = CONVERT_SOURCES[case]
    torch.manual_seed(0)
    cls(make_config()).save_pretrained(tmp_path / "src")
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "dst")]) == 0
    source = load_file(tmp_path / "src" / "model.safetensors")
    converted = load_file(tmp_path / "dst" / "model.safetensors")
    assert sorted(source) == sorted(converted)
    for name, tensor in source.items():
        assert torch.equal(converted[name], tensor), name
    _, info = cls.from_pretrained(tmp_path / "dst", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_convert_keeps_the_pooler_and_sentence_transformers_files(tmp_path: Path, minilm_dir: Path) -> None:
    dst = tmp_path / "minilm"
    assert cli.main(["convert", "minilm", str(dst)]) == 0
    source, converted = load_file(minilm_dir / "model.safetensors"), load_file(dst / "model.safetensors")
    # the one tensor not carried over is a constant buffer old transformers versions saved: 0, 1, ..., 511
    assert torch.equal(source.pop("embeddings.position_ids"), torch.arange(512)[None])
    assert "pooler.dense.weight" in converted and set(source) == set(converted)
    assert all(torch.equal(converted[name], source[name]) for name in source)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                 "1_Pooling/config.json"):
        assert (dst / name).read_bytes() == (minilm_dir / name).read_bytes(), name
    _, info = tf.AutoModel.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"]
    model = load_model(dst)
    reference = tf.AutoModel.from_pretrained(minilm_dir).eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():  # the pooled output as transformers computes it
        torch.testing.assert_close(model.pool(model(ids).last_hidden_state), reference(ids).pooler_output)
