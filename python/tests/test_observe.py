"""Seeing inside jobs from Python: metrics (checked with prometheus_client's own parser), timeline
spans, flight-recorder dumps, and a parameter server's metrics endpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import tandem

from conftest import clean_env, free_port, rank_env, read_line

RANK = """
import json, sys, numpy as np, tandem
g = tandem.init(timeout=60)
for i in range(5):
    with tandem.span("step"):
        g.allreduce(np.ones(1000, dtype=np.float32))
print("METRICS " + json.dumps(tandem.metrics_text()), flush=True)
print("DICT " + json.dumps(tandem.metrics()), flush=True)
print("DUMP " + json.dumps(tandem.dump_flight_recorder("asked by the test")), flush=True)
tandem.shutdown()
"""


#: A job name the text format must escape (quotes, a backslash), read back unescaped.
JOB = 'py "observe" \\ job'


def families(text: str):
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams, family: str, name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no {name} with {labels} in {family}")


def test_metrics_parse_spans_reach_the_timeline_and_the_recorder_dumps(tmp_path: Path, token: str) -> None:
    port = free_port()
    timeline = tmp_path / "timeline"
    dumps = tmp_path / "dumps"
    procs = [
        subprocess.Popen([sys.executable, "-c", RANK], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**rank_env(r, 2, port, token), "TANDEM_TIMELINE": str(timeline),
                              "TANDEM_TRACE_DIR": str(dumps), "TANDEM_JOB_NAME": JOB})
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r}: {err}"
        lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1]) for line in out.splitlines()}
        fams = families(lines["METRICS"])
        assert fams["tandem_op_seconds"].type == "histogram"
        labels = dict(op="allreduce", size="<=4KiB", rank=str(r), role="rank", job=JOB)
        assert sample(fams, "tandem_op_seconds", "tandem_op_seconds_count", **labels) == 5
        assert sample(fams, "tandem_op_seconds", "tandem_op_seconds_bucket", le="+Inf", **labels) == 5
        assert sample(fams, "tandem_op_bytes", "tandem_op_bytes_total", **labels) == 5 * 4000
        # tandem.metrics() holds the same samples, by name.
        count = [v for lbl, v in lines["DICT"]["tandem_op_seconds_count"] if lbl.get("op") == "allreduce"]
        assert count == [5]
        assert all(lbl["job"] == JOB for samples in lines["DICT"].values() for lbl, _ in samples)
        dump = json.loads(Path(lines["DUMP"]).read_text())
        assert dump["reason"] == "asked by the test"
        assert [e["kind"] for e in dump["ops"]].count("allreduce") == 5
        events = json.loads((timeline / f"rank-{r}.json").read_text())["traceEvents"]
        steps = [e for e in events if e.get("name") == "step" and e.get("ph") == "X"]
        ops = [e for e in events if e.get("cat") == "collective" and e.get("name") == "allreduce"]
        assert len(steps) == 5 and len(ops) == 5
        # Each span holds its allreduce.
        for s, o in zip(sorted(steps, key=lambda e: e["ts"]), sorted(ops, key=lambda e: e["ts"])):
            assert s["ts"] <= o["ts"] and o["ts"] + o["dur"] <= s["ts"] + s["dur"] + 1


def test_a_span_needs_a_name() -> None:
    with pytest.raises(ValueError, match="non-empty name"):
        tandem.span("")

    @tandem.span("decorated")
    def f(x: int) -> int:
        return x + 1

    assert f(1) == 2


WORKER = """
import json, numpy as np, tandem
from tandem import ps
c = ps.Client([ps.param("w", (4,))], servers=[{addr!r}], worker=0, workers=1, token={token!r}, mode="sync",
              lr=0.1, timeout=30)
version, p = c.pull()
for step in range(3):
    version, p = c.push_pull(version, {{"w": np.ones(4, dtype=np.float32)}})
m = tandem.metrics()
print("PUSHES " + json.dumps([v for l, v in m["tandem_ps_call_seconds_count"] if l["call"] == "push"]), flush=True)
c.done()
"""


def test_a_parameter_server_serves_labelled_metrics_and_workers_time_their_calls(tmp_path: Path,
                                                                                 token: str) -> None:
    mport = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tandem.ps", "--bind", "127.0.0.1:0", "--keep-running"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env=clean_env(TANDEM_JOB_TOKEN=token, TANDEM_METRICS_ADDR=f"127.0.0.1:{mport}",
                      TANDEM_JOB_NAME="py-ps"),
    )
    try:
        addr = read_line(server, "tandem ps: serving on").rsplit(" ", 1)[1]
        timeline = tmp_path / "tl"
        w = subprocess.run([sys.executable, "-c", WORKER.format(addr=addr, token=token)], capture_output=True,
                           text=True, timeout=120, env=clean_env(TANDEM_TIMELINE=str(timeline)))
        assert w.returncode == 0, w.stderr
        pushes = json.loads(next(line for line in w.stdout.splitlines() if line.startswith("PUSHES"))[7:])
        assert pushes == [3]
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            fams = families(r.read().decode())
        labels = dict(job="py-ps", rank="0", role="ps")
        assert sample(fams, "tandem_ps_version", "tandem_ps_version", **labels) == 3
        assert sample(fams, "tandem_ps_gradients_applied", "tandem_ps_gradients_applied_total", **labels) == 3
        events = json.loads((timeline / "worker-0.json").read_text())["traceEvents"]
        names = [e["name"] for e in events if e.get("cat") == "ps"]
        assert names.count("ps.push") == 3 and names.count("ps.pull") >= 4
    finally:
        server.kill()
        server.wait(timeout=10)
        if server.stdout:
            server.stdout.close()
