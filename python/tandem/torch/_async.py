"""The ``_async`` calls of Horovod's API: each runs on one thread per process, in the order made,
so every process issues its collectives in the same order; the handle is waited on with
``synchronize`` or checked with ``poll``."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional


class Handle:
    """What the ``_async`` calls return: pass it to :func:`synchronize` or :func:`poll`."""

    def __init__(self, fn: Callable[[], Any], on: Optional["Worker"] = None) -> None:
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._done = threading.Event()

        def run() -> None:
            try:
                self._result = fn()
            except BaseException as e:  # noqa: BLE001 - raised by synchronize
                self._error = e
            finally:
                self._done.set()

        (on or worker()).submit(run)

    def poll(self) -> bool:
        return self._done.is_set()

    def wait(self) -> Any:
        while not self._done.wait(0.1):
            pass
        if self._error is not None:
            raise self._error
        return self._result


class Worker:
    """One thread running calls in the order they were submitted.

    It is not a daemon: when the main thread ends, it finishes what was queued (every call has a
    deadline) and then exits, so no call is cut off while it completes a torch future (a daemon
    thread stopped there aborts the interpreter)."""

    def __init__(self, name: str = "tandem-torch-async") -> None:
        self._q: "queue.Queue[Any]" = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=False)
        self._thread.start()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._idle:
            self._pending += 1
        self._q.put(fn)

    def is_current(self) -> bool:
        """Whether the caller runs on this worker's thread."""
        return threading.current_thread() is self._thread

    def drain(self) -> None:
        """Returns once every call submitted before has run (at once on the worker's own thread)."""
        if self.is_current():
            return
        with self._idle:
            while self._pending:
                self._idle.wait()

    def stop(self) -> None:
        """Ends the thread once what was queued before has run."""
        self._q.put(None)

    def _loop(self) -> None:
        main = threading.main_thread()
        while True:
            try:
                fn = self._q.get(timeout=0.2)
            except queue.Empty:
                if not main.is_alive():
                    return
                continue
            if fn is None:
                return
            try:
                fn()
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()


_worker: Optional[Worker] = None
_worker_lock = threading.Lock()


def worker() -> Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = Worker()
        return _worker
