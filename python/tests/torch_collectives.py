"""Every torch.distributed call on the "tandem" backend, checked against references each rank
computes itself from every rank's inputs (which it can regenerate: they are seeded by rank).

Run by test_torch.py under torchrun, and with init_method tcp:// and file:// (RANK, WORLD_SIZE and
INIT_METHOD in the environment), and by test_torch_cuda.py on CUDA tensors (TEST_DEVICE=cuda: every
tensor is made on the GPU; the references are computed on the CPU). Prints "CHECKED <n>" when every
check passed.
"""

import os
import sys

import torch
import torch.distributed as dist

import tandem.torch  # noqa: F401  (registers the backend)

init = os.environ.get("INIT_METHOD")
if init:
    dist.init_process_group("tandem", init_method=init, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
else:
    dist.init_process_group("tandem")
r, w = dist.get_rank(), dist.get_world_size()
DEV = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
if DEV.type == "cuda":
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", r)) % torch.cuda.device_count())
    DEV = torch.device("cuda", torch.cuda.current_device())
# Every factory call below makes its tensor on DEV.
torch.set_default_device(DEV)
assert dist.get_backend() == "tandem", dist.get_backend()
checks = 0

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INTS = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def data(rank: int, dtype: torch.dtype, n: int = 37, seed: int = 0, small: bool = False) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(7919 * seed + rank)
    if dtype.is_floating_point:
        x = torch.rand(n, generator=g, dtype=torch.float64, device="cpu") * (1.5 if small else 8.0) + (0.25 if small else -4.0)
        return x.to(dtype).to(DEV)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, device="cpu").bool().to(DEV)
    lo, hi = (0, 4) if small else ((0, 200) if dtype == torch.uint8 else (-100, 100))
    return torch.randint(lo, hi, (n,), generator=g, device="cpu").to(dtype).to(DEV)


def everyone(dtype: torch.dtype, **kw) -> torch.Tensor:
    return torch.stack([data(k, dtype, **kw) for k in range(w)])


def check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float = 0.0) -> None:
    global checks
    checks += 1
    if got.device != DEV:
        sys.exit(f"rank {r}: {what}: the result is on {got.device}, not {DEV}")
    got, want = got.cpu(), want.cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        sys.exit(f"rank {r}: {what}: got {got.dtype}{tuple(got.shape)}, want {want.dtype}{tuple(want.shape)}")
    if tol == 0.0:
        ok = torch.equal(got, want)
    else:
        ok = torch.allclose(got.double(), want.double(), rtol=tol, atol=tol)
    if not ok:
        sys.exit(f"rank {r}: {what}: got {got.tolist()[:8]}..., want {want.tolist()[:8]}...")


def tol_of(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-5, torch.float64: 1e-12}.get(dtype, 0.0)


def reference(op: str, xs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    wide = xs.double() if dtype.is_floating_point else xs.long()
    if op == "sum":
        out = wide.sum(0)
    elif op == "avg":
        out = wide.mean(0)
    elif op == "min":
        out = wide.min(0).values
    elif op == "max":
        out = wide.max(0).values
    else:
        out = wide.prod(0)
    return out.to(dtype)


OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "min": dist.ReduceOp.MIN,
       "max": dist.ReduceOp.MAX, "prod": dist.ReduceOp.PRODUCT}

# all_reduce: every op on every dtype it makes sense for.
for dtype in FLOATS + INTS:
    for name, op in OPS.items():
        if name == "avg" and not dtype.is_floating_point:
            continue
        small = name == "prod"
        x = data(r, dtype, small=small)
        dist.all_reduce(x, op=op)
        check(f"all_reduce {name} {dtype}", x, reference(name, everyone(dtype, small=small), dtype), tol_of(dtype))

