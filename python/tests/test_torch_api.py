"""Horovod's PyTorch API (``tandem.torch``) and torch tensors in Tandem's own API and PS client,
each process's result checked against a reference computed here from every process's inputs."""

from __future__ import annotations

import importlib.util
from typing import Any, Dict, List

import numpy as np
import pytest

import tandem

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")


def inputs(rank: int, n: int = 11, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(1000 * seed + rank).normal(size=n)


def horovod_body() -> Dict[str, Any]:
    import torch

    import tandem.torch as hvd

    hvd.init(timeout=60)
    r, n = hvd.rank(), hvd.size()
    out: Dict[str, Any] = {"rank": r, "size": n, "local": (hvd.local_rank(), hvd.local_size())}
    t = torch.tensor(inputs(r))
    out["avg"] = hvd.allreduce(t).tolist()
    out["sum"] = hvd.allreduce(t, op=hvd.Sum).tolist()
    out["max"] = hvd.allreduce(t, op=hvd.Max).tolist()
    out["min"] = hvd.allreduce(t, op=hvd.Min).tolist()
    out["unchanged"] = torch.equal(t, torch.tensor(inputs(r)))
    u = t.clone()
    hvd.allreduce_(u, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    out["scaled"] = u.tolist()
    h = hvd.allreduce_async(torch.tensor(inputs(r, seed=1)), op=hvd.Sum)
    out["async_poll_type"] = isinstance(hvd.poll(h), bool)
    out["async"] = hvd.synchronize(h).tolist()
    out["fp16"] = hvd.allreduce(t.float(), op=hvd.Sum, compression=hvd.Compression.fp16).tolist()
    out["fp16_dtype"] = str(hvd.allreduce(t.float(), compression=hvd.Compression.fp16).dtype)
    # allgather with a first dimension that differs between processes.
    g = torch.full((r + 1, 2), float(r), dtype=torch.bfloat16)
    out["allgather"] = hvd.allgather(g).float().tolist()
    b = torch.tensor(inputs(r, seed=2))
    out["broadcast"] = hvd.broadcast(b, root_rank=n - 1).tolist()
    hvd.broadcast_(b, root_rank=0)
    out["broadcast_"] = b.tolist()
    # alltoall: rank r sends k + 1 rows of value 10 r + k to rank k.
    rows = torch.cat([torch.full((k + 1, 3), float(10 * r + k)) for k in range(n)])
    got, splits = hvd.alltoall(rows, splits=[k + 1 for k in range(n)])
    out["alltoall"] = got.tolist()
    out["alltoall_splits"] = splits.tolist()
    out["object"] = hvd.broadcast_object({"from": r, "x": [r] * 3}, root_rank=n - 1)
    out["objects"] = hvd.allgather_object(("rank", r))
    hvd.shutdown()
    return out


def test_horovod_collectives_match_their_references() -> None:
    n = 3
    res = tandem.run(horovod_body, nproc=n, timeout=180)
    ins = [inputs(r) for r in range(n)]
    for r, got in enumerate(res):
        assert got["rank"] == r and got["size"] == n and got["local"] == (r, n)
        np.testing.assert_allclose(got["avg"], np.mean(ins, axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["sum"], np.sum(ins, axis=0), rtol=1e-12)
        np.testing.assert_array_equal(got["max"], np.max(ins, axis=0))
        np.testing.assert_array_equal(got["min"], np.min(ins, axis=0))
        assert got["unchanged"], "allreduce must not change its input"
        np.testing.assert_allclose(got["scaled"], np.sum(ins, axis=0), rtol=1e-12)
        assert got["async_poll_type"]
        np.testing.assert_allclose(got["async"], np.sum([inputs(k, seed=1) for k in range(n)], axis=0), rtol=1e-12)
        np.testing.assert_allclose(got["fp16"], np.sum(ins, axis=0), rtol=2e-2, atol=2e-2)
        assert got["fp16_dtype"] == "torch.float32"
        want = np.concatenate([np.full((k + 1, 2), float(k)) for k in range(n)])
        np.testing.assert_array_equal(got["allgather"], want)
        np.testing.assert_array_equal(got["broadcast"], inputs(n - 1, seed=2))
        np.testing.assert_array_equal(got["broadcast_"], inputs(0, seed=2))
        want = np.concatenate([np.full((r + 1, 3), float(10 * k + r)) for k in range(n)])
        np.testing.assert_array_equal(got["alltoall"], want)
        assert got["alltoall_splits"] == [r + 1] * n
        assert got["object"] == {"from": n - 1, "x": [n - 1] * 3}
        assert got["objects"] == [("rank", k) for k in range(n)]


def _model(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).double()


def _data():
    import torch

    g = torch.Generator().manual_seed(3)
    return torch.randn(48, 5, generator=g, dtype=torch.float64), torch.randn(48, 2, generator=g, dtype=torch.float64)


def optimizer_body(kind: str) -> Dict[str, Any]:
    import torch

    import tandem.torch as hvd

    hvd.init(timeout=60)
    r, n = hvd.rank(), hvd.size()
    model = _model(10 + r)  # different on every rank until broadcast
    start = {k: v.clone() for k, v in model.state_dict().items()}
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    passes = 2 if kind == "accumulate" else 1
    compression: Any = hvd.Compression.bf16 if kind == "bf16" else hvd.Compression.none
    kept: List[Any] = []
    if kind == "custom":
        class Keeping:  # a user's compressor (Horovod's interface) that keeps what it returns
            @staticmethod
            def compress(t: Any) -> Any:
                return t, None

            @staticmethod
            def decompress(t: Any, ctx: Any) -> Any:
                kept.append((t, t.clone()))
                return t

        compression = Keeping
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression=compression,
                                   backward_passes_per_step=passes)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    X, Y = _data()
    per = 48 // n
    for step in range(4):
        opt.zero_grad(set_to_none=kind != "keep_grads")  # keep_grads: zeroed in place, reused
        x, y = X[r * per:(r + 1) * per], Y[r * per:(r + 1) * per]
        if passes == 2:
            half = per // 2
            for lo in (0, half):
                # Two backward passes accumulate; each holds half the batch, so the loss halves.
                (torch.nn.functional.mse_loss(model(x[lo:lo + half]), y[lo:lo + half]) / 2).backward()
        else:
            torch.nn.functional.mse_loss(model(x), y).backward()
        if kind == "clip":
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
    # The optimizer scaled and placed the gradients without writing into what a user's
    # compressor kept.
    assert kept or kind != "custom"
    for t, when_returned in kept:
        assert torch.equal(t, when_returned), "the optimizer wrote into a tensor the compressor kept"
    out = {k: v.tolist() for k, v in model.state_dict().items()}
    hvd.shutdown()
    return {"start0": {k: v.tolist() for k, v in start.items()} if r == 0 else None, "end": out}


@pytest.mark.parametrize("kind", ["plain", "accumulate", "clip", "bf16", "custom", "keep_grads"])
def test_distributed_optimizer_equals_one_process_on_the_whole_batch(kind: str) -> None:
    import torch

    res = tandem.run(optimizer_body, nproc=2, args=(kind,), timeout=180)
    model = _model(0)
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in res[0]["start0"].items()})
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    X, Y = _data()
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        if kind == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    tol = 1e-9 if kind != "bf16" else 5e-3
    for r in res:
        for k, v in model.state_dict().items():
            diff = (torch.tensor(r["end"][k], dtype=torch.float64) - v).abs().max().item()
            assert diff <= tol, (kind, k, diff)
    assert res[0]["end"] == res[1]["end"]


