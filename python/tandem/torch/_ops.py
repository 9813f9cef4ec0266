"""Torch tensors through a native Tandem group: dtypes, layouts and schedules.

Tandem's ring reduces float16, bfloat16, float32, float64, int32, int64 and uint8 in place. int8
and int16 are reduced in int32 and narrowed back (the same wrap-around torch's own integer sums
have); bool is reduced as uint8 (SUM and MAX are logical or, MIN and PRODUCT logical and). Moving
data (broadcast, gathers, all-to-all, send/recv) works on the bytes, so any dtype moves. A tensor
that is not contiguous is staged through a contiguous copy and written back.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .._arrays import torch_view
from . import _cuda
from ._dtypes import NATIVE, WIDENED, bool_op, cannot_reduce


def check_device(t: torch.Tensor, what: str = "tensor") -> None:
    if t.device.type != "cpu":
        raise ValueError(
            f"{what} is on {t.device}: the tandem backend moves CPU tensors, and CUDA tensors when "
            "built with the nccl feature; move it with t.cpu()"
        )


def _staged(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    check_device(t)
    t = t.detach()
    if t.is_contiguous():
        return t, False
    return t.contiguous(), True


def _bytes(t: torch.Tensor) -> Any:
    """The contiguous tensor's bytes as a flat uint8 numpy view (no copy)."""
    return torch_view(t.reshape(-1).view(torch.uint8))


def allreduce(pg: Any, t: torch.Tensor, op: str) -> None:
    if t.is_cuda:
        _cuda.allreduce(pg, t, op)
        return
    c, back = _staged(t)
    if c.numel() == 0:
        return
    if c.dtype in NATIVE:
        pg.allreduce(torch_view(c), op, None)
    elif c.dtype in WIDENED:
        w = c.to(WIDENED[c.dtype])
        pg.allreduce(torch_view(w), op, None)
        c.copy_(w)
    elif c.dtype == torch.bool:
        pg.allreduce(torch_view(c), bool_op(op), None)
    else:
        raise cannot_reduce(c.dtype)
    if back:
        t.detach().copy_(c)


def broadcast(pg: Any, t: torch.Tensor, root: int) -> None:
    if t.is_cuda:
        _cuda.broadcast(pg, t, root)
        return
    c, back = _staged(t)
    if c.numel() == 0:
        return
    pg.broadcast(_bytes(c), root, None)
    if back:
        t.detach().copy_(c)


def reduce(pg: Any, t: torch.Tensor, op: str, root: int) -> None:
    # Reduce is an allreduce whose result only the root keeps (Tandem's own reduce uses the
    # others' buffers as scratch, which torch's contract allows; the allreduce path keeps every
    # dtype's handling in one place).
    if t.is_cuda:
        _cuda.reduce(pg, t, op, root)
        return
    c, back = _staged(t)
    if c.numel() == 0:
        return
    if c.dtype in NATIVE:
        pg.reduce(torch_view(c), op, root, None)
        if back:
            t.detach().copy_(c)
        return
    allreduce(pg, t, op)


def send(pg: Any, t: torch.Tensor, peer: int) -> None:
    if t.is_cuda:
        _cuda.send(pg, t, peer)
        return
    c, _ = _staged(t)
    pg.send(_bytes(c), peer, None)


def recv(pg: Any, t: torch.Tensor, peer: int) -> None:
    if t.is_cuda:
        _cuda.recv(pg, t, peer)
        return
    c, back = _staged(t)
    pg.recv(_bytes(c), peer, None)
    if back:
        t.detach().copy_(c)


def allgather(pg: Any, outputs: List[torch.Tensor], inp: torch.Tensor) -> None:
    for i, o in enumerate(outputs):
        if o.numel() != inp.numel() or o.dtype != inp.dtype:
            raise ValueError(
                f"all_gather: output {i} has {o.numel()} elements of {o.dtype}, the input "
                f"{inp.numel()} of {inp.dtype}; they must match"
            )
    if inp.is_cuda:
        _cuda.allgather(pg, outputs, inp)
        return
    c, _ = _staged(inp)
    res = torch.from_numpy(pg.allgather(_bytes(c), None))
    for r, o in enumerate(outputs):
        o.detach().copy_(res[r].view(inp.dtype).reshape(o.shape))


def allgather_flat(pg: Any, output: torch.Tensor, inp: torch.Tensor) -> None:
    if inp.is_cuda:
        _cuda.allgather_flat(pg, output, inp)
        return
    c, _ = _staged(inp)
    out = output.detach()
    if c.numel() == 0:
        return
    if out.is_contiguous() and out.dtype == c.dtype and not _overlap(out, c):
        # Straight into the output's memory (FSDP's all-gathers).
        pg.allgather_into(_bytes(c), _bytes(out), None)
        return
    res = torch.from_numpy(pg.allgather(_bytes(c), None))
    out.copy_(res.reshape(-1).view(inp.dtype).reshape(output.shape))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def reduce_scatter(pg: Any, out: torch.Tensor, inputs: List[torch.Tensor], op: str, rank: int) -> None:
    sizes = [i.numel() for i in inputs]
    if sizes[rank] != out.numel():
        raise ValueError(
            f"reduce_scatter: this rank's input part has {sizes[rank]} elements but its output {out.numel()}"
        )
    flat = torch.cat([i.detach().reshape(-1) for i in inputs])
    if flat.is_cuda and len(set(sizes)) == 1 and _cuda.reduce_scatter_flat(pg, out, flat, op):
        return
    if len(set(sizes)) == 1 and flat.dtype in NATIVE and flat.numel() > 0:
        part = pg.reduce_scatter(torch_view(flat), op, None)
        out.detach().copy_(torch.from_numpy(part).view(flat.dtype).reshape(out.shape) if flat.dtype == torch.bfloat16 else torch.from_numpy(part).reshape(out.shape))
        return
    allreduce(pg, flat, op)
    start = sum(sizes[:rank])
    out.detach().copy_(flat[start : start + sizes[rank]].reshape(out.shape))


