"""CUDA tensors on the "tandem" backend: every torch.distributed call against its reference and DDP
against one process, through NCCL and staged through the host over the TCP ring, and what is
refused. They need a GPU and a wheel built with the nccl feature (`scripts/wheel --features nccl`),
and are skipped elsewhere; `scripts/gpu-check` runs them on a GPU machine.

NCCL refuses two ranks on one GPU, so on a machine with one GPU the NCCL runs have one rank (they
still check the communicator, the address checks and every call's plumbing); the staged runs have
two ranks sharing the GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import free_port

HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _usable() -> str:
    if not HAVE_TORCH:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    from tandem import _native

    if not _native.DeviceGroup.built_with_nccl():
        return "Tandem was built without the nccl feature"
    return ""


REASON = _usable()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON or "usable")

HERE = Path(__file__).resolve().parent


def gpus() -> int:
    import torch

    return int(torch.cuda.device_count())


def nccl_ranks() -> int:
    return min(gpus(), 4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["nccl", "tcp"])
def test_every_call_on_cuda_tensors_matches_its_reference(backend: str) -> None:
    from test_torch import checked, torchrun

    n = nccl_ranks() if backend == "nccl" else 2
    out = torchrun([str(HERE / "torch_collectives.py")], n, TEST_DEVICE="cuda", TANDEM_BACKEND=backend)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    counts = checked(text)
    assert len(counts) == n and min(counts) > 60, text[-6000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend,hook", [("nccl", "none"), ("tcp", "none"), ("tcp", "bf16")])
def test_ddp_on_cuda_equals_one_process_training_on_the_whole_batch(tmp_path: Path, backend: str, hook: str) -> None:
    import torch
    from test_torch import DDP, one_process, results, torchrun

    n = nccl_ranks() if backend == "nccl" else 2
    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    out = torchrun([str(script)], n, HOOK=hook, RESULT_DIR=str(tmp_path), TEST_DEVICE="cuda", TANDEM_BACKEND=backend)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    res = results(tmp_path)
    assert len(res) == n, text[-6000:]
    want = one_process(res[0]["start"])
    tol = 1e-5 if hook == "none" else 2e-2
    for r in res:
        for k, v in want.items():
            got = torch.tensor(r["end"][k], dtype=torch.float64)
            assert (got - v).abs().max().item() <= tol, (k, r["rank"], (got - v).abs().max().item())
    assert all(r["end"] == res[0]["end"] for r in res)


@pytest.mark.timeout(120)
def test_bad_device_memory_is_refused_before_anything_moves() -> None:
    import subprocess
    import sys

    from test_torch import checked, env

    e = env(INIT_METHOD=f"tcp://127.0.0.1:{free_port()}", TANDEM_BACKEND="nccl", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    out = subprocess.run([sys.executable, str(HERE / "torch_cuda_checks.py")], env=e, capture_output=True,
                         text=True, timeout=100)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    assert "BACKEND nccl" in text, text[-6000:]
    assert checked(text) and checked(text)[0] >= 7, text[-6000:]