def reducing_body(setting: str, how: str = "explicit") -> Dict[str, Any]:
    """Two ranks train one float32 weight (a single bucket, flattened row-major) with SGD through
    the given top-k or PowerSGD compressor, given as ``Compression.topk``/``powersgd``
    (``explicit``), as ``Compression.setting(...)`` (``setting``) or as the group's default
    (``group``: ``init(compression=...)``, the optimizer given none); returns the start, every
    rank's gradients, the end."""
    import torch

    import tandem.torch as hvd

    hvd.init(timeout=60, compression=setting if how == "group" else None)
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(5)
    model = torch.nn.Linear(5, 2, bias=False)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    start = model.weight.detach().clone()
    kind, _, arg = setting.partition(":")
    if how == "group":
        compression = None
    elif how == "setting" or kind == "auto":
        compression = hvd.Compression.setting(setting)
    else:
        compression = hvd.Compression.topk(float(arg)) if kind == "topk" else hvd.Compression.powersgd(int(arg))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), compression=compression)
    if compression is None:
        compression = opt._compression  # what the optimizer took from the group
    X, Y = _data()
    X, Y = X.float(), Y.float()
    per = 48 // n
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X[r * per:(r + 1) * per]), Y[r * per:(r + 1) * per]).backward()
        opt.step()
    state = compression.state_dict()
    out = {"start": start.tolist(), "end": model.weight.detach().tolist(), "buckets": len(state)}
    hvd.shutdown()
    return out


