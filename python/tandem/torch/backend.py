"""The ``"tandem"`` backend of ``torch.distributed``.

``import tandem.torch`` registers it; ``torch.distributed.init_process_group("tandem")`` then forms
a Tandem group through the Store torch hands the backend (torchrun's agent store, a PyTorchJob's
``MASTER_ADDR``/``MASTER_PORT``, ``tcp://`` or ``file://``): rank 0 hosts Tandem's rendezvous on
an ephemeral port and publishes its address in that store, so no second port and no extra variable
is needed. On one machine rank 0 also makes the job token; across machines ``TANDEM_JOB_TOKEN`` and
the job's certificates are needed as for any Tandem job.

Every operation runs, in the order it was issued, on one worker thread per group, so
``async_op=True`` returns at once and the Work's future completes from Tandem's side when the
bytes have moved (DDP's communication hooks chain on it). Point-to-point operations are held until
something waits on them or a collective follows, then run together in an order that cannot
deadlock (``batch_isend_irecv``). Contiguous CPU tensors are reduced in place without a copy;
other tensors are staged through a contiguous copy and written back.
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

from .. import _native
from ..errors import TandemError
from . import _cuda, _ops
from ._async import Worker

BACKEND = "tandem"

_OPS = {
    dist.ReduceOp.SUM: "sum",
    dist.ReduceOp.AVG: "avg",
    dist.ReduceOp.MIN: "min",
    dist.ReduceOp.MAX: "max",
    dist.ReduceOp.PRODUCT: "prod",
}


def _op_name(op: Any) -> str:
    for k, v in _OPS.items():
        if op == k:
            return v
    raise ValueError(f"reduce op {op} is not supported by the tandem backend (SUM, AVG, MIN, MAX, PRODUCT are)")


def _as_dist_error(e: BaseException) -> BaseException:
    """Tandem's error as torch's kind: DistBackendError carrying Tandem's message (the culprit,
    the mismatched calls); a timeout as torch's DistTimeoutError where torch has it."""
    if isinstance(e, TandemError):
        cls = dist.DistBackendError
        if type(e).__name__ == "TimeoutError" and hasattr(dist, "DistTimeoutError"):
            cls = dist.DistTimeoutError
        err = cls(f"tandem: {e}")
        err.__cause__ = e
        return err
    return e


def _cuda_devices(outputs: Any) -> List[torch.device]:
    """The CUDA devices of the tensors in ``outputs`` (a tensor, or lists of them, nested)."""
    found: List[torch.device] = []
    stack = [outputs]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            if item.is_cuda and item.device not in found:
                found.append(item.device)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return found


