#!/usr/bin/env python3
"""Stands in for the trainers of Katib's examples (mxnet-mnist, tf-mnist-with-summaries) in
Tandem's tests: takes their flags and prints their metric lines, `name=value`, once per epoch. The
accuracy is a smooth function of the learning rate (best near 0.02), the layers and the optimizer,
rising with the epochs, so searches have something to find and early stopping something to stop."""
import argparse
import math
import os
import time

p = argparse.ArgumentParser()
p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=0.01)
p.add_argument("--num-layers", type=int, default=2)
p.add_argument("--optimizer", default="sgd")
p.add_argument("--num-epochs", "--epochs", dest="epochs", type=int, default=3)
p.add_argument("--batch-size", type=int, default=64)
a, _ = p.parse_known_args()
if not (a.lr > 0 and math.isfinite(a.lr)):
    raise SystemExit(f"--lr {a.lr} must be positive")
base = 0.97 - 0.3 * (math.log10(a.lr) - math.log10(0.02)) ** 2
base += 0.003 * (a.num_layers - 2) + {"sgd": 0.0, "adam": 0.005, "ftrl": -0.01}.get(a.optimizer, -0.05)
base -= abs(a.batch_size - 48) * 0.0002
rank = os.environ.get("RANK", os.environ.get("TANDEM_RANK", "0"))
# METRICS_FILE: also write the metrics there, as JSON lines (Katib's File collector, format JSON).
out = open(os.environ["METRICS_FILE"], "w") if os.environ.get("METRICS_FILE") else None
for epoch in range(1, a.epochs + 1):
    acc = max(0.0, min(0.999, base * (1 - 0.3 / epoch)))
    print(f"Epoch[{epoch}] Train-accuracy={min(0.999, acc + 0.01):.4f}", flush=True)
    print(f"Epoch[{epoch}] Validation-accuracy={acc:.4f}", flush=True)
    if rank == "0":
        print(f"accuracy={acc:.4f} step={epoch}", flush=True)
    if out:
        out.write(f'{{"epoch": "{epoch}", "File-accuracy": "{acc:.4f}", "timestamp": {time.time()}}}\n')
        out.flush()
    time.sleep(0.05)
