"""Tandem for PyTorch: a ``torch.distributed`` backend and Horovod's PyTorch API.

Importing this module registers the backend ``"tandem"``::

    import torch.distributed as dist
    import tandem.torch  # noqa: F401  (registers the backend)

    dist.init_process_group("tandem")          # under torchrun, a PyTorchJob, tcp:// or file://
    model = torch.nn.parallel.DistributedDataParallel(model)

and offers Horovod's API on torch tensors (``import tandem.torch as hvd``)::

    hvd.init()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())

Collectives take CPU tensors (contiguous ones without a copy; a parameter that requires grad is
read through its data) of float16, bfloat16, float32, float64, int8-64, uint8 and bool.
"""

from __future__ import annotations

import pickle
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

import tandem as _tandem

from . import _autograd, _ops
from ._async import Handle as _Handle
from .backend import BACKEND, TandemProcessGroup, register
from .compression import Compression
from .optimizer import DistributedOptimizer
from .sync_batch_norm import SyncBatchNorm

register()

#: Reduce operations, as Horovod names them.
Average = "avg"
Sum = "sum"
Min = "min"
Max = "max"
Product = "prod"

__all__ = [
    "BACKEND", "TandemProcessGroup", "register", "init", "shutdown", "is_initialized", "rank", "size",
    "world_size", "local_rank", "local_size", "allreduce", "allreduce_", "allreduce_async",
    "allreduce_async_", "allgather", "allgather_async", "broadcast", "broadcast_", "broadcast_async",
    "broadcast_async_", "alltoall", "alltoall_async", "synchronize", "poll", "join", "barrier",
    "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "reducescatter", "reducescatter_async", "grouped_allgather", "grouped_allgather_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "cross_rank", "cross_size", "is_homogeneous",
    "nccl_built", "cuda_built", "rocm_built", "mpi_built", "mpi_enabled", "mpi_threads_supported",
    "gloo_built", "gloo_enabled", "ddl_built", "ccl_built",
    "DistributedOptimizer", "SyncBatchNorm", "Compression", "Average", "Sum", "Min", "Max", "Product", "elastic",
]


def init(**kwargs: Any) -> None:
    """Joins the job the environment describes (torchrun, a PyTorchJob, Slurm, MPI, ``tandem
    launch``), like ``hvd.init()``; a no-op when already initialized."""
    _tandem.init(**kwargs)


def shutdown() -> None:
    """Leaves the job (``hvd.shutdown()``)."""
    _tandem.shutdown()


def is_initialized() -> bool:
    """Whether :func:`init` ran (and no shutdown since)."""
    return _tandem.is_initialized()


def rank() -> int:
    """This process's rank."""
    return _tandem.rank()


def size() -> int:
    """Number of processes."""
    return _tandem.world_size()


world_size = size


def local_rank() -> int:
    """This process's rank on its machine."""
    return _tandem.local_rank()


def local_size() -> int:
    """Number of processes on this machine."""
    return _tandem.group().local_world_size


def _pg() -> Any:
    return _tandem.group()._pg


def _ordered(fn: Any) -> Any:
    """Runs ``fn`` here once the ``_async`` calls started before it have run, so blocking and
    background calls reach every process in the same order."""
    from ._async import worker

    worker().drain()
    return fn()


def _op(op: Optional[str], average: Optional[bool]) -> str:
    if average is not None:
        if op is not None:
            raise ValueError("give either average= or op=, not both")
        return Average if average else Sum
    op = Average if op is None else op
    if op not in (Average, Sum, Min, Max, Product):
        raise ValueError(f"op={op!r} is not one of tandem.torch.Average, Sum, Min, Max, Product")
    return op


def _scaled_allreduce(tensor: torch.Tensor, op: str, pre: float, post: float) -> torch.Tensor:
    if pre != 1.0:
        tensor.data.mul_(pre)
    _ops.allreduce(_pg(), tensor, op)
    if post != 1.0:
        tensor.data.mul_(post)
    return tensor


def allreduce_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
               op: Optional[str] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> torch.Tensor:
    """Reduces ``tensor`` over every process in place (default: the average) and returns it."""
    op = _op(op, average)

    return _ordered(lambda: _scaled_allreduce(tensor, op, prescale_factor, postscale_factor))


