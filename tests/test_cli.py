"""The ``agnosticopt`` command line: info, conformance, demo, and the progress bar.

Run in-process through ``main([...])`` (short settings keep this fast), and
once as ``python -m agnosticopt info`` in a subprocess.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from agnosticopt.conformance._progress import Progress

import agnosticopt
from agnosticopt._cli import main

QUICK = ["--steps", "3", "--size", "4099"]


def test_info_lists_backends_devices_and_fixes(capsys: pytest.CaptureFixture[str]) -> None:
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
    run = subprocess.run([sys.executable, "-m", "agnosticopt", "info"], capture_output=True,
                         text=True, timeout=120, check=False, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"agnosticopt {agnosticopt.__version__}")


def test_conformance_passes_and_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--backend", "numpy_readonly", "--backend", "array_api_strict",
                 "--case", "Adam", "--case", "ClipNorm+Adam", *QUICK])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "float32: 3 steps x 4099 elements (normal and special data)" in out
    row = next(line for line in out.splitlines() if line.startswith("ClipNorm+Adam "))
    assert row.split()[1:] == ["identical", "identical"]
    assert "update_matches_update_" in out
    assert out.rstrip().endswith("every backend gives numpy's bits")


def test_conformance_fails_on_a_broken_backend(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--backend", "_faults:fma_backend", "--case", "Momentum",
                 "--case", "Descent", "--dtype", "float32", "--no-properties", *QUICK])
    out = capsys.readouterr().out
    assert code == 1
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("Momentum ", "Descent "))}
    assert rows["Descent"] == ["identical"]
    assert rows["Momentum"][1] == "ulp"  # e.g. "1 ulp [1]"
    assert re.search(r"trajectory: Momentum in float32, \w+ data on numpy-fma", out), out
    assert "first at [" in out
    assert "FAILED: " in out


def test_conformance_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["conformance", "--json", "--backend", "_faults:reciprocal_backend",
                 "--backend", "cupy", "--case", "Adam", "--dtype", "float64",
                 "--dataset", "normal", "--no-properties", *QUICK])
    doc = json.loads(capsys.readouterr().out)
    assert code == 1
    assert doc["failures"] == 2
    assert "cupy" in doc["unavailable"]
    failed = [r for r in doc["results"] if r["status"] == "differs"]
    assert {r["check"] for r in failed} == {"trajectory", "golden"}
    assert all(r["case"] == "Adam" and r["dtype"] == "float64" for r in failed)
    assert all(r["max_ulp"] >= 1 and "first at [" in r["detail"] for r in failed)
    assert {r["status"] for r in doc["results"] if r["backend"] == "cupy"} == {"skipped"}


def test_conformance_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "--backend", "nonsense"]) == 2
    assert "unknown backend" in capsys.readouterr().err
    assert main(["conformance", "--case", "NoSuchRule", *QUICK]) == 2
    assert "no conformance case" in capsys.readouterr().err


def test_demo_gives_one_digest(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--steps", "15", "--backend", "numpy", "--backend", "numpy_readonly",
                 "--backend", "array_api_strict"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "same bits on all 3 backends." in out
    digests = {line.split()[-1] for line in out.splitlines()
               if line.startswith(("numpy ", "numpy_readonly ", "array_api_strict "))}
    assert len(digests) == 1


def test_demo_takes_a_rule_expression_or_a_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--steps", "3", "--backend", "numpy",
                 "--rule", "OptimiserChain(ClipGrad(1), Lion(1e-3))"]) == 0
    assert "Lion(eta=0.001" in capsys.readouterr().out
    assert main(["demo", "--steps", "3", "--backend", "numpy", "--rule", "adamw"]) == 0
    assert "AdamW(" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="neither a case name nor a rule"):
        main(["demo", "--rule", "__import__('os')"])


def test_demo_exposes_a_broken_backend(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--steps", "5", "--backend", "numpy", "--backend", "_faults:sqrt_backend"])
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
        assert bar.line().startswith("[#######---------------------] 1/4  25%  Adam float32")
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
