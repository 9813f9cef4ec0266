"""Tandem: distributed training with collectives and parameter servers, the work done in Rust.

Collectives, in the idiom of ``torch.distributed`` and Horovod::

    import numpy as np
    import tandem

    with tandem.init():                      # TF_CONFIG, torchrun/PyTorchJob, Slurm, Open MPI, TANDEM_*
        grads = np.ones(1 << 20, dtype=np.float32)
        tandem.allreduce(grads, op="avg")    # in place, no copy

Start a local job with ``python -m tandem.launch --nproc 4 train.py`` or, from a notebook,
``tandem.run(fn, nproc=4)``. The parameter-server client is :mod:`tandem.ps`.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from . import _native
from .errors import (
    AuthenticationError,
    BackendUnavailableError,
    ConfigurationError,
    InvalidArgumentError,
    LeaseExpiredError,
    MismatchError,
    PartiallyAppliedError,
    PeerLostError,
    PreconditionError,
    ShapeError,
    TandemError,
    TimeoutError,
    TransportError,
    UnusableError,
)
from .observe import dump_flight_recorder, metrics, metrics_text, span
from .optim import DistributedOptimizer, allreduce_fused, broadcast_parameters
from .runner import run
from ._arrays import host_array, like_input
from . import elastic  # noqa: E402  (tandem.elastic.State, tandem.elastic.run)

__version__: str = _native.__version__

__all__ = [
    "Group", "Work", "init", "shutdown", "is_initialized", "group", "rank", "world_size", "local_rank",
    "allreduce", "broadcast", "reduce", "allgather", "reduce_scatter", "barrier", "send", "recv",
    "allreduce_async", "broadcast_async", "allgather_async", "barrier_async", "cluster_spec", "Compressor",
    "auto_compression",
    "broadcast_parameters", "allreduce_fused", "DistributedOptimizer", "run",
    "metrics", "metrics_text", "span", "dump_flight_recorder",
    "TandemError", "ConfigurationError", "TimeoutError", "PeerLostError", "MismatchError", "ShapeError",
    "InvalidArgumentError", "AuthenticationError", "BackendUnavailableError", "UnusableError",
    "PreconditionError", "PartiallyAppliedError", "LeaseExpiredError",
    "TransportError",
]

Work = _native.Work
#: The compression state of one gradient tensor: ``tandem.Compressor("topk:0.01")``; keep one per
#: tensor across steps and save ``state()`` with the training state (``Compressor.restore``).
Compressor = _native.Compressor

_native.init_logging()


class Group:
    """A process group. Made by :func:`init`; usable as a context manager that shuts it down.

    Every collective takes a C-contiguous numpy array or a contiguous PyTorch CPU tensor (without a
    copy; a parameter that requires grad through its data; bfloat16 and bool included) of
    float32, float64, float16, int32, int64, uint8 (or bfloat16 from ml_dtypes) and works in place
    where the result has the input's shape. Blocking calls release the GIL; Ctrl-C raises
    ``KeyboardInterrupt`` and aborts the group on every rank. Do not touch an array while a call on
    it runs in another thread.
    """

    def __init__(self, native: "_native.ProcessGroup") -> None:
        self._pg = native

    @property
    def rank(self) -> int:
        return self._pg.rank

    @property
    def world_size(self) -> int:
        return self._pg.world_size

    @property
    def local_rank(self) -> int:
        return self._pg.local_rank

    @property
    def local_world_size(self) -> int:
        return self._pg.local_world_size

    @property
    def backend(self) -> str:
        return self._pg.backend

    def allreduce(self, a: np.ndarray, op: str = "sum", timeout: Optional[float] = None,
                  compression: Union[None, str, Compressor] = None) -> np.ndarray:
        """Reduces ``a`` over every rank, in place (op: sum, avg, min, max, prod); returns ``a``.

        ``compression`` sends fewer bytes for a float32 gradient: ``"fp16"`` or ``"bf16"`` (half
        precision on the wire, sums in float32), ``"auto"`` (bf16 where the group's links make it
        faster, see :meth:`auto_compression`), or a :class:`Compressor` kept for this tensor
        across steps (needed for ``topk:FRACTION`` and ``powersgd:RANK``, whose error feedback
        is its state). Every rank must pass the same setting.
        """
        view = host_array(a)[0]
        if compression is None or compression == "none":
            self._pg.allreduce(view, op, timeout)
            return a
        if isinstance(compression, str):
            c = Compressor(compression)
            if c.compression.startswith(("topk", "powersgd")):
                raise ValueError(
                    f"compression={compression!r} keeps a residual across steps: pass a tandem.Compressor "
                    f"made once for this tensor (tandem.Compressor({compression!r}))")
            compression = c
        self._pg.allreduce_compressed(view, op, compression, timeout)
        return a

    def allreduce_powersgd(self, matrices: Sequence[np.ndarray], compressors: Sequence[Compressor],
                           exact: Sequence[np.ndarray] = (), op: str = "avg",
                           timeout: Optional[float] = None) -> None:
        """PowerSGD of several float32 gradients in two allreduces in all (as torch's PowerSGD
        hook batches a bucket), in place: ``matrices[i]`` through ``compressors[i]`` (each
        ``tandem.Compressor("powersgd:RANK", columns)``, kept for that tensor across steps), and
        the ``exact`` tensors (biases) summed or averaged exactly in the first of the two. Every
        array must be a C-contiguous float32 numpy array; op is sum or avg; every rank must pass
        the same shapes in the same order. :class:`tandem.DistributedOptimizer` calls it for
        ``powersgd`` compression."""
        if len(matrices) != len(compressors):
            raise ValueError(f"{len(matrices)} matrices but {len(compressors)} compressors: one compressor per matrix")
        self._pg.allreduce_powersgd([host_array(a)[0] for a in matrices], list(compressors),
                                    [host_array(a)[0] for a in exact], op, timeout)

    @property
    def compression(self) -> str:
        """The group's default compression of gradient allreduces (``init(compression=...)`` or
        ``TANDEM_COMPRESSION``), which the optimizers use; plain ``allreduce`` compresses only when
        asked."""
        return self._pg.compression

    def compressor(self, columns: int = 0) -> Compressor:
        """A :class:`Compressor` for one gradient tensor with the group's default compression."""
        return Compressor(self.compression, columns)

    def auto_compression(self) -> Dict[str, Any]:
        """What ``compression="auto"`` chose for this group and why: ``{"chosen": "bf16" or
        "none", "reason": ..., "none_seconds": ..., "bf16_seconds": ...}`` (the probe allreduce's
        times, None where the ranks share one machine and nothing was measured). Measured when a
        group with ``auto`` forms, else on first use: every rank must call it together then."""
        chosen, reason, none_s, bf16_s = self._pg.auto_compression()
        return {"chosen": chosen, "reason": reason, "none_seconds": none_s, "bf16_seconds": bf16_s}

    def broadcast(self, a: np.ndarray, root: int = 0, timeout: Optional[float] = None) -> np.ndarray:
        """Overwrites ``a`` with ``root``'s array, in place; returns ``a``."""
        self._pg.broadcast(host_array(a)[0], root, timeout)
        return a

    def reduce(self, a: np.ndarray, op: str = "sum", root: int = 0, timeout: Optional[float] = None) -> np.ndarray:
        """Reduces into ``root``'s ``a`` (other ranks' arrays are used as scratch); returns ``a``."""
        self._pg.reduce(host_array(a)[0], op, root, timeout)
        return a

    def allgather(self, a: np.ndarray, timeout: Optional[float] = None) -> np.ndarray:
        """Every rank's ``a`` stacked into a new array of shape ``(world_size, *a.shape)``."""
        view, was_torch = host_array(a)
        out: np.ndarray = like_input(self._pg.allgather(view, timeout), was_torch)
        return out

    def reduce_scatter(self, a: np.ndarray, op: str = "sum", timeout: Optional[float] = None) -> np.ndarray:
        """Reduces ``a`` over every rank and returns this rank's part (``a`` is left unchanged).

        Rank r gets the r-th of ``world_size`` nearly equal runs of the flattened array; when
        ``a.shape[0]`` divides by ``world_size`` the part has shape ``(a.shape[0] // world_size, ...)``.
        """
        view, was_torch = host_array(a)
        out: np.ndarray = like_input(self._pg.reduce_scatter(view, op, timeout), was_torch)
        return out

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Returns once every rank has called it."""
        self._pg.barrier(timeout)

    def send(self, a: np.ndarray, dst: int, timeout: Optional[float] = None) -> None:
        """Sends ``a`` to rank ``dst``."""
        self._pg.send(host_array(a)[0], dst, timeout)

    def recv(self, a: np.ndarray, src: int, timeout: Optional[float] = None) -> np.ndarray:
        """Receives into ``a`` from rank ``src``; returns ``a``."""
        self._pg.recv(host_array(a)[0], src, timeout)
        return a

    def allreduce_async(self, a: np.ndarray, op: str = "sum") -> Work:
        """Starts an allreduce; ``wait()`` writes the result into ``a`` and returns it."""
        return self._pg.allreduce_async(host_array(a)[0], op)

    def broadcast_async(self, a: np.ndarray, root: int = 0) -> Work:
        """Starts a broadcast; ``wait()`` writes the result into ``a`` and returns it."""
        return self._pg.broadcast_async(host_array(a)[0], root)

    def allgather_async(self, a: np.ndarray) -> Work:
        """Starts an allgather; ``wait()`` returns the stacked array."""
        return self._pg.allgather_async(host_array(a)[0])

    def barrier_async(self) -> Work:
        """Starts a barrier; ``wait()`` returns ``None``."""
        return self._pg.barrier_async()

    def abort(self, reason: str = "aborted by the user") -> None:
        """Makes every rank's current and later calls fail, naming this rank and ``reason``."""
        self._pg.abort(reason)

    def shutdown(self) -> None:
        """Leaves the group after the queued operations finish."""
        global _default
        self._pg.shutdown()
        if _default is self:
            _default = None

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.shutdown()
        else:
            # Leaving politely would wait for ranks that may never come; just drop the group.
            global _default
            if _default is self:
                _default = None

    def __repr__(self) -> str:
        return f"tandem.Group(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"


