"""What recording each step once and the short way save: the fast path's Python cost.

Usage::

    python benchmarks/record_once.py [--rounds 200] [--sets resnet tiny] [--threads 1]

Four ways of one ``update_``, the same bits, side by side in one run (:data:`PATHS`):
*plain* (no fast path); *each step* (the fast path with ``RECORD_ONCE`` off,
``adapters/_fast.py``: every step of every group of leaves recorded anew with
its host values and no plan kept, as before steps were recorded once); *full
way* (recorded once, the plan kept, but every update walks and checks every leaf:
``SHORT_WAY`` off in ``agnosticopt/_replay.py``); *short way* (the default: the
next update of the same tree on the same arrays runs the kept plan without the
walk). It prints:

- the Python cost per leaf per step: one ``update_`` of ``--leaves`` float32
  arrays of ``--size`` elements with Adam, numpy and torch (fastest of
  ``--rounds`` steps, the four interleaved step by step, so that a machine that
  gets busier slows them alike);
- one 10×10 array (and one of a single element): the four, fastest and median
  step (the fast path must never be slower than the plain one);
- per-array trees of the benchmark's sets (``benchmarks/_harness.py``: *resnet*,
  the 62 arrays of ResNet-18, and *tiny*, 200 arrays of 32×32) with Adam, against
  ``torch.optim.Adam(fused=True)``, the three fast ways;
- the first step of a new model (ResNet-18's arrays, Adam, fast path) in a new
  process: with an empty kernel cache (``AGNOSTICOPT_CACHE_DIR`` an empty
  folder: every kernel generated and compiled) and then warm (the same folder
  again: compiled kernels loaded from it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import _harness
import numpy as np
from agnosticopt.adapters import _fast

import agnosticopt as opt
from agnosticopt import _replay

#: The ways measured side by side: (label, fast path on, record once, short way).
PATHS = (
    ("plain", False, True, True),
    ("each step", True, False, False),
    ("full way", True, True, False),
    ("short way", True, True, True),
)
FAST = [path for path in PATHS if path[1]]


def _model(kind: str, shapes: list[tuple[int, ...]]) -> tuple[list[Any], list[Any]]:
    rng = np.random.default_rng(0)
    model: list[Any] = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads: list[Any] = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if kind == "torch":
        import torch

        model = [torch.nn.Parameter(torch.from_numpy(p)) for p in model]
        grads = [torch.from_numpy(g) for g in grads]
    return model, grads


def _stepper(kind: str, shapes: list[tuple[int, ...]], path: tuple[Any, ...]) -> Any:
    """One ``update_`` of a fresh Adam tree on ``shapes``, the way ``path`` says."""
    model, grads = _model(kind, shapes)
    tree = opt.setup(opt.Adam(), model)

    def update() -> None:
        opt.update_(tree, model, grads)

    return _switched(update, path)


def _switched(step: Callable[[], Any], path: tuple[Any, ...]) -> Callable[[], None]:
    """``step`` with the switches of ``path`` set while it runs."""
    _, fast, once, short = path

    def run() -> None:
        previous = opt.set_fast_path(fast)
        _fast.RECORD_ONCE, _replay.SHORT_WAY = once, short
        try:
            step()
        finally:
            opt.set_fast_path(previous)
            _fast.RECORD_ONCE = _replay.SHORT_WAY = True

    return run


def interleaved(
    kind: str, shapes: list[tuple[int, ...]], rounds: int
) -> dict[str, list[float]]:
    """Step times (seconds) of each of :data:`PATHS`, one step of each per round."""
    steps = {path[0]: _stepper(kind, shapes, path) for path in PATHS}
    for step in steps.values():
        for _ in range(10):  # warm up: compile, record, keep the plan
            step()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(rounds):
        for label, step in steps.items():
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)
    return times


def per_leaf(leaves: int, size: int, rounds: int) -> None:
    """Print the Python cost per leaf per step."""
    print(
        f"Python cost of one update_ of {leaves} float32 arrays of {size} elements, "
        f"Adam (fastest of {rounds} steps, us per leaf):"
    )
    print(f"| backend | {' | '.join(p[0] for p in PATHS)} | short / each step |")
    print("|---" * (len(PATHS) + 2) + "|")
    for kind in ("numpy", "torch"):
        best = {
            k: min(v) * 1e6 / leaves
            for k, v in interleaved(kind, [(size,)] * leaves, rounds).items()
        }
        cells = " | ".join(f"{best[p[0]]:.1f}" for p in PATHS)
        ratio = best["short way"] / best["each step"]
        print(f"| {kind} | {cells} | {ratio:.2f}× |")


def one_array(rounds: int) -> None:
    """Print one small array's step on each path."""
    print()
    print(
        f"One array, Adam: fastest / median of {rounds} steps in us "
        "(the fast path must not be slower than plain):"
    )
    print(f"| backend | shape | {' | '.join(p[0] for p in PATHS)} |")
    print("|---" * (len(PATHS) + 2) + "|")
    for kind in ("numpy", "torch"):
        for shape in ((10, 10), (1,)):
            times = interleaved(kind, [shape], rounds)
            cells = [
                f"{min(times[p[0]]) * 1e6:.0f} / {statistics.median(times[p[0]]) * 1e6:.0f}"
                for p in PATHS
            ]
            print(f"| {kind} | {'×'.join(map(str, shape))} | {' | '.join(cells)} |")


