"""Tokenizer parity with transformers (GPT-2, SmolLM2 from GGUF, MiniLM) on real BBC text, plus batching, chat
templates, streaming and errors. transformers and tiktoken are references only."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.tokenizer import (
    GGUF_CONTROL,
    GPT2_EOT,
    IncrementalDecoder,
    Tokenizer,
    bytes_to_unicode,
    convert_gpt2_tiktoken,
    read_tiktoken_ranks,
    recover_merges,
    stream_decode,
)

N_SENTENCES = 3000
# Text that byte-level BPE splits inside characters: emoji (4 bytes), ZWJ sequences, CJK, accents, symbols.
HARD_TEXT = ("Café déjà vu 😀👍🏽 family: 👨‍👩‍👧 日本語のテキスト 中文 한국어 Ελληνικά русский "
             "naïve — “quotes” ½ ² €5 🇬🇧\n\n  indented\ttab 🦄🦄🦄")


def _bbc_texts(bbc_dir: Path) -> list[str]:
    """Every BBC document as text (one file of the corpus is not UTF-8: read as Latin-1)."""
    texts = []
    for path in sorted(bbc_dir.glob("*/*.txt")):
        raw = path.read_bytes()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(raw.decode("latin-1"))
    return texts


@pytest.fixture(scope="session")
def bbc_documents(bbc_dir: Path) -> list[str]:
    return _bbc_texts(bbc_dir)


@pytest.fixture(scope="session")
def sentences(bbc_documents: list[str]) -> list[str]:
    """N_SENTENCES real sentences spread over the whole corpus (every class), plus a few hard strings."""
    every = [s for doc in bbc_documents for para in doc.split("\n") for s in re.split(r"(?<=[.!?])\s+", para)
             if s.strip()]
    step = len(every) // N_SENTENCES
    assert step >= 1, f"only {len(every)} sentences in the BBC corpus"
    extra = [HARD_TEXT, " leading space", "trailing  ", "a\n\nb", "1234567 3.14159"]
    return every[::step][:N_SENTENCES] + extra


@pytest.fixture(scope="session")
def parity_texts(sentences: list[str], bbc_documents: list[str]) -> list[str]:
    """The sentences plus every 50th whole document (titles, blank lines, long paragraphs)."""
    return sentences + bbc_documents[::50]


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gpt2_tiktoken(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def gpt2(gpt2_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(gpt2_dir)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf, cache=False)  # always the real builder, never a cached copy


@pytest.fixture(scope="session")
def minilm(minilm_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(minilm_dir)


@pytest.fixture(scope="session")
def hf_gpt2(gpt2_dir: Path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(gpt2_dir)  # reads the converted vocab.json + merges.txt


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


def _assert_same_ids(ours: Tokenizer, hf, texts: list[str], add_special_tokens: bool) -> None:
    expected = hf(texts, add_special_tokens=add_special_tokens)["input_ids"]
    for text, want in zip(texts, expected, strict=True):
        assert ours.encode(text, add_special_tokens=add_special_tokens) == want, text


# --- GPT-2: the tiktoken conversion and parity --------------------------------------------------------------


def test_gpt2_conversion_reproduces_tiktoken(gpt2_tiktoken: Path, gpt2_dir: Path, gpt2: Tokenizer,
                                             sentences: list[str]) -> None:
    import tiktoken

    ranks = read_tiktoken_ranks(gpt2_tiktoken)
    assert len(ranks) == 50256
    vocab = json.loads((gpt2_dir / "vocab.json").read_text(encoding="utf-8"))
    spell = bytes_to_unicode()
    for token in (b"!", b" the", b"Hello", b" world", b"\n\n", b" Hello", b"ing", bytes([0xE6])):
        assert vocab["".join(spell[b] for b in token)] == ranks[token]
    assert vocab[GPT2_EOT] == 50256 and gpt2.vocab_size == 50257
    merges = (gpt2_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) - 1 == 50000 == len(ranks) - 256
    assert merges[1:4] == ["Ġ t", "Ġ a", "h e"]  # GPT-2's first merges
    # Known GPT-2 ids (transformers' GPT2Tokenizer documentation).
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.encode(" Hello world") == [18435, 995]
    # tiktoken's own encoder over the same ranks, with GPT-2's split pattern, agrees on every sentence.
    reference = tiktoken.Encoding(
        name="gpt2-test",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks, special_tokens={GPT2_EOT: 50256})
    for text in sentences:
        assert gpt2.encode(text) == reference.encode_ordinary(text), text
    assert gpt2.encode(f"a{GPT2_EOT}b") == reference.encode(f"a{GPT2_EOT}b", allowed_special="all")


def test_recover_merges_closed_form() -> None:
    # A 4-token toy: "ab" (rank 3) then "abc" (rank 4) = ("ab", "c"); "ab" must come first.
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4}
    assert recover_merges(ranks) == [(b"a", b"b"), (b"ab", b"c")]
    with pytest.raises(ValueError, match="rank 3"):
        recover_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


def test_gpt2_ids_match_transformers(gpt2: Tokenizer, hf_gpt2, parity_texts: list[str]) -> None:
    texts = [*parity_texts, f"end{GPT2_EOT}start", f"{GPT2_EOT}"]
    _assert_same_ids(gpt2, hf_gpt2, texts, add_special_tokens=True)
    _assert_same_ids(gpt2, hf_gpt2, texts, add_special_tokens=False)
    assert (gpt2.bos_token, gpt2.eos_token, gpt2.unk_token) == (hf_gpt2.bos_token, hf_gpt2.eos_token,
                                                                 hf_gpt2.unk_token)


def test_from_name_gpt2_converts_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     gpt2: Tokenizer) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    tok = Tokenizer.from_name("gpt2")
    folder = tmp_path / "tokenizers" / "gpt2"
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    stamp = (folder / "merges.txt").stat().st_mtime_ns
    assert tok.encode("Hello world") == [15496, 995]
    assert Tokenizer.from_name("distilgpt2").encode("Hello world") == [15496, 995]
    assert (folder / "merges.txt").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert tok.encode(HARD_TEXT) == gpt2.encode(HARD_TEXT)


def test_conversion_script(tmp_path: Path, gpt2_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("convert_script", Path(__file__).parents[1] / "scripts" /
                                                  "convert_gpt2_tiktoken.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "out")]) == 0
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (gpt2_dir / name).read_bytes()


def test_failed_conversion_keeps_previous_files(tmp_path: Path, gpt2_tiktoken: Path) -> None:
    out = tmp_path / "gpt2"
    out.mkdir()
    (out / "vocab.json").write_text("previous")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text(gpt2_tiktoken.read_text(encoding="ascii")[:5000] + "\nnot-base64!! x\n")
    with pytest.raises(ValueError, match=r"bad\.tiktoken:\d+"):
        convert_gpt2_tiktoken(out, bad)
    assert (out / "vocab.json").read_text() == "previous"
    assert sorted(p.name for p in out.iterdir()) == ["vocab.json"]  # no temporary files left behind


# --- SmolLM2 (GGUF) and MiniLM (folder) parity --------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_ids_match_transformers(smollm2: Tokenizer, hf_smollm2, parity_texts: list[str]) -> None:
    texts = [*parity_texts, "<|im_start|>user\nHi<|im_end|>", "x<|endoftext|>y <repo_name>z"]
    _assert_same_ids(smollm2, hf_smollm2, texts, add_special_tokens=True)
    _assert_same_ids(smollm2, hf_smollm2, texts, add_special_tokens=False)
    assert smollm2.vocab_size == len(hf_smollm2) == 49152
    for role in ("bos", "eos", "pad", "unk"):
        assert getattr(smollm2, f"{role}_token") == getattr(hf_smollm2, f"{role}_token")
        assert getattr(smollm2, f"{role}_token_id") == getattr(hf_smollm2, f"{role}_token_id")
    assert smollm2.all_special_ids == list(range(17))  # the 17 control tokens of the GGUF


def test_minilm_ids_match_transformers(minilm: Tokenizer, hf_minilm, parity_texts: list[str]) -> None:
    _assert_same_ids(minilm, hf_minilm, parity_texts, add_special_tokens=True)
    _assert_same_ids(minilm, hf_minilm, parity_texts, add_special_tokens=False)
    assert (minilm.pad_token_id, minilm.unk_token_id, minilm.mask_token_id) == (0, 100, 103)
    assert minilm.encode("Hello")[0] == 101 and minilm.encode("Hello")[-1] == 102  # [CLS] ... [SEP]


def test_wordpiece_from_vocab_txt_matches_transformers(minilm_dir: Path, tmp_path: Path,
                                                       sentences: list[str]) -> None:
    from transformers import BertTokenizer

    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    ours = Tokenizer.from_dir(tmp_path)  # no tokenizer.json: built from vocab.txt + do_lower_case
    hf = BertTokenizer.from_pretrained(tmp_path)
    _assert_same_ids(ours, hf, sentences[:500], add_special_tokens=True)
    assert ours.decode(ours.encode("Hello, World!"), skip_special_tokens=True) == "hello, world!"


def test_decode_round_trip(gpt2: Tokenizer, smollm2: Tokenizer, minilm: Tokenizer, hf_minilm, hf_smollm2,
                           bbc_documents: list[str], sentences: list[str]) -> None:
    for tok in (gpt2, smollm2):  # byte-level BPE is lossless
        for text in [*sentences, *bbc_documents[:20]]:
            assert tok.decode(tok.encode(text)) == text
    ids = smollm2.encode_chat([{"role": "user", "content": "Hi"}])
    assert smollm2.decode(ids, skip_special_tokens=True) == hf_smollm2.decode(ids, skip_special_tokens=True)
    batch = [minilm.encode(s) for s in sentences[:300]]
    assert minilm.decode_batch(batch) == hf_minilm.batch_decode(batch)
    assert minilm.decode_batch(batch, True) == hf_minilm.batch_decode(batch, skip_special_tokens=True)
    assert minilm.decode(torch.tensor(batch[0])) == minilm.decode(batch[0])


# --- batches ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(side: str, smollm2: Tokenizer, hf_smollm2, minilm: Tokenizer,
                                            hf_minilm, sentences: list[str]) -> None:
    texts = sentences[:16]
    for ours, hf in ((smollm2, hf_smollm2), (minilm, hf_minilm)):
        hf.padding_side = side
        want = hf(texts, padding=True, return_tensors="pt")
        got = ours.encode_batch(texts, padding_side=side)
        assert got.input_ids.dtype == torch.long and got.input_ids.shape == want["input_ids"].shape
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got.attention_mask, want["attention_mask"])
        want = hf(texts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
        got = ours.encode_batch(texts, padding_side=side, truncation=True, max_length=12)
        assert torch.equal(got.input_ids, want["input_ids"])
        assert torch.equal(got.attention_mask, want["attention_mask"])


def test_batch_padding_layout(gpt2: Tokenizer) -> None:
    short, long = gpt2.encode("Hi"), gpt2.encode("A much longer sentence than that")
    left = gpt2.encode_batch(["Hi", "A much longer sentence than that"])  # GPT-2 pads with <|endoftext|>
    pad = len(long) - len(short)
    assert left.input_ids.tolist() == [[50256] * pad + short, long]
    assert left.attention_mask.tolist() == [[0] * pad + [1] * len(short), [1] * len(long)]
    right = gpt2.encode_batch(["Hi", "A much longer sentence than that"], padding_side="right",
                              return_tensors=False)
    assert right.input_ids == [short + [50256] * pad, long]
    assert right.attention_mask == [[1] * len(short) + [0] * pad, [1] * len(long)]
    texts = gpt2.decode_batch(left.input_ids, skip_special_tokens=True)
    assert texts == ["Hi", "A much longer sentence than that"]


# --- chat templates -----------------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Tell me a joke 😀"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(smollm2: Tokenizer, hf_smollm2,
                                            add_generation_prompt: bool) -> None:
    prompt = add_generation_prompt
    for chat in CHATS:
        want = hf_smollm2.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
        assert smollm2.apply_chat_template(chat, add_generation_prompt=prompt) == want
        want_ids = hf_smollm2.apply_chat_template(chat, tokenize=True, add_generation_prompt=prompt)
        want_ids = want_ids["input_ids"] if not isinstance(want_ids, list) else want_ids
        assert smollm2.encode_chat(chat, add_generation_prompt=prompt) == want_ids


def test_chat_template_from_folder_and_save_round_trip(smollm2: Tokenizer, tmp_path: Path,
                                                       sentences: list[str]) -> None:
    from transformers import AutoTokenizer

    smollm2.save(tmp_path)
    # as `lmforge convert` writes it: next to a Llama config.json, which must not change how it is read
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 49152}))
    ours = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for text in sentences[:200]:
        assert ours.encode(text) == smollm2.encode(text) == hf(text)["input_ids"]
    assert ours.apply_chat_template(CHATS[1]) == smollm2.apply_chat_template(CHATS[1])
    assert hf.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == \
        smollm2.apply_chat_template(CHATS[1])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)


def test_chat_template_helpers(minilm_dir: Path, tmp_path: Path) -> None:
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm_dir / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
        "{{ raise_exception('bad role ' + m.role) }}{% endif %}"
        "{{ m.role }}: {{ m.content | tojson }}{{ sep_token }}{% endfor %}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hé"}]) == 'user: "hé"[SEP]'
    with pytest.raises(ValueError, match="bad role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ValueError, match="invalid chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


# --- streaming ----------------------------------------------------------------------------------------------


def test_stream_decode_never_breaks_characters(gpt2: Tokenizer, smollm2: Tokenizer,
                                               sentences: list[str]) -> None:
    for tok in (gpt2, smollm2):
        for text in [HARD_TEXT, *sentences[:200]]:
            ids = tok.encode(text)
            decoder, pieces, held = IncrementalDecoder(tok), [], 0
            for token_id in ids:
                piece = decoder.step(token_id)
                held += piece == "" and "\ufffd" in tok.decode([token_id])
                assert "\ufffd" not in piece
                pieces.append(piece)
            pieces.append(decoder.flush())
            assert "".join(pieces) == tok.decode(ids) == text
            assert list(stream_decode(tok, ids)) == [p for p in pieces if p]
            if text == HARD_TEXT:
                assert held > 0  # the test really splits characters across tokens


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40))
def test_stream_decode_property_any_text(gpt2: Tokenizer, text: str) -> None:
    pieces = list(stream_decode(gpt2, gpt2.encode(text)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(min_value=0, max_value=50256), min_size=1, max_size=30))
def test_stream_decode_property_any_ids(gpt2: Tokenizer, ids: list[int]) -> None:
    decoder = IncrementalDecoder(gpt2)
    pieces = [decoder.step(i) for i in ids]
    assert all(not piece.endswith("\ufffd") for piece in pieces)  # a possibly unfinished character is held
    assert "".join(pieces) + decoder.flush() == gpt2.decode(ids)


def test_stream_decode_flushes_an_unfinished_character(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("ok 🦄")
    cut = next(i for i in range(1, len(ids)) if smollm2.decode(ids[:i]).endswith("\ufffd"))
    pieces = list(stream_decode(smollm2, ids[:cut]))
    assert "".join(pieces) == smollm2.decode(ids[:cut]) and pieces[-1].endswith("\ufffd")
    assert "".join(stream_decode(smollm2, ids, skip_special_tokens=True)) == "ok 🦄"


# --- construction by source, errors -------------------------------------------------------------------------


@pytest.mark.slow
def test_for_model_accepts_folder_gguf_and_name(smollm2_gguf: Path, minilm_dir: Path, smollm2: Tokenizer,
                                                minilm: Tokenizer, sentences: list[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    built = Tokenizer.for_model(smollm2_gguf)  # parses the GGUF, then caches an HF folder
    assert len(list((tmp_path / "tokenizers").glob("gguf-SmolLM2-135M-Instruct.Q4_1-*/tokenizer.json"))) == 1
    cached = Tokenizer.for_model(str(smollm2_gguf))  # loads the cached folder
    assert built.source == cached.source == str(smollm2_gguf)
    for text in [HARD_TEXT, "<|im_start|>x<|im_end|>", *sentences[:300]]:
        assert built.encode(text) == cached.encode(text) == smollm2.encode(text)
    assert cached.all_special_ids == smollm2.all_special_ids
    assert cached.special_tokens == smollm2.special_tokens and cached.chat_template == smollm2.chat_template
    text = "The quick brown fox."
    assert Tokenizer.for_model(str(minilm_dir)).encode(text) == minilm.encode(text)
    assert Tokenizer.for_model("all-minilm-l6-v2").encode(text) == minilm.encode(text)
    assert Tokenizer.for_model("minilm").encode(text) == minilm.encode(text)


def test_errors_name_the_bad_input(minilm: Tokenizer, smollm2: Tokenizer, tmp_path: Path,
                                   smollm2_gguf: Path) -> None:
    with pytest.raises(ValueError, match="empty text"):
        minilm.encode("")
    with pytest.raises(TypeError, match="expected a string"):
        minilm.encode(None)
    with pytest.raises(ValueError, match="non-empty list"):
        minilm.encode_batch([])
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        minilm.encode_batch(["fine", ""])
    with pytest.raises(ValueError, match=r"texts\[0\] has \d+ tokens > max_length=4"):
        minilm.encode_batch(["a sentence that is too long"], max_length=4)
    with pytest.raises(ValueError, match="padding_side"):
        minilm.encode_batch(["x"], padding_side="middle")
    for bad in (-1, 30522, 10**9):
        with pytest.raises(ValueError, match=rf"token id {bad} at position 1 is out of range.*0\.\.30521"):
            minilm.decode([101, bad])
    with pytest.raises(ValueError, match="out of range"):
        minilm.decode_batch([[101], [30522]])
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDecoder(minilm).step(-5)
    with pytest.raises(ValueError, match="has no chat template"):
        minilm.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        smollm2.apply_chat_template([{"content": "no role"}])
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        Tokenizer.from_dir(tmp_path / "missing")
    looked_for = rf"{re.escape(str(tmp_path))}.*tokenizer\.json.*merges\.txt.*vocab\.txt"
    with pytest.raises(FileNotFoundError, match=looked_for):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model folder or GGUF file"):
        Tokenizer.for_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="unknown tokenizer name 'gpt5'.*gpt2"):
        Tokenizer.from_name("gpt5")
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as f:
        truncated.write_bytes(f.read(200_000))
    with pytest.raises(ValueError, match=r"truncated\.gguf: not a readable GGUF file"):
        Tokenizer.from_gguf(truncated)


def _write_gguf(path: Path, model: str = "gpt2", pre: str = "llama-bpe", with_tokens: bool = True) -> None:
    """A tiny byte-level GGUF tokenizer: 256 byte tokens, merges "a b" and "ab c", two control tokens."""
    import gguf

    spell = bytes_to_unicode()
    tokens = ["<s>", "</s>", *spell.values(), "ab", "abc"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    if with_tokens:
        writer.add_token_list(tokens)
        writer.add_token_types([GGUF_CONTROL, GGUF_CONTROL] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_builder_on_a_synthetic_file(tmp_path: Path) -> None:
    _write_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_gguf(tmp_path / "tiny.gguf", cache=False)
    abc, c = tok.token_to_id("abc"), tok.token_to_id("c")
    assert tok.encode("abc abcc") == [0, abc, tok.token_to_id("Ġ"), abc, c]  # add_bos_token: <s> first
    assert tok.encode("abc", add_special_tokens=False) == [abc]
    assert tok.encode("</s>abc", add_special_tokens=False) == [1, abc]  # control tokens stay whole
    assert tok.decode(tok.encode("abc abcc"), skip_special_tokens=True) == "abc abcc"
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model": "llama"}, r"tokenizer\.ggml\.model is 'llama'"),
    ({"pre": "mystery"}, r"unsupported tokenizer\.ggml\.pre 'mystery'"),
    ({"with_tokens": False}, r"no 'tokenizer\.ggml\.tokens'"),
])
def test_gguf_metadata_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    _write_gguf(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ValueError, match=rf"bad\.gguf: .*{message}"):
        Tokenizer.from_gguf(tmp_path / "bad.gguf", cache=False)


PAIRS = [("The cat sat on the mat.", "A dog ran far away from home today."),
         ("Shares in the company rose sharply after the results were published on Monday", "Markets fell."),
         ("Hi", "there")]


@pytest.mark.parametrize("max_length", [None, 24, 12, 7])
def test_bert_sentence_pairs_match_transformers(minilm_dir: Path, max_length: int | None) -> None:
    """[CLS] A [SEP] B [SEP] with token types 0 / 1, cut longest-first: as BertTokenizerFast."""
    import transformers

    reference = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    ours = Tokenizer.for_model(minilm_dir)
    for a, b in PAIRS:
        want = reference(a, b, truncation=max_length is not None, max_length=max_length)
        assert ours.encode_pair(a, b, max_length) == (want["input_ids"], want["token_type_ids"])


def test_roberta_sentence_pairs_match_transformers(tmp_path: Path, gpt2_tiktoken: Path) -> None:
    """<s> A </s></s> B </s>, cut longest-first: as RobertaTokenizerFast (GPT-2's BPE ranks as its vocabulary)."""
    import transformers

    folder = convert_gpt2_tiktoken(tmp_path / "gpt2", gpt2_tiktoken)
    reference = transformers.RobertaTokenizerFast(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    reference.save_pretrained(tmp_path / "roberta")
    ours = Tokenizer.from_dir(tmp_path / "roberta")
    for max_length in (None, 9):
        for a, b in PAIRS:
            want = reference(a, b, truncation=max_length is not None, max_length=max_length)["input_ids"]
            ids, types = ours.encode_pair(a, b, max_length)
            assert ids == want and set(types) == {0}
    with pytest.raises(ValueError, match="leaves no room for both texts"):
        ours.encode_pair("a", "b", 4)
