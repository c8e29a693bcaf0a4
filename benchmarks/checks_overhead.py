"""The per-step cost of ``update_``'s checks on many tiny parameters.

Usage::

    python benchmarks/checks_overhead.py [--leaves 200] [--size 16] [--rounds 200]

Times one ``update_`` of ``--leaves`` parameters of ``--size`` float32 elements with
Adam (numpy and CPU torch; the compiled fast path on and off) and prints the
fastest of ``--rounds`` steps, in microseconds per step and per leaf. Tiny
parameters make the step's fixed costs (walks, state and step checks, memory
overlap checks) the whole of its time; run it on two versions to see what the
checks cost.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

import agnosticopt as opt


def _model(kind: str, leaves: int, size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    rng = np.random.default_rng(0)
    arrays = {
        f"w{i}": rng.standard_normal(size).astype(np.float32) for i in range(leaves)
    }
    grads = {k: rng.standard_normal(size).astype(np.float32) for k in arrays}
    if kind == "torch":
        import torch

        return (
            {k: torch.from_numpy(v) for k, v in arrays.items()},
            {k: torch.from_numpy(v) for k, v in grads.items()},
        )
    return arrays, grads


def measure(kind: str, fast: bool, leaves: int, rounds: int, size: int = 16) -> float:
    """The fastest of ``rounds`` ``update_`` steps, in seconds (robust to a busy machine)."""
    model, grads = _model(kind, leaves, size)
    tree = opt.setup(opt.Adam(), model)
    previous = opt.set_fast_path(fast)
    try:
        for _ in range(10):  # warm up (fast path: compile)
            opt.update_(tree, model, grads)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            opt.update_(tree, model, grads)
            times.append(time.perf_counter() - start)
    finally:
        opt.set_fast_path(previous)
    return min(times)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="elements per parameter")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    for kind in ("numpy", "torch"):
        for fast in (False, True):
            t = measure(kind, fast, args.leaves, args.rounds, args.size)
            path = "fast" if fast else "plain"
            print(
                f"{kind:6} {path:6} {t * 1e6:9.0f} us/step {t * 1e6 / args.leaves:7.2f} us/leaf"
            )


if __name__ == "__main__":
    main()
