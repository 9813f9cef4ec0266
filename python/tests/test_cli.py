"""The wheel's command line: `tandem` / `python -m tandem` (the CLI inside the extension), every
subcommand from the installed package, `python -m tandem.launch` parsing exactly as `tandem
launch` does, a fresh virtual environment without cargo, and the type stubs (stubtest, mypy)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest


from conftest import ROOT, clean_env, free_port, read_line

TANDEM = [sys.executable, "-m", "tandem"]
LAUNCH = [sys.executable, "-m", "tandem.launch"]

# Prints what one process of a job saw: its arguments and the variables the options set.
SHOW = textwrap.dedent("""
    import json, os, sys
    keys = ("TANDEM_METRICS_ADDR", "TANDEM_ELASTIC", "TF_CONFIG", "GREETING", "RANK", "CUDA_VISIBLE_DEVICES")
    seen = {"argv": sys.argv[1:], **{k: os.environ[k] for k in keys if k in os.environ}}
    flag = os.path.join(os.path.dirname(os.path.abspath(__file__)), "failed-once")
    if "fail-once" in sys.argv and not os.path.exists(flag):
        open(flag, "w").close()
        sys.exit(3)
    print("SEEN " + json.dumps(seen), flush=True)
""")


def run(cmd: List[str], timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", clean_env()),
                          **kw)  # type: ignore[call-overload]


def seen(out: str) -> List[Dict[str, object]]:
    return [json.loads(line.split("SEEN ", 1)[1]) for line in out.splitlines() if "SEEN " in line]


def value_options(help_text: str) -> List[str]:
    """The options of a --help text that take a value (`--name <VALUE>`)."""
    return sorted(set(re.findall(r"^\s+(--[a-z-]+) <", help_text, flags=re.M)))


def test_every_subcommand_runs_from_the_package() -> None:
    top = run([*TANDEM, "--help"])
    assert top.returncode == 0, top.stderr
    listed = re.findall(r"^  ([a-z][a-z-]+)\s{2,}", top.stdout.split("Commands:")[1], flags=re.M)
    expected = {"demo", "launch", "ps", "rendezvous", "certs", "trace", "tune", "bench", "testbed", "topo", "info"}
    assert expected <= set(listed), listed
    for cmd in listed:
        if cmd == "help":
            continue
        h = run([*TANDEM, cmd, "--help"])
        assert h.returncode == 0 and "Usage: tandem " + cmd in h.stdout, (cmd, h.stdout, h.stderr)
    # The console script is the same CLI.
    script = Path(sys.executable).parent / "tandem"
    assert script.exists(), f"the wheel installs no `tandem` command next to {sys.executable}"
    v = run([str(script), "--version"])
    assert v.returncode == 0 and v.stdout.startswith("tandem "), v
    bad = run([*TANDEM, "no-such-command"])
    assert bad.returncode == 2 and "unrecognized subcommand" in bad.stderr


def test_commands_do_their_work_from_the_package(tmp_path: Path) -> None:
    demo = run([*TANDEM, "demo", "--mode", "allreduce", "--workers", "2", "--steps", "200"], cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert re.search(r"allreduce \(2 ranks\)\s+\d+", demo.stdout), demo.stdout
    certs = run([*TANDEM, "certs", "init", str(tmp_path / "tls"), "--name", "127.0.0.1"])
    assert certs.returncode == 0, certs.stderr
    # The certificate in a folder of its own; the CA's key stays in tls/ only.
    assert {"ca.pem", "cert.pem", "key.pem"} == {p.name for p in (tmp_path / "tls" / "process").iterdir()}
    assert (tmp_path / "tls" / "ca-key.pem").exists()
    info = run([*TANDEM, "info", "--json"], env=clean_env(RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                         MASTER_PORT="29500"))
    assert info.returncode == 0 and json.loads(info.stdout)["rank"] == 1, info
    topo = run([*TANDEM, "topo", "--from-file", str(ROOT / "crates/tandem-topology/fixtures/pairs4.txt")])
    assert topo.returncode == 0, topo.stderr
    empty = tmp_path / "no-dumps"
    empty.mkdir()
    trace = run([*TANDEM, "trace", str(empty)])
    assert trace.returncode == 1 and "no-dumps" in trace.stderr, trace
    bench = run([*TANDEM, "bench", "allreduce", "--np", "2", "--min", "4K", "--max", "4K", "--iters", "5",
                 "--warmup", "1"])
    assert bench.returncode == 0 and re.search(r"^\s*4096\s", bench.stdout, flags=re.M), bench


def test_servers_start_from_the_package() -> None:
    for cmd, ready in (([*TANDEM, "ps", "--bind", "127.0.0.1:0"], "tandem ps 0: serving on 127.0.0.1:"),
                       ([*TANDEM, "rendezvous", "--bind", "127.0.0.1:0"], "rendezvous listening on 127.0.0.1:")):
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env=clean_env(TANDEM_JOB_TOKEN="t" * 32, TANDEM_INSECURE="1")) as p:
            try:
                read_line(p, ready, timeout=60)
            finally:
                p.kill()


def test_tune_runs_its_trials_through_the_package(tmp_path: Path) -> None:
    # The trials' `tandem ...` commands run this package's CLI (TANDEM_CLI), not a binary on PATH.
    spec = (ROOT / "examples" / "tune" / "experiment.yaml").read_text()
    spec = spec.replace("target/release/tandem", "tandem").replace("maxTrialCount: 12", "maxTrialCount: 2")
    spec = spec.replace("parallelTrialCount: 4", "parallelTrialCount: 2").replace("--steps=300", "--steps=60")
    assert "maxTrialCount: 2" in spec and "- tandem\n" in spec, "the example experiment changed shape"
    (tmp_path / "experiment.yaml").write_text(spec)
    path = os.pathsep.join(["/usr/bin", "/bin"])  # no `tandem` binary to fall back on
    out = run([*TANDEM, "tune", "experiment.yaml", "--out", "out"], cwd=tmp_path, timeout=300,
              env=clean_env(PATH=path))
    assert out.returncode == 0, (out.stdout, out.stderr)
    record = json.loads((tmp_path / "out" / "experiment.json").read_text())
    assert len(record["trials"]) == 2 and record["best"]["objective"] > 0.3, record


@pytest.mark.skipif(os.geteuid() != 0, reason="simulated hosts need root; scripts/test as root runs it")
def test_testbed_runs_from_the_package() -> None:
    out = run([*TANDEM, "testbed", "--hosts", "2", "--", sys.executable, "-c",
               "print('rank {rank} of {world} at {addr0}')"], timeout=120)
    assert out.returncode == 0 and re.search(r"rank 0 of 2 at \d+\.\d+\.\d+\.\d+", out.stdout), out


# A value for each of `tandem launch`'s options that take one, the job's other options, and what
# the processes must then show. A new option must be added here (the test compares with --help).
def _launch_cases(tmp: Path, show: Path) -> Dict[str, tuple]:
    port = free_port()
    return {
        "--nproc": (["--nproc", "2"], lambda s: sorted(x["RANK"] for x in s) == ["0", "1"]),
        "--ps": (["--ps", "1", "--workers", "1", "--ps-cmd", f"{sys.executable} {show} server"],
                 lambda s: sorted(x["argv"][0] for x in s) == ["server", "x"]),
        "--workers": (["--ps", "1", "--workers", "2", "--ps-cmd", f"{sys.executable} {show} server"],
                      lambda s: sorted(x["argv"][0] for x in s) == ["server", "x", "x"]),
        "--ps-cmd": (["--ps", "1", "--workers", "1", "--ps-cmd", f"{sys.executable} {show} srv"],
                     lambda s: "srv" in [x["argv"][0] for x in s]),
        "--log-dir": (["--nproc", "1", "--log-dir", str(tmp / "logs")],
                      lambda s: any((tmp / "logs").rglob("*.log"))),
        "--metrics-addr": (["--nproc", "1", "--metrics-addr", f"127.0.0.1:{port}"],
                           lambda s: s[0]["TANDEM_METRICS_ADDR"] == f"127.0.0.1:{port}"),
        "--restart": (["--nproc", "1", "--restart", "on-failure", "--max-restarts", "1"],
                      lambda s: len(s) == 1),
        "--max-restarts": (["--nproc", "1", "--restart", "on-failure", "--max-restarts", "2"],
                           lambda s: len(s) == 1),
        "--elastic": (["--nproc", "2", "--elastic", "1:2"], lambda s: s[0]["TANDEM_ELASTIC"] == "1:2"),
        "--timeout": (["--nproc", "1", "--timeout", "60"], lambda s: len(s) == 1),
        "--gpus": (["--nproc", "1", "--gpus", "none"], lambda s: len(s) == 1),
        "--env": (["--nproc", "1", "--env", "GREETING=hi there"], lambda s: s[0]["GREETING"] == "hi there"),
    }


def test_python_launch_parses_every_option_as_tandem_launch(tmp_path: Path) -> None:
    show = tmp_path / "show.py"
    show.write_text(SHOW)
    h = run([*LAUNCH, "--help"])
    assert h.returncode == 0, h.stderr
    cases = _launch_cases(tmp_path, show)
    assert value_options(h.stdout) == sorted(cases), "each option that takes a value needs a case here"
    for opt, (args, check) in cases.items():
        (tmp_path / "failed-once").unlink(missing_ok=True)
        extra = ["fail-once"] if opt in ("--restart", "--max-restarts") else []
        logs = [] if opt == "--log-dir" else ["--no-log-files"]
        # The script comes straight after the options (no `--`), its own arguments after it.
        out = run([*LAUNCH, *logs, *args, str(show), "x", "--nproc", "7", *extra], cwd=tmp_path)
        assert out.returncode == 0, (opt, out.stdout, out.stderr)
        s = seen(out.stdout)
        workers = [x for x in s if x["argv"][0] == "x"]
        assert workers and all(x["argv"] == ["x", "--nproc", "7", *extra] for x in workers), (opt, s)
        assert check(s), (opt, s)
    # A malformed value is refused naming the option, before any process starts.
    bad = run([*LAUNCH, "--nproc", "two", str(show)])
    assert bad.returncode == 2 and "--nproc" in bad.stderr, bad


def test_the_wheel_works_in_a_fresh_venv_without_cargo(tmp_path: Path) -> None:
    wheels = sorted((ROOT / "target" / "wheels").glob("tandem-*.whl"))
    wheel = os.environ.get("TANDEM_WHEEL") or (str(wheels[-1]) if wheels else "")
    assert wheel, "no wheel in target/wheels: build it with scripts/wheel (scripts/test does)"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               wheel], timeout=600)
    assert pip.returncode == 0, pip.stderr
    path = os.pathsep.join([str(venv / "bin"), "/usr/bin", "/bin"])
    assert shutil.which("cargo", path=path) is None, "cargo is on the test's PATH; it must not be"
    env = {"PATH": path, "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    demo = run(["tandem", "demo", "--mode", "allreduce"], env=env, cwd=tmp_path, timeout=300)
    assert demo.returncode == 0 and "allreduce (4 ranks)" in demo.stdout, (demo.stdout, demo.stderr)
    script = tmp_path / "job.py"
    script.write_text("import numpy as np, tandem\n"
                      "tandem.init()\n"
                      "x = tandem.allreduce(np.full(3, tandem.rank() + 1.0))\n"
                      "print('SUM', x.tolist())\n")
    job = run(["tandem", "launch", "--nproc", "2", "--no-log-files", str(script)], env=env, cwd=tmp_path)
    assert job.returncode == 0 and job.stdout.count("SUM [3.0, 3.0, 3.0]") == 2, (job.stdout, job.stderr)
    certs = run(["tandem", "certs", "init", str(tmp_path / "tls"), "--name", "127.0.0.1"], env=env)
    assert certs.returncode == 0 and (tmp_path / "tls" / "process" / "cert.pem").exists(), certs.stderr


def test_native_stubs_match_the_module() -> None:
    out = run([sys.executable, "-m", "mypy.stubtest", "tandem._native"], cwd=ROOT / "target", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_user_script_type_checks_strictly(tmp_path: Path) -> None:
    # Against the installed package (its py.typed and stubs), from a folder without python/ in it.
    script = ROOT / "python" / "tests" / "typecheck" / "user_script.py"
    out = run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(script)],
              cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    # The check can fail: a call the API does not allow is reported.
    bad = tmp_path / "bad.py"
    bad.write_text("import tandem\n\ntandem.allreduce('not an array', op=3)\n")
    out = run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(bad)],
              cwd=tmp_path, timeout=300)
    assert out.returncode == 1 and "allreduce" in out.stdout, out.stdout
