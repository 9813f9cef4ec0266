"""Batch normalization over every process's batch: Horovod's ``hvd.SyncBatchNorm``, on CPU tensors
(torch's own ``SyncBatchNorm`` takes CUDA tensors only) and on CUDA ones alike.

In training, each process sums its batch's elements and squares per channel, one allreduce makes
the whole batch's mean and variance, and every process normalizes its part with them. Backward
reduces the two per-channel sums its input gradient needs in one more allreduce, so the gradient
is the whole batch's; the weight and bias gradients stay each process's own, for the
optimizer's averaging (as torch's and Horovod's do). In eval mode, or with no statistics to keep,
it is ``torch.nn.BatchNorm`` with the running statistics. Every process must call it in the same
order, as any collective. The sums are taken in float64.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F


def _dims(x: torch.Tensor) -> List[int]:
    """Every dimension but the channels'."""
    return [0] + list(range(2, x.dim()))


def _view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against ``x``."""
    return t.view([1, -1] + [1] * (x.dim() - 2))


def _summed(local: torch.Tensor) -> torch.Tensor:
    import tandem.torch as hvd

    return hvd.allreduce_(local, op=hvd.Sum)


class _SyncBatchNorm(torch.autograd.Function):
    """Normalizes with the statistics of every process's batch; returns the output, the mean and
    the unbiased variance (the last two for the running statistics)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = x.shape[1]
        xd = x.detach().double()
        count = torch.tensor([x.numel() // max(c, 1)], dtype=torch.float64, device=x.device)
        sums = _summed(torch.cat([count, xd.sum(_dims(x)), (xd * xd).sum(_dims(x))]))
        n = float(sums[0])
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel in training, got {n:.0f} "
                             f"over every process (input size {list(x.shape)} here)")
        mean = sums[1 : 1 + c] / n
        var = (sums[1 + c :] / n - mean * mean).clamp_(min=0.0)
        invstd = (var + eps).rsqrt()
        xhat = (xd - _view(mean, x)) * _view(invstd, x)
        y = xhat
        if weight is not None:
            y = y * _view(weight.detach().double(), x)
        if bias is not None:
            y = y + _view(bias.detach().double(), x)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.has_bias = n, bias is not None
        unbiased = var * (n / (n - 1))
        ctx.mark_non_differentiable(mean, unbiased)
        return y.to(x.dtype), mean.to(x.dtype), unbiased.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, _mean: Any, _var: Any) -> Tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dyd = dy.double()
        xhat = (x.double() - _view(mean, x)) * _view(invstd, x)
        sum_dy = dyd.sum(_dims(x))
        sum_dy_xhat = (dyd * xhat).sum(_dims(x))
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(x.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            every = _summed(torch.cat([sum_dy, sum_dy_xhat]))
            scale = invstd if weight is None else invstd * weight.detach().double()
            grad_x = _view(scale, x) * (dyd - _view(every[:c] / ctx.n, x) - xhat * _view(every[c:] / ctx.n, x))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """``torch.nn.BatchNorm1d/2d/3d`` whose training statistics are every process's batch's
    (Horovod's ``hvd.SyncBatchNorm``); takes inputs of 2 to 5 dimensions, channels second.

    >>> import tandem.torch as hvd
    >>> bn = hvd.SyncBatchNorm(16)          # in place of torch.nn.BatchNorm2d(16)
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected an input of 2 or more dimensions (channels second), "
                             f"got {input.dim()}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: the input has {input.shape[1]} channels, the layer "
                             f"{self.num_features}")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                                factor, self.eps)
        y, mean, var = _SyncBatchNorm.apply(input, self.weight, self.bias, self.eps)
        if self.training and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
                self.running_var.mul_(1 - factor).add_(var, alpha=factor)
        out: torch.Tensor = y
        return out
