"""Exceptions raised by Tandem. Every one is a :class:`TandemError`; each also derives from the
built-in exception a Python programmer would catch for that situation."""

from __future__ import annotations

import builtins

__all__ = [
    "TandemError",
    "ConfigurationError",
    "TimeoutError",
    "PeerLostError",
    "MismatchError",
    "ShapeError",
    "InvalidArgumentError",
    "AuthenticationError",
    "BackendUnavailableError",
    "UnusableError",
    "PreconditionError",
    "PartiallyAppliedError",
    "LeaseExpiredError",
    "TransportError",
]


class TandemError(Exception):
    """Base class of every Tandem error. ``kind`` names the error class on the Rust side."""

    kind: str = "other"


class ConfigurationError(TandemError, ValueError):
    """The job's environment (TF_CONFIG, RANK/WORLD_SIZE, Slurm, TANDEM_*) is missing or contradictory."""


class TimeoutError(TandemError, builtins.TimeoutError):  # noqa: A001 - deliberately mirrors the builtin
    """Something awaited (a peer, a server, the rendezvous) did not happen before its deadline."""


class PeerLostError(TandemError, ConnectionError):
    """A peer process died, stopped answering, or aborted the group; ``rank`` is the rank at
    fault (``None`` when raised by Python code)."""

    rank: int | None = None


class MismatchError(TandemError):
    """Ranks called different collectives (the message names both calls)."""


class InvalidArgumentError(TandemError, ValueError):
    """An argument (or a parameter the server does not know, or a bad gradient) was refused."""


class ShapeError(InvalidArgumentError):
    """A tensor's shape or dtype does not match what the other side expects."""


class AuthenticationError(TandemError, PermissionError):
    """The peer refused the job token (or presented a wrong one)."""


class BackendUnavailableError(TandemError, RuntimeError):
    """The requested backend (e.g. NCCL) cannot be used here."""


class UnusableError(TandemError, RuntimeError):
    """The group or client failed earlier (or was shut down) and cannot be used any more."""


class PreconditionError(TandemError, RuntimeError):
    """A server refused the call because of its state: nothing declared yet, another declaration in
    force, no checkpoint directory."""


class PartiallyAppliedError(TandemError, RuntimeError):
    """Only part of a gradient was applied (the message says exactly which part); pushing it again
    would apply that part twice."""


class LeaseExpiredError(PreconditionError):
    """A parameter server went on without this worker: it was silent past its lease (sync mode) and
    its gradient is for a step already applied without it; nothing was applied. Pull the current
    parameters and push for the server's step to take part again."""


class TransportError(TandemError, ConnectionError):
    """A transport or I/O failure other than a timeout or a lost peer."""