_default: Optional[Group] = None


def init(timeout: Optional[float] = None, connect_timeout: Optional[float] = None,
         compression: Optional[str] = None) -> Group:
    """Joins the job described by the environment and makes it the default group.

    ``timeout`` (seconds) is every operation's deadline (default: ``TANDEM_TIMEOUT`` or 5 minutes);
    ``connect_timeout`` bounds forming the group; ``compression`` is the group's default compression
    of gradient allreduces (default: ``TANDEM_COMPRESSION`` or none; see :class:`Compressor`).
    Without any job environment this is a group of one. Calling it again returns the existing group.
    """
    global _default
    if _default is None:
        _default = Group(_native.ProcessGroup.from_env(timeout, connect_timeout, None, compression))
    return _default


def is_initialized() -> bool:
    """Whether :func:`init` made a default group (and it was not shut down)."""
    return _default is not None


def group() -> Group:
    """The default group; raises :class:`UnusableError` before :func:`init`."""
    if _default is None:
        raise UnusableError("tandem is not initialized; call tandem.init() first")
    return _default


def shutdown() -> None:
    """Shuts the default group down (a no-op when there is none)."""
    if _default is not None:
        _default.shutdown()


def rank() -> int:
    """This process's rank in the default group."""
    return group().rank


def world_size() -> int:
    """Number of ranks in the default group."""
    return group().world_size


