"""tandem.torch: the "tandem" torch.distributed backend under a real torchrun and every other way
torch initialises (env://, tcp://, file://), DDP against one process on the whole batch, Horovod's
API, torch tensors in Tandem's own API, and the failure paths (a killed rank, mismatched calls,
tensors Tandem cannot move). Every result is checked against a reference the test computes."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import ROOT, clean_env, free_port

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")

HERE = Path(__file__).resolve().parent
TORCHRUN_VARS = ("LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE",
                 "TORCHELASTIC_RESTART_COUNT", "TANDEM_LAUNCHER")


def env(**extra: str) -> Dict[str, str]:
    e = clean_env(OMP_NUM_THREADS="1", TANDEM_TIMEOUT="60", **extra)
    for k in TORCHRUN_VARS:
        if k not in extra:
            e.pop(k, None)
    return e


def torchrun(args: List[str], nproc: int, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=timeout)


def checked(text: str) -> List[int]:
    return [int(m.group(1)) for m in re.finditer(r"CHECKED (\d+)", text)]


@pytest.mark.timeout(300)
def test_every_call_under_torchrun_matches_its_reference() -> None:
    out = torchrun([str(HERE / "torch_collectives.py")], 3)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    counts = checked(text)
    assert len(counts) == 3 and min(counts) > 60, text
    # No token and no port of its own: torchrun's variables were all it had.
    assert "TANDEM_JOB_TOKEN" not in text


@pytest.mark.timeout(300)
def test_the_cuda_paths_own_logic_on_host_memory_matches_every_reference() -> None:
    # tandem.torch._cuda (dtypes, copies and write-back, in-place gathers, calls by address) with
    # NCCL replaced by a stand-in over the CPU group; on a GPU test_torch_cuda.py runs the real one.
    out = torchrun([str(HERE / "torch_cuda_standin.py")], 3)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-6000:]
    counts = checked(text)
    assert len(counts) == 3 and min(counts) > 60, text[-6000:]
    assert len(re.findall(r"STAND-IN \d+", text)) == 3, text[-6000:]


@pytest.mark.timeout(300)
def test_zero_fully_shard_and_powersgd_run_on_the_backend() -> None:
    out = torchrun([str(HERE / "torch_wrappers.py")], 2)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-5000:]
    assert text.count("WRAPPERS OK") == 2, text[-5000:]


def start_ranks(script: Path, world: int, extra: Dict[str, str]) -> List[subprocess.Popen]:
    return [
        subprocess.Popen([sys.executable, str(script)], env=env(RANK=str(r), WORLD_SIZE=str(world), **extra),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]


def finish(procs: List[subprocess.Popen], timeout: float = 200) -> List[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(f"rc={p.returncode}\n{out}")
    return outs


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["env", "tcp", "file"])
def test_every_init_method_forms_the_group_through_torchs_store(tmp_path: Path, how: str) -> None:
    port = free_port()
    extra = {
        "env": {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},  # a PyTorchJob's variables
        "tcp": {"INIT_METHOD": f"tcp://127.0.0.1:{port}"},
        "file": {"INIT_METHOD": f"file://{tmp_path / 'store'}"},
    }[how]
    outs = finish(start_ranks(HERE / "torch_collectives.py", 2, extra))
    for o in outs:
        assert o.startswith("rc=0"), "\n".join(outs)
        assert len(checked(o)) == 1, "\n".join(outs)


DDP = r'''
import os, sys, json, torch, torch.distributed as dist
import tandem.torch
torch.manual_seed(100 + int(os.environ["RANK"]))          # every rank starts from other weights
dist.init_process_group("tandem")
r, w = dist.get_rank(), dist.get_world_size()
dev = torch.device(os.environ.get("TEST_DEVICE", "cpu"))   # test_torch_cuda.py trains on the GPU
if dev.type == "cuda":
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    dev = torch.device("cuda", torch.cuda.current_device())
model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double().to(dev)
start = {k: v.tolist() for k, v in model.state_dict().items()}
ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.001)   # several buckets
opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(5)
X, Y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
if os.environ.get("HOOK") == "bf16":
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
per = 64 // w
for step in range(5):
    x, y = X[r * per:(r + 1) * per].to(dev), Y[r * per:(r + 1) * per].to(dev)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(ddp(x), y).backward()
    opt.step()
with open(os.path.join(os.environ["RESULT_DIR"], f"{r}.json"), "w") as f:
    json.dump({"rank": r, "start": start, "end": {k: v.tolist() for k, v in model.state_dict().items()}}, f)
dist.destroy_process_group()
'''


def one_process(start: Dict[str, list], steps: int = 5):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in start.items()})
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(64, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    return {k: v for k, v in model.state_dict().items()}


def results(folder: Path) -> List[dict]:
    """What each rank wrote (files, not stdout, where torchrun interleaves the ranks' lines)."""
    import json

    return sorted((json.loads(p.read_text()) for p in folder.glob("*.json")), key=lambda d: d["rank"])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hook", ["none", "bf16"])
def test_ddp_equals_one_process_training_on_the_whole_batch(tmp_path: Path, hook: str) -> None:
    import torch

    script = tmp_path / "ddp.py"
    script.write_text(DDP)
    out = torchrun([str(script)], 2, HOOK=hook, RESULT_DIR=str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    res = results(tmp_path)
    assert len(res) == 2, text
    assert res[0]["start"] != res[1]["start"], "the ranks must start from different weights"
    want = one_process(res[0]["start"])  # DDP starts every rank from rank 0's weights
    tol = 1e-5 if hook == "none" else 2e-2  # bf16 on the wire rounds every gradient
    for r in res:
        for k, v in want.items():
            got = torch.tensor(r["end"][k], dtype=torch.float64)
            assert (got - v).abs().max().item() <= tol, (k, r["rank"], (got - v).abs().max().item())
    # The ranks agree exactly.
    assert res[0]["end"] == res[1]["end"]


INIT = r'''
import numpy as np, tandem
g = tandem.init()
a = np.arange(6, dtype=np.float64) * (tandem.rank() + 1)
tandem.allreduce(a)
import tandem.torch as hvd                                    # Horovod's view of the machines
machines = [hvd.cross_rank(), hvd.cross_size(), hvd.is_homogeneous()]
import os, json
with open(os.path.join(os.environ["RESULT_DIR"], f"{tandem.rank()}.json"), "w") as f:
    json.dump({"rank": tandem.rank(), "world": tandem.world_size(), "local": g.local_rank, "a": a.tolist(),
               "machines": machines}, f)
tandem.shutdown()
'''


@pytest.mark.timeout(300)
def test_tandem_init_needs_nothing_beyond_what_torchrun_sets(tmp_path: Path) -> None:
    script = tmp_path / "init.py"
    script.write_text(INIT)
    out = torchrun([str(script)], 3, RESULT_DIR=str(tmp_path))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    res = results(tmp_path)
    assert [r["rank"] for r in res] == [0, 1, 2] and {r["world"] for r in res} == {3}, text
    assert sorted(r["local"] for r in res) == [0, 1, 2]
    for r in res:
        assert r["a"] == (np.arange(6) * 6.0).tolist()
        assert r["machines"] == [0, 1, True]


def rust_example() -> Path:
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "examples" / "allreduce_data_parallel"
        if p.exists():
            return p
    cargo = shutil.which("cargo")
    if cargo is None:
        pytest.fail("the Rust example is not built and cargo is not on PATH")
    subprocess.run([cargo, "build", "--locked", "-q", "--example", "allreduce_data_parallel"], cwd=ROOT, check=True,
                   timeout=900)
    return ROOT / "target" / "debug" / "examples" / "allreduce_data_parallel"


@pytest.mark.timeout(1000)
def test_rust_process_group_from_env_runs_under_torchrun() -> None:
    binary = rust_example()
    out = torchrun(["--no-python", str(binary), "--steps", "60"], 2)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Address already in use" not in text and "TANDEM_JOB_TOKEN" not in text
    m = re.search(r"test accuracy[^0-9]*([0-9.]+)", text)
    assert m is not None, text


FAILURES = r'''
import os, sys, time, torch, torch.distributed as dist
import tandem.torch
dist.init_process_group("tandem", timeout=__import__("datetime").timedelta(seconds=20))
r = dist.get_rank()
case = os.environ["CASE"]
try:
    if case == "mismatch":
        dist.all_reduce(torch.ones(10 + r))
    elif case == "killed":
        dist.all_reduce(torch.ones(4))
        if r == 1:
            os.kill(os.getpid(), 9)
        time.sleep(0.5)
        dist.all_reduce(torch.ones(1 << 16))
    elif case == "dtype":
        try:
            dist.all_reduce(torch.ones(3, dtype=torch.uint32))
        except Exception as e:
            print("REFUSED", type(e).__name__, e, flush=True)
        try:
            dist.all_reduce(torch.ones(3, dtype=torch.bool), op=dist.ReduceOp.AVG)
        except Exception as e:
            print("REFUSED", type(e).__name__, e, flush=True)
        try:
            dist.send(torch.ones(2), dst=r)
        except Exception as e:
            print("REFUSED", type(e).__name__, e, flush=True)
        x = torch.ones(3)
        dist.all_reduce(x)  # the group still works after refusals
        print("STILL", x.tolist(), flush=True)
        sys.exit(0)
    print("NO ERROR", flush=True)
except dist.DistError as e:
    print(f"ERROR {type(e).__name__}: {e}", flush=True)
    os._exit(3)
'''


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["mismatch", "killed", "dtype"])
def test_failures_are_torchs_errors_naming_the_problem(tmp_path: Path, case: str) -> None:
    script = tmp_path / "fail.py"
    script.write_text(FAILURES)
    # Started by hand (as a PyTorchJob starts them): torchrun would stop the survivor itself.
    outs = finish(start_ranks(script, 2, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "CASE": case}))
    text = "\n".join(outs)
    if case == "dtype":
        assert all(o.startswith("rc=0") for o in outs), text
        refusals = re.findall(r"REFUSED (\w+) (.*)", text)
        assert len(refusals) == 6, text
        words = " ".join(m for _, m in refusals)
        assert "uint32" in words and "bool" in words and "same as the rank" in words, text
        assert text.count("STILL [2.0, 2.0, 2.0]") == 2, text
        return
    assert "NO ERROR" not in text, text
    errors = re.findall(r"ERROR (\w+): (.*)", text)
    assert errors, text
    assert all(kind in ("DistBackendError", "DistTimeoutError", "DistNetworkError") for kind, _ in errors), errors
    if case == "mismatch":
        assert any("rank 1 called allreduce(f32 x 11" in m and "rank 0 called allreduce(f32 x 10" in m for _, m in errors), errors
    else:
        assert any("rank 1" in m for _, m in errors), errors


