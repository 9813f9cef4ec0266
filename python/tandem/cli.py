"""Tandem's command line from the Python package: the ``tandem`` command and ``python -m tandem``.

    tandem demo --mode allreduce
    python -m tandem certs init job-certs --name 10.0.0.1
    python -m tandem launch --nproc 4 train.py

It is the same CLI as the Rust binary (it runs inside ``tandem._native``), so every subcommand
works from the wheel without a Rust toolchain. Processes a command starts that run ``tandem``
(demo workers, parameter servers, trials) run it through this interpreter.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import List, Optional

from . import _native


def run(args: List[str]) -> int:
    """Runs ``tandem ARGS`` in this process and returns its exit status (no ``sys.exit``)."""
    # Children that run `tandem ...` or a bare `script.py` use this install and this interpreter.
    os.environ.setdefault("TANDEM_CLI", f"{sys.executable} -m tandem")
    os.environ.setdefault("TANDEM_PYTHON", sys.executable)
    sys.stdout.flush()
    sys.stderr.flush()
    return _native.cli_main(["tandem", *args])


def main(argv: Optional[List[str]] = None) -> int:
    """The ``tandem`` console command: runs the CLI with this process's arguments.

    Ctrl-C acts as on the binary: commands that supervise processes (``launch``, ``demo``) stop
    them; the others end at once.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return run(list(sys.argv[1:] if argv is None else argv))