def _top_k_reference(start: np.ndarray, n: int, fraction: float, steps: int) -> np.ndarray:
    import torch

    X, Y = _data()
    X, Y = X.float(), Y.float()
    per = 48 // n
    w = torch.tensor(start, dtype=torch.float32)
    residual = [np.zeros(w.numel(), np.float32) for _ in range(n)]
    for _ in range(steps):
        sent = []
        for r in range(n):
            p = w.clone().requires_grad_(True)
            torch.nn.functional.mse_loss(X[r * per:(r + 1) * per] @ p.T, Y[r * per:(r + 1) * per]).backward()
            acc = p.grad.reshape(-1).numpy() + residual[r]
            k = int(np.ceil(acc.size * fraction))
            keep = sorted(range(acc.size), key=lambda i: (-abs(acc[i]), i))[:k]
            out = np.zeros_like(acc)
            out[keep] = acc[keep]
            residual[r] = acc - out
            sent.append(out)
        w = w - 0.1 * torch.tensor((sent[0] + sent[1]) / n).reshape(w.shape)
    return w.numpy()


@pytest.mark.parametrize("setting,how", [("topk:0.3", "explicit"), ("powersgd:4", "explicit"),
                                         ("topk:0.3", "group"), ("topk:0.3", "setting"), ("auto", "setting")])
def test_distributed_optimizer_with_error_feedback_matches_its_reference(setting: str, how: str) -> None:
    res = tandem.run(reducing_body, nproc=2, args=(setting, how), timeout=180)
    assert res[0]["end"] == res[1]["end"], "ranks differ"
    assert res[0]["buckets"] == 1
    start = np.array(res[0]["start"], np.float32)
    if setting.startswith("topk"):
        want, tol = _top_k_reference(start, 2, 0.3, 5), 1e-5
    elif setting == "auto":
        # One machine: auto sends everything uncompressed, so the plain average's result.
        want, tol = _top_k_reference(start, 2, 1.0, 5), 1e-6
    else:
        # 10 elements seen as 3 x 4: rank 4 covers the whole matrix, so PowerSGD's result is the
        # exact average (the ranks' residuals cancel in the sum), up to its f32 arithmetic.
        want, tol = _top_k_reference(start, 2, 1.0, 5), 1e-4
    assert np.abs(np.array(res[0]["end"]) - want).max() <= tol, (res[0]["end"], want)


def compression_state_body(setting: str) -> Dict[str, Any]:
    """Two ranks train through a compressing DistributedOptimizer and TorchState: a restore must
    bring back the residuals (so the retrained steps are exactly the first ones), and a sync must
    give every member the root's model and PowerSGD warm start but keep each member's own
    residual."""
    import json

    import torch

    import tandem.torch as hvd
    from tandem.torch.elastic import TorchState

    hvd.init(timeout=60)
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(5)
    model = torch.nn.Linear(5, 2, bias=False)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    kind, arg = setting.split(":")
    compression = hvd.Compression.topk(float(arg)) if kind == "topk" else hvd.Compression.powersgd(int(arg))
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                                   named_parameters=model.named_parameters(), compression=compression)
    X, Y = _data()
    X, Y = X.float(), Y.float()
    per = 48 // n

    def steps(k: int) -> None:
        for _ in range(k):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(X[r * per:(r + 1) * per]), Y[r * per:(r + 1) * per]).backward()
            opt.step()

    def comp() -> Dict[str, Any]:
        return json.loads(opt.state_dict()["tandem_compression"][0])

    steps(3)
    state = TorchState(model=model, optimizer=opt)
    state.commit()
    committed = comp()
    steps(2)
    first = model.weight.detach().tolist()
    state.restore()
    out: Dict[str, Any] = {"restored": comp() == committed, "residual_nonzero": any(committed["residual"])}
    steps(2)
    out["again"] = model.weight.detach().tolist() == first
    # Rank 0 commits once more (it becomes the root); rank 1 loses its live state, which the sync
    # replaces from its own last commit (residual) and rank 0's (model, warm start).
    if r == 0:
        state.commit()
    else:
        opt.load_state_dict({**opt.state_dict(), "tandem_compression": {}})
        with torch.no_grad():
            model.weight.add_(1.0)
    out["own_committed"] = committed if r == 1 else comp()
    out["sync_q"] = comp()["q"] if r == 0 else None
    state.sync(tandem.group())
    after = comp()
    out["after_residual"], out["after_q"] = after["residual"], after["q"]
    out["weight"] = model.weight.detach().tolist()
    steps(2)  # the members agree from here on
    out["end"] = model.weight.detach().tolist()
    hvd.shutdown()
    return out