def reduce_scatter_flat(pg: Any, out: torch.Tensor, inp: torch.Tensor, op: str, rank: int) -> None:
    world = inp.numel() // max(out.numel(), 1) if out.numel() else 1
    parts = list(inp.detach().reshape(-1).chunk(world)) if out.numel() else []
    if not parts:
        return
    reduce_scatter(pg, out, parts, op, rank)


def gather(pg: Any, outputs: List[List[torch.Tensor]], inp: torch.Tensor, root: int, rank: int, size: int) -> None:
    if rank != root:
        send(pg, inp, root)
        return
    outs = outputs[0]
    for r in range(size):
        if r == root:
            outs[r].detach().copy_(inp.detach().reshape(outs[r].shape))
        else:
            recv(pg, outs[r], r)


def scatter(pg: Any, out: torch.Tensor, inputs: List[List[torch.Tensor]], root: int, rank: int, size: int) -> None:
    if rank != root:
        recv(pg, out, root)
        return
    ins = inputs[0]
    for r in range(size):
        if r == root:
            out.detach().copy_(ins[r].detach().reshape(out.shape))
        else:
            send(pg, ins[r], r)


def alltoall(pg: Any, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], rank: int, size: int) -> None:
    """Each rank sends ``inputs[r]`` to r and receives ``outputs[r]`` from r.

    Step k pairs every rank with ``rank + k`` (to) and ``rank - k`` (from); the ranks of each cycle
    of step k alternate between sending first and receiving first, so blocking sends never wait on
    each other in a circle.
    """
    outputs[rank].detach().copy_(inputs[rank].detach().reshape(outputs[rank].shape))
    for k in range(1, size):
        to, frm = (rank + k) % size, (rank - k) % size
        g = math.gcd(size, k)
        # Position of this rank in its cycle c, c+k, c+2k, ... (mod size).
        pos, r = 0, rank % g
        while r != rank:
            r = (r + k) % size
            pos += 1
        if pos % 2 == 0:
            send(pg, inputs[to], to)
            recv(pg, outputs[frm], frm)
        else:
            recv(pg, outputs[frm], frm)
            send(pg, inputs[to], to)


def split(t: torch.Tensor, splits: Optional[List[int]], size: int, what: str) -> List[torch.Tensor]:
    """``t`` cut along its first dimension by ``splits`` (equal parts when empty)."""
    if not splits:
        if t.shape[0] % size:
            raise ValueError(f"all_to_all_single: the {what}'s first dimension {t.shape[0]} does not divide by {size} ranks")
        return list(t.chunk(size)) if t.shape[0] else [t] * size
    if len(splits) != size or sum(splits) != t.shape[0]:
        raise ValueError(
            f"all_to_all_single: {what} splits {list(splits)} must be {size} sizes adding up to {t.shape[0]}"
        )
    return list(torch.split(t, list(splits)))


def p2p_order(rank: int, batch: List[tuple]) -> List[tuple]:
    """A batch of sends and receives in an order that cannot deadlock with blocking sends: by the
    pair of ranks involved (the same order on every rank); within a pair the lower rank sends
    first and the higher receives first; otherwise in the order issued."""

    def key(item: Tuple[int, tuple]) -> Tuple[int, int, int, int]:
        i, (kind, peer, _, _) = item
        first = (rank < peer) == (kind == "send")
        return (min(rank, peer), max(rank, peer), 0 if first else 1, i)

    return [item for _, item in sorted(enumerate(batch), key=key)]


def check_peer(peer: int, size: int, me: Optional[int]) -> None:
    if not 0 <= peer < size:
        raise ValueError(f"rank {peer} is not in this group of {size} ranks")
    if me is not None and peer == me:
        raise ValueError(f"rank {me} cannot send to or receive from itself")


def check_lists(what: str, lists: List[List[torch.Tensor]], singles: List[torch.Tensor], size: int) -> None:
    if len(lists) != len(singles):
        raise ValueError(f"{what}: {len(lists)} tensor lists for {len(singles)} tensors")
    for lst in lists:
        if len(lst) != size:
            raise ValueError(f"{what}: a list of {len(lst)} tensors for a group of {size} ranks")


def check_numel(what: str, t: torch.Tensor, expected: int) -> None:
    if t.numel() != expected:
        raise ValueError(f"{what}: a tensor of {t.numel()} elements where {expected} are needed")
