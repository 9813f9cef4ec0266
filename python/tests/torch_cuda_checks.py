"""What the "tandem" backend refuses on CUDA memory, in one process (run by test_torch_cuda.py with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so each tensor is an allocation of its own): addresses CUDA does
not know, lengths past the end of an allocation, and a tensor on another GPU than the group's.
Prints "CHECKED <n>" when every check passed.
"""

import os
import sys

import torch
import torch.distributed as dist

import tandem.torch  # noqa: F401  (registers the backend)
from tandem import _native
from tandem.errors import InvalidArgumentError

dist.init_process_group("tandem", init_method=os.environ["INIT_METHOD"], rank=0, world_size=1)
torch.cuda.set_device(0)
pg = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).native
dg = _native.DeviceGroup(pg, 0)
checks = 0


def refused(what: str, fn, needle: str) -> None:
    global checks
    try:
        fn()
    except InvalidArgumentError as e:
        if needle not in str(e):
            sys.exit(f"{what}: refused, but the message does not say {needle!r}: {e}")
        checks += 1
        return
    sys.exit(f"{what}: accepted")


x = torch.arange(1024, dtype=torch.float32, device="cuda")
torch.cuda.synchronize()
# The whole allocation is accepted (one rank: an allreduce leaves it as it is) ...
dg.allreduce(x.data_ptr(), x.numel(), "float32", "sum")
if not torch.equal(x.cpu(), torch.arange(1024, dtype=torch.float32)):
    sys.exit("a one-rank allreduce changed the tensor")
checks += 1
# ... one element more runs past its end.
refused("one element past the end", lambda: dg.allreduce(x.data_ptr(), x.numel() + 1, "float32", "sum"),
        "past the end of their allocation")
refused("the last element, starting one in", lambda: dg.allreduce(x.data_ptr() + 4, x.numel(), "float32", "sum"),
        "past the end of their allocation")
dg.allreduce(x.data_ptr() + 4, x.numel() - 1, "float32", "sum")
checks += 1
# Host memory is not GPU memory.
host = torch.zeros(16)
refused("a CPU tensor's address", lambda: dg.broadcast(host.data_ptr(), 64, "uint8", 0), "not GPU memory")
refused("a null address", lambda: dg.allreduce(0, 4, "float32", "sum"), "null")
refused("an unknown dtype", lambda: dg.allreduce(x.data_ptr(), 4, "complex64", "sum"), "dtype")
# A tensor on another GPU than the group's.
if torch.cuda.device_count() > 1:
    other = torch.ones(4, device="cuda:1")
    try:
        dist.all_reduce(other)
    except ValueError as e:
        if "cuda:0" not in str(e):
            sys.exit(f"a tensor on cuda:1: {e}")
        checks += 1
    else:
        sys.exit("a tensor on cuda:1 was accepted by a group on cuda:0")
print(f"BACKEND {dg.backend}", flush=True)
print(f"CHECKED {checks}", flush=True)
dist.destroy_process_group()