NO_NCCL = r'''
import os, sys, torch, torch.distributed as dist
import tandem.torch
from tandem import _native
from tandem.errors import BackendUnavailableError
from tandem.torch import _cuda
dist.init_process_group("tandem", init_method=os.environ["INIT_METHOD"], rank=0, world_size=1)
group = dist.distributed_c10d._get_default_group()
if "cuda" not in dist.Backend.backend_capability["tandem"]:
    sys.exit(f"the backend is not registered for CUDA tensors: {dist.Backend.backend_capability}")
pg = group._get_backend(torch.device("cpu")).native
# A build without nccl says so; one with it, on a machine without a driver, says that.
why, fix = ("nccl feature", "scripts/wheel --features nccl") if os.environ["EXPECT"] == "no-nccl" else ("libcuda", "t.cpu()")
try:
    _native.DeviceGroup(pg, 0)
except BackendUnavailableError as e:
    if why not in str(e):
        sys.exit(f"DeviceGroup: {e}")
else:
    sys.exit("a DeviceGroup was made")


class OnGpu:  # what _cuda reads of a CUDA tensor (torch here cannot make one)
    device = torch.device("cuda", 0)


for attempt in range(2):  # the first failure is kept: every later call says the same
    try:
        _cuda.device_group(pg, OnGpu())
    except BackendUnavailableError as e:
        if "cuda:0" not in str(e) or fix not in str(e) or why not in str(e):
            sys.exit(f"attempt {attempt}: {e}")
    else:
        sys.exit("a CUDA tensor was accepted")
# A group shut down since is dropped with its device collectives (or its failure) when the next
# group's are made.
def native_of(g):
    return g._get_backend(torch.device("cpu")).native


def refuse(p):
    try:
        _cuda.device_group(p, OnGpu())
    except BackendUnavailableError:
        return
    sys.exit("a CUDA tensor was accepted")


first = native_of(dist.new_group([0]))
refuse(first)
if id(first) not in _cuda._groups or id(pg) not in _cuda._groups:
    sys.exit("the refusals were not kept")
first.shutdown()
refuse(native_of(dist.new_group([0])))
if id(first) in _cuda._groups or id(pg) not in _cuda._groups:
    sys.exit("a shut-down group's entry was kept, or a live one dropped")
print("REFUSED", flush=True)
dist.destroy_process_group()
'''


