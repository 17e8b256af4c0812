"""The one training loop, used by every objective (LM, masked LM, classification, distillation).

    result = train(model, objective, train_data, TrainConfig(...), eval_data=None, strategy=None,
                   resume=False)

- model: an nn.Module (lmforge Decoder/Encoder or anything the objective can call); trained in place.
- objective: see `lmforge.objectives` (`__call__`, `n_targets`, `eval_stats`, `summarize`). An objective that
  is an nn.Module with parameters (a distillation projection) is moved to the device, optimised with the
  model and checkpointed.
- train_data / eval_data: map-style datasets with `collate(items)` (see `lmforge.data`); an optional
  `set_epoch(epoch)` is called before each batch is fetched.
- strategy: how the run is spread over processes (see `Strategy`); None is one process on `config.device`.

One optimizer step = `grad_accum` micro-batches of `batch_size` items per rank, each micro-batch's loss
weighted by its share of the step's loss terms on every rank (`Strategy.step_targets`). AdamW has two parameter
groups: tensors with 2 or more dimensions (linear weights and embeddings) get weight decay; biases and norm
weights (1-dimensional) do not.
The learning rate warms up linearly over `warmup_steps`, then decays (linear or cosine) to `min_lr_ratio * lr`
at `max_steps`.

Run directory (rank 0 writes it): metrics.jsonl (one JSON object per line: {"step", "split": "train"|"eval",
...}), checkpoints/step_XXXXXXXX/{model.pt, trainer.pt} (the last `keep_last`), metrics.png by `plot_run`.
A checkpoint holds the model, optimizer, scheduler, grad scaler, RNG states (python, numpy, torch, cuda), the
step and the data position (the sampler's batch counter), so `resume=True` continues exactly where it stopped:
on CPU the weights after resuming are bit-identical to an uninterrupted run. It is written to a temporary
folder, every file and the folder fsynced, then renamed into place, so a kill at any moment leaves the last
good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from lmforge.data import EpochSampler

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# Test hook: a process whose checkpoint writer reaches this step SIGKILLs itself after writing the temporary
# folder and before renaming it (to prove that a kill during a write leaves the previous checkpoint intact).
KILL_IN_CHECKPOINT_ENV = "LMFORGE_TEST_KILL_IN_CHECKPOINT"


@dataclass
class TrainConfig:
    """Hyperparameters of one run. Steps count optimizer updates; batch_size is per rank and micro-batch."""

    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    max_steps: int = 100
    schedule: Literal["linear", "cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    clip_norm: float | None = 1.0  # None or 0: no clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16: autocast; fp16 adds a gradient scaler
    eval_every: int = 0  # 0: evaluate only at the end (when eval data is given)
    eval_batch_size: int | None = None  # None: batch_size
    eval_max_batches: int | None = None  # cap evaluation cost on large sets
    save_every: int = 0  # 0: checkpoint only at the end (when run_dir is set)
    keep_last: int = 2
    seed: int = 0
    log_every: int = 10
    run_dir: str | None = None
    device: str = "cpu"  # used when no strategy is given; "cuda" or "cuda:N" for a GPU
    progress: bool = True  # tqdm bar (rank 0 only)
    compile: bool = False  # torch.compile the model's forward

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = ("lr", "max_steps", "batch_size", "grad_accum", "keep_last", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be linear, cosine or constant, "
                             f"got {self.schedule!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"TrainConfig.precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `train` returns: the last step, last logged train loss, last evaluation and last checkpoint."""

    step: int
    train_loss: float | None
    eval_metrics: dict[str, float] | None = None
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the records this call logged


# --- distributed strategy -----------------------------------------------------------------------------------


