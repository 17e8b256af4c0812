"""DistilBERT-style distillation: a student initialised from its teacher, and the distillation loss.

The student keeps the teacher's width and takes a subset of its layers (every other one by default, as
DistilBERT takes layers 0, 2, 4, ... of BERT); embeddings, the final norm and the heads are copied. An
encoder-decoder (T5) student takes a subset of the decoder's layers (every other one by default) and of the
encoder's (all by default); each stack keeps its relative position bias and final norm, and the losses below
compare the decoder's outputs at the target positions.
`DistillObjective` plugs into the training loop like any other objective and returns

    loss = alpha_ce  * KL(softmax(t / T) || softmax(s / T)) * T^2   (soft targets, on real positions)
         + alpha_lm  * base objective loss                          (causal LM, masked LM or classification)
         + alpha_cos * (1 - cos(h_s, h_t))                          (aligned hidden states, real positions)
         + alpha_mse * mean((s - t)^2)                              (logits, optional)

with the teacher frozen in eval mode and run under no_grad. Shapes: B batch, T sequence, V vocabulary (or
labels), C width.

Choosing layers: every other layer suits BERT-family encoders, but not every decoder. For SmolLM2-135M
(measured on BBC News text) a 15-layer student of layers 0, 2, ..., 28 starts at a perplexity near 10^6,
one of layers 0-5 and 21-29 near 10^3 (the teacher: ~20): pass such a map explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models import ModelOutput, build_model
from lmforge.objectives import model_inputs

__all__ = ["DistillObjective", "aligned_hidden_pairs", "cosine_hidden_loss", "init_student", "logit_mse_loss",
           "n_output_layers", "soft_target_loss", "student_layer_map"]


class Objective(Protocol):
    """The objective protocol of `lmforge.objectives` (CausalLM, MaskedLM, Classification, Seq2SeqLM)."""

    def __call__(self, model: Any, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]: ...

    def n_targets(self, batch: dict[str, Tensor]) -> int: ...

    def eval_stats(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]: ...


def student_layer_map(n_teacher: int, n_student: int | None = None) -> list[int]:
    """Evenly spaced teacher layers for an `n_student`-layer student (default: every other layer).

    Layer i of the student starts from teacher layer `i * n_teacher // n_student`, so 6 -> 3 gives [0, 2, 4]
    and 30 -> 15 gives [0, 2, ..., 28]. Raises ValueError unless 1 <= n_student <= n_teacher.
    """
    if n_student is None:
        n_student = (n_teacher + 1) // 2
    if not isinstance(n_student, int) or not 1 <= n_student <= n_teacher:
        raise ValueError(f"a student of a {n_teacher}-layer teacher needs 1..{n_teacher} layers, "
                         f"got {n_student!r}")
    return [i * n_teacher // n_student for i in range(n_student)]


def _layer_map(layers: int | Sequence[int] | None, n_teacher: int, what: str) -> list[int]:
    if layers is None or isinstance(layers, int):
        return student_layer_map(n_teacher, layers)
    layer_map = [int(i) for i in layers]
    bad = [i for i in layer_map if not 0 <= i < n_teacher]
    if not layer_map or bad:
        raise ValueError(f"student {what}layer map {list(layers)} must be a non-empty list of teacher layer "
                         f"indices in [0, {n_teacher})")
    return layer_map


def n_output_layers(config: ModelConfig) -> int:
    """Layers behind the outputs distillation compares: the decoder's of an encoder-decoder, else all."""
    return config.n_decoder_layers if config.arch == "encoder-decoder" else config.n_layer