@pytest.mark.parametrize("setting", ["topk:0.3", "powersgd:2"])
def test_compression_state_is_committed_restored_and_kept_per_member_by_a_sync(setting: str) -> None:
    res = tandem.run(compression_state_body, nproc=2, args=(setting,), timeout=180)
    for got in res:
        assert got["restored"] and got["residual_nonzero"] and got["again"]
        # Each member keeps its own residual (rank 1: the one of its commit, not its live state).
        assert got["after_residual"] == got["own_committed"]["residual"]
        assert got["after_q"] == res[0]["sync_q"]  # the root's warm start
    assert res[0]["after_residual"] != res[1]["after_residual"]
    assert res[0]["weight"] == res[1]["weight"] and res[0]["end"] == res[1]["end"]
    if setting.startswith("powersgd"):
        assert res[1]["own_committed"]["q"] != res[0]["sync_q"], "the test needs warm starts that differ"


def test_stateful_compressors_refuse_a_one_off_allreduce_and_bad_settings() -> None:
    import torch

    import tandem.torch as hvd

    with pytest.raises(ValueError, match="DistributedOptimizer"):
        hvd.Compression.topk(0.1).compress(torch.ones(3))
    with pytest.raises(ValueError, match="topk:2"):
        hvd.Compression.topk(2)
    with pytest.raises(ValueError, match="powersgd:0"):
        hvd.Compression.powersgd(0)
    with pytest.raises(ValueError, match='"zip" is not one of'):
        hvd.Compression.setting("zip")
    assert hvd.Compression.setting("none") is hvd.Compression.none
    assert hvd.Compression.setting("bf16").setting == "bf16"


def bad_optimizer_body() -> List[str]:
    import torch

    import tandem.torch as hvd

    hvd.init(timeout=30)
    p = torch.nn.Parameter(torch.ones(2))
    errors = []
    for kwargs in ({"backward_passes_per_step": 0}, {"op": "mean"}, {"gradient_predivide_factor": 0.0},
                   {"named_parameters": [("a", torch.nn.Parameter(torch.ones(1)))]},
                   {"named_parameters": [("a", p), ("a", p)]}):
        try:
            hvd.DistributedOptimizer(torch.optim.SGD([p], lr=0.1), **kwargs)
            errors.append("accepted")
        except (ValueError, TypeError) as e:
            errors.append(str(e))
    hvd.shutdown()
    return errors


def test_distributed_optimizer_refuses_bad_settings_by_name() -> None:
    for errors in tandem.run(bad_optimizer_body, nproc=1, timeout=60):
        assert "backward_passes_per_step=0" in errors[0]
        assert "op='mean'" in errors[1]
        assert "gradient_predivide_factor=0.0" in errors[2]
        assert "does not name" in errors[3]
        assert "duplicate names" in errors[4]


def tensors_body() -> Dict[str, Any]:
    import torch

    g = tandem.init(timeout=60)
    r = g.rank
    out: Dict[str, Any] = {}
    p = torch.nn.Parameter(torch.tensor(inputs(r), dtype=torch.float32))  # requires grad
    ptr = p.data_ptr()
    assert tandem.allreduce(p) is p
    out["param"] = p.detach().tolist()
    out["same_memory"] = p.data_ptr() == ptr
    bf = torch.full((4,), float(r) + 0.5, dtype=torch.bfloat16)
    tandem.allreduce(bf, op="max")
    out["bf16"] = bf.float().tolist()
    gathered = tandem.allgather(torch.arange(3) + 10 * r)
    out["gathered_type"] = type(gathered).__module__.split(".")[0]
    out["gathered"] = gathered.tolist()
    state = {"w": torch.full((3,), float(r)), "b": torch.full((2,), float(r) * 2)}
    tandem.broadcast_parameters(state, root=1)
    out["state"] = {k: v.tolist() for k, v in state.items()}
    g.shutdown()
    return out


def test_tandem_collectives_take_torch_tensors_without_a_copy() -> None:
    res = tandem.run(tensors_body, nproc=2, timeout=120)
    for got in res:
        np.testing.assert_allclose(got["param"], (inputs(0) + inputs(1)).astype(np.float32), rtol=1e-6)
        assert got["same_memory"]
        assert got["bf16"] == [1.5] * 4
        assert got["gathered_type"] == "torch"
        assert got["gathered"] == [[10 * k + i for i in range(3)] for k in range(2)]
        assert got["state"] == {"w": [1.0] * 3, "b": [2.0] * 2}