@pytest.mark.timeout(120)
def test_cuda_tensors_where_they_cannot_run_are_refused_saying_why(tmp_path: Path) -> None:
    import torch

    from tandem import _native

    nccl = _native.DeviceGroup.built_with_nccl()
    if nccl and torch.cuda.is_available():
        pytest.skip("a GPU and an nccl build: test_torch_cuda.py covers it")
    script = tmp_path / "no_nccl.py"
    script.write_text(NO_NCCL)
    e = env(INIT_METHOD=f"tcp://127.0.0.1:{free_port()}", EXPECT="no-driver" if nccl else "no-nccl")
    out = subprocess.run([sys.executable, str(script)], env=e, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0 and "REFUSED" in out.stdout, out.stdout + out.stderr


def test_tensors_tandem_cannot_move_are_refused_with_a_clear_error() -> None:
    import torch

    from tandem.torch import _ops

    with pytest.raises(ValueError, match="meta"):
        _ops.check_device(torch.empty(2, device="meta"))
    from tandem._arrays import torch_view

    with pytest.raises(ValueError, match="not contiguous"):
        torch_view(torch.ones(4, 4)[:, ::2])
    # A contiguous CPU tensor is viewed, not copied; bfloat16 and bool included.
    for dtype in (torch.float32, torch.bfloat16, torch.bool, torch.int8):
        t = torch.zeros(5, dtype=dtype)
        v = torch_view(t)
        assert v.ctypes.data == t.data_ptr()


def test_the_numpy_optimizer_refuses_a_torch_optimizer_and_points_to_tandem_torch() -> None:
    import torch

    import tandem

    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(TypeError, match="tandem.torch.DistributedOptimizer"):
        tandem.DistributedOptimizer(opt)


def test_deadlock_free_order_of_a_p2p_batch() -> None:
    from tandem.torch._ops import p2p_order

    batch = [("send", 2, "a", 0), ("recv", 0, "b", 1), ("send", 0, "c", 2), ("recv", 2, "d", 3), ("send", 2, "e", 4)]
    # Rank 1: the pair (0, 1) first (the higher rank receives first), then (1, 2) (sends first),
    # each direction in the order issued.
    assert [x[2] for x in p2p_order(1, batch)] == ["b", "c", "a", "e", "d"]


def job_certs(tandem: Path, tmp_path: Path) -> Path:
    """The job's CA and a certificate for the first two simulated hosts (and loopback)."""
    certs = tmp_path / "certs"
    subprocess.run([str(tandem), "certs", "init", str(certs), "--name", "10.77.0.1", "--name", "10.77.0.2",
                    "--name", "127.0.0.1"], check=True, capture_output=True, timeout=60)
    return certs / "process"  # the certificate's folder, apart from the CA's key


def tandem_binary() -> Path:
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "tandem"
        if p.exists():
            return p
    pytest.fail("target/*/tandem is not built (cargo build -p tandem-cli)")


@pytest.mark.timeout(400)
@pytest.mark.skipif(os.geteuid() != 0 or os.environ.get("TANDEM_TESTBED") == "off",
                    reason="simulated hosts need root (network namespaces); TANDEM_TESTBED=off skips them")
def test_across_simulated_hosts_the_backend_needs_the_token_and_uses_tls(tmp_path: Path) -> None:
    tandem = tandem_binary()
    certs = job_certs(tandem, tmp_path)
    script = HERE / "torch_collectives.py"

    def job(**extra: str) -> subprocess.CompletedProcess:
        cmd = [str(tandem), "testbed", "--hosts", "2", "--", "env", "RANK={rank}", "WORLD_SIZE={world}",
               "MASTER_ADDR={addr0}", "MASTER_PORT=29500", *[f"{k}={v}" for k, v in extra.items()],
               sys.executable, str(script)]
        return subprocess.run(cmd, env=env(TANDEM_CONNECT_TIMEOUT="10"), capture_output=True, text=True, timeout=300)

    # With the job's token and certificates the group forms across the hosts and every call checks.
    out = job(TANDEM_JOB_TOKEN="0123456789abcdef0123", TANDEM_TLS_DIR=str(certs))
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert checked(text), text[-4000:]  # (the testbed passes on the first rank's lines; every rank's exit status counts)
    # Without a token nothing is made up: the board across machines is plaintext.
    out = job(TANDEM_TLS_DIR=str(certs))
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "TANDEM_JOB_TOKEN" in text, text[-4000:]


@pytest.mark.timeout(400)
@pytest.mark.skipif(os.geteuid() != 0 or os.environ.get("TANDEM_TESTBED") == "off",
                    reason="simulated hosts need root (network namespaces); TANDEM_TESTBED=off skips them")
def test_tandem_init_under_a_multi_node_torchrun_on_simulated_hosts(tmp_path: Path) -> None:
    tandem = tandem_binary()
    certs = job_certs(tandem, tmp_path)
    script = tmp_path / "init.py"
    script.write_text(INIT)
    cmd = [str(tandem), "testbed", "--hosts", "2", "--", "env", f"RESULT_DIR={tmp_path}",
           f"TANDEM_TLS_DIR={certs}", "TANDEM_JOB_TOKEN=0123456789abcdef0123",
           sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", "{rank}",
           "--nproc_per_node", "2", "--master_addr", "{addr0}", "--master_port", "29500", str(script)]
    out = subprocess.run(cmd, env=env(TANDEM_CONNECT_TIMEOUT="20"), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    res = results(tmp_path)
    assert [r["rank"] for r in res] == [0, 1, 2, 3], text[-4000:]
    for r in res:
        assert r["world"] == 4 and r["a"] == (np.arange(6) * 10.0).tolist()
        # Two simulated hosts, each running ranks 2h and 2h + 1 (torchrun's node_rank h).
        assert r["machines"] == [r["rank"] // 2, 2, True], r
