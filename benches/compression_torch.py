"""Data-parallel training of a torch CNN on scikit-learn's digits through Horovod's API in
Tandem (``tandem.torch.DistributedOptimizer``: fused buckets allreduced from hooks during
backward), with one compression: the step time, the test accuracy after every epoch, and the
time to a fixed accuracy.

Two models: ``wide`` (two 3x3 convolutions, a pooling, then 1024 -> 1024 -> 10: about 1.1M
parameters, 97% of them in one matrix) and ``small`` (the examples' CNN, about 10k parameters).

One rank of a job; run it once per rank (rank 0 prints the CSV line), e.g. on simulated hosts:

  tandem testbed --hosts 4 --link 1gbit -- env TANDEM_LAUNCHER=tandem TANDEM_RANK={rank} \\
      TANDEM_WORLD_SIZE={world} TANDEM_LOCAL_RANK=0 TANDEM_LOCAL_WORLD_SIZE=1 \\
      TANDEM_RENDEZVOUS_ADDR={addr0}:29500 TANDEM_JOB_TOKEN=$TOKEN TANDEM_INSECURE=1 \\
      python3 benches/compression_torch.py COMPRESSION [EPOCHS] [TARGET] [MODEL]

COMPRESSION is none, bf16, topk:FRACTION, powersgd:RANK or auto (Tandem's own settings, summed in
float32). Prints: model,compression,ranks,step_ms,final_accuracy,seconds_to_target,
epochs_to_target,chosen. Every rank uses the same seed and data order, so runs differ only by
their compression.
"""

from __future__ import annotations

import os
import sys

# One thread per rank: ranks sharing a machine's cores (simulated hosts) must not oversubscribe
# them, or the step time measures the scheduler rather than the link.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import tandem  # noqa: E402
import tandem.torch as hvd  # noqa: E402
from compression_accuracy import reached_fields, timed_epochs  # noqa: E402

# The examples' CNN and data split (python/examples).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "examples"))
from torch_digits_common import CNN as Small, accuracy, tensors  # noqa: E402


class Wide(torch.nn.Module):
    """Gradients mostly one matrix: 1x8x8 -> conv 32 -> conv 64 -> pool -> 1024 -> 1024 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, 1024)
        self.fc2 = torch.nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def main() -> None:
    setting = sys.argv[1]
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    target = float(sys.argv[3]) if len(sys.argv) > 3 else 0.95
    which = sys.argv[4] if len(sys.argv) > 4 else "wide"
    torch.set_num_threads(1)
    hvd.init(timeout=120, compression=None if setting == "none" else setting)
    chosen = tandem.auto_compression()["chosen"] if setting == "auto" else setting
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(42)
    model = Wide() if which == "wide" else Small()
    x, y, tx, ty = tensors()
    shard = len(x) // n
    xs, ys = x[r * shard:(r + 1) * shard], y[r * shard:(r + 1) * shard]
    batch = 16
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # compression=None: the group's setting, given to init() above.
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())

    def step(s):
        bx, by = xs[s * batch:(s + 1) * batch], ys[s * batch:(s + 1) * batch]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(bx), by).backward()
        opt.step()

    step_times, reached = timed_epochs(epochs, shard // batch, step, lambda: accuracy(model, tx, ty), target)
    final = accuracy(model, tx, ty)
    per = np.array([np.median(step_times)])
    tandem.allreduce(per, op="max")
    if r == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{which}:{params},{setting},{n},{per[0] * 1e3:.1f},{final:.4f},{reached_fields(reached)},{chosen}",
              flush=True)
    hvd.shutdown()


if __name__ == "__main__":
    main()
