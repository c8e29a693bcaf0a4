"""The conformance trajectories on 2 forced JAX host devices (run by test_conformance_sharded).

``python tests/_jax_sharded_conformance.py OUT STEPS SIZES CASE ...``: runs the
trajectory of each case (``update_``, normal data) in float32 and float64, for
each of the comma-separated ``SIZES`` (even: split over the devices; odd:
replicated), on :class:`JaxShardedBackend` and pickles
``{"snapshots": {(case, dtype, size): snapshot},
"specs": [...], "devices": n}`` to ``OUT``; the parent compares with numpy.
"""

from __future__ import annotations

import os
import pickle
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_ENABLE_X64"] = "1"

import jax
from agnosticopt.conformance._jax_sharded import JaxShardedBackend

from agnosticopt import conformance as c


def main(out: str, steps: int, sizes: list[int], names: list[str]) -> None:
    backend = JaxShardedBackend()
    reason = backend.unavailable()
    if reason:
        raise SystemExit(reason)
    snapshots = {}
    for name in names:
        for dtype in ("float32", "float64"):
            for size in sizes:
                case = c.case_named(name)
                snapshots[name, dtype, size] = c.run_trajectory(
                    backend, case.rule, dtype, "normal", steps=steps, size=size
                )
    with open(out, "wb") as f:
        pickle.dump(
            {
                "snapshots": snapshots,
                "specs": sorted(backend.seen),
                "devices": len(jax.devices()),
            },
            f,
        )


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        [int(n) for n in sys.argv[3].split(",")],
        sys.argv[4:],
    )
