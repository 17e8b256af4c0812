"""Distributed strategies for the training loop (`lmforge.training.train(..., strategy=...)`).

    strategy = make_strategy("allreduce" | "ddp" | "ps" | "fsdp")   # under torchrun --nproc-per-node N
    strategy = make_strategy("ddp", tp=2, dp=2)                      # a model-parallel layout (MeshStrategy)
    result = run_training(model, objective, data, config, strategy=strategy, resume=resume)

Every strategy joins the process group torchrun describes (`lmforge.parallel.init`, which keys its store by
torchrun's restart attempt); the loop then shards the data by `strategy.rank` / `strategy.world_size` (its
`EpochSampler`), logs and checkpoints on `is_main` only, and reduces metrics with `all_reduce_sum`.

- "allreduce": lmforge's Horovod-style `DistributedOptimizer` (gradients averaged by bucketed allreduces
  launched from gradient hooks while backward runs), parameters and optimizer state broadcast from rank 0.
- "ddp": torch's `DistributedDataParallel`, the reference.
- "ps": the parameter server (`lmforge.parallel.ps`): the first `n_servers` ranks hold the parameters and the
  optimizer state, the other ranks train as workers. `run_training` runs the server loop on server ranks.
- "fsdp", or any layout (dp/tp, sequence parallelism, activation checkpointing): `MeshStrategy`, the model
  split over a DeviceMesh by `lmforge.parallel.plans` (tensor parallel, FSDP2), sharded checkpoints that any
  layout resumes (`lmforge.parallel.sharded_checkpoint`).
- pp > 1 (with "ddp" or "allreduce"): `lmforge.parallel.pipeline.PipelineStrategy`, the layer stack in stages
  with GPipe, 1F1B or interleaved 1F1B micro-batches, tensor parallelism within each stage (PP x TP), DP x PP
  (x TP) over the rest of the ranks.

Gradient clipping clips the averaged gradient for allreduce and ddp, each worker's own gradient for ps.
With `torchrun --max-restarts`, `run_training` resumes from the run's last checkpoint when torchrun restarts
the job (TORCHELASTIC_RESTART_COUNT > 0).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel as tensor_parallel_loss
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

import lmforge.parallel as hvd
from lmforge.parallel import sharded_checkpoint
from lmforge.parallel.mesh import Layout, coordinate
from lmforge.parallel.mesh import group as mesh_group
from lmforge.parallel.plans import DataParallel, check_plan, clip_grad_norm, parallelize_model
from lmforge.parallel.ps import Mode, ParameterServer, PSWorker, ServerLog, check_mode, is_server
from lmforge.training import (
    SingleProcess,
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    train,
)

STRATEGIES = ("allreduce", "ddp", "ps", "fsdp")
PIPELINE_PENDING = ("MeshStrategy runs layouts with pp = 1; pipeline layouts run on "
                    "lmforge.parallel.pipeline.PipelineStrategy (make_strategy picks it for pp > 1)")


def restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Distributed(SingleProcess):
    """Common part: join the process group, place the model (cuda:LOCAL_RANK with NCCL, else CPU), reduce
    over `group` (None: every rank)."""

    group: Any = None

    def __init__(self, timeout: float = 60.0, backend: str | None = None):
        hvd.init(timeout=timeout, backend=backend)
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.is_main = self.rank == 0
        on_gpu = dist.get_backend() == "nccl"
        super().__init__(torch.device("cuda", hvd.local_rank()) if on_gpu else "cpu")

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def step_targets(self, n: int) -> float:
        """The mean over data ranks of the step's loss terms (gradients are averaged over them); reduced with
        lmforge's collectives, so that a dead peer ends in a `CollectiveError` naming it. Every process
        counts: the tensor- and pipeline-parallel ranks of a data rank hold its batch, so the mean over all
        processes is the mean over data ranks."""
        total = hvd.allreduce(torch.tensor([float(n)], dtype=torch.float64, device=self.device), op=hvd.Sum,
                              name="lmforge.step_targets")
        return float(total) / hvd.size()

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def check_run(self, config: TrainConfig, has_eval: bool) -> None:
        """Called by `run_training` before the loop: refuse settings this strategy cannot run."""

    def finish(self) -> None:
        """Called once by `run_training` after the loop returns."""

    def full_model(self, model: nn.Module) -> nn.Module:
        """The trained model as an ordinary module (every rank calls it): here the model itself."""
        return model


class DDPStrategy(Distributed):
    """torch.nn.parallel.DistributedDataParallel: gradients averaged during backward; no_sync while
    accumulating micro-batches."""

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids), optimizer

    def sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else model.no_sync()


class AllreduceStrategy(Distributed):
    """lmforge.parallel.DistributedOptimizer: Horovod-style data parallelism by allreduce.

    The optimizer accumulates `grad_accum` backward passes locally before it reduces
    (backward_passes_per_step), so the loop's micro-batches cost one allreduce per step, as with DDP's
    no_sync.
    """

    def __init__(self, grad_accum: int = 1, compression: Any = None, timeout: float = 60.0,
                 backend: str | None = None):
        super().__init__(timeout, backend)
        self.grad_accum = grad_accum
        self.compression = compression or hvd.Compression.none
        self.optimizer: Any = None
        self._skip = contextlib.ExitStack()  # holds skip_synchronize() from a clip until the next step's sync

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Optimizer]:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if optimizer.state:  # resumed (every rank loaded the same checkpoint); a fresh one stays fresh
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        self.optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                                  compression=self.compression,
                                                  backward_passes_per_step=self.grad_accum)
        return model, self.optimizer

    def sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        self._skip.close()  # a new step: its step() synchronizes again
        return super().sync(model, sync)

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float) -> Tensor:
        self.optimizer.synchronize()  # clip the averaged gradients; this step's step() must not sync again
        self._skip.enter_context(self.optimizer.skip_synchronize())
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class _PSOptimizer:
    """What the loop steps on a parameter-server worker: `step()` pushes the gradients and pulls parameters.

    Learning rates, zero_grad and param_groups are the local optimizer's (the loop's schedule sets them; the
    servers receive them with each push); `state_dict()` gathers the servers' optimizer state into the
    ordinary single-process format, so checkpoints look the same whatever the strategy.
    """

    def __init__(self, optimizer: Optimizer, worker: PSWorker):
        self.optimizer, self.worker = optimizer, worker

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.worker.step()
        self.optimizer._opt_called = True  # an LR scheduler checks this flag
        return loss

    def state_dict(self) -> dict[str, Any]:
        local = self.optimizer.state_dict()
        return {"state": self.worker.optimizer_state(), "param_groups": local["param_groups"]}


class PSStrategy(Distributed):
    """Parameter-server training: ranks 0..n_servers-1 serve, the others are workers.

    On workers, rank / world_size / is_main describe the worker's place among the workers (the data is sharded
    over workers only, the first worker logs and checkpoints) and `group` is the workers' process group.
    Needs the gloo backend (any-source receives): models train on CPU.
    """

    def __init__(self, n_servers: int = 1, mode: Mode = "sync", tau: int | None = None,
                 timeout: float = 60.0):
        check_mode(mode, tau)
        super().__init__(timeout, backend="gloo")
        world = dist.get_world_size()
        if not 1 <= n_servers < world:
            raise ValueError(f"ps strategy needs 1 <= n_servers < world size ({world}), "
                             f"got n_servers={n_servers}")
        self.n_servers, self.mode, self.tau = n_servers, mode, tau
        self.timeout = datetime.timedelta(seconds=timeout)
        self.global_rank = dist.get_rank()
        self.is_server = is_server(self.global_rank, n_servers)
        self.group = dist.new_group(list(range(n_servers, world)))  # every rank must create it
        self.rank = -1 if self.is_server else self.global_rank - n_servers
        self.world_size = world - n_servers
        self.is_main = self.rank == 0
        self.worker: PSWorker | None = None

    def step_targets(self, n: int) -> float:
        """sync: the workers' mean, as allreduce (the servers average the workers' gradients); async and
        bounded: this worker's own n (its gradient is applied alone, and a collective would make workers wait
        for each other)."""
        if self.mode != "sync":
            return float(n)
        return float(self.all_reduce_sum(torch.tensor([float(n)], dtype=torch.float64))) / self.world_size

    def prepare(self, model: nn.Module, optimizer: Optimizer) -> tuple[nn.Module, Any]:
        if self.is_server:
            raise ValueError(f"rank {self.global_rank} is a parameter server; run it with run_training()")
        self.worker = PSWorker(optimizer, self.n_servers, timeout=self.timeout)
        return model, _PSOptimizer(optimizer, self.worker)

    def serve(self, optimizer: Optimizer) -> ServerLog:
        """Run this server rank until every worker has finished."""
        return ParameterServer(optimizer, self.n_servers, self.mode, self.tau, timeout=self.timeout).serve()

    def finish(self) -> None:
        if self.worker is not None:
            self.worker.close()


class MeshStrategy(Distributed):
    """A layout dp x pp x tp on one DeviceMesh (`lmforge.parallel.mesh`), applied by `plans.parallelize_model`.

    rank / world_size / group are the data-parallel coordinate, degree and group (the loop shards the data
    over dp; tensor-parallel peers see the same batch); is_main is global rank 0. Data parallelism is "fsdp"
    (FSDP2 `fully_shard`, with tp > 1 the 2-D FSDP x TP) or "ddp" (replicas whose gradients are averaged over
    dp by one flat all-reduce after the step's last backward, as DDP does, here also across tensor-parallel
    shards).
    Checkpoints are sharded and layout-independent (`sharded_checkpoint`): a run resumes in another layout.
    """

    def __init__(self, dp: int | None = None, tp: int = 1, pp: int = 1, data_parallel: DataParallel = "ddp",
                 sequence_parallel: bool = False, activation_checkpointing: bool = False,
                 timeout: float = 60.0, backend: str | None = None):
        super().__init__(timeout, backend)
        self.layout = Layout.parse(dp=dp, pp=pp, tp=tp, world_size=dist.get_world_size())
        if self.layout.pp > 1:
            raise ValueError(PIPELINE_PENDING)
        check_plan(self.layout.dp, self.layout.tp, data_parallel, sequence_parallel)
        self.data_parallel = data_parallel
        self.timeout = timeout
        self.sequence_parallel = sequence_parallel
        self.activation_checkpointing = activation_checkpointing
        self.mesh = self.layout.build(self.device.type)
        self.global_rank = dist.get_rank()
        self.rank, self.world_size = coordinate(self.mesh, "dp"), self.layout.dp
        self.is_main = self.global_rank == 0
        self.group = mesh_group(self.mesh, "dp")
        self._loss_parallel = False

    def shard(self, model: nn.Module) -> nn.Module:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)  # one start for every rank, before splitting
        has_vocab_head = getattr(model, "lm_head", None) is not None or getattr(model, "mlm_head", None) is not None
        self._loss_parallel = self.layout.tp > 1 and has_vocab_head
        return parallelize_model(model, self.mesh, self.data_parallel, self.sequence_parallel,
                                 self.activation_checkpointing)

    def loss_parallel(self) -> contextlib.AbstractContextManager:
        return tensor_parallel_loss() if self._loss_parallel else contextlib.nullcontext()

    @contextlib.contextmanager
    def sync(self, model: nn.Module, sync: bool):
        fsdp = self.data_parallel == "fsdp" and self.layout.dp > 1
        if fsdp:
            model.set_requires_gradient_sync(sync)
        yield
        if sync and not fsdp and self.layout.dp > 1:
            self._average_gradients(model)

    @torch.no_grad()
    def _average_gradients(self, model: nn.Module) -> None:
        """Every local gradient shard averaged over the data-parallel group, in one flat all-reduce."""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                 for p in model.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.layout.dp
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def clip_grad_norm(self, parameters: list[Tensor], max_norm: float) -> Tensor:
        return clip_grad_norm(parameters, max_norm)

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if isinstance(tensor, DTensor):  # a loss under loss_parallel: the same value on every tp rank
            tensor = tensor.full_tensor()
        return super().all_reduce_sum(tensor)

    def barrier(self) -> None:
        dist.barrier()

    def save_checkpoint(self, run_dir: Any, step: int, model: nn.Module, optimizer: Optimizer,
                        trainer_state: dict[str, Any], keep_last: int) -> Any:
        return sharded_checkpoint.save(run_dir, step, model, optimizer, trainer_state, keep_last)

    def load_checkpoint(self, path: Any, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
        return sharded_checkpoint.load(path, model, optimizer)

    def full_model(self, model: nn.Module) -> nn.Module:
        """An ordinary (unsharded) copy of the trained model, on the CPU of every rank (a collective)."""
        from lmforge.models import build_model

        state = sharded_checkpoint.full_state_dict(model)
        plain = build_model(model.config)
        plain.load_state_dict(state)
        return plain


def make_strategy(name: str, grad_accum: int = 1, n_servers: int = 1, mode: Mode = "sync",
                  tau: int | None = None, timeout: float = 60.0, dp: int | None = None, tp: int = 1,
                  pp: int = 1, sequence_parallel: bool = False, activation_checkpointing: bool = False,
                  schedule: str = "1f1b", microbatches: int = 4, pp_split: list[int] | None = None) -> Distributed:
    """The strategy called `name` ("allreduce", "ddp", "ps" or "fsdp"); joins the process group.

    With tp, pp or dp given, sequence_parallel or activation_checkpointing (or "fsdp"), a `MeshStrategy`:
    "fsdp" shards over dp with FSDP2, "ddp" and "allreduce" replicate over dp. "ps" takes no layout.
    With pp > 1 ("ddp" or "allreduce": replicas averaged over dp), a `PipelineStrategy` with `schedule`
    ("gpipe" or "1f1b"), `microbatches` per batch, `pp_split` (layers per stage; default balanced) and tp
    (tensor parallelism within each stage).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    if pp != 1:
        if name not in ("allreduce", "ddp") or sequence_parallel or activation_checkpointing:
            raise ValueError(f"--pp {pp} runs with --strategy ddp or allreduce (with --tp or without), without "
                             f"sequence parallelism or activation checkpointing (pipeline x FSDP is not "
                             f"supported); got strategy {name!r}")
        from lmforge.parallel.pipeline import PipelineStrategy

        return PipelineStrategy(pp=pp, dp=dp, tp=tp, schedule=schedule, microbatches=microbatches,
                                split=pp_split, timeout=timeout)
    mesh_options = tp != 1 or dp is not None or sequence_parallel or activation_checkpointing
    if name == "fsdp" or (mesh_options and name in ("allreduce", "ddp")):
        return MeshStrategy(dp=dp, tp=tp, pp=pp, data_parallel="fsdp" if name == "fsdp" else "ddp",
                            sequence_parallel=sequence_parallel, activation_checkpointing=activation_checkpointing,
                            timeout=timeout)
    if mesh_options:
        raise ValueError(f"strategy {name!r} takes no --dp/--tp/--pp layout; use fsdp, ddp or allreduce")
    if name == "allreduce":
        return AllreduceStrategy(grad_accum=grad_accum, timeout=timeout)
    if name == "ddp":
        return DDPStrategy(timeout=timeout)
    return PSStrategy(n_servers=n_servers, mode=mode, tau=tau, timeout=timeout)