def init_student(teacher: nn.Module, layers: int | Sequence[int] | None = None, *,
                 encoder_layers: int | Sequence[int] | None = None,
                 config: ModelConfig | None = None) -> tuple[nn.Module, list[int] | None]:
    """A student for `teacher` (a lmforge `Decoder`, `Encoder` or `EncoderDecoder`) and the teacher layers it
    was built from (an encoder-decoder's: its decoder layers).

    layers: None for every other teacher layer, an int for that many evenly spaced layers, or an explicit list
        of teacher layer indices (the student's layer i is a copy of teacher layer layers[i]); for an
        encoder-decoder, the decoder's layers. Embeddings, the final norm(s), the relative position biases and
        the heads are copied too; the student is a new module sharing no storage with the teacher.
    encoder_layers (encoder-decoder only): the encoder's layers in the same form; None keeps all of them.
    config: instead of copying, build a freshly initialised student from this config (any depth and width,
        same vocabulary and head as the teacher); the returned layer map is then None.
    Raises ValueError for a bad layer map, or a config whose vocabulary, labels or architecture do not match.
    """
    tcfg: ModelConfig = teacher.config
    ref = next(teacher.parameters())
    seq2seq = tcfg.arch == "encoder-decoder"
    if encoder_layers is not None and not seq2seq:
        raise ValueError(f"encoder_layers applies to encoder-decoder teachers; this one is a {tcfg.arch}")
    if config is not None:
        if layers is not None or encoder_layers is not None:
            raise ValueError("init_student: pass either layers (copy from the teacher) or config (fresh), "
                             "not both")
        check_compatible(tcfg, config)
        return build_model(config).to(device=ref.device, dtype=ref.dtype), None

    if seq2seq:
        layer_map = _layer_map(layers, tcfg.n_decoder_layers, "decoder ")
        encoder_map = _layer_map(encoder_layers if encoder_layers is not None else range(tcfg.n_layer),
                                 tcfg.n_layer, "encoder ")
        maps = {"decoder.layers.": layer_map, "encoder.layers.": encoder_map}
        student_config = tcfg.replace(n_layer=len(encoder_map), n_decoder_layer=len(layer_map))
    else:
        layer_map = _layer_map(layers, tcfg.n_layer, "")
        maps = {"layers.": layer_map}
        student_config = tcfg.replace(n_layer=len(layer_map))
    student = build_model(student_config).to(device=ref.device, dtype=ref.dtype)

    teacher_state = teacher.state_dict()
    state = {}
    for name in student.state_dict():
        prefix = next((p for p in maps if name.startswith(p)), None)
        if prefix is None:
            state[name] = teacher_state[name]
            continue
        index, rest = name[len(prefix):].split(".", 1)
        state[name] = teacher_state[f"{prefix}{maps[prefix][int(index)]}.{rest}"]
    student.load_state_dict(state)  # copies into the student's own tensors
    return student.train(teacher.training), layer_map


def check_compatible(teacher: ModelConfig, student: ModelConfig) -> None:
    """Raise ValueError unless a student with config `student` can learn from `teacher`'s outputs."""
    if teacher.arch != student.arch:
        raise ValueError(f"the teacher has arch {teacher.arch!r} but the student has arch {student.arch!r}")
    if teacher.head != student.head:
        raise ValueError(f"teacher has a {teacher.head!r} head but the student has a {student.head!r} head")
    if teacher.head == "lm" and teacher.vocab_size != student.vocab_size:
        raise ValueError(f"incompatible vocabularies: teacher has {teacher.vocab_size} tokens, the student "
                         f"{student.vocab_size}; distillation compares logits token by token")
    if teacher.head == "classify" and teacher.n_labels != student.n_labels:
        raise ValueError(f"label sets differ: teacher has {teacher.n_labels} labels, "
                         f"the student {student.n_labels}")


