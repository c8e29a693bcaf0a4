"""The ``agnosticopt`` command: ``demo``, ``conformance`` and ``info``.

Backends are imported only when a command runs, never at ``import agnosticopt``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

_DTYPES = ("float16", "float32", "float64", "complex64", "complex128")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agnosticopt",
        description="Optimisers.jl's rules, the same bits on every array backend.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a small model on every installed backend; compare the bits",
        description="Train a 2-layer perceptron with one rule chain on every installed "
                    "backend and show each backend's final loss and parameter digest.")
    demo.add_argument("--rule", default=None, metavar="RULE",
                      help="a conformance case name (e.g. Adam, ClipNorm+Adam) or an "
                           "expression such as 'OptimiserChain(ClipGrad(1), Lion(1e-4))'")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    demo.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    demo.add_argument("--backend", action="append", metavar="NAME",
                      help="backend (repeatable; default: every built-in one)")

    conf = commands.add_parser(
        "conformance", help="check that backends reproduce numpy's bits",
        description="Run every rule and chain on each backend and compare the bits "
                    "with numpy and with the golden files; exit status 1 on any mismatch.")
    conf.add_argument("--backend", action="append", metavar="NAME",
                      help="built-in name or module:attribute (repeatable; default: every "
                           "built-in backend; the reference is numpy's plain path, "
                           "agnosticopt.update, so numpy's update_ checks its fast path)")
    conf.add_argument("--dtype", action="append", choices=_DTYPES,
                      help="parameter dtype (repeatable; default float32 and float64)")
    conf.add_argument("--case", action="append", metavar="NAME",
                      help="only this rule or chain (repeatable; default all)")
    conf.add_argument("--dataset", action="append", choices=("normal", "special"),
                      help="gradient data set (repeatable; default both)")
    conf.add_argument("--steps", type=int, default=None,
                      help="trajectory length (default per dtype: 1000 in float32, 300 in "
                           "float64, 100 in float16)")
    conf.add_argument("--size", type=int, default=None,
                      help="parameter elements (default 131089)")
    conf.add_argument("--no-properties", action="store_true",
                      help="skip the property checks (update vs update_, dtype, ...)")
    conf.add_argument("--json", action="store_true", help="print JSON instead of tables")

    info = commands.add_parser("info", help="backends found, their devices, adapter fixes")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


class _UsageError(Exception):
    """A command-line argument names nothing usable (exit status 2, no traceback)."""


def _backends(names: Sequence[str] | None, default: Sequence[str]) -> list[Any]:
    from agnosticopt.conformance import get_backend

    try:
        return [get_backend(n) for n in (names or default)]
    except (KeyError, ValueError, TypeError, ImportError, AttributeError) as exc:
        raise _UsageError(exc) from exc


def _cases(names: Sequence[str] | None) -> list[Any]:
    from agnosticopt.conformance import CASES, case_named

    try:
        return [case_named(n) for n in names] if names else list(CASES)
    except KeyError as exc:
        raise _UsageError(exc) from exc


def _unavailable(backends: Sequence[Any]) -> dict[str, str]:
    return {b.name: why for b in backends if (why := b.unavailable())}


def _rule(text: str | None) -> Any:
    """A rule from a case name or an expression over agnosticopt's rules."""
    import agnosticopt as opt
    from agnosticopt.conformance import case_named
    from agnosticopt.conformance._demo import DEFAULT_RULE

    if text is None:
        return DEFAULT_RULE
    try:
        return case_named(text).rule
    except KeyError:
        pass
    names = {n: getattr(opt, n) for n in opt.__all__ if isinstance(getattr(opt, n), type)}
    try:
        rule = eval(text, {"__builtins__": {}, "inf": math.inf, **names})
    except Exception as exc:
        msg = f"--rule {text!r} is neither a case name nor a rule expression: {exc}"
        raise SystemExit(msg) from exc
    if not isinstance(rule, opt.Rule):
        msg = f"--rule {text!r} is not a rule"
        raise SystemExit(msg)
    return rule


def _demo(args: argparse.Namespace) -> int:
    from agnosticopt.conformance import BUILTIN_BACKENDS
    from agnosticopt.conformance._demo import render_demo, train
    from agnosticopt.conformance._progress import Progress

    rule = _rule(args.rule)
    backends = _backends(args.backend, list(BUILTIN_BACKENDS))
    unavailable = _unavailable(backends)
    usable = [b for b in backends if b.name not in unavailable]
    results = []
    with Progress(args.steps * len(usable)) as bar:
        for b in usable:
            bar.show(f"training on {b.name}")
            results.append(train(b, rule, steps=args.steps, dtype=args.dtype, progress=bar))
    print(render_demo(results, rule=rule, steps=args.steps, dtype=args.dtype,
                      unavailable=unavailable))
    return 0 if len({r.digest for r in results}) <= 1 else 1


def _conformance(args: argparse.Namespace) -> int:
    from agnosticopt.conformance import BUILTIN_BACKENDS, DEFAULT_SIZE
    from agnosticopt.conformance._progress import Progress
    from agnosticopt.conformance._report import (
        matrix_size,
        render_json,
        render_text,
        run_matrix,
    )

    backends = _backends(args.backend, list(BUILTIN_BACKENDS))
    cases = _cases(args.case)
    dtypes = args.dtype or ["float32", "float64"]
    datasets = args.dataset or ["normal", "special"]
    size = args.size or DEFAULT_SIZE
    unavailable = _unavailable(backends)
    total = matrix_size(len(backends), len(cases), len(dtypes), len(datasets),
                        properties=not args.no_properties)
    with Progress(total) as bar:
        results = run_matrix(backends, cases, dtypes, datasets, steps=args.steps, size=size,
                             properties=not args.no_properties, progress=bar)
    if args.json:
        settings = {"backends": [b.name for b in backends], "cases": [c.name for c in cases],
                    "dtypes": dtypes, "datasets": datasets, "steps": args.steps, "size": size}
        print(render_json(results, settings=settings, unavailable=unavailable))
    else:
        print(render_text(results, backends=backends, dtypes=dtypes, steps=args.steps,
                          size=size, unavailable=unavailable))
    return 1 if any(r.failed for r in results) else 0


def _info(args: argparse.Namespace) -> int:
    from agnosticopt.conformance._info import all_backend_info, render_info

    infos = all_backend_info()
    print(json.dumps(infos, indent=1) if args.json else render_info(infos))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Parameters
    ----------
    argv
        The arguments after the program name (default ``sys.argv[1:]``).
    """
    # JAX has float64 only in its 64-bit mode, which must be on before JAX starts.
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    args = _parser().parse_args(argv)
    run = {"demo": _demo, "conformance": _conformance, "info": _info}[args.command]
    try:
        return run(args)
    except _UsageError as exc:  # errors while running are not hidden: they keep their traceback
        print(f"agnosticopt {args.command}: {exc}", file=sys.stderr)
        return 2
