"""Batch normalisation whose statistics cover the batches of every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistributedBatchNorm1d"]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks; the gradient of each rank's input is the sum of the ranks'
    output gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class DistributedBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that, in training under ``torch.distributed`` with several ranks,
    normalises with the mean and variance of all ranks' batches together (as
    ``nn.SyncBatchNorm``, which runs on GPUs only; this one runs on any device and backend).

    So ``W`` ranks each with ``B / W`` rows compute what one process computes on the
    concatenated ``B`` rows (up to float rounding), gradients included (the statistics are
    summed with a differentiable ``all_reduce``). In one process, or in eval mode, it is
    ``nn.BatchNorm1d``.

    Args: as :class:`torch.nn.BatchNorm1d`, plus
        process_group (ProcessGroup, optional): the ranks to share statistics with.
            Default: the default group.

    Example::

        >>> norm = DistributedBatchNorm1d(13)
        >>> norm(torch.randn(8, 13)).shape
        torch.Size([8, 13])
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self._world() == 1 or x.dim() != 2:
            return super().forward(x)
        stats = torch.cat([x.sum(0), (x * x).sum(0),
                           torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)])
        stats = _AllReduceSum.apply(stats, self.process_group)
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                            else self.momentum)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
        out = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out