def aligned_hidden_pairs(layer_map: Sequence[int], n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` that should match for a student built with `layer_map`.

    hidden_states[0] is the embedding output and [i] the output of layer i. Student layer j replaces teacher
    layers layer_map[j] .. layer_map[j + 1] - 1, so its output lines up with teacher output layer_map[j + 1];
    the last student layer lines up with the teacher's last. E.g. [0, 2, 4] of 6 -> [(1, 2), (2, 4), (3, 6)].
    Raises ValueError for a map that is not strictly increasing.
    """
    if any(b <= a for a, b in zip(layer_map[:-1], layer_map[1:], strict=True)):
        raise ValueError(f"hidden-state alignment needs a strictly increasing layer map, "
                         f"got {list(layer_map)}")
    n = len(layer_map)
    return [(j + 1, layer_map[j + 1]) for j in range(n - 1)] + [(n, n_teacher)]


def _select(x: Tensor, mask: Tensor | None) -> Tensor:
    """Rows of x (B, T, D) or (B, D) at real positions: (N, D)."""
    if mask is None or x.dim() == 2:
        return x.reshape(-1, x.shape[-1])
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match outputs of shape "
                         f"{tuple(x.shape)}")
    return x[mask.bool()]


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                     mask: Tensor | None = None) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) * T^2, averaged over positions.

    Logits are (B, T, V) with mask (B, T) selecting real positions, or (B, V) for classifiers (no mask). The
    T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.). Computed in fp32.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    s = _select(student_logits.float(), mask) / temperature  # (N, V)
    t = _select(teacher_logits.float(), mask) / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl / max(s.shape[0], 1) * temperature**2


def cosine_hidden_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of 1 - cos(h_s, h_t) over real positions; hidden states (B, T, C) with mask (B, T), or (B, C)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
                         f"{tuple(teacher_hidden.shape)} differ in shape (project the student's first)")
    s = _select(student_hidden.float(), mask)  # (N, C)
    t = _select(teacher_hidden.float(), mask)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared difference of logits over real positions and every vocabulary entry (or label)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    return F.mse_loss(_select(student_logits.float(), mask), _select(teacher_logits.float(), mask))


class _Computed:
    """A stand-in model that returns an output already computed, so the base objective reuses the student's
    forward pass instead of running the student a second time."""

    def __init__(self, output: ModelOutput):
        self.output = output

    def __call__(self, *args: object, **kwargs: object) -> ModelOutput:
        return self.output


class DistillObjective(nn.Module):
    """The distillation loss as a training objective (the protocol of `lmforge.objectives`).

    teacher: a lmforge model; it is put in eval mode, frozen (requires_grad False) and run under no_grad.
        It is not a submodule: the objective's parameters are only the projection, if any, and moving the
        objective (as the training loop does) leaves the teacher where it is: put it on the student's device.
    student: the model that will be trained (used here to check compatibility and size the projection).
    base: the objective for the hard-label term and for evaluation: `CausalLM()`, `MaskedLM()`,
        `Classification(n_labels)` or `Regression()` (one output: use alpha_mse, the KL of one logit is 0);
        evaluation (`eval_stats`/`summarize`) measures the student with it.
    alpha_ce, alpha_lm, alpha_cos, alpha_mse: weights of the soft-target KL, the base loss, the hidden-state
        cosine loss and the logit MSE (see the module docstring); non-negative, not all zero.
    temperature: the softmax temperature T of the KL term.
    hidden_pairs: (student, teacher) indices into the models' `hidden_states` compared by the cosine loss;
        default [(n_student_layers, n_teacher_layers)], the last hidden states (DistilBERT). For a student
        from `init_student`, `aligned_hidden_pairs(layer_map, n_teacher_layers)` aligns every student layer.
        Encoder-decoders (base `Seq2SeqLM`): the decoder's layers and hidden states, at target positions.
    allow_projection: when the widths differ and alpha_cos > 0, learn a Linear(student width -> teacher width)
        applied to the student's hidden states. It is a parameter of this objective and must be optimised with
        the student (the training loop adds an objective's parameters to its optimizer).
    Raises ValueError for incompatible vocabularies or label sets, a width mismatch with
    allow_projection=False, hidden-state indices out of range, and bad weights or temperature.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, base: Objective, *, alpha_ce: float = 5.0,
                 alpha_lm: float = 2.0, alpha_cos: float = 1.0, alpha_mse: float = 0.0,
                 temperature: float = 2.0,
                 hidden_pairs: Sequence[tuple[int, int]] | None = None, allow_projection: bool = True):
        super().__init__()
        tcfg, scfg = teacher.config, student.config
        check_compatible(tcfg, scfg)
        alphas = {"alpha_ce": alpha_ce, "alpha_lm": alpha_lm, "alpha_cos": alpha_cos, "alpha_mse": alpha_mse}
        bad = {k: v for k, v in alphas.items() if not v >= 0}
        if bad or not any(alphas.values()):
            raise ValueError(f"loss weights must be non-negative and not all zero, got {alphas}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.alpha_ce, self.alpha_lm = alpha_ce, alpha_lm
        self.alpha_cos, self.alpha_mse = alpha_cos, alpha_mse
        self.temperature = temperature
        self.base = base
        n_student, n_teacher = n_output_layers(scfg), n_output_layers(tcfg)
        self.hidden_pairs = [(n_student, n_teacher)] if hidden_pairs is None else list(hidden_pairs)
        for s, t in self.hidden_pairs:
            if not (0 <= s <= n_student and 0 <= t <= n_teacher):
                raise ValueError(f"hidden-state pair ({s}, {t}) out of range: the student has hidden states "
                                 f"0..{n_student}, the teacher 0..{n_teacher}")
        self.projection: nn.Linear | None = None
        if alpha_cos > 0 and scfg.d_model != tcfg.d_model:
            if not allow_projection:
                raise ValueError(f"width mismatch: the student's hidden states have {scfg.d_model} features, "
                                 f"the teacher's {tcfg.d_model}; the cosine loss needs "
                                 f"allow_projection=True (or alpha_cos=0)")
            ref = next(student.parameters())
            self.projection = nn.Linear(scfg.d_model, tcfg.d_model).to(device=ref.device, dtype=ref.dtype)
        teacher.eval().requires_grad_(False)
        self._teacher = [teacher]  # a list, so that the teacher is not registered as a submodule

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @property
    def concat_stats(self) -> tuple[str, ...]:
        """The base objective's statistics that evaluation concatenates (see `lmforge.objectives`)."""
        return tuple(getattr(self.base, "concat_stats", ()))

    @property
    def name(self) -> str:
        return f"distill-{getattr(self.base, 'name', type(self.base).__name__)}"

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """(loss, metrics) of the student `model` on `batch`; metrics hold every weighted term's raw value."""
        if hasattr(self.base, "model_kwargs"):  # encoder-decoder: the decoder's outputs at the target positions
            kwargs = self.base.model_kwargs(batch)
            mask = kwargs["decoder_attention_mask"]
        else:
            kwargs = model_inputs(batch)
            mask = batch.get("attention_mask")
        need_hidden = self.alpha_cos > 0
        student_out = model(batch["input_ids"], output_hidden_states=need_hidden, **kwargs)
        with torch.no_grad():
            teacher_out = self.teacher(batch["input_ids"], output_hidden_states=need_hidden, **kwargs)
        if mask is not None:
            mask = mask.bool()
        s_logits, t_logits = student_out.logits, teacher_out.logits
        if s_logits is None or t_logits is None:
            raise ValueError("distillation needs models with an output head (config.head 'lm' or 'classify')")

        loss = s_logits.new_zeros((), dtype=torch.float32)
        metrics: dict[str, Tensor] = {}
        if self.alpha_ce > 0:
            metrics["loss_ce"] = soft_target_loss(s_logits, t_logits, self.temperature, mask)
            loss = loss + self.alpha_ce * metrics["loss_ce"]
        if self.alpha_lm > 0:
            lm_loss, base_metrics = self.base(_Computed(student_out), batch)
            metrics.update({k: v for k, v in base_metrics.items() if k != "loss"})
            metrics["loss_lm"] = lm_loss
            loss = loss + self.alpha_lm * lm_loss
        if self.alpha_cos > 0:
            terms = []
            for s, t in self.hidden_pairs:
                h = student_out.hidden_states[s]  # (B, T, C_student)
                if self.projection is not None:
                    h = self.projection(h)  # (B, T, C_teacher)
                terms.append(cosine_hidden_loss(h, teacher_out.hidden_states[t], mask))
            metrics["loss_cos"] = torch.stack(terms).mean()
            loss = loss + self.alpha_cos * metrics["loss_cos"]
        if self.alpha_mse > 0:
            metrics["loss_mse"] = logit_mse_loss(s_logits, t_logits, mask)
            loss = loss + self.alpha_mse * metrics["loss_mse"]
        metrics = {k: v.detach() if isinstance(v, Tensor) else v for k, v in metrics.items()}
        metrics["loss"] = loss.detach()
        return loss, metrics

    def n_targets(self, batch: dict[str, Tensor]) -> int:
        """The base objective's count of loss terms (the loop weights accumulated micro-batches by it)."""
        return self.base.n_targets(batch)

    def eval_stats(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The base objective's statistics of the student alone (perplexity, accuracy, ...)."""
        return self.base.eval_stats(model, batch)

    def summarize(self, stats: dict[str, Tensor]) -> dict[str, float]:
        return self.base.summarize(stats)
