"""Decode-step products on the CPU: lmforge's own matrix-vector kernels (matvec_kernels.h), built for this host.

A decode step multiplies a few rows of activations (one per sequence) by every weight of the model once, so its
speed is how fast the weights stream from memory. torch's CPU kernels fall short of that at these shapes for
bfloat16 and int8 weights (they convert more than they read); the kernels read each weight once per step for all
rows, convert it in registers (bfloat16 against bfloat16 activations: vdpbf16ps, or AMX tiles from 2 rows) and
accumulate in float32.

The kernels are the torch operator `lmforge::matvec` (matvec_op.cpp), compiled on first use with the host's C++
compiler (`$CXX`, else `c++`; -O3 -march=native -fopenmp, against the installed torch's headers) into lmforge's
cache folder (`$LMFORGE_CACHE`, else ~/.cache/lmforge), keyed by the sources, the flags, torch's version and the
CPU; later processes load the cached library (`make setup` builds it). The dispatcher calls the kernels directly,
from eager code and from `torch.compile`'d steps. Without a compiler, or with `LMFORGE_MATVEC=0`, the operator is
unavailable and the callers keep torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_ROWS", "available", "decode_attention", "decode_step_attention", "matvec", "rms_norm", "silu_mul",
           "top_k", "usable"]

MAX_ROWS = 16  # activation rows up to which a product is a decode step's (more rows: torch's GEMM)
# bfloat16 weights on hosts without AVX512-BF16 (the kernel widens them to float32): from 4 rows on oneDNN's GEMM
# matches or beats it (benchmarks/matvec.py)
BF16_ROWS = 2
BF16_DOT = 4  # bit of lmforge::matvec_features: bfloat16 x and W multiplied by vdpbf16ps (and AMX where present)
SOURCES = [Path(__file__).with_name("matvec_op.cpp"), Path(__file__).with_name("matvec_kernels.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w"]
_state: dict[str, int] = {}
_PLAIN = (Tensor, torch.nn.Parameter)  # weights the kernels read (not tensor subclasses: sharded, quantized, fake)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform's processor."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _command(cxx: str, out: Path) -> list[str]:
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    return [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
            f"-I{torch_dir / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCES[0]),
            f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}", "-o", str(out)]


def _build() -> bool:
    if os.environ.get("LMFORGE_MATVEC", "1") == "0" or sys.platform != "linux":
        return False
    cxx = os.environ.get("CXX", "c++")
    key_text = "\0".join([*(p.read_text() for p in SOURCES), cxx, *FLAGS, torch.__version__, _cpu_key()])
    folder = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"
    library = folder / f"matvec-{hashlib.sha256(key_text.encode()).hexdigest()[:16]}.so"
    if not library.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: never half a file
                out = Path(tmp) / library.name
                subprocess.run(_command(cxx, out), check=True, capture_output=True, text=True, timeout=600)
                os.replace(out, library)
        except (OSError, subprocess.SubprocessError) as err:
            detail = str(getattr(err, "stderr", None) or err).strip()
            warnings.warn(f"lmforge could not build its CPU matvec kernels with {cxx!r} ({detail[-300:]}); decode "
                          "steps use torch's kernels (set CXX to a C++ compiler with OpenMP to build them)",
                          stacklevel=3)
            return False
    torch.ops.load_library(str(library))
    torch.library.register_fake("lmforge::matvec")(_fake)
    torch.library.register_fake("lmforge::decode_attention")(_fake_attention)
    _state["features"] = torch.ops.lmforge.matvec_features()
    return True


def _fake(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _fake_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    return q.new_empty(q.shape)


def available() -> bool:
    """Whether the kernels are built (or buildable) and loaded on this host."""
    if "built" not in _state:
        _state["built"] = _build()
    return _state["built"]


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of activations x (..., K) with `weight` (N, K) is a decode step's that `matvec` takes:
    CPU, no autograd, at most MAX_ROWS rows (BF16_ROWS for bfloat16 weights on hosts without AVX512-BF16),
    plain contiguous tensors of a format the kernels read. (Called for every product of every step: the cheap
    checks first.)"""
    if not (x.is_cpu and x.numel() <= MAX_ROWS * x.shape[-1] and type(x) is Tensor and available()):
        return False
    if type(weight) not in _PLAIN or weight.dtype not in _WEIGHT_DTYPES or not weight.is_contiguous():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if weight.dtype == torch.bfloat16 and not (x.dtype == torch.bfloat16 and _state["features"] & BF16_DOT):
        return x.numel() <= BF16_ROWS * x.shape[-1]
    return True