def run_training(model: nn.Module, objective: Any, train_data: Any, config: TrainConfig,
                 strategy: Distributed, eval_data: Any = None, resume: bool = False,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult | ServerLog:
    """`lmforge.training.train` under `strategy`, resuming after a torchrun restart.

    resume: as in `train`; also turned on when torchrun restarted the job and the run has a checkpoint.
    on_step: as in `train` (workers only).
    Parameter-server ranks serve instead of training (their optimizer, with the checkpoint's state when
    resuming, built as the loop builds it) and return their `ServerLog`; workers return the `TrainResult`.
    """
    strategy.check_run(config, eval_data is not None)
    if config.run_dir and restart_count() > 0 and latest_checkpoint(config.run_dir) is not None:
        resume = True
    if isinstance(strategy, AllreduceStrategy):
        strategy.grad_accum = config.grad_accum  # one allreduce per optimizer step
    if isinstance(strategy, PSStrategy) and strategy.is_server:
        trained_objective = objective if isinstance(objective, nn.Module) else None  # as the loop does
        optimizer = make_optimizer(model, config, trained_objective)
        if resume:
            checkpoint = latest_checkpoint(config.run_dir) if config.run_dir else None
            if checkpoint is None:
                raise FileNotFoundError(f"cannot resume: no checkpoint in run directory {config.run_dir!r}")
            model_state, state = load_checkpoint(checkpoint)
            model.load_state_dict(model_state)
            if trained_objective is not None:
                trained_objective.load_state_dict(state["objective"])
            optimizer.load_state_dict(state["optimizer"])
        return strategy.serve(optimizer)
    try:
        result = train(model, objective, train_data, config, eval_data=eval_data, strategy=strategy,
                       resume=resume, on_step=on_step)
    except RuntimeError as err:
        if isinstance(strategy, MeshStrategy) and _is_peer_failure(err):
            last = latest_checkpoint(config.run_dir) if config.run_dir else None
            where = f"its last checkpoint is {str(last)!r}" if last else "it has no checkpoint yet"
            raise hvd.CollectiveError(
                f"rank {strategy.global_rank} of layout {strategy.layout.describe()}: a collective failed because "
                f"a peer rank died or stopped answering within {strategy.timeout:g} s ({str(err).splitlines()[0]}); "
                f"the job stops here; {where}: run the same command with --resume to continue") from err
        raise
    strategy.finish()
    return result


def _is_peer_failure(err: RuntimeError) -> bool:
    """Whether an error raised inside a collective means that another rank died or hung."""
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("Connection reset", "Connection closed", "Connection refused", "timed out",
                            "Timeout", "Broken pipe", "gloo/transport"))

