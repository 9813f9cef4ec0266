"""The parameter-server client from Python against real server processes, checked against numpy."""

from __future__ import annotations

import numpy as np
import pytest

import tandem
from tandem import ps

DIM, ROWS_PER_WORKER, LR, STEPS = 5, 16, 0.05, 25
W_TRUE = np.arange(1, DIM + 1, dtype=np.float32) / DIM


def shard(worker: int):
    rng = np.random.default_rng(worker)
    x = rng.standard_normal((ROWS_PER_WORKER, DIM)).astype(np.float32)
    return x, (x @ W_TRUE + 0.5).astype(np.float32)


def grad(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray):
    err = x @ w + np.float32(b) - y
    return (2 * x.T @ err / len(x)).astype(np.float32), np.array([2 * err.mean()], dtype=np.float32)


def params():
    return [ps.param("w", (DIM,)), ps.param("b", (1,))]


def worker_body(addrs, token, mode, staleness=None):
    c = ps.Client(params(), servers=addrs, worker=tandem.cluster_spec()["rank"], workers=4, token=token,
                  mode=mode, staleness=staleness, lr=LR, min_partition_bytes=8, max_partition_bytes=8,
                  timeout=30)
    x, y = shard(c.worker)
    version, p = c.pull()
    step = 0
    spread = 0
    for _ in range(STEPS):
        gw, gb = grad(p["w"], p["b"][0], x, y)
        version, p = c.push_pull(step, {"w": gw, "b": gb})
        step = version if c.sync else step + 1
        if not c.sync:
            for s in c.stats():
                spread = max(spread, max(s["worker_steps"]) - min(s["worker_steps"]))
    if c.sync:
        version, p = c.pull(STEPS)
    c.done()
    return version, p["w"], p["b"], spread


def test_sync_training_equals_the_averaged_reference(servers) -> None:
    addrs, token = servers
    check_sync(tandem.run(worker_body, nproc=4, args=(addrs, token, "sync"), timeout=120))


def test_sync_training_over_the_streams_equals_the_averaged_reference(servers, monkeypatch) -> None:
    # Every byte through the gRPC streams: push_pull's pull receives each partition of the new step
    # as soon as its server applied it, while the push is still arriving.
    monkeypatch.setenv("TANDEM_SAME_HOST", "tcp")
    addrs, token = servers
    check_sync(tandem.run(worker_body, nproc=4, args=(addrs, token, "sync"), timeout=120))


def check_sync(results) -> None:
    w, b = np.zeros(DIM, dtype=np.float32), np.float32(0)
    for _ in range(STEPS):
        gs = [grad(w, b, *shard(i)) for i in range(4)]
        w = w - LR * np.mean([g[0] for g in gs], axis=0)
        b = b - LR * np.mean([g[1][0] for g in gs])
    for version, got_w, got_b, _ in results:
        assert version == STEPS
        # The servers sum the 4 gradients in arrival order: float32 rounding differs at ~1e-7.
        np.testing.assert_allclose(got_w, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_b[0], b, rtol=1e-5, atol=1e-6)
    assert all(np.array_equal(results[0][1], r[1]) for r in results)


def test_async_with_a_staleness_bound_converges(servers) -> None:
    addrs, token = servers
    results = tandem.run(worker_body, nproc=4, args=(addrs, token, "async", 1), timeout=120)
    for _, w, b, spread in results:
        loss_before = float(np.mean([np.mean((shard(i)[1]) ** 2) for i in range(4)]))
        loss_after = float(np.mean([np.mean((shard(i)[0] @ w + b[0] - shard(i)[1]) ** 2) for i in range(4)]))
        assert loss_after < 0.1 * loss_before
        assert spread <= 2  # s = 1, plus the push in flight when the stats were read


def test_sparse_rows_and_adam_match_numpy(servers) -> None:
    addrs, token = servers
    c = ps.Client([ps.param("emb", (50, 4), init="uniform", low=-1, high=1, seed=3), ps.param("w", (6,))],
                  servers=addrs, worker=0, workers=1, token=token, mode="async", optimizer="adam", lr=0.01,
                  min_partition_bytes=64, timeout=30)
    _, full = c.pull()
    ids = np.array([3, 17, 42, 49])
    rows = c.pull_rows("emb", ids)
    np.testing.assert_array_equal(rows, full["emb"][ids])
    # Adam from numpy, one row gradient applied twice.
    g = np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4)
    m = np.zeros_like(g)
    v = np.zeros_like(g)
    want = rows.astype(np.float32).copy()
    for t in (1, 2):
        c.push_rows("emb", ids, g)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        want -= 0.01 * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
    _, after = c.pull()
    np.testing.assert_allclose(after["emb"][ids], want, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(50), ids)
    np.testing.assert_array_equal(after["emb"][untouched], full["emb"][untouched])
    # Dense Adam on w.
    gw = np.arange(6, dtype=np.float32) - 2.5
    c.push(0, {"w": gw})
    m1, v1 = 0.1 * gw, 0.001 * gw * gw
    want_w = -0.01 * (m1 / 0.1) / (np.sqrt(v1 / 0.001) + 1e-8)
    _, after = c.pull()
    np.testing.assert_allclose(after["w"], want_w, rtol=1e-5, atol=1e-6)
    with pytest.raises(tandem.PreconditionError, match="checkpoint directory"):
        c.checkpoint()
    c.done()


