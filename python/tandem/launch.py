"""``python -m tandem.launch``: start a job on this machine, exactly like ``tandem launch``.

    python -m tandem.launch --nproc 4 train.py ARGS                 # allreduce job
    python -m tandem.launch --ps 2 --workers 4 train.py              # parameter-server job (TF_CONFIG)

The options are those of ``tandem launch`` (the same parser: ``tandem launch --help``). A script
path after the options is run with this Python interpreter. In a parameter-server job the servers
run ``python -m tandem.ps`` unless ``--ps-cmd`` says otherwise (``tandem launch`` runs the same
program everywhere, TensorFlow style). Every process gets the environment a Kubeflow job would
inject plus a job token; logs are prefixed with role and rank and written to ``tandem-logs/``.
Ctrl-C stops every process.
"""

from __future__ import annotations

import signal
import sys
from typing import List, Optional

from . import cli


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the launcher with ``argv`` (default: this process's arguments); returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if argv is None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return cli.run(["launch", "--default-ps-cmd", f"{sys.executable} -m tandem.ps", *args])


if __name__ == "__main__":
    sys.exit(main())