def test_ps_client_pulls_into_and_pushes_from_torch_tensors(servers) -> None:
    import torch

    from tandem import ps

    addrs, token = servers
    params = [ps.param("w", (3, 2), init="constant", value=1.0), ps.param("b", (2,))]
    with ps.Client(params, optimizer="sgd", lr=0.5, mode="sync", servers=addrs, worker=0, workers=1,
                   token=token, momentum=0.0) as c:
        model = {"w": torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.bfloat16)),
                 "b": torch.nn.Parameter(torch.zeros(2))}
        v = c.pull_into(model)
        assert model["w"].dtype == torch.bfloat16 and model["w"].float().tolist() == [[1.0, 1.0]] * 3
        grads = {"w": torch.full((3, 2), 2.0, dtype=torch.bfloat16), "b": torch.tensor([1.0, -1.0], requires_grad=True)}
        v2 = c.push_pull_into(v, grads, model)
        assert v2 == v + 1
        assert model["w"].float().tolist() == [[0.0, 0.0]] * 3  # 1 - 0.5 * 2
        assert model["b"].tolist() == [-0.5, 0.5]
        with pytest.raises(KeyError, match="no parameters named"):
            c.pull_into({"nope": torch.zeros(1)})


def test_torch_state_commits_to_disk_and_a_new_job_resumes_from_them(tmp_path) -> None:
    import torch

    from tandem.torch.elastic import ElasticSampler, TorchState

    path = str(tmp_path / "state.pt")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sampler = ElasticSampler(list(range(10)), shuffle=True, seed=3)
    state = TorchState(model=model, optimizer=opt, sampler=sampler, path=path, epoch=2, step=7)
    sampler.record_indices([1, 4])
    state.commit()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(5.0)  # after the commit: not kept
    state.step = 8
    # A new job (a new process would build the same objects) starts from the file.
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    sampler2 = ElasticSampler(list(range(10)), shuffle=True, seed=3)
    state2 = TorchState(model=model2, optimizer=opt2, sampler=sampler2, path=path, epoch=0, step=0)
    assert (state2.epoch, state2.step, state2.commits) == (2, 7, 1)
    for k, v in saved.items():
        assert torch.equal(model2.state_dict()[k], v)
    assert opt2.state_dict()["state"][0]["momentum_buffer"] is not None
    assert sampler2.processed == {1, 4} and not {1, 4} & set(iter(sampler2))
    # restore() returns to the commit in memory too.
    state.restore()
    assert state.step == 7 and torch.equal(model.weight, saved["weight"])


def test_import_tandem_works_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is hidden')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np, tandem\n"
        "g = tandem.init()\n"
        "a = np.ones(3, np.float32); tandem.allreduce(a)\n"
        "print('OK', a.tolist(), 'torch' in sys.modules)\n"
        "try:\n"
        "    import tandem.torch\n"
        "except ImportError as e:\n"
        "    print('NO TORCH', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in __import__("os").environ.items() if not k.startswith(("RANK", "WORLD", "MASTER", "TANDEM_"))})
    assert "OK [1.0, 1.0, 1.0] False" in out.stdout, out.stdout + out.stderr
    assert "NO TORCH" in out.stdout, out.stdout + out.stderr


def test_elastic_sampler_hands_out_only_unprocessed_samples_split_over_the_members(monkeypatch) -> None:
    import tandem
    from tandem.torch.elastic import ElasticSampler

    s = ElasticSampler(list(range(11)), shuffle=True, seed=5)
    first = list(s)
    assert sorted(first) == list(range(11))  # one member: everything, shuffled by the seed
    assert first == list(ElasticSampler(list(range(11)), shuffle=True, seed=5))
    s.record_batch(0, 4)  # the first batch of 4 is done
    done = set(first[:4])
    # The group grows to 2 members (rank 1 here): the unprocessed 7 are split, padded to 4 each.
    monkeypatch.setattr(tandem, "is_initialized", lambda: True)
    monkeypatch.setattr(tandem, "rank", lambda: 1)
    monkeypatch.setattr(tandem, "world_size", lambda: 2)
    s.reset()
    mine = list(s)
    assert len(mine) == 4 and not done & set(mine)
    monkeypatch.setattr(tandem, "rank", lambda: 0)
    s.reset()
    assert set(mine) | set(s) == set(range(11)) - done
    # A new epoch starts with nothing processed.
    s.set_epoch(1)
    assert len(s) == 6 and s.processed == set()