# bool: SUM and MAX are or, MIN and PRODUCT and.
for name, op in OPS.items():
    if name == "avg":
        continue
    x = data(r, torch.bool)
    dist.all_reduce(x, op=op)
    xs = everyone(torch.bool)
    want = xs.any(0) if name in ("sum", "max") else xs.all(0)
    check(f"all_reduce {name} bool", x, want)
try:
    dist.all_reduce(data(r, torch.bool), op=dist.ReduceOp.AVG)
    sys.exit(f"rank {r}: all_reduce AVG on bool tensors was accepted")
except Exception as e:  # noqa: BLE001 - torch may wrap the backend's ValueError
    if "bool" not in str(e):
        sys.exit(f"rank {r}: all_reduce AVG on bool: the error does not name bool: {e}")
    checks += 1

# A tensor that is not contiguous, and a parameter that requires grad.
base = torch.arange(24, dtype=torch.float32).reshape(4, 6) * (r + 1)
view = base[:, ::2]
dist.all_reduce(view)
want = torch.arange(24, dtype=torch.float32).reshape(4, 6) * sum(k + 1 for k in range(w))
check("all_reduce non-contiguous", base[:, ::2], want[:, ::2])
check("all_reduce non-contiguous leaves the rest", base[:, 1::2], (torch.arange(24.0).reshape(4, 6) * (r + 1))[:, 1::2])
p = torch.nn.Parameter(data(r, torch.float32))
dist.all_reduce(p.data)
check("all_reduce parameter", p.detach(), reference("sum", everyone(torch.float32), torch.float32), 1e-5)

# broadcast and reduce.
root = 1 % w
for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.bool):
    x = data(r, dtype)
    dist.broadcast(x, src=root)
    check(f"broadcast {dtype}", x, data(root, dtype))
x = data(r, torch.float64)
dist.reduce(x, dst=w - 1, op=dist.ReduceOp.SUM)
if r == w - 1:
    check("reduce", x, reference("sum", everyone(torch.float64), torch.float64), 1e-12)
# The dtypes reduced through a wider type or as uint8.
x = data(r, torch.int8)
dist.reduce(x, dst=0, op=dist.ReduceOp.MAX)
if r == 0:
    check("reduce int8", x, reference("max", everyone(torch.int8), torch.int8))
x = data(r, torch.bool)
dist.reduce(x, dst=0, op=dist.ReduceOp.MIN)
if r == 0:
    check("reduce bool", x, everyone(torch.bool).all(0))

# Tensors that are not contiguous receive into their own elements and no others.
grid = torch.full((3, 8), -1, dtype=torch.int32)
if r == root:
    dist.broadcast(torch.arange(12, dtype=torch.int32).reshape(3, 4), src=root)
else:
    dist.broadcast(grid[:, ::2], src=root)
    check("broadcast into a strided tensor", grid[:, ::2], torch.arange(12, dtype=torch.int32).reshape(3, 4))
    check("broadcast into a strided tensor leaves the rest", grid[:, 1::2], torch.full((3, 4), -1, dtype=torch.int32))

# all_gather and all_gather_into_tensor.
outs = [torch.empty(37, dtype=torch.int16) for _ in range(w)]
dist.all_gather(outs, data(r, torch.int16))
check("all_gather", torch.stack(outs), everyone(torch.int16))
flat = torch.empty(37 * w, dtype=torch.bfloat16)
dist.all_gather_into_tensor(flat, data(r, torch.bfloat16))
check("all_gather_into_tensor", flat, everyone(torch.bfloat16).reshape(-1))

# In place, as FSDP gathers: the input is this rank's part of the output.
flat = torch.zeros(37 * w, dtype=torch.float32)
flat[37 * r: 37 * (r + 1)] = data(r, torch.float32)
dist.all_gather_into_tensor(flat, flat[37 * r: 37 * (r + 1)])
check("all_gather_into_tensor in place", flat, everyone(torch.float32).reshape(-1))
# Into a strided output of shape (world, n).
grid = torch.zeros(w, 2 * 37, dtype=torch.float64)
dist.all_gather_into_tensor(grid[:, :37], data(r, torch.float64))
check("all_gather_into_tensor strided", grid[:, :37], everyone(torch.float64))
check("all_gather_into_tensor strided leaves the rest", grid[:, 37:], torch.zeros(w, 37, dtype=torch.float64))

