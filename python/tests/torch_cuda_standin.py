"""The CUDA path's own logic (``tandem.torch._cuda``) on a machine without a GPU.

torch_collectives.py runs here with every call of the backend sent down the CUDA path, and the
group's device collectives (``tandem._native.DeviceGroup``, NCCL) replaced by a stand-in that
carries out the same calls, on the same addresses, in host memory through the group's CPU
collectives. The references stay those torch_collectives.py computes itself. What this checks:
each dtype's handling (reduced as it is, int8 and int16 widened, bool as uint8), the copies of
tensors that are not contiguous and their write-back, the all-gathers straight into the output
(FSDP's in-place form included) and through a scratch tensor, reduce-scatter, reduce's root,
send/recv, one device group per process group, and that contiguous tensors are passed by address
(no copy). What it cannot check (test_torch_cuda.py does, on a GPU): NCCL, the driver's address
checks, CUDA streams and futures on CUDA devices.

Run by test_torch.py under torchrun. Prints "CHECKED <n>" and "STAND-IN <n>" when every check
passed.
"""

from __future__ import annotations

import ctypes
import functools
import runpy
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Tuple

import ml_dtypes
import numpy as np
import torch
import torch.distributed as dist

from tandem.torch import _cuda, _ops

NUMPY = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
}


class HostDeviceGroup:
    """``DeviceGroup``'s calls (addresses, element counts, dtype names) carried out in host memory
    by the CPU group, refusing what the real one refuses: unknown dtypes, null addresses, and
    input and output memory that overlap (except an all-gather's input as this rank's own block of
    the output)."""

    made: List["HostDeviceGroup"] = []
    backend = "host stand-in"

    def __init__(self, pg: Any, device: int) -> None:
        if device != 0:
            raise ValueError(f"the stand-in runs on device 0, not {device}")
        self.pg = pg
        self.calls: List[Tuple[str, Tuple[int, ...]]] = []
        HostDeviceGroup.made.append(self)

    @staticmethod
    def built_with_nccl() -> bool:
        return True

    def _at(self, addr: int, numel: int, dtype: str) -> np.ndarray:
        if dtype not in NUMPY:
            raise ValueError(f"unknown dtype {dtype}")
        if addr == 0:
            raise ValueError("a null address")
        nbytes = numel * NUMPY[dtype].itemsize
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(addr)).view(NUMPY[dtype])

    def allreduce(self, addr: int, numel: int, dtype: str, op: str) -> None:
        self.calls.append(("allreduce", (addr,)))
        self.pg.allreduce(self._at(addr, numel, dtype), op, None)

    def broadcast(self, addr: int, numel: int, dtype: str, root: int) -> None:
        self.calls.append(("broadcast", (addr,)))
        self.pg.broadcast(self._at(addr, numel, dtype), root, None)

    def reduce(self, addr: int, numel: int, dtype: str, op: str, root: int) -> None:
        self.calls.append(("reduce", (addr,)))
        self.pg.reduce(self._at(addr, numel, dtype), op, root, None)

    def allgather(self, inp: int, out: int, numel: int, dtype: str) -> None:
        self.calls.append(("allgather", (inp, out)))
        size = numel * NUMPY[dtype].itemsize
        world = self.pg.world_size
        own = inp == out + self.pg.rank * size
        if not own and inp < out + world * size and out < inp + size:
            raise ValueError("all-gather input and output overlap")
        src = self._at(inp, numel, dtype)
        self.pg.allgather_into(src.copy() if own else src, self._at(out, numel * world, dtype), None)

    def reduce_scatter(self, inp: int, out: int, numel: int, dtype: str, op: str) -> None:
        self.calls.append(("reduce_scatter", (inp, out)))
        size, world = numel * NUMPY[dtype].itemsize, self.pg.world_size
        if inp < out + size and out < inp + world * size:
            raise ValueError("reduce-scatter input and output overlap")
        part = self.pg.reduce_scatter(self._at(inp, numel * world, dtype), op, None)
        self._at(out, numel, dtype).view(np.uint8)[:] = np.asarray(part).view(np.uint8)

    def send(self, addr: int, numel: int, dtype: str, peer: int) -> None:
        self.calls.append(("send", (addr,)))
        self.pg.send(self._at(addr, numel, dtype).view(np.uint8), peer, None)

    def recv(self, addr: int, numel: int, dtype: str, peer: int) -> None:
        self.calls.append(("recv", (addr,)))
        self.pg.recv(self._at(addr, numel, dtype).view(np.uint8), peer, None)


# The CUDA path, on host memory: its device collectives are the stand-in; synchronizing a device
# and asking for the current one have nothing to do.
_cuda._native = SimpleNamespace(DeviceGroup=HostDeviceGroup)  # type: ignore[attr-defined]
_cuda._index = lambda t: 0  # type: ignore[assignment]
torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]

# Inside the backend's tensor operations (and only there: torch's own Python code asks too), CPU
# tensors say they are CUDA tensors, so every call takes the CUDA path.
_inside = threading.local()
torch.Tensor.is_cuda = property(lambda self: getattr(_inside, "on", False) and self.device.type == "cpu")  # type: ignore[assignment]


