"""Decode-step products on the CPU: lmforge's own matrix-vector kernels (matvec.c), built for this host.

A decode step multiplies a few rows of activations (one per sequence) by every weight of the model once, so its
speed is how fast the weights stream from memory. torch's CPU kernels fall short of that at these shapes for
bfloat16 and int8 weights (they convert more than they read); matvec.c reads each weight once per step for all
rows, converts it in registers and accumulates in float32.

The C file is compiled on first use with the host's C compiler (`$CC`, else `cc`; -O3 -march=native -fopenmp)
into lmforge's cache folder (`$LMFORGE_CACHE`, else ~/.cache/lmforge), keyed by the source, the flags and the
CPU, and loaded with ctypes; later processes load the cached library. Without a compiler, or with
`LMFORGE_MATVEC=0`, `matvec` is unavailable and the callers keep torch's kernels. Inside `torch.compile` the
kernel is the custom op `lmforge::matvec` (a compiled step does not use it: see `usable`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["MAX_ROWS", "available", "matvec", "usable"]

MAX_ROWS = 16  # activation rows up to which a product is a decode step's (more rows: torch's GEMM)
SOURCE = Path(__file__).with_name("matvec.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_state: dict[str, ctypes.CDLL | None] = {}


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (Linux), else the platform's processor."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LMFORGE_MATVEC", "1") == "0" or platform.system() != "Linux":
        return None
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    folder = Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "kernels"
    library = folder / f"matvec-{key}.so"
    if not library.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: never half a file
                out = Path(tmp) / library.name
                subprocess.run([cc, *FLAGS, "-o", str(out), str(SOURCE)], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(out, library)
        except (OSError, subprocess.SubprocessError) as err:
            detail = getattr(err, "stderr", None) or err
            warnings.warn(f"lmforge could not build its CPU matvec kernels with {cc!r} ({str(detail).strip()[:300]}); "
                          "decode steps use torch's kernels (set CC to a C compiler with OpenMP to build them)",
                          stacklevel=3)
            return None
    lib = ctypes.CDLL(str(library))
    for name in ("mv_f32", "mv_bf16"):
        getattr(lib, name).argtypes = [_P, _P, _P, _I, _I, _I, ctypes.c_int]
    lib.mv_i8.argtypes = [_P, _P, _P, _P, _I, _I, _I, ctypes.c_int]
    return lib


def _library() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"] = _build()
    return _state["lib"]


def available() -> bool:
    """Whether the kernels are built (or buildable) and loaded on this host."""
    return _library() is not None


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether a product of activations x (..., K) with `weight` (N, K) is a decode step's that `matvec` takes:
    CPU, no autograd, at most MAX_ROWS rows, plain contiguous tensors of a format the kernels read, eager.

    Inside `torch.compile` the answer is no: the custom op's round trip through the dispatcher into Python costs
    tens of microseconds a call (more than a layer's product), so a compiled step keeps torch's kernels."""
    autograd = x.requires_grad or weight.requires_grad and torch.is_grad_enabled()
    return (not torch.compiler.is_compiling() and x.device.type == "cpu" and not autograd
            and type(x) is Tensor and weight.dtype in (torch.float32, torch.bfloat16, torch.int8)
            and x.numel() <= MAX_ROWS * x.shape[-1] and type(weight.data) is Tensor and weight.is_contiguous()
            and available())


def _run(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    """The kernel on x (M, K): y (M, N) in x's dtype."""
    lib = _library()
    M, K = x.shape
    N = weight.shape[0]
    xf = x.to(torch.float32).contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    threads = torch.get_num_threads()
    if weight.dtype == torch.int8:
        s = scale.to(torch.float32).contiguous()
        lib.mv_i8(xf.data_ptr(), weight.data_ptr(), s.data_ptr(), y.data_ptr(), M, N, K, threads)
    elif weight.dtype == torch.bfloat16:
        lib.mv_bf16(xf.data_ptr(), weight.data_ptr(), y.data_ptr(), M, N, K, threads)
    else:
        lib.mv_f32(xf.data_ptr(), weight.data_ptr(), y.data_ptr(), M, N, K, threads)
    return y.to(x.dtype)


@torch.library.custom_op("lmforge::matvec", mutates_args=(), device_types="cpu")
def _matvec(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    return _run(x, weight, scale)


@_matvec.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def matvec(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """x (..., K) . weight (N, K)^T [* scale (N,)] [+ bias], in x's dtype, accumulated in float32: the
    `usable` cases only (int8 weights need `scale`)."""
    flat = x.reshape(-1, x.shape[-1])
    # eager: straight to the kernel (the dispatcher's round trip costs as much as a small product)
    y = _matvec(flat, weight, scale) if torch.compiler.is_compiling() else _run(flat, weight, scale)
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
