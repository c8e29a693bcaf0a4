"""The conformance suite on DTensors over ranks (run as a script by test_dtensor).

``python tests/dtensor_conformance.py WORLD RANK PORT OUT STEPS [CASE ...]``:
every rank runs :func:`check_trajectory` and :func:`check_update_matches_update_`
of the cases (all when none is named) in float32 and float64 on
:class:`DTensorBackend`, ``STEPS`` steps of the suite's 131,089 elements (uneven
shards); rank 0 saves the names of the checks that ran, the failures and the
cases of which some leaf took the compiled fast path.
"""

from __future__ import annotations

import sys

import numpy as np
from _gloo import gloo_group
from agnosticopt.conformance._dtensor import DTensorBackend

from agnosticopt import conformance as c


def main(
    world: int, rank: int, port: int, out: str, steps: int, names: list[str]
) -> None:
    with gloo_group(world, rank, port, timeout_s=120):
        from agnosticopt.adapters import _fast

        backend = DTensorBackend()
        cases = [c.case_named(n) for n in names] if names else list(c.CASES)
        ran, failures, fast = [], [], []
        for case in cases:
            before = _fast.counters["fast"]
            for dtype in ("float32", "float64"):
                for check in (c.check_trajectory, c.check_update_matches_update_):
                    kwargs = {"steps": steps} if check is c.check_trajectory else {}
                    try:
                        check(backend, case, dtype, **kwargs)
                    except c.ConformanceError as exc:
                        failures.append(f"{check.__name__} {case.name} {dtype}: {exc}")
                    ran.append(f"{check.__name__} {case.name} {dtype}")
            if _fast.counters["fast"] > before:  # some leaf took the fast path
                fast.append(case.name)
        if rank == 0:
            np.savez(
                out,
                ran=np.array(ran),
                failures=np.array(failures, dtype=str),
                fast=np.array(fast, dtype=str),
            )


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        int(sys.argv[5]),
        sys.argv[6:],
    )
