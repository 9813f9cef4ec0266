"""A CNN on the digits trained elastically: a process lost mid-training (here one that kills
itself with SIGKILL when ``--kill-at`` says so) does not end the job; the others re-form, return
to their last commit and go on, and the samples already processed this epoch are not repeated.

    python -m tandem.launch --nproc 3 --elastic 2:3 python/examples/torch_digits_elastic.py --kill-at 40

``--checkpoint FILE`` also writes every commit to FILE, so a job lost whole resumes from it.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

import tandem.torch as hvd
from torch_digits_common import CNN, accuracy, arguments, tensors


def main() -> None:
    ap = arguments(epochs=6, lr=0.05)
    ap.add_argument("--kill-at", type=int, default=0, help="the process started as rank 1 kills itself at this step")
    ap.add_argument("--checkpoint", default=None)
    a = ap.parse_args()
    me = int(os.environ.get("RANK", "0"))  # this process's first rank, for --kill-at
    torch.manual_seed(0)
    x, y, xt, yt = tensors()
    data = TensorDataset(x, y)
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9)
    sampler = hvd.elastic.ElasticSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=a.batch, sampler=sampler)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, sampler=sampler, path=a.checkpoint,
                                   epoch=0, step=0, samples=0)

    def on_reset() -> None:
        print(f"members={hvd.size()} at step {state.step}", flush=True)

    @hvd.elastic.run(reset=[on_reset])
    def train(state: hvd.elastic.TorchState) -> None:
        while state.epoch < a.epochs:
            for i, (bx, by) in enumerate(loader):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(bx), by)
                loss.backward()
                for p in model.parameters():  # average the gradients over the current members
                    hvd.allreduce_(p.grad)
                opt.step()
                state.step += 1
                state.samples += len(bx) * hvd.size()
                if a.kill_at and me == 1 and state.step == a.kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                sampler.record_batch(i, a.batch)
                state.commit()
            state.epoch += 1
            sampler.set_epoch(state.epoch)
            state.commit()

    start = time.perf_counter()
    train(state)
    elapsed = time.perf_counter() - start
    acc = accuracy(model, xt, yt)
    if hvd.rank() == 0:  # the last group is still usable after run returns
        print(f"mode=elastic workers={hvd.size()} steps={state.step} accuracy={acc:.4f} "
              f"samples_per_sec={state.samples / elapsed:.0f}", flush=True)


if __name__ == "__main__":
    main()
