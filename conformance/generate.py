"""Make (or verify) the golden trajectory files.

Usage::

    python -m agnosticopt.conformance.generate            # rewrite the files
    python -m agnosticopt.conformance.generate --check    # compare, write nothing
    python -m agnosticopt.conformance.generate --out DIR  # write elsewhere

The files are computed on numpy from the rules' definitions (Optimisers.jl's
arithmetic, see :mod:`agnosticopt._rule`) with inputs built from bits (see
:mod:`agnosticopt.conformance._data`). Regenerate them when a rule's arithmetic
or the case list changes on purpose, and review the diff of ``--check``'s
report. Exit status 1 when ``--check`` finds a difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agnosticopt.conformance._backends import NumpyBackend
from agnosticopt.conformance._cases import CASES
from agnosticopt.conformance._compare import compare
from agnosticopt.conformance._golden import (
    GOLDEN_DTYPES,
    golden_path,
    golden_snapshot,
    golden_trajectory,
    load_golden,
    write_golden,
)

__all__ = ["main"]


def _check(dtype: str) -> list[str]:
    """Differences between the committed file of ``dtype`` and numpy now."""
    problems = []
    _, snaps = load_golden(dtype)
    extra = set(snaps) - {c.name for c in CASES}
    problems += [
        f"{dtype}: the file has a case no longer in CASES: {name}" for name in extra
    ]
    for case in CASES:
        try:
            _, want = golden_snapshot(case, dtype)
        except LookupError as exc:
            problems.append(str(exc))
            continue
        result = compare(
            golden_trajectory(NumpyBackend(), case, dtype, in_place=False), want
        )
        if not result.identical:
            problems.append(f"{dtype} {case.name}: {result.describe()}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the generator; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m agnosticopt.conformance.generate",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the committed files with numpy now; write nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory to write to (default: next to this module)",
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = [p for dtype in GOLDEN_DTYPES for p in _check(dtype)]
        for problem in problems:
            print(problem)
        print("golden files: " + ("DIFFER" if problems else "identical to numpy now"))
        return 1 if problems else 0
    for dtype in GOLDEN_DTYPES:
        path = write_golden(dtype, args.out)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.out is None:
        print(f"(default location: {golden_path(GOLDEN_DTYPES[0]).parent})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
