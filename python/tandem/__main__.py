"""``python -m tandem ...``: the ``tandem`` command (see :mod:`tandem.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
