"""ModelConfig: presets, derived fields and clear errors."""

import pytest

from lmforge.config import PRESETS, ModelConfig


def test_every_preset_builds_and_round_trips_through_a_dict():
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.head_dim * cfg.n_head == cfg.d_model or name == "flan-t5-small"  # T5's d_kv is its own


def test_t5_presets_have_the_published_shapes():
    small, flan = ModelConfig.from_name("t5-small"), ModelConfig.from_name("flan-t5-small")
    assert (small.n_layer, small.n_decoder_layers, small.d_model, small.n_head, small.head_dim, small.d_ff,
            small.vocab_size) == (6, 6, 512, 8, 64, 2048, 32128)
    assert small.tie_embeddings and small.scaled_head and small.activation == "relu" and not small.gated_mlp
    assert (flan.n_layer, flan.n_decoder_layers, flan.n_head, flan.head_dim, flan.d_ff) == (8, 8, 6, 64, 1024)
    assert not flan.tie_embeddings and not flan.scaled_head and flan.gated_mlp and flan.activation == "gelu_tanh"


def test_smollm2_preset_matches_the_published_shape():
    cfg = ModelConfig.from_name("smollm2-135m")
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.head_dim == 64 and cfg.tie_embeddings and cfg.position == "rotary"


def test_overrides_and_replace():
    cfg = ModelConfig.from_name("gpt2", n_layer=3)
    assert cfg.n_layer == 3
    wider = cfg.replace(d_model=96, n_head=3)
    assert wider.head_dim == 32 and wider.n_kv_head == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(d_model=30, n_head=4), "divisible"),
        (dict(n_head=4, n_kv_head=3), "multiple of n_kv_head"),
        (dict(n_layer=0), "n_layer"),
        (dict(arch="seq2seq"), "arch"),
        (dict(head="regression"), "head"),
    ],
)
def test_bad_fields_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_name("tiny-gpt2", **changes)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="known presets: .*distilgpt2"):
        ModelConfig.from_name("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"n_layers": 2})
