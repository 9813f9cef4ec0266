"""Helpers for the multi-process tests: parameter-server processes and job environments."""

from __future__ import annotations

import os
import secrets
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "python" / "examples"

# Variables of an enclosing job that must not leak into the jobs the tests start.
JOB_VARS = ("TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TANDEM_RANK",
            "TANDEM_WORLD_SIZE", "TANDEM_JOB_TOKEN", "TANDEM_RENDEZVOUS_ADDR", "TANDEM_LAUNCHER",
            "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def clean_env(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_line(proc: subprocess.Popen, prefix: str, timeout: float = 30.0) -> str:
    """The first stdout line of ``proc`` starting with ``prefix`` (fails after ``timeout``)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not sel.select(timeout=max(0.0, end - time.monotonic())):
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting with {prefix!r} within {timeout} s")


def rank_env(rank: int, world: int, port: int, token: str) -> Dict[str, str]:
    return clean_env(TANDEM_LAUNCHER="tandem", TANDEM_RANK=str(rank), TANDEM_WORLD_SIZE=str(world),
                     TANDEM_RENDEZVOUS_ADDR=f"127.0.0.1:{port}", TANDEM_JOB_TOKEN=token)


@pytest.fixture
def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def servers(token: str) -> Iterator[Tuple[List[str], str]]:
    """Two parameter servers (``python -m tandem.ps``) on ephemeral ports; yields their addresses."""
    procs, addrs = [], []
    try:
        for i in range(2):
            p = subprocess.Popen(
                [sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0", "--index", str(i)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env=clean_env(TANDEM_JOB_TOKEN=token),
            )
            procs.append(p)
            addrs.append(read_line(p, "tandem ps: serving on").rsplit(" ", 1)[1])
        yield addrs, token
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()
