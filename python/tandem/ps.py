"""The parameter-server client and server.

Workers declare parameters, pull them, compute gradients and push them; the servers apply the
optimizer. Inside a job started by ``tandem launch --ps P --workers W`` (or a Kubeflow TFJob) the
servers, this worker's index and the number of workers come from ``TF_CONFIG``::

    import numpy as np
    from tandem import ps

    params = [ps.param("w", (784, 10), init="normal", std=0.01, seed=1), ps.param("b", (10,))]
    with ps.Client(params, optimizer="adam", lr=1e-3, mode="sync") as client:
        version, p = client.pull()
        for step in range(100):
            grads = compute(p)                          # {name: float32 array}
            version, p = client.push_pull(version, grads)

A server process runs ``python -m tandem.ps`` (or ``tandem ps``), or calls :func:`serve`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _native
from ._arrays import is_torch_tensor, torch_view
from .errors import ConfigurationError, TandemError

__all__ = ["Param", "param", "Client", "PushResult", "serve"]


@dataclass(frozen=True)
class Param:
    """A declared parameter: name, shape and initializer (identical on every run for a seed)."""

    name: str
    shape: Tuple[int, ...]
    init: str = "zeros"
    a: float = 0.0
    b: float = 0.0
    seed: int = 0

    def _wire(self) -> Tuple[str, List[int], str, float, float, int]:
        return (self.name, list(self.shape), self.init, float(self.a), float(self.b), int(self.seed))


def param(name: str, shape: Sequence[int], init: str = "zeros", *, value: float = 0.0, low: float = -0.05,
          high: float = 0.05, mean: float = 0.0, std: float = 0.01, seed: int = 0) -> Param:
    """Declares a parameter. ``init`` is ``zeros``, ``constant`` (``value``), ``uniform``
    (``low``, ``high``, ``seed``) or ``normal`` (``mean``, ``std``, ``seed``)."""
    shape = tuple(int(d) for d in shape)
    if init == "zeros":
        return Param(name, shape)
    if init == "constant":
        return Param(name, shape, "constant", value)
    if init == "uniform":
        return Param(name, shape, "uniform", low, high, seed)
    if init == "normal":
        return Param(name, shape, "normal", mean, std, seed)
    raise ValueError(f"init={init!r} is not zeros, constant, uniform or normal")


class PushResult(NamedTuple):
    """What a push did: whether every server applied it, whether one dropped it as late (sync with
    backup workers), and the servers' lowest version afterwards."""

    applied: bool
    dropped: bool
    version: int


def _from_job() -> Tuple[List[str], int, int]:
    spec = json.loads(_native.cluster_spec())
    servers = [addr for _, addr in sorted(spec.get("peers", {}).get("ps", {}).items(), key=lambda kv: int(kv[0]))]
    if not servers:
        raise ConfigurationError(
            "no parameter servers in the job's environment (TF_CONFIG lists no 'ps'); "
            "start the job with `tandem launch --ps P --workers W` or pass servers="
        )
    if spec["role"] not in ("chief", "worker"):
        raise ConfigurationError(f"this process is {spec['role']} {spec['index']}, not a worker")
    replicas = spec.get("replicas", {})
    chiefs = int(replicas.get("chief", 0))
    workers = chiefs + int(replicas.get("worker", 0))
    worker = spec["index"] if spec["role"] == "chief" else chiefs + spec["index"]
    return servers, worker, workers