# reduce_scatter (equal and unequal parts) and reduce_scatter_tensor.
parts = [data(r, torch.float32, n=5, seed=k) for k in range(w)]
out = torch.empty(5)
dist.reduce_scatter(out, parts)
check("reduce_scatter", out, torch.stack([data(k, torch.float32, n=5, seed=r) for k in range(w)]).double().sum(0).float(), 1e-5)
parts = [data(r, torch.int32, n=3 + k, seed=k) for k in range(w)]
out = torch.empty(3 + r, dtype=torch.int32)
dist.reduce_scatter(out, parts, op=dist.ReduceOp.MAX)
check("reduce_scatter unequal", out, torch.stack([data(k, torch.int32, n=3 + r, seed=r) for k in range(w)]).max(0).values)
big = data(r, torch.float32, n=4 * w)
out = torch.empty(4)
dist.reduce_scatter_tensor(out, big)
check("reduce_scatter_tensor", out, everyone(torch.float32, n=4 * w).double().sum(0).float()[4 * r: 4 * r + 4], 1e-5)
for dtype in (torch.int8, torch.bool):
    big = data(r, dtype, n=4 * w)
    out = torch.empty(4, dtype=dtype)
    dist.reduce_scatter_tensor(out, big, op=dist.ReduceOp.MAX)
    check(f"reduce_scatter_tensor {dtype}", out, everyone(dtype, n=4 * w).max(0).values[4 * r: 4 * r + 4])
big = data(r, torch.float64, n=4 * w)
pair = torch.zeros(4, 2, dtype=torch.float64)
dist.reduce_scatter_tensor(pair[:, 0], big)
check("reduce_scatter_tensor into a strided tensor", pair[:, 0], everyone(torch.float64, n=4 * w).sum(0)[4 * r: 4 * r + 4], 1e-12)
check("reduce_scatter_tensor into a strided tensor leaves the rest", pair[:, 1], torch.zeros(4, dtype=torch.float64))

# gather and scatter.
gl = [torch.empty(37, dtype=torch.float16) for _ in range(w)] if r == 0 else None
dist.gather(data(r, torch.float16), gather_list=gl, dst=0)
if r == 0:
    check("gather", torch.stack(gl), everyone(torch.float16))
sl = [data(k, torch.int64, seed=5) for k in range(w)] if r == root else None
out = torch.empty(37, dtype=torch.int64)
dist.scatter(out, scatter_list=sl, src=root)
check("scatter", out, data(r, torch.int64, seed=5))

# all_to_all (a different size for every pair) and all_to_all_single with splits.
ins = [torch.full((1 + r + 2 * k,), float(10 * r + k)) for k in range(w)]
outs = [torch.empty(1 + k + 2 * r) for k in range(w)]
dist.all_to_all(outs, ins)
for k in range(w):
    check(f"all_to_all from {k}", outs[k], torch.full((1 + k + 2 * r,), float(10 * k + r)))
in_splits = [k + 1 for k in range(w)]
inp = torch.cat([torch.full((k + 1, 2), float(100 * r + k), dtype=torch.float64) for k in range(w)])
out_splits = [r + 1] * w
out = torch.empty(sum(out_splits), 2, dtype=torch.float64)
dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits)
check("all_to_all_single", out, torch.cat([torch.full((r + 1, 2), float(100 * k + r), dtype=torch.float64) for k in range(w)]))

