"""``tandem.run``: start local worker processes running a function and collect their results
(like ``horovod.run`` or ``torch.multiprocessing.spawn``), so a notebook needs no terminal."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import socket
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

# Variables of other launchers that would contradict the job run() creates.
_FOREIGN = (
    "TF_CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "GROUP_RANK", "TANDEM_RENDEZVOUS_EXTERNAL", "TANDEM_ROLE", "TANDEM_ROLE_INDEX",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _child(fn: Callable[..., Any], rank: int, env: Dict[str, str], args: Sequence[Any],
           kwargs: Dict[str, Any], results: Any) -> None:
    for k in _FOREIGN:
        os.environ.pop(k, None)
    os.environ.update(env)
    torch = sys.modules.get("torch")
    if torch is not None:
        # A child forked after its parent ran torch inherits an OpenMP pool it cannot use (its
        # first parallel operation hangs); one intra-op thread per process, as torchrun sets
        # OMP_NUM_THREADS=1 for several processes on one machine, never starts that pool.
        torch.set_num_threads(1)
    try:
        value = fn(*args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, False, traceback.format_exc()))
        sys.exit(1)


def run(fn: Callable[..., Any], nproc: int = 2, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None,
        timeout: float = 600.0, env: Optional[Dict[str, str]] = None, start_method: Optional[str] = None) -> List[Any]:
    """Runs ``fn(*args, **kwargs)`` in ``nproc`` new local processes forming one job and returns
    their return values in rank order. Inside ``fn``, ``tandem.init()`` joins the job.

    When a process raises, the others are stopped and :class:`tandem.TandemError` is raised with
    its traceback; after ``timeout`` seconds every process is stopped and
    :class:`tandem.TimeoutError` is raised. ``start_method`` defaults to ``fork`` where it exists
    (so functions defined in a notebook work) and ``spawn`` elsewhere. Where the parent has
    imported torch, each process uses one torch thread (``torch.set_num_threads(1)``, as
    torchrun's ``OMP_NUM_THREADS=1``).
    """
    from .errors import TandemError, TimeoutError

    if nproc < 1:
        raise ValueError(f"nproc={nproc} must be at least 1")
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx: Any = mp.get_context(start_method)  # typeshed's BaseContext lacks Process
    results = ctx.Queue()
    base = {
        "TANDEM_LAUNCHER": "tandem",
        "TANDEM_WORLD_SIZE": str(nproc),
        "TANDEM_LOCAL_WORLD_SIZE": str(nproc),
        "TANDEM_RENDEZVOUS_ADDR": f"127.0.0.1:{_free_port()}",
        "TANDEM_JOB_TOKEN": secrets.token_hex(16),
    }
    base.update(env or {})
    procs: List[Any] = []
    for rank in range(nproc):
        e = dict(base, TANDEM_RANK=str(rank), TANDEM_LOCAL_RANK=str(rank))
        p = ctx.Process(target=_child, args=(fn, rank, e, args, kwargs or {}, results), daemon=True)
        p.start()
        procs.append(p)
    got: Dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < nproc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"tandem.run: {nproc - len(got)} of {nproc} processes still running after {timeout} s")
            try:
                rank, ok, value = results.get(timeout=min(left, 0.2))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if i not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise TandemError(f"tandem.run: rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise TandemError(f"tandem.run: rank {rank} failed:\n{value}")
            got[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5 if len(got) == nproc else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        results.join_thread()
    return [got[r] for r in range(nproc)]