class Client:
    """A worker's connection to every parameter server.

    ``mode`` is ``"sync"`` (each step the servers wait for ``replicas_to_aggregate`` gradients,
    default all workers, and drop late ones) or ``"async"`` (applied on arrival; with
    ``staleness=s`` a worker more than ``s`` steps ahead of the slowest waits). ``optimizer`` is
    ``sgd``, ``momentum``, ``nesterov``, ``adagrad``, ``adam`` or ``adamw`` with its settings
    (``lr``, ``momentum``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``, ``clip_norm``,
    ``decay_rate``/``decay_steps``). ``servers``, ``worker`` and ``workers`` default to the job's.
    ``max_partition_bytes`` (0: no limit) cuts larger tensors into partitions of at most that
    size, so ``push_pull`` overlaps more; every worker and a restore must use the same value.
    ``compression`` (default ``TANDEM_COMPRESSION``, else none) sends gradients and receives
    parameters in fewer bytes: ``"bf16"`` or ``"fp16"`` (the servers keep float32 weights),
    ``"topk:FRACTION"`` (the largest gradient elements, the rest kept here for the next pushes) or
    ``"auto"``; servers started with another setting (not ``auto``) refuse the worker, naming both.
    Transfers between processes of one machine through shared memory are never compressed.
    """

    def __init__(self, params: Sequence[Param], *, optimizer: str = "sgd", lr: float = 0.01, mode: str = "sync",
                 staleness: Optional[int] = None, replicas_to_aggregate: Optional[int] = None,
                 servers: Optional[Sequence[str]] = None, worker: Optional[int] = None,
                 workers: Optional[int] = None, token: Optional[str] = None, timeout: float = 60.0,
                 min_partition_bytes: int = 1 << 20, max_partition_bytes: int = 0,
                 compression: Optional[str] = None, **optimizer_settings: Any) -> None:
        if servers is None or worker is None or workers is None:
            s, w, n = _from_job()
            servers = s if servers is None else servers
            worker = w if worker is None else worker
            workers = n if workers is None else workers
        for p in params:
            if not isinstance(p, Param):
                raise TypeError(f"params must be tandem.ps.param(...) declarations, got {type(p).__name__}")
        self.worker = worker
        self.workers = workers
        self._shapes = {p.name: p.shape for p in params}
        self._native = _native.PsClient(
            list(servers), [p._wire() for p in params], worker=worker, workers=workers, optimizer=optimizer,
            lr=lr, mode=mode, staleness=staleness, replicas_to_aggregate=replicas_to_aggregate, token=token,
            timeout=timeout, min_partition_bytes=min_partition_bytes,
            max_partition_bytes=max_partition_bytes, compression=compression, **optimizer_settings,
        )

    @property
    def sync(self) -> bool:
        return self._native.sync

    @property
    def compression(self) -> str:
        """The compression in force with the servers (``auto`` resolved when connecting)."""
        return self._native.compression

    def compression_state(self) -> bytes:
        """What top-k's error feedback still owes the servers (each partition's residual), as
        bytes to save with this worker's training state; a restarted worker hands them to
        :meth:`restore_compression_state` so no gradient is lost with the process."""
        return bytes(self._native.compression_state())

    def restore_compression_state(self, state: bytes) -> None:
        """Takes back what :meth:`compression_state` saved. A ValueError, with nothing changed,
        for bytes that are not a saved state, another compression's state, a partition this
        worker does not have, or a residual of another length."""
        self._native.restore_compression_state(bytes(state))

    def pull(self, min_version: int = 0) -> Tuple[int, Dict[str, np.ndarray]]:
        """Waits until every server reached ``min_version`` (sync: the step you want the
        parameters of) and returns ``(version, {name: array})``."""
        return self._native.pull(min_version)

    def push(self, step: int, grads: Mapping[str, np.ndarray]) -> PushResult:
        """Pushes float32 gradients for ``step`` (sync: the version you pulled)."""
        return PushResult(*self._native.push(step, _host_grads(grads)))

    def push_pull(self, step: int, grads: Mapping[str, np.ndarray]) -> Tuple[int, Dict[str, np.ndarray]]:
        """Pushes the gradients of ``step`` and pulls the parameters to use next, both at once.

        Sync: returns step ``step + 1``'s parameters, exactly as ``push`` then ``pull(step + 1)``
        would, but each server streams every partition of the new step as soon as it applied it,
        while later partitions' gradients are still arriving (a model of several tensors, or cut
        with ``max_partition_bytes``, overlaps most). Async: a push, then a pull, so the
        parameters include this gradient."""
        return self._native.push_pull(step, _host_grads(grads))

    def pull_into(self, params: Mapping[str, Any], min_version: int = 0) -> int:
        """:meth:`pull` written into ``params`` (``{name: tensor or array}``, e.g. a torch model's
        ``dict(model.named_parameters())``; any float dtype, bfloat16 included, converted on the
        way); returns the version. Names the servers do not hold are an error."""
        version, pulled = self.pull(min_version)
        _copy_into(params, pulled)
        return version

    def push_pull_into(self, step: int, grads: Mapping[str, Any], params: Mapping[str, Any]) -> int:
        """:meth:`push_pull` with the new parameters written into ``params``; returns the version."""
        version, pulled = self.push_pull(step, grads)
        _copy_into(params, pulled)
        return version

    def pull_rows(self, name: str, ids: Any) -> np.ndarray:
        """Rows ``ids`` of embedding table ``name``: shape ``(len(ids), dim)``."""
        return self._native.pull_rows(name, [int(i) for i in np.asarray(ids).reshape(-1)])

    def push_rows(self, name: str, ids: Any, grads: np.ndarray) -> None:
        """Pushes gradients for rows ``ids`` of ``name`` (only those rows and their state change)."""
        self._native.push_rows(name, [int(i) for i in np.asarray(ids).reshape(-1)], _host_grad(name, grads))

    def checkpoint(self) -> List[int]:
        """Makes every server write a checkpoint now; returns the version each wrote."""
        return self._native.checkpoint()

    def stats(self) -> List[Dict[str, Any]]:
        """Each server's counters (version, applied, dropped, rejected, bytes, staleness, worker steps)."""
        return self._native.stats()

    def done(self) -> None:
        """Tells the servers this worker finished (they exit when every worker has)."""
        self._native.done()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.done()


