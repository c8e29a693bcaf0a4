"""What recording each step once saves: the fast path's Python cost, before and after.

Usage::

    python benchmarks/record_once.py [--rounds 200] [--sets resnet tiny] [--threads 1]

"Before" is the fast path with ``RECORD_ONCE`` off (``adapters/_fast.py``): every
step of every group of leaves is recorded anew with its host values and no plan
is kept from one update to the next, as before steps were recorded once; the
bits are the same either way. In one run, side by side, it prints:

- the Python cost per leaf per step: one ``update_`` of ``--leaves`` float32
  arrays of ``--size`` elements with Adam, numpy and torch, the plain path, the
  fast path before and after (fastest of ``--rounds`` steps, the three
  interleaved step by step, so that a machine that gets busier slows them alike);
- one 10×10 array (and one of a single element): the same three, fastest and
  median step (the fast path must never be slower than the plain one);
- per-array trees of the benchmark's sets (``benchmarks/_harness.py``: *resnet*,
  the 62 arrays of ResNet-18, and *tiny*, 200 arrays of 32×32) with Adam, against
  ``torch.optim.Adam(fused=True)``, before and after;
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

#: The paths measured side by side: (label, fast path on, record once).
PATHS = (("plain", False, True), ("before", True, False), ("after", True, True))


def _model(kind: str, shapes: list[tuple[int, ...]]) -> tuple[list[Any], list[Any]]:
    rng = np.random.default_rng(0)
    model: list[Any] = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads: list[Any] = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if kind == "torch":
        import torch

        model = [torch.nn.Parameter(torch.from_numpy(p)) for p in model]
        grads = [torch.from_numpy(g) for g in grads]
    return model, grads


def _stepper(kind: str, shapes: list[tuple[int, ...]], fast: bool, once: bool) -> Any:
    """One ``update_`` of a fresh Adam tree on ``shapes``, with these switches."""
    model, grads = _model(kind, shapes)
    tree = opt.setup(opt.Adam(), model)

    def step() -> None:
        previous = opt.set_fast_path(fast)
        _fast.RECORD_ONCE = once
        try:
            opt.update_(tree, model, grads)
        finally:
            opt.set_fast_path(previous)
            _fast.RECORD_ONCE = True

    return step


def interleaved(
    kind: str, shapes: list[tuple[int, ...]], rounds: int
) -> dict[str, list[float]]:
    """Step times (seconds) of each of :data:`PATHS`, one step of each per round."""
    steps = {label: _stepper(kind, shapes, f, o) for label, f, o in PATHS}
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
    print("| backend | plain | fast before | fast after | after / before |")
    print("|---|---|---|---|---|")
    for kind in ("numpy", "torch"):
        best = {
            k: min(v) * 1e6 / leaves
            for k, v in interleaved(kind, [(size,)] * leaves, rounds).items()
        }
        print(
            f"| {kind} | {best['plain']:.1f} | {best['before']:.1f} | "
            f"{best['after']:.1f} | {best['after'] / best['before']:.2f}× |"
        )


def one_array(rounds: int) -> None:
    """Print one small array's step on each path."""
    print()
    print(
        f"One array, Adam: fastest / median of {rounds} steps in us "
        "(fast after must not be slower than plain):"
    )
    print("| backend | shape | plain | fast before | fast after |")
    print("|---|---|---|---|---|")
    for kind in ("numpy", "torch"):
        for shape in ((10, 10), (1,)):
            times = interleaved(kind, [shape], rounds)
            cells = [
                f"{min(times[k]) * 1e6:.0f} / {statistics.median(times[k]) * 1e6:.0f}"
                for k in ("plain", "before", "after")
            ]
            print(f"| {kind} | {'×'.join(map(str, shape))} | {' | '.join(cells)} |")


def trees(sets: list[str], rounds: int) -> None:
    """Print the benchmark's per-array trees against torch fused Adam, before and after.

    The steps are ``benchmarks/_harness.py``'s; before and after are two trees
    each, stepped in the same rounds as torch's fused step.
    """
    print()
    print(
        f"Per-array trees, Adam, median of {rounds} steps (before, after and torch "
        "fused interleaved), ratio to torch.optim.Adam(fused=True):"
    )
    print(
        "| set | numpy fast before | after | torch fast before | after | torch fused |"
    )
    print("|---|---|---|---|---|---|")
    for name in sets:
        shapes = _harness.SETS[name]
        live: dict[str, Callable[[], Any]] = {}
        for once in (False, True):
            made = _harness.steps(("numpy fast", "torch fast"), "Adam", shapes)
            for impl, step in made.items():
                assert step is not None
                live[f"{impl} {'after' if once else 'before'}"] = _switched(step, once)
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
        cells = [
            f"{ms[f'{kind} fast {when}']:.2f} ms "
            f"({ms[f'{kind} fast {when}'] / reference:.2f}×)"
            for kind in ("numpy", "torch")
            for when in ("before", "after")
        ]
        print(f"| {name} | {' | '.join(cells)} | {reference:.2f} ms |")
        sys.stdout.flush()


def _switched(step: Callable[[], Any], once: bool) -> Callable[[], None]:
    """``step`` with ``RECORD_ONCE`` set to ``once`` while it runs."""

    def run() -> None:
        _fast.RECORD_ONCE = once
        try:
            step()
        finally:
            _fast.RECORD_ONCE = True

    return run


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