def _routed(fn: Any) -> Any:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        before = getattr(_inside, "on", False)
        _inside.on = True
        try:
            return fn(*args, **kwargs)
        finally:
            _inside.on = before

    return call


for _name in ("allreduce", "broadcast", "reduce", "send", "recv", "allgather", "allgather_flat",
              "reduce_scatter", "reduce_scatter_flat", "gather", "scatter", "alltoall"):
    setattr(_ops, _name, _routed(getattr(_ops, _name)))

# Every call against its reference; the group is kept for the checks below.
_destroy = dist.destroy_process_group
dist.destroy_process_group = lambda group=None: None  # type: ignore[assignment]
runpy.run_path(str(Path(__file__).with_name("torch_collectives.py")), run_name="__main__")
dist.destroy_process_group = _destroy

r, w = dist.get_rank(), dist.get_world_size()
checks = 0


def expect(what: str, ok: bool) -> None:
    global checks
    if not ok:
        sys.exit(f"rank {r}: {what}")
    checks += 1


pg = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).native
dg = next((m for m in HostDeviceGroup.made if m.pg is pg), None)
expect("the default group's device collectives were made", dg is not None)
expect("one device group per process group", len({id(m.pg) for m in HostDeviceGroup.made}) == len(HostDeviceGroup.made))
assert dg is not None


def last(kind: str) -> Tuple[int, ...]:
    assert dg is not None
    return next(a for k, a in reversed(dg.calls) if k == kind)


# Contiguous tensors are passed by address; others through a copy that is written back.
x = torch.full((6,), float(r + 1))
dist.all_reduce(x)
expect("a contiguous all_reduce is passed by address", last("allreduce") == (x.data_ptr(),))
expect("the all_reduce's sum", torch.equal(x, torch.full((6,), float(w * (w + 1) // 2))))
m = torch.zeros(4, 6, dtype=torch.float64)
cols = m[:, ::2]
cols.fill_(r + 1)
dist.all_reduce(cols)
expect("a strided all_reduce goes through a copy", last("allreduce") != (cols.data_ptr(),))
expect("a strided all_reduce is written back", torch.equal(m[:, ::2], torch.full((4, 3), float(w * (w + 1) // 2), dtype=torch.float64))
       and torch.equal(m[:, 1::2], torch.zeros(4, 3, dtype=torch.float64)))
b = torch.full((5,), r, dtype=torch.int16)
dist.broadcast(b, src=w - 1)
expect("a contiguous broadcast is passed by address", last("broadcast") == (b.data_ptr(),))
expect("the broadcast", torch.equal(b, torch.full((5,), w - 1, dtype=torch.int16)))

x = torch.full((4,), float(r), dtype=torch.float16)
dist.reduce(x, dst=0)
expect("a float16 reduce is the device group's reduce, by address", last("reduce") == (x.data_ptr(),))
if r == 0:
    expect("the reduce's sum", torch.equal(x, torch.full((4,), float(w * (w - 1) // 2), dtype=torch.float16)))

# all_gather_into_tensor: straight into a separate output, and in place from this rank's block.
n = 3
out = torch.empty(w * n, dtype=torch.bfloat16)
inp = torch.full((n,), r + 0.5, dtype=torch.bfloat16)
dist.all_gather_into_tensor(out, inp)
expect("a separate all-gather is passed by address", last("allgather") == (inp.data_ptr(), out.data_ptr()))
want = torch.arange(w, dtype=torch.float32).repeat_interleave(n).add(0.5).to(torch.bfloat16)
expect("the all-gather", torch.equal(out, want))
whole = torch.zeros(w * n, dtype=torch.int64)
mine = whole[r * n:(r + 1) * n]
mine.fill_(10 * r + 1)
dist.all_gather_into_tensor(whole, mine)
expect("an in-place all-gather is passed by address", last("allgather") == (mine.data_ptr(), whole.data_ptr()))
expect("the in-place all-gather", torch.equal(whole, (10 * torch.arange(w) + 1).repeat_interleave(n)))
# The input inside the output but not at this rank's block: through a scratch tensor.
if w > 1:
    whole = torch.zeros(w * n, dtype=torch.int32)
    elsewhere = whole[((r + 1) % w) * n:((r + 1) % w + 1) * n]
    elsewhere.fill_(r + 7)
    dist.all_gather_into_tensor(whole, elsewhere)
    expect("an overlapping all-gather goes through a scratch tensor", last("allgather")[1] != whole.data_ptr())
    expect("the overlapping all-gather", torch.equal(whole, (torch.arange(w, dtype=torch.int32) + 7).repeat_interleave(n)))

# reduce_scatter_tensor into a contiguous output is passed by address.
flat = torch.arange(w * n, dtype=torch.float32) * (r + 1)
part = torch.empty(n)
dist.reduce_scatter_tensor(part, flat)
expect("a contiguous reduce-scatter is passed by address", last("reduce_scatter")[1] == part.data_ptr())
expect("the reduce-scatter", torch.equal(part, torch.arange(r * n, (r + 1) * n, dtype=torch.float32) * (w * (w + 1) // 2)))

dist.barrier()
print(f"STAND-IN {checks}", flush=True)
dist.destroy_process_group()
