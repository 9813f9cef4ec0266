"""Seeing inside a running job from Python: metrics, timeline spans and flight-recorder dumps.

Every rank keeps a flight recorder of its last operations (dumped to ``TANDEM_TRACE_DIR`` on a
timeout, an abort, an error and ``SIGUSR1``); ``TANDEM_TIMELINE=DIR`` writes a Chrome trace of every
operation; ``TANDEM_METRICS_ADDR=host:port`` serves Prometheus metrics. ``tandem trace DIR`` merges
the files of every rank and says who waited for whom.

    import tandem

    with tandem.span("forward"):            # on the timeline, when one is written
        loss = model(x)
    tandem.metrics()["tandem_op_seconds_count"]
"""

from __future__ import annotations

import atexit
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from . import _native

__all__ = ["metrics", "metrics_text", "span", "dump_flight_recorder"]

F = TypeVar("F", bound=Callable[..., Any])


def metrics() -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """This process's metrics: ``{name: [(labels, value), ...]}``, the samples a Prometheus scrape
    would read (histograms as their ``_bucket``, ``_sum`` and ``_count`` samples). Empty until the
    process has formed a group, connected a parameter-server client or started a server."""
    # The Prometheus project's own parser reads the text the registry wrote.
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(_native.metrics_text()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def metrics_text() -> str:
    """This process's metrics in the Prometheus text format (what ``TANDEM_METRICS_ADDR`` serves)."""
    return _native.metrics_text()


def dump_flight_recorder(reason: str = "requested from Python") -> Optional[str]:
    """Writes this process's flight recorder now; returns the file's path (``None`` if nothing is
    recorded yet)."""
    return _native.dump_flight_recorder(reason)


class span:
    """Marks a region of your code on the timeline (``TANDEM_TIMELINE=DIR``); costs a clock read
    without one. A context manager or a decorator::

        with tandem.span("data"):
            batch = next(loader)

        @tandem.span("step")
        def step(batch): ...
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a span needs a non-empty name (got {name!r})")
        self.name = name
        self._start = 0

    def __enter__(self) -> "span":
        self._start = time.time_ns() // 1000
        return self

    def __exit__(self, *exc: Any) -> None:
        now = time.time_ns() // 1000
        _native.timeline_span(self.name, self._start, max(0, now - self._start))

    def __call__(self, fn: F) -> F:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with span(self.name):
                return fn(*args, **kwargs)

        return wrapped  # type: ignore[return-value]


atexit.register(_native.timeline_flush)
