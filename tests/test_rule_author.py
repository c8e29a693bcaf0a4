"""What a rule author uses: the public helpers, typed field checks, ``check_rule``.

A user's rule is written with public names only (``opt.hyper``, ``opt.eps``,
``opt.hyperparameter``, ``opt.Range``); fields annotated with ``typing`` forms
are checked; :func:`agnosticopt.conformance.check_rule` tells an exact rule
(identical on every backend) from one that is not.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal, Optional, Tuple  # noqa: UP035  (the typing forms are under test)

import agnosticopt.adapters
import agnosticopt.adapters._base
import numpy as np
import pytest
from agnosticopt.conformance import RuleReport, check_rule, load_rule
from agnosticopt.conformance._rule_check import as_rule

import agnosticopt as opt
import agnosticopt._rule

#: > 100k elements: identity claims are made on large arrays (torch threads from 32k).
SIZE = 131_089


def test_rule_author_names_are_public_and_the_private_ones_still_work() -> None:
    for name in (
        "hyper",
        "eps",
        "hyperparameter",
        "Range",
        "Replace",
        "check_precision",
        "DECAY",
        "NONNEGATIVE",
        "NONNEGATIVE_OR_INF",
    ):
        assert getattr(opt, name) is getattr(agnosticopt._rule, name), name
        assert name in opt.__all__
    assert agnosticopt.adapters.Adapter is agnosticopt.adapters._base.Adapter
    assert "Adapter" in agnosticopt.adapters.__all__


def test_importing_the_adapter_base_class_imports_no_backend() -> None:
    code = (
        "import sys; from agnosticopt.adapters import Adapter; "
        "print(sorted(m for m in ('torch', 'jax', 'cupy', 'array_api_strict') "
        "if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


@dataclasses.dataclass(frozen=True)
class ScaledSign(opt.Rule):
    """A rule written with public names only: ε floor, ranges, precision checks."""

    eta: float = opt.hyperparameter(0.01, opt.NONNEGATIVE, precision="nonzero")
    epsilon: float = opt.hyperparameter(1e-8, opt.Range(0, 1))

    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        (eta,) = opt.hyper(xp, x, self.eta)
        epsilon = opt.eps(xp, x, self.epsilon)
        return state, xp.multiply(xp.divide(dx, xp.add(xp.abs(dx), epsilon)), eta)


def test_a_rule_of_public_names_runs_and_is_checked() -> None:
    x = np.array([1.0, -2.0, 0.0], np.float16)
    tree = opt.setup(ScaledSign(), {"w": x})
    _, model = opt.update(tree, {"w": x}, {"w": np.array([3.0, -1.0, 0.0], np.float16)})
    # ε is floored at 1e-7 in float16: 0/(0+ε) is 0, not NaN
    assert np.array_equal(model["w"], np.array([0.99, -1.99, 0.0], np.float16))
    with pytest.raises(
        ValueError, match=r"ScaledSign\.epsilon must be in \[0, 1\], got 2"
    ):
        ScaledSign(epsilon=2)
    with pytest.raises(
        ValueError, match=r"ScaledSign\.eta = 1e-09 rounds to 0 in float16"
    ):
        opt.setup(ScaledSign(eta=1e-9), x)


@dataclasses.dataclass(frozen=True)
class Typed(opt.Rule):
    """Fields annotated with every ``typing`` form a rule author may write."""

    pair: Tuple[float, float] = (0.9, 0.999)  # noqa: UP006
    pair_new: tuple[float, float] = (0.5, 2.0)
    many: Tuple[float, ...] = ()  # noqa: UP006
    cap: Optional[float] = None  # noqa: UP045
    floor: float | None = opt.hyperparameter(None, opt.NONNEGATIVE)
    steps: int = 1
    flag: bool = False
    mode: Literal["sum", "mean"] = "mean"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"pair": (0.9,)},
            r"Typed\.pair must be a tuple of 2 real numbers, got \(0\.9,\)",
        ),
        (
            {"pair": [0.9, 0.99]},
            r"Typed\.pair must be a tuple of real numbers, got \[0\.9",
        ),
        ({"pair": (0.9, "x")}, r"Typed\.pair\[1\] must be a real number, got 'x'"),
        (
            {"pair_new": 1.0},
            r"Typed\.pair_new must be a tuple of real numbers, got 1\.0",
        ),
        ({"many": (1.0, None)}, r"Typed\.many\[1\] must be a real number, got None"),
        ({"cap": "big"}, r"Typed\.cap must be a real number, got 'big'"),
        ({"cap": True}, r"Typed\.cap must be a real number, got True"),
        ({"floor": [1.0]}, r"Typed\.floor must be a real number, got \[1\.0\]"),
        ({"steps": 1.5}, r"Typed\.steps must be an integer, got 1\.5"),
        ({"flag": 1}, r"Typed\.flag must be a bool, got 1"),
        ({"mode": "max"}, r"Typed\.mode must be one of 'sum', 'mean', got 'max'"),
    ],
)
def test_typing_annotations_refuse_wrong_values(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Typed(**changes)
    with pytest.raises(TypeError, match=message):  # adjust checks the same way
        Typed().adjust(**changes)


def test_typing_annotations_take_right_values() -> None:
    rule = Typed(
        pair=(1, 2),
        pair_new=(0.1, 0.2),
        many=(1, 2.5, 3),
        cap=4,
        floor=0,
        steps=3,
        flag=True,
        mode="sum",
    )
    assert rule.pair == (1.0, 2.0)
    assert all(type(v) is float for v in (*rule.pair, *rule.many, rule.cap, rule.floor))
    assert Typed(cap=None, floor=None).cap is None
    with pytest.raises(ValueError, match=r"Typed\.floor must be in \[0, inf\), got -1"):
        Typed(floor=-1)


def test_typing_annotations_are_checked_without_postponed_evaluation(
    tmp_path: Path,
) -> None:
    """A user's module without ``from __future__ import annotations`` (live typing objects)."""
    path = tmp_path / "user_typed_rule.py"
    path.write_text(
        textwrap.dedent("""
        import dataclasses
        from typing import Optional, Tuple
        import agnosticopt as opt

        @dataclasses.dataclass(frozen=True)
        class Live(opt.Rule):
            pair: Tuple[float, float] = (0.9, 0.99)
            cap: Optional[float] = None
            floor: float | None = None

            def init(self, x, xp):
                return None

            def apply(self, state, x, dx, xp):
                return state, dx
        """),
        encoding="utf-8",
    )
    live = type(load_rule(f"{path}:Live"))
    assert live(pair=(1, 2), cap=3, floor=None).pair == (1.0, 2.0)
    for field, bad in (("pair", (1.0, 2.0, 3.0)), ("cap", "x"), ("floor", [0.0])):
        with pytest.raises(TypeError, match=rf"Live\.{field}"):
            live(**{field: bad})


