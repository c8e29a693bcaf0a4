"""The ``agnosticopt`` command line: info, conformance, demo, and the progress bar.

Run in-process through ``main([...])`` (short settings keep this fast), and
once as ``python -m agnosticopt info`` in a subprocess.
"""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agnosticopt.conformance._cli import main
from agnosticopt.conformance._progress import Progress

import agnosticopt

QUICK = ["--steps", "3", "--size", "4099"]


def test_info_lists_backends_devices_and_fixes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"agnosticopt {agnosticopt.__version__}" in out
    assert "numpy" in out
    assert "cpu" in out
    assert "not available: cupy is not installed" in out or "cupy:" in out
    pytest.importorskip("torch")
    assert "torch: agnosticopt.adapters.torch.TorchAdapter" in out
    assert "fix: sqrt" in out


def test_info_json_names_the_jax_deviation(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    infos = {i["backend"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["numpy"]["available"]
    assert infos["numpy"]["fixes"] == []
    assert set(infos) >= {"numpy", "numpy_readonly", "torch", "array_api_strict", "jax"}
    if infos["jax"]["available"] and infos["jax"]["devices"][0].startswith("cpu"):
        assert "flushes subnormals" in infos["jax"]["deviations"][0]


def test_python_dash_m_runs_info() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "agnosticopt", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).parent,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"agnosticopt {agnosticopt.__version__}")


def test_conformance_passes_and_prints_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "conformance",
            "--backend",
            "numpy_readonly",
            "--backend",
            "array_api_strict",
            "--case",
            "Adam",
            "--case",
            "ClipNorm+Adam",
            *QUICK,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32: 3 steps x 4099 elements (normal and special data)" in out
    row = next(line for line in out.splitlines() if line.startswith("ClipNorm+Adam "))
    assert row.split()[1:] == ["identical", "identical"]
    assert "update_matches_update_" in out
    assert out.rstrip().endswith("every backend gives numpy's bits")


def test_conformance_fails_on_a_broken_backend(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(
        [
            "conformance",
            "--backend",
            "_faults:fma_backend",
            "--case",
            "Momentum",
            "--case",
            "Descent",
            "--dtype",
            "float32",
            "--no-properties",
            *QUICK,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(("Momentum ", "Descent "))
    }
    assert rows["Descent"] == ["identical"]
    assert rows["Momentum"][1] == "ulp"  # e.g. "1 ulp [1]"
    assert re.search(r"trajectory: Momentum in float32, \w+ data on numpy-fma", out), (
        out
    )
    assert "first at [" in out
    assert "FAILED: " in out


def test_conformance_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "conformance",
            "--json",
            "--backend",
            "_faults:reciprocal_backend",
            "--backend",
            "cupy",
            "--case",
            "Adam",
            "--dtype",
            "float64",
            "--dataset",
            "normal",
            "--no-properties",
            *QUICK,
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["failures"] == 2
    assert "cupy" in doc["unavailable"]
    failed = [r for r in doc["results"] if r["status"] == "differs"]
    assert {r["check"] for r in failed} == {"trajectory", "golden"}
    assert all(r["case"] == "Adam" and r["dtype"] == "float64" for r in failed)
    assert all(r["max_ulp"] >= 1 and "first at [" in r["detail"] for r in failed)
    assert {r["status"] for r in doc["results"] if r["backend"] == "cupy"} == {
        "skipped"
    }


def test_conformance_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "nonsense"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["conformance", "--case", "NoSuchRule", *QUICK]) == 2
    assert "no conformance case" in capsys.readouterr().err


def test_demo_gives_one_digest(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--steps",
            "15",
            "--backend",
            "numpy",
            "--backend",
            "numpy_readonly",
            "--backend",
            "array_api_strict",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "same bits on all 3 backends." in out
    digests = {
        line.split()[-1]
        for line in out.splitlines()
        if line.startswith(("numpy ", "numpy_readonly ", "array_api_strict "))
    }
    assert len(digests) == 1


def test_demo_takes_a_rule_expression_or_a_case(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (
        main(
            [
                "demo",
                "--steps",
                "3",
                "--backend",
                "numpy",
                "--rule",
                "OptimiserChain(ClipGrad(1), Lion(1e-3))",
            ]
        )
        == 0
    )
    assert "Lion(eta=0.001" in capsys.readouterr().out
    assert main(["demo", "--steps", "3", "--backend", "numpy", "--rule", "adamw"]) == 0
    assert "AdamW(" in capsys.readouterr().out
    assert main(["demo", "--rule", "__import__('os')"]) == 2
    assert "neither a case name nor a rule" in capsys.readouterr().err


def test_demo_exposes_a_broken_backend(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--steps",
            "5",
            "--backend",
            "numpy",
            "--backend",
            "_faults:sqrt_backend",
        ]
    )
    assert code == 1
    assert "DIFFERENT bits: 2 distinct digests" in capsys.readouterr().out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_on_a_terminal_and_erases_itself() -> None:
    stream = _Terminal()
    with Progress(4, stream=stream) as bar:
        bar.interval = 0.0
        bar.advance(label="Adam float32")
        assert bar.line().startswith(
            "[#######---------------------] 1/4  25%  Adam float32"
        )
        bar.advance(3)
    text = stream.getvalue()
    assert "\r[" in text
    assert "4/4 100%" in text
    assert text.endswith("\r")
    assert text.split("\r")[-2].strip() == ""


def test_progress_bar_is_silent_off_a_terminal() -> None:
    stream = io.StringIO()
    with Progress(3, stream=stream) as bar:
        bar.advance(3, label="x")
    assert stream.getvalue() == ""


# -- usage errors and vacuous runs (issue 9, item 6) -----------------------------------
@pytest.mark.parametrize(
    ("command", "option"),
    [
        *[
            ("conformance", o)
            for o in [
                ("--steps", "0"),
                ("--steps", "-3"),
                ("--size", "0"),
                ("--size", "-5"),
                ("--steps", "2.5"),
            ]
        ],
        ("demo", ("--steps", "0")),
        ("demo", ("--steps", "-3")),
    ],
)
def test_non_positive_steps_and_sizes_are_usage_errors(
    command: str, option: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, f"{option[0]}={option[1]}", "--backend", "numpy"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}: must be a positive integer, got '{option[1]}'" in err


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("exiting_backend", "exited (SystemExit(0)) instead of returning a backend"),
        ("none_backend", "is not a conformance backend"),
    ],
)
def test_a_backend_factory_that_gives_nothing_fails(
    factory: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["conformance", *QUICK], ["demo", "--steps", "2"]):
        assert main([*command, "--backend", f"_cli_backends:{factory}"]) == 2
        assert message in capsys.readouterr().err


def test_a_run_that_checked_nothing_fails(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "conformance",
            "--backend",
            "_cli_backends:unavailable_backend",
            "--case",
            "Descent",
            *QUICK,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED: no check ran" in captured.out
    assert "nothing was verified" in captured.err
    code = main(
        [
            "conformance",
            "--json",
            "--backend",
            "_cli_backends:unavailable_backend",
            "--case",
            "Descent",
            "--no-properties",
            *QUICK,
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["checked"] == 0
    assert (
        main(["demo", "--steps", "2", "--backend", "_cli_backends:unavailable_backend"])
        == 1
    )
    assert "no backend was available" in capsys.readouterr().err


def test_demo_rule_is_parsed_with_tuples_keywords_and_strings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agnosticopt.conformance._cli import parse_rule

    text = "OptimiserChain(ClipGrad(1), Lion(1e-4, beta=(0.9, 0.99)))"
    assert parse_rule(text) == agnosticopt.OptimiserChain(
        agnosticopt.ClipGrad(1), agnosticopt.Lion(1e-4, beta=(0.9, 0.99))
    )
    assert parse_rule(
        " MixedPrecision('float64', AdamW(lambda_=1e-2, couple=False)) "
    ) == (
        agnosticopt.MixedPrecision(
            "float64", agnosticopt.AdamW(lambda_=1e-2, couple=False)
        )
    )
    assert parse_rule("ClipNorm(1, -inf, throw=False)") == agnosticopt.ClipNorm(
        1, -math.inf, throw=False
    )
    assert main(["demo", "--steps", "2", "--backend", "numpy", "--rule", text]) == 0
    assert "Lion(eta=0.0001, beta=(0.9, 0.99))" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("__import__('os').system('true')", "not a rule name"),
        ("().__class__.__base__.__subclasses__()", "not a rule name"),
        ("open('PWNED', 'w')", "not a rule name"),
        ("Adam.__init__", "Attribute is not allowed"),
        ("Adam(1e-3) + Descent()", "BinOp is not allowed"),
        ("Adam(1e-3 * 2)", "BinOp is not allowed"),
        ("Adam(*[0.1])", "no * or ** arguments"),
        ("Adam(**{'eta': 0.1})", "no * or ** arguments"),
        ("Adam(beta=[0.9, 0.99])", "List is not allowed"),
        ("OptimiserChain", "a bare name"),
        ("Rule()", "not a rule name"),
        ("Replace(1)", "not a rule name"),
        ("Adam(beta=(0.9,))", "Adam.beta must be a tuple of 2 real numbers"),
        ("Adam(-1)", "Adam.eta must be in [0, inf)"),
        ("(0.1, 0.2)", "not a rule"),
        ("-'x'", "a sign applies to numbers only"),
        ("Adam(", "neither a case name nor a rule expression"),
        ("lambda: 0", "Lambda is not allowed"),
    ],
)
def test_demo_rule_refuses_anything_else_without_evaluating_it(
    text: str,
    why: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "2", "--backend", "numpy", f"--rule={text}"]) == 2
    err = capsys.readouterr().err
    assert why in err
    assert "neither a case name nor a rule expression" in err
    assert list(tmp_path.iterdir()) == []  # open() never ran


# -- conformance --rule: a user's rule from a module or a file -------------------------------

USER_RULES = """
import dataclasses

import numpy as np

import agnosticopt as opt


@dataclasses.dataclass(frozen=True)
class DecayDescent(opt.Rule):
    eta: float = 0.1

    def init(self, x, xp):
        return 1

    def apply(self, t, x, dx, xp):
        (eta,) = opt.hyper(xp, x, self.eta / np.sqrt(t))
        return t + 1, xp.multiply(dx, eta)


@dataclasses.dataclass(frozen=True)
class OperatorRule(opt.Rule):
    eta: float = 0.3

    def init(self, x, xp):
        return None

    def apply(self, state, x, dx, xp):
        return state, float(self.eta) / (dx * dx + 1)   # Python operators on arrays


def decay_factory():
    return DecayDescent(0.05)
"""

#: > 100k elements: the exact rule's identity claim is made on a large array.
RULE_QUICK = ["--steps", "2", "--size", "131089", "--dtype", "float32"]


@pytest.fixture
def rules_file(tmp_path: Path) -> Iterator[Path]:
    """The user's module in a temp folder; forgotten by ``sys.modules`` afterwards."""
    path = tmp_path / "user_rules_cli.py"
    path.write_text(USER_RULES, encoding="utf-8")
    before = set(sys.modules)
    yield path
    for name in set(sys.modules) - before:
        if str(tmp_path) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]


