"""``python -m tandem.launch``: start a job on this machine, exactly like ``tandem launch``.

    python -m tandem.launch --nproc 4 train.py ARGS                 # allreduce job
    python -m tandem.launch --ps 2 --workers 4 train.py              # parameter-server job (TF_CONFIG)

A plain script path after the options is run with this Python interpreter. In a parameter-server job
the servers run ``python -m tandem.ps`` unless ``--ps-cmd`` says otherwise (``tandem launch`` runs the
same program everywhere, TensorFlow style). Every process gets the
environment a Kubeflow job would inject plus a job token; logs are prefixed with role and rank and
written to ``tandem-logs/``. Ctrl-C stops every process.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from . import _native


def _argv(args: List[str]) -> List[str]:
    """Inserts ``--`` and the interpreter before a bare script path, so ``launch --nproc 2 t.py`` works."""
    if "--" in args:
        return args
    takes_value = {"--nproc", "--ps", "--workers", "--ps-cmd", "--log-dir", "--restart", "--max-restarts",
                   "--timeout", "--env"}
    i = 0
    while i < len(args):
        a = args[i]
        if a in takes_value:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        cmd = args[i:]
        if cmd[0].endswith(".py"):
            cmd = [sys.executable, *cmd]
        return [*args[:i], "--", *cmd]
    return args


def _with_servers(args: List[str]) -> List[str]:
    """Adds ``--ps-cmd "<python> -m tandem.ps"`` to a parameter-server job that names no server command."""
    head = args[: args.index("--")] if "--" in args else args
    if "--ps" in head and "--ps-cmd" not in head:
        return ["--ps-cmd", f"{sys.executable} -m tandem.ps", *args]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the launcher and returns its exit code."""
    return _native.launch_main(_with_servers(_argv(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    sys.exit(main())
