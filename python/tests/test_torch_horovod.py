"""Horovod's PyTorch API beyond the basics (``tandem.torch``): grouped and reduce-scatter calls,
gradients through the collectives, the machines' layout and ``SyncBatchNorm``; each process's result
checked against a reference computed here from every process's inputs."""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, List

import numpy as np
import pytest

import tandem
from test_torch_api import inputs  # every process's inputs, regenerated from its rank

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


def horovod_more_body() -> Dict[str, Any]:
    import torch

    import tandem.torch as hvd
    from tandem import _native

    hvd.init(timeout=60)
    r, n = hvd.rank(), hvd.size()
    out: Dict[str, Any] = {}
    # grouped_allreduce: fused per dtype, the inputs unchanged; in place; started in the background.
    a, b, c = torch.tensor(inputs(r)), torch.tensor(inputs(r, seed=1)).float(), torch.arange(5) * (r + 1)
    ga, gb, gc = hvd.grouped_allreduce([a, b, c], op=hvd.Sum)
    out["grouped"] = [ga.tolist(), gb.tolist(), gc.tolist(), str(gb.dtype), str(gc.dtype)]
    out["grouped_unchanged"] = torch.equal(a, torch.tensor(inputs(r)))
    hvd.grouped_allreduce_([a, c], op=hvd.Max)
    out["grouped_"] = [a.tolist(), c.tolist()]
    h = hvd.grouped_allreduce_async([torch.tensor(inputs(r, seed=2))], postscale_factor=2.0)
    out["grouped_async"] = [t.tolist() for t in hvd.synchronize(h)]
    # reducescatter: 7 rows over the processes, the first 7 % n taking one more.
    x = torch.tensor(inputs(r, n=14, seed=3)).reshape(7, 2)
    out["rs_avg"] = hvd.reducescatter(x).tolist()
    out["rs_sum"] = hvd.reducescatter(x, op=hvd.Sum, prescale_factor=3.0, postscale_factor=0.5).tolist()
    out["rs_async"] = hvd.synchronize(hvd.reducescatter_async(x, op=hvd.Max)).tolist()
    y = torch.arange(10.0).reshape(5, 2) * (r + 1)
    out["grouped_rs"] = [t.tolist() for t in hvd.grouped_reducescatter([x, y], op=hvd.Sum)]
    out["grouped_rs_async"] = [t.tolist() for t in hvd.synchronize(hvd.grouped_reducescatter_async([y, x]))]
    ragged = [torch.full((r + 1,), float(r)), torch.full((1, 2), r, dtype=torch.int32)]
    out["grouped_ag"] = [t.tolist() for t in hvd.grouped_allgather(ragged)]
    out["grouped_ag_async"] = [t.tolist() for t in hvd.synchronize(hvd.grouped_allgather_async(ragged[::-1]))]
    try:
        hvd.reducescatter(torch.tensor(1.0))
        out["rs_scalar"] = "accepted"
    except ValueError as e:
        out["rs_scalar"] = str(e)
    # Gradients through each collective, as Horovod defines them; w: this rank's weights.
    def weights(shape: Any, seed: int) -> torch.Tensor:
        return torch.tensor(inputs(r, n=int(np.prod(shape)), seed=seed)).reshape(shape)

    grads: Dict[str, Any] = {}
    for name, op in (("sum", hvd.Sum), ("avg", hvd.Average)):
        v = torch.tensor(inputs(r), requires_grad=True)
        (hvd.allreduce(v, op=op) * weights(11, 10)).sum().backward()
        grads[f"allreduce_{name}"] = v.grad.tolist()
    v = torch.tensor(inputs(r), dtype=torch.float32, requires_grad=True)
    y = hvd.allreduce(v, op=hvd.Sum, compression=hvd.Compression.fp16)
    (y * weights(11, 10).float()).sum().backward()
    grads["allreduce_fp16"] = [v.grad.tolist(), str(y.dtype), str(v.grad.dtype)]
    v = torch.full((r + 1, 2), float(r), requires_grad=True, dtype=torch.float64)
    total = n * (n + 1) // 2
    (hvd.allgather(v) * weights((total, 2), 11)).sum().backward()
    grads["allgather"] = v.grad.tolist()
    v = torch.tensor(inputs(r), requires_grad=True)
    (hvd.broadcast(v, root_rank=n - 1) * weights(11, 12)).sum().backward()
    grads["broadcast"] = v.grad.tolist()
    v = torch.cat([torch.full((k + 1, 3), float(10 * r + k)) for k in range(n)]).double().requires_grad_()
    pending = hvd.allreduce_async(torch.full((50000,), float(r)), op=hvd.Sum)  # runs first everywhere
    got, splits = hvd.alltoall(v, splits=[k + 1 for k in range(n)])
    (got * weights((n * (r + 1), 3), 13)).sum().backward()
    grads["alltoall"] = [v.grad.tolist(), splits.tolist(), got.requires_grad]
    grads["pending"] = hvd.synchronize(pending)[:3].tolist()
    for name, op in (("sum", hvd.Sum), ("avg", hvd.Average)):
        v = torch.tensor(inputs(r, n=14, seed=3), requires_grad=True).reshape(7, 2)
        v.retain_grad()
        part = hvd.reducescatter(v, op=op, prescale_factor=2.0)
        (part * weights(tuple(part.shape), 14)).sum().backward()
        grads[f"reducescatter_{name}"] = v.grad.tolist()
    p, q = torch.tensor(inputs(r), requires_grad=True), torch.tensor(inputs(r, n=4), requires_grad=True)
    gp, gq = hvd.grouped_allreduce([p, q], op=hvd.Sum)
    ((gp * weights(11, 15)).sum() + (gq * weights(4, 16)).sum()).backward()
    grads["grouped"] = [p.grad.tolist(), q.grad.tolist()]
    v = torch.tensor(inputs(r), requires_grad=True)
    try:
        hvd.allreduce(v, op=hvd.Max).sum().backward()
        grads["max"] = "no error"
    except RuntimeError as e:
        grads["max"] = str(e)
    out["grads"] = grads
    with torch.no_grad():
        out["no_grad"] = hvd.allreduce(torch.ones(2, requires_grad=True)).requires_grad
    out["machines"] = [hvd.cross_rank(), hvd.cross_size(), hvd.is_homogeneous()]
    out["built"] = [hvd.nccl_built() == _native.DeviceGroup.built_with_nccl(), hvd.cuda_built() == hvd.nccl_built(),
                    hvd.mpi_built(), hvd.gloo_built(), hvd.rocm_built()]
    hvd.shutdown()
    return out


