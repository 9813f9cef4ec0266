"""Keep training when a process is lost (Horovod Elastic's shape).

::

    state = tandem.elastic.State(w=np.zeros(1000, np.float32), step=0)

    @tandem.elastic.run
    def train(state):
        while state.step < 100:
            g = compute_gradient(state.w)
            tandem.allreduce(g, op="avg")      # the current epoch's group is the default one
            state.w -= 0.1 * g
            state.step += 1
            state.commit()                      # cheap: a copy in memory

    train(state)

After ``train`` returns, the last epoch's group stays the default group (``tandem.rank()`` and
collectives keep working for a final save).

When a member is lost, the survivors agree on the next epoch's members through the rendezvous
(at least MIN of ``TANDEM_ELASTIC=MIN[:MAX]``), ``state`` returns to its last commit, every member
takes the most advanced member's commit, the callbacks given with ``reset=`` run (rescale the
learning rate with ``tandem.world_size()``), and ``train`` is called again. A process that starts
later is let in at the members' next ``commit()``. ``tandem launch --nproc N --elastic MIN[:MAX]``
runs such a job (the rendezvous must outlive the processes).
"""

from __future__ import annotations

import copy
import functools
import zlib
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import _native
from .errors import PeerLostError, TimeoutError, TransportError, UnusableError

__all__ = ["State", "run"]

# Errors that mean the group lost or gains a member: the run goes on with a new epoch.
_MEMBERSHIP = (PeerLostError, TransportError, TimeoutError, UnusableError)


class _Regroup(UnusableError):
    """Raised by ``commit()`` on every member when processes wait to join."""


class State:
    """Training state that survives the loss of processes: numpy arrays and Python numbers, read
    and written as attributes. ``commit()`` keeps a copy; ``restore()`` returns to it."""

    def __init__(self, **values: Any) -> None:
        for k, v in values.items():
            if not isinstance(v, (np.ndarray, int, float)) or isinstance(v, bool):
                raise TypeError(f"State value {k!r} is a {type(v).__name__}; give numpy arrays, ints or floats")
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_saved", copy.deepcopy(values))
        object.__setattr__(self, "_commits", 0)
        object.__setattr__(self, "_session", None)
        object.__setattr__(self, "_group", None)

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"State has no value {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"State has no value {name!r}; declare it in State(...)")
        values[name] = value

    @property
    def commits(self) -> int:
        """How many times the state was committed (or caught up with a member that had more)."""
        return int(self._commits)

    def commit(self) -> None:
        """Keeps a copy of the values; inside :func:`run`, lets waiting processes in (every member
        then re-forms the group from this commit)."""
        object.__setattr__(self, "_saved", copy.deepcopy(self._values))
        object.__setattr__(self, "_commits", self._commits + 1)
        session, group = self._session, self._group
        if session is None or group is None:
            return
        # Members look for waiting processes about every 100 ms, at commits agreed when they last
        # looked: between two looks a commit is a copy in memory.
        proposal = session.check_due(self._commits)
        if proposal is None:
            return
        waiting = np.array([1 if session.pending() else 0, min(proposal, 2**31 - 1)], dtype=np.int32)
        group.allreduce(waiting, "max")
        session.check_agreed(self._commits, int(waiting[1]))
        if waiting[0]:
            raise _Regroup(f"processes wait to join; re-forming at commit {self._commits}")

    def restore(self) -> None:
        """Returns to the last commit."""
        object.__setattr__(self, "_values", copy.deepcopy(self._saved))

    def sync(self, group: Any) -> None:
        """Every member of ``group`` takes the committed state of the member with the most
        commits (the lowest rank among them)."""
        if group.world_size == 1:
            return
        most = np.array([self._commits], dtype=np.int64)
        group.allreduce(most, "max")
        root = np.array([group.rank if self._commits == most[0] else np.iinfo(np.int64).max], dtype=np.int64)
        group.allreduce(root, "min")
        r = int(root[0])
        names = sorted(self._saved)
        layout = np.array([zlib.crc32(repr((n, str(np.asarray(self._saved[n]).dtype),
                                            np.shape(self._saved[n]))).encode()) for n in names], dtype=np.int64)
        theirs = layout.copy()
        group.broadcast(theirs, r)
        if not np.array_equal(layout, theirs):
            raise ValueError(f"rank {group.rank}'s State differs from rank {r}'s (names, dtypes or shapes): "
                             "every process must build the same State")
        saved = self._saved
        scalars = np.array([float(saved[n]) for n in names if not isinstance(saved[n], np.ndarray)], dtype=np.float64)
        for n in names:
            if isinstance(saved[n], np.ndarray):
                saved[n] = np.ascontiguousarray(saved[n])
                group.broadcast(saved[n], r)
        if scalars.size:
            group.broadcast(scalars, r)
            it = iter(scalars.tolist())
            for n in names:
                if not isinstance(saved[n], np.ndarray):
                    v = next(it)
                    saved[n] = int(v) if isinstance(saved[n], int) else v
        self._sync_more(group, r)
        object.__setattr__(self, "_commits", int(most[0]))
        self.restore()

    def _sync_more(self, group: Any, root: int) -> None:
        """Subclasses bring their own committed parts from ``root`` here (``TorchState``)."""


def run(fn: Optional[Callable[..., Any]] = None, *, reset: Iterable[Callable[[], None]] = (),
        max_resets: int = 1000) -> Any:
    """Decorates ``fn(state, ...)`` so it survives membership changes (see the module's doc).
    ``reset`` callbacks run after each (re-)formation, when ``tandem.rank()`` and
    ``tandem.world_size()`` already describe the new epoch."""

    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(state: State, *args: Any, **kwargs: Any) -> Any:
            import tandem

            session = _native.ElasticSession()
            resets = 0
            while True:
                try:
                    group = tandem.Group(session.form())
                except _MEMBERSHIP:
                    if session.short or resets >= max_resets:
                        raise
                    resets += 1
                    state.restore()
                    continue
                previous = tandem._default
                tandem._default = group
                object.__setattr__(state, "_session", session)
                object.__setattr__(state, "_group", group)
                try:
                    state.sync(group)
                    session.reset_checks(state._commits)
                    for cb in reset:
                        cb()
                    out = f(state, *args, **kwargs)
                    # The last epoch's group stays the default one, so rank(), world_size() and
                    # collectives still work for the final save (as Horovod keeps hvd.rank()).
                    previous = group
                    return out
                except _MEMBERSHIP as e:
                    if resets >= max_resets:
                        raise
                    resets += 1
                    lost = e.rank if isinstance(e, PeerLostError) else None
                    if lost is not None:
                        session.lost_rank(lost)
                    state.restore()
                finally:
                    tandem._default = previous
                    object.__setattr__(state, "_session", None)
                    object.__setattr__(state, "_group", None)

        return wrapper

    return wrap(fn) if fn is not None else wrap

