"""Data-parallel training of an MLP whose gradients are mostly matrices (64 -> 1024 -> 1024 -> 10, about
1.1M parameters) on scikit-learn's digits, each gradient allreduced through Tandem with one
compression (through ``tandem.DistributedOptimizer``): the step time, the test accuracy after every
epoch, and the time to a fixed accuracy.

One rank of a job; run it once per rank (rank 0 prints the CSV line), e.g. on simulated hosts:

  tandem testbed --hosts 4 --link 1gbit -- env TANDEM_LAUNCHER=tandem TANDEM_RANK={rank} \
      TANDEM_WORLD_SIZE={world} TANDEM_LOCAL_RANK=0 TANDEM_LOCAL_WORLD_SIZE=1 \
      TANDEM_RENDEZVOUS_ADDR={addr0}:29500 TANDEM_JOB_TOKEN=$TOKEN TANDEM_INSECURE=1 \
      python3 benches/compression_accuracy.py COMPRESSION [EPOCHS] [TARGET] [BATCH]

BATCH is the examples per rank per step (default 16).

Prints: compression,ranks,step_ms,final_accuracy,seconds_to_target,epochs_to_target,chosen
(`chosen` is what `auto` picked; seconds_to_target is empty when the target was not reached).
Every rank uses the same seed, so the runs differ only by their compression.
"""

from __future__ import annotations

import os
import sys
import time

# One BLAS thread per rank: ranks sharing a machine's cores (simulated hosts) must not
# oversubscribe them, or the step time measures the scheduler rather than the link.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

import tandem  # noqa: E402

HIDDEN = 1024


def load():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(len(x) * 0.8)
    return x[:cut], y[:cut], x[cut:], y[cut:]


def init(rng):
    dims = [64, HIDDEN, HIDDEN, 10]
    params = []
    for a, b in zip(dims, dims[1:]):
        params.append((rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32))
        params.append(np.zeros(b, np.float32))
    return params


def forward(params, x):
    acts = [x]
    h = x
    for i in range(0, len(params), 2):
        h = h @ params[i] + params[i + 1]
        if i + 2 < len(params):
            h = np.maximum(h, 0)
        acts.append(h)
    return acts


def grads(params, x, y):
    acts = forward(params, x)
    logits = acts[-1]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = p
    d[np.arange(len(y)), y] -= 1
    d /= len(y)
    out = [None] * len(params)
    for i in range(len(params) - 2, -1, -2):
        out[i] = (acts[i // 2].T @ d).astype(np.float32, copy=False)
        out[i + 1] = d.sum(0).astype(np.float32, copy=False)
        if i > 0:
            d = (d @ params[i].T) * (acts[i // 2] > 0)
    return out


def accuracy(params, x, y):
    return float((forward(params, x)[-1].argmax(1) == y).mean())


def timed_epochs(epochs, steps_per_epoch, step, evaluate, target):
    """Runs ``step(s)`` for every step ``s`` of every epoch, timing each, and ``evaluate()`` (the
    test accuracy) after every epoch: returns the step times and, once the accuracy first reached
    ``target``, (seconds since the start, epochs), else None. Shared by the compression benches."""
    step_times, reached = [], None
    start = time.perf_counter()
    for epoch in range(epochs):
        for s in range(steps_per_epoch):
            t0 = time.perf_counter()
            step(s)
            step_times.append(time.perf_counter() - t0)
        if reached is None and evaluate() >= target:
            reached = (time.perf_counter() - start, epoch + 1)
    return step_times, reached


def reached_fields(reached) -> str:
    """``seconds_to_target,epochs_to_target`` of the CSV line, both empty when not reached."""
    return f"{reached[0]:.2f},{reached[1]}" if reached else ","


def main() -> None:
    setting = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    target = float(sys.argv[3]) if len(sys.argv) > 3 else 0.95
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    g = tandem.init(timeout=120, compression=setting if setting != "none" else None)
    chosen = tandem.auto_compression()["chosen"] if setting == "auto" else setting
    r, n = g.rank, g.world_size
    x, y, tx, ty = load()
    params = init(np.random.default_rng(42))
    # The optimizer users call: the gradients fused into one bucket for none, fp16/bf16 and top-k
    # (one compressor, its residual across steps); PowerSGD gives each weight its own matrix and
    # compressor and sends the biases exactly, all in two allreduces a step.
    opt = tandem.DistributedOptimizer(tandem.optim.SGD(lr=0.1), compression=setting)
    shard = len(x) // n
    xs, ys = x[r * shard:(r + 1) * shard], y[r * shard:(r + 1) * shard]

    def step(s):
        bx, by = xs[s * batch:(s + 1) * batch], ys[s * batch:(s + 1) * batch]
        opt.step(params, grads(params, bx, by))

    step_times, reached = timed_epochs(epochs, shard // batch, step, lambda: accuracy(params, tx, ty), target)
    final = accuracy(params, tx, ty)
    per = np.array([np.median(step_times)])
    g.allreduce(per, op="max")
    if r == 0:
        print(f"{setting},{n},{per[0] * 1e3:.1f},{final:.4f},{reached_fields(reached)},{chosen}", flush=True)
    tandem.shutdown()


if __name__ == "__main__":
    main()