def local_rank() -> int:
    """This process's rank on its machine."""
    return group().local_rank


def cluster_spec() -> Dict[str, Any]:
    """The job layout resolved from the environment (role, rank, peers, rendezvous, source)."""
    spec: Dict[str, Any] = json.loads(_native.cluster_spec())
    return spec


def allreduce(a: np.ndarray, op: str = "sum", timeout: Optional[float] = None,
              compression: Union[None, str, Compressor] = None) -> np.ndarray:
    """:meth:`Group.allreduce` on the default group."""
    return group().allreduce(a, op, timeout, compression)


def auto_compression() -> Dict[str, Any]:
    """:meth:`Group.auto_compression` on the default group."""
    return group().auto_compression()


def broadcast(a: np.ndarray, root: int = 0, timeout: Optional[float] = None) -> np.ndarray:
    """:meth:`Group.broadcast` on the default group."""
    return group().broadcast(a, root, timeout)


def reduce(a: np.ndarray, op: str = "sum", root: int = 0, timeout: Optional[float] = None) -> np.ndarray:
    """:meth:`Group.reduce` on the default group."""
    return group().reduce(a, op, root, timeout)


def allgather(a: np.ndarray, timeout: Optional[float] = None) -> np.ndarray:
    """:meth:`Group.allgather` on the default group."""
    return group().allgather(a, timeout)


def reduce_scatter(a: np.ndarray, op: str = "sum", timeout: Optional[float] = None) -> np.ndarray:
    """:meth:`Group.reduce_scatter` on the default group."""
    return group().reduce_scatter(a, op, timeout)


def barrier(timeout: Optional[float] = None) -> None:
    """:meth:`Group.barrier` on the default group."""
    group().barrier(timeout)


def send(a: np.ndarray, dst: int, timeout: Optional[float] = None) -> None:
    """:meth:`Group.send` on the default group."""
    group().send(a, dst, timeout)


def recv(a: np.ndarray, src: int, timeout: Optional[float] = None) -> np.ndarray:
    """:meth:`Group.recv` on the default group."""
    return group().recv(a, src, timeout)


def allreduce_async(a: np.ndarray, op: str = "sum") -> Work:
    """:meth:`Group.allreduce_async` on the default group."""
    return group().allreduce_async(a, op)


def broadcast_async(a: np.ndarray, root: int = 0) -> Work:
    """:meth:`Group.broadcast_async` on the default group."""
    return group().broadcast_async(a, root)


def allgather_async(a: np.ndarray) -> Work:
    """:meth:`Group.allgather_async` on the default group."""
    return group().allgather_async(a)


def barrier_async() -> Work:
    """:meth:`Group.barrier_async` on the default group."""
    return group().barrier_async()