class Strategy(Protocol):
    """How a run is spread over processes. `SingleProcess` is the default; lmforge.parallel implements others.

    rank / world_size / is_main: this process's place; only is_main logs, shows progress, writes checkpoints.
    device: where the model and batches go.
    prepare(model, optimizer): wrap them (e.g. DistributedDataParallel, a DistributedOptimizer) after the loop
        has moved the model to `device` and built the optimizer; returns what the loop then uses.
    unwrap(model): the plain module inside a wrapped one (for checkpoints).
    sync(model, sync): context manager around a micro-batch's forward and backward; sync=False on all but the
        last micro-batch of a step (DDP's no_sync), so gradients are reduced once per step.
    clip_grad_norm(parameters, max_norm): clip and return the total gradient norm (over all shards).
    all_reduce_sum(tensor): the sum of a tensor over ranks (metrics, evaluation statistics).
    step_targets(n): how many loss terms one rank's gradient stands for, given this rank's n for the step: the
        loop weights each micro-batch by its terms over this number. Ranks whose gradients are averaged return
        (terms on every rank) / (number of ranks), so that the average is the mean over every term of the step
        even when ranks hold different numbers (targets of different lengths); one process returns n.
    barrier(): wait for every rank (around checkpoint writes).
    gather_object(obj): every training rank's `obj`, in rank order (each rank's RNG state for checkpoints).
    forward_backward(model, objective, batch, weight, autocast, scaler): one micro-batch's forward (under
        `autocast()`) and backward of `loss * weight`; returns the detached loss and the objective's metrics
        (a pipeline runs its schedule here, and only its last stage has the loss).
    eval_stats(model, objective, batch): `objective.eval_stats` of one evaluation batch (a pipeline runs its
        stages in turn; the statistics come from the last stage, zeros of the same shapes elsewhere).
    shard(model): split the model over the processes (tensor parallel, FSDP, ...) in place, before the loop
        builds the optimizer; returns it. The default returns the model as it is.
    loss_parallel(): context manager around forward + loss (+ backward): the objective's cross-entropy may
        meet logits sharded over the vocabulary (torch's loss_parallel under tensor parallelism).
    save_checkpoint(run_dir, step, model, optimizer, trainer_state, keep_last) / load_checkpoint(path, model,
        optimizer): write and read a checkpoint folder (every rank calls them); load returns the trainer state.
    """

    rank: int
    world_size: int
    is_main: bool
    device: torch.device

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]: ...

    def unwrap(self, model: nn.Module) -> nn.Module: ...

    def sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager: ...

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float) -> Tensor: ...

    def all_reduce_sum(self, tensor: Tensor) -> Tensor: ...

    def step_targets(self, n: int) -> float: ...

    def barrier(self) -> None: ...

    def gather_object(self, obj: Any) -> list[Any]: ...

    def forward_backward(self, model: nn.Module, objective: Any, batch: dict[str, Tensor], weight: float,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         scaler: torch.amp.GradScaler) -> tuple[Tensor, dict[str, Any]]: ...

    def eval_stats(self, model: nn.Module, objective: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]: ...

    def shard(self, model: nn.Module) -> nn.Module: ...

    def loss_parallel(self) -> contextlib.AbstractContextManager: ...

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, optimizer: Optimizer,
                        trainer_state: dict[str, Any], keep_last: int) -> Path | None: ...

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]: ...


