"""Elastic training of torch models, in the shape of Horovod's ``hvd.elastic.TorchState``::

    import tandem.torch as hvd

    sampler = hvd.elastic.ElasticSampler(dataset, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, sampler=sampler, epoch=0,
                                   path="ckpt/state.pt")   # optional: commits also go to disk

    @hvd.elastic.run
    def train(state):
        for state.epoch in range(state.epoch, 10):
            for i, (x, y) in enumerate(loader):
                ...; opt.step()
                state.sampler.record_batch(i, 32)
                state.commit()
            state.sampler.set_epoch(state.epoch + 1)

    train(state)
    if hvd.rank() == 0:                      # the last group stays usable after run returns
        torch.save(model.state_dict(), "model.pt")

When a process is lost, every survivor returns to its last commit, takes the most advanced
member's model, optimizer and sampler, and ``train`` runs again on the new group; the samples the
group had processed this epoch are not seen again. With ``path``, every commit is also written to
that file (atomically), and a job that was lost whole resumes from it.
"""

from __future__ import annotations

import copy
import io
import os
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

from ..elastic import State, run
from .compression import shared_states
from .optimizer import COMPRESSION_KEY

__all__ = ["TorchState", "ElasticSampler", "run"]


def _blob(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _broadcast_bytes(group: Any, data: bytes, root: int) -> bytes:
    n = np.array([len(data)], dtype=np.int64)
    group.broadcast(n, root)
    buf = np.frombuffer(data, dtype=np.uint8).copy() if group.rank == root else np.empty(int(n[0]), np.uint8)
    if buf.size:
        group.broadcast(buf, root)
    return buf.tobytes()


class ElasticSampler(torch.utils.data.Sampler):
    """Hands each process its share of the samples of an epoch that have not been processed yet,
    so a change of membership neither repeats nor skips samples.

    Call ``record_batch(batch_index, batch_size)`` (or ``record_indices``) after each batch, and
    ``set_epoch(e)`` at the start of an epoch. The share is recomputed from ``tandem.rank()`` and
    ``tandem.world_size()`` on each ``reset()`` (``TorchState`` calls it after every re-formation).
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0) -> None:
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.processed: set = set()
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        """Starts epoch ``epoch``: nothing of it is processed yet."""
        self.epoch = epoch
        self.processed = set()
        self.reset()

    def record_batch(self, batch_index: int, batch_size: int) -> None:
        """Marks the ``batch_index``-th batch this process drew from the sampler as processed."""
        self.record_indices(self._mine[batch_index * batch_size : (batch_index + 1) * batch_size])

    def record_indices(self, indices: Any) -> None:
        """Marks dataset indices as processed."""
        self.processed.update(int(i) for i in indices)

    def reset(self) -> None:
        """Recomputes this process's share of the unprocessed samples for the current group."""
        import tandem

        rank, size = (tandem.rank(), tandem.world_size()) if tandem.is_initialized() else (0, 1)
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        remaining = [i for i in order if i not in self.processed]
        # Every process gets the same number of samples (padding from the start, as torch's
        # DistributedSampler does), so collectives stay in step.
        per = -(-len(remaining) // size) if remaining else 0
        padded = remaining + remaining[: per * size - len(remaining)] if remaining else []
        self._mine: List[int] = padded[rank::size] if size > 0 else padded

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "processed": sorted(self.processed)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.processed = set(int(i) for i in state["processed"])
        self.reset()

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._mine))

    def __len__(self) -> int:
        return len(self._mine)


class TorchState(State):
    """:class:`tandem.elastic.State` with a torch ``model``, ``optimizer`` and ``sampler``
    (each optional) besides numbers and numpy arrays given as keywords. ``path`` writes every
    commit to that file too, and a new job whose file exists starts from it."""

    def __init__(self, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 sampler: Optional[ElasticSampler] = None, path: Optional[str] = None, **values: Any) -> None:
        super().__init__(**values)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "sampler", sampler)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_torch_saved", self._snapshot())
        if path and os.path.exists(path):
            self._load_file(path)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("model", "optimizer", "sampler"):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def _snapshot(self) -> bytes:
        return _blob({
            "model": self.model.state_dict() if self.model is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
        })

    def _apply(self, blob: bytes) -> None:
        parts = _unblob(blob)
        if self.model is not None and parts["model"] is not None:
            self.model.load_state_dict(parts["model"])
        if self.optimizer is not None and parts["optimizer"] is not None:
            self.optimizer.load_state_dict(parts["optimizer"])
        if self.sampler is not None and parts["sampler"] is not None:
            self.sampler.load_state_dict(parts["sampler"])

    def _load_file(self, path: str) -> None:
        saved = torch.load(path, weights_only=False)
        values = object.__getattribute__(self, "_values")
        for k, v in saved["values"].items():
            if k in values:
                values[k] = v
        object.__setattr__(self, "_torch_saved", saved["torch"])
        self._apply(saved["torch"])
        object.__setattr__(self, "_saved", copy.deepcopy(values))
        object.__setattr__(self, "_commits", int(saved["commits"]))

    def commit(self) -> None:
        object.__setattr__(self, "_torch_saved", self._snapshot())
        path = self._path
        if path:
            tmp = f"{path}.tmp-{os.getpid()}"
            torch.save({"values": dict(self._values), "torch": self._torch_saved, "commits": self._commits + 1}, tmp)
            os.replace(tmp, path)
        super().commit()

    def restore(self) -> None:
        super().restore()
        self._apply(self._torch_saved)

    def _sync_more(self, group: Any, root: int) -> None:
        blob = _broadcast_bytes(group, self._torch_saved, root)
        parts = _unblob(blob)
        if parts["optimizer"] is not None and COMPRESSION_KEY in parts["optimizer"]:
            # The root's warm starts, this member's own residuals (none for a new member).
            own = (_unblob(self._torch_saved)["optimizer"] or {}).get(COMPRESSION_KEY, {})
            parts["optimizer"][COMPRESSION_KEY] = shared_states(parts["optimizer"][COMPRESSION_KEY], own)
            blob = _blob(parts)
        if self.sampler is not None and parts["sampler"] is not None:
            # Each member recorded its own samples: the group has processed their union.
            mine = _blob(sorted(_unblob(self._torch_saved)["sampler"]["processed"]))
            everyone = set()
            for r in range(group.world_size):
                got = _broadcast_bytes(group, mine, r)
                everyone.update(_unblob(got))
            parts["sampler"]["processed"] = sorted(everyone)
            blob = _blob(parts)
        object.__setattr__(self, "_torch_saved", blob)

    def sync(self, group: Any) -> None:
        super().sync(group)
        if self.sampler is not None:
            self.sampler.reset()
