"""tandem.elastic from Python: `python -m tandem.launch --nproc 3 --elastic 2:3` with a rank that
crashes right after a step; the job finishes (with and without a replacement), every step is
applied once, and the parameters equal a control computed from the memberships."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import clean_env

SCRIPT = r'''
import os, sys
import numpy as np
import tandem

STEPS, LEN = 30, 200
me = int(os.environ["TANDEM_ELASTIC_ID"]) if "TANDEM_ELASTIC_ID" in os.environ else int(os.environ["RANK"])
state = tandem.elastic.State(w=np.zeros(LEN, np.float32), step=0)

def grad(ident, step):
    i = np.arange(LEN)
    return (((i * 7 + ident * 13 + step * 3) % 11) - 5).astype(np.float32)

@tandem.elastic.run(reset=[lambda: print(f"WORLD {tandem.world_size()}", flush=True)])
def train(state):
    while state.step < STEPS:
        g = grad(me, state.step)
        tandem.allreduce(g)
        state.w += g
        state.step += 1
        members = ",".join(str(m) for m in state._session.members)
        print(f"APPLIED {state.step} MEMBERS {members}", flush=True)
        if me == 1 and state.step == 8:
            os._exit(86)  # a crash between a step and its commit (a replacement joins later)
        state.commit()

train(state)
print("RESULT " + __import__("json").dumps({"w": state.w.tolist(), "step": state.step}), flush=True)
'''


def grad(ident: int, step: int) -> np.ndarray:
    i = np.arange(200)
    return (((i * 7 + ident * 13 + step * 3) % 11) - 5).astype(np.float64)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("restart", [False, True])
def test_a_crashing_rank_does_not_end_an_elastic_job(tmp_path: Path, restart: bool) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "tandem.launch", "--nproc", "3", "--elastic", "2:3", "--no-log-files"]
    if restart:
        cmd += ["--restart", "on-failure", "--max-restarts", "1"]
    cmd += ["--", sys.executable, str(script)]
    env = clean_env(TANDEM_ELASTIC_SETTLE="1", TANDEM_TIMEOUT="20", TANDEM_CONNECT_TIMEOUT="10")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=200)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    steps: Dict[int, List[int]] = {}
    for m in re.finditer(r"APPLIED (\d+) MEMBERS ([\d,]+)", text):
        step, members = int(m.group(1)), [int(x) for x in m.group(2).split(",")]
        assert steps.setdefault(step, members) == members, f"step {step} applied by two memberships"
    assert sorted(steps) == list(range(1, 31)), text
    want = np.zeros(200)
    for step, members in steps.items():
        want += sum(grad(m, step - 1) for m in members)
    results = [json.loads(m.group(1)) for m in re.finditer(r"RESULT (\{.*\})", text)]
    assert len(results) == (3 if restart else 2), text
    for r in results:
        assert r["step"] == 30
        np.testing.assert_array_equal(np.array(r["w"]), want)
