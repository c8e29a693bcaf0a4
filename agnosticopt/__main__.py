"""``python -m agnosticopt``: the command line (see :mod:`agnosticopt._cli`)."""

import sys

from agnosticopt._cli import main

if __name__ == "__main__":
    sys.exit(main())
