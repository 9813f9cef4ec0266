"""CUDA tensors through NCCL: the GPU side of ``_ops``.

Each process's first collective on a CUDA tensor sets up the group's device collectives
(``tandem._native.DeviceGroup``: an NCCL communicator whose unique id travels through Tandem's
own group, or, where ``TANDEM_BACKEND=auto`` and NCCL cannot start, the TCP ring staged through
host memory). Every rank does so at the same collective, since the calls are made in the same
order everywhere.

Before each call the tensor's GPU is synchronized (the kernels that wrote it may run on any
stream); the call returns once the result is in the tensor's memory. Contiguous tensors are
passed by address, without a copy; others go through a contiguous copy that is written back.
int8 and int16 are reduced in int32, bool as uint8, as on the CPU. A build without the ``nccl``
feature refuses CUDA tensors, naming the fix.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

import torch

from .. import _native
from ..errors import BackendUnavailableError
from ._dtypes import NATIVE, WIDENED, bool_op, cannot_reduce

_lock = threading.Lock()
#: id(native group) -> (the group, its DeviceGroup or the error making it gave, the GPU index)
_groups: Dict[int, Tuple[Any, Any, int]] = {}


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def device_group(pg: Any, t: torch.Tensor, what: str = "tensor") -> Any:
    """The group's device collectives for ``t``'s GPU, set up on first use (by every rank)."""
    idx = _index(t)
    with _lock:
        entry = _groups.get(id(pg))
        if entry is None:
            _drop_shut_down()
            try:
                made: Any = _native.DeviceGroup(pg, idx)
            except BackendUnavailableError as e:
                fix = (
                    "move the tensor with t.cpu()"
                    if _native.DeviceGroup.built_with_nccl()
                    else "build the wheel with `scripts/wheel --features nccl`, move the tensor "
                    "with t.cpu(), or use torch's nccl backend for GPU tensors"
                )
                made = BackendUnavailableError(f"{what} is on {t.device}, and collectives on GPU tensors cannot run here ({e}): {fix}")
            except Exception as e:  # noqa: BLE001 - kept so every later call says the same
                made = e
            entry = (pg, made, idx)
            _groups[id(pg)] = entry
    _, made, first = entry
    if isinstance(made, BaseException):
        raise made.with_traceback(None)  # the same error each time, without earlier tracebacks
    if idx != first:
        raise ValueError(
            f"{what} is on cuda:{idx}, but this process's collectives run on cuda:{first}: one GPU "
            "per process (call torch.cuda.set_device(local_rank) before the first collective)"
        )
    return made


def _drop_shut_down() -> None:
    """Drops the device collectives of groups shut down since (an elastic job re-forms its group;
    each old one would otherwise keep its NCCL communicator). Called with ``_lock`` held."""
    for key, (group, _, _) in list(_groups.items()):
        try:
            group.rank
        except Exception:  # noqa: BLE001 - a shut-down group says so on every call
            del _groups[key]


def forget(pg: Any) -> None:
    """Drops the device collectives of a group that is going away."""
    with _lock:
        _groups.pop(id(pg), None)


def _ready(tensors: List[torch.Tensor], what: str) -> None:
    """Refuses a mix of devices and waits for the kernels that wrote the tensors."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        names = ", ".join(sorted(str(d) for d in devices))
        raise ValueError(f"{what}: the tensors of one call must be on one device, not {names}")
    torch.cuda.synchronize(tensors[0].device)


