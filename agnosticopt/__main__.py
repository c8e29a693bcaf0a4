"""``python -m agnosticopt``: the command line (:mod:`agnosticopt.conformance._cli`)."""

import sys

from agnosticopt.conformance._cli import main

if __name__ == "__main__":
    sys.exit(main())
