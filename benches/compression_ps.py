"""Synchronous parameter-server training of the MLP of ``compression_accuracy.py`` (about 1.1M
parameters, mostly matrices) on scikit-learn's digits, every worker's pushes and pulls through
one compression setting: the step time, the test accuracy after every epoch, and the time to a
fixed accuracy. The servers run plain SGD (lr 0.1) on float32 master weights and average the
workers' gradients each step, as the allreduce bench does.

One process of a job: the last SERVERS ranks serve, the others train (rank 0, whose output
`tandem testbed` shows, is worker 0). Run it once per rank, e.g.
2 servers and 4 workers, each on its own simulated host:

  tandem testbed --hosts 6 --link 1gbit -- env TANDEM_JOB_TOKEN=$TOKEN TANDEM_INSECURE=1 \\
      python3 benches/compression_ps.py {rank} {world} {hosts} 2 COMPRESSION [EPOCHS] [TARGET]

COMPRESSION is none, bf16, fp16, topk:FRACTION or auto (PowerSGD is refused by the servers). The
servers accept any worker setting (``auto`` on their side). Worker 0 prints: compression,workers,
step_ms,final_accuracy,seconds_to_target,epochs_to_target,chosen.
"""

from __future__ import annotations

import os
import sys

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from tandem import ps  # noqa: E402
from compression_accuracy import HIDDEN, accuracy, grads, load, reached_fields, timed_epochs  # noqa: E402

PORT = 29600


def declarations():
    dims = [64, HIDDEN, HIDDEN, 10]
    out = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        out.append(ps.param(f"w{i}", (a, b), init="normal", std=float(np.sqrt(2.0 / a)), seed=i + 1))
        out.append(ps.param(f"b{i}", (b,)))
    return out


def main() -> None:
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    addrs = [h.rsplit(":", 1)[0] for h in sys.argv[3].split(",")]
    servers = int(sys.argv[4])
    setting = sys.argv[5]
    epochs = int(sys.argv[6]) if len(sys.argv) > 6 else 6
    target = float(sys.argv[7]) if len(sys.argv) > 7 else 0.95
    workers = world - servers
    if rank >= workers:
        ps.serve(bind=f"{addrs[rank]}:{PORT}", index=rank - workers, compression="auto", worker_timeout=120)
        return
    worker = rank
    decl = declarations()
    names = [d.name for d in decl]
    client = ps.Client(decl, optimizer="sgd", lr=0.1, mode="sync", servers=[f"{a}:{PORT}" for a in addrs[workers:]],
                       worker=worker, workers=workers, timeout=120, compression=setting)
    x, y, tx, ty = load()
    shard = len(x) // workers
    xs, ys = x[worker * shard:(worker + 1) * shard], y[worker * shard:(worker + 1) * shard]
    batch = 16
    state = dict(zip(("version", "pulled"), client.pull()))

    def current():
        return [state["pulled"][n] for n in names]

    def step(s):
        gs = grads(current(), xs[s * batch:(s + 1) * batch], ys[s * batch:(s + 1) * batch])
        state["version"], state["pulled"] = client.push_pull(state["version"], dict(zip(names, gs)))

    step_times, reached = timed_epochs(epochs, shard // batch, step, lambda: accuracy(current(), tx, ty), target)
    final = accuracy(current(), tx, ty)
    step_ms = np.median(step_times) * 1e3
    if worker == 0:
        print(f"{setting},{workers},{step_ms:.1f},{final:.4f},{reached_fields(reached)},{client.compression}",
              flush=True)
    client.done()


if __name__ == "__main__":
    main()