# send/recv around the ring, and a batch of large isend/irecv both ways (would deadlock if the
# sends ran before the receives on every rank).
nxt, prv = (r + 1) % w, (r - 1) % w
if w > 1:
    if r % 2 == 0:
        dist.send(data(r, torch.float32, seed=9), dst=nxt)
        got = torch.empty(37)
        dist.recv(got, src=prv)
    else:
        got = torch.empty(37)
        dist.recv(got, src=prv)
        dist.send(data(r, torch.float32, seed=9), dst=nxt)
    check("send/recv", got, data(prv, torch.float32, seed=9))
    pair = torch.zeros(37, 2, dtype=torch.float16)
    if r % 2 == 0:
        dist.send(data(r, torch.float16, seed=10), dst=nxt)
        dist.recv(pair[:, 1], src=prv)
    else:
        dist.recv(pair[:, 1], src=prv)
        dist.send(data(r, torch.float16, seed=10), dst=nxt)
    check("recv into a strided tensor", pair[:, 1], data(prv, torch.float16, seed=10))
    check("recv into a strided tensor leaves the rest", pair[:, 0], torch.zeros(37, dtype=torch.float16))
    n = 1 << 20  # 4 MiB each way, past any socket buffer
    a, b = torch.full((n,), float(r)), torch.full((n,), float(r) + 0.5)
    ra, rb = torch.empty(n), torch.empty(n)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, a, nxt), dist.P2POp(dist.isend, b, prv),
                                   dist.P2POp(dist.irecv, ra, prv), dist.P2POp(dist.irecv, rb, nxt)])
    for q in reqs:
        q.wait()
    check("batch_isend_irecv from the left", ra, torch.full((n,), float(prv)))
    check("batch_isend_irecv from the right", rb, torch.full((n,), float(nxt) + 0.5))

# async_op with futures, as DDP's communication hooks use them.
x = data(r, torch.float32, seed=3)
work = dist.all_reduce(x, async_op=True)
fut = work.get_future().then(lambda f: f.value()[0] * 2)
doubled = fut.wait()
check("async all_reduce future", doubled, reference("sum", everyone(torch.float32, seed=3), torch.float32) * 2, 1e-5)
assert work.is_completed()

# A subgroup of the even ranks.
evens = list(range(0, w, 2))
sub = dist.new_group(evens)
if r in evens:
    x = torch.tensor([float(r)])
    dist.all_reduce(x, group=sub)
    check("new_group all_reduce", x, torch.tensor([float(sum(evens))]))

# Another subgroup after it, of every rank but 1 (rank 1 is no member of either: the members'
# groups must still agree on their names), then one of all ranks.
others = [k for k in range(w) if k != 1]
sub2 = dist.new_group(others)
if r in others:
    x = torch.tensor([1.0])
    dist.all_reduce(x, group=sub2)
    check("second new_group all_reduce", x, torch.tensor([float(len(others))]))
everyone_group = dist.new_group(list(range(w)))
x = torch.tensor([float(r)])
dist.all_reduce(x, group=everyone_group)
check("third new_group all_reduce", x, torch.tensor([float(sum(range(w)))]))

# Objects (pickled through all_gather and broadcast of uint8 tensors).
objs = [None] * w
dist.all_gather_object(objs, {"rank": r, "name": f"r{r}"})
check("all_gather_object", torch.tensor([o["rank"] for o in objs]), torch.arange(w))
lst = [{"from": r}] if r == root else [None]
dist.broadcast_object_list(lst, src=root)
check("broadcast_object_list", torch.tensor([lst[0]["from"]]), torch.tensor([root]))

# The flight recorder and metrics see these calls like any of Tandem's.
import tandem  # noqa: E402

ops = sum(v for labels, v in tandem.metrics().get("tandem_op_seconds_count", []))
if ops < 50:
    sys.exit(f"rank {r}: Tandem's metrics counted {ops} operations")
checks += 1

dist.barrier()
print(f"CHECKED {checks}", flush=True)
dist.destroy_process_group()
