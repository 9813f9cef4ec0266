"""Every collective and dtype from Python, in separate processes, against numpy references."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import tandem

FLOATS = [np.float32, np.float64, np.float16]
INTS = [np.int32, np.int64, np.uint8]


def data(rank: int, dtype: type, n: int, case: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * case + rank)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(1, 4, size=n).astype(dtype)
    return rng.uniform(-2, 2, size=n).astype(dtype)


def cases():
    out = []
    for dtype in FLOATS + INTS:
        ops = ["sum", "min", "max", "prod"] + (["avg"] if dtype in FLOATS else [])
        for op in ops:
            out.append((dtype, op))
    return out


def rank_body(n: int) -> dict:
    g = tandem.init(timeout=30)
    r, w = g.rank, g.world_size
    out = {}
    for case, (dtype, op) in enumerate(cases()):
        a = data(r, dtype, n, case)
        g.allreduce(a, op)
        out[("allreduce", case)] = a
    b = data(r, np.float32, n, 99)
    g.broadcast(b, root=w - 1)
    out["broadcast"] = b
    out["allgather"] = g.allgather(data(r, np.int64, n, 98).reshape(-1, 1) if n else np.zeros((0, 1), np.int64))
    rs_in = data(r, np.float64, 4 * w * 3, 97).reshape(4 * w, 3)
    out["reduce_scatter"] = g.reduce_scatter(rs_in)
    out["reduce_scatter_unchanged"] = np.array_equal(rs_in, data(r, np.float64, 4 * w * 3, 97).reshape(4 * w, 3))
    red = data(r, np.float32, n, 96)
    g.reduce(red, "max", root=0)
    out["reduce"] = red
    works = [g.allreduce_async(data(r, np.float32, n, 200 + i)) for i in range(4)]
    out["async"] = [wk.wait() for wk in works]
    ring = data(r, np.int32, n, 95)
    got = np.zeros_like(ring)
    if r % 2 == 0:
        g.send(ring, (r + 1) % w)
        g.recv(got, (r - 1) % w)
    else:
        g.recv(got, (r - 1) % w)
        g.send(ring, (r + 1) % w)
    out["recv"] = got
    g.barrier()
    g.barrier_async().wait()
    g.shutdown()
    return out


def reference(dtype: type, op: str, arrays: list) -> np.ndarray:
    if dtype == np.float16:
        # Tandem reduces half precision in f32 and rounds once.
        stack = np.stack([a.astype(np.float32) for a in arrays])
    elif np.issubdtype(dtype, np.integer):
        stack = np.stack([a.astype(np.int64) for a in arrays])
    else:
        stack = np.stack([a.astype(np.float64) for a in arrays])
    f = {"sum": np.sum, "min": np.min, "max": np.max, "prod": np.prod, "avg": np.mean}[op]
    return f(stack, axis=0).astype(dtype)


@pytest.mark.parametrize("world,n", [(2, 1001), (3, 1), (3, 0), (4, 4096)])
def test_every_collective_matches_numpy(world: int, n: int) -> None:
    results = tandem.run(rank_body, nproc=world, args=(n,), timeout=120)
    for case, (dtype, op) in enumerate(cases()):
        want = reference(dtype, op, [data(r, dtype, n, case) for r in range(world)])
        for r in range(world):
            got = results[r][("allreduce", case)]
            assert got.dtype == dtype
            if dtype == np.float16:
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=2e-3)
            elif dtype in FLOATS:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{dtype} {op}")
    for r in range(world):
        res = results[r]
        np.testing.assert_array_equal(res["broadcast"], data(world - 1, np.float32, n, 99))
        gathered = np.stack([data(q, np.int64, n, 98).reshape(-1, 1) for q in range(world)])
        np.testing.assert_array_equal(res["allgather"], gathered)
        full = sum(data(q, np.float64, 4 * world * 3, 97).reshape(4 * world, 3) for q in range(world))
        np.testing.assert_allclose(res["reduce_scatter"], full[4 * r : 4 * r + 4], rtol=1e-12)
        assert res["reduce_scatter_unchanged"]
        for i, a in enumerate(res["async"]):
            want = sum(data(q, np.float32, n, 200 + i).astype(np.float64) for q in range(world))
            np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res["recv"], data((r - 1) % world, np.int32, n, 95))
    want_max = np.max(np.stack([data(q, np.float32, n, 96) for q in range(world)]), axis=0)
    np.testing.assert_array_equal(results[0]["reduce"], want_max)


def torch_body() -> list:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
    g = tandem.init(timeout=30)
    t = torch.full((2, 3), float(g.rank + 1))
    g.allreduce(t.numpy())  # a view: the tensor itself changes
    g.shutdown()
    return t.tolist()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_cpu_tensors_work_through_numpy_views() -> None:
    for got in tandem.run(torch_body, nproc=2, timeout=120):
        assert got == [[3.0] * 3] * 2


def bf16_body() -> list:
    import ml_dtypes

    g = tandem.init(timeout=30)
    a = np.full(8, g.rank + 1.5, dtype=ml_dtypes.bfloat16)
    g.allreduce(a)
    g.shutdown()
    return a.astype(np.float32).tolist()


@pytest.mark.skipif(importlib.util.find_spec("ml_dtypes") is None, reason="ml_dtypes is not installed")
def test_bfloat16_arrays_from_ml_dtypes() -> None:
    for got in tandem.run(bf16_body, nproc=2, timeout=60):
        assert got == [4.0] * 8


def compressed_body(n: int) -> dict:
    g = tandem.init(timeout=30, compression="bf16")
    r = g.rank
    out: dict = {"default": g.compression}
    a = data(r, np.float32, n, 300)
    g.allreduce(a, compression="bf16")
    out["bf16"] = a
    # Top-k of half the elements, with error feedback: two steps, the second from a compressor
    # restored from the first's saved state (as after a restart).
    c = tandem.Compressor("topk:0.5")
    first = data(r, np.float32, n, 301)
    g.allreduce(first, compression=c)
    restored = tandem.Compressor.restore(c.state())
    second = data(r, np.float32, n, 301)
    g.allreduce(second, compression=restored)
    out["topk"] = (first, second, restored.compression)
    errors = []
    for bad in [lambda: g.allreduce(data(r, np.float32, n, 1), compression="topk:0.1"),
                lambda: g.allreduce(data(r, np.float64, n, 1), compression="bf16"),
                lambda: tandem.Compressor("zip")]:
        try:
            bad()
        except (ValueError, TypeError) as e:
            errors.append(f"{type(e).__name__}: {e}")
    out["errors"] = errors
    # The numpy optimizer compresses its float32 buckets with the group's default.
    params = [np.zeros(n, np.float32)]
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=1.0))
    opt.step(params, [np.full(n, float(r + 1), np.float32)])
    out["sgd"] = params[0]
    out["compressors"] = sorted(c.compression for c in opt.compressors.values())
    g.shutdown()
    return out


def top_k_kept(v: np.ndarray, k: int) -> np.ndarray:
    """The entries of v that a top-k keeps (largest magnitudes, ties to the lower index)."""
    order = sorted(range(len(v)), key=lambda i: (-abs(float(v[i])), i))[:k]
    kept = np.zeros_like(v, dtype=np.float64)
    kept[order] = v[order]
    return kept


def test_compressed_allreduces_from_python_match_references_and_refuse_what_they_cannot() -> None:
    world, n = 3, 64
    results = tandem.run(compressed_body, nproc=world, args=(n,), timeout=120)
    exact = sum(data(q, np.float32, n, 300).astype(np.float64) for q in range(world))
    scale = sum(np.abs(data(q, np.float32, n, 300).astype(np.float64)) for q in range(world))
    k = n // 2
    grads = [data(q, np.float32, n, 301).astype(np.float64) for q in range(world)]
    first = sum(top_k_kept(g, k) for g in grads)
    second = sum(top_k_kept(g + (g - top_k_kept(g, k)), k) for g in grads)
    for r, res in enumerate(results):
        assert res["default"] == "bf16"
        assert np.all(np.abs(res["bf16"] - exact) <= 2 * world * 2.0 ** -8 * scale), r
        got_first, got_second, name = res["topk"]
        assert name == "topk:0.5"
        np.testing.assert_allclose(got_first, first, atol=1e-5)
        np.testing.assert_allclose(got_second, second, atol=1e-5)
        errors = res["errors"]
        assert len(errors) == 3, errors
        assert "ValueError" in errors[0] and "tandem.Compressor" in errors[0]
        assert "TypeError" in errors[1] and "float32" in errors[1]
        assert "ValueError" in errors[2] and "zip" in errors[2]
        # SGD with lr 1 from zero: minus the mean gradient (2), exact in bf16.
        np.testing.assert_array_equal(res["sgd"], np.full(n, -2.0, np.float32))
        assert res["compressors"] == ["bf16"]
        np.testing.assert_array_equal(res["bf16"], results[0]["bf16"])


FUSED = [(5, 3), (7,), (2, 2, 2), (1,)]


def bf16_fused_body() -> dict:
    g = tandem.init(timeout=30)
    r = g.rank
    grads = [data(r, np.float32, int(np.prod(s)), 500 + i).reshape(s) for i, s in enumerate(FUSED)]
    grads.append(data(r, np.float64, 3, 509))
    params = [np.zeros_like(a) for a in grads]
    # 64 bytes a bucket: the float32 gradients go in two fused allreduces.
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=1.0), fusion_bytes=64, compression="bf16")
    opt.step(params, grads)
    g.shutdown()
    return {"params": params, "buckets": sorted(opt.compressors)}


def test_the_numpy_optimizer_rounds_each_fused_gradient_to_bf16_once_and_averages_other_dtypes_exactly() -> None:
    world = 3
    results = tandem.run(bf16_fused_body, nproc=world, timeout=120)
    for q, res in enumerate(results):
        assert res["buckets"] == [0, 1]
        for i, s in enumerate(FUSED):
            inputs = [data(p, np.float32, int(np.prod(s)), 500 + i).astype(np.float64) for p in range(world)]
            mean = sum(inputs) / world
            # Each input and each hop's sum rounded once to bf16 (2^-8 relative).
            bound = 2 * world * 2.0 ** -8 * sum(np.abs(a) for a in inputs) / world
            got = -res["params"][i].reshape(-1).astype(np.float64)
            assert np.all(np.abs(got - mean) <= bound), (q, i, got, mean)
            np.testing.assert_array_equal(res["params"][i], results[0]["params"][i])
        everything = np.concatenate([-r.reshape(-1) for r in res["params"][:4]]).astype(np.float64)
        exact = np.concatenate([sum(data(p, np.float32, int(np.prod(s)), 500 + i).astype(np.float64)
                                    for p in range(world)) / world for i, s in enumerate(FUSED)])
        assert np.any(np.abs(everything - exact) > 1e-6), "not rounded: bf16 was not used"
        mean64 = sum(data(p, np.float64, 3, 509) for p in range(world)) / world
        np.testing.assert_allclose(res["params"][4], -mean64, rtol=1e-15)


def powersgd_optimizer_body(setting: str) -> dict:
    import json

    g = tandem.init(timeout=30)
    r = g.rank
    params = [np.zeros((6, 4), np.float32), np.zeros(4, np.float32), np.zeros((3, 2, 2), np.float32)]
    grads = [data(r, np.float32, 24, 303).reshape(6, 4), data(r, np.float32, 4, 304),
             data(r, np.float32, 12, 305).reshape(3, 2, 2)]
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=1.0), compression=setting)
    opt.step(params, grads)
    states = {k: json.loads(c.state()) for k, c in opt.compressors.items()}
    g.shutdown()
    return {"params": params, "columns": {k: s["columns"] for k, s in states.items()}}


def test_the_numpy_optimizer_compresses_each_matrix_with_powersgd_and_sends_vectors_exactly() -> None:
    world = 2
    results = tandem.run(powersgd_optimizer_body, nproc=world, args=("powersgd:4",), timeout=120)
    mean = [sum(data(q, np.float32, n, case).astype(np.float64) for q in range(world)) / world
            for n, case in ((24, 303), (4, 304), (12, 305))]
    for res in results:
        # Each matrix its own compressor, as its first dimension by the rest: 6 x 4 and 3 x 4.
        assert res["columns"] == {0: 4, 2: 4}
        # Rank 4 covers both matrices whole, so PowerSGD returns the average (up to f32 rounding);
        # the vector is averaged exactly.
        np.testing.assert_allclose(res["params"][0].reshape(-1), -mean[0], atol=1e-5)
        np.testing.assert_array_equal(res["params"][1], (-mean[1]).astype(np.float32))
        np.testing.assert_allclose(res["params"][2].reshape(-1), -mean[2], atol=1e-5)
        for a, b in zip(res["params"], results[0]["params"]):
            np.testing.assert_array_equal(a, b)


def warm_start(length: int) -> np.ndarray:
    """PowerSGD's starting Q (transposed, as stored), computed here independently: SplitMix64 of
    each index, its top 24 bits scaled into [-0.5, 0.5)."""
    with np.errstate(over="ignore"):
        z = (np.arange(length, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(40)).astype(np.float64) / float(1 << 24) - 0.5


def powersgd_reference(ms: list, qt: np.ndarray, rank: int) -> tuple:
    """One PowerSGD step in float64 over every rank's M (gradient + residual): the average, each
    rank's new residual, the next Qᵀ. P is orthonormalised by QR with a positive diagonal (what
    Gram-Schmidt gives)."""
    world = len(ms)
    p = sum(m @ qt.T for m in ms)
    p, r = np.linalg.qr(p)
    p = p * np.sign(np.diag(r))
    q = sum(m.T @ p for m in ms)
    mean = p @ q.T / world
    return mean, [m - mean for m in ms], q.T


SHAPES = [(6, 5), (5,), (4, 3, 2), (7,)]


def grad_of(rank: int, step: int) -> list:
    return [data(rank, np.float32, int(np.prod(s)), 400 + 10 * step + i).reshape(s) for i, s in enumerate(SHAPES)]


def powersgd_batch_body(setting: str) -> dict:
    import json

    g = tandem.init(timeout=30)
    r = g.rank
    params = [np.zeros(s, np.float32) for s in SHAPES] + [np.zeros(3, np.float64)]
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=1.0), compression=setting)
    after = []
    for step in range(2):
        opt.step(params, grad_of(r, step) + [np.full(3, r + 0.5)])
        after.append([p.copy() for p in params])
    residuals = {k: np.array(json.loads(c.state())["residual"], np.float32) for k, c in opt.compressors.items()}
    errors, unchanged = [], []
    m = np.ones((2, 2), np.float32)
    c = opt.compressors[0]
    before = c.state()
    for call in (lambda: g.allreduce_powersgd([m], [], [], "avg"),
                 lambda: g.allreduce_powersgd([m], [tandem.Compressor("bf16")], [], "avg"),
                 lambda: g.allreduce_powersgd([m, m.copy()], [c, c], [], "avg"),
                 lambda: g.allreduce_powersgd([m.astype(np.float64)], [c], [], "avg"),
                 lambda: g.allreduce_powersgd([grad_of(r, 0)[0]], [c], [], "max")):
        try:
            call()
            errors.append("")
        except Exception as e:  # noqa: BLE001 - the test checks the type and words
            errors.append(f"{type(e).__name__}: {e}")
    unchanged.append(c.state() == before)
    g.shutdown()
    return {"after": after, "residuals": residuals, "errors": errors, "unchanged": unchanged}


def test_powersgd_batches_every_matrix_and_bias_and_matches_a_float64_reference_over_two_steps() -> None:
    world, rank = 3, 2
    results = tandem.run(powersgd_batch_body, nproc=world, args=(f"powersgd:{rank}",), timeout=120)
    # The reference: each matrix (first dimension by the rest) through PowerSGD from the warm
    # start, its error fed back into the next step; the vectors averaged exactly.
    residual = {i: [np.zeros((s[0], int(np.prod(s[1:])))) for _ in range(world)] for i, s in enumerate(SHAPES)
                if len(s) >= 2}
    qt = {i: warm_start(rank * e[0].shape[1]).reshape(rank, -1) for i, e in residual.items()}
    total = [np.zeros(s) for s in SHAPES]
    for step in range(2):
        grads = [grad_of(q, step) for q in range(world)]
        for i, s in enumerate(SHAPES):
            if i in residual:
                ms = [grads[q][i].reshape(s[0], -1).astype(np.float64) + residual[i][q] for q in range(world)]
                mean, residual[i], qt[i] = powersgd_reference(ms, qt[i], rank)
                total[i] -= mean.reshape(s)
            else:
                total[i] -= sum(grads[q][i].astype(np.float64) for q in range(world)) / world
        for q, res in enumerate(results):
            for i, s in enumerate(SHAPES):
                np.testing.assert_allclose(res["after"][step][i], total[i], atol=2e-4, err_msg=f"rank {q} step {step} #{i}")
            # The float64 tensor goes through the exact fused allreduce.
            np.testing.assert_allclose(res["after"][step][4], -(step + 1) * np.full(3, 1.5), rtol=1e-12)
    for q, res in enumerate(results):
        assert sorted(res["residuals"]) == [0, 2]
        for i in (0, 2):
            np.testing.assert_allclose(res["residuals"][i], residual[i][q].reshape(-1), atol=2e-4)
        for a, b in zip(res["after"][1], results[0]["after"][1]):
            np.testing.assert_array_equal(a, b)
        errors = res["errors"]
        assert errors[0].startswith("ValueError") and "1 matrices but 0 compressors" in errors[0], errors
        assert "powersgd:RANK compressors, not bf16" in errors[1], errors
        assert errors[2].startswith("ValueError") and "given twice" in errors[2], errors
        assert errors[3].startswith("TypeError") and "float32" in errors[3], errors
        assert "powersgd" in errors[4] and "Max" in errors[4], errors
        assert res["unchanged"] == [True]


def auto_body(n: int) -> dict:
    g = tandem.init(timeout=30, compression="auto")
    a = data(g.rank, np.float32, n, 302)
    g.allreduce(a, compression="auto")
    return {"default": g.compression, "choice": tandem.auto_compression(), "sum": a}


def test_auto_compression_on_one_machine_keeps_full_precision_and_says_why() -> None:
    world, n = 2, 1000
    results = tandem.run(auto_body, nproc=world, args=(n,), timeout=120)
    exact = sum(data(q, np.float32, n, 302) for q in range(world))
    for res in results:
        assert res["default"] == "auto"
        choice = res["choice"]
        assert choice["chosen"] == "none" and "one machine" in choice["reason"], choice
        assert choice["none_seconds"] is None and choice["bf16_seconds"] is None
        np.testing.assert_allclose(res["sum"], exact, rtol=1e-6)
