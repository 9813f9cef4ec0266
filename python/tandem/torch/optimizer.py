"""Horovod's ``DistributedOptimizer`` for any ``torch.optim`` optimizer.

Each parameter's gradient joins a fusion bucket from a hook that runs as soon as backward has
accumulated it; a bucket whose gradients are all there starts its allreduce at once, on the thread
that runs Tandem's background calls, so the network overlaps the rest of backward. Buckets start
strictly in one order (the reverse of the parameters', roughly the order backward produces them),
the same on every process. ``step()`` waits for them (``synchronize()``), writes the averaged
gradients back and steps the wrapped optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import _ops
from ._async import Handle
from .compression import BF16Compressor, Compression, FP16Compressor, NoneCompressor, ReducingCompressor

#: Where the optimizer's ``state_dict`` keeps the compression state of its buckets.
COMPRESSION_KEY = "tandem_compression"

#: Size of one fusion bucket (``TANDEM_FUSION_BYTES``; Horovod's default is 64 MiB).
FUSION_BYTES = 64 << 20


def _fusion_bytes() -> int:
    from .._native import setting  # the Rust table's reading and wording

    n = setting("TANDEM_FUSION_BYTES")
    return FUSION_BYTES if n is None else n


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods mixed into a subclass of the wrapped optimizer's class."""

    def __init__(self, params: Any, named_parameters: Any, compression: Any, backward_passes_per_step: int,
                 op: str, gradient_predivide_factor: float) -> None:
        super(self.__class__, self).__init__(params)  # the wrapped optimizer's own __init__
        from . import Average, Sum, Min, Max, Product, size

        if op not in (Average, Sum, Min, Max, Product):
            raise ValueError(f"op={op!r} is not one of tandem.torch.Average, Sum, Min, Max, Product")
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step={backward_passes_per_step} must be at least 1")
        if gradient_predivide_factor <= 0:
            raise ValueError(f"gradient_predivide_factor={gradient_predivide_factor} must be positive")
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor only applies to op=Average")
        if compression is None:
            from .. import group

            # The group's default (``init(compression=...)``, ``TANDEM_COMPRESSION``), as the
            # numpy optimizer does.
            compression = Compression.setting(group().compression)
        self._compression = compression
        self._passes_per_step = backward_passes_per_step
        self._op = op
        self._predivide = gradient_predivide_factor
        self._size = size()
        params_list = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        self._names = self._check_names(named_parameters, params_list)
        self._buckets = self._make_buckets(params_list, _fusion_bytes())
        self._bucket_of = {p: i for i, b in enumerate(self._buckets) for p in b}
        self._index = {p: i for i, p in enumerate(params_list)}
        self._skip = False
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in params_list]

    # -- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _check_names(named_parameters: Any, params: List[torch.Tensor]) -> Dict[torch.Tensor, str]:
        if named_parameters is None:
            return {p: f"param.{i}" for i, p in enumerate(params)}
        named = list(named_parameters)
        if any(not isinstance(n, tuple) or len(n) != 2 for n in named):
            raise ValueError("named_parameters must be (name, parameter) pairs, as model.named_parameters() gives")
        names = [n for n, _ in named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"named_parameters has duplicate names: {dupes}")
        by_param = {p: n for n, p in named}
        missing = [i for i, p in enumerate(params) if p not in by_param]
        if missing:
            raise ValueError(
                f"named_parameters does not name {len(missing)} of the optimizer's parameters (indices {missing[:5]})"
            )
        return by_param

    @staticmethod
    def _make_buckets(params: List[torch.Tensor], fusion: int) -> List[List[torch.Tensor]]:
        buckets: List[List[torch.Tensor]] = []
        open_by_dtype: Dict[torch.dtype, Tuple[List[torch.Tensor], List[int]]] = {}
        for p in reversed(params):
            cur, size = open_by_dtype.get(p.dtype, (None, [0]))
            n = p.numel() * p.element_size()
            if cur is None or (cur and size[0] + n > fusion):
                cur, size = [], [0]
                buckets.append(cur)
                open_by_dtype[p.dtype] = (cur, size)
            cur.append(p)
            size[0] += n
        return buckets

    def _reset(self) -> None:
        self._passes: Dict[torch.Tensor, int] = {}
        self._ready: List[int] = [0] * len(self._buckets)
        self._next = 0
        self._inflight: List[Tuple[int, Handle, torch.Tensor, Any]] = []

    # -- during backward ----------------------------------------------------------------------

    def _grad_ready(self, p: torch.Tensor) -> None:
        n = self._passes.get(p, 0) + 1
        self._passes[p] = n
        if n != self._passes_per_step:
            return
        self._ready[self._bucket_of[p]] += 1
        self._launch(force=False)

    def _launch(self, force: bool) -> None:
        from . import Average, _pg

        while self._next < len(self._buckets):
            b = self._next
            bucket = self._buckets[b]
            if not force and self._ready[b] < len(bucket):
                return
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = torch.cat([g.reshape(-1) for g in grads])
            if self._predivide != 1.0:
                flat.div_(self._predivide)
            op = "sum" if self._op == Average else self._op
            pg = _pg()
            if getattr(self._compression, "reduces", False):
                # Top-k, PowerSGD: the compressor allreduces with the bucket's own state.
                wire, ctx = flat, None
                comp = self._compression
                parts = [(self._index[p], p.shape) for p in bucket]
                handle = Handle(lambda wire=wire, op=op, b=b, parts=parts: comp.reduce(pg, wire, op, b, parts))
            else:
                wire, ctx = self._compression.compress(flat)
                handle = Handle(lambda wire=wire, op=op: _ops.allreduce(pg, wire, op))
            self._inflight.append((b, handle, wire, ctx))
            self._next += 1

    # -- Horovod's interface ------------------------------------------------------------------

    def synchronize(self) -> None:
        """Starts the buckets not started yet, waits for every one, and writes the reduced
        gradients into ``p.grad``."""
        from . import Average

        self._launch(force=True)
        # Tandem's own compressors hand back a tensor made for this step, which the gradients
        # can then share (no copies); a user's compressor may keep what it returns.
        owned = self._compression in (NoneCompressor, FP16Compressor, BF16Compressor) or isinstance(
            self._compression, ReducingCompressor
        )
        try:
            for b, handle, wire, ctx in self._inflight:
                handle.wait()
                flat = self._compression.decompress(wire, ctx)
                if self._op == Average:
                    scale = self._predivide / self._size
                    flat = flat.mul_(scale) if owned else flat * scale
                pos = 0
                for p in self._buckets[b]:
                    n = p.numel()
                    view = flat[pos : pos + n].view(p.shape)
                    g = view.to(p.dtype)
                    shares = owned or g.data_ptr() != view.data_ptr()  # .to() made it a copy
                    if p.grad is None:
                        p.grad = g if shares else g.clone()
                    elif shares:
                        p.grad.set_(g)  # as Horovod does: the gradient now lives in the bucket
                    else:
                        p.grad.detach().copy_(g)
                    pos += n
        finally:
            self._reset()

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state, and under ``"tandem_compression"`` each bucket's
        compression state (residuals, warm starts) when the compression keeps one."""
        state = super(self.__class__, self).state_dict()
        saved = getattr(self._compression, "state_dict", None)
        if saved is not None:
            state[COMPRESSION_KEY] = saved()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores what :meth:`state_dict` saved, compression state included."""
        state = dict(state_dict)
        saved = state.pop(COMPRESSION_KEY, None)
        super(self.__class__, self).load_state_dict(state)
        if saved is not None and hasattr(self._compression, "load_state_dict"):
            self._compression.load_state_dict(saved)

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Within it, ``step()`` does not synchronize (call ``synchronize()`` yourself first, e.g.
        to clip the averaged gradients)."""
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure: Any = None) -> Any:
        if not self._skip:
            self.synchronize()
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._inflight:
            raise RuntimeError(
                "zero_grad() while gradients are being reduced; call step() or synchronize() first"
            )
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,  # noqa: N802 - Horovod's name
                         compression: Any = None, backward_passes_per_step: int = 1, op: Optional[str] = None,
                         gradient_predivide_factor: float = 1.0, **_ignored: Any) -> torch.optim.Optimizer:
    """Wraps ``optimizer`` (any ``torch.optim`` optimizer) so that ``step()`` applies the gradients
    averaged over every process (``op``: ``Average`` by default, or ``Sum``, ``Min``, ``Max``,
    ``Product``), reduced in fused buckets that start during backward.

    ``compression`` (``Compression.fp16``/``bf16``) sends them at half size (default: the group's
    setting, ``init(compression=...)`` or ``TANDEM_COMPRESSION``, else none);
    ``Compression.topk(fraction)`` and ``Compression.powersgd(rank)`` send far less, keeping the
    error per bucket for the next steps (save ``compression.state_dict()`` with a checkpoint);
    ``backward_passes_per_step=N`` reduces after every N-th backward (gradients accumulate
    locally between); ``gradient_predivide_factor=f`` divides by f before the sum and by
    ``size/f`` after.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"DistributedOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
    from . import Average

    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    return cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
               Average if op is None else op, gradient_predivide_factor)
