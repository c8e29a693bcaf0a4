"""The ``agnosticopt`` command: ``demo``, ``conformance`` and ``info`` (conformance front ends).

Backends are imported only when a command runs, never at ``import agnosticopt``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]

_DTYPES = ("float16", "float32", "float64", "complex64", "complex128")


def _positive(text: str) -> int:
    """An argparse type: a positive integer (``--steps``, ``--size``)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agnosticopt",
        description="Optimisers.jl's rules, the same bits on every array backend.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train a small model on every installed backend; compare the bits",
        description="Train a 2-layer perceptron with one rule chain on every installed "
        "backend and show each backend's final loss and parameter digest.",
    )
    demo.add_argument(
        "--rule",
        default=None,
        metavar="RULE",
        help="a conformance case name (e.g. Adam, ClipNorm+Adam) or an "
        "expression such as 'OptimiserChain(ClipGrad(1), Lion(1e-4))'",
    )
    demo.add_argument(
        "--steps", type=_positive, default=300, help="training steps (default 300)"
    )
    demo.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    demo.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="backend (repeatable; default: every built-in one)",
    )

    conf = commands.add_parser(
        "conformance",
        help="check that backends reproduce numpy's bits",
        description="Run every rule and chain on each backend and compare the bits "
        "with numpy and with the golden files (with --rule: your own rule on "
        "each backend); exit status 1 on any mismatch.",
    )
    conf.add_argument(
        "--backend",
        action="append",
        metavar="NAME",
        help="built-in name or module:attribute (repeatable; default: every "
        "built-in backend; the reference is numpy's plain path, "
        "agnosticopt.update, so numpy's update_ checks its fast path)",
    )
    conf.add_argument(
        "--dtype",
        action="append",
        choices=_DTYPES,
        help="parameter dtype (repeatable; default float32 and float64)",
    )
    conf.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="only this rule or chain (repeatable; default all)",
    )
    conf.add_argument(
        "--rule",
        default=None,
        metavar="MODULE:RULE",
        help="check your own rule instead of the cases: 'module:attribute' or "
        "'path/to/file.py:attribute', a Rule, a Rule class (its defaults) "
        "or a zero-argument factory",
    )
    conf.add_argument(
        "--dataset",
        action="append",
        choices=("normal", "special"),
        help="gradient data set (repeatable; default both)",
    )
    conf.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="trajectory length (default per dtype: 1000 in float32, 300 in "
        "float64, 100 in float16)",
    )
    conf.add_argument(
        "--size",
        type=_positive,
        default=None,
        help="parameter elements (default 131089)",
    )
    conf.add_argument(
        "--no-properties",
        action="store_true",
        help="skip the property checks (update vs update_, dtype, ...)",
    )
    conf.add_argument(
        "--json", action="store_true", help="print JSON instead of tables"
    )

    info = commands.add_parser(
        "info", help="backends found, their devices, adapter fixes"
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


class _UsageError(Exception):
    """A command-line argument names nothing usable (exit status 2, no traceback)."""


def _backends(names: Sequence[str] | None, default: Sequence[str]) -> list[Any]:
    from agnosticopt.conformance import get_backend

    found = []
    for name in names or default:
        try:
            found.append(get_backend(name))
        except (KeyError, ValueError, TypeError, ImportError, AttributeError) as exc:
            raise _UsageError(exc) from exc
        except SystemExit as exc:  # a third-party factory that exits checked nothing
            msg = f"backend {name!r} exited (SystemExit({exc.code!r})) instead of returning a backend"
            raise _UsageError(msg) from exc
    return found


def _cases(names: Sequence[str] | None) -> list[Any]:
    from agnosticopt.conformance import CASES, case_named

    try:
        return [case_named(n) for n in names] if names else list(CASES)
    except KeyError as exc:
        raise _UsageError(exc) from exc


def _unavailable(backends: Sequence[Any]) -> dict[str, str]:
    return {b.name: why for b in backends if (why := b.unavailable())}


def _rule(text: str | None) -> Any:
    """A rule from a case name or a rule expression, parsed (never evaluated)."""
    from agnosticopt.conformance import case_named
    from agnosticopt.conformance._demo import DEFAULT_RULE

    if text is None:
        return DEFAULT_RULE
    try:
        return case_named(text).rule
    except KeyError:
        pass
    return parse_rule(text)


def _rule_classes() -> dict[str, type]:
    """The public rule constructors: the Rule subclasses in ``agnosticopt.__all__``."""
    import agnosticopt as opt

    found = {n: getattr(opt, n) for n in opt.__all__}
    return {
        n: c
        for n, c in found.items()
        if isinstance(c, type) and issubclass(c, opt.Rule) and c is not opt.Rule
    }


_NAMED_NUMBERS = {"inf": math.inf, "nan": math.nan}


def parse_rule(text: str) -> Any:
    """The rule written in ``text``, built from a parse tree, never evaluated.

    Allowed: calls of public rule names (``Adam``, ``OptimiserChain``...) with
    positional and keyword arguments that are numbers (``1e-3``, ``-2``, ``inf``),
    strings, ``True``/``False``/``None``, tuples of these, and rules.

    Raises
    ------
    _UsageError
        For anything else, or when a rule refuses its arguments.
    """
    import agnosticopt as opt

    classes = _rule_classes()
    text = text.strip()

    def refuse(node: ast.AST, why: str) -> _UsageError:
        piece = ast.get_source_segment(text, node) or type(node).__name__
        return _UsageError(
            f"--rule {text!r} is neither a case name nor a rule expression: {why} "
            f"({piece!r}); write e.g. 'OptimiserChain(ClipGrad(1), Adam(1e-3, beta=(0.9, 0.99)))' "
            f"with rules among {', '.join(sorted(classes))}"
        )

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(
            node.value, (int, float, str, bool, type(None))
        ):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = value(node.operand)
            if isinstance(inner, bool) or not isinstance(inner, (int, float)):
                raise refuse(node, "a sign applies to numbers only")
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.Name) and node.id in _NAMED_NUMBERS:
            return _NAMED_NUMBERS[node.id]
        if isinstance(node, ast.Tuple):
            return tuple(value(item) for item in node.elts)
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in classes:
                raise refuse(node.func, "not a rule name")
            if any(isinstance(a, ast.Starred) for a in node.args) or any(
                k.arg is None for k in node.keywords
            ):
                raise refuse(node, "no * or ** arguments")
            args = [value(a) for a in node.args]
            kwargs = {k.arg: value(k.value) for k in node.keywords if k.arg is not None}
            try:
                return classes[node.func.id](*args, **kwargs)
            except (TypeError, ValueError) as exc:
                raise refuse(node, str(exc)) from exc
        if isinstance(node, ast.Name):
            raise refuse(node, "a bare name; call it, e.g. Adam()")
        raise refuse(node, f"{type(node).__name__} is not allowed")

    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        msg = f"--rule {text!r} is neither a case name nor a rule expression: {exc.msg}"
        raise _UsageError(msg) from exc
    rule = value(tree.body)
    if not isinstance(rule, opt.Rule):
        raise refuse(tree.body, "not a rule")
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
            results.append(
                train(b, rule, steps=args.steps, dtype=args.dtype, progress=bar)
            )
    print(
        render_demo(
            results,
            rule=rule,
            steps=args.steps,
            dtype=args.dtype,
            unavailable=unavailable,
        )
    )
    if not results:
        print(
            "agnosticopt demo: no backend was available, so nothing was compared",
            file=sys.stderr,
        )
        return 1
    return 0 if len({r.digest for r in results}) == 1 else 1