def test_checkpoints_are_written_where_asked(tmp_path, token) -> None:
    import subprocess
    import sys

    from conftest import clean_env, read_line

    p = subprocess.Popen([sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0", "--checkpoint-dir",
                          str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=clean_env(TANDEM_JOB_TOKEN=token))
    try:
        addr = read_line(p, "tandem ps: serving on").rsplit(" ", 1)[1]
        c = ps.Client([ps.param("w", (3,), init="constant", value=2.0)], servers=[addr], worker=0, workers=1,
                      token=token, mode="async", timeout=30)
        c.push(0, {"w": np.ones(3, dtype=np.float32)})
        versions = c.checkpoint()
        assert versions == [1]
        assert any(f.name.endswith(".ckpt") for f in tmp_path.iterdir())
        c.done()
        assert p.wait(timeout=30) == 0  # the server exits once its only worker is done
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def test_a_worker_silent_past_its_lease_is_not_awaited_and_its_late_push_is_refused(token) -> None:
    import subprocess
    import sys

    from conftest import clean_env, read_line

    # A 3 s lease: worker 0 is silent for about 1 s below, while worker 1's push waits for the step
    # (its gradient is copied in after 1 s); a 1 s lease raced that wait.
    p = subprocess.Popen([sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0", "--worker-lease", "3"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=clean_env(TANDEM_JOB_TOKEN=token))
    try:
        addr = read_line(p, "tandem ps: serving on").rsplit(" ", 1)[1]

        def client(worker: int) -> ps.Client:
            return ps.Client([ps.param("w", (3,))], servers=[addr], worker=worker, workers=2, token=token,
                             mode="sync", lr=0.5, timeout=30)

        c0 = client(0)
        want = np.zeros(3, dtype=np.float32)
        # Worker 1 never shows up: once its lease runs out the steps need worker 0 alone.
        for step in range(5):
            g = np.full(3, step + 1, dtype=np.float32)
            c0.push(step, {"w": g})
            want -= np.float32(0.5) * g
            version, got = c0.pull(step + 1)
        assert version == 5
        np.testing.assert_array_equal(got["w"], want)
        assert c0.stats()[0]["gone_workers"] == [1]
        # Its gradient for a step applied without it is refused, nothing applied...
        c1 = client(1)
        with pytest.raises(tandem.LeaseExpiredError, match=r"step 2 refused.*past its 3\.0 s lease.*step 5 to rejoin") as e:
            c1.push(2, {"w": np.full(3, 100, dtype=np.float32)})
        assert isinstance(e.value, tandem.PreconditionError) and e.value.kind == "lease_expired"
        np.testing.assert_array_equal(c0.pull(5)[1]["w"], want)
        # ...and pushing for the current step brings it back: step 5 averages both.
        c1.push(5, {"w": np.full(3, 2, dtype=np.float32)})
        assert c0.stats()[0]["gone_workers"] == []
        c0.push(5, {"w": np.full(3, 4, dtype=np.float32)})
        want -= np.float32(0.5) * np.float32(3)
        version, got = c1.pull(6)
        assert version == 6
        np.testing.assert_array_equal(got["w"], want)
        c0.done()
        c1.done()
        assert p.wait(timeout=30) == 0
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


@pytest.mark.parametrize("lease", [0, -1, float("nan"), 86400.5])
def test_a_worker_lease_must_be_a_positive_number_of_seconds(lease) -> None:
    with pytest.raises(ValueError, match="worker_lease"):
        ps.serve("127.0.0.1:0", token="x" * 32, worker_lease=lease)


def test_a_server_lost_with_a_standby_loses_no_step(token) -> None:
    import subprocess
    import sys

    from conftest import clean_env, read_line

    def serve(*extra: str) -> "tuple[subprocess.Popen, str]":
        p = subprocess.Popen([sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=clean_env(TANDEM_JOB_TOKEN=token))
        return p, read_line(p, "tandem ps: serving on").rsplit(" ", 1)[1]

    primary, a = serve()
    backup, b = serve("--follow", a)
    try:
        # Two partitions: one on each server.
        c = ps.Client([ps.param("w", (4,)), ps.param("v", (4,))], servers=[a, b], worker=0, workers=1,
                      token=token, mode="sync", lr=0.5, timeout=30, min_partition_bytes=16)
        want = np.zeros(4, dtype=np.float32)
        for step in range(6):
            if step == 3:
                assert all(s["applied"] > 0 for s in c.stats()), "both servers hold a partition"
                primary.kill()
                primary.wait()
            g = np.full(4, step + 1, dtype=np.float32)
            c.push(step, {"w": g, "v": g})
            want -= np.float32(0.5) * g
            version, got = c.pull(step + 1)
            assert version == step + 1
            np.testing.assert_array_equal(got["w"], want)
            np.testing.assert_array_equal(got["v"], want)
        c.done()
        assert backup.wait(timeout=30) == 0  # its own worker and the promoted standby's are done
    finally:
        for p in (primary, backup):
            p.kill()
            p.wait()
            p.stdout.close()


def compressed_server(token: str, compression: str):
    """A parameter server started with ``compression`` on 127.0.0.1, and its address."""
    import subprocess
    import sys

    from conftest import clean_env, read_line

    p = subprocess.Popen([sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env=clean_env(TANDEM_JOB_TOKEN=token, TANDEM_COMPRESSION=compression))
    return p, read_line(p, "tandem ps: serving on").rsplit(" ", 1)[1]


def stop_server(p) -> None:
    p.kill()
    p.wait(timeout=10)
    if p.stdout:
        p.stdout.close()


def test_bf16_pushes_and_pulls_and_a_worker_with_another_setting_refused(token, monkeypatch) -> None:
    monkeypatch.setenv("TANDEM_SAME_HOST", "tcp")  # through the streams, where compression applies
    p, addr = compressed_server(token, "bf16")
    try:
        with pytest.raises(tandem.PreconditionError, match="started with bf16"):
            ps.Client([ps.param("w", (8,))], servers=[addr], worker=0, workers=1, token=token,
                      mode="sync", lr=1.0, timeout=30, compression="none")
        c = ps.Client([ps.param("w", (8,))], servers=[addr], worker=0, workers=1, token=token,
                      mode="sync", lr=1.0, timeout=30, compression="bf16")
        assert c.compression == "bf16"
        g = (np.arange(8, dtype=np.float32) + 1) / 3  # not bf16 values
        c.push(0, {"w": g})
        _, pulled = c.pull(1)
        # The server applied the bf16-rounded gradient to f32 weights; the pull is rounded again.
        as_bf16 = lambda a: (a.astype(np.float32).view(np.uint32) + 0x8000 & 0xFFFF0000).view(np.float32)  # noqa: E731
        np.testing.assert_array_equal(pulled["w"], as_bf16(-as_bf16(g)))
        c.done()
    finally:
        stop_server(p)


def test_a_top_k_worker_saves_and_restores_its_residual_and_refuses_a_bad_state(token, monkeypatch) -> None:
    import json

    monkeypatch.setenv("TANDEM_SAME_HOST", "tcp")
    p, addr = compressed_server(token, "topk:0.25")
    try:
        c = ps.Client([ps.param("w", (8,))], servers=[addr], worker=0, workers=1, token=token,
                      mode="sync", lr=1.0, timeout=30, compression="topk:0.25")
        g = np.array([0.5, -4.0, 1.0, 3.0, -0.25, 2.0, -1.5, 0.75], np.float32)
        c.push(0, {"w": g})
        state = c.compression_state()
        saved = json.loads(state)
        # A quarter of 8 sent (the 2 largest magnitudes, as pairs smaller than the dense values);
        # the rest owed.
        owed = np.where(np.abs(g) >= 3.0, 0, g)
        assert saved["compression"] == "topk:0.25"
        [part] = saved["parts"]
        assert (part["param"], part["part"]) == ("w", 0)
        np.testing.assert_array_equal(np.array(part["residual"], np.float32), owed)

        def edited(**change):
            s = json.loads(state)
            s["parts"][0].update(change.get("part", {}))
            s.update(change.get("top", {}))
            return json.dumps(s).encode()

        for bad, words in [(b"not json", "not a saved state"),
                           (edited(top={"compression": "bf16"}), "saved under compression"),
                           (edited(part={"param": "nope"}), "nope/0 is not in this worker's map"),
                           (edited(part={"residual": [0.0] * 9}), "holds 8 elements, the saved residual 9")]:
            with pytest.raises(ValueError, match=words):
                c.restore_compression_state(bad)
            assert c.compression_state() == state
        # Eight values are taken (the boundary), and become what the next push adds.
        c.restore_compression_state(edited(part={"residual": [1.0] * 8}))
        assert json.loads(c.compression_state())["parts"][0]["residual"] == [1.0] * 8
        c.done()
    finally:
        stop_server(p)
