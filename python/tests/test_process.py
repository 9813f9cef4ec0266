"""Ctrl-C during a blocked call, use after fork, and the launcher's exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import tandem
from tandem import ps

from conftest import clean_env, free_port, rank_env, read_line

# Each child turns Python's Ctrl-C handler on itself: a runner started in the background of a
# script hands its children SIGINT ignored, and Python then installs no handler.
BLOCKED = """
import signal; signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
import sys, time
import numpy as np
import tandem
g = tandem.init(timeout=120)
if g.rank == 1:
    time.sleep(120)
print("READY", flush=True)
try:
    g.allreduce(np.ones(10, dtype=np.float32))
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(0)
print("NOT INTERRUPTED", flush=True)
"""


def test_ctrl_c_interrupts_a_blocked_collective(token) -> None:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", BLOCKED], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=rank_env(r, 2, port, token)) for r in range(2)]
    try:
        read_line(procs[0], "READY", timeout=60)
        time.sleep(0.3)  # let it block inside the allreduce
        procs[0].send_signal(signal.SIGINT)
        assert read_line(procs[0], "INTERRUPTED", timeout=20) == "INTERRUPTED"
        assert procs[0].wait(timeout=20) == 0
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=20)


FORMING = """
import signal; signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
import tandem
print("READY", flush=True)
try:
    tandem.init(timeout=120, connect_timeout=120)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
"""


def test_ctrl_c_while_the_group_forms_cancels_forming(token) -> None:
    # Rank 0 of 2 with no rank 1: forming waits for it (connect timeout 120 s). Ctrl-C must end
    # that wait at once, not after the connect timeout.
    port = free_port()
    p = subprocess.Popen([sys.executable, "-c", FORMING], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=rank_env(0, 2, port, token))
    try:
        read_line(p, "READY", timeout=60)
        time.sleep(0.5)  # let it reach the wait for rank 1
        p.send_signal(signal.SIGINT)
        assert read_line(p, "INTERRUPTED", timeout=20) == "INTERRUPTED"
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
        p.communicate(timeout=20)


TWO_GROUPS = """
import os, sys, threading, time
import numpy as np
import tandem
from tandem import _native
port_a, port_b = sys.argv[1], sys.argv[2]
os.environ["TANDEM_RENDEZVOUS_ADDR"] = "127.0.0.1:" + port_a
a = tandem.Group(_native.ProcessGroup.from_env(30.0, None, "a"))
os.environ["TANDEM_RENDEZVOUS_ADDR"] = "127.0.0.1:" + port_b
b = tandem.Group(_native.ProcessGroup.from_env(30.0, None, "b"))
out = {}
def call(name, g):
    try:
        x = np.full(4, g.rank + 1, dtype=np.float32)
        g.allreduce(x)
        out[name] = x.tolist()
    except Exception as e:
        out[name] = repr(e)
if a.rank == 0:
    # Thread A blocks in group a until rank 1 gets there, which rank 1 does only after group b's
    # allreduce, which needs thread B here: one helper thread for the whole process deadlocks.
    ta = threading.Thread(target=call, args=("a", a))
    ta.start()
    time.sleep(0.5)
    tb = threading.Thread(target=call, args=("b", b))
    tb.start()
    ta.join()
    tb.join()
else:
    call("b", b)
    call("a", a)
print("RESULT", out["a"], out["b"], flush=True)
b.shutdown()
a.shutdown()
"""


def test_two_python_threads_on_two_groups_run_at_once(token) -> None:
    port_a, port_b = free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, "-c", TWO_GROUPS, str(port_a), str(port_b)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=rank_env(r, 2, port_a, token)) for r in range(2)]
    try:
        for p in procs:
            line = read_line(p, "RESULT", timeout=90)
            # 1 + 2 on every element, in both groups.
            assert line == "RESULT [3.0, 3.0, 3.0, 3.0] [3.0, 3.0, 3.0, 3.0]", line
        for p in procs:
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            p.kill()
            p.communicate(timeout=20)


BLOCKED_PULL = """
import signal; signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
import sys
from tandem import ps
c = ps.Client([ps.param("w", (4,))], servers=[sys.argv[1]], worker=0, workers=2, token=sys.argv[2],
              mode="sync", timeout=30)
print("READY", flush=True)
try:
    c.pull(5)  # step 5 never comes: the other worker does not exist
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
    sys.exit(0)
"""


def test_ctrl_c_interrupts_a_blocked_parameter_server_call(servers) -> None:
    addrs, token = servers
    p = subprocess.Popen([sys.executable, "-c", BLOCKED_PULL, addrs[0], token], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        read_line(p, "READY", timeout=60)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        assert read_line(p, "INTERRUPTED", timeout=20) == "INTERRUPTED"
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
        p.communicate(timeout=20)


def failing_body() -> None:
    g = tandem.init(timeout=20)
    if g.rank == 1:
        raise ValueError("rank one gives up")
    g.barrier()


def test_run_reports_the_failing_rank_and_its_traceback() -> None:
    with pytest.raises(tandem.TandemError) as err:
        tandem.run(failing_body, nproc=2, timeout=60)
    text = str(err.value)
    assert "rank 1 failed" in text and "rank one gives up" in text, text


def test_the_runtime_works_in_a_forked_child(servers) -> None:
    addrs, token = servers
    c = ps.Client([ps.param("w", (8,), init="constant", value=3.0)], servers=addrs, worker=0, workers=2,
                  token=token, mode="async", timeout=30)
    c.pull()  # the parent's runtime now runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, Python >= 3.12
        pid = os.fork()
    if pid == 0:  # the child: a fresh runtime, the same server
        code = 1
        try:
            signal.alarm(30)
            child = ps.Client([ps.param("w", (8,), init="constant", value=3.0)], servers=addrs, worker=1,
                              workers=2, token=token, mode="async", timeout=20)
            _, p = child.pull()
            with tandem.init() as g:  # and the collective helper thread
                a = np.ones(4, dtype=np.float32)
                g.allreduce(a)
            code = 0 if float(p["w"][0]) == 3.0 and a.sum() == 4.0 else 2
        finally:
            os._exit(code)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError("the forked child hung")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    _, p = c.pull()  # and the parent's client still works
    assert float(p["w"][0]) == 3.0


def test_python_launcher_runs_scripts_and_reports_failures(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import os, sys, tandem\n"
        "g = tandem.init(timeout=30)\n"
        "print('rank', g.rank, 'of', g.world_size, flush=True)\n"
        "g.barrier()\n"
        "sys.exit(3 if g.rank == 1 and os.environ.get('FAIL') else 0)\n"
    )
    base = [sys.executable, "-m", "tandem.launch", "--nproc", "3", "--no-log-files"]
    ok = subprocess.run([*base, str(script)], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    for r in range(3):
        assert f"[worker {r}] rank {r} of 3" in ok.stdout
    bad = subprocess.run([*base, "--env", "FAIL=1", str(script)], env=clean_env(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 3
    assert "worker 1 (rank 1) exited with code 3" in bad.stderr