class _Work(dist._Work):
    """A queued operation: ``wait()`` blocks until the worker thread ran it; ``get_future()``
    completes with the output tensors from that thread."""

    def __init__(self, outputs: Any, flush: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self._outputs = outputs
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        # A future that completes with CUDA tensors must name their devices (torch checks).
        devices = _cuda_devices(outputs)
        self._future: torch.futures.Future = torch.futures.Future(devices=devices) if devices else torch.futures.Future()
        self._flush = flush

    def _finish(self, error: Optional[BaseException]) -> None:
        self._error = error
        self._done.set()
        if error is None:
            self._future.set_result(self._outputs)
        else:
            self._future.set_exception(error)

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        if self._flush is not None:
            self._flush()
        secs = timeout.total_seconds() if timeout else 0.0
        if not self._done.wait(secs if secs > 0 else None):
            raise dist.DistBackendError(f"tandem: operation not finished within {secs}s")
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> Optional[BaseException]:
        return self._error

    def get_future(self) -> torch.futures.Future:
        if self._flush is not None:
            self._flush()
        return self._future

    def result(self) -> Any:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return -1

    def synchronize(self) -> None:
        pass


class _Worker:
    """One thread running a group's operations in the order they were issued."""

    def __init__(self, name: str) -> None:
        self._thread = Worker(f"tandem-torch-{name}")

    def submit(self, fn: Callable[[], None], work: _Work) -> _Work:
        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                work._finish(_as_dist_error(e))
            else:
                work._finish(None)

        if self._thread.is_current():
            # Issued by a callback of a finished operation's future (PowerSGD's hook chains
            # collectives so, and waits on them): run now, before anything queued. Every rank does
            # the same right after the same operation, so the order stays one order.
            run()
        else:
            self._thread.submit(run)
        return work

    def drain(self) -> None:
        self._thread.drain()

    def stop(self) -> None:
        self._thread.stop()


class _StoreBoard:
    """torch's Store as the board rank 0 publishes Tandem's rendezvous on."""

    def __init__(self, store: Any, key: str) -> None:
        self._store = store
        self._key = key

    def describe(self) -> str:
        return f"torch's store (key {self._key})"

    def publish(self, data: bytes, timeout: float) -> None:
        self._store.set(self._key, data)

    def lookup(self, timeout: float) -> bytes:
        self._store.wait([self._key], timedelta(seconds=timeout))
        return bytes(self._store.get(self._key))


def _machine_id() -> str:
    """This machine's identity as seen from the network: the kernel's boot id and this process's
    network namespace (simulated hosts share a kernel but not a loopback)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id", "/etc/machine-id"):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
            break
        except OSError:
            continue
    if not parts:
        import socket

        parts.append(socket.gethostname())
    try:
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def _store_host(store: Any) -> Optional[str]:
    """The host of the TCPStore under ``store`` (through PrefixStores), to route towards."""
    seen = 0
    while store is not None and seen < 16:
        host = getattr(store, "host", None)
        if isinstance(host, str) and host:
            return f"{host}:{getattr(store, 'port', 1) or 1}"
        store = getattr(store, "underlying_store", None)
        seen += 1
    addr = os.environ.get("MASTER_ADDR")
    return f"{addr}:{os.environ.get('MASTER_PORT', '1')}" if addr else None


def _form(store: Any, rank: int, size: int, timeout: timedelta, name: str) -> "_native.ProcessGroup":
    """Forms the native group ``name`` through ``store`` (already prefixed by torch for this
    group). The name must be the same on every member: torch's group name is."""
    secs = max(timeout.total_seconds(), 1.0)
    store.set(f"tandem/machine/{rank}", _machine_id())
    one_machine = True
    if rank == 0:
        keys = [f"tandem/machine/{r}" for r in range(size)]
        store.wait(keys, timeout)
        mine = _machine_id()
        one_machine = all(bytes(store.get(k)).decode() == mine for k in keys)
    # The launcher's local rank describes the whole job; a subgroup only knows its own size.
    local_rank, local_size = 0, 1
    if os.environ.get("WORLD_SIZE") == str(size):
        try:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_rank, local_size = 0, 1
        if not 0 <= local_rank < local_size <= size:
            local_rank, local_size = 0, 1
    return _native.ProcessGroup.from_board(
        rank,
        size,
        _StoreBoard(store, "tandem/rendezvous"),
        one_machine,
        name,
        towards=_store_host(store),
        local_rank=local_rank,
        local_world_size=local_size,
        timeout=secs,
        connect_timeout=secs,
    )


class TandemProcessGroup(dist.ProcessGroup):
    """The ``"tandem"`` backend: torch.distributed's collectives on a Tandem group."""

    def __init__(self, store: Any, rank: int, size: int, timeout: timedelta, name: str = "") -> None:
        super().__init__(rank, size)
        self._rank, self._size = rank, size
        if name:
            self._set_group_name(name)
        try:
            self._pg = _form(store, rank, size, timeout, f"torch-{name or 'default'}")
        except TandemError as e:
            raise _as_dist_error(e) from e
        self._worker = _Worker(str(rank))
        self._p2p: List[tuple] = []
        self._p2p_lock = threading.Lock()

    # -- plumbing -----------------------------------------------------------------------------

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND

    #: torch asks the backend whether it coalesces point-to-point batches; this one orders them
    #: itself (see the module's doc).
    supports_coalescing = False

    def _get_backend(self, device: Any = None) -> "TandemProcessGroup":
        # This process group is its own backend for every device it serves.
        return self

    # torch keeps a group's name in its backends; this group is its own backend.
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_name(self) -> str:
        return getattr(self, "_group_name", "")

    @property
    def native(self) -> "_native.ProcessGroup":
        """The Tandem group underneath (for Tandem's own API)."""
        return self._pg

    def _run(self, outputs: Any, fn: Callable[[], None], opts: Any = None) -> _Work:
        self._flush_p2p()
        if opts is not None and getattr(opts, "asyncOp", True) is False:
            # A blocking call: run it here once what was queued before has run (two thread
            # hand-offs less per call; the order every rank sees is the same).
            self._worker.drain()
            work = _Work(outputs)
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - raised by wait()
                work._finish(_as_dist_error(e))
            else:
                work._finish(None)
            return work
        return self._worker.submit(fn, _Work(outputs))

    def _flush_p2p(self) -> None:
        with self._p2p_lock:
            batch, self._p2p = self._p2p, []
        if not batch:
            return
        works = [w for (_, _, _, w) in batch]

        def run() -> None:
            err: Optional[BaseException] = None
            for kind, peer, tensor, work in _ops.p2p_order(self._rank, batch):
                if err is None:
                    try:
                        if kind == "send":
                            _ops.send(self._pg, tensor, peer)
                        else:
                            _ops.recv(self._pg, tensor, peer)
                    except BaseException as e:  # noqa: BLE001
                        err = _as_dist_error(e)
                work._finish(err)

        carrier = _Work(None)
        self._worker.submit(run, carrier)
        del works

    def _queue_p2p(self, kind: str, tensor: torch.Tensor, peer: int) -> _Work:
        _ops.check_peer(peer, self._size, self._rank)
        work = _Work([tensor], flush=self._flush_p2p)
        with self._p2p_lock:
            self._p2p.append((kind, peer, tensor, work))
        return work

    # -- collectives --------------------------------------------------------------------------

    def allreduce(self, tensors: Sequence[torch.Tensor], opts: Any = None) -> _Work:
        op = _op_name(opts.reduceOp if opts is not None else dist.ReduceOp.SUM)
        tensors = list(tensors)
        return self._run(tensors, lambda: [_ops.allreduce(self._pg, t, op) for t in tensors], opts)

    def allreduce_coalesced(self, tensors: Sequence[torch.Tensor], opts: Any = None) -> _Work:
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: Sequence[torch.Tensor], opts: Any = None) -> _Work:
        root = opts.rootRank if opts is not None else 0
        _ops.check_peer(root, self._size, None)
        tensors = list(tensors)
        return self._run(tensors, lambda: [_ops.broadcast(self._pg, t, root) for t in tensors], opts)

    def reduce(self, tensors: Sequence[torch.Tensor], opts: Any = None) -> _Work:
        op = _op_name(opts.reduceOp)
        root = opts.rootRank
        _ops.check_peer(root, self._size, None)
        tensors = list(tensors)
        return self._run(tensors, lambda: [_ops.reduce(self._pg, t, op, root) for t in tensors], opts)

    def allgather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        _ops.check_lists("all_gather", outputs, inputs, self._size)
        return self._run(outputs, lambda: [_ops.allgather(self._pg, o, i) for o, i in zip(outputs, inputs)], opts)

    def allgather_coalesced(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        return self.allgather(outputs, inputs, opts)

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        _ops.check_numel("all_gather_into_tensor", output, input.numel() * self._size)
        return self._run([output], lambda: _ops.allgather_flat(self._pg, output, input), opts)

    def allgather_into_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        for o, i in zip(outputs, inputs):
            _ops.check_numel("all_gather_into_tensor", o, i.numel() * self._size)
        return self._run(outputs, lambda: [_ops.allgather_flat(self._pg, o, i) for o, i in zip(outputs, inputs)], opts)

    def reduce_scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None) -> _Work:
        op = _op_name(opts.reduceOp)
        _ops.check_lists("reduce_scatter", inputs, outputs, self._size)
        return self._run(outputs, lambda: [_ops.reduce_scatter(self._pg, o, i, op, self._rank) for o, i in zip(outputs, inputs)], opts)

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        op = _op_name(opts.reduceOp)
        _ops.check_numel("reduce_scatter_tensor", input, output.numel() * self._size)
        return self._run([output], lambda: _ops.reduce_scatter_flat(self._pg, output, input, op, self._rank), opts)

    def reduce_scatter_tensor_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        op = _op_name(opts.reduceOp)
        for o, i in zip(outputs, inputs):
            _ops.check_numel("reduce_scatter_tensor", i, o.numel() * self._size)
        return self._run(outputs, lambda: [_ops.reduce_scatter_flat(self._pg, o, i, op, self._rank) for o, i in zip(outputs, inputs)], opts)

    def gather(self, outputs: List[List[torch.Tensor]], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        root = opts.rootRank
        _ops.check_peer(root, self._size, None)
        if self._rank == root:
            _ops.check_lists("gather", outputs, inputs, self._size)
        return self._run(outputs, lambda: _ops.gather(self._pg, outputs, inputs[0], root, self._rank, self._size), opts)

    def scatter(self, outputs: List[torch.Tensor], inputs: List[List[torch.Tensor]], opts: Any = None) -> _Work:
        root = opts.rootRank
        _ops.check_peer(root, self._size, None)
        if self._rank == root:
            _ops.check_lists("scatter", inputs, outputs, self._size)
        return self._run(outputs, lambda: _ops.scatter(self._pg, outputs[0], inputs, root, self._rank, self._size), opts)

    def alltoall(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        if len(outputs) != self._size or len(inputs) != self._size:
            raise ValueError(
                f"all_to_all needs {self._size} input and output tensors, got {len(inputs)} and {len(outputs)}"
            )
        return self._run(outputs, lambda: _ops.alltoall(self._pg, outputs, inputs, self._rank, self._size), opts)

    def alltoall_base(self, output: torch.Tensor, input: torch.Tensor, output_splits: List[int], input_splits: List[int], opts: Any = None) -> _Work:
        outs = _ops.split(output, output_splits, self._size, "output")
        ins = _ops.split(input, input_splits, self._size, "input")
        return self._run([output], lambda: _ops.alltoall(self._pg, outs, ins, self._rank, self._size), opts)

    # torch 2.10 and later name the single-tensor forms so.
    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        return self._allgather_base(output, input, opts)

    def all_gather_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        return self.allgather_into_tensor_coalesced(outputs, inputs, opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        return self._reduce_scatter_base(output, input, opts)

    def reduce_scatter_single_coalesced(self, outputs: List[torch.Tensor], inputs: List[torch.Tensor], opts: Any = None) -> _Work:
        return self.reduce_scatter_tensor_coalesced(outputs, inputs, opts)

    def gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        root = opts.rootRank
        _ops.check_peer(root, self._size, None)
        outs = [[]]
        if self._rank == root:
            _ops.check_numel("gather", output, input.numel() * self._size)
            outs = [list(output.reshape(-1).chunk(self._size)) if input.numel() else [output] * self._size]
        return self._run([output], lambda: _ops.gather(self._pg, outs, input, root, self._rank, self._size), opts)

    def gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> _Work:
        return self.gather_single(output, input, opts)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor, output_splits: List[int], input_splits: List[int], opts: Any = None) -> _Work:
        return self.alltoall_base(output, input, output_splits, input_splits, opts)

    def barrier(self, opts: Any = None) -> _Work:
        return self._run([], lambda: self._pg.barrier(None), opts)

    def send(self, tensors: List[torch.Tensor], dst: int, tag: int = 0) -> _Work:
        return self._queue_p2p("send", tensors[0], dst)

    def recv(self, tensors: List[torch.Tensor], src: int, tag: int = 0) -> _Work:
        return self._queue_p2p("recv", tensors[0], src)

    def recv_anysource(self, tensors: List[torch.Tensor], tag: int = 0) -> _Work:
        raise ValueError("the tandem backend cannot receive from any source; name the sending rank")

    def shutdown(self) -> None:
        self._flush_p2p()
        self._worker.stop()
        _cuda.forget(self._pg)


def _create(opts: Any, backend_options: Any = None) -> TandemProcessGroup:
    """torch's extended creator interface: the store, rank, size, timeout and the group's name."""
    # The group's name is the same on every member; DeviceMesh (FSDP2) and torch's functional
    # collectives look it up, and it names the native group.
    name = str(getattr(opts, "group_id", "") or "")
    return TandemProcessGroup(opts.store, opts.group_rank, opts.group_size, opts.timeout, name)


def register() -> None:
    """Registers the backend ``"tandem"`` with torch.distributed (idempotent), for CPU tensors
    and CUDA tensors (NCCL through Tandem's nccl build; other builds refuse CUDA tensors, saying
    so). One backend object serves both: torch makes it once when every device names it."""
    if getattr(dist.Backend, BACKEND.upper(), None) is not None:
        return
    dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu", "cuda"])


__all__ = ["TandemProcessGroup", "register", "BACKEND"]