def _contiguous(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    t = t.detach()
    return (t, False) if t.is_contiguous() else (t.contiguous(), True)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def allreduce(pg: Any, t: torch.Tensor, op: str) -> None:
    dg = device_group(pg, t)
    c, back = _contiguous(t)
    if c.numel() == 0:
        return
    _ready([c], "all_reduce")
    if c.dtype in NATIVE:
        dg.allreduce(c.data_ptr(), c.numel(), NATIVE[c.dtype], op)
    elif c.dtype in WIDENED:
        w = c.to(WIDENED[c.dtype])
        torch.cuda.synchronize(w.device)
        dg.allreduce(w.data_ptr(), w.numel(), "int32", op)
        c.copy_(w)
    elif c.dtype == torch.bool:
        dg.allreduce(c.data_ptr(), c.numel(), "uint8", bool_op(op))
    else:
        raise cannot_reduce(c.dtype)
    if back:
        t.detach().copy_(c)


def broadcast(pg: Any, t: torch.Tensor, root: int) -> None:
    dg = device_group(pg, t)
    c, back = _contiguous(t)
    if c.numel() == 0:
        return
    _ready([c], "broadcast")
    dg.broadcast(c.data_ptr(), _nbytes(c), "uint8", root)
    if back:
        t.detach().copy_(c)


def reduce(pg: Any, t: torch.Tensor, op: str, root: int) -> None:
    c, back = _contiguous(t)
    if c.dtype not in NATIVE:
        allreduce(pg, t, op)  # widened and bool types: one place handles them
        return
    dg = device_group(pg, t)
    if c.numel() == 0:
        return
    _ready([c], "reduce")
    dg.reduce(c.data_ptr(), c.numel(), NATIVE[c.dtype], op, root)
    if back:
        t.detach().copy_(c)


def send(pg: Any, t: torch.Tensor, peer: int) -> None:
    dg = device_group(pg, t)
    c, _ = _contiguous(t)
    _ready([c], "send")
    dg.send(c.data_ptr(), _nbytes(c), "uint8", peer)


def recv(pg: Any, t: torch.Tensor, peer: int) -> None:
    dg = device_group(pg, t)
    c, back = _contiguous(t)
    _ready([c], "recv")
    dg.recv(c.data_ptr(), _nbytes(c), "uint8", peer)
    if back:
        t.detach().copy_(c)


def allgather_flat(pg: Any, output: torch.Tensor, inp: torch.Tensor) -> None:
    """Every rank's ``inp`` into ``output`` (world × its elements), in rank order; straight into
    ``output`` when it is contiguous and ``inp`` is apart from it or is this rank's own block of it
    (FSDP's in-place all-gathers)."""
    dg = device_group(pg, inp, "all_gather input")
    c, _ = _contiguous(inp)
    if c.numel() == 0:
        return
    out = output.detach()
    size = _nbytes(c)
    apart = c.data_ptr() + size <= out.data_ptr() or out.data_ptr() + _nbytes(out) <= c.data_ptr()
    own_block = c.data_ptr() == out.data_ptr() + pg.rank * size
    direct = out.is_contiguous() and out.dtype == c.dtype and (apart or own_block)
    res = out if direct else torch.empty(out.numel(), dtype=c.dtype, device=c.device)
    _ready([c, res], "all_gather")
    dg.allgather(c.data_ptr(), res.data_ptr(), size, "uint8")
    if not direct:
        out.copy_(res.view(out.shape))


def allgather(pg: Any, outputs: List[torch.Tensor], inp: torch.Tensor) -> None:
    """Every rank's ``inp`` into ``outputs[r]``."""
    flat = torch.empty(len(outputs) * inp.numel(), dtype=inp.dtype, device=inp.device)
    allgather_flat(pg, flat, inp)
    for r, o in enumerate(outputs):
        o.detach().copy_(flat[r * inp.numel() : (r + 1) * inp.numel()].reshape(o.shape))


def reduce_scatter_flat(pg: Any, out: torch.Tensor, flat: torch.Tensor, op: str) -> bool:
    """This rank's block of the reduced ``flat`` (world equal blocks) into ``out``; False when the
    dtype needs the allreduce path (widened or bool)."""
    if flat.dtype not in NATIVE:
        return False
    dg = device_group(pg, flat, "reduce_scatter input")
    c, _ = _contiguous(flat)
    o, back = _contiguous(out)
    if o.numel() == 0:
        return True
    _ready([c, o], "reduce_scatter")
    dg.reduce_scatter(c.data_ptr(), o.data_ptr(), o.numel(), NATIVE[c.dtype], op)
    if back:
        out.detach().copy_(o)
    return True
