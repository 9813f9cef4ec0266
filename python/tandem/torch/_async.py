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
    """One thread running the ``_async`` calls in the order they were made (so every process
    issues them in the same order)."""

    def __init__(self) -> None:
        self._q: "queue.Queue[Any]" = queue.Queue()
        threading.Thread(target=self._loop, name="tandem-torch-async", daemon=True).start()

    def submit(self, fn: Any) -> None:
        self._q.put(fn)

    def _loop(self) -> None:
        while True:
            self._q.get()()


_worker: Optional[Worker] = None
_worker_lock = threading.Lock()


def worker() -> Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = Worker()
        return _worker