def allreduce(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
              compression: Any = None, op: Optional[str] = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0) -> torch.Tensor:
    """A new tensor: ``tensor`` reduced over every process (default: the average); ``compression``
    (``Compression.fp16``/``bf16``) sends it at lower precision. Differentiable when ``tensor``
    requires grad (Sum and Average), as Horovod's is."""
    comp = compression or Compression.none
    if _autograd.requires_grad([tensor]):
        wire, ctx = comp.compress(tensor)
        reduced = _autograd.Allreduce.apply(wire, _op(op, average), prescale_factor, postscale_factor)
        return comp.decompress(reduced, ctx)
    wire, ctx = comp.compress(tensor.detach().clone())
    allreduce_(wire, average=average, op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    return comp.decompress(wire, ctx)


def allreduce_async_(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                     op: Optional[str] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`allreduce_`; :func:`synchronize` returns the tensor."""
    op = _op(op, average)
    return _Handle(lambda: _scaled_allreduce(tensor, op, prescale_factor, postscale_factor))


def allreduce_async(tensor: torch.Tensor, average: Optional[bool] = None, name: Optional[str] = None,
                    op: Optional[str] = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`allreduce` on a copy; :func:`synchronize` returns the new tensor."""
    copy = tensor.detach().clone()
    return allreduce_async_(copy, average=average, op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor)


def synchronize(handle: _Handle) -> Any:
    """Waits for an ``_async`` call and returns its result."""
    return handle.wait()


def poll(handle: _Handle) -> bool:
    """Whether an ``_async`` call finished (so :func:`synchronize` returns at once)."""
    return handle.poll()


def _gather_sizes(n: int) -> List[int]:
    sizes = torch.tensor([n], dtype=torch.int64)
    out = torch.from_numpy(_pg().allgather(sizes.numpy(), None)).reshape(-1)
    return [int(s) for s in out]


def allgather(tensor: torch.Tensor, name: Optional[str] = None) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along the first dimension (which may differ between
    processes; the other dimensions must match). Differentiable when ``tensor`` requires grad."""
    if _autograd.requires_grad([tensor]):
        out: torch.Tensor = _autograd.Allgather.apply(tensor)
        return out
    return _ordered(lambda: _allgather_now(tensor))


def _allgather_rows(tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """:func:`allgather` now, and how many rows each process gave."""
    return _ordered(lambda: _allgather_counted(tensor))


def _allgather_now(tensor: torch.Tensor) -> torch.Tensor:
    return _allgather_counted(tensor)[0]


def _allgather_counted(tensor: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    t = tensor.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    rows = _gather_sizes(t.shape[0])
    longest = max(rows)
    padded = torch.zeros((longest,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    outs = [torch.empty_like(padded) for _ in rows]
    _ops.allgather(_pg(), outs, padded)
    return torch.cat([o[:n] for o, n in zip(outs, rows)]), rows


def allgather_async(tensor: torch.Tensor, name: Optional[str] = None) -> _Handle:
    """Starts :func:`allgather`."""
    copy = tensor.detach().clone()
    return _Handle(lambda: _allgather_now(copy))


def broadcast_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None) -> torch.Tensor:
    """Overwrites ``tensor`` with ``root_rank``'s, in place; returns it."""
    _ops.check_peer(root_rank, size(), None)
    _ordered(lambda: _ops.broadcast(_pg(), tensor, root_rank))
    return tensor


def broadcast(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None) -> torch.Tensor:
    """A new tensor holding ``root_rank``'s ``tensor``. Differentiable when ``tensor`` requires
    grad."""
    if _autograd.requires_grad([tensor]):
        _ops.check_peer(root_rank, size(), None)
        out: torch.Tensor = _autograd.Broadcast.apply(tensor, root_rank)
        return out
    return broadcast_(tensor.detach().clone(), root_rank)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None) -> _Handle:
    """Starts :func:`broadcast_`."""
    return _Handle(lambda: _ops.broadcast(_pg(), tensor, root_rank) or tensor)


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: Optional[str] = None) -> _Handle:
    """Starts :func:`broadcast`."""
    copy = tensor.detach().clone()
    return _Handle(lambda: _ops.broadcast(_pg(), copy, root_rank) or copy)


