"""Training objectives: what the one training loop optimises, and what evaluation measures.

The protocol (any object with these four methods is an objective; the loop never knows which one runs):

- `objective(model, batch) -> (loss, metrics)`: loss is a scalar Tensor, the mean over the batch's own loss
  terms (tokens or examples), with gradient; metrics is a dict of detached 0-dim tensors or floats (means over
  the same terms), logged by the loop. Called inside the loop's autocast context.
- `objective.n_targets(batch) -> int`: how many loss terms the batch holds (computed on the CPU batch). The
  loop weights micro-batches by it, so k accumulated micro-batches give exactly the gradient of one k-times
  batch.
- `objective.eval_stats(model, batch) -> dict[str, Tensor]`: additive statistics of one batch (sums and
  counts, a confusion matrix, ...), so that batches and ranks combine by summation (an all-reduce).
- `objective.summarize(stats) -> dict[str, float]`: the metrics (loss, perplexity, accuracy, macro-F1, ...)
  from summed statistics.
- optionally `objective.concat_stats`: names of `eval_stats` entries that are concatenated along dim 0 over
  batches and ranks instead of summed (rank correlations need every prediction).

Batches are dicts of tensors: "input_ids" (B, T), optionally "attention_mask" and "token_type_ids" (B, T) and
"labels" ((B, T) token ids with IGNORE_INDEX for skipped positions, (B,) class ids, or (B,) float scores).
Sequence-to-sequence batches (`Seq2SeqLM`) hold the encoder's "input_ids" and "attention_mask" (B, S) and the
decoder's target ids "labels" (B, T), IGNORE_INDEX after each target's end.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmforge.data import IGNORE_INDEX, DataWarning
from lmforge.metrics import classification_metrics, confusion_matrix, macro_f1, regression_metrics
from lmforge.models.seq2seq import shift_right

__all__ = ["CausalLM", "Classification", "MaskedLM", "Regression", "Seq2SeqLM", "confusion_matrix", "macro_f1",
           "model_inputs"]

Batch = dict[str, Tensor]


def model_inputs(batch: Batch) -> dict[str, Tensor]:
    """The keyword inputs of a batch besides input_ids: attention_mask and token_type_ids when present."""
    return {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}


def _forward(model: nn.Module, batch: Batch) -> Tensor:
    """Logits of `model` on a batch: the model gets input_ids and, when present, attention_mask and
    token_type_ids (sentence pairs)."""
    out = model(batch["input_ids"], **model_inputs(batch))
    if out.logits is None:
        raise ValueError("the model has no output head (config.head='none'); an objective needs logits")
    return out.logits


class CausalLM:
    """Next-token prediction: cross-entropy of logits[:, t] against input_ids[:, t + 1].

    Padding (attention_mask 0) and positions whose "labels" are IGNORE_INDEX are skipped; without "labels" the
    targets are the input ids themselves.
    """

    name = "clm"

    @staticmethod
    def targets(batch: Batch) -> Tensor:
        """Targets (B, T) for the logits at every position: the next token, IGNORE_INDEX at the last position
        (aligning targets rather than slicing the logits spares a copy of the (B, T, V) logits)."""
        labels = batch.get("labels", batch["input_ids"])
        if labels.dim() != 2:
            raise ValueError(f"causal LM labels must be (batch, seq), got shape {tuple(labels.shape)}")
        targets = labels.new_full(labels.shape, IGNORE_INDEX)
        targets[:, :-1] = labels[:, 1:]
        if "attention_mask" in batch:
            targets[:, :-1].masked_fill_(batch["attention_mask"][:, 1:] == 0, IGNORE_INDEX)
        return targets

    def n_targets(self, batch: Batch) -> int:
        if "labels" not in batch and "attention_mask" not in batch:
            B, T = batch["input_ids"].shape
            return B * (T - 1)
        return int(self.targets(batch).ne(IGNORE_INDEX).sum())

    def _loss_sum(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = _forward(model, batch)  # (B, T, V)
        targets = self.targets(batch)  # (B, T)
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
        return loss_sum, targets.ne(IGNORE_INDEX).sum()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss_sum, count = self._loss_sum(model, batch)
        loss = loss_sum / count.clamp(min=1)
        return loss, {"loss": loss.detach()}

    def eval_stats(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        loss_sum, count = self._loss_sum(model, batch)
        return {"loss_sum": loss_sum.detach().double(), "count": count.double()}

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """loss (mean per target token) and perplexity = exp(loss)."""
        loss = float(stats["loss_sum"] / stats["count"].clamp(min=1))
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(stats["count"])}


class MaskedLM:
    """Masked-token prediction: cross-entropy at positions whose "labels" are not IGNORE_INDEX.

    Batches come from `lmforge.data.MaskedBlocks` (masking is data, so that it is seeded per item and epoch).
    """

    name = "mlm"

    def n_targets(self, batch: Batch) -> int:
        return int(batch["labels"].ne(IGNORE_INDEX).sum())

    def _stats(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        if "labels" not in batch:
            raise ValueError("a masked-LM batch needs 'labels' (use lmforge.data.MaskedBlocks)")
        return _token_stats(_forward(model, batch), batch["labels"])

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss_sum, count, correct = self._stats(model, batch)
        n = count.clamp(min=1)
        loss = loss_sum / n
        return loss, {"loss": loss.detach(), "accuracy": correct.double() / n}

    def eval_stats(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        loss_sum, count, correct = self._stats(model, batch)
        return {"loss_sum": loss_sum.detach().double(), "count": count.double(), "correct": correct.double()}

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """loss and perplexity over masked tokens, and masked-token accuracy."""
        return _token_summary(stats)


def _token_stats(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(summed cross-entropy, number of targets, number predicted right) of logits (B, T, V) against labels
    (B, T), positions with IGNORE_INDEX skipped; the cross-entropy is computed in fp32."""
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    valid = labels.ne(IGNORE_INDEX)
    predicted = logits.argmax(-1)
    if isinstance(predicted, DTensor):  # vocabulary-parallel logits (tensor parallelism): every rank's ids
        predicted = predicted.full_tensor()
    correct = (predicted.eq(labels) & valid).sum()
    return loss_sum, valid.sum(), correct


