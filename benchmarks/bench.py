"""Benchmark one optimiser step: agnosticopt ``update_`` against torch.optim and optax.

Usage::

    python benchmarks/bench.py                     # everything (a few minutes)
    python benchmarks/bench.py --sets big --rules Adam --rounds 30
    python benchmarks/bench.py --chart bench.png --json bench.json

Prints the machine, a table of median step times with ratios to
``torch.optim``'s fused step, and the extra peak memory of a step; writes a bar
chart when matplotlib is installed. The measuring code is
``benchmarks/_harness.py`` (see its docstring for the method).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import _harness


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sets", nargs="+", default=list(_harness.SETS), choices=list(_harness.SETS)
    )
    parser.add_argument(
        "--rules", nargs="+", default=list(_harness.RULES), choices=list(_harness.RULES)
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        default=list(_harness.IMPLEMENTATIONS),
        choices=list(_harness.IMPLEMENTATIONS),
    )
    parser.add_argument("--rounds", type=int, default=15, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the memory measurement"
    )
    parser.add_argument("--chart", default="bench.png", help="PNG path ('' for none)")
    parser.add_argument(
        "--json", default="", help="also write the results as JSON here"
    )
    parser.add_argument(
        "--new-grads",
        action="store_true",
        help="new gradient arrays before each step (zero_grad(set_to_none=True))",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="threads for torch and for agnosticopt's kernels (0: defaults)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        _harness.set_threads(args.threads)

    print(f"machine: {_harness.machine()}", flush=True)
    results = _harness.run(
        tuple(args.sets),
        tuple(args.rules),
        tuple(args.impls),
        rounds=args.rounds,
        warmup=args.warmup,
        memory=not args.no_memory,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        new_grads=args.new_grads,
    )
    print()
    print(
        "Median time of one step (ratio to torch fused; * = to torch's fastest, "
        "no fused kernel):"
    )
    print(_harness.table(results))
    if not args.no_memory:
        print()
        print("Extra peak memory of one step (limit: max(1% of the parameters, 8 MB)):")
        print(_harness.memory_table(results))
    print()
    print(f"machine after: {_harness.machine()}")
    if args.chart:
        print(_harness.chart(results, args.chart))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