def test_conformance_rule_from_a_file_is_identical_everywhere(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "conformance",
            "--rule",
            f"{rules_file}:DecayDescent",
            "--backend",
            "numpy",
            "--backend",
            "torch",
            "--backend",
            "array_api_strict",
            *RULE_QUICK,
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("DecayDescent: 131089 elements, steps 2 in float32")
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.startswith(("numpy ", "torch ", "array_api_strict "))
    }
    assert "numpy" in rows  # the table has a row per available backend
    for cells in rows.values():
        assert cells == ["identical", "passed"], out
    assert out.rstrip().endswith(
        "OK: DecayDescent gives numpy's bits on every available backend"
    )


def test_conformance_rule_says_which_backend_differs(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("torch")
    code = main(
        [
            "conformance",
            "--rule",
            f"{rules_file}:OperatorRule",
            "--backend",
            "numpy",
            "--backend",
            "torch",
            "--dataset",
            "normal",
            "--no-properties",
            *RULE_QUICK,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out
    row = next(line for line in out.splitlines() if line.startswith("torch "))
    assert re.search(r"differs: \d+ of 131089 elements of x, max \d+ ulp", row), out
    assert next(line for line in out.splitlines() if line.startswith("numpy ")).split()[
        1:
    ] == ["identical"]
    assert (
        "uses non-exact ops: `*`, `+`, `/` (identical only if the backends agree)"
        in out
    )
    assert "OperatorWarning: rule OperatorRule" in out
    assert out.rstrip().endswith(
        "FAILED: OperatorRule is not identical to numpy on torch"
    )


def test_conformance_rule_from_a_module_factory_as_json(
    rules_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.syspath_prepend(str(rules_file.parent))
    code = main(
        [
            "conformance",
            "--rule",
            "user_rules_cli:decay_factory",
            "--backend",
            "numpy",
            "--json",
            "--no-properties",
            "--dataset",
            "special",
            *RULE_QUICK,
        ]
    )
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["rule"] == "DecayDescent(eta=0.05)"
    assert doc["identical"] is True
    assert doc["non_exact_ops"] == []
    assert [(r["backend"], r["dataset"], r["status"]) for r in doc["results"]] == [
        ("numpy", "special", "identical")
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "expected 'module:attribute' or 'path/to/file.py:attribute'"),
        ("{file}:Missing", "has no attribute 'Missing'"),
        ("{file}:DecayDescent.nested", "'DecayDescent' has no attribute 'nested'"),
        ("{dir}/absent.py:Rule", "no such file"),
        ("no_such_module_xyz:Rule", "No module named 'no_such_module_xyz'"),
        ("{file}:np", "expected an agnosticopt.Rule, a Rule class"),
        ("agnosticopt:AccumGrad", "cannot be called without arguments"),
    ],
)
def test_conformance_rule_usage_errors(
    spec: str, message: str, rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec.format(file=rules_file, dir=rules_file.parent)
    assert main(["conformance", "--rule", spec, "--backend", "numpy", *RULE_QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith("agnosticopt conformance: ")
    assert message in err


def test_conformance_rule_and_case_exclude_each_other(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["conformance", "--rule", f"{rules_file}:DecayDescent", "--case", "Adam"])
        == 2
    )
    assert "--rule and --case exclude each other" in capsys.readouterr().err
