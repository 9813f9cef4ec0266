"""Every error surfaces as its own exception class, with a message naming what was wrong."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

import tandem
from tandem import ps

from conftest import clean_env


def test_bad_arrays_are_refused_before_anything_is_sent() -> None:
    with tandem.init() as g:  # no job in the environment: a group of one
        assert (g.rank, g.world_size) == (0, 1)
        with pytest.raises(TypeError, match="numpy.ndarray"):
            g.allreduce([1.0, 2.0])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="complex64"):
            g.allreduce(np.zeros(4, dtype=np.complex64))
        with pytest.raises(ValueError, match="not C-contiguous"):
            g.allreduce(np.zeros(8, dtype=np.float32)[::2])
        ro = np.zeros(4, dtype=np.float32)
        ro.setflags(write=False)
        with pytest.raises(ValueError, match="read-only"):
            g.allreduce(ro)
        with pytest.raises(ValueError, match="median"):
            g.allreduce(np.zeros(4, dtype=np.float32), op="median")
        with pytest.raises(ValueError, match="timeout"):
            g.allreduce(np.zeros(4, dtype=np.float32), timeout=-1)
    assert not tandem.is_initialized()
    with pytest.raises(tandem.UnusableError):
        tandem.allreduce(np.zeros(1, dtype=np.float32))


def mismatch_body() -> str:
    g = tandem.init(timeout=20)
    try:
        if g.rank == 0:
            g.allreduce(np.zeros(10, dtype=np.float32))
        else:
            g.broadcast(np.zeros(12, dtype=np.float32), root=0)
    except tandem.MismatchError as e:
        return str(e)
    return "no error"


def test_mismatched_calls_raise_mismatch_error_naming_both() -> None:
    for msg in tandem.run(mismatch_body, nproc=2, timeout=60):
        assert "allreduce" in msg and "broadcast" in msg, msg


def lost_peer_body() -> str:
    g = tandem.init(timeout=20)
    if g.rank == 1:
        return "leaving without a word"  # the process exits; its sockets close
    time.sleep(0.5)
    try:
        g.allreduce(np.zeros(1000, dtype=np.float32))
    except tandem.PeerLostError as e:
        assert isinstance(e, ConnectionError)
        return f"{e.rank}|{e}"
    return "no error"


def test_a_peer_that_exits_raises_peer_lost_naming_it() -> None:
    rank, msg = tandem.run(lost_peer_body, nproc=2, timeout=60)[0].split("|", 1)
    assert "rank 1" in msg, msg
    assert rank == "1", "PeerLostError.rank names the lost rank"


def timeout_body() -> str:
    g = tandem.init(timeout=30)
    if g.rank == 1:
        time.sleep(3)
        return "slept"
    try:
        g.barrier(timeout=0.5)
    except tandem.TimeoutError as e:
        assert isinstance(e, TimeoutError)  # the builtin, too
        return str(e)
    return "no error"


def test_a_deadline_raises_timeout_error() -> None:
    msg = tandem.run(timeout_body, nproc=2, timeout=60)[0]
    assert "rank 1" in msg or "timed out" in msg, msg


def test_contradictory_environment_raises_configuration_error() -> None:
    code = "import tandem\ntry:\n    tandem.init()\nexcept tandem.ConfigurationError as e:\n    print('CONFIG', e)\n"
    env = clean_env(TANDEM_RANK="3", TANDEM_WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("CONFIG"), out.stderr
    assert "TANDEM_RANK" in out.stdout or "rank 3" in out.stdout


def test_bad_tandem_variables_stop_the_start_naming_them(monkeypatch) -> None:
    from tandem._native import setting

    monkeypatch.setenv("TANDEM_FUSION_BYTES", "0")
    with pytest.raises(tandem.ConfigurationError, match=r"TANDEM_FUSION_BYTES.*an integer from 1 to"):
        setting("TANDEM_FUSION_BYTES")
    monkeypatch.setenv("TANDEM_FUSION_BYTES", "1")
    assert setting("TANDEM_FUSION_BYTES") == 1
    monkeypatch.setenv("TANDEM_TIMEOUT", "1.5")
    assert setting("TANDEM_TIMEOUT") == 1.5
    monkeypatch.setenv("TANDEM_OBSERVE", "off")
    assert setting("TANDEM_OBSERVE") is False
    monkeypatch.delenv("TANDEM_OBSERVE")
    assert setting("TANDEM_OBSERVE") is None
    with pytest.raises(tandem.ConfigurationError, match="TANDEM_NO_SUCH"):
        setting("TANDEM_NO_SUCH")
    # Any variable of the table, whichever part of Tandem reads it, is checked when a job starts.
    env = clean_env(TANDEM_ELASTIC_SETTLE="0")  # read by elastic jobs alone
    code = "import tandem\ntandem.init()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "TANDEM_ELASTIC_SETTLE" in out.stderr and "above 0" in out.stderr, out.stderr


def test_wrong_token_raises_authentication_error(servers) -> None:
    addrs, _ = servers
    with pytest.raises(tandem.AuthenticationError):
        ps.Client([ps.param("w", (4,))], servers=addrs, worker=0, workers=1, token="not-the-job-token",
                  timeout=10)


def test_bad_pushes_raise_and_change_nothing(servers) -> None:
    addrs, token = servers
    c = ps.Client([ps.param("w", (4, 2), init="constant", value=1.0)], servers=addrs, worker=0, workers=1,
                  token=token, mode="async", timeout=20)
    _, before = c.pull()
    with pytest.raises(tandem.ShapeError, match="w"):
        c.push(0, {"w": np.zeros(3, dtype=np.float32)})
    with pytest.raises(tandem.InvalidArgumentError, match="nope"):
        c.push(0, {"nope": np.zeros(3, dtype=np.float32)})
    with pytest.raises(tandem.InvalidArgumentError):
        c.push(0, {"w": np.full((4, 2), np.nan, dtype=np.float32)})
    with pytest.raises(TypeError, match="float32"):
        c.push(0, {"w": np.zeros((4, 2), dtype=np.float64)})
    _, after = c.pull()
    np.testing.assert_array_equal(before["w"], after["w"])
    c.done()