# -- check_rule: a user's rule on every installed backend ----------------------------------


@dataclasses.dataclass(frozen=True)
class DecayDescent(opt.Rule):
    """Exact: only the adapter's correctly rounded operations on arrays."""

    eta: float = 0.1

    def init(self, x: Any, xp: Any) -> Any:
        return 1

    def apply(self, t: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        (eta,) = opt.hyper(xp, x, self.eta / np.sqrt(t))
        return t + 1, xp.multiply(dx, eta)


@dataclasses.dataclass(frozen=True)
class OperatorDivide(opt.Rule):
    """Not exact: ``eta / (dx*dx + 1)`` with Python's operators (torch divides a scalar
    by a tensor through a reciprocal, which the adapter's ``divide`` does not)."""

    eta: float = 0.3

    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        return state, float(self.eta) / (dx * dx + 1)


@dataclasses.dataclass(frozen=True)
class Broken(opt.Rule):
    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        msg = "this rule always fails"
        raise RuntimeError(msg)


BACKENDS = ["numpy", "numpy_readonly", "torch", "array_api_strict", "jax"]


def _available(report: RuleReport) -> list[str]:
    return [b for b in report.backends if b not in report.unavailable]


def test_check_rule_finds_an_exact_rule_identical_everywhere() -> None:
    report = check_rule(
        DecayDescent,
        backends=BACKENDS,
        dtypes=["float32"],
        steps=3,
        size=SIZE,
        properties=False,
    )
    assert report.identical
    assert len(_available(report)) >= 2  # numpy and numpy_readonly at least
    assert all(
        report.status(b) in ("identical", "deviation") for b in _available(report)
    )
    text = report.render()
    assert (
        f"DecayDescent: {SIZE} elements, steps 3 in float32 (normal and special data)"
        in text
    )
    assert text.endswith(
        "OK: DecayDescent gives numpy's bits on every available backend"
    )


def test_check_rule_reports_a_rule_that_is_not_exact() -> None:
    pytest.importorskip("torch")
    report = check_rule(
        OperatorDivide(),
        backends=["numpy", "torch"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=SIZE,
        properties=False,
    )
    assert not report.identical
    assert report.status("numpy") == "identical"
    assert report.status("torch") == "differs"
    (torch,) = [r for r in report.results if r.backend == "torch"]
    assert torch.path == "x"
    assert 0 < torch.count <= torch.elements == SIZE
    assert torch.max_ulp is not None
    assert torch.max_ulp >= 1
    text = report.render()
    row = next(line for line in text.splitlines() if line.startswith("torch "))
    assert f"differs: {torch.count} of {SIZE} elements of x, max " in row
    assert "first at [" in text
    assert text.endswith("FAILED: OperatorDivide is not identical to numpy on torch")


def test_check_rule_reports_errors_and_runs_the_property_checks() -> None:
    report = check_rule(
        Broken,
        backends=["numpy"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=SIZE,
    )
    statuses = {r.check: r.status for r in report.results}
    assert statuses["trajectory"] == "error"
    assert "update_matches_update_" in statuses
    text = report.render()
    assert "RuntimeError: this rule always fails" in text
    assert "property checks" in text
    assert text.endswith("FAILED: Broken is not identical to numpy on numpy")
    good = check_rule(
        DecayDescent(), backends=["numpy"], dtypes=["float64"], steps=2, size=5000
    )
    assert {r.status for r in good.results if r.check != "trajectory"} == {"passed"}


@dataclasses.dataclass(frozen=True)
class Centred(opt.Rule):
    """Uses the namespace's ``mean``, outside the exact set."""

    eta: float = 0.1

    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        (eta,) = opt.hyper(xp, x, self.eta)
        return state, xp.multiply(xp.subtract(dx, xp.mean(dx)), eta)


def test_check_rule_report_names_non_exact_ops() -> None:
    exact = check_rule(
        DecayDescent,
        backends=["numpy"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=5000,
        properties=False,
    )
    assert exact.non_exact_ops == ()
    assert "uses only bit-identical operations" in exact.render()
    centred = check_rule(
        Centred,
        backends=["numpy"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=5000,
        properties=False,
    )
    assert centred.non_exact_ops == ("xp.mean",)
    assert (
        "uses non-exact ops: xp.mean (identical only if the backends agree)"
        in centred.render()
    )
    operators = check_rule(
        OperatorDivide,
        backends=["numpy"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=5000,
        properties=False,
    )
    assert operators.non_exact_ops == ("`*`", "`+`", "`/`")
    assert '"non_exact_ops": [\n  "`*`"' in operators.to_json()


def test_as_rule_takes_rules_classes_and_factories() -> None:
    assert as_rule(DecayDescent(0.5)) == DecayDescent(0.5)
    assert as_rule(DecayDescent) == DecayDescent()
    assert as_rule(lambda: opt.Adam(1e-3)) == opt.Adam(1e-3)
    with pytest.raises(TypeError, match=r"returned 3, not an agnosticopt\.Rule"):
        as_rule(lambda: 3)
    with pytest.raises(TypeError, match=r"expected an agnosticopt\.Rule"):
        as_rule(math.pi)


# -- the pages' `agnosticopt conformance --rule` commands run as written ---------------------

ROOT = Path(__file__).resolve().parent.parent
RULE_PAGES = [ROOT / "README.md", ROOT / "docs" / "writing-a-rule.md"]


def _rule_commands(page: Path) -> list[str]:
    from test_readme import blocks

    return [
        line.strip()
        for b in blocks(page)
        if b.lang == "bash"
        for line in b.code.splitlines()
        if line.strip().startswith("agnosticopt conformance --rule")
    ]


@pytest.mark.parametrize("page", RULE_PAGES, ids=lambda p: p.name)
def test_the_pages_rule_command_checks_the_pages_rule(
    page: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The file the command names is the page's rule (a ``# file:`` block, else the block
    defining the class); the command, shortened to 2 steps, finds it identical."""
    import shlex

    from agnosticopt.conformance._cli import main
    from test_readme import blocks

    (command,) = _rule_commands(page)
    words = shlex.split(command)
    file_name, _, attr = words[words.index("--rule") + 1].partition(":")
    python = [b for b in blocks(page) if b.lang == "python"]
    source = next((b for b in python if b.file_name == file_name), None) or next(
        b for b in python if f"class {attr}(" in b.code
    )
    (tmp_path / file_name).write_text(source.code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    quick = [
        "--steps",
        "2",
        "--no-properties",
        *([] if "--dtype" in words else ["--dtype", "float32"]),
    ]
    code = main([*words[1:], *quick])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"OK: {attr} gives numpy's bits on every available backend" in out


@dataclasses.dataclass(frozen=True)
class WarningRule(opt.Rule):
    def init(self, x: Any, xp: Any) -> Any:
        return None

    def apply(self, state: Any, x: Any, dx: Any, xp: Any) -> tuple[Any, Any]:
        import warnings

        warnings.warn("a warning from the rule", UserWarning, stacklevel=1)
        return state, xp.multiply(dx, opt.hyper(xp, x, 0.5)[0])


def test_check_rule_records_warnings_whatever_the_filters() -> None:
    """pytest turns warnings into errors here; check_rule still runs and reports them."""
    report = check_rule(
        WarningRule,
        backends=["numpy", "numpy_readonly"],
        dtypes=["float32"],
        datasets=["normal"],
        steps=1,
        size=SIZE,
        properties=False,
    )
    assert report.identical
    assert report.warned() == {
        "UserWarning: a warning from the rule": ["numpy", "numpy_readonly"]
    }
    assert (
        "warning on numpy, numpy_readonly: UserWarning: a warning from the rule"
        in report.render()
    )
