"""SyncBatchNorm, Horovod's arguments: batch normalization with the batch statistics of every rank together.

torch.nn.SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU ..."), and so
does Horovod's; this one runs wherever lmforge's collectives run (gloo on CPU, NCCL on GPU).

In training (or with track_running_stats=False) each rank computes its per-channel count, mean and variance
(torch.var_mean, numerically stable), and one differentiable Sum allreduce of (count, count * mean,
count * (var + mean^2)) in float64 gives the mean and (biased) variance of the whole global batch. Autograd
through that allreduce (whose backward is the Sum allreduce of the gradients) gives each rank the gradient of
the sum of every rank's loss with respect to its input, as torch's and Horovod's SyncBatchNorm do; weight and
bias get this rank's own gradient (the DistributedOptimizer averages them). Running statistics are updated
with the global mean and the unbiased global variance. Every rank must run the layer the same number of times,
and backward through it too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from lmforge.parallel import runtime
from lmforge.parallel.collectives import Sum, allreduce


class SyncBatchNorm(_BatchNorm):
    """Batch normalization over the global batch (every rank's input of shape (N, C, ...) together).

    Arguments as Horovod's (and torch's BatchNorm): num_features C, eps, momentum (None: cumulative moving
    average), affine, track_running_stats. In eval mode with tracked statistics it normalizes with the
    running statistics and communicates nothing. Call lmforge.parallel.init() first.
    Raises ValueError for an input with fewer than 2 dimensions, another number of channels, or a global batch
    with only one value per channel in training.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects an input of shape (N, C, ...), got {input.dim()}-D")
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm({self.num_features}) got an input with {input.shape[1]} channels "
                             f"(shape {tuple(input.shape)})")

    def forward(self, input: Tensor) -> Tensor:
        """Normalize `input` (N, C, ...) per channel; see the class docstring."""
        self._check_input_dim(input)
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        factor = 0.0
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if runtime.size() == 1:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, factor,
                                self.eps)
        mean, var, count = self._global_stats(input)  # (C,) float64 each, and the values per channel
        if self.training and self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                unbiased = var * (count / (count - 1))
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        shape = [1, self.num_features] + [1] * (input.dim() - 2)  # broadcasts over (N, C, ...)
        invstd = torch.rsqrt(var + self.eps).to(input.dtype)
        out = (input - mean.to(input.dtype).view(shape)) * invstd.view(shape)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    def _global_stats(self, input: Tensor) -> tuple[Tensor, Tensor, float]:
        """Mean and biased variance per channel over every rank's batch, differentiable (float64), and the
        number of values per channel."""
        dims = [0, *range(2, input.dim())]
        local = input.numel() // self.num_features
        if local:
            var, mean = torch.var_mean(input, dims, correction=0)  # (C,) each
            mean, var = mean.double(), var.double()
            sums, squares = local * mean, local * (var + mean * mean)
        else:  # an empty shard: zeros that still carry the graph, so every rank reduces in backward too
            sums = input.sum(dims).double()
            squares = sums.clone()
        stats = torch.cat([sums, squares, sums.new_full((1,), float(local))])  # (2C + 1,)
        total = allreduce(stats, op=Sum, name="SyncBatchNorm.stats")
        c = self.num_features
        count = float(total[-1])
        if count <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, got a global "
                             f"batch of {count:g} per channel")
        mean = total[:c] / count
        var = (total[c: 2 * c] / count - mean * mean).clamp_min(0.0)
        return mean, var, count
