"""The digits examples, run as users run them, reach their stated accuracy."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import EXAMPLES, clean_env

import subprocess

LAUNCH = [sys.executable, "-m", "tandem.launch", "--no-log-files"]
PS = ["--ps", "2", "--workers", "4", "--ps-cmd", f"{sys.executable} -m tandem.ps"]
# Without --ps-cmd, python -m tandem.launch runs `python -m tandem.ps` on the servers by itself.
PS_DEFAULT = ["--ps", "2", "--workers", "4"]


@pytest.mark.parametrize(
    "launch,script",
    [
        (["--nproc", "4"], ["digits_allreduce.py", "--epochs", "15"]),
        (PS, ["digits_ps.py", "--mode", "sync", "--epochs", "15"]),
        (PS_DEFAULT, ["digits_ps.py", "--mode", "async", "--staleness", "2", "--epochs", "15"]),
    ],
    ids=["allreduce", "sync-ps", "async-ps"],
)
def test_example_reaches_its_accuracy(launch, script) -> None:
    cmd = [*LAUNCH, *launch, "--", sys.executable, str(EXAMPLES / script[0]), *script[1:]]
    out = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"accuracy=([0-9.]+) samples_per_sec=([0-9]+)", out.stdout)
    assert m, out.stdout
    assert float(m.group(1)) >= 0.95, out.stdout


TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@TORCH
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "cmd,script,want",
    [
        (TORCHRUN, ["torch_digits_ddp.py"], "mode=ddp workers=2"),
        ([*LAUNCH, "--nproc", "2", "--"], ["torch_digits_ddp.py"], "mode=ddp workers=2"),
        ([*LAUNCH, "--nproc", "2", "--"], ["torch_digits_horovod.py"], "mode=horovod workers=2"),
        ([*LAUNCH, "--ps", "2", "--workers", "2", "--"], ["torch_digits_ps.py"], "mode=ps-torch workers=2"),
        ([*LAUNCH, "--nproc", "3", "--elastic", "2:3", "--"], ["torch_digits_elastic.py", "--kill-at", "20"],
         "mode=elastic workers=2"),
    ],
    ids=["ddp-torchrun", "ddp-launch", "horovod", "ps", "elastic-sigkill"],
)
def test_torch_example_reaches_its_accuracy(cmd, script, want) -> None:
    if cmd is TORCHRUN:
        full = [*cmd, str(EXAMPLES / script[0]), *script[1:]]
    else:
        full = [*cmd, sys.executable, str(EXAMPLES / script[0]), *script[1:]]
    env = clean_env(OMP_NUM_THREADS="1", TANDEM_ELASTIC_SETTLE="1", TANDEM_TIMEOUT="30")
    out = subprocess.run(full, env=env, capture_output=True, text=True, timeout=360)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert want in out.stdout, out.stdout + out.stderr[-3000:]
    m = re.search(r"accuracy=([0-9.]+)", out.stdout)
    assert m, out.stdout
    assert float(m.group(1)) >= 0.95, out.stdout