def alltoall(tensor: torch.Tensor, splits: Optional[Union[List[int], torch.Tensor]] = None,
             name: Optional[str] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Sends the i-th part of ``tensor`` (cut along the first dimension, equally or by ``splits``)
    to process i; returns what every process sent this one, concatenated. With ``splits`` it
    returns ``(tensor, received_splits)`` as Horovod does. Differentiable when ``tensor`` requires
    grad."""
    if _autograd.requires_grad([tensor]):
        out, received = _autograd.Alltoall.apply(tensor, splits)
        return (out, received) if splits is not None else out
    return _ordered(lambda: _alltoall_now(tensor, splits))


def _alltoall_now(tensor: torch.Tensor, splits: Any, given: Optional[bool] = None) -> Any:
    n = size()
    t = tensor.detach()
    given = splits is not None if given is None else given
    if splits is None:
        if t.shape[0] % n:
            raise ValueError(f"alltoall: the first dimension {t.shape[0]} does not divide by {n} processes; pass splits=")
        send_rows = [t.shape[0] // n] * n
    else:
        send_rows = [int(s) for s in (splits.tolist() if isinstance(splits, torch.Tensor) else splits)]
    ins = _ops.split(t, send_rows, n, "input")
    # Everyone learns how many rows each sends it.
    table = torch.tensor(send_rows, dtype=torch.int64)
    everyone = torch.from_numpy(_pg().allgather(table.numpy(), None)).reshape(n, n)
    recv_rows = [int(everyone[r][rank()]) for r in range(n)]
    outs = [torch.empty((k,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for k in recv_rows]
    _ops.alltoall(_pg(), outs, [i.contiguous() for i in ins], rank(), n)
    out = torch.cat(outs) if outs else t[:0]
    if given:
        return out, torch.tensor(recv_rows, dtype=torch.int32)
    return out


def alltoall_async(tensor: torch.Tensor, splits: Optional[List[int]] = None, name: Optional[str] = None) -> _Handle:
    """Starts :func:`alltoall`."""
    copy = tensor.detach().clone()
    return _Handle(lambda: _alltoall_now(copy, splits))


def grouped_allreduce_(tensors: List[torch.Tensor], average: Optional[bool] = None, name: Optional[str] = None,
                       op: Optional[str] = None, prescale_factor: float = 1.0,
                       postscale_factor: float = 1.0) -> List[torch.Tensor]:
    """Reduces every tensor of ``tensors`` in place, fused: one allreduce per device and dtype;
    returns them."""
    op = _op(op, average)
    return _ordered(lambda: _grouped_now(list(tensors), op, prescale_factor, postscale_factor))


def _grouped_now(tensors: List[torch.Tensor], op: str, pre: float, post: float) -> List[torch.Tensor]:
    _fused(tensors, lambda flat: _scaled_allreduce(flat, op, pre, post))
    return tensors


def _fused(tensors: List[torch.Tensor], collective: Any) -> None:
    """Runs ``collective`` in place on one flat copy of the tensors of each device and dtype (in
    the same order on every process), and copies the results back into them."""
    by_kind: Dict[Tuple[str, str], List[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((str(t.device), str(t.dtype)), []).append(t)
    for kind in sorted(by_kind):
        group = by_kind[kind]
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        if flat.numel() == 0:
            continue
        collective(flat)
        pos = 0
        for t in group:
            t.detach().copy_(flat[pos : pos + t.numel()].reshape(t.shape))
            pos += t.numel()


def grouped_allreduce(tensors: List[torch.Tensor], average: Optional[bool] = None, name: Optional[str] = None,
                      compression: Any = None, op: Optional[str] = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0) -> List[torch.Tensor]:
    """New tensors: each of ``tensors`` reduced over every process, fused as
    :func:`grouped_allreduce_` does. Differentiable when any requires grad."""
    comp = compression or Compression.none
    op = _op(op, average)
    if _autograd.requires_grad(list(tensors)):
        wires = [comp.compress(t) for t in tensors]
        reduced = _autograd.GroupedAllreduce.apply(op, prescale_factor, postscale_factor, *[w for w, _ in wires])
        return [comp.decompress(r, ctx) for r, (_, ctx) in zip(reduced, wires)]
    wires = [comp.compress(t.detach().clone()) for t in tensors]
    grouped_allreduce_([w for w, _ in wires], op=op, prescale_factor=prescale_factor, postscale_factor=postscale_factor)
    return [comp.decompress(w, ctx) for w, ctx in wires]


def grouped_allreduce_async_(tensors: List[torch.Tensor], average: Optional[bool] = None,
                             name: Optional[str] = None, op: Optional[str] = None, prescale_factor: float = 1.0,
                             postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`grouped_allreduce_`; :func:`synchronize` returns the list."""
    op = _op(op, average)
    todo = list(tensors)
    return _Handle(lambda: _grouped_now(todo, op, prescale_factor, postscale_factor))


def grouped_allreduce_async(tensors: List[torch.Tensor], average: Optional[bool] = None,
                            name: Optional[str] = None, op: Optional[str] = None, prescale_factor: float = 1.0,
                            postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`grouped_allreduce` on copies; :func:`synchronize` returns the new tensors."""
    copies = [t.detach().clone() for t in tensors]
    return grouped_allreduce_async_(copies, average=average, op=op, prescale_factor=prescale_factor,
                                    postscale_factor=postscale_factor)


def reducescatter(tensor: torch.Tensor, name: Optional[str] = None, compression: Any = None, op: str = Average,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> torch.Tensor:
    """``tensor`` reduced over every process (default: the average), this process's rows of it: the
    first dimension is cut as evenly as it goes, the first ``rows % size`` processes taking one
    row more (as Horovod cuts it). Differentiable when ``tensor`` requires grad (Sum and
    Average)."""
    op = _op(op, None)
    comp = compression or Compression.none
    if _autograd.requires_grad([tensor]):
        wire, ctx = comp.compress(tensor)
        return comp.decompress(_autograd.Reducescatter.apply(wire, op, prescale_factor, postscale_factor), ctx)
    wire, ctx = comp.compress(tensor.detach())
    return comp.decompress(_ordered(lambda: _reducescatter_now(wire, op, prescale_factor, postscale_factor)), ctx)


def reducescatter_async(tensor: torch.Tensor, name: Optional[str] = None, op: str = Average,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`reducescatter`; :func:`synchronize` returns this process's rows."""
    op = _op(op, None)
    copy = tensor.detach().clone()
    return _Handle(lambda: _reducescatter_now(copy, op, prescale_factor, postscale_factor))


def grouped_allgather(tensors: List[torch.Tensor], name: Optional[str] = None) -> List[torch.Tensor]:
    """:func:`allgather` of each of ``tensors``, in order (differentiable as it is)."""
    return [allgather(t) for t in tensors]


def grouped_allgather_async(tensors: List[torch.Tensor], name: Optional[str] = None) -> _Handle:
    """Starts :func:`grouped_allgather`; :func:`synchronize` returns the list."""
    copies = [t.detach().clone() for t in tensors]
    return _Handle(lambda: [_allgather_now(c) for c in copies])


def grouped_reducescatter(tensors: List[torch.Tensor], name: Optional[str] = None, compression: Any = None,
                          op: str = Average, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> List[torch.Tensor]:
    """:func:`reducescatter` of each of ``tensors``, in order (differentiable as it is)."""
    return [reducescatter(t, compression=compression, op=op, prescale_factor=prescale_factor,
                          postscale_factor=postscale_factor) for t in tensors]


def grouped_reducescatter_async(tensors: List[torch.Tensor], name: Optional[str] = None, op: str = Average,
                                prescale_factor: float = 1.0, postscale_factor: float = 1.0) -> _Handle:
    """Starts :func:`grouped_reducescatter`; :func:`synchronize` returns the list."""
    op = _op(op, None)
    copies = [t.detach().clone() for t in tensors]
    return _Handle(lambda: [_reducescatter_now(c, op, prescale_factor, postscale_factor) for c in copies])


def _reducescatter_now(tensor: torch.Tensor, op: str, pre: float, post: float) -> torch.Tensor:
    if tensor.dim() == 0:
        raise ValueError("reducescatter: a tensor of no dimensions cannot be cut; give it a first dimension")
    n, me = size(), rank()
    base, extra = divmod(tensor.shape[0], n)
    rows = [base + (1 if r < extra else 0) for r in range(n)]
    t = tensor.detach()
    if pre != 1.0:
        t = t * pre
    parts = [p.reshape(-1) for p in torch.split(t, rows)]
    out = torch.empty((rows[me],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    _ops.reduce_scatter(_pg(), out.reshape(-1), parts, op, me)
    if post != 1.0:
        out.mul_(post)
    return out


def _machines() -> Tuple[int, int, bool]:
    """(this process's machine's index, how many machines, whether each runs as many processes):
    machines numbered by their lowest rank."""
    from .backend import _machine_id

    return _layout(allgather_object(_machine_id()), rank())


def _layout(ids: List[str], me: int) -> Tuple[int, int, bool]:
    """(the index of rank ``me``'s machine, how many machines, whether each has as many ranks),
    given every rank's machine id; machines are numbered by their lowest rank."""
    order = list(dict.fromkeys(ids))
    counts = [ids.count(m) for m in order]
    return order.index(ids[me]), len(order), len(set(counts)) == 1


def cross_rank() -> int:
    """The index of this process's machine among the job's (numbered by their lowest rank), as
    Horovod's ``cross_rank``; every process must call it (it asks them all)."""
    return _machines()[0]


def cross_size() -> int:
    """How many machines the job runs on; every process must call it."""
    return _machines()[1]


def is_homogeneous() -> bool:
    """Whether every machine runs as many processes; every process must call it."""
    return _machines()[2]


def nccl_built() -> bool:
    """Whether this build runs CUDA tensors through NCCL (the ``nccl`` feature)."""
    from .. import _native

    return bool(_native.DeviceGroup.built_with_nccl())


def cuda_built() -> bool:
    """Whether this build takes CUDA tensors (through NCCL)."""
    return nccl_built()


def _never() -> bool:
    """False: Tandem's own TCP ring and NCCL take the place of MPI's, Gloo's, ROCm's, DDL's and
    oneCCL's collectives (it runs under mpirun by reading the variables mpirun sets)."""
    return False


#: Horovod's queries for libraries Tandem does not use: all False.
rocm_built = mpi_built = mpi_enabled = mpi_threads_supported = gloo_built = gloo_enabled = _never
ddl_built = ccl_built = _never


def barrier() -> None:
    """Returns once every process called it."""
    _tandem.barrier()


def join() -> int:
    """Waits for every process (Horovod's ``join`` for uneven data: here every process must call
    it); returns the last rank, as Horovod does."""
    _tandem.barrier()
    return size() - 1


def broadcast_object(obj: Any, root_rank: int = 0, name: Optional[str] = None) -> Any:
    """``root_rank``'s ``obj`` (pickled) on every process."""
    _ops.check_peer(root_rank, size(), None)
    return _ordered(lambda: _broadcast_object_now(obj, root_rank))


def _broadcast_object_now(obj: Any, root_rank: int) -> Any:
    data = pickle.dumps(obj) if rank() == root_rank else b""
    n = np.array([len(data)], dtype=np.int64)
    _pg().broadcast(n, root_rank, None)
    buf = np.frombuffer(data, dtype=np.uint8).copy() if rank() == root_rank else np.empty(int(n[0]), np.uint8)
    if buf.size:
        _pg().broadcast(buf, root_rank, None)
    return obj if rank() == root_rank else pickle.loads(buf.tobytes())


def allgather_object(obj: Any, name: Optional[str] = None) -> List[Any]:
    """Every process's ``obj`` (pickled), in rank order."""
    return _ordered(lambda: _allgather_object_now(obj))


def _allgather_object_now(obj: Any) -> List[Any]:
    data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
    sizes = _gather_sizes(data.size)
    padded = np.zeros(max(sizes), dtype=np.uint8)
    padded[: data.size] = data
    everyone = _pg().allgather(padded, None)
    return [pickle.loads(everyone[r][:k].tobytes()) for r, k in enumerate(sizes)]


def _named_tensors(params: Any) -> List[Tuple[str, torch.Tensor]]:
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = []
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2:
                items.append((str(p[0]), p[1]))
            else:
                items.append((str(i), p))
    out = []
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"broadcast_parameters: {name} is a {type(t).__name__}, not a torch.Tensor")
        out.append((name, t))
    return out


def broadcast_parameters(params: Any, root_rank: int = 0) -> None:
    """Overwrites every tensor of ``params`` (a ``state_dict()``, ``named_parameters()`` or a list
    of tensors) with ``root_rank``'s, in place, packed into few large broadcasts."""
    _ops.check_peer(root_rank, size(), None)
    _ordered(lambda: _broadcast_tensors_now(_named_tensors(params), root_rank))


def _broadcast_tensors_now(named: List[Tuple[str, torch.Tensor]], root_rank: int) -> None:
    tensors = [t for _, t in sorted(named, key=lambda kv: kv[0])]
    # One broadcast per device and dtype (a state_dict may hold CPU and CUDA tensors).
    _fused(tensors, lambda flat: _ops.broadcast(_pg(), flat, root_rank))


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int = 0) -> None:
    """Makes every process's optimizer state (and hyper-parameters) ``root_rank``'s; of a
    :func:`DistributedOptimizer`'s compression state, the warm starts are the root's and the
    residuals stay each process's own."""
    from .compression import shared_states
    from .optimizer import COMPRESSION_KEY

    state = broadcast_object(optimizer.state_dict() if rank() == root_rank else None, root_rank)
    if rank() != root_rank:
        if COMPRESSION_KEY in state:
            # The root's warm starts, this process's own residuals.
            state[COMPRESSION_KEY] = shared_states(state[COMPRESSION_KEY], optimizer.state_dict()[COMPRESSION_KEY])
        optimizer.load_state_dict(state)


from . import elastic  # noqa: E402  (tandem.torch.elastic)