class SingleProcess:
    """The default strategy: one process, one device. Subclass it to change only what a strategy needs."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available")

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor

    def step_targets(self, n: int) -> float:
        return float(n)

    def barrier(self) -> None:
        return None

    def gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def forward_backward(self, model: nn.Module, objective: Any, batch: dict[str, Tensor], weight: float,
                         autocast: Callable[[], contextlib.AbstractContextManager],
                         scaler: torch.amp.GradScaler) -> tuple[Tensor, dict[str, Any]]:
        with autocast():
            loss, metrics = objective(model, batch)
        scaler.scale(loss * weight).backward()
        return loss.detach(), metrics

    def eval_stats(self, model: nn.Module, objective: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return objective.eval_stats(model, batch)

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def loss_parallel(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def save_checkpoint(self, run_dir: Path, step: int, model: nn.Module, optimizer: Optimizer,
                        trainer_state: dict[str, Any], keep_last: int) -> Path | None:
        """model.pt (the unwrapped model's state dict) and trainer.pt (with the optimizer's), by rank 0."""
        if not self.is_main:
            return None
        state = {**trainer_state, "optimizer": optimizer.state_dict()}
        return save_checkpoint(run_dir, step, self.unwrap(model).state_dict(), state, keep_last)

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        from lmforge.parallel import sharded_checkpoint  # parallel builds on this module

        if sharded_checkpoint.is_sharded_checkpoint(path):  # a model-parallel run, continued in one process
            return sharded_checkpoint.load(path, model, optimizer)
        model_state, state = load_checkpoint(path)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(state["optimizer"])
        return state


# --- optimizer and schedule ---------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float,
                 extra: nn.Module | None = None) -> list[dict[str, Any]]:
    """AdamW groups: decay for tensors with >= 2 dims (matrices, embeddings), none for biases and norms.

    `extra`: another module trained along (an objective's own parameters, e.g. a distillation projection).
    Tied or shared parameters (an LM head sharing the embedding) appear once; frozen ones not at all.
    """
    decay, no_decay, seen = [], [], set()
    for module in (model, extra) if extra is not None else (model,):
        for p in module.parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based).

    Warm-up: (step + 1) / (warmup_steps + 1) for step < warmup_steps. Then with progress
    p = (step - warmup) / (max_steps - warmup) in [0, 1]: constant 1; linear 1 - p; cosine
    (1 + cos(pi p)) / 2; the decayed value is mapped to [min_lr_ratio, 1].
    """
    w = config.warmup_steps
    if step < w:
        return (step + 1) / (w + 1)
    if config.schedule == "constant":
        return 1.0
    p = min(1.0, (step - w) / max(1, config.max_steps - w))
    decay = 1.0 - p if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def make_optimizer(model: nn.Module, config: TrainConfig,
                   extra: nn.Module | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, config.weight_decay, extra)`, fused on CUDA."""
    on_cuda = next(model.parameters()).is_cuda
    groups = param_groups(model, config.weight_decay, extra)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=on_cuda or None)


def make_scheduler(optimizer: Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


# --- checkpoints --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states, in types that `torch.load(weights_only=True)` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a folder is complete once it has its final name)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict[str, Tensor],
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    """Write checkpoints/step_<step>/{model.pt, trainer.pt} atomically; delete all but the last `keep_last`.

    Files go to a temporary folder (fsynced), which is then renamed to its final name and the parent fsynced:
    readers only ever see complete checkpoints.
    """
    tmp = new_checkpoint_folder(run_dir, step, tag=str(os.getpid()))
    _save_file(model_state, tmp / "model.pt")
    _save_file(trainer_state, tmp / "trainer.pt")
    return publish_checkpoint(tmp, step, keep_last)


def new_checkpoint_folder(run_dir: str | Path, step: int, tag: str) -> Path:
    """An empty temporary folder for the checkpoint of `step` (run_dir/checkpoints/.tmp-step_N-<tag>), to be
    filled and then handed to `publish_checkpoint`. A leftover of the same name is removed first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:08d}-{tag}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, step: int, keep_last: int) -> Path:
    """Make a filled temporary checkpoint folder the run's checkpoint step_N, atomically: every file and the
    folder fsynced, the folder renamed to its final name, the parent fsynced; then all but the last
    `keep_last` checkpoints deleted. A kill at any moment leaves the previous checkpoint intact."""
    root = tmp.parent
    final = root / f"step_{step:08d}"
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    if os.environ.get(KILL_IN_CHECKPOINT_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    if final.exists():  # re-saving a step (e.g. after resuming from it): move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in checkpoint_dirs(root.parent)[:-keep_last]:
        shutil.rmtree(stale)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(model state dict, trainer state) of a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    if not (path / "model.pt").is_file() or not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint folder (expected model.pt, trainer.pt)")
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    trainer_state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return model_state, trainer_state


def _remove_stale_temporaries(run_dir: Path) -> None:
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


# --- metrics log --------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of run_dir/metrics.jsonl (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {str(run_dir)!r}; is it a training run folder?")
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Appends JSON lines to run_dir/metrics.jsonl (rank 0 only; a no-op without a run dir)."""

    def __init__(self, run_dir: Path | None, enabled: bool, keep_until_step: int):
        self.path = run_dir / METRICS_FILE if (run_dir is not None and enabled) else None
        if self.path is None:
            return
        # Records after the step we (re)start from were logged by a run that was killed before checkpointing
        # them; drop them so the log reads as one uninterrupted run.
        kept = []
        if keep_until_step > 0 and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= keep_until_step]
        _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# --- the loop -----------------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _n_tokens(batch: dict[str, Tensor]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return batch["input_ids"].numel()


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _batches(data: Any, sampler: EpochSampler, start: int) -> Iterator[dict[str, Tensor]]:
    position = start
    while True:
        epoch, indices = sampler.batch(position)
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)
        yield data.collate([data[i] for i in indices])
        position += 1


def _check_dataset(data: Any, name: str) -> None:
    if not hasattr(data, "collate") or not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise TypeError(f"{name} must be a map-style dataset with collate(items) (see lmforge.data), "
                        f"got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")


def train(model: nn.Module, objective: Any, train_data: Any, config: TrainConfig, eval_data: Any = None,
          strategy: Strategy | None = None, resume: bool = False,
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
    """Train `model` in place with `objective` for `config.max_steps` optimizer steps (see module docstring).

    resume: continue from the latest checkpoint in config.run_dir (FileNotFoundError when the folder or its
        checkpoints do not exist). Without resume, a run_dir that already holds checkpoints is refused
        (ValueError), so that two runs never mix.
    on_step(step, record): called after every optimizer step with the step's train record (loss, lr, ...).
    Returns a `TrainResult`.
    """
    _check_dataset(train_data, "train_data")
    if eval_data is not None:
        _check_dataset(eval_data, "eval_data")
    strategy = strategy or SingleProcess(config.device)
    device = strategy.device
    run_dir = Path(config.run_dir) if config.run_dir else None
    checkpoint = None
    if resume:
        if run_dir is None:
            raise ValueError("resume=True needs config.run_dir, the folder of the run to continue")
        if not run_dir.is_dir():
            raise FileNotFoundError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is None:
            raise FileNotFoundError(f"cannot resume: no checkpoint in {str(run_dir / CHECKPOINT_DIR)!r}")
    elif run_dir is not None and checkpoint_dirs(run_dir):
        raise ValueError(f"run directory {str(run_dir)!r} holds checkpoints; resume it or use another")
    if run_dir is not None and strategy.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(run_dir)

    seed_everything(config.seed)
    model.to(device)
    model.train()
    model = strategy.shard(model)
    trained_objective = objective if isinstance(objective, nn.Module) else None
    if trained_objective is not None:
        trained_objective.to(device)
    optimizer = make_optimizer(model, config, trained_objective)
    scheduler = make_scheduler(optimizer, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    step, position = 0, 0
    if checkpoint is not None:
        state = strategy.load_checkpoint(checkpoint, model, optimizer)
        _check_resumable(state, config, strategy.world_size, checkpoint)
        if trained_objective is not None:
            trained_objective.load_state_dict(state["objective"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, position = state["step"], state["data_position"]
        # each rank's own RNG streams; a run resumed on more data-parallel ranks than it had reuses them
        set_rng_state(state["rng"][strategy.rank % len(state["rng"])])
    run_model, optimizer = strategy.prepare(model, optimizer)
    forward_model = torch.compile(run_model) if config.compile else run_model
    params = [p for g in optimizer.param_groups for p in g["params"]]

    sampler = EpochSampler(len(train_data), config.batch_size, seed=config.seed, rank=strategy.rank,
                           world_size=strategy.world_size)
    batches = _batches(train_data, sampler, position)
    log = MetricsLog(run_dir, strategy.is_main, step)
    history: list[dict[str, Any]] = []
    last_loss, eval_metrics, saved = None, None, checkpoint
    bar = tqdm(total=config.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (strategy.is_main and config.progress))
    tokens, t0 = 0, time.perf_counter()
    autocast = functools.partial(_autocast, device, config.precision)
    while step < config.max_steps:
        micro = [next(batches) for _ in range(config.grad_accum)]
        position += config.grad_accum
        counts = [objective.n_targets(b) for b in micro]
        total = strategy.step_targets(sum(counts))  # over every rank: ranks may hold different numbers
        tokens += sum(_n_tokens(b) for b in micro) * strategy.world_size
        lr = scheduler.get_last_lr()[0]
        step_loss: Tensor | float = 0.0
        step_metrics: dict[str, Tensor | float] = {}
        for i, batch in enumerate(micro):
            weight = counts[i] / total if total else 0.0
            with strategy.sync(run_model, i == len(micro) - 1), strategy.loss_parallel():
                loss, metrics = strategy.forward_backward(forward_model, objective, _to_device(batch, device),
                                                          weight, autocast, scaler)
            step_loss = step_loss + loss * weight
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v * weight
        grad_norm = None
        if config.clip_norm:
            scaler.unscale_(optimizer)
            grad_norm = strategy.clip_grad_norm(params, config.clip_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        bar.update(1)

        record: dict[str, Any] = {"step": step, "split": "train", "lr": lr}
        if step % config.log_every == 0 or step == config.max_steps or on_step is not None:
            elapsed = time.perf_counter() - t0
            names = [k for k in step_metrics if k != "loss"]
            values = torch.stack([torch.as_tensor(v, device=device).float()
                                  for v in [step_loss, *(step_metrics[k] for k in names)]])
            means = (strategy.all_reduce_sum(values) / strategy.world_size).tolist()  # one reduce for all
            record["loss"] = last_loss = means[0]
            record.update(zip(names, means[1:], strict=True))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
            if step % config.log_every == 0 or step == config.max_steps:
                log.write(record)
                history.append(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                tokens, t0 = 0, time.perf_counter()
        if on_step is not None:
            on_step(step, record)

        at_end = step == config.max_steps
        if eval_data is not None and ((config.eval_every and step % config.eval_every == 0) or at_end):
            eval_metrics = evaluate(forward_model, objective, eval_data,
                                    config.eval_batch_size or config.batch_size, strategy=strategy,
                                    precision=config.precision, max_batches=config.eval_max_batches)
            run_model.train()
            eval_record = {"step": step, "split": "eval", **eval_metrics}
            log.write(eval_record)
            history.append(eval_record)
        if run_dir is not None and ((config.save_every and step % config.save_every == 0) or at_end):
            rng = strategy.gather_object(rng_state())  # every rank's streams, restored per rank
            trainer_state = {"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng,
                             "step": step, "data_position": position, "data_world_size": strategy.world_size,
                             "config": config.to_dict()}
            if trained_objective is not None:
                trainer_state["objective"] = trained_objective.state_dict()
            saved = strategy.save_checkpoint(run_dir, step, run_model, optimizer, trainer_state,
                                             config.keep_last) or saved
            strategy.barrier()
    bar.close()
    return TrainResult(step=step, train_loss=last_loss, eval_metrics=eval_metrics, checkpoint=saved,
                       history=history)


def _check_resumable(state: dict[str, Any], config: TrainConfig, world_size: int, checkpoint: Path) -> None:
    """Refuse to resume with settings that change what the saved data position means (the data order).

    The global batch (batch_size x data-parallel ranks) must stay; how it is split over ranks may change (a
    run of 1 x 4 resumes as 2 x 2: rank r's batch k is the r-th slice of global batch k).
    """
    saved = state["config"]
    saved_world = state.get("data_world_size", 1)
    batch = "batch_size" if saved_world == world_size else "global batch (batch_size x data-parallel ranks)"
    now = {batch: (saved["batch_size"] * saved_world, config.batch_size * world_size),
           **{k: (saved.get(k), getattr(config, k)) for k in ("grad_accum", "seed")}}
    changed = {k: v for k, v in now.items() if v[0] != v[1]}
    if changed:
        detail = ", ".join(f"{k}: {old} in the checkpoint, {new} now" for k, (old, new) in changed.items())
        raise ValueError(f"cannot resume from {str(checkpoint)!r} with a different data order ({detail})")


@torch.no_grad()
def evaluate(model: nn.Module, objective: Any, data: Any, batch_size: int = 16,
             strategy: Strategy | None = None, precision: str = "fp32", max_batches: int | None = None,
             device: str | torch.device | None = None, progress: bool = False) -> dict[str, float]:
    """Metrics of `objective` over `data` in order (every item once; ranks take interleaved batches); a
    progress bar on the main rank when `progress`.

    The model is put in eval mode. Statistics from `objective.eval_stats` are summed over batches and ranks,
    then `objective.summarize` turns them into metrics (e.g. perplexity, accuracy, macro-F1).
    """
    _check_dataset(data, "evaluation data")
    strategy = strategy or SingleProcess(device or next(model.parameters()).device)
    model.eval()
    n_batches = math.ceil(len(data) / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    mine = list(range(strategy.rank, n_batches, strategy.world_size))
    concat = set(getattr(objective, "concat_stats", ()))
    totals: dict[str, Tensor] = {}
    parts: dict[str, list[Tensor]] = {k: [] for k in concat}
    # Every rank runs the same number of forwards (FSDP, tensor and pipeline parallel forwards are collective):
    # a rank with fewer batches of its own pads with batch 0 weighted by 0; so does a rank with none, so that
    # every rank reduces the same keys.
    rounds = max(1, math.ceil(n_batches / strategy.world_size))
    batches = [(b, 1.0) for b in mine] + [(0, 0.0)] * (rounds - len(mine))
    for b, weight in tqdm(batches, unit="batch", desc="evaluating", leave=False,
                          disable=not (progress and strategy.is_main)):
        items = [data[i] for i in range(b * batch_size, min(len(data), (b + 1) * batch_size))]
        with _autocast(strategy.device, precision), strategy.loss_parallel():
            stats = strategy.eval_stats(model, objective, _to_device(data.collate(items), strategy.device))
        for k, v in stats.items():
            if k in concat:
                if weight:
                    parts[k].append(v.detach().double().cpu())
            else:
                totals[k] = totals.get(k, 0) + v.double() * weight
    totals = {k: strategy.all_reduce_sum(v).cpu() for k, v in sorted(totals.items())}
    for k in sorted(concat):  # every rank's rows, in rank order
        totals[k] = torch.cat([t for rank_parts in strategy.gather_object(parts[k]) for t in rank_parts])
    return objective.summarize(totals)


def sliding_window_perplexity(model: nn.Module, ids: Tensor, window: int, stride: int,
                              precision: str = "fp32", progress: bool = False) -> dict[str, float]:
    """Perplexity of a causal LM over one token stream ids (N,), scored in windows of `window` tokens that
    advance by `stride` (transformers' documented sliding-window method): each window predicts only the tokens
    the previous one did not (its last `end - previous end`), with the rest of the window as context. With
    stride < window every token after the first is predicted exactly once; with stride = window (blocks) a
    block's first token is not. The last, partial window is kept.

    Returns {"loss", "perplexity", "tokens"} (mean negative log-likelihood per predicted token). Raises
    ValueError for a stride outside [1, window] or a stream shorter than two tokens.
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, {window}] (the window), got {stride}")
    if ids.dim() != 1 or len(ids) < 2:
        raise ValueError(f"need a 1-D stream of at least 2 tokens, got shape {tuple(ids.shape)}")
    device = next(model.parameters()).device
    model.eval()
    nll, count, prev_end = 0.0, 0, 0
    starts = range(0, max(len(ids) - window, 0) + stride, stride)  # the last one reaches the end
    with torch.no_grad():
        for begin in tqdm(starts, unit="window", desc="perplexity", disable=not progress, leave=False):
            end = min(begin + window, len(ids))
            chunk = ids[begin:end][None].to(device)  # (1, T)
            with _autocast(device, precision):
                logits = model(chunk).logits[0, :-1].float()  # (T-1, V): predictions of tokens 1..T-1
            losses = F.cross_entropy(logits, chunk[0, 1:], reduction="none")
            new = end - max(prev_end, begin + 1)  # tokens this window scores: those after the previous end
            nll += float(losses[-new:].double().sum())
            count += new
            prev_end = end
            if end == len(ids):
                break
    return {"loss": nll / count, "perplexity": math.exp(nll / count), "tokens": count}


# --- plots --------------------------------------------------------------------------------------------------


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's train loss, eval loss and eval metrics against steps (PNG, default run_dir/metrics.png).

    Raises FileNotFoundError without a metrics.jsonl and ValueError when it has no records.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train_recs = [r for r in records if r.get("split") == "train" and "loss" in r]
    eval_recs = [r for r in records if r.get("split") == "eval"]
    if not train_recs and not eval_recs:
        raise ValueError(f"{str(Path(run_dir) / METRICS_FILE)!r} holds no train or eval records to plot")
    extra = sorted({k for r in eval_recs for k in r if k in ("accuracy", "macro_f1", "perplexity")})
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(11 if extra else 6, 4), squeeze=False)
    ax = axes[0][0]
    distilled = any("loss_lm" in r or "loss_ce" in r for r in train_recs)  # a distillation run's records
    if train_recs:
        ax.plot([r["step"] for r in train_recs], [r["loss"] for r in train_recs],
                label="train: total distillation loss (weighted sum of its terms)" if distilled else "train loss")
    lm_recs = [r for r in train_recs if "loss_lm" in r]
    if lm_recs:
        ax.plot([r["step"] for r in lm_recs], [r["loss_lm"] for r in lm_recs],
                label="train: student's own task loss (the loss_lm term)")
    if eval_recs and any("loss" in r for r in eval_recs):
        ax.plot([r["step"] for r in eval_recs if "loss" in r], [r["loss"] for r in eval_recs if "loss" in r],
                "o-", label="eval: student's own task loss" if distilled else "eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean per target, nats)")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    if extra:
        ax2 = axes[0][1]
        for key in extra:
            points = [(r["step"], r[key]) for r in eval_recs if key in r]
            ax2.plot([s for s, _ in points], [v for _, v in points], "o-", label=key)
        ax2.set_xlabel("optimizer step")
        ax2.set_ylabel(", ".join(extra))
        ax2.set_title("evaluation metrics")
        ax2.legend()
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run_dir) / "metrics.png"
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out