def _user_rule(spec: str) -> Any:
    """The rule of ``--rule module:attribute`` (a usage error when there is none)."""
    from agnosticopt.conformance._rule_check import load_rule

    try:
        return load_rule(spec)
    except (
        ValueError,
        TypeError,
        ImportError,
        AttributeError,
        FileNotFoundError,
    ) as exc:
        raise _UsageError(exc) from exc


def _conformance_rule(args: argparse.Namespace) -> int:
    """``conformance --rule``: one user's rule on every backend."""
    from agnosticopt.conformance import BUILTIN_BACKENDS, DEFAULT_SIZE
    from agnosticopt.conformance._progress import Progress
    from agnosticopt.conformance._rule_check import check_rule, rule_check_size

    if args.case:
        msg = "--rule and --case exclude each other: --rule checks your rule instead of the cases"
        raise _UsageError(msg)
    rule = _user_rule(args.rule)
    backends = _backends(args.backend, list(BUILTIN_BACKENDS))
    dtypes = args.dtype or ["float32", "float64"]
    datasets = args.dataset or ["normal", "special"]
    properties = not args.no_properties
    with Progress(
        rule_check_size(
            len(backends), len(dtypes), len(datasets), properties=properties
        )
    ) as bar:
        report = check_rule(
            rule,
            backends=backends,
            dtypes=dtypes,
            datasets=datasets,
            steps=args.steps,
            size=args.size or DEFAULT_SIZE,
            properties=properties,
            progress=bar,
        )
    print(report.to_json() if args.json else report.render())
    return 0 if report.identical else 1


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
    total = matrix_size(
        len(backends),
        len(cases),
        len(dtypes),
        len(datasets),
        properties=not args.no_properties,
    )
    with Progress(total) as bar:
        results = run_matrix(
            backends,
            cases,
            dtypes,
            datasets,
            steps=args.steps,
            size=size,
            properties=not args.no_properties,
            progress=bar,
        )
    if args.json:
        settings = {
            "backends": [b.name for b in backends],
            "cases": [c.name for c in cases],
            "dtypes": dtypes,
            "datasets": datasets,
            "steps": args.steps,
            "size": size,
        }
        print(render_json(results, settings=settings, unavailable=unavailable))
    else:
        print(
            render_text(
                results,
                backends=backends,
                dtypes=dtypes,
                steps=args.steps,
                size=size,
                unavailable=unavailable,
            )
        )
    if not any(r.status != "skipped" for r in results):
        print(
            "agnosticopt conformance: no check ran (every one was skipped), so nothing "
            "was verified",
            file=sys.stderr,
        )
        return 1
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
    if args.command == "conformance" and args.rule is not None:
        run = _conformance_rule
    try:
        return run(args)
    except (
        _UsageError
    ) as exc:  # errors while running are not hidden: they keep their traceback
        print(f"agnosticopt {args.command}: {exc}", file=sys.stderr)
        return 2