def matvec(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (..., K) . weight (N, K)^T [* scale] [+ bias] -> (..., N), in x's dtype, accumulated in float32: the
    `usable` cases only. int8 weights need `scale`: (N,) one per row, or (N, K / 32) one per block of 32 along K."""
    if not available():
        raise RuntimeError("lmforge's matvec kernels are not built on this host (see the warning above); check "
                           "`usable` before calling matvec")
    y = torch.ops.lmforge.matvec.default(x, weight, scale)
    return y if bias is None else y + bias


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor | None:
    """Attention of one new token per row on the CPU, without autograd: q (B, H, 1, D) over k, v (B, Hkv, S, D)
    (the cache's filled slots), query head h reading key/value head h // (H / Hkv); mask None or boolean,
    broadcastable to (B, 1, 1, S), True where a key may be seen. None where the kernel does not apply (the caller
    then runs SDPA). Key and value rows at stride D (a cache's layout) are read in place, others copied first."""
    if not (q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and k.dtype == v.dtype == q.dtype
            and (mask is None or mask.dtype == torch.bool) and type(q) is Tensor and type(k) is Tensor
            and available()):
        return None
    return torch.ops.lmforge.decode_attention(q, k, v, mask, scale)


def _eager_step(x: Tensor, *params: Tensor) -> bool:
    """Whether x is an eager decode step's activation that the element-wise kernels take: CPU, no autograd, not
    being compiled (inductor fuses these steps itself), at most MAX_ROWS rows, float32 or bfloat16, contiguous."""
    return (x.is_cpu and x.numel() <= MAX_ROWS * x.shape[-1] and type(x) is Tensor
            and x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous()
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params)))
            and not torch.compiler.is_compiling() and available())


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor | None:
    """lmforge's RMSNorm of a decode step's rows in one pass (as `blocks.RMSNorm` computes it, bfloat16 rounded
    where it rounds); None where the kernel does not apply. Eager decoding runs ~8 small torch ops per norm."""
    if not (_eager_step(x, weight) and weight.dtype == x.dtype and weight.dim() == 1 and weight.is_contiguous()):
        return None
    return torch.ops.lmforge.rms_norm(x, weight, eps)


def silu_mul(h: Tensor) -> Tensor | None:
    """silu(gate) * up of a decode step's gated-MLP rows h (..., 2F) holding gate then up, in one pass (bfloat16
    rounded where torch's silu and product round); None where the kernel does not apply."""
    return torch.ops.lmforge.silu_mul(h) if _eager_step(h) and h.shape[-1] % 2 == 0 else None


def decode_step_attention(qkv: Tensor, rotary: tuple[Tensor, Tensor] | None, k_cache: Tensor, v_cache: Tensor,
                          slot: int, kv_len: int, mask: Tensor | None, scale: float, n_head: int) -> Tensor | None:
    """An eager decode step's whole attention from the fused projection qkv (B, 1, (H + 2 Hkv) D) in one op: q and
    k rotated (rotary: cos, sin (B, 1, 1, D), or None), k and v written at `slot` of the caches (B, Hkv, L, D), in
    place, then `decode_attention` over slots [0, kv_len) under mask; returns (B, 1, H D), or None where the kernel
    does not apply (the caller then runs the torch ops)."""
    if not (_eager_step(qkv) and k_cache.dtype == v_cache.dtype == qkv.dtype and qkv.dim() == 3
            and qkv.shape[1] == 1 and (rotary is None or rotary[0].dtype == qkv.dtype)
            and (mask is None or mask.dtype == torch.bool)):
        return None
    cos, sin = rotary if rotary is not None else (None, None)
    return torch.ops.lmforge.decode_step_attention(qkv, cos, sin, k_cache, v_cache, slot, kv_len, mask, scale,
                                                   n_head)


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(scores, k) of scores (B, V) (values largest first, and their indices), by lmforge's one-pass
    kernel for float32 CPU scores (equal values in index order); elsewhere torch.topk, or for k = 1 argmax (the
    first of equal maxima, as the kernel picks it)."""
    if (scores.is_cpu and scores.dtype == torch.float32 and scores.dim() == 2 and scores.is_contiguous()
            and type(scores) is Tensor and 1 <= k <= scores.shape[-1] and available()):
        return torch.ops.lmforge.topk.default(scores, k)
    if k == 1:
        index = scores.argmax(-1, keepdim=True)
        return scores.gather(-1, index), index
    return torch.topk(scores, k)
