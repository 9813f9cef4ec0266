"""The differentiable forms of Horovod's collectives in ``tandem.torch``.

Horovod's ``allreduce``, ``grouped_allreduce``, ``allgather``, ``broadcast``, ``alltoall`` and
``reducescatter`` pass gradients back through themselves when their input requires grad, and
``tandem.torch`` does the same, with the gradients Horovod defines (so a ported script gets the
same numbers): an allreduce's gradient is the same allreduce of the output's gradients; an
allgather's is the average of the output's gradients, this process's rows of it; a broadcast's is
that average on the root and zero elsewhere; an alltoall's sends each part's gradient back where it
came from; a reducescatter's is the allgather of the output's gradients (times the world size for
``Sum``), with the pre- and post-scale factors applied again. ``Min``, ``Max`` and ``Product`` have
no gradient: a backward pass through them raises ``RuntimeError`` rather than returning numbers.
Every process must run the backward pass, in the same order, as it ran the forward one.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import torch


def _hvd() -> Any:
    import tandem.torch as hvd  # loaded by the time any of these runs

    return hvd


def _copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a gradient (autograd may hand over expanded or strided ones)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def _reducible(op: str, what: str) -> None:
    hvd = _hvd()
    if op not in (hvd.Average, hvd.Sum):
        raise RuntimeError(
            f"{what} with op={op!r} has no gradient (only Average and Sum do); reduce a detached "
            "tensor, or use op=Sum or Average"
        )


class Allreduce(torch.autograd.Function):
    """``allreduce`` that passes gradients back (the same allreduce of the output's gradients)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: str, pre: float, post: float) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post = op, pre, post
        return _hvd().allreduce_(_copy(tensor), op=op, prescale_factor=pre, postscale_factor=post)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        _reducible(ctx.op, "allreduce")
        out = _hvd().allreduce_(_copy(grad), op=ctx.op, prescale_factor=ctx.pre, postscale_factor=ctx.post)
        return out, None, None, None


class GroupedAllreduce(torch.autograd.Function):
    """``grouped_allreduce`` that passes gradients back (one grouped allreduce of them)."""

    @staticmethod
    def forward(ctx: Any, op: str, pre: float, post: float, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.op, ctx.pre, ctx.post = op, pre, post
        return tuple(_hvd().grouped_allreduce_([_copy(t) for t in tensors], op=op, prescale_factor=pre,
                                               postscale_factor=post))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Tuple[Any, ...]:
        _reducible(ctx.op, "grouped_allreduce")
        out = _hvd().grouped_allreduce_([_copy(g) for g in grads], op=ctx.op, prescale_factor=ctx.pre,
                                        postscale_factor=ctx.post)
        return (None, None, None, *out)


class Allgather(torch.autograd.Function):
    """``allgather`` that passes gradients back: the average of the output's gradients, this
    process's rows of it."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out, rows = _hvd()._allgather_rows(tensor)
        me = _hvd().rank()
        ctx.shape, ctx.start, ctx.rows = tensor.shape, sum(rows[:me]), rows[me]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        hvd = _hvd()
        avg = hvd.allreduce_(_copy(grad), op=hvd.Average)
        return avg.narrow(0, ctx.start, ctx.rows).reshape(ctx.shape)


class Broadcast(torch.autograd.Function):
    """``broadcast`` that passes gradients back: their average on the root, zero elsewhere."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root: int) -> torch.Tensor:
        ctx.root = root
        return _hvd().broadcast_(_copy(tensor), root)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        hvd = _hvd()
        avg = hvd.allreduce_(_copy(grad), op=hvd.Average)
        if hvd.rank() != ctx.root:
            avg.zero_()
        return avg, None


class Alltoall(torch.autograd.Function):
    """``alltoall`` that passes gradients back: each received part's gradient goes back to the
    process that sent it."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        hvd = _hvd()
        out, received = hvd._ordered(lambda: hvd._alltoall_now(tensor, splits, True))
        ctx.received = [int(k) for k in received]
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _unused: Any) -> Tuple[Any, ...]:
        hvd, g = _hvd(), _copy(grad)
        back, _ = hvd._ordered(lambda: hvd._alltoall_now(g, ctx.received, True))
        return back, None


class Reducescatter(torch.autograd.Function):
    """``reducescatter`` that passes gradients back: the allgather of the output's gradients
    (times the world size for ``Sum``), scaled again by the pre- and post-scale factors."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, op: str, pre: float, post: float) -> torch.Tensor:
        ctx.op, ctx.pre, ctx.post = op, pre, post
        hvd = _hvd()
        out: torch.Tensor = hvd._ordered(lambda: hvd._reducescatter_now(tensor, op, pre, post))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        hvd = _hvd()
        _reducible(ctx.op, "reducescatter")
        g = _copy(grad)
        scale = (hvd.size() if ctx.op == hvd.Sum else 1) * ctx.pre * ctx.post
        if scale != 1:
            g.mul_(scale)
        out, _ = hvd._allgather_rows(g)
        return out, None, None, None


def requires_grad(tensors: List[torch.Tensor]) -> bool:
    """Whether autograd should see a collective on ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