def trees(sets: list[str], rounds: int) -> None:
    """Print the benchmark's per-array trees against torch fused Adam, each fast way.

    The steps are ``benchmarks/_harness.py``'s; each fast way is a tree of its
    own, stepped in the same rounds as torch's fused step.
    """
    print()
    print(
        f"Per-array trees, Adam, median of {rounds} steps (the fast ways and torch "
        "fused interleaved), ratio to torch.optim.Adam(fused=True):"
    )
    labels = [f"{kind} {p[0]}" for kind in ("numpy", "torch") for p in FAST]
    print(f"| set | {' | '.join(labels)} | torch fused |")
    print("|---" * (len(labels) + 2) + "|")
    for name in sets:
        shapes = _harness.SETS[name]
        live: dict[str, Callable[[], Any]] = {}
        for path in FAST:
            made = _harness.steps(("numpy fast", "torch fast"), "Adam", shapes)
            for impl, step in made.items():
                assert step is not None
                live[f"{impl.split()[0]} {path[0]}"] = _switched(step, path)
        fused = _harness.steps(("torch fused",), "Adam", shapes)["torch fused"]
        assert fused is not None
        live["torch fused"] = fused
        for step in live.values():
            for _ in range(3):
                step()
        times: dict[str, list[float]] = {k: [] for k in live}
        for _ in range(rounds):
            for label, step in live.items():
                start = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - start)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        reference = ms["torch fused"]
        cells = [f"{ms[k]:.2f} ms ({ms[k] / reference:.2f}×)" for k in labels]
        print(f"| {name} | {' | '.join(cells)} | {reference:.2f} ms |")
        sys.stdout.flush()


#: The child process of :func:`first_step`: the time of the first ``update_``.
FIRST_STEP = """
import sys, time
sys.path.insert(0, {here!r})
import _harness, record_once
import agnosticopt as opt
from agnosticopt.adapters import _fast
_fast.RECORD_ONCE = {once!r}
model, grads = record_once._model({kind!r}, _harness.SETS["resnet"])
tree = opt.setup(opt.Adam(), model)
start = time.perf_counter()
opt.update_(tree, model, grads)
print(time.perf_counter() - start)
"""


def _first(kind: str, folder: str, once: bool) -> float:
    code = FIRST_STEP.format(
        here=os.path.dirname(os.path.abspath(__file__)), kind=kind, once=once
    )
    env = dict(os.environ, AGNOSTICOPT_CACHE_DIR=folder)
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.split()[-1])


def first_step(repeats: int = 3) -> None:
    """Print the first step of a new model, empty kernel cache and warm."""
    print()
    print(
        "First update_ of a new model (ResNet-18's 62 arrays, Adam, fast path) in a "
        f"new process, median of {repeats} processes, seconds (numba's first "
        "compilation or load inside it):"
    )
    print("| backend | record once | empty cache | warm cache |")
    print("|---|---|---|---|")
    for kind in ("numpy", "torch"):
        for once in (False, True):
            empty, warm = [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as folder:
                    empty.append(_first(kind, folder, once))
                    warm.append(_first(kind, folder, once))
            label = "on (after)" if once else "off (before)"
            print(
                f"| {kind} | {label} | {statistics.median(empty):.2f} | "
                f"{statistics.median(warm):.2f} |"
            )


def main(argv: list[str] | None = None) -> int:
    """Run every measurement; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leaves", type=int, default=200)
    parser.add_argument("--size", type=int, default=16, help="elements per array")
    parser.add_argument("--rounds", type=int, default=200, help="small-array steps")
    parser.add_argument(
        "--sets", nargs="*", default=["resnet", "tiny"], choices=list(_harness.SETS)
    )
    parser.add_argument("--tree-rounds", type=int, default=21, help="steps per set")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for torch and for agnosticopt's kernels (0: defaults)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        _harness.set_threads(args.threads)
    print(f"machine: {_harness.machine()}", flush=True)
    print()
    steps: list[Callable[[], None]] = [
        lambda: per_leaf(args.leaves, args.size, args.rounds),
        lambda: one_array(args.rounds),
    ]
    if args.sets:
        steps.append(lambda: trees(args.sets, args.tree_rounds))
    steps.append(first_step)
    for step in steps:
        step()
        sys.stdout.flush()
    print()
    print(f"machine after: {_harness.machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
