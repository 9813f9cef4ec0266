"""Training helpers in the idiom of Horovod: broadcast the initial parameters, and average
gradients in fused buffers (one network operation per buffer, not one per tensor)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from . import Group

#: Default size of one fusion buffer (Horovod's default is 64 MiB as well).
FUSION_BYTES = 64 << 20


def _group(group: Optional["Group"]) -> "Group":
    from . import group as default_group

    return group if group is not None else default_group()


def _buckets(arrays: Sequence[np.ndarray], fusion_bytes: int) -> List[List[int]]:
    """Indices of ``arrays`` grouped by dtype, each group cut into runs of at most ``fusion_bytes``."""
    by_dtype: Dict[np.dtype, List[int]] = {}
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"item {i} is a {type(a).__name__}, not a numpy.ndarray")
        by_dtype.setdefault(a.dtype, []).append(i)
    out: List[List[int]] = []
    for idx in by_dtype.values():
        cur: List[int] = []
        size = 0
        for i in idx:
            n = arrays[i].nbytes
            if cur and size + n > fusion_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            out.append(cur)
    return out


def _fused(arrays: Sequence[np.ndarray], fusion_bytes: int, op: Any) -> None:
    """Packs each bucket into one buffer, runs ``op(buffer)`` on it, and unpacks in place."""
    for bucket in _buckets(arrays, fusion_bytes):
        dtype = arrays[bucket[0]].dtype
        total = sum(arrays[i].size for i in bucket)
        buf = np.empty(total, dtype=dtype)
        pos = 0
        for i in bucket:
            n = arrays[i].size
            buf[pos : pos + n] = arrays[i].reshape(-1)
            pos += n
        op(buf)
        pos = 0
        for i in bucket:
            a = arrays[i]
            n = a.size
            a[...] = buf[pos : pos + n].reshape(a.shape)
            pos += n


def _host_arrays(arrays: Any) -> List[np.ndarray]:
    """numpy arrays, torch tensors (viewed without a copy), or a ``state_dict()``-like mapping of
    them (in the order of its sorted names, the same on every rank)."""
    from ._arrays import host_array

    if isinstance(arrays, dict):
        arrays = [arrays[k] for k in sorted(arrays)]
    return [host_array(a, f"item {i}")[0] for i, a in enumerate(arrays)]


def broadcast_parameters(arrays: Any, root: int = 0, group: Optional["Group"] = None,
                         fusion_bytes: int = FUSION_BYTES) -> None:
    """Overwrites every array with ``root``'s values, in fused broadcasts (call it once before
    training so every rank starts from the same parameters). Takes numpy arrays, CPU torch
    tensors, or a mapping of them such as ``model.state_dict()``."""
    g = _group(group)
    _fused(_host_arrays(arrays), fusion_bytes, lambda buf: g.broadcast(buf, root))


def allreduce_fused(arrays: Sequence[np.ndarray], op: str = "avg", group: Optional["Group"] = None,
                    fusion_bytes: int = FUSION_BYTES) -> None:
    """Reduces every array over the group in place, packing them into fusion buffers of at most
    ``fusion_bytes`` per dtype so a model with many small tensors costs a few network operations."""
    g = _group(group)
    _fused(_host_arrays(arrays), fusion_bytes, lambda buf: g.allreduce(buf, op))


class SGD:
    """Plain (momentum) SGD on numpy arrays: ``step(params, grads)`` updates ``params`` in place."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self._velocity: Optional[List[np.ndarray]] = None
        self._scratch: Optional[List[np.ndarray]] = None

    def step(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        if len(params) != len(grads):
            raise ValueError(f"{len(params)} parameters but {len(grads)} gradients")
        if self.momentum and self._velocity is None:
            self._velocity = [np.zeros_like(p) for p in params]
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.shape != g.shape:
                raise ValueError(f"parameter {i} has shape {p.shape} but its gradient {g.shape}")
            d = g + self.weight_decay * p if self.weight_decay else g
            if self.momentum and self._velocity is not None:
                v = self._velocity[i]
                v *= self.momentum
                v += d
                d = v
            # Scaled into a buffer kept per parameter: a fresh temporary of a large parameter
            # costs the kernel's page faults every step.
            if self._scratch is None or len(self._scratch) != len(params):
                self._scratch = [np.empty_like(q) for q in params]
            scratch = self._scratch[i]
            if scratch.shape == d.shape and scratch.dtype == d.dtype == p.dtype and np.issubdtype(d.dtype, np.floating):
                np.multiply(d, self.lr, out=scratch)
                p -= scratch
            else:
                p -= self.lr * d


class DistributedOptimizer:
    """Wraps an optimizer (anything with ``step(params, grads)``, e.g. :class:`SGD`) so that
    ``step`` first averages the gradients over the group in fused allreduces, then applies them.

    ::

        opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=0.1))
        tandem.broadcast_parameters(params)
        for batch in data:
            grads = compute_grads(params, batch)
            opt.step(params, grads)
    """

    def __init__(self, optimizer: Any, group: Optional["Group"] = None, fusion_bytes: int = FUSION_BYTES,
                 compression: Optional[str] = None) -> None:
        if type(optimizer).__module__.startswith("torch.optim") or any(
            c.__module__.startswith("torch.optim") for c in type(optimizer).__mro__
        ):
            raise TypeError(
                f"tandem.DistributedOptimizer wraps numpy optimizers; for a torch optimizer "
                f"({type(optimizer).__name__}) use tandem.torch.DistributedOptimizer (Horovod's API), "
                "or DistributedDataParallel on the 'tandem' torch.distributed backend"
            )
        if not callable(getattr(optimizer, "step", None)):
            raise TypeError("the optimizer needs a step(params, grads) method")
        self.optimizer = optimizer
        self.group = group
        self.fusion_bytes = fusion_bytes
        #: How the float32 buckets' allreduces compress (default: the group's, see
        #: ``tandem.init(compression=...)``); ``compressors`` holds each bucket's state (its
        #: error-feedback residual; PowerSGD: each matrix's, by its index, with its warm start),
        #: to be saved with the training state.
        self.compression = compression
        self.compressors: Dict[int, Any] = {}

    def step(self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray]) -> None:
        g = _group(self.group)
        setting = self.compression if self.compression is not None else g.compression
        if setting == "none":
            allreduce_fused(grads, "avg", self.group, self.fusion_bytes)
        elif setting.startswith("powersgd"):
            self._reduce_matrices(g, setting, grads)
        else:
            self._reduce_buckets(g, setting, grads)
        self.optimizer.step(params, grads)

    def _reduce_buckets(self, g: "Group", setting: str, grads: Sequence[np.ndarray]) -> None:
        """fp16, bf16, top-k, auto: the float32 gradients in buckets of at most ``fusion_bytes``,
        each allreduced as one fused gradient through its compressor (keyed by the bucket's
        number), half precision rounding each gradient straight into the wire buffer; other
        dtypes and non-contiguous arrays averaged exactly, fused."""
        from . import Compressor

        arrays = _host_arrays(grads)
        floats = [i for i, a in enumerate(arrays) if a.dtype == np.float32 and a.flags.c_contiguous]
        chosen = set(floats)
        rest = [a for i, a in enumerate(arrays) if i not in chosen]
        for k, bucket in enumerate(_buckets([arrays[i] for i in floats], self.fusion_bytes)):
            if k not in self.compressors:
                self.compressors[k] = Compressor(setting)
            g._pg.allreduce_compressed_many([arrays[floats[i]] for i in bucket], "avg", self.compressors[k], None)
        allreduce_fused(rest, "avg", self.group, self.fusion_bytes)

    def _reduce_matrices(self, g: "Group", setting: str, grads: Sequence[np.ndarray]) -> None:
        """PowerSGD: each float32 matrix (a tensor of 2 or more dimensions, seen as its first
        dimension by the rest, as torch's PowerSGD hook does) through its own compressor, keyed
        by its index in ``grads``, and the float32 vectors averaged exactly, all in two allreduces
        (:meth:`tandem.Group.allreduce_powersgd`); other dtypes averaged exactly, fused."""
        from . import Compressor

        matrices, compressors, vectors, rest = [], [], [], []
        for i, a in enumerate(_host_arrays(grads)):
            if a.dtype != np.float32 or a.size == 0 or not a.flags.c_contiguous:
                rest.append(a)
            elif a.ndim < 2:
                vectors.append(a)
            else:
                if i not in self.compressors:
                    self.compressors[i] = Compressor(setting, a.size // a.shape[0])
                matrices.append(a)
                compressors.append(self.compressors[i])
        g.allreduce_powersgd(matrices, compressors, vectors, "avg")
        allreduce_fused(rest, "avg", self.group, self.fusion_bytes)