def _token_summary(stats: dict[str, Tensor]) -> dict[str, float]:
    """loss and perplexity per target token and the share of targets predicted right (argmax)."""
    n = stats["count"].clamp(min=1)
    loss = float(stats["loss_sum"] / n)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": float(stats["correct"] / n),
            "tokens": int(stats["count"])}


class Classification:
    """Sequence classification: cross-entropy of (B, n_labels) logits against "labels" (B,)."""

    name = "classify"

    def __init__(self, n_labels: int):
        if n_labels < 2:
            raise ValueError(f"classification needs at least 2 labels, got {n_labels}")
        self.n_labels = n_labels

    def n_targets(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])

    def _logits(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = _forward(model, batch)
        if logits.dim() != 2 or logits.shape[1] != self.n_labels:
            raise ValueError(f"classifier logits must be (B, {self.n_labels}), got {tuple(logits.shape)}: "
                             f"is the model built with head='classify' and n_labels={self.n_labels}?")
        return logits.float()

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self._logits(model, batch)  # (B, L)
        loss = F.cross_entropy(logits, batch["labels"])
        accuracy = logits.argmax(-1).eq(batch["labels"]).double().mean()
        return loss, {"loss": loss.detach(), "accuracy": accuracy}

    def eval_stats(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        logits = self._logits(model, batch)
        loss_sum = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return {"loss_sum": loss_sum.detach().double(),
                "confusion": confusion_matrix(batch["labels"], logits.argmax(-1), self.n_labels).double()}

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """loss, accuracy, macro-F1, Matthews correlation and, with two labels, binary F1 (see
        `lmforge.metrics`). Warns (DataWarning) when some label never occurs in the evaluated examples."""
        confusion = stats["confusion"]
        n = confusion.sum().clamp(min=1)
        absent = [i for i, count in enumerate(confusion.sum(1).tolist()) if count == 0]
        if absent and confusion.sum() > 0:
            warnings.warn(f"the evaluation set has no example of label(s) {absent} of {self.n_labels}; "
                          f"their F1 counts as 0 where predicted and the scores are over the labels present",
                          DataWarning, stacklevel=2)
        return {"loss": float(stats["loss_sum"] / n), **classification_metrics(confusion),
                "examples": int(confusion.sum())}


class Regression:
    """Regression on one score per example: mean squared error of (B, 1) outputs against float "labels" (B,).

    Evaluation reports mse (= loss), Pearson and Spearman correlation (see `lmforge.metrics`)."""

    name = "regress"
    concat_stats = ("pairs",)

    def n_targets(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])

    def _scores(self, model: nn.Module, batch: Batch) -> Tensor:
        logits = _forward(model, batch)
        if logits.dim() != 2 or logits.shape[1] != 1:
            raise ValueError(f"a regressor's outputs must be (B, 1), got {tuple(logits.shape)}: is the model "
                             f"built with head='classify' and n_labels=1?")
        return logits.float().squeeze(1)  # (B,)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.mse_loss(self._scores(model, batch), batch["labels"].float())
        return loss, {"loss": loss.detach()}

    def eval_stats(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        scores, labels = self._scores(model, batch), batch["labels"].float()
        return {"loss_sum": F.mse_loss(scores, labels, reduction="sum").detach().double(),
                "pairs": torch.stack([scores.detach(), labels], dim=1).double()}  # (B, 2)

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        pairs = stats["pairs"]
        n = pairs.shape[0]
        return {"loss": float(stats["loss_sum"]) / max(n, 1), **regression_metrics(pairs[:, 0], pairs[:, 1]),
                "examples": n}


class Seq2SeqLM:
    """Sequence-to-sequence cross-entropy (T5): the decoder predicts labels[:, t] from the encoded input and
    labels[:, :t], teacher-forced; positions whose label is IGNORE_INDEX are skipped.

    The model is called as `model(input_ids, attention_mask=..., decoder_input_ids=shift_right(labels),
    decoder_attention_mask=labels != IGNORE_INDEX)` and returns logits (B, T, V) (or an output whose .logits
    they are). decoder_start_id and pad_id come from the model's config (T5: both 0).
    """

    name = "seq2seq"

    def __init__(self, decoder_start_id: int = 0, pad_id: int = 0):
        self.decoder_start_id, self.pad_id = decoder_start_id, pad_id

    def model_kwargs(self, batch: Batch) -> dict[str, Tensor]:
        """The keyword inputs of the model besides input_ids: encoder mask, decoder inputs and mask."""
        if "labels" not in batch:
            raise ValueError("a sequence-to-sequence batch needs 'labels' (the target ids, IGNORE_INDEX after "
                             "the end)")
        labels = batch["labels"]
        kwargs = {"decoder_input_ids": shift_right(labels, self.decoder_start_id, self.pad_id),
                  "decoder_attention_mask": labels.ne(IGNORE_INDEX).long()}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        return kwargs

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        """The decoder's logits (B, T, V) for the batch's targets, teacher-forced."""
        out = model(batch["input_ids"], **self.model_kwargs(batch))
        logits = getattr(out, "logits", out)
        expected = tuple(batch["labels"].shape)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != expected:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"a sequence-to-sequence model must return decoder logits (B, T, V) with (B, T) = "
                             f"{expected}, the labels' shape; got {shape}: is it an encoder-decoder model?")
        return logits

    def n_targets(self, batch: Batch) -> int:
        return int(batch["labels"].ne(IGNORE_INDEX).sum())

    def loss(self, logits: Tensor, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean token cross-entropy, metrics) of decoder logits (B, T, V) already computed for the batch."""
        loss_sum, count, correct = _token_stats(logits, batch["labels"])
        n = count.clamp(min=1)
        loss = loss_sum / n
        return loss, {"loss": loss.detach(), "accuracy": correct.double() / n}

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self.loss(self.logits(model, batch), batch)

    def eval_stats(self, model: nn.Module, batch: Batch) -> dict[str, Tensor]:
        loss_sum, count, correct = _token_stats(self.logits(model, batch), batch["labels"])
        return {"loss_sum": loss_sum.detach().double(), "count": count.double(), "correct": correct.double()}

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        """loss and perplexity per target token, and teacher-forced next-token accuracy."""
        return _token_summary(stats)