def _host_grad(name: str, g: Any) -> Any:
    """A gradient as the float32 numpy array the servers take: a contiguous float32 CPU tensor
    without a copy (through its data when it requires grad), other float dtypes converted."""
    if is_torch_tensor(g):
        import torch

        t = g.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.to(torch.float32).contiguous()
        return torch_view(t, f"gradient {name!r}")
    return g


def _host_grads(grads: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _host_grad(k, v) for k, v in grads.items()}


def _copy_into(params: Mapping[str, Any], pulled: Mapping[str, np.ndarray]) -> None:
    unknown = sorted(set(params) - set(pulled))
    if unknown:
        raise KeyError(f"the servers hold no parameters named {unknown}; they hold {sorted(pulled)}")
    for name, dst in params.items():
        src = pulled[name]
        if is_torch_tensor(dst):
            import torch

            if tuple(dst.shape) != tuple(src.shape):
                raise ValueError(f"parameter {name!r} has shape {tuple(src.shape)} on the servers, {tuple(dst.shape)} here")
            with torch.no_grad():
                dst.copy_(torch.from_numpy(src))
        else:
            np.copyto(dst, src, casting="same_kind")


def serve(bind: Optional[str] = None, index: Optional[int] = None, checkpoint_dir: Optional[str] = None,
          checkpoint_every: int = 0, keep_running: bool = False, token: Optional[str] = None,
          on_ready: Optional[Any] = None, worker_timeout: Optional[float] = None,
          worker_lease: Optional[float] = None, follow: Optional[str] = None,
          compression: Optional[str] = None) -> None:
    """Runs a parameter server until every worker is done (or Ctrl-C, or SIGTERM). Without ``bind``
    it serves this process's address from ``TF_CONFIG``. ``on_ready(address)`` is called once it
    listens. With ``worker_timeout`` (seconds), when every worker that has not said done has been
    silent that long it writes a final checkpoint (if configured) and raises
    :class:`tandem.TimeoutError` naming them. With ``worker_lease`` (seconds, sync mode), a worker
    silent that long with no call in progress is gone: steps need the live workers only, and its
    late push raises :class:`tandem.LeaseExpiredError` in that worker until it pulls and pushes for
    the current step. The lease must exceed a worker's compute between its pull and its push.
    With ``follow="host:port"`` this process also serves a standby of that server (primary-backup
    replication): every update is held by the standby before the primary publishes it, and a worker
    that cannot reach the primary fails over to the standby, losing no applied step.
    ``compression`` (default ``TANDEM_COMPRESSION``, else none) is the setting every worker must
    declare; ``"auto"`` accepts each worker's own."""
    if bind is None:
        spec = json.loads(_native.cluster_spec())
        if spec["role"] != "ps":
            raise ConfigurationError(f"this process is {spec['role']} {spec['index']}, not a parameter server; pass bind=")
        index = spec["index"] if index is None else index
        own = spec["peers"]["ps"][str(index)]
        others = [a for role in spec["peers"].values() for a in role.values() if a != own]
        bind = _native.listen_address(own, others)
    _native.serve_ps(bind, index=index or 0, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                     keep_running=keep_running, token=token, on_ready=on_ready,
                     worker_timeout=worker_timeout, worker_lease=worker_lease, follow=follow,
                     compression=compression)


def _main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tandem.ps", description="Run a Tandem parameter server.")
    ap.add_argument("--bind", help="address to serve on (default: this task's address in TF_CONFIG)")
    ap.add_argument("--index", type=int, help="this server's index (default: the task index)")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--keep-running", action="store_true")
    ap.add_argument("--worker-timeout", type=float, metavar="SECS",
                    help="stop with an error when every remaining worker has been silent this long")
    ap.add_argument("--follow", metavar="ADDR",
                    help="also serve a standby of the server at ADDR (it takes over when that server is lost)")
    ap.add_argument("--worker-lease", type=float, metavar="SECS",
                    help="sync mode: go on without a worker silent this long (it rejoins by pushing for the current step)")
    a = ap.parse_args(argv)
    try:
        serve(a.bind, a.index, a.checkpoint_dir, a.checkpoint_every, a.keep_running,
              on_ready=lambda addr: print(f"tandem ps: serving on {addr}", flush=True),
              worker_timeout=a.worker_timeout, worker_lease=a.worker_lease, follow=a.follow)
    except TandemError as e:
        print(f"tandem ps: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
