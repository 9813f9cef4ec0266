"""The digits examples, run as users run them, reach their stated accuracy."""

from __future__ import annotations

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