def _rows(total: int, n: int) -> List[int]:
    return [total // n + (1 if r < total % n else 0) for r in range(n)]


def test_horovod_grouped_reducescatter_gradients_and_queries_match_their_references() -> None:
    n = 3
    res = tandem.run(horovod_more_body, nproc=n, timeout=180)

    def w(rank: int, shape: Any, seed: int) -> np.ndarray:
        return inputs(rank, n=int(np.prod(shape)), seed=seed).reshape(shape)

    total = n * (n + 1) // 2
    rows = _rows(7, n)
    xs = [inputs(k, n=14, seed=3).reshape(7, 2) for k in range(n)]
    for r, got in enumerate(res):
        np.testing.assert_allclose(got["grouped"][0], np.sum([inputs(k) for k in range(n)], axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["grouped"][1], np.sum([inputs(k, seed=1) for k in range(n)], axis=0), rtol=1e-5)
        assert got["grouped"][2] == (np.arange(5) * sum(k + 1 for k in range(n))).tolist()
        assert got["grouped"][3:] == ["torch.float32", "torch.int64"]
        assert got["grouped_unchanged"]
        np.testing.assert_array_equal(got["grouped_"][0], np.max([inputs(k) for k in range(n)], axis=0))
        assert got["grouped_"][1] == (np.arange(5) * n).tolist()
        np.testing.assert_allclose(got["grouped_async"][0], 2 * np.mean([inputs(k, seed=2) for k in range(n)], axis=0), rtol=1e-12)
        lo, hi = sum(rows[:r]), sum(rows[: r + 1])
        assert len(got["rs_avg"]) == rows[r]
        np.testing.assert_allclose(got["rs_avg"], np.mean(xs, axis=0)[lo:hi], rtol=1e-12)
        np.testing.assert_allclose(got["rs_sum"], 1.5 * np.sum(xs, axis=0)[lo:hi], rtol=1e-12)
        np.testing.assert_array_equal(got["rs_async"], np.max(xs, axis=0)[lo:hi])
        assert "no dimensions" in got["rs_scalar"]
        ys = [np.arange(10.0).reshape(5, 2) * (k + 1) for k in range(n)]
        lo5, hi5 = sum(_rows(5, n)[:r]), sum(_rows(5, n)[: r + 1])
        np.testing.assert_allclose(got["grouped_rs"][0], np.sum(xs, axis=0)[lo:hi], rtol=1e-12)
        np.testing.assert_allclose(got["grouped_rs"][1], np.sum(ys, axis=0)[lo5:hi5], rtol=1e-12)
        np.testing.assert_allclose(got["grouped_rs_async"][0], np.mean(ys, axis=0)[lo5:hi5], rtol=1e-12)
        np.testing.assert_allclose(got["grouped_rs_async"][1], np.mean(xs, axis=0)[lo:hi], rtol=1e-12)
        want_ag = [np.concatenate([np.full(k + 1, float(k)) for k in range(n)]).tolist(), [[k, k] for k in range(n)]]
        assert got["grouped_ag"] == want_ag
        assert got["grouped_ag_async"] == want_ag[::-1]
        g = got["grads"]
        np.testing.assert_allclose(g["allreduce_sum"], np.sum([w(k, 11, 10) for k in range(n)], axis=0), rtol=1e-12)
        np.testing.assert_allclose(g["allreduce_avg"], np.mean([w(k, 11, 10) for k in range(n)], axis=0), rtol=1e-12)
        np.testing.assert_allclose(g["allreduce_fp16"][0], np.sum([w(k, 11, 10) for k in range(n)], axis=0), rtol=2e-2, atol=2e-2)
        assert g["allreduce_fp16"][1:] == ["torch.float32", "torch.float32"]
        start = r * (r + 1) // 2
        want = np.mean([w(k, (total, 2), 11) for k in range(n)], axis=0)[start:start + r + 1]
        np.testing.assert_allclose(g["allgather"], want, rtol=1e-12)
        want = np.mean([w(k, 11, 12) for k in range(n)], axis=0) if r == n - 1 else np.zeros(11)
        np.testing.assert_allclose(g["broadcast"], want, rtol=1e-12)
        # Rank r sent k + 1 rows to rank k, which holds them at rows r (k + 1) .. of its output.
        want = np.concatenate([w(k, (n * (k + 1), 3), 13)[r * (k + 1):(r + 1) * (k + 1)] for k in range(n)])
        np.testing.assert_allclose(g["alltoall"][0], want, rtol=1e-12)
        assert g["alltoall"][1] == [r + 1] * n and g["alltoall"][2] is True
        assert g["pending"] == [float(sum(range(n)))] * 3
        # reducescatter's gradient: the allgather of every rank's, times n for Sum, times the prescale.
        every = np.concatenate([w(k, (rows[k], 2), 14) for k in range(n)])
        np.testing.assert_allclose(g["reducescatter_sum"], 2.0 * n * every, rtol=1e-12)
        np.testing.assert_allclose(g["reducescatter_avg"], 2.0 * every, rtol=1e-12)
        np.testing.assert_allclose(g["grouped"][0], np.sum([w(k, 11, 15) for k in range(n)], axis=0), rtol=1e-12)
        np.testing.assert_allclose(g["grouped"][1], np.sum([w(k, 4, 16) for k in range(n)], axis=0), rtol=1e-12)
        assert "has no gradient" in g["max"] and "max" in g["max"], g["max"]
        assert got["no_grad"] is False
        assert got["machines"] == [0, 1, True]
        assert got["built"] == [True, True, False, False, False]


def test_machines_are_numbered_by_their_lowest_rank_and_uneven_ones_are_not_homogeneous() -> None:
    from tandem.torch import _layout

    ids = ["b", "a", "b", "a"]  # ranks interleaved over two machines
    assert [_layout(ids, r) for r in range(4)] == [(0, 2, True), (1, 2, True), (0, 2, True), (1, 2, True)]
    assert _layout(["a", "a", "b"], 2) == (1, 2, False)
    assert _layout(["a", "a", "b", "b", "c"], 4) == (2, 3, False)
    assert _layout(["a"], 0) == (0, 1, True)


def _bn_input(rank: int, step: int):
    import torch

    g = torch.Generator().manual_seed(100 * step + rank)
    # Every process its own batch size (rank + 2 samples), 3 channels, 4 positions.
    return torch.randn(rank + 2, 3, 4, generator=g, dtype=torch.float64) * (1 + rank) + rank


def _bn_weights(rank: int, rows: int, step: int):
    import torch

    g = torch.Generator().manual_seed(1000 + 100 * step + rank)
    return torch.randn(rows, 3, 4, generator=g, dtype=torch.float64)


def sync_bn_body() -> Dict[str, Any]:
    import torch

    import tandem.torch as hvd

    hvd.init(timeout=60)
    r = hvd.rank()
    bn = hvd.SyncBatchNorm(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    steps = []
    for step in range(2):
        x = _bn_input(r, step).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * _bn_weights(r, x.shape[0], step)).sum().backward()
        steps.append({"y": y.tolist(), "dx": x.grad.tolist(), "dw": bn.weight.grad.tolist(), "db": bn.bias.grad.tolist()})
    bn.eval()
    evaluated = bn(_bn_input(r, 7)).tolist()
    out = {"steps": steps, "running": [bn.running_mean.tolist(), bn.running_var.tolist()], "eval": evaluated}
    try:
        bn.train()
        bn(torch.ones(1, 3, dtype=torch.float64) if r == 0 else torch.ones(0, 3, dtype=torch.float64))
        out["one_value"] = "accepted"
    except ValueError as e:
        out["one_value"] = str(e)
    two = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=torch.float64)
    out["two_values"] = bn(two if r == 0 else two[:0]).tolist()  # two values over every process: enough
    try:
        bn(torch.ones(4, 5, dtype=torch.float64))
        out["channels"] = "accepted"
    except ValueError as e:
        out["channels"] = str(e)
    hvd.shutdown()
    return out


def test_sync_batch_norm_equals_batch_norm_on_the_whole_batch() -> None:
    import torch

    n = 3
    res = tandem.run(sync_bn_body, nproc=n, timeout=180)
    bn = torch.nn.BatchNorm1d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, 0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    sizes = [r + 2 for r in range(n)]
    for step in range(2):
        x = torch.cat([_bn_input(r, step) for r in range(n)]).requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * torch.cat([_bn_weights(r, sizes[r], step) for r in range(n)])).sum().backward()
        parts = list(zip(torch.split(y.detach(), sizes), torch.split(x.grad, sizes)))
        for r, got in enumerate(res):
            s = got["steps"][step]
            np.testing.assert_allclose(s["y"], parts[r][0].numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(s["dx"], parts[r][1].numpy(), rtol=1e-10, atol=1e-12)
        # Each process keeps its own weight and bias gradients; together they are the whole batch's.
        np.testing.assert_allclose(np.sum([g["steps"][step]["dw"] for g in res], axis=0), bn.weight.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(np.sum([g["steps"][step]["db"] for g in res], axis=0), bn.bias.grad.numpy(), rtol=1e-10)
    bn.eval()
    for r, got in enumerate(res):
        np.testing.assert_allclose(got["running"][0], bn.running_mean.numpy(), rtol=1e-10)
        np.testing.assert_allclose(got["running"][1], bn.running_var.numpy(), rtol=1e-10)
        np.testing.assert_allclose(got["eval"], bn(_bn_input(r, 7)).detach().numpy(), rtol=1e-10, atol=1e-12)
        # One value per channel over every process cannot be normalized; every process says so.
        assert "more than 1 value per channel" in got["one_value"], got["one_value"]
        w, b = [1.5, 0.5, 2.0], [0.1, -0.2, 0.3]
        # (x - mean) / std: channel 0 -1 then 1, channel 1 0 and 0 (no spread), channel 2 1 then -1.
        want = [[b[0] - w[0], b[1], b[2] + w[2]], [b[0] + w[0], b[1], b[2] - w[2]]]
        np.testing.assert_allclose(np.reshape(got["two_values"], (-1, 3)), want if r == 0 else np.zeros((0, 3)), atol=1e-4)
        assert "5 channels" in got["channels"] and "3" in got["channels"], got["channels"]
