"""Weight formats for inference, swapped into a model in place (gpt-fast's quantize.py is the shape followed).

`quantize(model, "int8")` replaces every `nn.Linear` of a decoder (and, with tied embeddings, the token embedding
that shares the head's weight) by a module that keeps the weight in another format; the float weight is dropped
as each module is replaced, so no weight is ever held twice. The model's forward is unchanged: the modules take
and return activations in the model's dtype.

Formats (N output features, K input features):
- `PackedLinear`: the float weight reordered once into oneDNN's blocked layout (CPU, float32 / bfloat16),
  computed with oneDNN's inner product; the reordered weight replaces the plain one.
- `Int8Linear`: int8 weights with one symmetric scale per output row; decode steps on the CPU in lmforge's
  matvec kernel (models/matvec.py), else `torch.ops.aten._weight_int8pack_mm`, a dequantizing fallback elsewhere.
- `Int4Linear`: 4-bit weights in groups of 32 along K with a scale and an offset per group,
  w = (q - 8) * scale + zero, i.e. exactly GGUF's Q4_0 (zero = 0) and Q4_1 (zero = min + 8 * scale) blocks;
  `torch.ops.aten._weight_int4pack_mm_for_cpu` in bfloat16.
- `BlockInt8Linear`: int8 weights with one scale per block of 32 along K, i.e. GGUF's Q8_0; decode steps
  read the blocks in lmforge's matvec kernel, longer products dequantize a band of rows at a time.
- `RowEmbedding`: token embeddings read from an int8 / Q8_0 table (dequantizing only the rows looked up).
Quantized modules hold buffers, not parameters: they are for inference, not training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.blocks import Linear
from lmforge.models.matvec import MAX_ROWS, matvec, usable

__all__ = ["BlockInt8Linear", "Int4Linear", "Int8Linear", "PackedLinear", "QUANTIZED", "RowEmbedding", "convert",
           "install", "is_quantized", "quantize", "quantize_state", "targets"]

GROUP = 32  # elements per quantization block along K (GGUF's QK4_0 / QK4_1 / QK8_0)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def _aligned(t: Tensor | None) -> Tensor | None:
    """`t`, or a copy of it starting on a 64-byte boundary: torch's int8 / int4 CPU kernels read their weights
    with aligned vector loads and crash on others (e.g. tensors mapped from a safetensors file)."""
    return t if t is None or t.data_ptr() % 64 == 0 else t.clone()


class PackedLinear(nn.Module):
    """y = x W^T + b through oneDNN, with W reordered once into its blocked layout (an opaque tensor)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
                or not torch.backends.mkldnn.is_available():
            raise ValueError(f"PackedLinear needs a float32 or bfloat16 CPU weight and oneDNN, got "
                             f"{weight.dtype} on {weight.device}")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dtype = weight.dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach()

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> PackedLinear:
        return cls(weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.mkldnn._linear_pointwise(_flat(x), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """y = (x q^T) * scales + bias with q int8 (N, K) and scales (N,), symmetric per output row."""

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", _aligned(weight))  # (N, K) int8
        self.register_buffer("scales", _aligned(scales))  # (N,) in the activations' dtype
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int8Linear:
        """Round each row of a float weight (N, K) to int8 steps of max|row| / 127.

        The scales are rounded to bfloat16 precision first (and the steps taken with the rounded scales), so
        that casting the model to float32, bfloat16 or float16 keeps them exact."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(torch.bfloat16).float()  # (N,)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q, scales.to(weight.dtype), None if bias is None else bias.detach())

    def rows(self, index: Tensor) -> Tensor:
        """Dequantized rows (..., K) of the weight, in the scales' dtype."""
        return F.embedding(index, self.weight).to(self.scales.dtype) * self.scales[index, None]

    def forward(self, x: Tensor) -> Tensor:
        if usable(x, self.weight):
            return matvec(x, self.weight, self.scales, self.bias)
        flat = _flat(x)
        if x.device.type == "cpu" and x.dtype == self.scales.dtype and flat.shape[0] <= MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:  # many rows (a prompt): compute-bound, so a transient float copy of this one weight is cheap
            y = F.linear(flat, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class RowEmbedding(nn.Module):
    """Token embeddings read from the rows of a quantized table (`Int8Linear` or `BlockInt8Linear`); with tied
    weights the same table module is also the model's `lm_head`: one quantized copy for lookups and products."""

    def __init__(self, table: Int8Linear | BlockInt8Linear):
        super().__init__()
        self.table = table

    def forward(self, ids: Tensor) -> Tensor:
        return self.table.rows(ids)


class Int4Linear(nn.Module):
    """4-bit weights in groups of 32 along K: w = (q - 8) * scale + zero, q in [0, 16).

    Stored in the layout of torch's CPU int4 kernel: `weight` (N, K / 2) uint8 and `scales_and_zeros`
    (K / 32, N, 2) bfloat16, kept as its int16 bits so that casting the model (`model.to(dtype)`) leaves it as
    the kernel needs it. Products run in bfloat16; activations are cast to it and back.
    """

    def __init__(self, weight: Tensor, scales_and_zeros: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1] * 2, weight.shape[0]
        self.register_buffer("weight", _aligned(weight))
        self.register_buffer("scales_and_zeros", _aligned(scales_and_zeros))
        self.register_buffer("bias", bias)

    @classmethod
    def from_blocks(cls, q: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """From q (N, K) integers in [0, 16) and scale, zero (N, K / 32): w = (q - 8) * scale + zero."""
        N, K = q.shape
        if K % GROUP or scale.shape != (N, K // GROUP) or zero.shape != scale.shape:
            raise ValueError(f"int4 blocks need K divisible by {GROUP} and scale/zero of shape (N, K/{GROUP}); "
                             f"got q {tuple(q.shape)}, scale {tuple(scale.shape)}, zero {tuple(zero.shape)}")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/32, N, 2)
        return cls(packed, sz.view(torch.int16), bias)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Tensor | None = None) -> Int4Linear:
        """Asymmetric 4-bit rounding of a float weight (N, K) per group of 32 (as GGUF's Q4_1)."""
        N, K = weight.shape
        w = weight.detach().float().view(N, K // GROUP, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).view(N, K)
        return cls.from_blocks(q, scale, lo + 8 * scale, None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("Int4Linear weights are packed for torch's CPU kernel; run the model on the CPU")
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x).to(torch.bfloat16), self.weight, GROUP,
                                                       self.scales_and_zeros.view(torch.bfloat16))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class BlockInt8Linear(nn.Module):
    """int8 weights with a scale per block of 32 along K (GGUF's Q8_0): w = q * scale.

    `weight` (N, K) int8, `scales` (N, K / 32) float32. A product dequantizes `rows_per_band` rows at a time
    into the activations' dtype (a transient band, not a second copy of the weight).
    """

    rows_per_band = 4096

    def __init__(self, weight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def rows(self, index: Tensor | slice, dtype: torch.dtype | None = None) -> Tensor:
        """Dequantized rows (..., K) of the weight, in `dtype` (default: the scales' dtype)."""
        dtype = dtype or self.scales.dtype
        q, s = self.weight[index], self.scales[index]
        return (q.view(*q.shape[:-1], -1, GROUP).to(dtype) * s[..., None].to(dtype)).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        if usable(x, self.weight):
            return matvec(x, self.weight, self.scales, self.bias)
        flat = _flat(x)
        bands = [F.linear(flat, self.rows(slice(i, i + self.rows_per_band), x.dtype))
                 for i in range(0, self.out_features, self.rows_per_band)]
        y = torch.cat(bands, dim=-1).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


QUANTIZED = (Int8Linear, Int4Linear, BlockInt8Linear, PackedLinear)
_FORMATS = {"int8": Int8Linear, "int4": Int4Linear, "packed": PackedLinear}


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of `model` holds quantized weights."""
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def targets(model: nn.Module, kind: str) -> list[str]:
    """Names of the modules whose weight the `kind` format replaces: every `nn.Linear`; with tied embeddings
    and int8 the token embedding too, whose int8 table then also serves as the head (int4 and packed rows
    cannot be looked up, so they leave a tied head in float rather than make a second copy)."""
    if kind not in _FORMATS:
        raise ValueError(f"unknown weight format {kind!r}; expected one of {', '.join(_FORMATS)}")
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False) and hasattr(model, "lm_head")
    names = [name for name, m in model.named_modules()
             if type(m) in (nn.Linear, Linear) and not (tied and name == "lm_head")]
    return names + ["embed_tokens"] if tied and kind == "int8" else names


def convert(weight: Tensor, kind: str, bias: Tensor | None = None) -> nn.Module:
    """The `kind` module ("int8", "int4", "packed") holding `weight` (N, K) in that format."""
    return _FORMATS[kind].from_float(weight, bias)


def install(model: nn.Module, owner: str, module: nn.Module) -> None:
    """Put `module` in place of the linear `owner`; for "embed_tokens", make the token embedding read its rows
    and, with tied embeddings, make it the head as well."""
    if owner == "embed_tokens":
        model.embed_tokens = RowEmbedding(module)
        if model.config.tie_embeddings:
            model.lm_head = module
    else:
        model.set_submodule(owner, module)


def quantize_state(state: dict[str, Tensor | nn.Module], owners: list[str], kind: str) -> None:
    """Convert the weights of `owners` (from `targets`) in a state dict to `kind` modules, in place, dropping
    each float weight as it is converted; their biases stay float tensors in the state."""
    for owner in owners:
        state[f"{owner}.weight"] = convert(state.pop(f"{owner}.weight"), kind)


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace the weights of `targets(model, kind)` by the `kind` format ("int8", "int4" or "packed"), in
    place, one module at a time; returns `model`. Raises ValueError for an unknown kind."""
    with torch.no_grad():
        for name in targets(model, kind):
            old = model.get_submodule(name)
            install(model, name, convert(old.weight, kind, getattr(old, "bias", None)))
    return model
